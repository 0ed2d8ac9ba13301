//! Shared helpers for the integration tests.
//!
//! Every test file is its own process (its own test binary), so every file gets:
//! - its own SoftHSM2 token directory (a `tempfile` directory, a private `SOFTHSM2_CONF`,
//!   one token initialised with `softhsm2-util`),
//! - its own cmkp11 config file (mode 600) pointing at SoftHSM2, named by `CMKP11_CONFIG`,
//! - at most one `C_Initialize` of the module under test (`C_Initialize` is process-wide),
//!   shared by all tests of the file through [`pkcs11`].
//!
//! The module under test is `libcmkp11.so` next to the test binary's profile directory
//! (`target/<profile>/deps/<test>` -> `target/<profile>/libcmkp11.so`). Set
//! `CMKP11_TEST_MODULE=/usr/lib/softhsm/libsofthsm2.so` to run the same tests against
//! SoftHSM2 directly: the tests that then fail document where cmkp11 differs from the
//! bare token (manufacturer, fork handling, parameter checks...).
//!
//! `CMKP11_TEST_KEEP=1` keeps the token directory after the run (its path is printed).
//!
//! `CMKP11_TEST_BACKEND` picks the token behind cmkp11 (see [`Backend`]): `softhsm2`
//! (default) or `kryoptic` (a private sqlite token per test process, `KRYOPTIC_CONF`,
//! module from `KRYOPTIC_MODULE` or where `scripts/setup.sh` builds it). Tests that need
//! SoftHSM2 itself (its configuration file, its token store) call [`softhsm2_only`] and
//! skip with a printed reason under another backend.
#![allow(dead_code)]

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error, RvError};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use cryptoki_sys::*;
use std::ffi::c_void;
use std::ptr;

/// Label of the token every test file initialises.
pub const TOKEN_LABEL: &str = "cmkp11-test";
/// Test-only user PIN.
pub const USER_PIN: &str = "1234";
/// Test-only SO PIN.
pub const SO_PIN: &str = "12345678";
/// The backend module cmkp11 forwards to.
pub const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
/// Env var overriding the module under test.
pub const MODULE_OVERRIDE_ENV: &str = "CMKP11_TEST_MODULE";
/// Env var choosing the token behind cmkp11 ([`Backend`]).
pub const BACKEND_ENV: &str = "CMKP11_TEST_BACKEND";
/// Where `scripts/setup.sh` installs kryoptic's module (`KRYOPTIC_MODULE` overrides it).
pub const KRYOPTIC_MODULE: &str = "/usr/local/lib/kryoptic/libkryoptic_pkcs11.so";

/// The token implementation behind cmkp11 in this test run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// SoftHSM2 (the default).
    Softhsm2,
    /// kryoptic, the Rust soft token (a sqlite token store per test process).
    Kryoptic,
}

impl Backend {
    /// Its name, as `CMKP11_TEST_BACKEND` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Softhsm2 => "softhsm2",
            Backend::Kryoptic => "kryoptic",
        }
    }
}

/// The backend chosen by [`BACKEND_ENV`] (panics on an unknown name: a typo must not
/// silently test SoftHSM2).
pub fn backend() -> Backend {
    match std::env::var(BACKEND_ENV).unwrap_or_default().as_str() {
        "" | "softhsm2" | "softhsm" => Backend::Softhsm2,
        "kryoptic" => Backend::Kryoptic,
        other => panic!("{BACKEND_ENV}={other}: unknown backend (softhsm2 or kryoptic)"),
    }
}

/// The PKCS#11 module of the chosen backend: the `[backend] module` of every test config.
pub fn backend_module() -> PathBuf {
    match backend() {
        Backend::Softhsm2 => PathBuf::from(SOFTHSM_MODULE),
        Backend::Kryoptic => {
            let p = std::env::var_os("KRYOPTIC_MODULE")
                .filter(|p| !p.is_empty())
                .map_or_else(|| PathBuf::from(KRYOPTIC_MODULE), PathBuf::from);
            assert!(
                p.exists(),
                "kryoptic module {} not found (scripts/setup.sh --backend kryoptic builds it)",
                p.display()
            );
            p
        }
    }
}

