//! Service mode through the built `.so` in client mode and a real `cmkp11d` over this test
//! process's SoftHSM2 token: the application credential is not the token PIN, identity and
//! configuration come from the daemon's side, one client cannot name another's handles,
//! garbage drops only the connection that sent it, wrong PINs are rate-limited and
//! audited, a broken daemon configuration refuses to start with one line.

mod common;

use cmkp11::service::proto::{self, Hello, Op, Reply, Request, Welcome};
use common::*;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use cryptoki_sys::*;
use serial_test::serial;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::OnceLock;

/// The application credential of this file's daemon (the token's PIN is [`USER_PIN`]).
const APP_PIN: &str = "app-credential-77";

struct Svc {
    ctx: Pkcs11,
    socket: PathBuf,
    audit: PathBuf,
}

// SAFETY-free: Pkcs11 is Send + Sync.
static SVC: OnceLock<Svc> = OnceLock::new();
static DAEMON: std::sync::Mutex<Vec<std::process::Child>> = std::sync::Mutex::new(Vec::new());

extern "C" fn stop() {
    if let Ok(mut v) = DAEMON.lock() {
        for c in v.iter_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// This process's daemon (audit log on, an access rule that admits only uid 4242 to keys
/// `svc-guarded-*`), and the module in client mode. The application's own configuration
/// (`CMKP11_CONFIG`) is an attacker's: it allows plaintext import, names no audit log and
/// no access rule. It must change nothing.
fn svc() -> &'static Svc {
    SVC.get_or_init(|| {
        let env = test_env();
        let audit = env.dir.join("audit.log");
        let extra = format!(
            "\n[audit]\nfile = \"{}\"\n\n[[access]]\nkeys = \"svc-guarded-*\"\nuids = [4242]\n",
            audit.display()
        );
        let (conf, socket) = write_daemon_config_as(&env.dir, "svc", APP_PIN, &extra);
        let child = spawn_daemon(&conf, &socket, &env.softhsm_conf);
        DAEMON.lock().unwrap().push(child);
        // SAFETY: registering a plain extern "C" fn.
        unsafe { libc::atexit(stop) };
        let evil = env.dir.join("evil.toml");
        std::fs::write(
            &evil,
            format!("[backend]\nmodule = \"{SOFTHSM_MODULE}\"\n\n[policy]\nallow_plaintext_import = true\n"),
        )
        .unwrap();
        std::env::set_var("CMKP11_CONFIG", &evil);
        std::env::set_var("CMKP11_SERVICE", format!("unix:{}", socket.display()));
        let ctx = Pkcs11::new(module_path()).expect("load the module");
        ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .expect("C_Initialize in client mode");
        Svc {
            ctx,
            socket,
            audit,
        }
    })
}

fn slot() -> cryptoki::slot::Slot {
    svc().ctx.get_slots_with_token().unwrap()[0]
}

/// A logged-in read-write session (the application PIN).
fn session() -> Session {
    let s = svc().ctx.open_rw_session(slot()).unwrap();
    match s.login(UserType::User, Some(&AuthPin::new(APP_PIN.into()))) {
        Ok(())
        | Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::UserAlreadyLoggedIn, _)) => {
        }
        Err(e) => panic!("C_Login with the application PIN: {e}"),
    }
    s
}

fn data_cmk(s: &Session, label: &str) -> ObjectHandle {
    s.generate_key(
        &Mechanism::AesKeyGen,
        &[
            Attribute::Token(true),
            Attribute::ValueLen(32.into()),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Label(label.as_bytes().to_vec()),
        ],
    )
    .expect("C_GenerateKey of a data CMK")
}

fn gcm_encrypt(s: &Session, key: ObjectHandle, data: &[u8]) -> cryptoki::error::Result<Vec<u8>> {
    let mut iv = [7u8; 12];
    let params = GcmParams::new(&mut iv, &[], 128.into()).unwrap();
    s.encrypt(&Mechanism::AesGcm(params), key, data)
}

