//! Operators are not applications (service mode): through the built `.so` in client mode,
//! a real `cmkp11d` and this test process's SoftHSM2 token.
//!
//! - An application cannot change a CMK's lifecycle through the application socket: the
//!   vendor admin interface, `C_DestroyObject` of a CMK, `C_GenerateKey`/`C_GenerateKeyPair`
//!   of a token key, a `C_CopyObject` promotion and `C_SetAttributeValue` of the lifecycle
//!   attributes are refused with `CKR_USER_NOT_LOGGED_IN` and audited; the same uid on
//!   the admin socket, as an operator, can.
//! - An auditor reads (`key list/show`, `audit verify/tail`) and changes nothing; a uid the
//!   daemon does not know is no operator.
//! - Dual control (`approvals = 2`): a deletion request does nothing until a second
//!   operator approves; self-approval is refused; an expired request never runs; every step
//!   is an audit record; requests survive a daemon restart; a tampered request file is
//!   refused.
//!
//! Operators are told apart by the kernel's uid only: the second operator's command runs
//! under another uid (`setpriv --reuid`), which needs root. Without root these tests fail
//! with that explanation, unless `CMKP11_TEST_NO_ROOT=1` says to skip them (printed).

mod common;

use common::*;
use cryptoki_sys::*;
use serial_test::serial;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::ptr;
use std::sync::OnceLock;

/// The second admin's uid (run with `setpriv`).
const BOB: u32 = 64_201;
/// The auditor's uid.
const CAROL: u32 = 64_202;
/// A uid the daemon does not know.
const DAVE: u32 = 64_203;
/// A group whose members are auditors (`[[operators]] groups`).
const READERS: u32 = 64_310;

/// Whether this process may run commands as other uids; otherwise fails (or, with
/// `CMKP11_TEST_NO_ROOT=1`, says it skips).
fn can_switch_uid() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 && Path::new("/usr/bin/setpriv").exists() {
        return true;
    }
    if std::env::var_os("CMKP11_TEST_NO_ROOT").is_some_and(|v| v == "1") {
        eprintln!("SKIPPED: two operators need two uids: run as root with setpriv");
        return false;
    }
    panic!(
        "these tests tell operators apart by uid and run the second one with `setpriv \
         --reuid`: run them as root (or set CMKP11_TEST_NO_ROOT=1 to skip them)"
    );
}

fn me() -> u32 {
    // SAFETY: getuid has no preconditions.
    unsafe { libc::getuid() }
}

/// A daemon with an admin socket: its files and paths.
struct Daemon {
    conf: PathBuf,
    socket: PathBuf,
    admin: PathBuf,
    audit: PathBuf,
    state: PathBuf,
    log: PathBuf,
}

