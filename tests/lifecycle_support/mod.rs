//! Helpers for the CMK lifecycle suites (`lifecycle.rs`, `lifecycle_cross.rs`,
//! `lifecycle_crash.rs`): raw PKCS#11 calls on the built module, the "cmkp11 admin"
//! vendor interface (its function table mirrored from `include/cmkp11.h`), and child
//! processes.
//!
//! **Child processes.** A test spawns its own test binary again with [`CHILD_ENV`] set
//! (see [`child_command`]); the binary's ignored `child_entry` test then runs the child's
//! role. The child inherits `SOFTHSM2_CONF` and `CMKP11_CONFIG`, so it uses the parent's
//! token; it never calls `common::test_env` (that would make a new token, and delete it at
//! exit). A child may load SoftHSM2 directly ([`softhsm`]) to read or edit the token under
//! cmkp11's feet: one process cannot have SoftHSM2 initialised both directly and through
//! cmkp11, which loads it in-process. Children talk to the parent in stdout lines that
//! start with [`LINE`].
#![allow(dead_code, non_snake_case, non_camel_case_types)]

use std::ffi::{c_void, CString};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::ptr;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use cryptoki_sys::*;

use crate::common::{self, rv_name, Template, USER_PIN};

/// Handle of an object.
pub type H = CK_OBJECT_HANDLE;
/// A call's value, or the `CK_RV` it failed with.
pub type Rv<T> = Result<T, CK_RV>;

// ----------------------------------------------------------------------------------------
// Vendor definitions, mirrored from include/cmkp11.h.
// ----------------------------------------------------------------------------------------

/// `CKA_CMKP11_BASE`: `CKA_VENDOR_DEFINED | 0x434D4B00`.
pub const CKA_CMKP11_BASE: CK_ATTRIBUTE_TYPE = CKA_VENDOR_DEFINED | 0x434D_4B00;
/// Lifecycle state (`STATE_*`).
pub const CKA_CMKP11_STATE: CK_ATTRIBUTE_TYPE = CKA_CMKP11_BASE + 1;
/// The primary version's number, or a version object's own.
pub const CKA_CMKP11_VERSION: CK_ATTRIBUTE_TYPE = CKA_CMKP11_BASE + 2;
/// How many versions the key has.
pub const CKA_CMKP11_VERSION_COUNT: CK_ATTRIBUTE_TYPE = CKA_CMKP11_BASE + 3;
/// Scheduled deletion, unix seconds (0: none).
pub const CKA_CMKP11_DELETION_DATE: CK_ATTRIBUTE_TYPE = CKA_CMKP11_BASE + 4;
/// Origin (`ORIGIN_*`).
pub const CKA_CMKP11_ORIGIN: CK_ATTRIBUTE_TYPE = CKA_CMKP11_BASE + 5;

/// `CMKP11_STATE_ENABLED`.
pub const STATE_ENABLED: CK_ULONG = 1;
/// `CMKP11_STATE_DISABLED`.
pub const STATE_DISABLED: CK_ULONG = 2;
/// `CMKP11_STATE_PENDING_DELETION`.
pub const STATE_PENDING_DELETION: CK_ULONG = 3;
/// `CMKP11_STATE_DESTROYED`.
pub const STATE_DESTROYED: CK_ULONG = 4;
/// `CMKP11_ORIGIN_GENERATED`.
pub const ORIGIN_GENERATED: CK_ULONG = 1;

/// `CMKP11_ADMIN_INTERFACE_NAME`.
pub const ADMIN_INTERFACE: &str = "cmkp11 admin";

/// `CK_CMKP11_ADMIN_FUNCTION_LIST` of include/cmkp11.h (`unsigned long` is `CK_ULONG`).
#[repr(C)]
pub struct CK_CMKP11_ADMIN_FUNCTION_LIST {
    /// 1.0
    pub version: CK_VERSION,
    /// Rotate a secret CMK.
    pub CMKP11_Rotate: Option<unsafe extern "C" fn(CK_SESSION_HANDLE, CK_OBJECT_HANDLE) -> CK_RV>,
    /// Disabled -> enabled.
    pub CMKP11_Enable: Option<unsafe extern "C" fn(CK_SESSION_HANDLE, CK_OBJECT_HANDLE) -> CK_RV>,
    /// Enabled -> disabled.
    pub CMKP11_Disable: Option<unsafe extern "C" fn(CK_SESSION_HANDLE, CK_OBJECT_HANDLE) -> CK_RV>,
    /// -> pending deletion in `days` days (0: the configured window).
    pub CMKP11_ScheduleDeletion:
        Option<unsafe extern "C" fn(CK_SESSION_HANDLE, CK_OBJECT_HANDLE, CK_ULONG) -> CK_RV>,
    /// Pending deletion -> disabled.
    pub CMKP11_CancelDeletion:
        Option<unsafe extern "C" fn(CK_SESSION_HANDLE, CK_OBJECT_HANDLE) -> CK_RV>,
    /// Destroys the keys whose deletion date has passed.
    pub CMKP11_Purge: Option<unsafe extern "C" fn(CK_SESSION_HANDLE) -> CK_RV>,
}

// ----------------------------------------------------------------------------------------
// Loading modules.
// ----------------------------------------------------------------------------------------