/// Asserts that `e` is the PKCS#11 error `want`.
fn assert_code(e: cryptoki::error::Error, want: CK_RV) {
    match cryptoki::error::Rv::from(want) {
        cryptoki::error::Rv::Error(w) => assert_eq!(rv_of(&e), w),
        _ => panic!("{want:#x} is not an error code"),
    }
}

/// A raw protocol connection: a second client of the daemon (its own context).
struct Raw {
    s: UnixStream,
    buf: Vec<u8>,
    context: u64,
    secret: [u8; 32],
}

impl Raw {
    fn open(socket: &std::path::Path) -> Raw {
        let mut s = UnixStream::connect(socket).unwrap();
        proto::send(&mut s, &Hello::Open { min: 1, max: 1 }).unwrap();
        let mut buf = Vec::new();
        match proto::recv::<Welcome>(&mut s, &mut buf).unwrap() {
            Welcome::Ok {
                context, secret, ..
            } => Raw {
                s,
                buf,
                context,
                secret,
            },
            Welcome::Refused(why) => panic!("refused: {why}"),
        }
    }
    /// One more connection of this context: whether the daemon accepted it.
    fn attach(&self, socket: &std::path::Path) -> Option<UnixStream> {
        let mut s = UnixStream::connect(socket).unwrap();
        proto::send(
            &mut s,
            &Hello::Attach {
                version: proto::VERSION,
                context: self.context,
                secret: self.secret,
            },
        )
        .unwrap();
        let mut buf = Vec::new();
        match proto::recv::<Welcome>(&mut s, &mut buf).unwrap() {
            Welcome::Ok { .. } => Some(s),
            Welcome::Refused(_) => None,
        }
    }
    fn rq(&mut self, r: &Request) -> Reply {
        proto::send(&mut self.s, r).unwrap();
        proto::recv(&mut self.s, &mut self.buf).unwrap()
    }
    fn session(&mut self) -> u64 {
        match self.rq(&Request::OpenSession {
            slot: 0,
            flags: CKF_SERIAL_SESSION | CKF_RW_SESSION,
        }) {
            Reply::Handle(h) => h,
            r => panic!("C_OpenSession: {r:?}"),
        }
    }
    fn login(&mut self, s: u64, pin: &str) -> Reply {
        self.rq(&Request::Login {
            session: s,
            user: CKU_USER,
            pin: pin.as_bytes().to_vec(),
        })
    }
}

#[test]
#[serial]
fn the_token_pin_is_not_an_application_credential() {
    let s = svc().ctx.open_rw_session(slot()).unwrap();
    let mut raw = Raw::open(&svc().socket);
    let h = raw.session();
    // The token's own PIN opens nothing: applications never hold it.
    assert_eq!(raw.login(h, USER_PIN).rv(), CKR_PIN_INCORRECT);
    assert_eq!(raw.login(h, APP_PIN).rv(), CKR_OK);
    drop(s);
    // The module's application logs in with its credential and works.
    let s = session();
    let k = data_cmk(&s, "svc-pin-check");
    assert_eq!(gcm_encrypt(&s, k, b"hello").unwrap().len(), 5 + 16);
}

trait RvOf {
    fn rv(&self) -> CK_RV;
}
impl RvOf for Reply {
    fn rv(&self) -> CK_RV {
        match self {
            Reply::Rv(rv) => *rv,
            other => panic!("expected a code, got {other:?}"),
        }
    }
}

#[test]
#[serial]
fn the_applications_own_config_changes_nothing() {
    // CMKP11_CONFIG names a file that allows plaintext import: the daemon's policy rules.
    let s = session();
    let r = s.create_object(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(false),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
        Attribute::Value(vec![0x5a; 32]),
    ]);
    assert_code(r.unwrap_err(), CKR_TEMPLATE_INCONSISTENT);
    // The daemon's access rule (uid 4242 only) applies, whatever this process is.
    let k = data_cmk(&s, "svc-guarded-payments");
    assert_code(
        gcm_encrypt(&s, k, b"x").unwrap_err(),
        CKR_KEY_FUNCTION_NOT_PERMITTED,
    );
    let k = data_cmk(&s, "svc-open-payments");
    assert!(gcm_encrypt(&s, k, b"x").is_ok());
}

