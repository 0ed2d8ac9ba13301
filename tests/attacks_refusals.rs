//! Every CMK decision is recorded (issue 17.10): each refused creation, import, copy or
//! derivation of a would-be CMK gets its exact code, an audit record naming the rule
//! (`op`, `result`, `reason`, and the label and id asked), and at `log.level = warn` one
//! log line "<function> refused: <rule>", so that an operator who sees only
//! `CKR_TEMPLATE_INCONSISTENT` in a client learns why. Refusals of session keys (DEKs)
//! get the log line and no audit record; successful key-pair generation and promotion are
//! recorded with the key's identity. Played through the built module over SoftHSM2.
//!
//! Every test is `#[serial]`: the checks read the log and the audit log from where the
//! previous check stopped.

#[macro_use]
mod common;
mod lifecycle_support;

use common::Template;
use cryptoki_sys::*;
use lifecycle_support::*;
use serial_test::serial;
use std::ffi::c_void;
use std::path::PathBuf;
use std::ptr;
use std::sync::{Mutex, OnceLock};

/// The log file and the audit log of this process.
struct Logs {
    log: PathBuf,
    audit: PathBuf,
    /// How much of each has been checked already.
    seen: Mutex<(usize, usize)>,
}

fn logs() -> &'static Logs {
    static LOGS: OnceLock<Logs> = OnceLock::new();
    LOGS.get_or_init(|| {
        let env = common::test_env();
        let log = env.dir.join("cmkp11.log");
        let audit = env.dir.join("audit.log");
        let mut text = std::fs::read_to_string(&env.cmkp11_conf).unwrap();
        text.push_str(&format!(
            "\n[log]\nlevel = \"warn\"\nfile = \"{}\"\n\n[audit]\nfile = \"{}\"\n",
            log.display(),
            audit.display()
        ));
        std::fs::write(&env.cmkp11_conf, text).unwrap();
        Logs {
            log,
            audit,
            seen: Mutex::new((0, 0)),
        }
    })
}

fn session() -> S {
    logs();
    S::user(cmk())
}

fn rv(r: CK_RV) -> Rv<()> {
    if r == CKR_OK {
        Ok(())
    } else {
        Err(r)
    }
}

/// The `CKR_*` name the audit log gives a code.
fn ckr(rv: CK_RV) -> &'static str {
    match rv {
        CKR_TEMPLATE_INCONSISTENT => "CKR_TEMPLATE_INCONSISTENT",
        CKR_ATTRIBUTE_VALUE_INVALID => "CKR_ATTRIBUTE_VALUE_INVALID",
        CKR_ATTRIBUTE_READ_ONLY => "CKR_ATTRIBUTE_READ_ONLY",
        CKR_ACTION_PROHIBITED => "CKR_ACTION_PROHIBITED",
        CKR_MECHANISM_INVALID => "CKR_MECHANISM_INVALID",
        other => panic!("no name for {other:#x} in this test"),
    }
}

/// The log lines and audit records written since the last call.
fn new_entries() -> (Vec<String>, Vec<serde_json::Value>) {
    let l = logs();
    let mut seen = l.seen.lock().unwrap();
    let log = std::fs::read_to_string(&l.log).unwrap_or_default();
    let audit = std::fs::read_to_string(&l.audit).unwrap_or_default();
    let lines = log[seen.0..].lines().map(str::to_string).collect();
    let records = audit[seen.1..]
        .lines()
        .map(|r| serde_json::from_str(r).unwrap_or_else(|e| panic!("audit record {r}: {e}")))
        .collect();
    *seen = (log.len(), audit.len());
    (lines, records)
}

/// Skips what was written so far.
fn reset() {
    new_entries();
}

