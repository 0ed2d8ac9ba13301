//! The AES-GCM invocation limit per CMK version (issue 15 item 4, NIST SP 800-38D): with
//! `keys.gcm_invocation_limit = 10`, the eleventh encryption under a data CMK makes the
//! daemon rotate the key (an audited `rotate` naming the limit) and encrypts with version
//! 2; what version 1 encrypted still decrypts. The counts live in the token: a daemon
//! killed with SIGKILL and started again goes on counting where the token's reservation
//! stands (never from zero), and rotates again at the limit. One test in this file: it
//! owns its token's daemons.

mod cli_support;
mod common;

use cli_support::Env;
use common::{module_path, spawn_daemon, write_daemon_config_as, DaemonGuard};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use std::path::Path;

const APP_PIN: &str = "gcm-limit-credential";

fn connect() -> (Pkcs11, Session) {
    let ctx = Pkcs11::new(module_path()).unwrap();
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    let slot = ctx.get_slots_with_token().unwrap()[0];
    let s = ctx.open_rw_session(slot).unwrap();
    s.login(UserType::User, Some(&AuthPin::new(APP_PIN.into())))
        .unwrap();
    (ctx, s)
}

fn encrypt(s: &Session, k: ObjectHandle, i: u8) -> ([u8; 12], Vec<u8>) {
    let mut iv = [i; 12];
    let ct = s
        .encrypt(
            &Mechanism::AesGcm(GcmParams::new(&mut iv, b"", 128.into()).unwrap()),
            k,
            &[i; 20],
        )
        .unwrap();
    (iv, ct)
}

fn decrypt(s: &Session, k: ObjectHandle, iv: [u8; 12], ct: &[u8]) -> Vec<u8> {
    let mut iv = iv;
    s.decrypt(
        &Mechanism::AesGcm(GcmParams::new(&mut iv, b"", 128.into()).unwrap()),
        k,
        ct,
    )
    .unwrap()
}

fn records(audit: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(audit)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The versions of the successful encryptions with `key`, in order.
fn encryptions(audit: &Path, key: &str) -> Vec<u64> {
    records(audit)
        .iter()
        .filter(|r| r["key"] == key && r["op"] == "encrypt" && r["result"] == "CKR_OK")
        .map(|r| r["version"].as_u64().unwrap())
        .collect()
}

fn rotations(audit: &Path, key: &str) -> Vec<serde_json::Value> {
    records(audit)
        .into_iter()
        .filter(|r| r["key"] == key && r["op"] == "rotate")
        .collect()
}

#[test]
fn the_gcm_invocation_counter_rotates_the_key_and_survives_restarts() {
    // The key is the operator's (the CLI on the token); applications use it.
    let env = Env::new();
    env.ok(&["key", "create", "gcm-limited", "--role", "data"]);
    let audit = env.path("audit.log");
    let extra = format!(
        "\n[audit]\nfile = \"{}\"\n\n[keys]\ngcm_invocation_limit = 10\n",
        audit.display()
    );
    let (conf, socket) = write_daemon_config_as(env.dir(), "gcm", APP_PIN, &extra);
    let mut daemon = DaemonGuard(spawn_daemon(&conf, &socket, &env.softhsm_conf));
    std::env::set_var("CMKP11_SERVICE", format!("unix:{}", socket.display()));
    let (ctx, s) = connect();
    let k = s
        .find_objects(&[Attribute::Label(b"gcm-limited".to_vec())])
        .unwrap()[0];
    // Ten encryptions with version 1.
    let mut made = Vec::new();
    for i in 0..10 {
        made.push(encrypt(&s, k, i));
    }
    assert_eq!(encryptions(&audit, "gcm-limited"), vec![1; 10]);
    assert!(rotations(&audit, "gcm-limited").is_empty());
    // The eleventh rotates the key first, and uses version 2.
    let (iv, ct) = encrypt(&s, k, 10);
    let rot = rotations(&audit, "gcm-limited");
    let done: Vec<_> = rot.iter().filter(|r| r["result"] == "CKR_OK").collect();
    assert_eq!(done.len(), 1, "{rot:?}");
    assert_eq!(done[0]["version"], 2);
    assert!(
        done[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("AES-GCM invocation limit") && r.contains("version 1")),
        "{}",
        done[0]
    );
    assert_eq!(
        encryptions(&audit, "gcm-limited"),
        [vec![1; 10], vec![2]].concat()
    );
    // Old and new ciphertexts decrypt (AES-GCM tries every enabled version).
    for (i, (iv, ct)) in made.iter().enumerate() {
        assert_eq!(decrypt(&s, k, *iv, ct), vec![i as u8; 20]);
    }
    assert_eq!(decrypt(&s, k, iv, &ct), vec![10; 20]);

    // Four more with version 2 (5 in all), then the daemon dies without a goodbye.
    for i in 11..15 {
        encrypt(&s, k, i);
    }
    drop(s);
    ctx.finalize().unwrap();
    daemon.0.kill().unwrap();
    daemon.0.wait().unwrap();
    let daemon = DaemonGuard(spawn_daemon(&conf, &socket, &env.softhsm_conf));
    let (ctx, s) = connect();
    let k = s
        .find_objects(&[Attribute::Label(b"gcm-limited".to_vec())])
        .unwrap()[0];
    // The count went on from the token's reservation (blocks of 1 at this limit): five
    // more with version 2, and the sixth rotates to version 3.
    for i in 15..20 {
        encrypt(&s, k, i);
    }
    let versions = encryptions(&audit, "gcm-limited");
    assert_eq!(
        versions.last(),
        Some(&2),
        "rotated before version 2 made 10"
    );
    encrypt(&s, k, 20);
    let versions = encryptions(&audit, "gcm-limited");
    assert_eq!(versions.iter().filter(|v| **v == 2).count(), 10);
    assert_eq!(versions.last(), Some(&3));
    assert_eq!(
        rotations(&audit, "gcm-limited")
            .iter()
            .filter(|r| r["result"] == "CKR_OK")
            .count(),
        2
    );
    // Every version still decrypts what it encrypted.
    for (i, (iv, ct)) in made.iter().enumerate() {
        assert_eq!(decrypt(&s, k, *iv, ct), vec![i as u8; 20]);
    }
    drop(s);
    drop(daemon);
    std::mem::forget(ctx);
}