#[test]
#[serial]
fn audit_records_carry_the_kernels_identity() {
    let s = session();
    let k = data_cmk(&s, "svc-audited");
    gcm_encrypt(&s, k, b"audited").unwrap();
    let refused = data_cmk(&s, "svc-guarded-audited");
    let _ = gcm_encrypt(&s, refused, b"x");
    let exe = std::env::current_exe().unwrap();
    let me = std::process::id();
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    let text = std::fs::read_to_string(&svc().audit).unwrap();
    let records: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let find = |key: &str, result: &str| {
        records
            .iter()
            .find(|r| r["key"] == key && r["result"] == result)
            .unwrap_or_else(|| panic!("no {result} record for {key} in:\n{text}"))
            .clone()
    };
    for r in [
        find("svc-audited", "CKR_OK"),
        find("svc-guarded-audited", "CKR_KEY_FUNCTION_NOT_PERMITTED"),
    ] {
        assert_eq!(r["pid"], me, "{r}");
        assert_eq!(r["uid"], uid, "{r}");
        assert_eq!(r["exe"], exe.to_string_lossy().as_ref(), "{r}");
    }
    // The application's login is recorded under its own identity and credential name.
    assert!(
        records.iter().any(|r| r["op"] == "login"
            && r["pid"] == me
            && r["reason"] == "client tests"
            && r["result"] == "CKR_OK"),
        "no login record of this process:\n{text}"
    );
    // Never a PIN: no field holds the token PIN or the application's credential (the
    // token PIN "1234" may appear inside a hash, so values are compared, not the text).
    assert!(!text.contains(APP_PIN), "{text}");
    fn strings(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::String(s) => out.push(s.clone()),
            serde_json::Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
            serde_json::Value::Object(o) => o.values().for_each(|x| strings(x, out)),
            _ => {}
        }
    }
    let mut values = Vec::new();
    records.iter().for_each(|r| strings(r, &mut values));
    assert!(
        !values
            .iter()
            .any(|v| v == "1234" || v.contains(" 1234") || v.contains("=1234")),
        "a record holds the token PIN:\n{text}"
    );
}

#[test]
#[serial]
fn another_clients_handles_are_not_reachable() {
    let s = session();
    let k = data_cmk(&s, "svc-mine");
    let dek = s
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Token(false),
                Attribute::ValueLen(32.into()),
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
            ],
        )
        .unwrap();
    let mine = own_session_handle();
    let mut other = Raw::open(&svc().socket);
    let h = other.session();
    let init = |o: &mut Raw, key: u64| {
        o.rq(&Request::Init {
            op: Op::Encrypt,
            session: h,
            mech: Some(proto::Mech {
                ty: CKM_AES_CBC_PAD,
                param: proto::Param::Iv16([0; 16]),
            }),
            key,
        })
        .rv()
    };
    // Not logged in: no key at all.
    assert_eq!(init(&mut other, dek.handle()), CKR_USER_NOT_LOGGED_IN);
    assert_eq!(other.login(h, APP_PIN).rv(), CKR_OK);
    // Logged in, but these handles were never given to this client.
    assert_eq!(init(&mut other, dek.handle()), CKR_KEY_HANDLE_INVALID);
    assert_eq!(init(&mut other, k.handle()), CKR_KEY_HANDLE_INVALID);
    assert_eq!(
        other
            .rq(&Request::GetAttributeValue {
                session: h,
                object: dek.handle(),
                query: vec![(CKA_LABEL, None)],
            })
            .rv(),
        CKR_OBJECT_HANDLE_INVALID
    );
    // Nor this process's session.
    assert_eq!(
        other.rq(&Request::CloseSession(mine)).rv(),
        CKR_SESSION_HANDLE_INVALID
    );
    // A token key it finds itself is its to use (token objects are shared).
    assert_eq!(
        other
            .rq(&Request::FindObjectsInit {
                session: h,
                template: vec![proto::Attr {
                    ty: CKA_LABEL,
                    value: Some(b"svc-mine".to_vec()),
                }],
            })
            .rv(),
        CKR_OK
    );
    let found = match other.rq(&Request::FindObjects {
        session: h,
        max: 10,
    }) {
        Reply::Handles(v) => v,
        r => panic!("{r:?}"),
    };
    assert_eq!(found, vec![k.handle()]);
    assert_eq!(init(&mut other, k.handle()), CKR_OK);
    // The session this process made still works.
    assert!(gcm_encrypt(&s, dek, b"still mine").is_ok());
}

