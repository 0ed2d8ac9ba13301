//! fork() while another thread is inside the module: 200 children, each initializing the
//! module again and using a key, while a thread of the parent keeps calling into it
//! (encrypt, decrypt, key generation, find, session open/close). No child may hang: a
//! child copies every lock as it was at the fork, and one held by the busy thread (in
//! cmkp11, in the backend, in the backend's crypto library) would never be released in the
//! child. Each child gets a time limit, so a hang fails the test instead of hanging it.
//!
//! Raw function-table calls only, and a single `#[test]` in this binary so that nothing
//! else runs while we fork.

#[macro_use]
mod common;

use common::{gcm_params, mech_with, raw, raw_login, raw_open_session, raw_token_slot, Template};
use cryptoki_sys::*;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const FORKS: usize = 200;
/// Children alive at a time: one (several would also test the token's multi-process
/// locking, which is not the subject here).
const BATCH: usize = 1;
/// Every this many children also log in and use a key (all of them initialize, open a
/// session and finalize: the hang was in the initialization).
const FULL_EVERY: usize = 10;
/// A child that has not exited after this long is hung (a healthy one takes well under a
/// second, also on a loaded machine).
const CHILD_LIMIT: Duration = Duration::from_secs(10);
const KEY_LABEL: &str = "fork-busy-key";

fn init() -> CK_RV {
    let mut args = CK_C_INITIALIZE_ARGS {
        CreateMutex: None,
        DestroyMutex: None,
        LockMutex: None,
        UnlockMutex: None,
        flags: CKF_OS_LOCKING_OK,
        pReserved: ptr::null_mut(),
    };
    ck!(raw().f, C_Initialize, &mut args as *mut _ as *mut _)
}