/// Whether the token offers AES-KWP as cmkp11 uses it (`CKM_AES_KEY_WRAP_PAD`): kryoptic
/// 1.0 has RFC 5649 only as `CKM_AES_KEY_WRAP_KWP` (README "token differences").
pub fn token_has_kwp() -> bool {
    backend() != Backend::Kryoptic
}

/// True (after printing why) when the calling test needs SoftHSM2 itself and the tests
/// run over another backend: the test then returns early.
pub fn softhsm2_only(why: &str) -> bool {
    let b = backend();
    if b == Backend::Softhsm2 {
        return false;
    }
    eprintln!("skipped under {BACKEND_ENV}={}: {why}", b.name());
    true
}

/// DER encoding of the P-256 curve OID (prime256v1), the `CKA_EC_PARAMS` of a P-256 key.
pub const P256_PARAMS: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// Path of the PKCS#11 module under test.
pub fn module_path() -> PathBuf {
    if let Some(p) = std::env::var_os(MODULE_OVERRIDE_ENV) {
        if !p.is_empty() {
            return PathBuf::from(p);
        }
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test-binary>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary is not in target/<profile>/deps");
    let path = profile_dir.join("libcmkp11.so");
    assert!(
        path.exists(),
        "module under test not found at {} (run `cargo build` first)",
        path.display()
    );
    path
}

/// True when the module under test is cmkp11 itself (not the SoftHSM2 override).
pub fn testing_cmkp11() -> bool {
    module_path()
        .file_name()
        .map(|n| n.to_string_lossy().contains("cmkp11"))
        .unwrap_or(false)
}

/// The private token directory and config files of this test process.
pub struct TestEnv {
    /// Root of the temporary directory.
    pub dir: PathBuf,
    /// Private SoftHSM2 configuration file.
    pub softhsm_conf: PathBuf,
    /// cmkp11 configuration file (mode 600).
    pub cmkp11_conf: PathBuf,
}

static ENV: OnceLock<TestEnv> = OnceLock::new();
static CLEANUP_DIR: Mutex<Option<PathBuf>> = Mutex::new(None);

extern "C" fn remove_token_dir() {
    if let Ok(mut guard) = CLEANUP_DIR.lock() {
        if let Some(dir) = guard.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Creates (once per process) the private token directory, initialises the token and
/// writes both config files, then exports `SOFTHSM2_CONF` and `CMKP11_CONFIG`.
/// Must run before the module is initialised; [`pkcs11`] and [`raw`] call it.
pub fn test_env() -> &'static TestEnv {
    ENV.get_or_init(|| {
        let tmp = tempfile::Builder::new()
            .prefix("cmkp11-test-")
            .tempdir()
            .expect("tempdir");
        // Statics are never dropped: remove the directory at exit instead.
        let dir = tmp.keep();
        let keep = std::env::var_os("CMKP11_TEST_KEEP").is_some_and(|v| !v.is_empty());
        if keep {
            eprintln!("cmkp11 tests: keeping token dir {}", dir.display());
        } else {
            *CLEANUP_DIR.lock().unwrap() = Some(dir.clone());
            // SAFETY: registering a plain extern "C" fn without arguments.
            unsafe {
                libc::atexit(remove_token_dir);
            }
        }

        let tokens = dir.join("tokens");
        std::fs::create_dir(&tokens).expect("mkdir tokens");
        let softhsm_conf = dir.join("softhsm2.conf");
        std::fs::write(
            &softhsm_conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
                tokens.display()
            ),
        )
        .expect("write softhsm2.conf");

        let cmkp11_conf = dir.join("cmkp11.toml");
        std::fs::write(
            &cmkp11_conf,
            format!("[backend]\nmodule = \"{}\"\n", backend_module().display()),
        )
        .expect("write cmkp11.toml");
        std::fs::set_permissions(&cmkp11_conf, std::fs::Permissions::from_mode(0o600))
            .expect("chmod 600 cmkp11.toml");

        match backend() {
            Backend::Softhsm2 => init_softhsm2_token(&softhsm_conf),
            Backend::Kryoptic => init_kryoptic_token(&dir),
        }

        // Set before any C_Initialize: the module and SoftHSM2 read them there.
        std::env::set_var("SOFTHSM2_CONF", &softhsm_conf);
        std::env::set_var("CMKP11_CONFIG", &cmkp11_conf);
        if service_mode() {
            start_daemon(&dir, &softhsm_conf);
        }

        TestEnv {
            dir,
            softhsm_conf,
            cmkp11_conf,
        }
    })
}

/// `softhsm2-util --init-token` of [`TOKEN_LABEL`] in the store of `softhsm_conf`.
fn init_softhsm2_token(softhsm_conf: &Path) {
    let out = Command::new("softhsm2-util")
        .env("SOFTHSM2_CONF", softhsm_conf)
        .args([
            "--init-token",
            "--free",
            "--label",
            TOKEN_LABEL,
            "--so-pin",
            SO_PIN,
            "--pin",
            USER_PIN,
        ])
        .output()
        .expect("run softhsm2-util (is softhsm2 installed?)");
    assert!(
        out.status.success(),
        "softhsm2-util --init-token failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A kryoptic token in `dir`: `dir/kryoptic.conf` (one slot, a sqlite store in `dir`),
/// exported as `KRYOPTIC_CONF`, and [`TOKEN_LABEL`] initialised with the test PINs by
/// `pkcs11-tool` through kryoptic's module (in a child: this process must not load it).
fn init_kryoptic_token(dir: &Path) {
    let conf = dir.join("kryoptic.conf");
    std::fs::write(
        &conf,
        format!(
            "[ec_point_encoding]\nencoding = \"Der\"\n\n[[slots]]\nslot = 1\ndbtype = \"sqlite\"\ndbargs = \"{}\"\n",
            dir.join("token.sql").display()
        ),
    )
    .expect("write kryoptic.conf");
    std::env::set_var("KRYOPTIC_CONF", &conf);
    let module = backend_module();
    let tool = |args: &[&str]| {
        let out = Command::new("pkcs11-tool")
            .arg("--module")
            .arg(&module)
            .args(args)
            .output()
            .expect("run pkcs11-tool (is opensc installed?)");
        assert!(
            out.status.success(),
            "pkcs11-tool {args:?} over kryoptic failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    tool(&[
        "--slot",
        "1",
        "--init-token",
        "--label",
        TOKEN_LABEL,
        "--so-pin",
        SO_PIN,
    ]);
    tool(&[
        "--token-label",
        TOKEN_LABEL,
        "--login",
        "--login-type",
        "so",
        "--init-pin",
        "--so-pin",
        SO_PIN,
        "--new-pin",
        USER_PIN,
    ]);
}

/// Env var that runs the tests in service mode: a `cmkp11d` per test process owns the
/// token, and the module under test runs in client mode (`CMKP11_SERVICE`).
pub const SERVICE_ENV: &str = "CMKP11_TEST_SERVICE";

/// True when the tests run in service mode (see [`SERVICE_ENV`]).
pub fn service_mode() -> bool {
    std::env::var_os(SERVICE_ENV).is_some_and(|v| !v.is_empty() && v != "0") && testing_cmkp11()
}

static DAEMON: Mutex<Option<std::process::Child>> = Mutex::new(None);

extern "C" fn stop_daemon() {
    if let Ok(mut d) = DAEMON.lock() {
        if let Some(mut child) = d.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Path of the `cmkp11d` built with the module under test.
pub fn daemon_path() -> PathBuf {
    module_path().with_file_name("cmkp11d")
}

/// The Argon2 hash of `pin`, made by `cmkp11d hash-pin`.
pub fn hash_pin(pin: &str) -> String {
    use std::io::Write;
    let mut child = Command::new(daemon_path())
        .arg("hash-pin")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run cmkp11d hash-pin (run `cargo build` first)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(pin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "cmkp11d hash-pin failed");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Writes a daemon configuration in `dir` for the test token: the token PIN in a 0600
/// file, the application PIN [`USER_PIN`] for this uid, `extra` appended. Returns
/// (config path, socket path).
pub fn write_daemon_config(dir: &Path, extra: &str) -> (PathBuf, PathBuf) {
    write_daemon_config_as(dir, "cmkp11d", USER_PIN, extra)
}

/// As [`write_daemon_config`], with files named after `name` and the application PIN
/// `app_pin` (the token PIN stays [`USER_PIN`]).
pub fn write_daemon_config_as(
    dir: &Path,
    name: &str,
    app_pin: &str,
    extra: &str,
) -> (PathBuf, PathBuf) {
    write_daemon_config_full(dir, name, app_pin, "", extra)
}

/// As [`write_daemon_config_as`], with `service_extra` added to the `[service]` section.
pub fn write_daemon_config_full(
    dir: &Path,
    name: &str,
    app_pin: &str,
    service_extra: &str,
    extra: &str,
) -> (PathBuf, PathBuf) {
    // The suites that run in service mode play applications that make their own CMKs
    // (as in library mode): they may, unless the test says otherwise. Every other
    // lifecycle change stays an operator's (tests/service_operators.rs).
    let service_extra = if service_extra.contains("applications_create_keys") {
        service_extra.to_string()
    } else {
        format!("applications_create_keys = true\n{service_extra}")
    };
    let pin_file = dir.join(format!("{name}-token.pin"));
    std::fs::write(&pin_file, USER_PIN).unwrap();
    std::fs::set_permissions(&pin_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let socket = dir.join(format!("{name}.sock"));
    let conf = dir.join(format!("{name}.toml"));
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    std::fs::write(
        &conf,
        format!(
            "[backend]\nmodule = \"{}\"\n\n[service]\nsocket = \"{}\"\ntoken_pin_file = \"{}\"\n{service_extra}\n\n[[clients]]\nname = \"tests\"\nuids = [{uid}]\npin_hash = \"{}\"\n{extra}",
            backend_module().display(),
            socket.display(),
            pin_file.display(),
            hash_pin(app_pin)
        ),
    )
    .unwrap();
    std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o600)).unwrap();
    (conf, socket)
}

/// Starts `cmkp11d` with `conf` and waits until it accepts connections.
pub fn spawn_daemon(conf: &Path, socket: &Path, softhsm_conf: &Path) -> std::process::Child {
    let log = conf.with_extension("log");
    let mut child = Command::new(daemon_path())
        .arg("--config")
        .arg(conf)
        .env("SOFTHSM2_CONF", softhsm_conf)
        .env_remove("CMKP11_SERVICE")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start cmkp11d");
    for _ in 0..600 {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return child;
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!(
                "cmkp11d exited ({st}): {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = child.kill();
    panic!("cmkp11d did not listen on {} within 30 s", socket.display());
}

/// A daemon killed when dropped (also when a test panics).
pub struct DaemonGuard(pub std::process::Child);

impl Drop for DaemonGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Service mode: starts this test process's daemon over its token and points the module
/// at it.
fn start_daemon(dir: &Path, softhsm_conf: &Path) {
    let (conf, socket) = write_daemon_config(dir, "");
    let child = spawn_daemon(&conf, &socket, softhsm_conf);
    *DAEMON.lock().unwrap() = Some(child);
    // SAFETY: registering a plain extern "C" fn without arguments.
    unsafe {
        libc::atexit(stop_daemon);
    }
    std::env::set_var("CMKP11_SERVICE", format!("unix:{}", socket.display()));
}

static CONTEXT: OnceLock<Pkcs11> = OnceLock::new();

/// The process-wide, initialised `cryptoki` context for the module under test.
pub fn pkcs11() -> &'static Pkcs11 {
    CONTEXT.get_or_init(|| {
        test_env();
        let path = module_path();
        let ctx = Pkcs11::new(&path).unwrap_or_else(|e| panic!("loading {}: {e}", path.display()));
        ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .expect("C_Initialize");
        ctx
    })
}

/// The slot holding the test token (asserts there is exactly one).
pub fn slot() -> Slot {
    let ctx = pkcs11();
    let mut found = Vec::new();
    for slot in ctx.get_slots_with_token().expect("C_GetSlotList") {
        let info = ctx.get_token_info(slot).expect("C_GetTokenInfo");
        if info.label() == TOKEN_LABEL {
            found.push(slot);
        }
    }
    assert_eq!(found.len(), 1, "slots with token {TOKEN_LABEL}: {found:?}");
    found[0]
}

/// The user PIN as a cryptoki secret.
pub fn user_pin() -> AuthPin {
    AuthPin::new(USER_PIN.into())
}

/// Logs the user in through `session`; already being logged in (login state is shared by
/// all sessions of the application) is fine.
pub fn ensure_login(session: &Session) {
    match session.login(UserType::User, Some(&user_pin())) {
        Ok(()) => {}
        Err(Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
        Err(e) => panic!("C_Login: {e}"),
    }
}

/// A read-write session on the test token with the user logged in.
pub fn user_session() -> Session {
    let session = pkcs11().open_rw_session(slot()).expect("C_OpenSession");
    ensure_login(&session);
    session
}

/// The `CK_RV` of a cryptoki error, for exact assertions.
pub fn rv_of(err: &Error) -> RvError {
    match err {
        Error::Pkcs11(rv, _) => *rv,
        other => panic!("expected a PKCS#11 error code, got {other:?}"),
    }
}

/// Unwraps the error of a result that must fail, and returns its `CK_RV`.
pub fn expect_rv<T: std::fmt::Debug>(r: cryptoki::error::Result<T>) -> RvError {
    match r {
        Ok(v) => panic!("expected an error, got Ok({v:?})"),
        Err(e) => rv_of(&e),
    }
}

/// Raw access to the module's exported functions (same loaded library as [`pkcs11`]).
pub struct RawModule {
    /// The loaded library (kept alive for the function pointers).
    pub lib: cryptoki_sys::Pkcs11,
    /// The v2.40 function table from `C_GetFunctionList`.
    pub f: &'static cryptoki_sys::CK_FUNCTION_LIST,
}

// SAFETY: the function table is immutable static data of the loaded module, and PKCS#11
// functions may be called from any thread once the module is initialised with OS locking.
unsafe impl Sync for RawModule {}
unsafe impl Send for RawModule {}

static RAW: OnceLock<RawModule> = OnceLock::new();

/// Loads the module under test (once) for raw calls. Does not initialise it.
pub fn raw() -> &'static RawModule {
    RAW.get_or_init(|| {
        test_env();
        let path = module_path();
        // SAFETY: loading a PKCS#11 module; its initialisers are trusted test code.
        let lib = unsafe { cryptoki_sys::Pkcs11::new(OsString::from(path.as_os_str())) }
            .unwrap_or_else(|e| panic!("dlopen {}: {e}", path.display()));
        let mut list: *mut cryptoki_sys::CK_FUNCTION_LIST = std::ptr::null_mut();
        // SAFETY: valid out-pointer.
        let rv = unsafe { lib.C_GetFunctionList(&mut list) };
        assert_eq!(rv, cryptoki_sys::CKR_OK, "C_GetFunctionList");
        assert!(!list.is_null(), "C_GetFunctionList returned NULL table");
        // SAFETY: the table lives as long as the library, which lives in this static.
        let f = unsafe { &*list };
        RawModule { lib, f }
    })
}

/// Calls a function of a PKCS#11 function table: `ck!(table, C_GetInfo, &mut info)`.
///
/// Deliberately unsafe inside: these tests exist to pass raw (and deliberately bad)
/// pointers to the module, exactly as a C application would.
#[macro_export]
macro_rules! ck {
    ($table:expr, $func:ident $(, $arg:expr)* $(,)?) => {{
        let f = ($table)
            .$func
            .expect(concat!(stringify!($func), " is NULL in the function table"));
        #[allow(unused_unsafe, clippy::macro_metavars_in_unsafe)]
        // SAFETY: test code passes valid (or deliberately NULL) pointers per PKCS#11.
        unsafe {
            f($($arg),*)
        }
    }};
}

/// Name of a `CK_RV` for failure messages.
pub fn rv_name(rv: cryptoki_sys::CK_RV) -> String {
    format!("{:?} (0x{rv:x})", cryptoki::error::Rv::from(rv))
}

/// Asserts an exact `CK_RV` with readable names: `assert_rv!(got, want)` or
/// `assert_rv!(got, want, "context {}", x)`.
#[macro_export]
macro_rules! assert_rv {
    ($got:expr, $want:expr) => {
        $crate::assert_rv!($got, $want, "")
    };
    ($got:expr, $want:expr, $($msg:tt)+) => {{
        let got: cryptoki_sys::CK_RV = $got;
        let want: cryptoki_sys::CK_RV = $want;
        assert!(
            got == want,
            "expected {}, got {} {}",
            $crate::common::rv_name(want),
            $crate::common::rv_name(got),
            format!($($msg)+)
        );
    }};
}

// ---------------------------------------------------------------------------------------
// Raw-call helpers (on the table of [`raw`]); they assert success.
// ---------------------------------------------------------------------------------------

/// Attribute template whose values live as long as the template.
#[derive(Default)]
pub struct Template {
    bufs: Vec<(CK_ATTRIBUTE_TYPE, Vec<u8>)>,
}

impl Template {
    /// Adds a CK_BBOOL attribute.
    pub fn boolean(mut self, t: CK_ATTRIBUTE_TYPE, v: bool) -> Self {
        self.bufs
            .push((t, vec![if v { CK_TRUE } else { CK_FALSE }]));
        self
    }
    /// Adds a CK_ULONG attribute.
    pub fn ulong(mut self, t: CK_ATTRIBUTE_TYPE, v: CK_ULONG) -> Self {
        self.bufs.push((t, v.to_ne_bytes().to_vec()));
        self
    }
    /// Adds a byte-string attribute.
    pub fn bytes(mut self, t: CK_ATTRIBUTE_TYPE, v: &[u8]) -> Self {
        self.bufs.push((t, v.to_vec()));
        self
    }
    /// The raw template; valid while `self` is alive and unchanged.
    pub fn raw(&mut self) -> Vec<CK_ATTRIBUTE> {
        self.bufs
            .iter_mut()
            .map(|(t, v)| CK_ATTRIBUTE {
                type_: *t,
                pValue: v.as_mut_ptr() as *mut c_void,
                ulValueLen: v.len() as CK_ULONG,
            })
            .collect()
    }
}

pub fn mech(m: CK_MECHANISM_TYPE) -> CK_MECHANISM {
    CK_MECHANISM {
        mechanism: m,
        pParameter: ptr::null_mut(),
        ulParameterLen: 0,
    }
}

/// `CK_GCM_PARAMS` with a 96-bit IV at `iv`, no AAD and a tag of `tag_bits`.
pub fn gcm_params(iv: &mut [u8; 12], tag_bits: CK_ULONG) -> CK_GCM_PARAMS {
    CK_GCM_PARAMS {
        pIv: iv.as_mut_ptr(),
        ulIvLen: 12,
        ulIvBits: 96,
        pAAD: ptr::null_mut(),
        ulAADLen: 0,
        ulTagBits: tag_bits,
    }
}

pub fn mech_with<T>(m: CK_MECHANISM_TYPE, p: &mut T, len: usize) -> CK_MECHANISM {
    CK_MECHANISM {
        mechanism: m,
        pParameter: p as *mut T as *mut c_void,
        ulParameterLen: len as CK_ULONG,
    }
}

/// Trims a blank-padded PKCS#11 text field.
pub fn padded(field: &[u8]) -> String {
    String::from_utf8_lossy(field)
        .trim_end_matches(' ')
        .to_string()
}

/// The slot id of the test token.
pub fn raw_token_slot() -> CK_SLOT_ID {
    let mut n: CK_ULONG = 0;
    assert_rv!(
        ck!(raw().f, C_GetSlotList, CK_TRUE, ptr::null_mut(), &mut n),
        CKR_OK
    );
    let mut ids = vec![0 as CK_SLOT_ID; n as usize];
    assert_rv!(
        ck!(raw().f, C_GetSlotList, CK_TRUE, ids.as_mut_ptr(), &mut n),
        CKR_OK
    );
    ids.truncate(n as usize);
    let found: Vec<CK_SLOT_ID> = ids
        .into_iter()
        .filter(|&id| {
            let mut info: CK_TOKEN_INFO = unsafe { std::mem::zeroed() };
            assert_rv!(ck!(raw().f, C_GetTokenInfo, id, &mut info), CKR_OK);
            padded(&info.label) == TOKEN_LABEL
        })
        .collect();
    assert_eq!(found.len(), 1, "slots with token {TOKEN_LABEL}");
    found[0]
}

pub fn raw_open_session(slot: CK_SLOT_ID) -> CK_SESSION_HANDLE {
    let mut h: CK_SESSION_HANDLE = 0;
    assert_rv!(
        ck!(
            raw().f,
            C_OpenSession,
            slot,
            CKF_SERIAL_SESSION | CKF_RW_SESSION,
            ptr::null_mut(),
            None,
            &mut h
        ),
        CKR_OK,
        "C_OpenSession"
    );
    assert_ne!(h, 0, "session handle 0");
    h
}

pub fn raw_login(s: CK_SESSION_HANDLE) {
    let mut pin = USER_PIN.as_bytes().to_vec();
    assert_rv!(
        ck!(
            raw().f,
            C_Login,
            s,
            CKU_USER,
            pin.as_mut_ptr(),
            pin.len() as CK_ULONG
        ),
        CKR_OK,
        "C_Login"
    );
}

/// A session AES-256 key with ENCRYPT/DECRYPT, sensitive and non-extractable.
pub fn raw_aes_key(s: CK_SESSION_HANDLE, label: &str) -> CK_OBJECT_HANDLE {
    let mut t = Template::default()
        .ulong(CKA_CLASS, CKO_SECRET_KEY)
        .ulong(CKA_KEY_TYPE, CKK_AES)
        .ulong(CKA_VALUE_LEN, 32)
        .boolean(CKA_TOKEN, false)
        .boolean(CKA_SENSITIVE, true)
        .boolean(CKA_EXTRACTABLE, false)
        .boolean(CKA_ENCRYPT, true)
        .boolean(CKA_DECRYPT, true)
        .bytes(CKA_LABEL, label.as_bytes());
    let mut attrs = t.raw();
    let mut m = mech(CKM_AES_KEY_GEN);
    let mut h: CK_OBJECT_HANDLE = 0;
    assert_rv!(
        ck!(
            raw().f,
            C_GenerateKey,
            s,
            &mut m,
            attrs.as_mut_ptr(),
            attrs.len() as CK_ULONG,
            &mut h
        ),
        CKR_OK,
        "C_GenerateKey"
    );
    assert_ne!(h, 0, "object handle 0");
    h
}