/// A session of this process opened through the module's raw table (its daemon handle).
fn own_session_handle() -> u64 {
    svc();
    let mut list: *mut CK_FUNCTION_LIST = std::ptr::null_mut();
    // SAFETY: loading the already loaded module again (reference counted).
    let lib = unsafe { cryptoki_sys::Pkcs11::new(module_path().as_os_str()) }.unwrap();
    // SAFETY: valid out-pointer.
    assert_eq!(unsafe { lib.C_GetFunctionList(&mut list) }, CKR_OK);
    std::mem::forget(lib);
    // SAFETY: the table lives as long as the module, which stays loaded.
    let f = unsafe { &*list };
    let mut h = 0;
    assert_rv!(
        ck!(
            f,
            C_OpenSession,
            0,
            CKF_SERIAL_SESSION,
            std::ptr::null_mut(),
            None,
            &mut h
        ),
        CKR_OK
    );
    h
}

#[test]
#[serial]
fn garbage_drops_only_that_connection() {
    let socket = &svc().socket;
    let s = session();
    let k = data_cmk(&s, "svc-garbage");
    let closed = |mut c: UnixStream| {
        let mut b = [0u8; 1];
        c.set_read_timeout(Some(std::time::Duration::from_secs(20)))
            .unwrap();
        use std::io::Read;
        assert_eq!(
            c.read(&mut b).unwrap(),
            0,
            "the daemon closes the connection"
        );
    };
    // Garbage instead of a hello.
    let mut c = UnixStream::connect(socket).unwrap();
    c.write_all(&[5, 0, 0, 0, 0xff, 0xfe, 0xfd, 0xfc, 0xfb])
        .unwrap();
    closed(c);
    // A frame over the size limit after a good hello.
    let mut raw = Raw::open(socket);
    raw.s
        .write_all(&((proto::MAX_FRAME as u32) + 1).to_le_bytes())
        .unwrap();
    closed(raw.s);
    // An undecodable request.
    let mut raw = Raw::open(socket);
    raw.s.write_all(&[3, 0, 0, 0, 0xee, 0xee, 0xee]).unwrap();
    closed(raw.s);
    // A nested template carrying a pointer is refused, not dereferenced.
    let mut raw = Raw::open(socket);
    let h = raw.session();
    assert_eq!(raw.login(h, APP_PIN).rv(), CKR_OK);
    let r = raw.rq(&Request::GenerateKey {
        session: h,
        mech: Some(proto::Mech {
            ty: CKM_AES_KEY_GEN,
            param: proto::Param::None,
        }),
        template: vec![
            proto::Attr {
                ty: CKA_VALUE_LEN,
                value: Some(32u64.to_ne_bytes().to_vec()),
            },
            proto::Attr {
                ty: CKA_WRAP_TEMPLATE,
                value: Some(vec![0x41; 24]),
            },
        ],
    });
    assert_eq!(r.rv(), CKR_ATTRIBUTE_VALUE_INVALID);
    // A wrong protocol version is refused with a reason.
    let mut c = UnixStream::connect(socket).unwrap();
    proto::send(&mut c, &Hello::Open { min: 99, max: 100 }).unwrap();
    let mut buf = Vec::new();
    assert!(matches!(
        proto::recv::<Welcome>(&mut c, &mut buf).unwrap(),
        Welcome::Refused(_)
    ));
    // Attaching to this process's context without its secret is refused.
    let mut c = UnixStream::connect(socket).unwrap();
    proto::send(
        &mut c,
        &Hello::Attach {
            version: 1,
            context: 1,
            secret: [0; 32],
        },
    )
    .unwrap();
    assert!(matches!(
        proto::recv::<Welcome>(&mut c, &mut buf).unwrap(),
        Welcome::Refused(_)
    ));
    // The daemon and this client carry on.
    assert!(gcm_encrypt(&s, k, b"after the garbage").is_ok());
}

