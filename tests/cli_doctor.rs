//! `cmkp11 doctor` and the capability probe behind it, driven through the built binary
//! against SoftHSM2: a complete token, a token without a login, and tokens whose
//! mechanisms SoftHSM2's own `slots.mechanisms` setting takes away (so that a real token
//! lacks a capability): the report, the exit status, and the refusal of the features
//! that need the missing capability, naming it.

mod cli_support;

use cli_support::{bin, contains, Env, PIN};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::object::Attribute;
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use serde_json::Value;
use std::process::{Command, Output, Stdio};

/// The check of `cap` in a doctor report.
fn check<'a>(report: &'a Value, cap: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["capability"] == cap)
        .unwrap_or_else(|| panic!("no check {cap} in {report:#}"))
}

/// Runs `cmkp11 doctor` without any PIN source.
fn doctor_without_pin(env: &Env, args: &[&str]) -> Output {
    Command::new(bin())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("SOFTHSM2_CONF", &env.softhsm_conf)
        .env("CMKP11_CONFIG", &env.config)
        .arg("doctor")
        .args(args)
        .current_dir(env.dir())
        .stdin(Stdio::null())
        .output()
        .expect("run cmkp11")
}

/// Takes mechanisms away from the environment's SoftHSM2 (`slots.mechanisms`; SoftHSM2
/// 2.6 ignores the first name of a `-` list, hence the leading CKM_MD5).
fn without_mechanisms(env: &Env, names: &[&str]) {
    let mut conf = std::fs::read_to_string(&env.softhsm_conf).unwrap();
    conf.push_str(&format!(
        "slots.mechanisms = -CKM_MD5,{}\n",
        names.join(",")
    ));
    std::fs::write(&env.softhsm_conf, conf).unwrap();
}

