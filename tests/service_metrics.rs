//! `cmkp11d`'s metrics through a real daemon over this test process's SoftHSM2 token: after
//! key uses, refusals and DEK operations by the module in client mode, `GET /metrics` on
//! the metrics socket counts them per key, operation, result and kernel-attested client,
//! times every protocol call, and shows the client's sessions; a non-loopback TCP address
//! is refused at start with one line; a loopback one serves the same text.

mod common;

use common::*;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use std::io::{Read, Write};
use std::path::Path;

const APP_PIN: &str = "metrics-app-pin-31";
const TCP: &str = "127.0.0.1:42517";

/// `GET /metrics` over HTTP/1.0 on `stream`; the body.
fn scrape(mut stream: impl Read + Write) -> String {
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(
        head.starts_with("HTTP/1.") && head.contains(" 200 "),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    body.to_string()
}

/// The value of the sample whose name and labels are exactly `series`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

fn gcm(s: &Session, key: ObjectHandle) -> cryptoki::error::Result<Vec<u8>> {
    let mut iv = [3u8; 12];
    let p = GcmParams::new(&mut iv, &[], 128.into()).unwrap();
    s.encrypt(&Mechanism::AesGcm(p), key, b"metrics")
}

fn aes(s: &Session, label: &str, token: bool) -> ObjectHandle {
    s.generate_key(
        &Mechanism::AesKeyGen,
        &[
            Attribute::Token(token),
            Attribute::ValueLen(32.into()),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Label(label.as_bytes().to_vec()),
        ],
    )
    .expect("C_GenerateKey")
}

fn start(dir: &Path, name: &str, service_extra: &str) -> (DaemonGuard, std::path::PathBuf) {
    let env = test_env();
    let extra = format!(
        "\n[audit]\nfile = \"{}\"\n\n[[access]]\nkeys = \"metrics-guarded-*\"\nuids = [4242]\n",
        dir.join(format!("{name}-audit.log")).display()
    );
    let (conf, socket) = write_daemon_config_full(dir, name, APP_PIN, service_extra, &extra);
    (
        DaemonGuard(spawn_daemon(&conf, &socket, &env.softhsm_conf)),
        socket,
    )
}

#[test]
fn metrics_count_key_uses_refusals_calls_and_sessions() {
    if !testing_cmkp11() {
        return;
    }
    let env = test_env();
    let msock = env.dir.join("metrics-http.sock");
    let (_daemon, socket) = start(
        &env.dir,
        "metrics",
        &format!(
            "metrics_socket = \"{}\"\nmetrics_listen = \"{TCP}\"",
            msock.display()
        ),
    );
    std::env::set_var("CMKP11_SERVICE", format!("unix:{}", socket.display()));
    let ctx = Pkcs11::new(module_path()).expect("load the module");
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .expect("C_Initialize in client mode");
    let slot = ctx.get_slots_with_token().unwrap()[0];
    let s = ctx.open_rw_session(slot).unwrap();
    s.login(UserType::User, Some(&AuthPin::new(APP_PIN.into())))
        .expect("C_Login with the application PIN");
    let data = aes(&s, "metrics-data", true);
    let guarded = aes(&s, "metrics-guarded-1", true);
    let dek = aes(&s, "metrics-dek", false);
    for _ in 0..3 {
        gcm(&s, data).expect("a data CMK encrypts");
    }
    for _ in 0..2 {
        gcm(&s, dek).expect("a session key encrypts");
    }
    let refused = gcm(&s, guarded).expect_err("the access rule admits only uid 4242");
    let refused_name = format!("{:?}", rv_of(&refused));

    let text = scrape(std::os::unix::net::UnixStream::connect(&msock).expect("metrics socket"));
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    let exe = std::env::current_exe().unwrap().canonicalize().unwrap();
    let who = format!("uid=\"{uid}\",exe=\"{}\"", exe.display());
    let ok = format!(
        "cmkp11_key_operations_total{{key=\"metrics-data\",op=\"encrypt\",result=\"CKR_OK\",{who}}}"
    );
    assert_eq!(sample(&text, &ok), Some(3.0), "{ok} in\n{text}");
    let bulk = format!(
        "cmkp11_key_operations_total{{key=\"(session key)\",op=\"encrypt\",result=\"CKR_OK\",{who}}}"
    );
    assert!(sample(&text, &bulk) >= Some(2.0), "{bulk} in\n{text}");
    let refusal = text
        .lines()
        .find(|l| l.starts_with("cmkp11_refusals_total{key=\"metrics-guarded-1\""))
        .unwrap_or_else(|| panic!("no refusal of metrics-guarded-1 in\n{text}"));
    assert!(
        refusal.contains(&who) && refusal.ends_with(" 1"),
        "{refusal}"
    );
    assert!(
        !text.contains("cmkp11_refusals_total{key=\"metrics-data\""),
        "a key that was never refused has no refusal series:\n{text}"
    );
    eprintln!("refused with {refused_name}: {refusal}");
    // Every call is timed, by protocol call name.
    for call in ["Login", "GenerateKey", "EncryptInit", "Encrypt"] {
        let count = text
            .lines()
            .find(|l| {
                l.starts_with(&format!(
                    "cmkp11_call_duration_seconds_count{{call=\"{call}\"}}"
                ))
            })
            .unwrap_or_else(|| panic!("no latency histogram of {call} in\n{text}"));
        let n: f64 = count.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(n >= 1.0, "{count}");
    }
    assert_eq!(
        sample(&text, &format!("cmkp11_sessions{{{who}}}")),
        Some(1.0),
        "{text}"
    );
    assert_eq!(sample(&text, "cmkp11_clients"), Some(1.0), "{text}");
    assert_eq!(
        sample(&text, "cmkp11_audit_write_failures_total"),
        Some(0.0),
        "{text}"
    );
    // No key material, PIN or credential in the exposition.
    assert!(
        !text.contains(APP_PIN) && !text.contains(USER_PIN),
        "{text}"
    );

    // The loopback TCP endpoint serves the same metrics.
    let tcp = scrape(std::net::TcpStream::connect(TCP).expect("metrics on loopback TCP"));
    assert_eq!(sample(&tcp, &ok), Some(3.0), "{tcp}");
    // Anything but /metrics is a 404.
    let mut c = std::os::unix::net::UnixStream::connect(&msock).unwrap();
    c.write_all(b"GET /other HTTP/1.0\r\n\r\n").unwrap();
    let mut resp = String::new();
    c.read_to_string(&mut resp).unwrap();
    assert!(
        resp.starts_with("HTTP/1.") && resp.contains(" 404 "),
        "{resp}"
    );
    let _ = s.logout();
    drop(s);
    let _ = ctx.finalize();
}

#[test]
fn a_non_loopback_metrics_address_is_refused_at_start() {
    if !testing_cmkp11() {
        return;
    }
    let env = test_env();
    let (conf, _socket) = write_daemon_config_full(
        &env.dir,
        "metrics-open",
        APP_PIN,
        "metrics_listen = \"0.0.0.0:42518\"",
        "",
    );
    let out = std::process::Command::new(daemon_path())
        .arg("--config")
        .arg(&conf)
        .env("SOFTHSM2_CONF", &env.softhsm_conf)
        .env_remove("CMKP11_SERVICE")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "cmkp11d started: {err}");
    assert!(
        err.contains("service.metrics_listen `0.0.0.0:42518` is not a loopback address"),
        "{err}"
    );
}