#[test]
#[serial]
fn wrong_application_pins_are_rate_limited_and_audited() {
    // Its own daemon over the same token: the lockout is per uid and would lock the
    // other tests of this process out of the shared one.
    let env = test_env();
    let audit = env.dir.join("audit-rate.log");
    let (conf, socket) = write_daemon_config_as(
        &env.dir,
        "rate",
        APP_PIN,
        &format!("\n[audit]\nfile = \"{}\"\n", audit.display()),
    );
    let child = spawn_daemon(&conf, &socket, &env.softhsm_conf);
    DAEMON.lock().unwrap().push(child);
    let mut raw = Raw::open(&socket);
    let h = raw.session();
    for _ in 0..5 {
        assert_eq!(raw.login(h, "guess").rv(), CKR_PIN_INCORRECT);
    }
    // Locked out now, even with the right credential, and on a new connection too.
    assert_eq!(raw.login(h, APP_PIN).rv(), CKR_PIN_LOCKED);
    let mut again = Raw::open(&socket);
    let h2 = again.session();
    assert_eq!(again.login(h2, APP_PIN).rv(), CKR_PIN_LOCKED);
    let text = std::fs::read_to_string(&audit).unwrap();
    let logins: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["op"] == "login" && r["pid"] == std::process::id())
        .collect();
    assert_eq!(
        logins
            .iter()
            .filter(|r| r["result"] == "CKR_PIN_INCORRECT")
            .count(),
        5,
        "{text}"
    );
    assert_eq!(
        logins
            .iter()
            .filter(|r| r["result"] == "CKR_PIN_LOCKED")
            .count(),
        2,
        "{text}"
    );
    assert!(!text.contains("guess") && !text.contains(APP_PIN));
}

#[test]
#[serial]
fn a_broken_daemon_config_refuses_to_start_with_one_line() {
    let env = test_env();
    let cases = [
        ("bad-key", "[service]\nsocket = \"/tmp/x.sock\"\nbogus = 1\n", "bogus"),
        ("no-service", "[backend]\n", "[service]"),
        (
            "no-pin",
            "[service]\nsocket = \"/tmp/x.sock\"\n",
            "service.token_pin_file",
        ),
        (
            "bad-hash",
            "[service]\nsocket = \"/tmp/x.sock\"\n[[clients]]\nname = \"a\"\nuids = [1]\npin_hash = \"1234\"\n",
            "clients[0].pin_hash",
        ),
    ];
    for (name, text, key) in cases {
        let conf = env.dir.join(format!("{name}.toml"));
        std::fs::write(
            &conf,
            format!("{text}\n").replace(
                "[backend]\n",
                &format!("[backend]\nmodule = \"{SOFTHSM_MODULE}\"\n"),
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o600)).unwrap();
        let out = std::process::Command::new(daemon_path())
            .arg("--config")
            .arg(&conf)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: started");
        assert_eq!(err.lines().count(), 1, "{name}: {err}");
        assert!(
            err.contains(key) && err.starts_with("cmkp11d: "),
            "{name}: {err}"
        );
    }
}