fn encrypt(s: CK_SESSION_HANDLE, key: CK_OBJECT_HANDLE, iv: [u8; 12]) -> Result<Vec<u8>, CK_RV> {
    let f = raw().f;
    let mut iv = iv;
    let mut p = gcm_params(&mut iv, 128);
    let mut m = mech_with(CKM_AES_GCM, &mut p, std::mem::size_of::<CK_GCM_PARAMS>());
    let rv = ck!(f, C_EncryptInit, s, &mut m, key);
    if rv != CKR_OK {
        return Err(rv);
    }
    let mut pt = b"busy".to_vec();
    let mut out = vec![0u8; 64];
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

fn find_key(s: CK_SESSION_HANDLE) -> Result<CK_OBJECT_HANDLE, CK_RV> {
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
    let mut found = [0 as CK_OBJECT_HANDLE; 4];
    let mut n: CK_ULONG = 0;
    let rv = ck!(f, C_FindObjects, s, found.as_mut_ptr(), 4, &mut n);
    let _ = ck!(f, C_FindObjectsFinal, s);
    match (rv, n) {
        (CKR_OK, 1) => Ok(found[0]),
        (CKR_OK, _) => Err(CKR_GENERAL_ERROR),
        (rv, _) => Err(rv),
    }
}

fn session_key(s: CK_SESSION_HANDLE) -> Result<CK_OBJECT_HANDLE, CK_RV> {
    let mut t = Template::default()
        .ulong(CKA_CLASS, CKO_SECRET_KEY)
        .ulong(CKA_KEY_TYPE, CKK_AES)
        .ulong(CKA_VALUE_LEN, 32)
        .boolean(CKA_TOKEN, false)
        .boolean(CKA_SENSITIVE, true)
        .boolean(CKA_EXTRACTABLE, false)
        .boolean(CKA_ENCRYPT, true)
        .boolean(CKA_DECRYPT, true);
    let mut attrs = t.raw();
    let mut m = common::mech(CKM_AES_KEY_GEN);
    let mut h: CK_OBJECT_HANDLE = 0;
    match ck!(
        raw().f,
        C_GenerateKey,
        s,
        &mut m,
        attrs.as_mut_ptr(),
        attrs.len() as CK_ULONG,
        &mut h
    ) {
        CKR_OK => Ok(h),
        rv => Err(rv),
    }
}

/// Reports on the real stderr (the harness's capture is not the child's).
fn child_say(msg: &str) {
    let line = format!("fork child: {msg}\n");
    // SAFETY: writing an owned buffer to fd 2.
    unsafe { libc::write(2, line.as_ptr().cast(), line.len()) };
}

/// The child's work: initialize, open a session, (`full`: log in, find the key, encrypt),
/// finalize. Exit status.
fn child(slot: CK_SLOT_ID, full: bool) -> i32 {
    let f = raw().f;
    let step = |n: i32, rv: CK_RV| {
        child_say(&format!("step {n}: {}", common::rv_name(rv)));
        n
    };
    let rv = init();
    if rv != CKR_OK {
        return step(10, rv);
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
    if rv != CKR_OK {
        return step(11, rv);
    }
    let mut info: CK_SESSION_INFO = unsafe { std::mem::zeroed() };
    let rv = ck!(f, C_GetSessionInfo, s, &mut info);
    if rv != CKR_OK {
        return step(16, rv);
    }
    if !full {
        let rv = ck!(f, C_Finalize, ptr::null_mut());
        return if rv == CKR_OK { 0 } else { step(15, rv) };
    }
    let mut pin = common::USER_PIN.as_bytes().to_vec();
    let rv = ck!(
        f,
        C_Login,
        s,
        CKU_USER,
        pin.as_mut_ptr(),
        pin.len() as CK_ULONG
    );
    if rv != CKR_OK {
        return step(12, rv);
    }
    let key = match find_key(s) {
        Ok(k) => k,
        Err(rv) => return step(13, rv),
    };
    if let Err(rv) = encrypt(s, key, [7; 12]) {
        return step(14, rv);
    }
    let rv = ck!(f, C_Finalize, ptr::null_mut());
    if rv != CKR_OK {
        return step(15, rv);
    }
    0
}

/// Waits for `pid` at most [`CHILD_LIMIT`]: `Some(status)`, or `None` if it hung (then it
/// is described with gdb when `FORK_GDB` is set, and killed).
fn wait_limited(pid: libc::pid_t) -> Option<i32> {
    let start = Instant::now();
    let mut pause = Duration::from_micros(200);
    loop {
        let mut status = 0;
        // SAFETY: our own child; WNOHANG never blocks.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            return Some(status);
        }
        if start.elapsed() > CHILD_LIMIT {
            if std::env::var_os("FORK_GDB").is_some() {
                let out = std::process::Command::new("gdb")
                    .args([
                        "-p",
                        &pid.to_string(),
                        "-batch",
                        "-ex",
                        "thread apply all bt",
                    ])
                    .output();
                if let Ok(o) = out {
                    eprintln!("hung child {pid}:\n{}", String::from_utf8_lossy(&o.stdout));
                }
            }
            // SAFETY: our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            return None;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(5));
    }
}

#[test]
fn forks_with_a_busy_thread_never_hang() {
    let f = raw().f;
    assert_rv!(init(), CKR_OK, "parent C_Initialize");
    let slot = raw_token_slot();
    let s = raw_open_session(slot);
    raw_login(s);
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

    // The busy thread: always inside the module (cmkp11, SoftHSM2, OpenSSL).
    let stop = AtomicBool::new(false);
    let busy_ops = AtomicU64::new(0);
    let (hung, failed) = std::thread::scope(|sc| {
        sc.spawn(|| {
            let mut i: u64 = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let s2 = raw_open_session(slot);
                let mut iv = [0u8; 12];
                iv[..8].copy_from_slice(&i.to_be_bytes());
                encrypt(s2, key, iv).expect("busy encrypt");
                let k = session_key(s2).expect("busy keygen");
                assert_eq!(ck!(f, C_DestroyObject, s2, k), CKR_OK);
                find_key(s2).expect("busy find");
                assert_eq!(ck!(f, C_CloseSession, s2), CKR_OK);
                busy_ops.fetch_add(1, Ordering::Relaxed);
            }
        });
        while busy_ops.load(Ordering::Relaxed) == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        let (mut hung, mut failed) = (Vec::new(), Vec::new());
        // A few children at a time (each fork still happens with the busy thread running).
        'forks: for batch in 0..FORKS / BATCH {
            let mut pids = Vec::new();
            for k in 0..BATCH {
                let full = (batch * BATCH + k) % FULL_EVERY == 0;
                // SAFETY: the child only calls the module and then _exits.
                let pid = unsafe { libc::fork() };
                assert!(pid >= 0, "fork");
                if pid == 0 {
                    let code = std::panic::catch_unwind(|| child(slot, full)).unwrap_or(99);
                    // SAFETY: leave without the parent's atexit handlers or destructors.
                    unsafe { libc::_exit(code) };
                }
                pids.push(pid);
            }
            for (i, pid) in pids.into_iter().enumerate() {
                let n = batch * BATCH + i;
                match wait_limited(pid) {
                    None => hung.push(n),
                    Some(st) if !(libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0) => {
                        failed.push((n, st))
                    }
                    Some(_) => {}
                }
            }
            if hung.len() >= 3 {
                break 'forks; // enough to fail, no need to wait for more
            }
        }
        stop.store(true, Ordering::Relaxed);
        (hung, failed)
    });
    assert!(busy_ops.load(Ordering::Relaxed) > 0);
    assert!(
        hung.is_empty() && failed.is_empty(),
        "of {FORKS} children, hung: {hung:?}, failed (index, wait status): {failed:?}"
    );
    // The parent still works.
    encrypt(s, key, [9; 12]).expect("parent encrypt after the forks");
    assert_rv!(
        ck!(f, C_Finalize, ptr::null_mut()),
        CKR_OK,
        "parent C_Finalize"
    );
}