/// A loaded, initialised PKCS#11 module.
pub struct Module {
    _lib: cryptoki_sys::Pkcs11,
    /// The v2.40 function table.
    pub f: &'static CK_FUNCTION_LIST,
    /// The "cmkp11 admin" table (cmkp11 only).
    pub admin: Option<&'static CK_CMKP11_ADMIN_FUNCTION_LIST>,
}

// SAFETY: immutable static tables of a module initialised with OS locking.
unsafe impl Sync for Module {}
unsafe impl Send for Module {}

/// Calls a function of a table: `call!(table, C_GetInfo, &mut info)`.
#[macro_export]
macro_rules! call {
    ($table:expr, $func:ident $(, $arg:expr)* $(,)?) => {{
        let f = ($table)
            .$func
            .expect(concat!(stringify!($func), " is NULL in the function table"));
        #[allow(unused_unsafe, clippy::macro_metavars_in_unsafe)]
        // SAFETY: the callers pass pointers valid for the call, per PKCS#11.
        unsafe {
            f($($arg),*)
        }
    }};
}

fn check(rv: CK_RV, what: &str) {
    assert!(rv == CKR_OK, "{what}: {}", rv_name(rv));
}

impl Module {
    /// Loads `path`, gets its tables (the admin table when `admin`), and initialises it.
    pub fn load(path: &Path, admin: bool) -> Module {
        // SAFETY: loading a PKCS#11 module (trusted test code).
        let lib = unsafe { cryptoki_sys::Pkcs11::new(path.as_os_str()) }
            .unwrap_or_else(|e| panic!("dlopen {}: {e}", path.display()));
        let mut list: *mut CK_FUNCTION_LIST = ptr::null_mut();
        // SAFETY: valid out-pointer.
        check(
            unsafe { lib.C_GetFunctionList(&mut list) },
            "C_GetFunctionList",
        );
        assert!(!list.is_null());
        // SAFETY: the table lives as long as the library, which the Module keeps.
        let f: &'static CK_FUNCTION_LIST = unsafe { &*list };
        let admin = admin.then(|| {
            let name = CString::new(ADMIN_INTERFACE).unwrap();
            let mut iface: *mut CK_INTERFACE = ptr::null_mut();
            // SAFETY: NUL-terminated name, NULL version, valid out-pointer.
            let rv = unsafe {
                lib.C_GetInterface(
                    name.as_ptr() as *mut CK_UTF8CHAR,
                    ptr::null_mut(),
                    &mut iface,
                    0,
                )
            };
            check(rv, "C_GetInterface(\"cmkp11 admin\")");
            assert!(!iface.is_null(), "C_GetInterface returned NULL");
            // SAFETY: the module's static interface description.
            let iface = unsafe { &*iface };
            assert!(!iface.pFunctionList.is_null(), "admin table is NULL");
            // SAFETY: the admin interface's table has the layout of include/cmkp11.h.
            let t = unsafe { &*(iface.pFunctionList as *const CK_CMKP11_ADMIN_FUNCTION_LIST) };
            assert_eq!(
                (t.version.major, t.version.minor),
                (1, 0),
                "admin interface version"
            );
            t
        });
        let mut args = CK_C_INITIALIZE_ARGS {
            CreateMutex: None,
            DestroyMutex: None,
            LockMutex: None,
            UnlockMutex: None,
            flags: CKF_OS_LOCKING_OK,
            pReserved: ptr::null_mut(),
        };
        check(
            call!(
                f,
                C_Initialize,
                &mut args as *mut CK_C_INITIALIZE_ARGS as *mut c_void
            ),
            "C_Initialize",
        );
        Module {
            _lib: lib,
            f,
            admin,
        }
    }

    /// The admin table (panics for a module without one).
    pub fn admin(&self) -> &'static CK_CMKP11_ADMIN_FUNCTION_LIST {
        self.admin.expect("no admin interface loaded")
    }

    /// The slot of the test token.
    pub fn slot(&self) -> CK_SLOT_ID {
        let mut n: CK_ULONG = 0;
        check(
            call!(self.f, C_GetSlotList, CK_TRUE, ptr::null_mut(), &mut n),
            "C_GetSlotList",
        );
        let mut ids = vec![0 as CK_SLOT_ID; n as usize];
        check(
            call!(self.f, C_GetSlotList, CK_TRUE, ids.as_mut_ptr(), &mut n),
            "C_GetSlotList",
        );
        ids.truncate(n as usize);
        let found: Vec<CK_SLOT_ID> = ids
            .into_iter()
            .filter(|&id| {
                // SAFETY: CK_TOKEN_INFO is plain data.
                let mut info: CK_TOKEN_INFO = unsafe { std::mem::zeroed() };
                check(
                    call!(self.f, C_GetTokenInfo, id, &mut info),
                    "C_GetTokenInfo",
                );
                common::padded(&info.label) == common::TOKEN_LABEL
            })
            .collect();
        assert_eq!(found.len(), 1, "slots with token {}", common::TOKEN_LABEL);
        found[0]
    }
}

/// Env var naming a child process's role.
pub const CHILD_ENV: &str = "CMKP11_LIFECYCLE_CHILD";
/// Prefix of the protocol lines a child prints.
pub const LINE: &str = "@@ ";

/// The child's role, when this process is a child.
pub fn child_role() -> Option<String> {
    std::env::var(CHILD_ENV).ok().filter(|r| !r.is_empty())
}