/// Checks a refusal: the code, one warn line `<func> refused: <rule...>` and, when
/// `audited`, one audit record of `op` with the code and that reason (and `label` as its
/// key, when given); no such record otherwise.
#[track_caller]
fn refused<T: std::fmt::Debug>(
    r: Rv<T>,
    want: CK_RV,
    func: &str,
    rule: &str,
    audit: Option<(&str, Option<&str>)>,
) {
    expect_rv(r, want, &format!("{func} ({rule})"));
    let (lines, records) = new_entries();
    let said = format!("{func} refused: ");
    let warn: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("warn") && l.contains(&said) && l.contains(rule))
        .collect();
    assert_eq!(
        warn.len(),
        1,
        "one warn line `{said}...{rule}...` expected; the log says:\n{}",
        lines.join("\n")
    );
    let matching: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| {
            r["reason"]
                .as_str()
                .is_some_and(|w| w.starts_with(&said) && w.contains(rule))
        })
        .collect();
    match audit {
        Some((op, label)) => {
            assert_eq!(
                matching.len(),
                1,
                "one audit record of the refusal expected; new records: {records:#?}"
            );
            let rec = matching[0];
            assert_eq!(rec["op"], op, "{rec}");
            assert_eq!(rec["result"], ckr(want), "{rec}");
            if let Some(label) = label {
                assert_eq!(rec["key"], label, "{rec}");
            }
        }
        None => assert!(
            matching.is_empty(),
            "a session key's refusal is no CMK decision: {matching:#?}"
        ),
    }
}

fn generate(s: &S, t: Template) -> Rv<H> {
    s.generate_key(CKM_AES_KEY_GEN, t)
}

fn generate_pair(
    s: &S,
    mech: CK_MECHANISM_TYPE,
    mut public: Template,
    mut private: Template,
) -> Rv<(H, H)> {
    let mut pu = public.raw();
    let mut pr = private.raw();
    let mut m = Mech::new(mech).raw();
    let (mut a, mut b): (H, H) = (0, 0);
    rv(call!(
        s.m.f,
        C_GenerateKeyPair,
        s.h,
        &mut m,
        pu.as_mut_ptr(),
        pu.len() as CK_ULONG,
        pr.as_mut_ptr(),
        pr.len() as CK_ULONG,
        &mut a,
        &mut b
    ))?;
    Ok((a, b))
}

fn ec_pair(s: &S, private: Template) -> Rv<(H, H)> {
    generate_pair(
        s,
        CKM_EC_KEY_PAIR_GEN,
        Template::default()
            .bytes(CKA_EC_PARAMS, &common::P256_PARAMS)
            .boolean(CKA_TOKEN, false)
            .boolean(CKA_VERIFY, true),
        private.boolean(CKA_PRIVATE, true),
    )
}

fn copy_object(s: &S, o: H, mut t: Template) -> Rv<H> {
    let mut attrs = t.raw();
    let mut h: H = 0;
    rv(call!(
        s.m.f,
        C_CopyObject,
        s.h,
        o,
        attrs.as_mut_ptr(),
        attrs.len() as CK_ULONG,
        &mut h
    ))?;
    Ok(h)
}

fn unwrap_with(s: &S, unwrapping: H, blob: &[u8], mut t: Template) -> Rv<H> {
    let mut m = Mech::kwp().raw();
    let mut attrs = t.raw();
    let mut h: H = 0;
    rv(call!(
        s.m.f,
        C_UnwrapKey,
        s.h,
        &mut m,
        unwrapping,
        blob.as_ptr() as *mut u8,
        blob.len() as CK_ULONG,
        attrs.as_mut_ptr(),
        attrs.len() as CK_ULONG,
        &mut h
    ))?;
    Ok(h)
}

