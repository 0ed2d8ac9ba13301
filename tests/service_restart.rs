//! Service mode when the daemon dies and comes back: the application sees
//! `CKR_DEVICE_REMOVED` while it is gone, `CKR_SESSION_HANDLE_INVALID` for its old
//! sessions once it is back, and works again after opening a session and logging in,
//! without reloading the module or calling `C_Initialize` again (its own test process:
//! it kills this process's daemon).

mod common;

use common::*;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;

const APP_PIN: &str = "restart-credential";

fn login(s: &Session) {
    s.login(UserType::User, Some(&AuthPin::new(APP_PIN.into())))
        .expect("C_Login with the application PIN");
}

fn encrypt(s: &Session, k: ObjectHandle) -> cryptoki::error::Result<Vec<u8>> {
    s.encrypt(&Mechanism::AesCbcPad([3; 16]), k, b"across a restart")
}

fn find(s: &Session, label: &str) -> ObjectHandle {
    let v = s
        .find_objects(&[Attribute::Label(label.as_bytes().to_vec())])
        .unwrap();
    assert_eq!(v.len(), 1, "one CMK named {label}");
    v[0]
}

#[test]
fn clients_survive_a_daemon_restart() {
    let env = test_env();
    let (conf, socket) = write_daemon_config_as(&env.dir, "restart", APP_PIN, "");
    let mut daemon = spawn_daemon(&conf, &socket, &env.softhsm_conf);
    std::env::set_var("CMKP11_SERVICE", format!("unix:{}", socket.display()));
    let ctx = Pkcs11::new(module_path()).unwrap();
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    let slot = ctx.get_slots_with_token().unwrap()[0];
    let s = ctx.open_rw_session(slot).unwrap();
    login(&s);
    let k = s
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Token(true),
                Attribute::ValueLen(32.into()),
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
                Attribute::Label(b"restart-cmk".to_vec()),
            ],
        )
        .unwrap();
    let before = encrypt(&s, k).unwrap();

    // Killed: the device is gone, for every call.
    daemon.kill().unwrap();
    daemon.wait().unwrap();
    let gone = |r: cryptoki::error::Result<()>| match r {
        Err(Error::Pkcs11(RvError::DeviceRemoved, _)) => {}
        other => panic!("expected CKR_DEVICE_REMOVED, got {other:?}"),
    };
    gone(encrypt(&s, k).map(|_| ()));
    gone(ctx.get_slots_with_token().map(|_| ()));
    gone(ctx.open_rw_session(slot).map(|_| ()));

    // Back: old sessions are invalid, new ones work after a login; the key is the same.
    let mut daemon = spawn_daemon(&conf, &socket, &env.softhsm_conf);
    match encrypt(&s, k) {
        Err(Error::Pkcs11(RvError::SessionHandleInvalid, _)) => {}
        other => panic!("expected CKR_SESSION_HANDLE_INVALID, got {other:?}"),
    }
    std::mem::forget(s);
    let s = ctx.open_rw_session(slot).unwrap();
    match encrypt(&s, k) {
        Err(Error::Pkcs11(RvError::UserNotLoggedIn, _)) => {}
        other => panic!("expected CKR_USER_NOT_LOGGED_IN before the login, got {other:?}"),
    }
    login(&s);
    let k = find(&s, "restart-cmk");
    assert_eq!(encrypt(&s, k).unwrap(), before);
    drop(s);
    daemon.kill().unwrap();
    daemon.wait().unwrap();
    std::mem::forget(ctx);
}

#[test]
fn sigterm_finalizes_and_authenticates_the_audit_tail() {
    let env = test_env();
    let audit = env.dir.join("term-audit.log");
    let (conf, socket) = write_daemon_config_as(
        &env.dir,
        "term",
        APP_PIN,
        &format!("\n[audit]\nfile = \"{}\"\n", audit.display()),
    );
    let mut daemon = spawn_daemon(&conf, &socket, &env.softhsm_conf);
    // A client's key use: a record after the daemon's start-up ones.
    let mut c = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    let mut buf = Vec::new();
    use cmkp11::service::proto::{self, Hello, Reply, Request, Welcome};
    proto::send(&mut c, &Hello::Open { min: 1, max: 1 }).unwrap();
    assert!(matches!(
        proto::recv::<Welcome>(&mut c, &mut buf).unwrap(),
        Welcome::Ok { .. }
    ));
    proto::send(
        &mut c,
        &Request::OpenSession {
            slot: 0,
            flags: cryptoki_sys::CKF_SERIAL_SESSION,
        },
    )
    .unwrap();
    let Reply::Handle(h) = proto::recv::<Reply>(&mut c, &mut buf).unwrap() else {
        panic!("C_OpenSession")
    };
    proto::send(
        &mut c,
        &Request::Login {
            session: h,
            user: cryptoki_sys::CKU_USER,
            pin: b"wrong".to_vec(),
        },
    )
    .unwrap();
    proto::recv::<Reply>(&mut c, &mut buf).unwrap();
    // SAFETY: a signal to the daemon this test started.
    assert_eq!(unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) }, 0);
    let st = daemon.wait().unwrap();
    assert!(st.success(), "cmkp11d exits 0 on SIGTERM: {st}");
    assert!(!socket.exists(), "the socket is removed");
    let text = std::fs::read_to_string(&audit).unwrap();
    let last: serde_json::Value =
        serde_json::from_str(text.lines().last().expect("records")).unwrap();
    assert_eq!(
        last["op"], "checkpoint",
        "the log ends authenticated:\n{text}"
    );
    assert!(text.contains("CKR_PIN_INCORRECT"), "{text}");
}