#[test]
fn audit_records_reach_syslog_with_the_kernel_identity() {
    if !testing_cmkp11() {
        return;
    }
    let env = test_env();
    let dir = tempfile::tempdir().unwrap();
    let log_sock = dir.path().join("log.sock");
    let sink = std::os::unix::net::UnixDatagram::bind(&log_sock).unwrap();
    sink.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let extra = format!(
        "\n[audit]\nfile = \"{}\"\nsyslog = true\nsyslog_socket = \"{}\"\n",
        dir.path().join("audit.log").display(),
        log_sock.display()
    );
    let (conf, socket) = write_daemon_config_full(dir.path(), "syslog", APP_PIN, "", &extra);
    let _daemon = DaemonGuard(spawn_daemon(&conf, &socket, &env.softhsm_conf));
    // A raw client: wrong application PIN, a refused login is a warning record.
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "syslog_client", "--ignored", "--nocapture"])
        .env("CMKP11_SERVICE", format!("unix:{}", socket.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut buf = [0u8; 8192];
    let mut seen = Vec::new();
    while let Ok(n) = sink.recv(&mut buf) {
        let m = String::from_utf8_lossy(&buf[..n]).into_owned();
        let done = m.contains("\"op\":\"login\"") && m.contains("CKR_PIN_INCORRECT");
        seen.push(m);
        if done {
            break;
        }
    }
    let refused = seen
        .iter()
        .find(|m| m.contains("\"op\":\"login\"") && m.contains("CKR_PIN_INCORRECT"))
        .unwrap_or_else(|| panic!("no refused login in syslog: {seen:#?}"));
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    assert!(
        refused.starts_with("<84>cmkp11-audit["),
        "a warning, authpriv: {refused}"
    );
    assert!(refused.contains(&format!("\"uid\":{uid}")), "{refused}");
    assert!(
        refused.contains("syslog_client") || refused.contains("service_metrics"),
        "{refused}"
    );
    assert!(
        !refused.contains("wrong-pin"),
        "no PIN in a record: {refused}"
    );
}

/// Run by [`audit_records_reach_syslog_with_the_kernel_identity`] in a process of its own
/// (the module decides its mode once per process).
#[test]
#[ignore]
fn syslog_client() {
    let ctx = Pkcs11::new(module_path()).expect("load the module");
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .expect("C_Initialize in client mode");
    let slot = ctx.get_slots_with_token().unwrap()[0];
    let s = ctx.open_rw_session(slot).unwrap();
    let e = s
        .login(UserType::User, Some(&AuthPin::new("wrong-pin".into())))
        .expect_err("a wrong application PIN");
    assert_eq!(rv_of(&e), cryptoki::error::RvError::PinIncorrect);
}