fn derive(s: &S, base: H, mut t: Template) -> Rv<H> {
    let mut point = vec![0x04, 0x41, 0x04];
    point.extend([1u8; 64]);
    let mut p = CK_ECDH1_DERIVE_PARAMS {
        kdf: CKD_NULL,
        ulSharedDataLen: 0,
        pSharedData: ptr::null_mut(),
        ulPublicDataLen: point.len() as CK_ULONG,
        pPublicData: point.as_mut_ptr(),
    };
    let mut m = CK_MECHANISM {
        mechanism: CKM_ECDH1_DERIVE,
        pParameter: &mut p as *mut _ as *mut c_void,
        ulParameterLen: std::mem::size_of::<CK_ECDH1_DERIVE_PARAMS>() as CK_ULONG,
    };
    let mut attrs = t.raw();
    let mut h: H = 0;
    rv(call!(
        s.m.f,
        C_DeriveKey,
        s.h,
        &mut m,
        base,
        attrs.as_mut_ptr(),
        attrs.len() as CK_ULONG,
        &mut h
    ))?;
    Ok(h)
}

#[test]
#[serial]
fn refused_cmk_generation_names_the_rule_in_the_log_and_the_audit_log() {
    let s = session();
    reset();
    let label = unique_label("rf-gen");
    let cmk = || aes(true).bytes(CKA_LABEL, label.as_bytes());
    refused(
        generate(&s, cmk().boolean(CKA_SENSITIVE, false)),
        CKR_TEMPLATE_INCONSISTENT,
        "C_GenerateKey",
        "a token secret key is a CMK and is always sensitive; the template asks CKA_SENSITIVE=FALSE",
        Some(("generate", Some(&label))),
    );
    refused(
        generate(&s, cmk().boolean(CKA_EXTRACTABLE, true)),
        CKR_TEMPLATE_INCONSISTENT,
        "C_GenerateKey",
        "a token secret key is a CMK and is never extractable; the template asks CKA_EXTRACTABLE=TRUE",
        Some(("generate", Some(&label))),
    );
    refused(
        generate(&s, cmk().boolean(CKA_ENCRYPT, true).boolean(CKA_WRAP, true)),
        CKR_TEMPLATE_INCONSISTENT,
        "C_GenerateKey",
        "a secret key has one role",
        Some(("generate", Some(&label))),
    );
    refused(
        generate(&s, cmk().boolean(CKA_LOCAL, true)),
        CKR_ATTRIBUTE_READ_ONLY,
        "C_GenerateKey",
        "are the token's to set",
        Some(("generate", Some(&label))),
    );
    refused(
        generate(&s, cmk().bytes(CKA_ID, b"k#cmkp11v\x00\x00\x00\x01")),
        CKR_ATTRIBUTE_VALUE_INVALID,
        "C_GenerateKey",
        "CKA_ID carries cmkp11's version tag",
        Some(("generate", Some(&label))),
    );
    refused(
        generate(&s, cmk().bytes(CKA_LABEL, b"cmkp11:state")),
        CKR_ATTRIBUTE_VALUE_INVALID,
        "C_GenerateKey",
        "cmkp11's own objects",
        Some(("generate", Some("cmkp11:state"))),
    );
    refused(
        generate(&s, aes(true).bytes(CKA_LABEL, b"caf\xe9")),
        CKR_ATTRIBUTE_VALUE_INVALID,
        "C_GenerateKey",
        "valid UTF-8",
        Some(("generate", None)),
    );
    // A name taken already: the second CMK of that label.
    let _first = ok(
        generate(&s, cmk().boolean(CKA_WRAP, true).boolean(CKA_UNWRAP, true)),
        "C_GenerateKey(CMK)",
    );
    reset();
    refused(
        generate(&s, cmk()),
        CKR_ATTRIBUTE_VALUE_INVALID,
        "C_GenerateKey",
        &format!("a CMK named `{label}` exists already"),
        Some(("generate", Some(&label))),
    );
    // Not a secret-key generation mechanism, for a token key.
    refused(
        s.generate_key(CKM_EC_KEY_PAIR_GEN, cmk()),
        CKR_MECHANISM_INVALID,
        "C_GenerateKey",
        "not a secret-key generation mechanism",
        Some(("generate", Some(&label))),
    );
}

