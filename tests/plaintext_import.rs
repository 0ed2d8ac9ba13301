//! The test-only plaintext-import switch (`[policy] allow_plaintext_import = true`), used
//! to prove that the blobs the token makes are the standard RFC 3394 / RFC 5649 ones: keys
//! whose values the test knows are imported into this throw-away token, wrapped by the
//! module, and compared with the `aes-kw` crate's output. Even with the switch on, the
//! other rules of the policy still hold for imported keys.

#[macro_use]
mod common;
mod policy_support;

use aes_kw::KekAes256;
use common::Template;
use cryptoki_sys::*;
use policy_support::*;
use serial_test::serial;

fn s() -> S {
    init("[policy]\nallow_plaintext_import = true\n");
    session()
}

/// Known 256-bit KEK and DEK (arbitrary fixed values).
const KEK: [u8; 32] = [
    0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f,
    0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, 0x19, 0x1a, 0x1b, 0x1c, 0x1d, 0x1e, 0x1f,
];
const DEK: [u8; 32] = [
    0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff,
    0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f,
];

fn import_kek(s: &S, value: &[u8]) -> H {
    ok(
        s.create_object(
            Template::default()
                .ulong(CKA_CLASS, CKO_SECRET_KEY)
                .ulong(CKA_KEY_TYPE, CKK_AES)
                .boolean(CKA_TOKEN, true)
                .boolean(CKA_WRAP, true)
                .boolean(CKA_UNWRAP, true)
                .bytes(CKA_LABEL, &unique_label("imported-kek"))
                .bytes(CKA_VALUE, value),
        ),
        "C_CreateObject(token KEK, WRAP+UNWRAP)",
    )
}

fn import_dek(s: &S, value: &[u8]) -> H {
    ok(
        s.create_object(
            Template::default()
                .ulong(CKA_CLASS, CKO_SECRET_KEY)
                .ulong(CKA_KEY_TYPE, CKK_AES)
                .boolean(CKA_TOKEN, false)
                .boolean(CKA_ENCRYPT, true)
                .boolean(CKA_DECRYPT, true)
                .boolean(CKA_EXTRACTABLE, true)
                .bytes(CKA_VALUE, value),
        ),
        "C_CreateObject(session DEK, extractable)",
    )
}

fn reference_kwp(kek: &[u8], key: &[u8]) -> Vec<u8> {
    let kek = KekAes256::try_from(kek).expect("KEK length");
    let mut out = vec![0u8; key.len().div_ceil(8) * 8 + 8];
    kek.wrap_with_padding(key, &mut out)
        .expect("aes-kw wrap_with_padding");
    out
}

fn reference_kw(kek: &[u8], key: &[u8]) -> Vec<u8> {
    let kek = KekAes256::try_from(kek).expect("KEK length");
    let mut out = vec![0u8; key.len() + 8];
    kek.wrap(key, &mut out).expect("aes-kw wrap");
    out
}

#[test]
#[serial]
fn kwp_blob_is_rfc5649() {
    let s = s();
    let kek = import_kek(&s, &KEK);
    let dek = import_dek(&s, &DEK);
    let blob = ok(
        s.wrap(&mut Mech::new(CKM_AES_KEY_WRAP_PAD), kek, dek),
        "C_WrapKey(KWP)",
    );
    assert_eq!(
        blob,
        reference_kwp(&KEK, &DEK),
        "KWP blob differs from RFC 5649"
    );
}

#[test]
#[serial]
fn kw_blob_is_rfc3394() {
    let s = s();
    let kek = import_kek(&s, &KEK);
    let dek = import_dek(&s, &DEK);
    let blob = ok(
        s.wrap(&mut Mech::new(CKM_AES_KEY_WRAP), kek, dek),
        "C_WrapKey(KW)",
    );
    assert_eq!(
        blob,
        reference_kw(&KEK, &DEK),
        "KW blob differs from RFC 3394"
    );
}

#[test]
#[serial]
fn rfc_vectors_for_other_key_lengths() {
    // AES-128 DEKs under the same KEK, KW and KWP (KWP of 16 bytes has no padding).
    let s = s();
    let kek = import_kek(&s, &KEK);
    let dek128 = import_dek(&s, &DEK[..16]);
    assert_eq!(
        ok(
            s.wrap(&mut Mech::new(CKM_AES_KEY_WRAP_PAD), kek, dek128),
            "C_WrapKey(KWP, AES-128)"
        ),
        reference_kwp(&KEK, &DEK[..16])
    );
    assert_eq!(
        ok(
            s.wrap(&mut Mech::new(CKM_AES_KEY_WRAP), kek, dek128),
            "C_WrapKey(KW, AES-128)"
        ),
        reference_kw(&KEK, &DEK[..16])
    );
}