#[test]
#[serial]
fn length_queries_take_one_round_trip_and_match() {
    // The two-call convention through the client: same answers as a one-shot call.
    let s = session();
    let k = data_cmk(&s, "svc-two-call");
    let data = vec![0x42u8; 4096];
    let c = gcm_encrypt(&s, k, &data).unwrap();
    assert_eq!(c.len(), 4096 + 16);
    let mut iv = [7u8; 12];
    let params = GcmParams::new(&mut iv, &[], 128.into()).unwrap();
    assert_eq!(s.decrypt(&Mechanism::AesGcm(params), k, &c).unwrap(), data);
    let r = s
        .get_attributes(k, &[AttributeType::Label, AttributeType::ValueLen])
        .unwrap();
    assert!(r.contains(&Attribute::Label(b"svc-two-call".to_vec())));
}

#[test]
#[serial]
fn per_client_limits_hold() {
    let env = test_env();
    let (conf, socket) = write_daemon_config_full(
        &env.dir,
        "limits",
        APP_PIN,
        "max_sessions = 3\nmax_objects = 2\nmax_connections = 2\n",
        "",
    );
    let child = spawn_daemon(&conf, &socket, &env.softhsm_conf);
    DAEMON.lock().unwrap().push(child);
    let mut raw = Raw::open(&socket);
    let h = raw.session();
    raw.session();
    raw.session();
    assert_eq!(
        raw.rq(&Request::OpenSession {
            slot: 0,
            flags: CKF_SERIAL_SESSION,
        })
        .rv(),
        CKR_SESSION_COUNT
    );
    assert_eq!(raw.login(h, APP_PIN).rv(), CKR_OK);
    let keygen = |r: &mut Raw| {
        r.rq(&Request::GenerateKey {
            session: h,
            mech: Some(proto::Mech {
                ty: CKM_AES_KEY_GEN,
                param: proto::Param::None,
            }),
            template: vec![
                proto::Attr {
                    ty: CKA_VALUE_LEN,
                    value: Some(32u64.to_ne_bytes().to_vec()),
                },
                proto::Attr {
                    ty: CKA_TOKEN,
                    value: Some(vec![0]),
                },
            ],
        })
    };
    assert!(matches!(keygen(&mut raw), Reply::Handle(_)));
    assert!(matches!(keygen(&mut raw), Reply::Handle(_)));
    assert_eq!(keygen(&mut raw).rv(), CKR_DEVICE_MEMORY);
    // Calls in flight: two connections of this process, not three.
    let second = raw.attach(&socket).expect("a second connection");
    assert!(raw.attach(&socket).is_none(), "a third connection");
    // Another client is not affected by this one's limits.
    let mut other = Raw::open(&socket);
    other.session();
    drop(second);
}

#[test]
#[serial]
fn operator_functions_are_refused_to_applications() {
    let s = svc().ctx.open_rw_session(slot()).unwrap();
    // The token's SO is an operator of the daemon, never an application.
    let so = s.login(UserType::So, Some(&AuthPin::new(SO_PIN.into())));
    assert_code(so.unwrap_err(), CKR_USER_TYPE_INVALID);
    let s = session();
    let pin = AuthPin::new("new-pin".into());
    assert_code(s.init_pin(&pin).unwrap_err(), CKR_FUNCTION_NOT_SUPPORTED);
    assert_code(
        s.set_pin(&AuthPin::new(APP_PIN.into()), &pin).unwrap_err(),
        CKR_FUNCTION_NOT_SUPPORTED,
    );
    // Still logged in with the application credential.
    let k = data_cmk(&s, "svc-operator-check");
    assert!(gcm_encrypt(&s, k, b"x").is_ok());
}

/// `C_FindObjects` of a client that has not logged in: all handles found, until no more.
fn raw_find(raw: &mut Raw, h: u64, template: Vec<proto::Attr>) -> Vec<u64> {
    assert_eq!(
        raw.rq(&Request::FindObjectsInit {
            session: h,
            template
        })
        .rv(),
        CKR_OK
    );
    let mut all = Vec::new();
    loop {
        match raw.rq(&Request::FindObjects {
            session: h,
            max: 64,
        }) {
            Reply::Handles(v) if v.is_empty() => break,
            Reply::Handles(v) => all.extend(v),
            r => panic!("C_FindObjects: {r:?}"),
        }
    }
    assert_eq!(raw.rq(&Request::FindObjectsFinal(h)).rv(), CKR_OK);
    all
}

