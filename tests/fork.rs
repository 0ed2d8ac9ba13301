//! Fork test: what nginx workers and libp11 do.
//!
//! The parent initializes the module, logs in and makes a key; it forks. The child must
//! see `CKR_CRYPTOKI_NOT_INITIALIZED` until it calls `C_Initialize`, which must then work
//! (find the key by label, log in, encrypt). The parent's own pre-fork session must keep
//! working afterwards, even though the child initialized and finalized the module.
//!
//! Raw function-table calls only (a `cryptoki` context would finalize on its own terms),
//! and a single `#[test]` in this binary so that nothing else runs while we fork.

#[macro_use]
mod common;

use std::ptr;

use common::{
    gcm_params, mech_with, raw, raw_login, raw_open_session, raw_token_slot, Template, USER_PIN,
};
use cryptoki_sys::*;

const KEY_LABEL: &str = "fork-key";
const IV: [u8; 12] = [0x24; 12];
const PLAINTEXT: &[u8] = b"the same key in parent and child after fork()";

/// Why the child failed, as its exit status.
#[derive(Clone, Copy, Debug)]
#[repr(i32)]
enum ChildStep {
    GetInfoNotInitialized = 10,
    OpenSessionNotInitialized,
    ParentSessionNotInitialized,
    Initialize,
    SlotList,
    OpenSession,
    Login,
    FindKey,
    Encrypt,
    Pipe,
    Finalize,
    Panicked = 99,
}

impl ChildStep {
    fn from_status(code: i32) -> Option<ChildStep> {
        use ChildStep::*;
        [
            GetInfoNotInitialized,
            OpenSessionNotInitialized,
            ParentSessionNotInitialized,
            Initialize,
            SlotList,
            OpenSession,
            Login,
            FindKey,
            Encrypt,
            Pipe,
            Finalize,
            Panicked,
        ]
        .into_iter()
        .find(|s| *s as i32 == code)
    }
}

/// AES-GCM encryption of [`PLAINTEXT`] under [`IV`]; `Err(rv)` on failure.
fn encrypt(s: CK_SESSION_HANDLE, key: CK_OBJECT_HANDLE) -> Result<Vec<u8>, CK_RV> {
    let f = raw().f;
    let mut iv = IV;
    let mut p = gcm_params(&mut iv, 128);
    let mut m = mech_with(CKM_AES_GCM, &mut p, std::mem::size_of::<CK_GCM_PARAMS>());
    let rv = ck!(f, C_EncryptInit, s, &mut m, key);
    if rv != CKR_OK {
        return Err(rv);
    }
    let mut pt = PLAINTEXT.to_vec();
    let mut out = vec![0u8; pt.len() + 16];
    let mut n = out.len() as CK_ULONG;
    let rv = ck!(
        f,
        C_Encrypt,
        s,
        pt.as_mut_ptr(),
        pt.len() as CK_ULONG,
        out.as_mut_ptr(),
        &mut n
    );
    if rv != CKR_OK {
        return Err(rv);
    }
    out.truncate(n as usize);
    Ok(out)
}

fn decrypt(s: CK_SESSION_HANDLE, key: CK_OBJECT_HANDLE, ct: &[u8]) -> Result<Vec<u8>, CK_RV> {
    let f = raw().f;
    let mut iv = IV;
    let mut p = gcm_params(&mut iv, 128);
    let mut m = mech_with(CKM_AES_GCM, &mut p, std::mem::size_of::<CK_GCM_PARAMS>());
    let rv = ck!(f, C_DecryptInit, s, &mut m, key);
    if rv != CKR_OK {
        return Err(rv);
    }
    let mut c = ct.to_vec();
    let mut out = vec![0u8; ct.len()];
    let mut n = out.len() as CK_ULONG;
    let rv = ck!(
        f,
        C_Decrypt,
        s,
        c.as_mut_ptr(),
        c.len() as CK_ULONG,
        out.as_mut_ptr(),
        &mut n
    );
    if rv != CKR_OK {
        return Err(rv);
    }
    out.truncate(n as usize);
    Ok(out)
}