static CMK: OnceLock<Module> = OnceLock::new();
static SOFTHSM: OnceLock<Module> = OnceLock::new();

/// cmkp11 (the built `libcmkp11.so`) with its admin interface, initialised once per
/// process. In the parent this first makes the private token (`common::test_env`).
pub fn cmk() -> &'static Module {
    CMK.get_or_init(|| {
        assert!(
            SOFTHSM.get().is_none(),
            "SoftHSM2 is loaded directly already"
        );
        if child_role().is_none() {
            common::test_env();
        }
        let path = common::module_path();
        assert!(
            common::testing_cmkp11(),
            "the lifecycle suites test cmkp11 itself, not {}",
            path.display()
        );
        Module::load(&path, true)
    })
}

/// SoftHSM2 loaded directly (children only: see the module docs).
pub fn softhsm() -> &'static Module {
    assert!(
        child_role().is_some(),
        "load SoftHSM2 directly in a child only"
    );
    SOFTHSM.get_or_init(|| {
        assert!(CMK.get().is_none(), "cmkp11 is loaded already");
        Module::load(&common::backend_module(), false)
    })
}

/// Unix seconds now.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Unix milliseconds now.
pub fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

/// Lower-case hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A label unique in this process and among processes.
pub fn unique_label(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

// ----------------------------------------------------------------------------------------
// Mechanisms.
// ----------------------------------------------------------------------------------------

/// A mechanism with owned parameters.
pub struct Mech {
    ty: CK_MECHANISM_TYPE,
    bytes: Vec<u8>,
    gcm: Option<Box<CK_GCM_PARAMS>>,
    aad: Vec<u8>,
}

impl Mech {
    /// No parameter.
    pub fn new(ty: CK_MECHANISM_TYPE) -> Mech {
        Mech {
            ty,
            bytes: Vec::new(),
            gcm: None,
            aad: Vec::new(),
        }
    }
    /// AES-KWP (RFC 5649), the envelope wrap: AES-KW (RFC 3394) on a token without it
    /// (kryoptic 1.0, `common::token_has_kwp`), where cmkp11 refuses AES-KWP.
    pub fn kwp() -> Mech {
        Mech::new(if common::token_has_kwp() {
            CKM_AES_KEY_WRAP_PAD
        } else {
            CKM_AES_KEY_WRAP
        })
    }
    /// AES-CBC-PAD with `iv`.
    pub fn cbc_pad(iv: &[u8; 16]) -> Mech {
        Mech {
            bytes: iv.to_vec(),
            ..Mech::new(CKM_AES_CBC_PAD)
        }
    }
    /// AES-GCM with a 12-byte `iv`, `aad` and a 128-bit tag.
    pub fn gcm(iv: &[u8; 12], aad: &[u8]) -> Mech {
        let mut m = Mech {
            bytes: iv.to_vec(),
            aad: aad.to_vec(),
            ..Mech::new(CKM_AES_GCM)
        };
        m.gcm = Some(Box::new(CK_GCM_PARAMS {
            pIv: m.bytes.as_mut_ptr(),
            ulIvLen: 12,
            ulIvBits: 96,
            pAAD: m.aad.as_mut_ptr(),
            ulAADLen: m.aad.len() as CK_ULONG,
            ulTagBits: 128,
        }));
        m
    }
    /// The raw mechanism; valid while `self` lives.
    pub fn raw(&mut self) -> CK_MECHANISM {
        match &mut self.gcm {
            Some(p) => CK_MECHANISM {
                mechanism: self.ty,
                pParameter: p.as_mut() as *mut CK_GCM_PARAMS as *mut c_void,
                ulParameterLen: std::mem::size_of::<CK_GCM_PARAMS>() as CK_ULONG,
            },
            None if self.bytes.is_empty() => CK_MECHANISM {
                mechanism: self.ty,
                pParameter: ptr::null_mut(),
                ulParameterLen: 0,
            },
            None => CK_MECHANISM {
                mechanism: self.ty,
                pParameter: self.bytes.as_mut_ptr() as *mut c_void,
                ulParameterLen: self.bytes.len() as CK_ULONG,
            },
        }
    }
}

fn rv(r: CK_RV) -> Rv<()> {
    if r == CKR_OK {
        Ok(())
    } else {
        Err(r)
    }
}

// ----------------------------------------------------------------------------------------
// Sessions.
// ----------------------------------------------------------------------------------------

/// A session on the test token of a module.
pub struct S {
    /// The module.
    pub m: &'static Module,
    /// The session handle.
    pub h: CK_SESSION_HANDLE,
}

impl Drop for S {
    fn drop(&mut self) {
        let _ = call!(self.m.f, C_CloseSession, self.h);
    }
}

/// Asserts that `r` failed with `want`.
#[track_caller]
pub fn expect_rv<T: std::fmt::Debug>(r: Rv<T>, want: CK_RV, what: &str) {
    match r {
        Ok(v) => panic!("{what}: expected {}, got CKR_OK ({v:?})", rv_name(want)),
        Err(got) => assert!(
            got == want,
            "{what}: expected {}, got {}",
            rv_name(want),
            rv_name(got)
        ),
    }
}

/// The value of `r`, or a panic naming `what` and the code.
#[track_caller]
pub fn ok<T>(r: Rv<T>, what: &str) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {}", rv_name(e)))
}