#[test]
#[serial]
fn reference_blob_unwraps_to_the_known_key() {
    // A blob made outside the token (aes-kw) unwraps in the token, and the token's own
    // wrap of the result is the same blob again: same key, same standard.
    let s = s();
    let kek = import_kek(&s, &KEK);
    let other: Vec<u8> = (0..32u8)
        .map(|i| i.wrapping_mul(29).wrapping_add(3))
        .collect();
    for (mech, blob) in [
        (CKM_AES_KEY_WRAP_PAD, reference_kwp(&KEK, &other)),
        (CKM_AES_KEY_WRAP, reference_kw(&KEK, &other)),
    ] {
        let u = ok(
            s.unwrap(
                &mut Mech::new(mech),
                kek,
                &blob,
                Template::default()
                    .ulong(CKA_CLASS, CKO_SECRET_KEY)
                    .ulong(CKA_KEY_TYPE, CKK_AES)
                    .boolean(CKA_ENCRYPT, true)
                    .boolean(CKA_DECRYPT, true)
                    .boolean(CKA_EXTRACTABLE, true),
            ),
            "C_UnwrapKey(reference blob)",
        );
        assert_eq!(s.get_ulong(u, CKA_VALUE_LEN), 32);
        assert_eq!(
            ok(s.wrap(&mut Mech::new(mech), kek, u), "C_WrapKey(unwrapped)"),
            blob,
            "re-wrap of the unwrapped key"
        );
        assert_unreadable(&s, u, CKA_VALUE, "unwrapped DEK");
    }
}

#[test]
#[serial]
fn imported_keys_still_obey_the_policy() {
    let s = s();
    let kek = import_kek(&s, &KEK);
    // Imported CMK: sensitive, not extractable, roles fixed, value unreadable.
    assert!(
        s.get_bool(kek, CKA_SENSITIVE),
        "imported KEK (a CMK) is not SENSITIVE"
    );
    assert!(
        !s.get_bool(kek, CKA_EXTRACTABLE),
        "imported KEK (a CMK) is EXTRACTABLE"
    );
    assert_usage(&s, kek, &[CKA_WRAP, CKA_UNWRAP], "imported KEK");
    assert_unreadable(&s, kek, CKA_VALUE, "imported KEK");
    expect_rv(
        s.set_attrs(kek, Template::default().boolean(CKA_DECRYPT, true)),
        CKR_ATTRIBUTE_READ_ONLY,
        "C_SetAttributeValue(imported KEK, DECRYPT=TRUE)",
    );
    expect_rv(
        s.decrypt_init(&mut Mech::new(CKM_AES_ECB), kek),
        CKR_KEY_FUNCTION_NOT_PERMITTED,
        "C_DecryptInit(ECB, imported KEK)",
    );
    let base = || {
        Template::default()
            .ulong(CKA_CLASS, CKO_SECRET_KEY)
            .ulong(CKA_KEY_TYPE, CKK_AES)
            .bytes(CKA_VALUE, &KEK)
    };
    let cases: Vec<(&str, Template, CK_RV)> = vec![
        (
            "token WRAP+DECRYPT",
            base()
                .boolean(CKA_TOKEN, true)
                .boolean(CKA_WRAP, true)
                .boolean(CKA_DECRYPT, true),
            CKR_TEMPLATE_INCONSISTENT,
        ),
        (
            "token SENSITIVE=FALSE",
            base()
                .boolean(CKA_TOKEN, true)
                .boolean(CKA_WRAP, true)
                .boolean(CKA_SENSITIVE, false),
            CKR_TEMPLATE_INCONSISTENT,
        ),
        (
            "token EXTRACTABLE=TRUE",
            base()
                .boolean(CKA_TOKEN, true)
                .boolean(CKA_ENCRYPT, true)
                .boolean(CKA_EXTRACTABLE, true),
            CKR_TEMPLATE_INCONSISTENT,
        ),
        (
            "session WRAP",
            base().boolean(CKA_TOKEN, false).boolean(CKA_WRAP, true),
            CKR_TEMPLATE_INCONSISTENT,
        ),
        (
            "session DERIVE",
            base().boolean(CKA_TOKEN, false).boolean(CKA_DERIVE, true),
            CKR_TEMPLATE_INCONSISTENT,
        ),
        (
            "session SENSITIVE=FALSE",
            base()
                .boolean(CKA_TOKEN, false)
                .boolean(CKA_ENCRYPT, true)
                .boolean(CKA_SENSITIVE, false),
            CKR_TEMPLATE_INCONSISTENT,
        ),
        (
            "token TRUSTED=TRUE",
            base()
                .boolean(CKA_TOKEN, true)
                .boolean(CKA_WRAP, true)
                .boolean(CKA_TRUSTED, true),
            CKR_ATTRIBUTE_READ_ONLY,
        ),
        (
            "token LOCAL=TRUE",
            base()
                .boolean(CKA_TOKEN, true)
                .boolean(CKA_WRAP, true)
                .boolean(CKA_LOCAL, true),
            CKR_ATTRIBUTE_READ_ONLY,
        ),
    ];
    for (name, t, want) in cases {
        expect_rv(
            s.create_object(t),
            want,
            &format!("C_CreateObject({name}) with the import switch on"),
        );
    }
    // Imported DEK: sensitive, never a wrapping key; cannot be wrapped by a weaker CMK.
    let dek = import_dek(&s, &DEK);
    assert!(
        s.get_bool(dek, CKA_SENSITIVE),
        "imported DEK is not SENSITIVE"
    );
    assert_unreadable(&s, dek, CKA_VALUE, "imported DEK");
    let other = import_dek(&s, &DEK[..16]);
    expect_rv(
        s.wrap(&mut Mech::new(CKM_AES_KEY_WRAP_PAD), dek, other),
        CKR_KEY_FUNCTION_NOT_PERMITTED,
        "C_WrapKey(wrapping key = imported DEK)",
    );
    let kek128 = import_kek(&s, &KEK[..16]);
    expect_rv(
        s.wrap(&mut Mech::new(CKM_AES_KEY_WRAP_PAD), kek128, dek),
        CKR_WRAPPING_KEY_SIZE_RANGE,
        "C_WrapKey(AES-128 KEK, AES-256 DEK)",
    );
}