#[test]
#[serial]
fn refused_session_keys_are_logged_but_are_no_cmk_decision() {
    let s = session();
    reset();
    // The short way (a DEK's template) and the general way name the rule too.
    refused(
        generate(&s, aes(false).boolean(CKA_SENSITIVE, false)),
        CKR_TEMPLATE_INCONSISTENT,
        "C_GenerateKey",
        "a session secret key is a DEK and is always sensitive; the template asks CKA_SENSITIVE=FALSE",
        None,
    );
    refused(
        generate(
            &s,
            aes(false).boolean(CKA_WRAP, true).boolean(CKA_UNWRAP, true),
        ),
        CKR_TEMPLATE_INCONSISTENT,
        "C_GenerateKey",
        "never wraps or unwraps",
        None,
    );
}

#[test]
#[serial]
fn refused_imports_unwraps_derivations_and_key_pairs_are_recorded() {
    let s = session();
    let kek = new_cmk(&s, Role::Wrap, &unique_label("rf-kek"), None);
    let dek = new_dek(&s);
    let blob = ok(s.wrap(&mut Mech::kwp(), kek, dek), "C_WrapKey");
    reset();
    // C_CreateObject of a token key with its value in the clear.
    let label = unique_label("rf-import");
    refused(
        s.create(
            aes(true)
                .bytes(CKA_LABEL, label.as_bytes())
                .bytes(CKA_VALUE, &[7u8; 32])
                .boolean(CKA_ENCRYPT, true)
                .boolean(CKA_DECRYPT, true),
        ),
        CKR_TEMPLATE_INCONSISTENT,
        "C_CreateObject",
        "a key's value given in the clear is known outside the token",
        Some(("import-plaintext", Some(&label))),
    );
    // C_UnwrapKey into a token key.
    let label = unique_label("rf-unwrap");
    refused(
        unwrap_with(
            &s,
            kek,
            &blob,
            Template::default()
                .ulong(CKA_CLASS, CKO_SECRET_KEY)
                .ulong(CKA_KEY_TYPE, CKK_AES)
                .boolean(CKA_TOKEN, true)
                .bytes(CKA_LABEL, label.as_bytes()),
        ),
        CKR_TEMPLATE_INCONSISTENT,
        "C_UnwrapKey",
        "an unwrapped key is always a session key (a DEK)",
        Some(("unwrap", Some(&label))),
    );
    // C_DeriveKey into a token key.
    let (_, base) = ok(
        ec_pair(
            &s,
            Template::default()
                .boolean(CKA_TOKEN, false)
                .boolean(CKA_DERIVE, true),
        ),
        "C_GenerateKeyPair(ECDH)",
    );
    reset();
    let label = unique_label("rf-derive");
    refused(
        derive(
            &s,
            base,
            Template::default()
                .ulong(CKA_CLASS, CKO_SECRET_KEY)
                .ulong(CKA_KEY_TYPE, CKK_AES)
                .ulong(CKA_VALUE_LEN, 32)
                .boolean(CKA_TOKEN, true)
                .bytes(CKA_LABEL, label.as_bytes()),
        ),
        CKR_TEMPLATE_INCONSISTENT,
        "C_DeriveKey",
        "a derived key is always a session key (a DEK)",
        Some(("derive", Some(&label))),
    );
    // C_GenerateKeyPair of a token private key that asks to be extractable.
    let label = unique_label("rf-pair");
    refused(
        ec_pair(
            &s,
            Template::default()
                .boolean(CKA_TOKEN, true)
                .boolean(CKA_SIGN, true)
                .boolean(CKA_EXTRACTABLE, true)
                .bytes(CKA_LABEL, label.as_bytes()),
        ),
        CKR_TEMPLATE_INCONSISTENT,
        "C_GenerateKeyPair",
        "a private key is a CMK and is never extractable; the template asks CKA_EXTRACTABLE=TRUE",
        Some(("generate", Some(&label))),
    );
    // The same pair without that is made, and its generation recorded with its identity.
    ok(
        ec_pair(
            &s,
            Template::default()
                .boolean(CKA_TOKEN, true)
                .boolean(CKA_SIGN, true)
                .bytes(CKA_LABEL, label.as_bytes())
                .bytes(CKA_ID, b"rf-pair-id"),
        ),
        "C_GenerateKeyPair(token EC key)",
    );
    let (_, records) = new_entries();
    let made: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["op"] == "generate" && r["result"] == "CKR_OK" && r["key"] == label)
        .collect();
    assert_eq!(made.len(), 1, "{records:#?}");
    assert_eq!(made[0]["key_id"], hex(b"rf-pair-id"), "{}", made[0]);
    assert_eq!(made[0]["mechanism"], "CKM_EC_KEY_PAIR_GEN", "{}", made[0]);
}