impl S {
    /// Opens a read-write session (not logged in).
    pub fn open(m: &'static Module) -> S {
        let mut h: CK_SESSION_HANDLE = 0;
        check(
            call!(
                m.f,
                C_OpenSession,
                m.slot(),
                CKF_SERIAL_SESSION | CKF_RW_SESSION,
                ptr::null_mut(),
                None,
                &mut h
            ),
            "C_OpenSession",
        );
        S { m, h }
    }

    /// Opens a read-only session (not logged in).
    pub fn open_ro(m: &'static Module) -> S {
        let mut h: CK_SESSION_HANDLE = 0;
        check(
            call!(
                m.f,
                C_OpenSession,
                m.slot(),
                CKF_SERIAL_SESSION,
                ptr::null_mut(),
                None,
                &mut h
            ),
            "C_OpenSession(read-only)",
        );
        S { m, h }
    }

    /// A read-write session with the user logged in (already logged in is fine).
    pub fn user(m: &'static Module) -> S {
        let s = S::open(m);
        match s.login() {
            Ok(()) | Err(CKR_USER_ALREADY_LOGGED_IN) => {}
            Err(e) => panic!("C_Login: {}", rv_name(e)),
        }
        s
    }

    /// `C_Login` as the user.
    pub fn login(&self) -> Rv<()> {
        let mut pin = USER_PIN.as_bytes().to_vec();
        rv(call!(
            self.m.f,
            C_Login,
            self.h,
            CKU_USER,
            pin.as_mut_ptr(),
            pin.len() as CK_ULONG
        ))
    }

    /// `C_Logout`.
    pub fn logout(&self) -> Rv<()> {
        rv(call!(self.m.f, C_Logout, self.h))
    }

    /// `C_GenerateKey`.
    pub fn generate_key(&self, mech: CK_MECHANISM_TYPE, mut t: Template) -> Rv<H> {
        let mut attrs = t.raw();
        let mut m = Mech::new(mech).raw();
        let mut h: H = 0;
        rv(call!(
            self.m.f,
            C_GenerateKey,
            self.h,
            &mut m,
            attrs.as_mut_ptr(),
            attrs.len() as CK_ULONG,
            &mut h
        ))?;
        Ok(h)
    }

    /// `C_CreateObject`.
    pub fn create(&self, mut t: Template) -> Rv<H> {
        let mut attrs = t.raw();
        let mut h: H = 0;
        rv(call!(
            self.m.f,
            C_CreateObject,
            self.h,
            attrs.as_mut_ptr(),
            attrs.len() as CK_ULONG,
            &mut h
        ))?;
        Ok(h)
    }

    /// `C_DestroyObject`.
    pub fn destroy(&self, o: H) -> Rv<()> {
        rv(call!(self.m.f, C_DestroyObject, self.h, o))
    }

    /// One attribute's value (two-call convention).
    pub fn get(&self, o: H, t: CK_ATTRIBUTE_TYPE) -> Rv<Vec<u8>> {
        let mut a = CK_ATTRIBUTE {
            type_: t,
            pValue: ptr::null_mut(),
            ulValueLen: 0,
        };
        rv(call!(self.m.f, C_GetAttributeValue, self.h, o, &mut a, 1))?;
        let mut buf = vec![0u8; a.ulValueLen as usize];
        a.pValue = buf.as_mut_ptr() as *mut c_void;
        rv(call!(self.m.f, C_GetAttributeValue, self.h, o, &mut a, 1))?;
        buf.truncate(a.ulValueLen as usize);
        Ok(buf)
    }

    /// A `CK_ULONG` attribute.
    pub fn get_ulong(&self, o: H, t: CK_ATTRIBUTE_TYPE) -> Rv<CK_ULONG> {
        let v = self.get(o, t)?;
        let b: [u8; 8] = v
            .as_slice()
            .try_into()
            .unwrap_or_else(|_| panic!("attribute 0x{t:x}: {} bytes, not a CK_ULONG", v.len()));
        Ok(CK_ULONG::from_ne_bytes(b))
    }

    /// A `CK_ULONG` attribute that must be readable.
    #[track_caller]
    pub fn ulong(&self, o: H, t: CK_ATTRIBUTE_TYPE) -> CK_ULONG {
        ok(
            self.get_ulong(o, t),
            &format!("C_GetAttributeValue(0x{t:x})"),
        )
    }

    /// `C_FindObjects*` with `t`.
    pub fn find(&self, mut t: Template) -> Rv<Vec<H>> {
        let mut attrs = t.raw();
        rv(call!(
            self.m.f,
            C_FindObjectsInit,
            self.h,
            attrs.as_mut_ptr(),
            attrs.len() as CK_ULONG
        ))?;
        let mut out = Vec::new();
        loop {
            let mut buf = [0 as H; 32];
            let mut n: CK_ULONG = 0;
            let r = call!(
                self.m.f,
                C_FindObjects,
                self.h,
                buf.as_mut_ptr(),
                buf.len() as CK_ULONG,
                &mut n
            );
            if r != CKR_OK {
                let _ = call!(self.m.f, C_FindObjectsFinal, self.h);
                return Err(r);
            }
            out.extend_from_slice(&buf[..n as usize]);
            if n == 0 {
                break;
            }
        }
        rv(call!(self.m.f, C_FindObjectsFinal, self.h))?;
        Ok(out)
    }

