//! Usage policies evaluated in the daemon (issue 15 item 4): a `[[rate_limit]]` caps the
//! decryptions and unwraps per minute of a key by one client uid. Over the limit a use is
//! refused with `CKR_FUNCTION_FAILED` (refused for now, not forever), audited with the
//! rule in the reason and logged at warn; uses the rule does not count (encryption,
//! other keys) go on; a client that reconnects (a new context) gets no fresh budget. The
//! `[[access]]` rules are the daemon's too (`tests/service.rs`, `tests/service_preload.rs`).
//! One test in this file: it owns its token's daemon.

mod cli_support;
mod common;

use cli_support::Env;
use common::{hash_pin, module_path, spawn_daemon, write_daemon_config_as, DaemonGuard};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;

const APP_PIN: &str = "rate-limit-credential";
/// Another application's uid and credential (the child run with `setpriv`).
const OTHER_UID: u32 = 64_210;
const OTHER_PIN: &str = "rate-limit-other-credential";
const CHILD_ENV: &str = "CMKP11_TEST_RATE_CHILD";

fn login(ctx: &Pkcs11) -> Session {
    let slot = ctx.get_slots_with_token().unwrap()[0];
    let s = ctx.open_rw_session(slot).unwrap();
    s.login(UserType::User, Some(&AuthPin::new(APP_PIN.into())))
        .unwrap();
    s
}

fn find(s: &Session, label: &str) -> ObjectHandle {
    s.find_objects(&[Attribute::Label(label.as_bytes().to_vec())])
        .unwrap()[0]
}

fn gcm(iv: &mut [u8; 12]) -> Mechanism<'_> {
    Mechanism::AesGcm(GcmParams::new(iv, b"aad", 128.into()).unwrap())
}

fn encrypt(s: &Session, k: ObjectHandle, data: &[u8]) -> cryptoki::error::Result<Vec<u8>> {
    let mut iv = [3u8; 12];
    s.encrypt(&gcm(&mut iv), k, data)
}

fn decrypt(s: &Session, k: ObjectHandle, ct: &[u8]) -> cryptoki::error::Result<Vec<u8>> {
    let mut iv = [3u8; 12];
    s.decrypt(&gcm(&mut iv), k, ct)
}

fn dek_template() -> Vec<Attribute> {
    vec![
        Attribute::Class(cryptoki::object::ObjectClass::SECRET_KEY),
        Attribute::KeyType(cryptoki::object::KeyType::AES),
        Attribute::Token(false),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
    ]
}

fn refused(r: cryptoki::error::Result<impl std::fmt::Debug>) {
    match r {
        Err(Error::Pkcs11(RvError::FunctionFailed, _)) => {}
        other => panic!("expected CKR_FUNCTION_FAILED (rate limit), got {other:?}"),
    }
}

