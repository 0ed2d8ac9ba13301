//! cmkp11's lifecycle records are authenticated (issue 17.4): each state record carries
//! the HMAC of its value under a token key of cmkp11's (`cmkp11:meta-mac`: private,
//! sensitive, never extractable, sign/verify only). A record made around cmkp11 (a
//! `CKO_DATA` object with the right label, written through SoftHSM2 directly with the
//! user PIN) does not verify: it is ignored, logged at error, recorded in the audit log,
//! and its key fails closed (disabled) until an operator sets its state again. A token
//! written by an earlier build (records without authentication) keeps its keys closed
//! until the audited `cmkp11 key migrate`. The legitimate flows keep working.
//!
//! Every test is `#[serial]` (one token; the migration test removes the metadata key).

#[macro_use]
mod common;
mod lifecycle_support;

use common::Template;
use cryptoki_sys::*;
use lifecycle_support::*;
use serial_test::serial;
use std::path::PathBuf;
use std::sync::OnceLock;

/// The log file and audit log of this test process (and of the CLI it runs).
struct Files {
    log: PathBuf,
    audit: PathBuf,
    pin: PathBuf,
}

fn files() -> &'static Files {
    static F: OnceLock<Files> = OnceLock::new();
    F.get_or_init(|| {
        let env = common::test_env();
        let f = Files {
            log: env.dir.join("cmkp11.log"),
            audit: env.dir.join("audit.log"),
            pin: env.dir.join("pin"),
        };
        if child_role().is_none() {
            let mut text = std::fs::read_to_string(&env.cmkp11_conf).unwrap();
            text.push_str(&format!(
                "\n[log]\nlevel = \"warn\"\nfile = \"{}\"\n\n[audit]\nfile = \"{}\"\n",
                f.log.display(),
                f.audit.display()
            ));
            std::fs::write(&env.cmkp11_conf, text).unwrap();
            std::fs::write(&f.pin, format!("{}\n", common::USER_PIN)).unwrap();
        }
        f
    })
}

fn session() -> S {
    files();
    S::user(cmk())
}

/// Child-process entry point (see `lifecycle_support`); not a test of its own.
#[test]
#[ignore = "entry point of child processes spawned by the other tests"]
fn child_entry() {
    let Some(role) = child_role() else { return };
    if direct_child(&role) {
        return;
    }
    let s = S::user(softhsm());
    match role.as_str() {
        "forge" => {
            // The next generation of the key's record, enabled, made around cmkp11: with
            // a made-up tag (`LC_TAG` = "bad") or none.
            let recs = direct_key_records(&s, &arg("LC_ID"));
            let (_, newest) = recs
                .iter()
                .max_by_key(|(_, j)| j["generation"].as_u64().unwrap_or(0))
                .expect("a record to forge from");
            let mut next = newest.clone();
            next["state"] = "enabled".into();
            next["generation"] = (newest["generation"].as_u64().unwrap() + 1).into();
            let mut t = Template::default()
                .ulong(CKA_CLASS, CKO_DATA)
                .boolean(CKA_TOKEN, true)
                .boolean(CKA_PRIVATE, true)
                .bytes(CKA_APPLICATION, APPLICATION.as_bytes())
                .bytes(CKA_LABEL, STATE_LABEL.as_bytes())
                .bytes(CKA_VALUE, &serde_json::to_vec(&next).unwrap());
            if arg("LC_TAG") == "bad" {
                t = t.bytes(CKA_OBJECT_ID, &[0x5a; 32]);
            }
            ok(s.create(t), "create the forged record");
            say("forged");
        }
        "meta" => {
            let k = ok(s.find_label(META_MAC_LABEL), "find the metadata key");
            say(&format!("keys {}", k.len()));
            if let Some(&k) = k.first() {
                for (name, a) in [
                    ("private", CKA_PRIVATE),
                    ("sensitive", CKA_SENSITIVE),
                    ("extractable", CKA_EXTRACTABLE),
                    ("sign", CKA_SIGN),
                    ("verify", CKA_VERIFY),
                    ("encrypt", CKA_ENCRYPT),
                    ("modifiable", CKA_MODIFIABLE),
                    ("copyable", CKA_COPYABLE),
                ] {
                    say(&format!("{name} {}", ok(s.get(k, a), name)[0]));
                }
            }
            let tags: Vec<String> = direct_key_records(&s, &arg("LC_ID"))
                .iter()
                .map(|(o, _)| {
                    s.get(*o, CKA_OBJECT_ID)
                        .unwrap_or_default()
                        .len()
                        .to_string()
                })
                .collect();
            say(&format!("tags {}", tags.join(",")));
        }
        "drop-meta" => {
            // What a token of an earlier build looks like: records, no metadata key.
            for k in ok(s.find_label(META_MAC_LABEL), "find the metadata key") {
                ok(s.destroy(k), "destroy the metadata key");
            }
            say("dropped");
        }
        other => panic!("unknown child role {other}"),
    }
}

fn lines(role: &str, id: &[u8], tag: &str) -> Vec<String> {
    run_child(role, &[("LC_ID", hex(id)), ("LC_TAG", tag.to_string())])
}

fn encrypt(s: &S, k: H) -> Rv<Vec<u8>> {
    s.encrypt(&mut Mech::gcm(&[3; 12], b""), k, b"row")
}

/// Waits until this process's keystore view is older than its refresh period.
fn let_the_view_refresh() {
    std::thread::sleep(std::time::Duration::from_millis(1100));
}