    /// Handles of the keys labelled `label` (secret keys).
    pub fn find_label(&self, label: &str) -> Rv<Vec<H>> {
        self.find(
            Template::default()
                .ulong(CKA_CLASS, CKO_SECRET_KEY)
                .bytes(CKA_LABEL, label.as_bytes()),
        )
    }

    /// Handles of version `v` of the key labelled `label`.
    pub fn find_version(&self, label: &str, v: CK_ULONG) -> Rv<Vec<H>> {
        self.find(
            Template::default()
                .bytes(CKA_LABEL, label.as_bytes())
                .ulong(CKA_CMKP11_VERSION, v),
        )
    }

    /// The single handle of version `v` of `label`.
    #[track_caller]
    pub fn version_handle(&self, label: &str, v: CK_ULONG) -> H {
        let found = ok(self.find_version(label, v), "find by label + version");
        assert_eq!(
            found.len(),
            1,
            "find `{label}` + CKA_CMKP11_VERSION={v}: {found:?}"
        );
        found[0]
    }

    /// `C_EncryptInit`.
    pub fn encrypt_init(&self, m: &mut Mech, key: H) -> Rv<()> {
        let mut raw = m.raw();
        rv(call!(self.m.f, C_EncryptInit, self.h, &mut raw, key))
    }

    /// `C_DecryptInit`.
    pub fn decrypt_init(&self, m: &mut Mech, key: H) -> Rv<()> {
        let mut raw = m.raw();
        rv(call!(self.m.f, C_DecryptInit, self.h, &mut raw, key))
    }

    /// `C_SignInit`.
    pub fn sign_init(&self, m: &mut Mech, key: H) -> Rv<()> {
        let mut raw = m.raw();
        rv(call!(self.m.f, C_SignInit, self.h, &mut raw, key))
    }

    /// Single-part `C_Encrypt` (two-call convention).
    pub fn encrypt(&self, m: &mut Mech, key: H, data: &[u8]) -> Rv<Vec<u8>> {
        self.encrypt_init(m, key)?;
        self.finish_encrypt(data)
    }

    /// Single-part `C_Encrypt` of the operation initialised already (two-call convention).
    pub fn finish_encrypt(&self, data: &[u8]) -> Rv<Vec<u8>> {
        let mut input = data.to_vec();
        let mut n: CK_ULONG = 0;
        rv(call!(
            self.m.f,
            C_Encrypt,
            self.h,
            input.as_mut_ptr(),
            input.len() as CK_ULONG,
            ptr::null_mut(),
            &mut n
        ))?;
        let mut out = vec![0u8; n as usize];
        rv(call!(
            self.m.f,
            C_Encrypt,
            self.h,
            input.as_mut_ptr(),
            input.len() as CK_ULONG,
            out.as_mut_ptr(),
            &mut n
        ))?;
        out.truncate(n as usize);
        Ok(out)
    }

    /// Single-part `C_Decrypt` (two-call convention).
    pub fn decrypt(&self, m: &mut Mech, key: H, data: &[u8]) -> Rv<Vec<u8>> {
        self.decrypt_init(m, key)?;
        self.finish_decrypt(data)
    }

    /// Single-part `C_Decrypt` of the operation initialised already (two-call convention).
    pub fn finish_decrypt(&self, data: &[u8]) -> Rv<Vec<u8>> {
        let mut input = data.to_vec();
        let mut n: CK_ULONG = 0;
        rv(call!(
            self.m.f,
            C_Decrypt,
            self.h,
            input.as_mut_ptr(),
            input.len() as CK_ULONG,
            ptr::null_mut(),
            &mut n
        ))?;
        let mut out = vec![0u8; n as usize];
        rv(call!(
            self.m.f,
            C_Decrypt,
            self.h,
            input.as_mut_ptr(),
            input.len() as CK_ULONG,
            out.as_mut_ptr(),
            &mut n
        ))?;
        out.truncate(n as usize);
        Ok(out)
    }

    /// Single-part `C_Sign` (two-call convention).
    pub fn sign(&self, m: &mut Mech, key: H, data: &[u8]) -> Rv<Vec<u8>> {
        self.sign_init(m, key)?;
        self.finish_sign(data)
    }

    /// Single-part `C_Sign` of the operation initialised already (two-call convention).
    pub fn finish_sign(&self, data: &[u8]) -> Rv<Vec<u8>> {
        let mut input = data.to_vec();
        let mut n: CK_ULONG = 0;
        rv(call!(
            self.m.f,
            C_Sign,
            self.h,
            input.as_mut_ptr(),
            input.len() as CK_ULONG,
            ptr::null_mut(),
            &mut n
        ))?;
        let mut out = vec![0u8; n as usize];
        rv(call!(
            self.m.f,
            C_Sign,
            self.h,
            input.as_mut_ptr(),
            input.len() as CK_ULONG,
            out.as_mut_ptr(),
            &mut n
        ))?;
        out.truncate(n as usize);
        Ok(out)
    }

    /// `C_WrapKey` (two-call convention).
    pub fn wrap(&self, m: &mut Mech, wrapping: H, key: H) -> Rv<Vec<u8>> {
        let mut raw = m.raw();
        let mut n: CK_ULONG = 0;
        rv(call!(
            self.m.f,
            C_WrapKey,
            self.h,
            &mut raw,
            wrapping,
            key,
            ptr::null_mut(),
            &mut n
        ))?;
        let mut out = vec![0u8; n as usize];
        rv(call!(
            self.m.f,
            C_WrapKey,
            self.h,
            &mut raw,
            wrapping,
            key,
            out.as_mut_ptr(),
            &mut n
        ))?;
        out.truncate(n as usize);
        Ok(out)
    }