/// Handles of the objects labelled [`KEY_LABEL`].
fn find_key(s: CK_SESSION_HANDLE) -> Result<Vec<CK_OBJECT_HANDLE>, CK_RV> {
    let f = raw().f;
    let mut t = Template::default().bytes(CKA_LABEL, KEY_LABEL.as_bytes());
    let mut attrs = t.raw();
    let rv = ck!(
        f,
        C_FindObjectsInit,
        s,
        attrs.as_mut_ptr(),
        attrs.len() as CK_ULONG
    );
    if rv != CKR_OK {
        return Err(rv);
    }
    let mut found = vec![0 as CK_OBJECT_HANDLE; 16];
    let mut n: CK_ULONG = 0;
    let rv = ck!(f, C_FindObjects, s, found.as_mut_ptr(), 16, &mut n);
    let rv_final = ck!(f, C_FindObjectsFinal, s);
    if rv != CKR_OK {
        return Err(rv);
    }
    if rv_final != CKR_OK {
        return Err(rv_final);
    }
    found.truncate(n as usize);
    Ok(found)
}

/// Reports on the real stderr: the test harness captures `eprintln!` in memory, and the
/// child's copy of that capture is lost when it exits.
fn child_say(msg: &str) {
    let line = format!("fork child: {msg}\n");
    // SAFETY: writing an owned buffer to fd 2.
    unsafe { libc::write(2, line.as_ptr().cast(), line.len()) };
}

fn fail(step: ChildStep, rv: CK_RV) -> i32 {
    child_say(&format!("step {step:?} failed: {}", common::rv_name(rv)));
    step as i32
}

/// The child's work; returns its exit status (0 = success).
fn child(slot: CK_SLOT_ID, parent_session: CK_SESSION_HANDLE, pipe_w: i32) -> i32 {
    use ChildStep::*;
    let f = raw().f;

    let mut info: CK_INFO = unsafe { std::mem::zeroed() };
    let rv = ck!(f, C_GetInfo, &mut info);
    if rv != CKR_CRYPTOKI_NOT_INITIALIZED {
        return fail(GetInfoNotInitialized, rv);
    }
    let mut h: CK_SESSION_HANDLE = 0;
    let rv = ck!(
        f,
        C_OpenSession,
        slot,
        CKF_SERIAL_SESSION,
        ptr::null_mut(),
        None,
        &mut h
    );
    if rv != CKR_CRYPTOKI_NOT_INITIALIZED {
        return fail(OpenSessionNotInitialized, rv);
    }
    let mut sinfo: CK_SESSION_INFO = unsafe { std::mem::zeroed() };
    let rv = ck!(f, C_GetSessionInfo, parent_session, &mut sinfo);
    if rv != CKR_CRYPTOKI_NOT_INITIALIZED {
        return fail(ParentSessionNotInitialized, rv);
    }

    let mut args = CK_C_INITIALIZE_ARGS {
        CreateMutex: None,
        DestroyMutex: None,
        LockMutex: None,
        UnlockMutex: None,
        flags: CKF_OS_LOCKING_OK,
        pReserved: ptr::null_mut(),
    };
    let rv = ck!(f, C_Initialize, &mut args as *mut _ as *mut _);
    if rv != CKR_OK {
        return fail(Initialize, rv);
    }
    // Same slot id as before the fork.
    let slot_after = match std::panic::catch_unwind(raw_token_slot) {
        Ok(s) => s,
        Err(_) => return fail(SlotList, CKR_GENERAL_ERROR),
    };
    if slot_after != slot {
        child_say(&format!("slot id {slot_after} != parent's {slot}"));
        return SlotList as i32;
    }
    let mut s: CK_SESSION_HANDLE = 0;
    let rv = ck!(
        f,
        C_OpenSession,
        slot,
        CKF_SERIAL_SESSION | CKF_RW_SESSION,
        ptr::null_mut(),
        None,
        &mut s
    );
    if rv != CKR_OK || s == 0 {
        return fail(OpenSession, rv);
    }
    let mut pin = USER_PIN.as_bytes().to_vec();
    let rv = ck!(
        f,
        C_Login,
        s,
        CKU_USER,
        pin.as_mut_ptr(),
        pin.len() as CK_ULONG
    );
    if rv != CKR_OK {
        return fail(Login, rv);
    }
    let key = match find_key(s) {
        Ok(found) if found.len() == 1 => found[0],
        Ok(found) => {
            child_say(&format!("{} objects labelled {KEY_LABEL}", found.len()));
            return FindKey as i32;
        }
        Err(rv) => return fail(FindKey, rv),
    };
    let ct = match encrypt(s, key) {
        Ok(ct) => ct,
        Err(rv) => return fail(Encrypt, rv),
    };
    // SAFETY: writing an owned buffer to our pipe.
    let written = unsafe { libc::write(pipe_w, ct.as_ptr().cast(), ct.len()) };
    if written != ct.len() as isize {
        return fail(Pipe, CKR_GENERAL_ERROR);
    }
    let rv = ck!(f, C_Finalize, ptr::null_mut());
    if rv != CKR_OK {
        return fail(Finalize, rv);
    }
    0
}

