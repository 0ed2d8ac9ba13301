//! The audit log written by the module itself, as an application drives it: every CMK use,
//! refusal, login (good and bad), lifecycle step and session close is recorded, the log
//! verifies, and no PIN or key byte ever appears in it.
//!
//! This binary makes its own token with distinctive PINs (so a search for them in the log
//! cannot hit a timestamp by chance) and imports keys whose values the test knows (the
//! test-only plaintext-import switch), then searches the log for those secrets in raw,
//! hex and base64 form.

mod common;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use std::process::Command;

const USER_PIN: &str = "Upin-7Qz3-Xw9K";
const SO_PIN: &str = "Sopin-4Lr8-Vn2M";
const WRONG_PIN: &str = "Wrong-6Jc1-Ht5P";
const KEK: [u8; 32] = [
    0xa7, 0x31, 0x5c, 0xe2, 0x09, 0x6b, 0xd4, 0x88, 0x1f, 0x73, 0xc6, 0x2a, 0x95, 0x0e, 0xb1, 0x44,
    0x6d, 0xf9, 0x38, 0x52, 0xae, 0x17, 0xcb, 0x60, 0x8e, 0x23, 0xf5, 0x49, 0x3c, 0x9a, 0x06, 0xd7,
];
const DATA_KEY: [u8; 16] = [
    0x3e, 0x91, 0xc4, 0x58, 0x0b, 0xfa, 0x66, 0x2d, 0xe7, 0x14, 0x89, 0xb3, 0x50, 0xcf, 0x7a, 0x21,
];

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn base64(b: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in b.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..=c.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

#[test]
fn the_module_records_every_decision_and_never_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("tokens")).unwrap();
    let softhsm = d.join("softhsm2.conf");
    std::fs::write(
        &softhsm,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            d.join("tokens").display()
        ),
    )
    .unwrap();
    let st = Command::new("softhsm2-util")
        .env("SOFTHSM2_CONF", &softhsm)
        .args([
            "--init-token",
            "--free",
            "--label",
            "audit-test",
            "--so-pin",
            SO_PIN,
            "--pin",
            USER_PIN,
        ])
        .output()
        .expect("softhsm2-util");
    assert!(st.status.success(), "init-token: {st:?}");
    let log = d.join("audit.log");
    let conf = d.join("cmkp11.toml");
    std::fs::write(
        &conf,
        format!(
            "[backend]\nmodule = \"{}\"\n[policy]\nallow_plaintext_import = true\n[audit]\nfile = \"{}\"\n",
            common::SOFTHSM_MODULE,
            log.display()
        ),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    // SAFETY-free: this test binary is single-threaded at this point and sets the
    // environment before the module reads it.
    std::env::set_var("SOFTHSM2_CONF", &softhsm);
    std::env::set_var("CMKP11_CONFIG", &conf);

    let p = Pkcs11::new(common::module_path()).unwrap();
    p.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    let slot = p.get_slots_with_token().unwrap()[0];
    let s = p.open_rw_session(slot).unwrap();
    assert!(s
        .login(UserType::User, Some(&AuthPin::new(WRONG_PIN.into())))
        .is_err());
    s.login(UserType::User, Some(&AuthPin::new(USER_PIN.into())))
        .unwrap();

    let secret = |label: &str, value: &[u8], token: bool, usage: [Attribute; 2]| {
        let mut t = vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Token(token),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Value(value.to_vec()),
        ];
        t.extend(usage);
        s.create_object(&t).unwrap()
    };
    let kek = secret(
        "audit-kek",
        &KEK,
        true,
        [Attribute::Wrap(true), Attribute::Unwrap(true)],
    );
    let data = secret(
        "audit-data",
        &DATA_KEY,
        true,
        [Attribute::Encrypt(true), Attribute::Decrypt(true)],
    );
    let dek = s
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::ValueLen(32.into()),
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
            ],
        )
        .unwrap();
    let blob = s.wrap_key(&Mechanism::AesKeyWrapPad, kek, dek).unwrap();
    let dek2 = s
        .unwrap_key(
            &Mechanism::AesKeyWrapPad,
            kek,
            &blob,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
            ],
        )
        .unwrap();
    let mut iv = [1u8; 12];
    let ct = s
        .encrypt(
            &Mechanism::AesGcm(GcmParams::new(&mut iv, b"", 128.into()).unwrap()),
            data,
            b"table key",
        )
        .unwrap();
    assert_eq!(ct.len(), 9 + 16);
    // DEK uses are counted, not logged one by one.
    for _ in 0..3 {
        let mut iv = [2u8; 12];
        s.encrypt(
            &Mechanism::AesGcm(GcmParams::new(&mut iv, b"", 128.into()).unwrap()),
            dek2,
            b"bulk",
        )
        .unwrap();
    }
    // A refusal is recorded with its reason.
    assert!(s
        .encrypt(&Mechanism::AesCbcPad([0; 16]), kek, b"x")
        .is_err());
    // A lifecycle step: C_DestroyObject schedules the CMK's deletion.
    s.destroy_object(data).unwrap();
    s.logout().unwrap();
    s.close().unwrap();
    p.finalize().unwrap();

    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let has = |op: &str, result: &str| lines.iter().any(|r| r["op"] == op && r["result"] == result);
    assert!(has("login", "CKR_PIN_INCORRECT"), "failed login recorded");
    assert!(has("login", "CKR_OK"), "login recorded");
    // The logout is recorded and covered by a token MAC while the login lasts: the audit
    // key is a private object, unusable once the user is logged out.
    let at = lines
        .iter()
        .position(|r| r["op"] == "logout")
        .expect("logout recorded");
    assert_eq!(lines[at]["result"], "CKR_OK");
    let next = &lines[at + 1];
    assert_eq!(next["op"], "checkpoint", "{next}");
    assert!(
        next["mac"].is_string(),
        "a MACed checkpoint follows the logout: {next}"
    );
    assert!(
        has("wrap", "CKR_OK") && has("unwrap", "CKR_OK") && has("encrypt", "CKR_OK"),
        "CMK uses recorded"
    );
    assert!(
        has("encrypt", "CKR_KEY_FUNCTION_NOT_PERMITTED"),
        "refusal recorded"
    );
    assert!(
        lines.iter().any(|r| r["op"] == "encrypt"
            && r["result"] != "CKR_OK"
            && r["reason"].as_str().is_some_and(|x| !x.is_empty())),
        "refusal carries its reason"
    );
    assert!(
        has("schedule-deletion", "CKR_OK"),
        "lifecycle step recorded"
    );
    let wrap = lines.iter().find(|r| r["op"] == "wrap").unwrap();
    assert_eq!(wrap["key"], "audit-kek");
    assert_eq!(wrap["mechanism"], "CKM_AES_KEY_WRAP_PAD");
    // The DEK's bulk use: counted in the session-close record, never one record per use.
    let close = lines
        .iter()
        .find(|r| r["op"] == "session-close")
        .expect("session-close record");
    assert_eq!(close["bulk"]["encrypt"], 3, "{close}");
    assert_eq!(
        lines
            .iter()
            .filter(|r| r["op"] == "encrypt" && r["key"] != "audit-data" && r["result"] == "CKR_OK")
            .count(),
        0
    );

    // Never a PIN or a key byte, in any encoding.
    let raw = std::fs::read(&log).unwrap();
    for pin in [USER_PIN, SO_PIN, WRONG_PIN] {
        assert!(!text.contains(pin), "a PIN is in the audit log");
    }
    for key in [&KEK[..], &DATA_KEY[..]] {
        assert!(
            !raw.windows(key.len()).any(|w| w == key),
            "raw key bytes in the audit log"
        );
        for form in [hex(key), hex(key).to_uppercase(), base64(key)] {
            assert!(!text.contains(&form), "key bytes ({form}) in the audit log");
        }
    }
    let report = cmkp11::audit::verify(&log, None);
    assert!(report.ok(), "{report:?}");
}