fn audit_records() -> Vec<serde_json::Value> {
    std::fs::read_to_string(&files().audit)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn log_text() -> String {
    std::fs::read_to_string(&files().log).unwrap_or_default()
}

#[test]
#[serial]
fn records_are_authenticated_and_the_lifecycle_still_works() {
    let s = session();
    let id = b"ma-legit".to_vec();
    let k = new_cmk(&s, Role::Data, &unique_label("ma-legit"), Some(&id));
    ok(encrypt(&s, k), "C_Encrypt");
    ok(s.disable(k), "disable");
    expect_rv(encrypt(&s, k), CKR_KEY_FUNCTION_NOT_PERMITTED, "disabled");
    ok(s.enable(k), "enable");
    ok(encrypt(&s, k), "C_Encrypt after enable");
    let l = lines("meta", &id, "");
    for want in [
        "keys 1",
        "private 1",
        "sensitive 1",
        "extractable 0",
        "sign 1",
        "verify 1",
        "encrypt 0",
        "modifiable 0",
        "copyable 0",
        "tags 32",
    ] {
        assert!(l.iter().any(|x| x == want), "`{want}` in {l:?}");
    }
}

#[test]
#[serial]
fn a_forged_state_record_is_ignored_audited_and_the_key_fails_closed() {
    let s = session();
    for (n, tag) in ["bad", "none"].iter().enumerate() {
        let id = format!("ma-forged-{n}").into_bytes();
        let label = unique_label("ma-forged");
        let k = new_cmk(&s, Role::Data, &label, Some(&id));
        ok(s.disable(k), "disable");
        // The insider re-enables the key with a record of his own, through SoftHSM2.
        let forged = lines("forge", &id, tag);
        assert!(forged.iter().any(|l| l == "forged"), "{forged:?}");
        let_the_view_refresh();
        expect_rv(
            encrypt(&s, k),
            CKR_KEY_FUNCTION_NOT_PERMITTED,
            "C_EncryptInit under a key whose newest record is forged",
        );
        assert_eq!(
            s.ulong(k, CKA_CMKP11_STATE),
            STATE_DISABLED,
            "the forged record's state"
        );
        let recorded = audit_records().into_iter().any(|r| {
            r["op"] == "record-refused"
                && r["key_id"] == hex(&id)
                && r["result"] == "CKR_SIGNATURE_INVALID"
        });
        assert!(recorded, "no record-refused audit record for {label}");
        assert!(
            log_text().contains(&format!("key `{label}`: a state record does not verify")),
            "no error line for {label}"
        );
        // The operator sets the state again: the forged record is gone, the key works.
        ok(s.enable(k), "enable");
        ok(encrypt(&s, k), "C_Encrypt after the operator's enable");
        let l = lines("meta", &id, "");
        assert!(
            l.iter().any(|x| x == "tags 32"),
            "only cmkp11's record is left: {l:?}"
        );
    }
}

#[test]
#[serial]
fn an_unauthenticated_token_fails_closed_until_migrated() {
    let s = session();
    let id = b"ma-old".to_vec();
    let label = unique_label("ma-old");
    let k = new_cmk(&s, Role::Data, &label, Some(&id));
    ok(s.disable(k), "disable");
    ok(s.enable(k), "enable");
    ok(encrypt(&s, k), "C_Encrypt");
    // The token as an earlier build left it: records, no metadata key.
    let dropped = lines("drop-meta", &id, "");
    assert!(dropped.iter().any(|l| l == "dropped"), "{dropped:?}");
    let_the_view_refresh();
    expect_rv(
        encrypt(&s, k),
        CKR_KEY_FUNCTION_NOT_PERMITTED,
        "C_EncryptInit before the migration",
    );
    assert!(
        log_text().contains(&format!(
            "key `{label}`: its state record is not authenticated (written by an earlier cmkp11): the key is not used until an operator runs `cmkp11 key migrate` once"
        )),
        "no error line naming the migration"
    );
    // Nothing changes a key's state before the migration.
    expect_rv(
        s.disable(k),
        CKR_FUNCTION_FAILED,
        "disable before the migration",
    );
    // The operator's step, audited.
    let env = common::test_env();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cmkp11"))
        .env("SOFTHSM2_CONF", &env.softhsm_conf)
        .env("CMKP11_CONFIG", &env.cmkp11_conf)
        .arg("--pin-file")
        .arg(&files().pin)
        .args(["key", "migrate"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run cmkp11 key migrate");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "cmkp11 key migrate: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("authenticated the state record of key `{label}`")),
        "{stdout}"
    );
    assert!(
        audit_records()
            .iter()
            .any(|r| r["op"] == "migrate" && r["key_id"] == hex(&id) && r["result"] == "CKR_OK"),
        "no migrate audit record"
    );
    let_the_view_refresh();
    ok(encrypt(&s, k), "C_Encrypt after the migration");
    // Once only: a record that does not verify later is nobody's to bless.
    let again = std::process::Command::new(env!("CARGO_BIN_EXE_cmkp11"))
        .env("SOFTHSM2_CONF", &env.softhsm_conf)
        .env("CMKP11_CONFIG", &env.cmkp11_conf)
        .arg("--pin-file")
        .arg(&files().pin)
        .args(["key", "migrate"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run cmkp11 key migrate");
    assert!(!again.status.success(), "a second migration succeeded");
}