    /// `C_UnwrapKey` of an AES DEK (session key, ENCRYPT + DECRYPT).
    pub fn unwrap_dek(&self, m: &mut Mech, unwrapping: H, blob: &[u8]) -> Rv<H> {
        let mut t = Template::default()
            .ulong(CKA_CLASS, CKO_SECRET_KEY)
            .ulong(CKA_KEY_TYPE, CKK_AES)
            .boolean(CKA_TOKEN, false)
            .boolean(CKA_ENCRYPT, true)
            .boolean(CKA_DECRYPT, true);
        let mut attrs = t.raw();
        let mut raw = m.raw();
        let mut blob = blob.to_vec();
        let mut h: H = 0;
        rv(call!(
            self.m.f,
            C_UnwrapKey,
            self.h,
            &mut raw,
            unwrapping,
            blob.as_mut_ptr(),
            blob.len() as CK_ULONG,
            attrs.as_mut_ptr(),
            attrs.len() as CK_ULONG,
            &mut h
        ))?;
        Ok(h)
    }

    /// `C_GenerateRandom`.
    pub fn random<const N: usize>(&self) -> [u8; N] {
        let mut b = [0u8; N];
        check(
            call!(
                self.m.f,
                C_GenerateRandom,
                self.h,
                b.as_mut_ptr(),
                N as CK_ULONG
            ),
            "C_GenerateRandom",
        );
        b
    }

    // --- the "cmkp11 admin" interface ---------------------------------------------------

    /// `CMKP11_Rotate`.
    pub fn rotate(&self, key: H) -> Rv<()> {
        rv(call!(self.m.admin(), CMKP11_Rotate, self.h, key))
    }
    /// `CMKP11_Enable`.
    pub fn enable(&self, key: H) -> Rv<()> {
        rv(call!(self.m.admin(), CMKP11_Enable, self.h, key))
    }
    /// `CMKP11_Disable`.
    pub fn disable(&self, key: H) -> Rv<()> {
        rv(call!(self.m.admin(), CMKP11_Disable, self.h, key))
    }
    /// `CMKP11_ScheduleDeletion`.
    pub fn schedule_deletion(&self, key: H, days: CK_ULONG) -> Rv<()> {
        rv(call!(
            self.m.admin(),
            CMKP11_ScheduleDeletion,
            self.h,
            key,
            days
        ))
    }
    /// `CMKP11_CancelDeletion`.
    pub fn cancel_deletion(&self, key: H) -> Rv<()> {
        rv(call!(self.m.admin(), CMKP11_CancelDeletion, self.h, key))
    }
    /// `CMKP11_Purge`.
    pub fn purge(&self) -> Rv<()> {
        rv(call!(self.m.admin(), CMKP11_Purge, self.h))
    }
}

// ----------------------------------------------------------------------------------------
// Keys.
// ----------------------------------------------------------------------------------------

/// Template of an AES-256 key (`token`: a CMK), sensitive.
pub fn aes(token: bool) -> Template {
    Template::default()
        .ulong(CKA_CLASS, CKO_SECRET_KEY)
        .ulong(CKA_KEY_TYPE, CKK_AES)
        .ulong(CKA_VALUE_LEN, 32)
        .boolean(CKA_TOKEN, token)
        .boolean(CKA_SENSITIVE, true)
}

/// Which uses a CMK is made for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// WRAP + UNWRAP.
    Wrap,
    /// ENCRYPT + DECRYPT.
    Data,
    /// SIGN + VERIFY.
    Mac,
}

/// The template of a CMK with `role`, `label` and (when given) `id`.
pub fn cmk_template(role: Role, label: &str, id: Option<&[u8]>) -> Template {
    let (a, b) = match role {
        Role::Wrap => (CKA_WRAP, CKA_UNWRAP),
        Role::Data => (CKA_ENCRYPT, CKA_DECRYPT),
        Role::Mac => (CKA_SIGN, CKA_VERIFY),
    };
    let t = aes(true)
        .boolean(a, true)
        .boolean(b, true)
        .bytes(CKA_LABEL, label.as_bytes());
    match id {
        Some(id) => t.bytes(CKA_ID, id),
        None => t,
    }
}

/// Generates a CMK (must succeed).
#[track_caller]
pub fn new_cmk(s: &S, role: Role, label: &str, id: Option<&[u8]>) -> H {
    ok(
        s.generate_key(CKM_AES_KEY_GEN, cmk_template(role, label, id)),
        &format!("C_GenerateKey({role:?} CMK `{label}`)"),
    )
}

/// A session AES-256 DEK that can be wrapped.
#[track_caller]
pub fn new_dek(s: &S) -> H {
    ok(
        s.generate_key(
            CKM_AES_KEY_GEN,
            aes(false)
                .boolean(CKA_ENCRYPT, true)
                .boolean(CKA_DECRYPT, true)
                .boolean(CKA_EXTRACTABLE, true),
        ),
        "C_GenerateKey(DEK)",
    )
}