#[test]
#[serial]
fn refused_and_allowed_promotions_are_recorded() {
    let s = session();
    let kek = new_cmk(&s, Role::Wrap, &unique_label("rf-kek2"), None);
    let dek = new_dek(&s);
    let blob = ok(s.wrap(&mut Mech::kwp(), kek, dek), "C_WrapKey");
    let unwrapped = ok(
        unwrap_with(
            &s,
            kek,
            &blob,
            Template::default()
                .ulong(CKA_CLASS, CKO_SECRET_KEY)
                .ulong(CKA_KEY_TYPE, CKK_AES)
                .boolean(CKA_PRIVATE, true)
                .boolean(CKA_ENCRYPT, true)
                .boolean(CKA_DECRYPT, true),
        ),
        "C_UnwrapKey",
    );
    reset();
    // An unwrapped key is never promoted.
    let label = unique_label("rf-promo-u");
    refused(
        copy_object(
            &s,
            unwrapped,
            Template::default()
                .boolean(CKA_TOKEN, true)
                .bytes(CKA_LABEL, label.as_bytes()),
        ),
        CKR_ACTION_PROHIBITED,
        "C_CopyObject",
        "only a session key generated inside the token",
        Some(("promote", Some(&label))),
    );
    // A CMK is never copied.
    refused(
        copy_object(&s, kek, Template::default().boolean(CKA_TOKEN, true)),
        CKR_ACTION_PROHIBITED,
        "C_CopyObject",
        "a CMK is never copied",
        Some(("promote", None)),
    );
    // A copy that would weaken the key.
    let generated = ok(
        generate(
            &s,
            aes(false)
                .boolean(CKA_PRIVATE, true)
                .boolean(CKA_EXTRACTABLE, false)
                .boolean(CKA_ENCRYPT, true)
                .boolean(CKA_DECRYPT, true),
        ),
        "C_GenerateKey(session key)",
    );
    reset();
    refused(
        copy_object(
            &s,
            generated,
            Template::default()
                .boolean(CKA_TOKEN, true)
                .boolean(CKA_SENSITIVE, false),
        ),
        CKR_TEMPLATE_INCONSISTENT,
        "C_CopyObject",
        "never weaken it",
        Some(("promote", None)),
    );
    // The legitimate promotion: made and recorded with the new identity.
    let label = unique_label("rf-promo");
    let promoted = ok(
        copy_object(
            &s,
            generated,
            Template::default()
                .boolean(CKA_TOKEN, true)
                .bytes(CKA_LABEL, label.as_bytes())
                .bytes(CKA_ID, b"rf-promo-id"),
        ),
        "C_CopyObject(promotion)",
    );
    assert_eq!(ok(s.get(promoted, CKA_TOKEN), "CKA_TOKEN"), [CK_TRUE]);
    let (_, records) = new_entries();
    let made: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["op"] == "promote" && r["result"] == "CKR_OK")
        .collect();
    assert_eq!(made.len(), 1, "{records:#?}");
    assert_eq!(made[0]["key"], label, "{}", made[0]);
    assert_eq!(made[0]["key_id"], hex(b"rf-promo-id"), "{}", made[0]);
}