/// A directory other uids can reach (the test's own temporary directory is 0700).
fn public_dir(name: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::Builder::new()
        .prefix(&format!("cmkp11-ops-{name}-"))
        .tempdir()
        .unwrap()
        .keep();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

/// Writes a daemon configuration `name`: operators alice (this uid, admin), bob (admin),
/// carol (auditor); dual control of deletion, disabling, import and purge with two
/// operators and `expiry`.
fn daemon_config(name: &str, expiry: &str) -> Daemon {
    daemon_config_with(name, expiry, "")
}

/// [`daemon_config`] with `alice` (lines added to alice's `[[operators]]` entry).
fn daemon_config_with(name: &str, expiry: &str, alice: &str) -> Daemon {
    let env = test_env();
    let pub_dir = public_dir(name);
    let admin = pub_dir.join("admin.sock");
    let audit = env.dir.join(format!("{name}-audit.log"));
    let state = env.dir.join(format!("{name}-state"));
    let service_extra = format!(
        "admin_socket = \"{}\"\nstate_dir = \"{}\"\napplications_create_keys = false\n",
        admin.display(),
        state.display()
    );
    let extra = format!(
        "\n[audit]\nfile = \"{}\"\n\n\
         [[operators]]\nname = \"alice\"\nrole = \"admin\"\nuids = [{}]\n{alice}\n\n\
         [[operators]]\nname = \"bob\"\nrole = \"admin\"\nuids = [{BOB}]\n\n\
         [[operators]]\nname = \"carol\"\nrole = \"auditor\"\nuids = [{CAROL}]\n\n\
         [[operators]]\nname = \"readers\"\nrole = \"auditor\"\ngroups = [{READERS}]\n\n\
         [dual_control]\nactions = [\"schedule-deletion\", \"disable\", \"import\", \"purge\"]\n\
         approvals = 2\nexpiry = \"{expiry}\"\n",
        audit.display(),
        me()
    );
    let (conf, socket) = write_daemon_config_full(&env.dir, name, USER_PIN, &service_extra, &extra);
    Daemon {
        log: conf.with_extension("log"),
        conf,
        socket,
        admin,
        audit,
        state,
    }
}

impl Daemon {
    fn start(&self) -> DaemonGuard {
        let guard = DaemonGuard(spawn_daemon(
            &self.conf,
            &self.socket,
            &test_env().softhsm_conf,
        ));
        // The admin socket is bound before the applications' one: it is there.
        assert!(
            std::os::unix::net::UnixStream::connect(&self.admin).is_ok(),
            "no admin socket at {}",
            self.admin.display()
        );
        guard
    }

    /// `cmkp11 --admin-socket ... ARGS` as `uid` (`None`: this process's uid).
    fn cli(&self, uid: Option<u32>, args: &[&str]) -> Output {
        self.cli_in(uid, &[], args)
    }

    /// [`Daemon::cli`] with these supplementary groups (none: cleared).
    fn cli_in(&self, uid: Option<u32>, groups: &[u32], args: &[&str]) -> Output {
        let bin = module_path().with_file_name("cmkp11");
        let mut c = match uid {
            None => Command::new(&bin),
            Some(u) => {
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={u}")).arg(format!("--regid={u}"));
                if groups.is_empty() {
                    c.arg("--clear-groups");
                } else {
                    let g: Vec<String> = groups.iter().map(u32::to_string).collect();
                    c.arg(format!("--groups={}", g.join(",")));
                }
                c.arg(&bin);
                c
            }
        };
        c.arg("--admin-socket")
            .arg(&self.admin)
            .args(args)
            .env_remove("CMKP11_ADMIN_SOCKET")
            .env_remove("CMKP11_TOTP")
            .env_remove("CMKP11_SERVICE")
            .current_dir("/")
            .output()
            .expect("run cmkp11")
    }

    /// Runs the CLI and asserts success; returns stdout.
    fn ok(&self, uid: Option<u32>, args: &[&str]) -> String {
        let o = self.cli(uid, args);
        assert!(
            o.status.success(),
            "cmkp11 {args:?} as {uid:?} failed: {}{}\ndaemon log:\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr),
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Runs the CLI and asserts it is refused; returns stderr.
    fn refused(&self, uid: Option<u32>, args: &[&str]) -> String {
        let o = self.cli(uid, args);
        assert!(
            !o.status.success(),
            "cmkp11 {args:?} as {uid:?} should be refused: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        String::from_utf8_lossy(&o.stderr).into_owned()
    }

    /// A request's id from `cmkp11 --json` output of a controlled action.
    fn request(&self, uid: Option<u32>, args: &[&str]) -> String {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let out = self.ok(uid, &a);
        let v: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        assert_eq!(v["status"], "pending", "{out}");
        v["id"].as_str().expect("request id").to_string()
    }

    /// The key's state, as an auditor reads it.
    fn state_of(&self, key: &str) -> String {
        let out = self.ok(None, &["--json", "key", "show", key]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["state"].as_str().unwrap().to_string()
    }

    /// The audit records.
    fn records(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.audit)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The records with `op`.
    fn ops(&self, op: &str) -> Vec<serde_json::Value> {
        self.records()
            .into_iter()
            .filter(|r| r["op"] == op)
            .collect()
    }
}

/// The long-lived daemon of this file, and the module in client mode pointed at it.
struct Main {
    d: Daemon,
    _guard: std::sync::Mutex<DaemonGuard>,
}

static MAIN: OnceLock<Main> = OnceLock::new();

fn main_daemon() -> &'static Main {
    MAIN.get_or_init(|| {
        let d = daemon_config("main", "1h");
        let g = d.start();
        std::env::set_var("CMKP11_SERVICE", format!("unix:{}", d.socket.display()));
        let mut args = CK_C_INITIALIZE_ARGS {
            CreateMutex: None,
            DestroyMutex: None,
            LockMutex: None,
            UnlockMutex: None,
            flags: CKF_OS_LOCKING_OK,
            pReserved: ptr::null_mut(),
        };
        assert_rv!(
            ck!(
                raw().f,
                C_Initialize,
                &mut args as *mut CK_C_INITIALIZE_ARGS as *mut std::ffi::c_void
            ),
            CKR_OK,
            "C_Initialize in client mode"
        );
        Main {
            d,
            _guard: std::sync::Mutex::new(g),
        }
    })
}

/// The "cmkp11 admin" table of the module in client mode.
fn admin_table() -> &'static cmkp11::vendor::CK_CMKP11_ADMIN_FUNCTION_LIST {
    let name = CString::new(cmkp11::vendor::CMKP11_ADMIN_INTERFACE_NAME).unwrap();
    let mut iface: *mut CK_INTERFACE = ptr::null_mut();
    // SAFETY: NUL-terminated name, NULL version, valid out-pointer.
    let rv = unsafe {
        raw().lib.C_GetInterface(
            name.as_ptr() as *mut CK_UTF8CHAR,
            ptr::null_mut(),
            &mut iface,
            0,
        )
    };
    assert_rv!(
        rv,
        CKR_OK,
        "C_GetInterface(\"cmkp11 admin\") in client mode"
    );
    // SAFETY: the module's static interface; its table has the layout of cmkp11.h.
    unsafe { &*((*iface).pFunctionList as *const cmkp11::vendor::CK_CMKP11_ADMIN_FUNCTION_LIST) }
}

/// The handle of the CMK `label` for the application.
fn find(s: CK_SESSION_HANDLE, label: &str) -> CK_OBJECT_HANDLE {
    let mut t = Template::default().bytes(CKA_LABEL, label.as_bytes());
    let mut a = t.raw();
    assert_rv!(
        ck!(
            raw().f,
            C_FindObjectsInit,
            s,
            a.as_mut_ptr(),
            a.len() as CK_ULONG
        ),
        CKR_OK
    );
    let mut h = [0 as CK_OBJECT_HANDLE; 2];
    let mut n: CK_ULONG = 0;
    assert_rv!(
        ck!(raw().f, C_FindObjects, s, h.as_mut_ptr(), 2, &mut n),
        CKR_OK
    );
    assert_rv!(ck!(raw().f, C_FindObjectsFinal, s), CKR_OK);
    assert_eq!(n, 1, "one object labelled {label}");
    h[0]
}

/// AES-GCM encryption of a few bytes under `key`: its code.
fn encrypt(s: CK_SESSION_HANDLE, key: CK_OBJECT_HANDLE) -> CK_RV {
    let mut iv = [3u8; 12];
    let mut p = gcm_params(&mut iv, 128);
    let mut m = mech_with(CKM_AES_GCM, &mut p, std::mem::size_of::<CK_GCM_PARAMS>());
    let rv = ck!(raw().f, C_EncryptInit, s, &mut m, key);
    if rv != CKR_OK {
        return rv;
    }
    let mut data = *b"sixteen bytes!!!";
    let mut out = [0u8; 64];
    let mut n = out.len() as CK_ULONG;
    ck!(
        raw().f,
        C_Encrypt,
        s,
        data.as_mut_ptr(),
        data.len() as CK_ULONG,
        out.as_mut_ptr(),
        &mut n
    )
}

#[test]
#[serial]
fn applications_cannot_change_a_cmk_lifecycle_operators_can() {
    if !can_switch_uid() {
        return;
    }
    let m = main_daemon();
    let d = &m.d;
    // The operator (this uid, on the admin socket) creates a data CMK.
    let out = d.ok(None, &["key", "create", "ops-app-key", "--role", "data"]);
    assert!(out.contains("created key `ops-app-key`"), "{out}");

    // The application (the same uid, on the application socket).
    let slot = raw_token_slot();
    let s = raw_open_session(slot);
    raw_login(s);
    let k = find(s, "ops-app-key");
    assert_rv!(encrypt(s, k), CKR_OK, "the application uses the key");

    // Every lifecycle step of the admin interface: refused, whatever the key's state.
    let a = admin_table();
    // SAFETY: the module's admin functions, called with handles as a C application would.
    let calls: [(&str, CK_RV); 6] = unsafe {
        [
            ("CMKP11_Rotate", (a.CMKP11_Rotate.unwrap())(s, k)),
            ("CMKP11_Disable", (a.CMKP11_Disable.unwrap())(s, k)),
            ("CMKP11_Enable", (a.CMKP11_Enable.unwrap())(s, k)),
            (
                "CMKP11_ScheduleDeletion",
                (a.CMKP11_ScheduleDeletion.unwrap())(s, k, 7),
            ),
            (
                "CMKP11_CancelDeletion",
                (a.CMKP11_CancelDeletion.unwrap())(s, k),
            ),
            ("CMKP11_Purge", (a.CMKP11_Purge.unwrap())(s)),
        ]
    };
    for (name, rv) in calls {
        assert_rv!(rv, CKR_USER_NOT_LOGGED_IN, "{name} from an application");
    }
    // PKCS#11 calls that would change or create a CMK.
    assert_rv!(
        ck!(raw().f, C_DestroyObject, s, k),
        CKR_USER_NOT_LOGGED_IN,
        "C_DestroyObject of a CMK"
    );
    let mut state = Template::default().ulong(cmkp11::vendor::CKA_CMKP11_STATE, 2);
    let mut st = state.raw();
    assert_rv!(
        ck!(
            raw().f,
            C_SetAttributeValue,
            s,
            k,
            st.as_mut_ptr(),
            st.len() as CK_ULONG
        ),
        CKR_USER_NOT_LOGGED_IN,
        "C_SetAttributeValue(CKA_CMKP11_STATE)"
    );
    let mut t = Template::default()
        .ulong(CKA_CLASS, CKO_SECRET_KEY)
        .ulong(CKA_KEY_TYPE, CKK_AES)
        .ulong(CKA_VALUE_LEN, 32)
        .boolean(CKA_TOKEN, true)
        .boolean(CKA_ENCRYPT, true)
        .boolean(CKA_DECRYPT, true)
        .bytes(CKA_LABEL, b"ops-app-made");
    let mut ta = t.raw();
    let mut mg = mech(CKM_AES_KEY_GEN);
    let mut h: CK_OBJECT_HANDLE = 0;
    assert_rv!(
        ck!(
            raw().f,
            C_GenerateKey,
            s,
            &mut mg,
            ta.as_mut_ptr(),
            ta.len() as CK_ULONG,
            &mut h
        ),
        CKR_USER_NOT_LOGGED_IN,
        "C_GenerateKey of a token CMK"
    );
    let mut pubt = Template::default()
        .boolean(CKA_TOKEN, true)
        .bytes(CKA_EC_PARAMS, &P256_PARAMS)
        .bytes(CKA_LABEL, b"ops-app-pair");
    let mut privt = Template::default()
        .boolean(CKA_TOKEN, true)
        .boolean(CKA_SIGN, true)
        .bytes(CKA_LABEL, b"ops-app-pair");
    let (mut pa, mut pr) = (pubt.raw(), privt.raw());
    let mut mp = mech(CKM_EC_KEY_PAIR_GEN);
    let (mut h1, mut h2): (CK_OBJECT_HANDLE, CK_OBJECT_HANDLE) = (0, 0);
    assert_rv!(
        ck!(
            raw().f,
            C_GenerateKeyPair,
            s,
            &mut mp,
            pa.as_mut_ptr(),
            pa.len() as CK_ULONG,
            pr.as_mut_ptr(),
            pr.len() as CK_ULONG,
            &mut h1,
            &mut h2
        ),
        CKR_USER_NOT_LOGGED_IN,
        "C_GenerateKeyPair of a token private key"
    );
    let session_key = raw_aes_key(s, "ops-app-session");
    let mut promote = Template::default()
        .boolean(CKA_TOKEN, true)
        .bytes(CKA_LABEL, b"ops-app-promoted");
    let mut pt = promote.raw();
    assert_rv!(
        ck!(
            raw().f,
            C_CopyObject,
            s,
            session_key,
            pt.as_mut_ptr(),
            pt.len() as CK_ULONG,
            &mut h
        ),
        CKR_USER_NOT_LOGGED_IN,
        "C_CopyObject promoting a session key into a CMK"
    );

    // Nothing changed: the key is enabled (as the application reads it too), usable, one
    // version.
    assert_rv!(encrypt(s, k), CKR_OK, "still usable");
    let mut v: CK_ULONG = 0;
    let mut q = [CK_ATTRIBUTE {
        type_: cmkp11::vendor::CKA_CMKP11_STATE,
        pValue: &mut v as *mut CK_ULONG as *mut std::ffi::c_void,
        ulValueLen: std::mem::size_of::<CK_ULONG>() as CK_ULONG,
    }];
    assert_rv!(
        ck!(raw().f, C_GetAttributeValue, s, k, q.as_mut_ptr(), 1),
        CKR_OK,
        "CKA_CMKP11_STATE through the daemon"
    );
    assert_eq!(v, cmkp11::vendor::CMKP11_STATE_ENABLED);
    let show: serde_json::Value =
        serde_json::from_str(&d.ok(Some(CAROL), &["--json", "key", "show", "ops-app-key"]))
            .unwrap();
    assert_eq!(show["state"], "enabled");
    assert_eq!(show["versions"], serde_json::json!([1]));
    let list = d.ok(Some(CAROL), &["key", "list"]);
    assert!(
        !list.contains("ops-app-made") && !list.contains("ops-app-promoted"),
        "{list}"
    );

    // Each refusal is an audit record naming the step, the code, the application's uid.
    let refused: Vec<_> = d
        .records()
        .into_iter()
        .filter(|r| r["result"] == "CKR_USER_NOT_LOGGED_IN")
        .collect();
    for op in [
        "rotate",
        "disable",
        "enable",
        "schedule-deletion",
        "cancel-deletion",
        "purge",
        "set-lifecycle-attribute",
        "generate",
        "promote",
    ] {
        let r = refused
            .iter()
            .find(|r| r["op"] == op)
            .unwrap_or_else(|| panic!("no refusal record for {op}: {refused:?}"));
        assert_eq!(r["uid"], me(), "{r}");
        assert!(
            r["reason"].as_str().unwrap().contains("operator action"),
            "{r}"
        );
    }
    let log = std::fs::read_to_string(&d.log).unwrap();
    assert!(
        log.contains("refused to application pid"),
        "a warn line names the refusal:\n{log}"
    );

    // The same uid as an operator on the admin socket: rotation (not under dual control).
    let out = d.ok(None, &["key", "rotate", "ops-app-key"]);
    assert!(out.contains("version 2 is primary"), "{out}");
    assert_rv!(
        encrypt(s, k),
        CKR_OK,
        "the application uses the new version"
    );
    let rotated = d.ops("rotate");
    assert!(
        rotated
            .iter()
            .any(|r| r["result"] == "CKR_OK" && r["uid"] == me()),
        "{rotated:?}"
    );
    assert_rv!(ck!(raw().f, C_CloseSession, s), CKR_OK);
}

#[test]
#[serial]
fn an_auditor_reads_and_changes_nothing_a_stranger_is_no_operator() {
    if !can_switch_uid() {
        return;
    }
    let d = &main_daemon().d;
    d.ok(None, &["key", "create", "ops-audited", "--role", "wrap"]);
    // Reads, with the list's filters too.
    assert!(d.ok(Some(CAROL), &["key", "list"]).contains("ops-audited"));
    let only = d.ok(
        Some(CAROL),
        &[
            "key", "list", "--state", "enabled", "--role", "wrap", "--label", "ops-aud*",
        ],
    );
    assert!(
        only.contains("ops-audited") && only.contains("PRIMARY/VERSIONS"),
        "{only}"
    );
    let none = d.ok(
        Some(CAROL),
        &["key", "list", "--state", "disabled", "--label", "ops-aud*"],
    );
    assert!(none.contains("no keys match"), "{none}");
    assert!(d
        .ok(Some(CAROL), &["key", "show", "ops-audited"])
        .contains("enabled"));
    let verify = d.cli(Some(CAROL), &["audit", "verify"]);
    assert_eq!(
        verify.status.code(),
        Some(0),
        "audit verify by the auditor: {}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(String::from_utf8_lossy(&verify.stdout).contains("OK"));
    assert!(
        d.ok(Some(CAROL), &["audit", "tail", "-n", "3"])
            .lines()
            .count()
            >= 1
    );
    // No change, of any kind.
    for args in [
        vec!["key", "rotate", "ops-audited"],
        vec!["key", "enable", "ops-audited"],
        vec!["key", "disable", "ops-audited"],
        vec!["key", "schedule-deletion", "ops-audited"],
        vec!["key", "create", "ops-auditor-made"],
        vec!["key", "purge"],
        vec!["request", "list"],
    ] {
        let e = d.refused(Some(CAROL), &args);
        assert!(e.contains("role auditor"), "{args:?}: {e}");
    }
    assert_eq!(d.state_of("ops-audited"), "enabled");
    let records = d.ops("admin-rotate");
    assert!(
        records
            .iter()
            .any(|r| r["uid"] == CAROL && r["result"] == "CKR_USER_NOT_LOGGED_IN"),
        "the auditor's attempt is recorded: {records:?}"
    );
    // An operator by group: the kernel reports the peer's supplementary groups.
    let o = d.cli_in(Some(DAVE), &[READERS], &["key", "list"]);
    assert!(
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains("ops-audited"),
        "a member of the readers group reads: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = d.cli_in(Some(DAVE), &[READERS], &["key", "disable", "ops-audited"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("role auditor"));
    // The same uid without the group: no [[operators]] entry names it.
    let e = d.refused(Some(DAVE), &["key", "list"]);
    assert!(e.contains("not an operator"), "{e}");
    let e = d.refused(Some(DAVE), &["key", "rotate", "ops-audited"]);
    assert!(e.contains("not an operator"), "{e}");
    assert!(d
        .ops("admin-rotate")
        .iter()
        .any(|r| r["uid"] == DAVE && r["result"] == "CKR_USER_NOT_LOGGED_IN"));
}

#[test]
#[serial]
fn a_deletion_needs_a_second_operator_and_never_the_requesters_own_approval() {
    if !can_switch_uid() {
        return;
    }
    let d = &main_daemon().d;
    d.ok(None, &["key", "create", "ops-doomed", "--role", "data"]);
    // Alice asks: a request, nothing happens.
    let id = d.request(
        None,
        &["key", "schedule-deletion", "ops-doomed", "--days", "7"],
    );
    assert_eq!(
        d.state_of("ops-doomed"),
        "enabled",
        "a request changes nothing"
    );
    let text = d.ok(None, &["request", "show", &id]);
    assert!(text.contains("pending") && text.contains("alice"), "{text}");
    // Alice cannot approve her own request (not even twice).
    let e = d.refused(None, &["request", "approve", &id]);
    assert!(e.contains("never approves his own request"), "{e}");
    assert_eq!(d.state_of("ops-doomed"), "enabled");
    // An auditor cannot approve.
    d.refused(Some(CAROL), &["request", "approve", &id]);
    assert_eq!(d.state_of("ops-doomed"), "enabled");
    // Bob approves: the second operator; it runs.
    let out = d.ok(Some(BOB), &["request", "approve", &id]);
    assert!(out.contains("executed"), "{out}");
    assert_eq!(d.state_of("ops-doomed"), "pending-deletion");
    let shown: serde_json::Value =
        serde_json::from_str(&d.ok(None, &["--json", "request", "show", &id])).unwrap();
    assert_eq!(shown["status"], "executed", "{shown}");
    // Once done, never again.
    let e = d.refused(Some(BOB), &["request", "approve", &id]);
    assert!(e.contains("not pending"), "{e}");

    // The audit log: request, refused self-approval, approval, execution, and the step.
    let mine = |op: &str| -> Vec<serde_json::Value> {
        d.ops(op)
            .into_iter()
            .filter(|r| r["reason"].as_str().is_some_and(|s| s.contains(&id)))
            .collect()
    };
    let req = mine("request");
    assert_eq!(req.len(), 1, "{req:?}");
    assert_eq!(req[0]["uid"], me());
    assert_eq!(req[0]["key"], "ops-doomed");
    let selfish = mine("admin-request-approve");
    assert!(
        selfish
            .iter()
            .any(|r| r["uid"] == me() && r["result"] == "CKR_ACTION_PROHIBITED"),
        "{selfish:?}"
    );
    let approve = mine("request-approve");
    assert_eq!(approve.len(), 1, "{approve:?}");
    assert_eq!(approve[0]["uid"], BOB);
    let exec = mine("request-execute");
    assert_eq!(exec.len(), 1, "{exec:?}");
    assert_eq!(exec[0]["result"], "CKR_OK");
    assert!(exec[0]["reason"].as_str().unwrap().contains("bob"));
    assert!(d
        .ops("schedule-deletion")
        .iter()
        .any(|r| r["key"] == "ops-doomed" && r["result"] == "CKR_OK" && r["uid"] == BOB));

    // A rejected request never runs; a withdrawn one neither.
    d.ok(None, &["key", "create", "ops-kept", "--role", "data"]);
    let id = d.request(None, &["key", "disable", "ops-kept"]);
    d.ok(Some(BOB), &["request", "reject", &id]);
    let e = d.refused(Some(BOB), &["request", "approve", &id]);
    assert!(e.contains("rejected"), "{e}");
    let id = d.request(Some(BOB), &["key", "disable", "ops-kept"]);
    let e = d.refused(None, &["request", "cancel", &id]);
    assert!(e.contains("only the requester"), "{e}");
    d.ok(Some(BOB), &["request", "cancel", &id]);
    let e = d.refused(None, &["request", "approve", &id]);
    assert!(e.contains("cancelled"), "{e}");
    assert_eq!(d.state_of("ops-kept"), "enabled");
    assert!(!d.ops("request-reject").is_empty());
    assert!(!d.ops("request-cancel").is_empty());
    // The audit log still verifies.
    let v = d.cli(None, &["audit", "verify"]);
    assert_eq!(
        v.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&v.stdout)
    );
}

#[test]
#[serial]
fn an_expired_request_never_runs() {
    if !can_switch_uid() {
        return;
    }
    main_daemon();
    let d = daemon_config("short", "2s");
    let _g = d.start();
    d.ok(None, &["key", "create", "ops-late", "--role", "data"]);
    let id = d.request(None, &["key", "disable", "ops-late"]);
    std::thread::sleep(std::time::Duration::from_millis(3500));
    let e = d.refused(Some(BOB), &["request", "approve", &id]);
    assert!(e.contains("expired"), "{e}");
    assert_eq!(d.state_of("ops-late"), "enabled");
    let shown = d.ok(None, &["request", "show", &id]);
    assert!(shown.contains("expired"), "{shown}");
    let exp = d.ops("request-expire");
    assert_eq!(exp.len(), 1, "one expiry record: {exp:?}");
    assert!(exp[0]["reason"].as_str().unwrap().contains(&id));
    assert!(d.ops("request-execute").is_empty());
}

#[test]
#[serial]
fn requests_survive_a_restart_and_a_tampered_request_is_refused() {
    if !can_switch_uid() {
        return;
    }
    main_daemon();
    let d = daemon_config("restart", "1h");
    let g = d.start();
    d.ok(None, &["key", "create", "ops-restart-a", "--role", "data"]);
    d.ok(None, &["key", "create", "ops-restart-b", "--role", "data"]);
    let a = d.request(None, &["key", "disable", "ops-restart-a"]);
    let b = d.request(None, &["key", "disable", "ops-restart-b"]);
    drop(g);
    // While the daemon is down: one request file edited (the request's action now names
    // another key), one copied under a new id.
    let dir = d.state.join("requests");
    let fb = dir.join(format!("{b}.req"));
    let mut bytes = std::fs::read(&fb).unwrap();
    let at = bytes
        .windows(b"ops-restart-b".len())
        .position(|w| w == b"ops-restart-b")
        .expect("the key name in the request");
    bytes[at + b"ops-restart-".len()] = b'a';
    std::fs::write(&fb, &bytes).unwrap();
    let forged = "r-00000000000000aa";
    std::fs::copy(
        dir.join(format!("{a}.req")),
        dir.join(format!("{forged}.req")),
    )
    .unwrap();

    let _g = d.start();
    let list = d.ok(None, &["request", "list"]);
    assert!(
        list.contains(&a),
        "the request survived the restart:\n{list}"
    );
    // The tampered and the forged files are refused, logged and audited, and never run.
    for id in [&b, &forged.to_string()] {
        let e = d.refused(Some(BOB), &["request", "approve", id]);
        assert!(e.contains("does not authenticate"), "{id}: {e}");
    }
    let log = std::fs::read_to_string(&d.log).unwrap();
    assert!(log.contains(&format!("request {b} refused")), "{log}");
    let tampered = d.ops("request-tampered");
    assert!(tampered.len() >= 2, "{tampered:?}");
    assert_eq!(d.state_of("ops-restart-a"), "enabled");
    assert_eq!(d.state_of("ops-restart-b"), "enabled");
    // The intact one is approved after the restart and runs.
    let out = d.ok(Some(BOB), &["request", "approve", &a]);
    assert!(out.contains("executed"), "{out}");
    assert_eq!(d.state_of("ops-restart-a"), "disabled");
    assert_eq!(d.state_of("ops-restart-b"), "enabled");
}

#[test]
#[serial]
fn a_totp_second_factor_is_needed_for_changes_and_counts_once() {
    if !can_switch_uid() {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    main_daemon();
    let env = test_env();
    // RFC 6238's SHA-1 test secret, base32.
    let secret_file = env.dir.join("alice.totp");
    std::fs::write(&secret_file, "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ\n").unwrap();
    std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let d = daemon_config_with(
        "totp",
        "1h",
        &format!("totp_secret_file = \"{}\"", secret_file.display()),
    );
    let _g = d.start();
    let totp = totp_rs::TOTP::new(
        totp_rs::Algorithm::SHA1,
        6,
        1,
        30,
        b"12345678901234567890".to_vec(),
    )
    .unwrap();
    // Reads need no code.
    d.ok(None, &["key", "list"]);
    // A change without a code, or with a wrong one, is refused and recorded.
    let e = d.refused(None, &["key", "create", "ops-totp"]);
    assert!(e.contains("needs a TOTP code"), "{e}");
    let good = totp.generate_current().unwrap();
    let wrong = format!("{:06}", (good.parse::<u32>().unwrap() + 1) % 1_000_000);
    let e = d.refused(None, &["key", "create", "ops-totp", "--totp", &wrong]);
    assert!(e.contains("TOTP code is wrong"), "{e}");
    assert!(d
        .ops("admin-create")
        .iter()
        .all(|r| r["result"] == "CKR_PIN_INCORRECT"));
    assert_eq!(d.ops("admin-create").len(), 2);
    // The right code works, once.
    let mut code = totp.generate_current().unwrap();
    let out = d.cli(None, &["key", "create", "ops-totp", "--totp", &code]);
    if !out.status.success() {
        // The 30 s step turned between the two reads of the clock: the next code.
        code = totp.generate_current().unwrap();
        d.ok(None, &["key", "create", "ops-totp", "--totp", &code]);
    }
    let e = d.refused(None, &["key", "rotate", "ops-totp", "--totp", &code]);
    assert!(e.contains("used already"), "{e}");
    assert_eq!(d.state_of("ops-totp"), "enabled");
    // Operators without a secret need no code.
    d.ok(Some(BOB), &["key", "rotate", "ops-totp"]);
}