/// An envelope: a DEK wrapped under a CMK, with data the DEK encrypted (AES-GCM).
#[derive(Debug, Clone)]
pub struct Envelope {
    /// The AES-KWP blob.
    pub blob: Vec<u8>,
    /// GCM IV.
    pub iv: [u8; 12],
    /// GCM ciphertext of [`PLAINTEXT`].
    pub ct: Vec<u8>,
    /// The CMK's primary version when the blob was made.
    pub version: CK_ULONG,
}

/// What envelopes encrypt.
pub const PLAINTEXT: &[u8] = b"customer data protected by a DEK under a CMK";

/// Makes an envelope under `cmk` (its primary version is `version`).
#[track_caller]
pub fn seal(s: &S, cmk: H, version: CK_ULONG) -> Envelope {
    let dek = new_dek(s);
    let iv = s.random::<12>();
    let ct = ok(
        s.encrypt(&mut Mech::gcm(&iv, b"aad"), dek, PLAINTEXT),
        "GCM encrypt with DEK",
    );
    let blob = ok(s.wrap(&mut Mech::kwp(), cmk, dek), "C_WrapKey(KWP)");
    let _ = s.destroy(dek);
    Envelope {
        blob,
        iv,
        ct,
        version,
    }
}

/// Unwraps `e` with `key` and decrypts its data with the DEK: `Ok` when the data comes
/// back, else the first code that failed (or `CKR_GENERAL_ERROR` for wrong plaintext).
pub fn open(s: &S, key: H, e: &Envelope) -> Rv<()> {
    let dek = s.unwrap_dek(&mut Mech::kwp(), key, &e.blob)?;
    let pt = s.decrypt(&mut Mech::gcm(&e.iv, b"aad"), dek, &e.ct);
    let _ = s.destroy(dek);
    match pt {
        Ok(p) if p == PLAINTEXT => Ok(()),
        Ok(_) => Err(CKR_GENERAL_ERROR),
        Err(e) => Err(e),
    }
}

// ----------------------------------------------------------------------------------------
// Children.
// ----------------------------------------------------------------------------------------

/// A command running this test binary as a child with `role` (see the module docs).
pub fn child_command(role: &str) -> Command {
    let exe = std::env::current_exe().expect("current_exe");
    let mut c = Command::new(exe);
    c.args([
        "child_entry",
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
        "-q",
    ])
    .env(CHILD_ENV, role)
    .stdin(Stdio::null());
    c
}

/// Runs a child to completion; returns its protocol lines (without [`LINE`]). Panics,
/// with its output, when it fails.
pub fn run_child(role: &str, env: &[(&str, String)]) -> Vec<String> {
    let mut c = child_command(role);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().expect("spawn child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child `{role}` failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    protocol_lines(&stdout)
}

/// The protocol lines of a child's output.
pub fn protocol_lines(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix(LINE).map(str::to_string))
        .collect()
}

/// Spawns a child with piped stdout.
pub fn spawn_child(role: &str, env: &[(&str, String)]) -> (Child, BufReader<ChildStdout>) {
    let mut c = child_command(role);
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c.stdout(Stdio::piped()).spawn().expect("spawn child");
    let out = BufReader::new(child.stdout.take().unwrap());
    (child, out)
}

/// Reads a child's stdout until a protocol line starting with `word`; returns its rest.
pub fn wait_line(out: &mut BufReader<ChildStdout>, word: &str) -> String {
    let mut line = String::new();
    loop {
        line.clear();
        let n = out.read_line(&mut line).expect("read child stdout");
        assert!(n > 0, "child ended before printing `{word}`");
        if let Some(rest) = line.trim_end().strip_prefix(LINE) {
            if let Some(rest) = rest.strip_prefix(word) {
                return rest.trim().to_string();
            }
        }
    }
}

/// Prints a protocol line (and flushes: the parent may be waiting for it).
pub fn say(text: &str) {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{LINE}{text}");
    let _ = o.flush();
}

/// An env value a child needs.
pub fn arg(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("child: {name} not set"))
}

// ----------------------------------------------------------------------------------------
// Direct SoftHSM2 access (children only).
// ----------------------------------------------------------------------------------------

/// `CKA_APPLICATION` of cmkp11's data objects.
pub const APPLICATION: &str = "cmkp11";
/// `CKA_LABEL` of cmkp11's state records.
pub const STATE_LABEL: &str = "cmkp11:state";

/// cmkp11's state records in the token, read with SoftHSM2 directly: (object, JSON).
pub fn direct_records(s: &S) -> Vec<(H, serde_json::Value)> {
    let objs = ok(
        s.find(
            Template::default()
                .ulong(CKA_CLASS, CKO_DATA)
                .boolean(CKA_TOKEN, true)
                .bytes(CKA_APPLICATION, APPLICATION.as_bytes())
                .bytes(CKA_LABEL, STATE_LABEL.as_bytes()),
        ),
        "find state records",
    );
    objs.into_iter()
        .filter_map(|o| {
            let v = ok(s.get(o, CKA_VALUE), "record CKA_VALUE");
            serde_json::from_slice(&v).ok().map(|j| (o, j))
        })
        .collect()
}

/// The records of the key with id `id_hex`.
pub fn direct_key_records(s: &S, id_hex: &str) -> Vec<(H, serde_json::Value)> {
    direct_records(s)
        .into_iter()
        .filter(|(_, j)| j["key"].as_str() == Some(id_hex))
        .collect()
}

