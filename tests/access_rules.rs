//! `[[access]]` rules end to end through the module: a CMK whose label matches a rule may
//! only be used by the processes, for the operations and in the hours the rule allows;
//! everything else is refused with `CKR_KEY_FUNCTION_NOT_PERMITTED` at `*Init`, and keys
//! no rule names are unaffected.

#[macro_use]
mod common;
mod policy_support;

use cryptoki_sys::*;
use policy_support::*;
use serial_test::serial;
use std::time::{SystemTime, UNIX_EPOCH};

/// Rules for this test process (uid 0 in CI; the tests below use uids nobody has).
fn config() -> String {
    let hour = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 3600
        % 24;
    // A two-hour window that starts two hours from now: it never contains the present.
    let (a, b) = ((hour + 2) % 24, (hour + 4) % 24);
    format!(
        "[[access]]\nkeys = \"uidonly-*\"\nuids = [4242]\n\n\
         [[access]]\nkeys = \"encrypt-only-*\"\noperations = [\"encrypt\"]\n\n\
         [[access]]\nkeys = \"later-*\"\nhours_utc = \"{a:02}:00-{b:02}:00\"\n\n\
         [[access]]\nkeys = \"exe-*\"\nexecutables = [\"/usr/sbin/nginx\"]\n"
    )
}

fn s() -> S {
    init(&config());
    session()
}

fn data_key(s: &S, prefix: &str) -> H {
    ok(
        s.generate_key(
            CKM_AES_KEY_GEN,
            aes(true, 32)
                .boolean(CKA_ENCRYPT, true)
                .boolean(CKA_DECRYPT, true)
                .bytes(CKA_LABEL, &unique_label(prefix)),
        ),
        "C_GenerateKey",
    )
}

fn cbc() -> Mech {
    Mech::bytes(CKM_AES_CBC_PAD, &[3u8; 16])
}

#[test]
#[serial]
fn a_rule_naming_other_uids_denies_this_process() {
    let s = s();
    let k = data_key(&s, "uidonly");
    expect_rv(
        s.encrypt_init(&mut cbc(), k),
        CKR_KEY_FUNCTION_NOT_PERMITTED,
        "C_EncryptInit (uid not allowed)",
    );
    let free = data_key(&s, "unruled");
    ok(
        s.encrypt_init(&mut cbc(), free),
        "C_EncryptInit of a key no rule names",
    );
}

#[test]
#[serial]
fn operations_outside_the_rule_are_refused() {
    let s = s();
    let k = data_key(&s, "encrypt-only");
    let ct = ok(
        s.encrypt(&mut cbc(), k, b"allowed"),
        "C_EncryptInit + C_Encrypt (allowed operation)",
    );
    assert_eq!(ct.len(), 16);
    expect_rv(
        s.decrypt_init(&mut cbc(), k),
        CKR_KEY_FUNCTION_NOT_PERMITTED,
        "C_DecryptInit (operation not allowed)",
    );
}

#[test]
#[serial]
fn uses_outside_the_hours_are_refused() {
    let s = s();
    let k = data_key(&s, "later");
    expect_rv(
        s.encrypt_init(&mut cbc(), k),
        CKR_KEY_FUNCTION_NOT_PERMITTED,
        "C_EncryptInit (outside hours_utc)",
    );
}

#[test]
#[serial]
fn other_executables_are_refused() {
    let s = s();
    let k = data_key(&s, "exe");
    expect_rv(
        s.encrypt_init(&mut cbc(), k),
        CKR_KEY_FUNCTION_NOT_PERMITTED,
        "C_EncryptInit (executable not allowed)",
    );
}