#[test]
fn a_client_over_its_rate_limit_is_refused_and_audited() {
    // The keys are the operator's (the CLI on the token); applications use them.
    let env = Env::new();
    env.ok(&["key", "create", "rl-payments", "--role", "data"]);
    env.ok(&["key", "create", "rl-wrap", "--role", "wrap"]);
    env.ok(&["key", "create", "free-data", "--role", "data"]);
    let audit = env.path("audit.log");
    let extra = format!(
        "\n[audit]\nfile = \"{}\"\n\n[[rate_limit]]\nkeys = \"rl-*\"\noperations = [\"decrypt\", \"unwrap\"]\nper_minute = 3\n",
        audit.display()
    );
    // Another client uid, for the child run under it (its socket must be reachable).
    let public = tempfile::Builder::new()
        .prefix("cmkp11-rl-")
        .tempdir()
        .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(public.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let extra = format!(
        "{extra}\n[[clients]]\nname = \"other\"\nuids = [{OTHER_UID}]\npin_hash = \"{}\"\n",
        hash_pin(OTHER_PIN)
    );
    let (conf, socket) = write_daemon_config_as(public.path(), "rl", APP_PIN, &extra);
    let daemon = DaemonGuard(spawn_daemon(&conf, &socket, &env.softhsm_conf));
    std::env::set_var("CMKP11_SERVICE", format!("unix:{}", socket.display()));
    let ctx = Pkcs11::new(module_path()).unwrap();
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    let s = login(&ctx);
    let data = find(&s, "rl-payments");
    let wrap = find(&s, "rl-wrap");
    let free = find(&s, "free-data");

    // The legitimate flow: three decryptions a minute.
    let ct = encrypt(&s, data, b"card 4111").unwrap();
    for _ in 0..3 {
        assert_eq!(decrypt(&s, data, &ct).unwrap(), b"card 4111");
    }
    // The fourth is refused, for that key and operation only.
    refused(decrypt(&s, data, &ct));
    encrypt(&s, data, b"more").expect("encryption is not limited");
    let ct_free = encrypt(&s, free, b"x").unwrap();
    for _ in 0..5 {
        decrypt(&s, free, &ct_free).expect("a key no rule names is not limited");
    }

    // Unwrap has its own bucket (per key): three, then refused.
    let dek = s
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Token(false),
                Attribute::ValueLen(32.into()),
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
                Attribute::Extractable(true),
            ],
        )
        .unwrap();
    let blob = s.wrap_key(&Mechanism::AesKeyWrapPad, wrap, dek).unwrap();
    for _ in 0..3 {
        s.unwrap_key(&Mechanism::AesKeyWrapPad, wrap, &blob, &dek_template())
            .unwrap();
    }
    refused(s.unwrap_key(&Mechanism::AesKeyWrapPad, wrap, &blob, &dek_template()));

    // A new connection and login (another context of the same uid): no fresh budget.
    drop(s);
    ctx.finalize().unwrap();
    let ctx = Pkcs11::new(module_path()).unwrap();
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    let s = login(&ctx);
    refused(decrypt(&s, find(&s, "rl-payments"), &ct));

    // Another client (uid) has its own budget for the same key: three, then refused.
    let other = other_client(&socket, &ct);
    if let Some(said) = &other {
        assert!(said.contains("decrypts: ok ok ok refused"), "{said}");
    }

    // Audited: each refusal names the key, the operation, the rule and the uid.
    let text = std::fs::read_to_string(&audit).unwrap();
    let recs: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    let refusals: Vec<_> = recs
        .iter()
        .filter(|r| r["result"] == "CKR_FUNCTION_FAILED" && r["uid"] == uid)
        .collect();
    if other.is_some() {
        let theirs: Vec<_> = recs
            .iter()
            .filter(|r| r["result"] == "CKR_FUNCTION_FAILED" && r["uid"] == OTHER_UID)
            .collect();
        assert_eq!(theirs.len(), 1, "{text}");
        assert_eq!(theirs[0]["key"], "rl-payments");
        assert!(theirs[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains(&format!("uid {OTHER_UID}"))));
    }
    let of = |key: &str, op: &str| {
        refusals
            .iter()
            .filter(|r| r["key"] == key && r["op"] == op)
            .count()
    };
    assert_eq!(of("rl-payments", "decrypt"), 2, "{text}");
    assert_eq!(of("rl-wrap", "unwrap"), 1, "{text}");
    assert_eq!(refusals.len(), 3, "{text}");
    for r in &refusals {
        assert_eq!(r["uid"], uid, "{r}");
        let reason = r["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains("rate_limit[0]") && reason.contains(&format!("uid {uid}")),
            "{r}"
        );
    }
    let ok_decrypts = recs
        .iter()
        .filter(|r| {
            r["key"] == "rl-payments"
                && r["op"] == "decrypt"
                && r["result"] == "CKR_OK"
                && r["uid"] == uid
        })
        .count();
    assert_eq!(ok_decrypts, 3, "{text}");
    // The daemon's log names the rule at warn level.
    let log = std::fs::read_to_string(conf.with_extension("log")).unwrap();
    assert!(
        log.lines().any(|l| l.contains("warn:")
            && l.contains("rl-payments")
            && l.contains("rate_limit[0]")),
        "{log}"
    );
    drop(s);
    drop(daemon);
    std::mem::forget(ctx);
}

/// Runs [`other_application`] under [`OTHER_UID`] (`setpriv`, root only): its output, or
/// `None` when this process cannot switch uids and `CMKP11_TEST_NO_ROOT=1` says to skip.
fn other_client(socket: &std::path::Path, ct: &[u8]) -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root || !std::path::Path::new("/usr/bin/setpriv").exists() {
        if std::env::var_os("CMKP11_TEST_NO_ROOT").is_some_and(|v| v == "1") {
            eprintln!("SKIPPED: the second client uid needs root and setpriv");
            return None;
        }
        panic!("a second client uid is run with `setpriv --reuid`: run as root (or set CMKP11_TEST_NO_ROOT=1 to skip that part)");
    }
    let hex: String = ct.iter().map(|b| format!("{b:02x}")).collect();
    let out = std::process::Command::new("setpriv")
        .arg(format!("--reuid={OTHER_UID}"))
        .arg(format!("--regid={OTHER_UID}"))
        .arg("--clear-groups")
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", "other_application", "--ignored", "--nocapture"])
        .env(CHILD_ENV, hex)
        .env("CMKP11_SERVICE", format!("unix:{}", socket.display()))
        .env_remove("CMKP11_CONFIG")
        .current_dir("/")
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the other application: {said}");
    Some(said)
}

/// The other application (run by the test above under another uid).
#[test]
#[ignore = "run by a_client_over_its_rate_limit_is_refused_and_audited"]
fn other_application() {
    let Some(hex) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let hex = hex.to_string_lossy().into_owned();
    let ct: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    let ctx = Pkcs11::new(module_path()).unwrap();
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    let slot = ctx.get_slots_with_token().unwrap()[0];
    let s = ctx.open_rw_session(slot).unwrap();
    s.login(UserType::User, Some(&AuthPin::new(OTHER_PIN.into())))
        .unwrap();
    let k = find(&s, "rl-payments");
    let mut said = Vec::new();
    for _ in 0..4 {
        said.push(match decrypt(&s, k, &ct) {
            Ok(p) if p == b"card 4111" => "ok",
            Err(Error::Pkcs11(RvError::FunctionFailed, _)) => "refused",
            other => panic!("{other:?}"),
        });
    }
    println!("decrypts: {}", said.join(" "));
    std::mem::forget(ctx);
}