/// Moves the deletion date of the key `id_hex` (pending deletion) into the past, the way
/// cmkp11 writes records: a new record of the next generation, then the old ones go.
pub fn direct_expire(s: &S, id_hex: &str, seconds_ago: u64) {
    let recs = direct_key_records(s, id_hex);
    let (_, newest) = recs
        .iter()
        .max_by_key(|(_, j)| j["generation"].as_u64().unwrap_or(0))
        .unwrap_or_else(|| panic!("no state record for key {id_hex}"));
    assert_eq!(
        newest["state"].as_str(),
        Some("pending-deletion"),
        "record of {id_hex}: {newest}"
    );
    let mut next = newest.clone();
    next["deletion_date"] = (unix_now() - seconds_ago).into();
    next["generation"] = (newest["generation"].as_u64().unwrap() + 1).into();
    let json = serde_json::to_vec(&next).unwrap();
    // Authenticated as cmkp11 does it, with the token's metadata key (whoever holds the
    // PIN can use it through the token directly: docs/security.md says what that means).
    let tag = direct_record_mac(s, &json);
    ok(
        s.create(
            Template::default()
                .ulong(CKA_CLASS, CKO_DATA)
                .boolean(CKA_TOKEN, true)
                .boolean(CKA_PRIVATE, true)
                .boolean(CKA_MODIFIABLE, false)
                .bytes(CKA_APPLICATION, APPLICATION.as_bytes())
                .bytes(CKA_LABEL, STATE_LABEL.as_bytes())
                .bytes(CKA_OBJECT_ID, &tag)
                .bytes(CKA_VALUE, &json),
        ),
        "create the expired record",
    );
    for (o, _) in recs {
        ok(s.destroy(o), "destroy the older record");
    }
}

/// `CKA_LABEL` of cmkp11's metadata MAC key.
pub const META_MAC_LABEL: &str = "cmkp11:meta-mac";

/// The HMAC of a state record's value under the token's metadata key, made through
/// SoftHSM2 directly.
pub fn direct_record_mac(s: &S, value: &[u8]) -> Vec<u8> {
    let key = ok(s.find_label(META_MAC_LABEL), "find the metadata MAC key");
    assert_eq!(key.len(), 1, "one metadata MAC key");
    ok(
        s.sign(&mut Mech::new(CKM_SHA256_HMAC), key[0], value),
        "HMAC of a record",
    )
}

/// Secret key objects labelled `label` in the token (SoftHSM2 directly): their `CKA_ID`s.
pub fn direct_keys_labelled(s: &S, label: &str) -> Vec<Vec<u8>> {
    let objs = ok(
        s.find(
            Template::default()
                .ulong(CKA_CLASS, CKO_SECRET_KEY)
                .bytes(CKA_LABEL, label.as_bytes()),
        ),
        "find keys by label",
    );
    objs.into_iter()
        .map(|o| ok(s.get(o, CKA_ID), "CKA_ID"))
        .collect()
}

/// The child roles every lifecycle binary understands, working on SoftHSM2 directly:
/// - `expire` (env `LC_ID` hex): move the key's deletion date 60 s into the past;
/// - `inspect` (env `LC_LABEL`, `LC_ID`): prints `keys N` (secret keys labelled so),
///   `records M` (state records of the id) and `generations g1,g2,..`.
///
/// Returns false for another role.
pub fn direct_child(role: &str) -> bool {
    match role {
        "expire" => {
            let s = S::user(softhsm());
            direct_expire(&s, &arg("LC_ID"), 60);
            say("expired");
        }
        "inspect" => {
            let s = S::user(softhsm());
            let keys = direct_keys_labelled(&s, &arg("LC_LABEL"));
            let recs = direct_key_records(&s, &arg("LC_ID"));
            say(&format!("keys {}", keys.len()));
            say(&format!("records {}", recs.len()));
            let gens: Vec<String> = recs
                .iter()
                .map(|(_, j)| format!("{}:{}", j["generation"], j["nonce"]))
                .collect();
            say(&format!("generations {}", gens.join(",")));
            let ids: Vec<String> = keys.iter().map(|i| hex(i)).collect();
            say(&format!("ids {}", ids.join(",")));
        }
        _ => return false,
    }
    true
}

/// Runs the `inspect` child: (keys labelled `label`, records of `id`).
pub fn inspect(label: &str, id: &[u8]) -> (usize, usize) {
    let lines = inspect_lines(label, id);
    let num = |w: &str| -> usize {
        lines
            .iter()
            .find_map(|l| l.strip_prefix(w))
            .unwrap_or_else(|| panic!("inspect: no `{w}` line in {lines:?}"))
            .trim()
            .parse()
            .unwrap()
    };
    (num("keys "), num("records "))
}

/// Runs the `inspect` child; returns its lines.
pub fn inspect_lines(label: &str, id: &[u8]) -> Vec<String> {
    run_child(
        "inspect",
        &[("LC_LABEL", label.to_string()), ("LC_ID", hex(id))],
    )
}

/// Runs the `expire` child for the key with id `id`.
pub fn expire(id: &[u8]) {
    let lines = run_child("expire", &[("LC_ID", hex(id))]);
    assert!(lines.iter().any(|l| l == "expired"), "expire: {lines:?}");
}