#[test]
fn softhsm2_has_every_capability_cmkp11_needs() {
    let env = Env::new();
    let r = env.json(&["doctor", "--bench-ms", "30"]);
    assert_eq!(r["ok"], true, "{r:#}");
    assert_eq!(r["family"], "softhsm2");
    assert_eq!(r["logged_in"], true);
    for c in r["checks"].as_array().unwrap() {
        assert_eq!(c["status"], "works", "{c}");
    }
    // The list tells the truth: flags and key sizes as SoftHSM2 gives them, and types
    // cryptoki does not know are kept.
    let mechs = r["mechanisms"].as_array().unwrap();
    let gcm = mechs.iter().find(|m| m["name"] == "CKM_AES_GCM").unwrap();
    assert_eq!(gcm["ty"], 0x1087);
    assert_ne!(
        gcm["flags"].as_u64().unwrap() & 0x100,
        0,
        "CKF_ENCRYPT: {gcm}"
    );
    assert_eq!(gcm["min_key"], 16);
    assert_eq!(gcm["max_key"], 32);
    assert!(mechs.iter().any(|m| m["name"] == "CKM_SHA224_RSA_PKCS"));
    let quirks: Vec<&str> = r["quirks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["name"].as_str().unwrap())
        .collect();
    assert!(quirks.contains(&"softhsm2:not-fork-aware"), "{quirks:?}");
    let rates = r["throughput"].as_array().unwrap();
    for case in [
        "aes-gcm-4k-encrypt",
        "ecdsa-p256-sign",
        "open-close-session",
    ] {
        let rate = rates.iter().find(|t| t["case"] == case).unwrap();
        assert!(rate["ops_per_s"].as_f64().unwrap() > 0.0, "{rate}");
    }
    assert!(r["probe_calls"].as_u64().unwrap() > 10);
}

#[test]
fn the_table_says_what_works_and_the_probe_leaves_nothing_behind() {
    let env = Env::new();
    let out = env.ok(&["doctor", "--bench-ms", "0"]);
    contains(&out, "CAPABILITY");
    contains(&out, "aes-kwp           works");
    contains(&out, "data-objects      works");
    contains(
        &out,
        "verdict: this token has every capability cmkp11 needs",
    );
    assert!(
        !out.contains("throughput"),
        "no throughput check asked:\n{out}"
    );
    // Every object the probe made is gone: the token is as softhsm2-util left it.
    let ctx = Pkcs11::new(cli_support::SOFTHSM).unwrap();
    std::env::set_var("SOFTHSM2_CONF", &env.softhsm_conf);
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    let slot = ctx.get_slots_with_token().unwrap()[0];
    let s = ctx.open_ro_session(slot).unwrap();
    s.login(UserType::User, Some(&AuthPin::new(PIN.into())))
        .unwrap();
    let left = s.find_objects(&[]).unwrap();
    assert!(left.is_empty(), "{} objects left in the token", left.len());
    let _ = s.find_objects(&[Attribute::Token(true)]);
}

#[test]
fn without_a_pin_it_never_prompts_and_says_what_it_did_not_try() {
    let env = Env::new();
    let out = doctor_without_pin(&env, &["--json", "--bench-ms", "0"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["logged_in"], false);
    assert_eq!(check(&r, "private-objects")["status"], "untested");
    assert_eq!(check(&r, "data-objects")["status"], "untested");
    assert_eq!(check(&r, "aes-gcm")["status"], "works");
    assert_eq!(check(&r, "session-objects")["status"], "works");
    let table = doctor_without_pin(&env, &["--bench-ms", "0"]);
    let text = String::from_utf8(table.stdout).unwrap();
    contains(&text, "give --pin-file or CMKP11_PIN");
}

#[test]
fn a_token_without_gcm_and_hmac_fails_the_check_naming_what_it_disables() {
    let env = Env::new();
    without_mechanisms(&env, &["CKM_AES_GCM", "CKM_SHA256_HMAC"]);
    let out = env.run(&["--json", "doctor", "--bench-ms", "20"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "exit status 1: something needed is missing"
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["ok"], false);
    let gcm = check(&r, "aes-gcm");
    assert_eq!(gcm["status"], "missing");
    assert_eq!(gcm["required"], true);
    contains(gcm["detail"].as_str().unwrap(), "CKM_AES_GCM not listed");
    contains(gcm["needed_by"].as_str().unwrap(), "cmkp11 encrypt");
    assert_eq!(check(&r, "hmac-sha256")["status"], "missing");
    assert_eq!(check(&r, "aes-kwp")["status"], "works");
    // The throughput check skips what does not work.
    let rates = r["throughput"].as_array().unwrap();
    assert!(rates.iter().all(|t| t["case"] != "aes-gcm-4k-encrypt"));
    let table = env.run(&["doctor", "--bench-ms", "0"]);
    assert_eq!(table.status.code(), Some(1));
    let text = String::from_utf8(table.stdout).unwrap();
    contains(&text, "aes-gcm           missing");
    contains(&text, "disables: data CMKs with AES-GCM");
    contains(&text, "verdict: capabilities cmkp11 needs are missing");
}

#[test]
fn envelope_encryption_on_a_token_without_kwp_is_refused_naming_the_capability() {
    let env = Env::new();
    env.ok(&["key", "create", "files"]);
    std::fs::write(env.path("plain"), b"some data").unwrap();
    without_mechanisms(&env, &["CKM_AES_KEY_WRAP_PAD"]);
    let err = env.fails(&["encrypt", "--key", "files", "plain", "plain.enc"]);
    contains(&err, "lacks capability `aes-kwp`");
    contains(&err, "CKM_AES_KEY_WRAP_PAD not listed");
    contains(&err, "cmkp11 doctor");
    assert!(!env.path("plain.enc").exists());
    // The rest works: a signing key can still be made and listed.
    env.ok(&["key", "create", "signer", "--type", "ec-p256"]);
    contains(&env.ok(&["key", "list"]), "signer");
}

#[test]
fn a_bad_configuration_fails_with_status_1() {
    let env = Env::new();
    std::fs::write(
        &env.config,
        "[backend]\nmodule = \"/nonexistent/libx.so\"\n",
    )
    .unwrap();
    let err = env.fails(&["doctor"]);
    contains(&err, "/nonexistent/libx.so");
}