#[test]
fn fork_child_reinitializes_and_parent_session_survives() {
    let f = raw().f;
    let mut args = CK_C_INITIALIZE_ARGS {
        CreateMutex: None,
        DestroyMutex: None,
        LockMutex: None,
        UnlockMutex: None,
        flags: CKF_OS_LOCKING_OK,
        pReserved: ptr::null_mut(),
    };
    assert_rv!(
        ck!(f, C_Initialize, &mut args as *mut _ as *mut _),
        CKR_OK,
        "parent C_Initialize"
    );
    let slot = raw_token_slot();
    let s = raw_open_session(slot);
    raw_login(s);

    // A token key the child can find by label.
    let mut t = Template::default()
        .ulong(CKA_CLASS, CKO_SECRET_KEY)
        .ulong(CKA_KEY_TYPE, CKK_AES)
        .ulong(CKA_VALUE_LEN, 32)
        .boolean(CKA_TOKEN, true)
        .boolean(CKA_PRIVATE, true)
        .boolean(CKA_SENSITIVE, true)
        .boolean(CKA_EXTRACTABLE, false)
        .boolean(CKA_ENCRYPT, true)
        .boolean(CKA_DECRYPT, true)
        .bytes(CKA_LABEL, KEY_LABEL.as_bytes());
    let mut attrs = t.raw();
    let mut m = common::mech(CKM_AES_KEY_GEN);
    let mut key: CK_OBJECT_HANDLE = 0;
    assert_rv!(
        ck!(
            f,
            C_GenerateKey,
            s,
            &mut m,
            attrs.as_mut_ptr(),
            attrs.len() as CK_ULONG,
            &mut key
        ),
        CKR_OK,
        "C_GenerateKey"
    );
    let parent_ct = encrypt(s, key).expect("parent encrypt before fork");

    let mut fds = [0i32; 2];
    // SAFETY: fds has room for two descriptors.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0, "pipe");
    let (pipe_r, pipe_w) = (fds[0], fds[1]);

    // SAFETY: the child only runs module code and then _exits; it never returns into the
    // test harness.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        unsafe { libc::close(pipe_r) };
        let code = std::panic::catch_unwind(|| child(slot, s, pipe_w))
            .unwrap_or(ChildStep::Panicked as i32);
        // SAFETY: leave without running the parent's atexit handlers or destructors.
        unsafe { libc::_exit(code) };
    }

    unsafe { libc::close(pipe_w) };
    let mut status = 0i32;
    // SAFETY: waiting for our own child.
    let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(waited, pid, "waitpid");
    let mut child_ct = vec![0u8; 256];
    // SAFETY: reading into an owned buffer from our pipe (the child has exited).
    let n = unsafe { libc::read(pipe_r, child_ct.as_mut_ptr().cast(), child_ct.len()) };
    unsafe { libc::close(pipe_r) };
    assert!(
        libc::WIFEXITED(status),
        "child did not exit normally (status {status:#x})"
    );
    let code = libc::WEXITSTATUS(status);
    assert_eq!(
        code,
        0,
        "child failed at step {:?} (exit status {code})",
        ChildStep::from_status(code)
    );
    assert!(n > 0, "child wrote no ciphertext");
    child_ct.truncate(n as usize);
    assert_eq!(
        child_ct, parent_ct,
        "child encrypted with a different key (same IV and plaintext)"
    );

    // The parent's pre-fork session, login and key are untouched.
    let mut info: CK_SESSION_INFO = unsafe { std::mem::zeroed() };
    assert_rv!(
        ck!(f, C_GetSessionInfo, s, &mut info),
        CKR_OK,
        "parent session after fork"
    );
    assert_eq!(info.state, CKS_RW_USER_FUNCTIONS);
    assert_eq!(
        encrypt(s, key).expect("parent encrypt after fork"),
        parent_ct
    );
    assert_eq!(
        decrypt(s, key, &child_ct).expect("parent decrypts the child's ciphertext"),
        PLAINTEXT
    );
    assert_eq!(find_key(s).expect("find after fork"), vec![key]);
    // A new session in the parent works too.
    let s2 = raw_open_session(slot);
    assert_eq!(
        encrypt(s2, key).expect("encrypt in a new session"),
        parent_ct
    );

    assert_rv!(
        ck!(f, C_Finalize, ptr::null_mut()),
        CKR_OK,
        "parent C_Finalize"
    );
}