fn label_attr(label: &str) -> proto::Attr {
    proto::Attr {
        ty: CKA_LABEL,
        value: Some(label.as_bytes().to_vec()),
    }
}

#[test]
#[serial]
fn before_login_a_client_sees_public_objects_only() {
    // A logged-in application stores a public certificate, a private data object and a CMK.
    let s = session();
    let cert = s
        .create_object(&[
            Attribute::Class(ObjectClass::CERTIFICATE),
            Attribute::CertificateType(cryptoki::object::CertificateType::X_509),
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Label(b"svc-public-cert".to_vec()),
            Attribute::Subject(b"\x30\x00".to_vec()),
            Attribute::Value(b"\x30\x03\x02\x01\x01".to_vec()),
        ])
        .expect("a token certificate");
    let private = s
        .create_object(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Label(b"svc-private-data".to_vec()),
            Attribute::Value(b"secret".to_vec()),
        ])
        .expect("a private data object");
    data_cmk(&s, "svc-public-test-cmk");

    // Another process of a [[clients]] uid, not logged in (ssh-keygen -D, openvpn
    // --show-pkcs11-ids): the certificate, readable; nothing private.
    let mut raw = Raw::open(&svc().socket);
    let h = raw.session();
    let found = raw_find(&mut raw, h, vec![label_attr("svc-public-cert")]);
    assert_eq!(
        found.len(),
        1,
        "the public certificate is found before login"
    );
    let read = raw.rq(&Request::GetAttributeValue {
        session: h,
        object: found[0],
        query: vec![(CKA_LABEL, Some(64))],
    });
    match read {
        Reply::Attributes { rv, values } => {
            assert_eq!(rv, CKR_OK);
            assert_eq!(values[0].1.as_deref(), Some(&b"svc-public-cert"[..]));
        }
        r => panic!("C_GetAttributeValue: {r:?}"),
    }
    for label in ["svc-private-data", "svc-public-test-cmk"] {
        assert!(
            raw_find(&mut raw, h, vec![label_attr(label)]).is_empty(),
            "{label} is private: invisible before login"
        );
    }
    let asks_private = vec![proto::Attr {
        ty: CKA_PRIVATE,
        value: Some(vec![CK_TRUE]),
    }];
    assert!(raw_find(&mut raw, h, asks_private).is_empty());
    // Every object a search without a template finds is public.
    for o in raw_find(&mut raw, h, Vec::new()) {
        match raw.rq(&Request::GetAttributeValue {
            session: h,
            object: o,
            query: vec![(CKA_PRIVATE, Some(1))],
        }) {
            Reply::Attributes { rv, values } => {
                assert_eq!(rv, CKR_OK);
                assert_eq!(values[0].1.as_deref(), Some(&[CK_FALSE][..]), "object {o}");
            }
            r => panic!("C_GetAttributeValue: {r:?}"),
        }
    }
    // Reading is all: no change without login, and nothing it did not find.
    assert_eq!(
        raw.rq(&Request::DestroyObject {
            session: h,
            object: found[0]
        })
        .rv(),
        CKR_USER_NOT_LOGGED_IN
    );
    let not_found = raw.rq(&Request::GetAttributeValue {
        session: h,
        object: private.handle(),
        query: vec![(CKA_LABEL, Some(64))],
    });
    assert!(
        matches!(
            not_found,
            Reply::Rv(CKR_USER_NOT_LOGGED_IN | CKR_OBJECT_HANDLE_INVALID)
        ),
        "{not_found:?}"
    );
    s.destroy_object(cert).unwrap();
    s.destroy_object(private).unwrap();
}
