//! The CMK policy under attack: the published PKCS#11 key-extraction attacks, each tried
//! the way an attacker holding the user PIN would try it, through the built module over a
//! real SoftHSM2 token (no mocks), with the exact refusal of the policy contract
//! (`notes/policy.md`, DESIGN.md §4) asserted. Next to each attack, a legitimate use of the
//! same functions proves the rule does not break real flows.
//!
//! Catalogue covered (test names carry the reference):
//! - Clulow, "On the security of PKCS#11", CHES 2003: wrap/decrypt, weaker-key wrap,
//!   Trojan wrapping key (public and secret), key conjuring by encrypt/unwrap,
//!   EXTRACT_KEY_FROM_KEY / XOR_BASE_AND_DATA derivation, raw RSA.
//! - Delaune, Kremer, Steel, "Formal analysis of PKCS#11", CSF 2008: re-import with changed
//!   roles, wrapping a wrap key, attribute flipping.
//! - Bortolozzo, Centenaro, Focardi, Steel, "Attacking and fixing PKCS#11 security
//!   tokens", CCS 2010 (Tookan): a1 symmetric wrap/decrypt, a2 asymmetric wrap/decrypt,
//!   a3 sensitive key read, a4 unextractable key read, a5 SENSITIVE unset; CryptokiX
//!   fixes (conflicting, sticky attributes, secure templates, non-local keys).
//! - Bardou, Focardi, Kawamoto, Simionato, Steel, Tsay, "Efficient padding oracle attacks
//!   on cryptographic hardware", CRYPTO 2012: PKCS#1 v1.5 and CBC-PAD unwrap oracles.
//! - ANSSI Caml Crush (Benadjila, Calderon, Daubignard, CARDIS 2014) filter rules:
//!   forbidden mechanisms, padding-oracle removal, secure/sticky templates, non-local
//!   objects, sensitive leaks; plus the derive key-forging attack
//!   (`CKM_AES_ECB_ENCRYPT_DATA` as an encryption oracle) that the filter does not stop.
//!
//! Every test is `#[serial]`: SoftHSM2 2.6.1 races token key generation against
//! `C_FindObjects` in another thread (see `forwarding.rs`).

#[macro_use]
mod common;
mod policy_support;

use common::Template;
use cryptoki_sys::*;
use policy_support::*;
use serial_test::serial;

fn s() -> S {
    init("");
    session()
}

const GCM_IV: [u8; 12] = [7u8; 12];
const CBC_IV: [u8; 16] = [9u8; 16];
const KW: CK_MECHANISM_TYPE = CKM_AES_KEY_WRAP;
const KWP: CK_MECHANISM_TYPE = CKM_AES_KEY_WRAP_PAD;

/// The four block-cipher modes an attacker tries on a key-wrapping key.
fn block_modes() -> Vec<(&'static str, Mech)> {
    vec![
        ("AES_ECB", Mech::new(CKM_AES_ECB)),
        ("AES_CBC", Mech::bytes(CKM_AES_CBC, &CBC_IV)),
        ("AES_CBC_PAD", Mech::bytes(CKM_AES_CBC_PAD, &CBC_IV)),
        ("AES_GCM", Mech::gcm(&GCM_IV, b"")),
    ]
}

fn kwp_blob(s: &S, cmk: H, key: H) -> Vec<u8> {
    ok(s.wrap(&mut Mech::new(KWP), cmk, key), "C_WrapKey(KWP)")
}

/// An unwrap template for a data DEK (AES, ENCRYPT+DECRYPT).
fn unwrap_t() -> Template {
    Template::default()
        .ulong(CKA_CLASS, CKO_SECRET_KEY)
        .ulong(CKA_KEY_TYPE, CKK_AES)
}

// =======================================================================================
// Clulow 2003 / Tookan a1: wrap/decrypt with a key holding both roles.
// =======================================================================================

#[test]
#[serial]
fn clulow_wrap_decrypt_mixed_role_templates_refused() {
    let s = s();
    let mixes: &[(&str, &[CK_ATTRIBUTE_TYPE])] = &[
        ("WRAP+DECRYPT", &[CKA_WRAP, CKA_DECRYPT]),
        ("UNWRAP+ENCRYPT", &[CKA_UNWRAP, CKA_ENCRYPT]),
        ("WRAP+ENCRYPT", &[CKA_WRAP, CKA_ENCRYPT]),
        ("UNWRAP+DECRYPT", &[CKA_UNWRAP, CKA_DECRYPT]),
        (
            "WRAP+UNWRAP+ENCRYPT+DECRYPT",
            &[CKA_WRAP, CKA_UNWRAP, CKA_ENCRYPT, CKA_DECRYPT],
        ),
        ("ENCRYPT+SIGN", &[CKA_ENCRYPT, CKA_SIGN]),
        ("DECRYPT+VERIFY", &[CKA_DECRYPT, CKA_VERIFY]),
        ("WRAP+SIGN", &[CKA_WRAP, CKA_SIGN]),
        ("UNWRAP+VERIFY", &[CKA_UNWRAP, CKA_VERIFY]),
    ];
    for token in [true, false] {
        for (name, attrs) in mixes {
            let mut t = aes(token, 32);
            for a in *attrs {
                t = t.boolean(*a, true);
            }
            expect_rv(
                s.generate_key(CKM_AES_KEY_GEN, t),
                CKR_TEMPLATE_INCONSISTENT,
                &format!("C_GenerateKey(token={token}, {name})"),
            );
        }
    }
}

#[test]
#[serial]
fn clulow_wrap_then_decrypt_with_the_wrap_cmk_refused() {
    let s = s();
    let x = wrap_cmk(&s, 32);
    let d = dek(&s, 32, true);
    // The wrap itself is legitimate.
    let blob = ok(s.wrap(&mut Mech::new(KW), x, d), "C_WrapKey(KW)");
    assert_eq!(blob.len(), 40);
    // The attacker now asks the token to decrypt the blob with the wrapping key.
    for (name, mut m) in block_modes() {
        expect_rv(
            s.decrypt(&mut m, x, &blob),
            CKR_KEY_FUNCTION_NOT_PERMITTED,
            &format!("C_DecryptInit({name}, wrap CMK)"),
        );
    }
    // ... or to encrypt chosen blocks with it (to forge blobs).
    for (name, mut m) in block_modes() {
        expect_rv(
            s.encrypt_init(&mut m, x),
            CKR_KEY_FUNCTION_NOT_PERMITTED,
            &format!("C_EncryptInit({name}, wrap CMK)"),
        );
    }
    // ... or to MAC with it.
    expect_rv(
        s.sign_init(&mut Mech::new(CKM_AES_CMAC), x),
        CKR_KEY_FUNCTION_NOT_PERMITTED,
        "C_SignInit(AES_CMAC, wrap CMK)",
    );
}

#[test]
#[serial]
fn key_wrap_mechanisms_are_not_encryption_mechanisms() {
    // AES-KW(P) used through C_Encrypt/C_Decrypt would turn the wrap CMK into a
    // wrap/decrypt (and blob-forging) oracle.
    let s = s();
    let x = wrap_cmk(&s, 32);
    for m in [KW, KWP] {
        expect_rv(
            s.encrypt_init(&mut Mech::new(m), x),
            CKR_MECHANISM_INVALID,
            &format!("C_EncryptInit(0x{m:x}, wrap CMK)"),
        );
        expect_rv(
            s.decrypt_init(&mut Mech::new(m), x),
            CKR_MECHANISM_INVALID,
            &format!("C_DecryptInit(0x{m:x}, wrap CMK)"),
        );
    }
}

#[test]
#[serial]
fn legit_wrap_cmk_wraps_and_unwraps_with_kw_and_kwp() {
    let s = s();
    let x = wrap_cmk(&s, 32);
    let d = dek(&s, 32, true);
    let ct = ok(
        s.encrypt(&mut Mech::gcm(&GCM_IV, b"aad"), d, b"envelope payload"),
        "GCM encrypt with DEK",
    );
    for (m, len) in [(KW, 40usize), (KWP, 40usize)] {
        let blob = ok(s.wrap(&mut Mech::new(m), x, d), "C_WrapKey");
        assert_eq!(blob.len(), len, "blob length for 0x{m:x}");
        let u = ok(
            s.unwrap(
                &mut Mech::new(m),
                x,
                &blob,
                unwrap_t()
                    .boolean(CKA_ENCRYPT, true)
                    .boolean(CKA_DECRYPT, true),
            ),
            "C_UnwrapKey",
        );
        assert_eq!(
            ok(
                s.decrypt(&mut Mech::gcm(&GCM_IV, b"aad"), u, &ct),
                "GCM decrypt with the unwrapped DEK"
            ),
            b"envelope payload"
        );
    }
}

// =======================================================================================
// Delaune-Kremer-Steel 2008 / Tookan a5: sticky attributes.
// =======================================================================================

#[test]
#[serial]
fn dks_grant_decrypt_to_wrap_key_after_it_wrapped() {
    let s = s();
    let x = wrap_cmk(&s, 32);
    let d = dek(&s, 32, true);
    let blob = kwp_blob(&s, x, d);
    expect_rv(
        s.set_attrs(x, Template::default().boolean(CKA_DECRYPT, true)),
        CKR_ATTRIBUTE_READ_ONLY,
        "C_SetAttributeValue(wrap CMK, DECRYPT=TRUE)",
    );
    expect_rv(
        s.set_attrs(x, Template::default().boolean(CKA_ENCRYPT, true)),
        CKR_ATTRIBUTE_READ_ONLY,
        "C_SetAttributeValue(wrap CMK, ENCRYPT=TRUE)",
    );
    assert_usage(
        &s,
        x,
        &[CKA_WRAP, CKA_UNWRAP],
        "wrap CMK after the attempts",
    );
    expect_rv(
        s.decrypt(&mut Mech::new(CKM_AES_ECB), x, &blob),
        CKR_KEY_FUNCTION_NOT_PERMITTED,
        "C_DecryptInit(ECB, wrap CMK) after the attempts",
    );
    // Same game on the DEK side: make the DEK a wrapping key.
    expect_rv(
        s.set_attrs(d, Template::default().boolean(CKA_WRAP, true)),
        CKR_ATTRIBUTE_READ_ONLY,
        "C_SetAttributeValue(DEK, WRAP=TRUE)",
    );
}

/// Every attribute an attacker may try to flip, with the value that helps the attack.
fn flips() -> Vec<(&'static str, Template)> {
    let t = Template::default;
    vec![
        ("SENSITIVE=FALSE", t().boolean(CKA_SENSITIVE, false)),
        ("SENSITIVE=TRUE", t().boolean(CKA_SENSITIVE, true)),
        ("EXTRACTABLE=TRUE", t().boolean(CKA_EXTRACTABLE, true)),
        ("EXTRACTABLE=FALSE", t().boolean(CKA_EXTRACTABLE, false)),
        ("ENCRYPT=TRUE", t().boolean(CKA_ENCRYPT, true)),
        ("DECRYPT=TRUE", t().boolean(CKA_DECRYPT, true)),
        ("WRAP=TRUE", t().boolean(CKA_WRAP, true)),
        ("UNWRAP=TRUE", t().boolean(CKA_UNWRAP, true)),
        ("SIGN=TRUE", t().boolean(CKA_SIGN, true)),
        ("VERIFY=TRUE", t().boolean(CKA_VERIFY, true)),
        ("DERIVE=TRUE", t().boolean(CKA_DERIVE, true)),
        ("ENCRYPT=FALSE", t().boolean(CKA_ENCRYPT, false)),
        ("TRUSTED=TRUE", t().boolean(CKA_TRUSTED, true)),
        (
            "WRAP_WITH_TRUSTED=FALSE",
            t().boolean(CKA_WRAP_WITH_TRUSTED, false),
        ),
        (
            "WRAP_WITH_TRUSTED=TRUE",
            t().boolean(CKA_WRAP_WITH_TRUSTED, true),
        ),
        ("VALUE", t().bytes(CKA_VALUE, &[0x41; 32])),
        ("VALUE_LEN=16", t().ulong(CKA_VALUE_LEN, 16)),
        ("TOKEN=TRUE", t().boolean(CKA_TOKEN, true)),
        ("TOKEN=FALSE", t().boolean(CKA_TOKEN, false)),
        ("PRIVATE=FALSE", t().boolean(CKA_PRIVATE, false)),
        (
            "KEY_TYPE=GENERIC",
            t().ulong(CKA_KEY_TYPE, CKK_GENERIC_SECRET),
        ),
        ("CLASS=DATA", t().ulong(CKA_CLASS, CKO_DATA)),
        (
            "ALWAYS_SENSITIVE=FALSE",
            t().boolean(CKA_ALWAYS_SENSITIVE, false),
        ),
        (
            "NEVER_EXTRACTABLE=FALSE",
            t().boolean(CKA_NEVER_EXTRACTABLE, false),
        ),
        ("LOCAL=TRUE", t().boolean(CKA_LOCAL, true)),
        (
            "LABEL+DECRYPT (one bad attribute among good ones)",
            t().bytes(CKA_LABEL, b"x").boolean(CKA_DECRYPT, true),
        ),
    ]
}

#[test]
#[serial]
fn tookan_flip_attributes_with_set_attribute_value_refused() {
    let s = s();
    let x = wrap_cmk(&s, 32);
    let c = data_cmk(&s);
    let m = mac_cmk(&s);
    let d = dek(&s, 32, true);
    let (_, rsa) = rsa_pair(&s, true, &[CKA_SIGN]);
    let (_, ec) = ec_pair(&s, false, &[CKA_SIGN]);
    let keys = [
        ("wrap CMK", x),
        ("data CMK", c),
        ("mac CMK", m),
        ("DEK", d),
        ("RSA token private key", rsa),
        ("EC session private key", ec),
    ];
    for (kname, k) in keys {
        for (aname, t) in flips() {
            expect_rv(
                s.set_attrs(k, t),
                CKR_ATTRIBUTE_READ_ONLY,
                &format!("C_SetAttributeValue({kname}, {aname})"),
            );
        }
        assert!(s.get_bool(k, CKA_SENSITIVE), "{kname}: SENSITIVE changed");
    }
    assert_usage(&s, x, &[CKA_WRAP, CKA_UNWRAP], "wrap CMK");
    assert_usage(&s, c, &[CKA_ENCRYPT, CKA_DECRYPT], "data CMK");
    assert_usage(&s, m, &[CKA_SIGN, CKA_VERIFY], "mac CMK");
    assert_usage(&s, d, &[CKA_ENCRYPT, CKA_DECRYPT], "DEK");
    assert_usage(&s, rsa, &[CKA_SIGN], "RSA private key");
    assert_usage(&s, ec, &[CKA_SIGN], "EC private key");
    for k in [x, c, m, rsa, ec] {
        assert!(!s.get_bool(k, CKA_EXTRACTABLE), "EXTRACTABLE changed");
    }
}

#[test]
#[serial]
fn legit_label_id_subject_dates_can_be_set() {
    let s = s();
    let x = wrap_cmk(&s, 32);
    let d = dek(&s, 32, true);
    let (_, rsa) = rsa_pair(&s, true, &[CKA_SIGN]);
    // A private key generated without label and id (as NSS makes them) may be named once,
    // right after its generation, before its lifecycle has any record.
    ok(
        s.set_attrs(
            rsa,
            Template::default()
                .bytes(CKA_ID, &unique_label("nss-id"))
                .bytes(CKA_LABEL, &unique_label("nss")),
        ),
        "C_SetAttributeValue(RSA private key generated without a name, ID+LABEL)",
    );
    ok(
        s.set_attrs(rsa, Template::default().bytes(CKA_SUBJECT, &[0x30, 0x00])),
        "C_SetAttributeValue(RSA private key, SUBJECT)",
    );
    // A CMK's name and id are its identity, fixed at creation (secret and private keys),
    // and the token itself keeps every CMK made with a name unmodifiable.
    for (kname, k) in [("wrap CMK", x), ("RSA private key", rsa)] {
        for (a, v) in [(CKA_LABEL, unique_label("renamed")), (CKA_ID, vec![1, 2])] {
            expect_rv(
                s.set_attrs(k, Template::default().bytes(a, &v)),
                CKR_ATTRIBUTE_READ_ONLY,
                &format!("C_SetAttributeValue({kname}, 0x{a:x})"),
            );
        }
    }
    expect_rv(
        s.set_attrs(x, Template::default().bytes(CKA_SUBJECT, &[0x30, 0x00])),
        CKR_ACTION_PROHIBITED,
        "C_SetAttributeValue(wrap CMK, SUBJECT) on a sealed CMK",
    );
    // A DEK's name, id and dates can be set.
    let new_label = unique_label("renamed");
    ok(
        s.set_attrs(d, Template::default().bytes(CKA_LABEL, &new_label)),
        "C_SetAttributeValue(DEK, LABEL)",
    );
    assert_eq!(s.get_attr(d, CKA_LABEL).unwrap(), new_label);
    ok(
        s.set_attrs(
            d,
            Template::default()
                .bytes(CKA_START_DATE, b"20260101")
                .bytes(CKA_END_DATE, b"20361231"),
        ),
        "C_SetAttributeValue(DEK, START_DATE+END_DATE)",
    );
    ok(
        s.set_attrs(d, Template::default().bytes(CKA_ID, &[1, 2, 3, 4])),
        "C_SetAttributeValue(DEK, ID)",
    );
    assert_eq!(s.get_attr(d, CKA_ID).unwrap(), [1, 2, 3, 4]);
}

// =======================================================================================
// Tookan a3/a4: reading the key value.
// =======================================================================================

#[test]
#[serial]
fn tookan_read_cka_value_of_cmk_dek_and_private_keys_refused() {
    let s = s();
    let x = wrap_cmk(&s, 32);
    let c = data_cmk(&s);
    let m = mac_cmk(&s);
    let d_ext = dek(&s, 32, true);
    let d = dek(&s, 32, false);
    let u = ok(
        s.unwrap(
            &mut Mech::new(KWP),
            x,
            &kwp_blob(&s, x, d_ext),
            unwrap_t().boolean(CKA_EXTRACTABLE, true),
        ),
        "C_UnwrapKey",
    );
    for (name, k) in [
        ("wrap CMK", x),
        ("data CMK", c),
        ("mac CMK", m),
        ("extractable DEK", d_ext),
        ("DEK", d),
        ("unwrapped DEK", u),
    ] {
        assert_unreadable(&s, k, CKA_VALUE, name);
    }
    let (_, rsa) = rsa_pair(&s, true, &[CKA_SIGN]);
    let (_, rsa_session) = rsa_pair(&s, false, &[CKA_SIGN, CKA_DECRYPT]);
    for k in [rsa, rsa_session] {
        for (n, a) in [
            ("PRIVATE_EXPONENT", CKA_PRIVATE_EXPONENT),
            ("PRIME_1", CKA_PRIME_1),
            ("PRIME_2", CKA_PRIME_2),
            ("EXPONENT_1", CKA_EXPONENT_1),
            ("EXPONENT_2", CKA_EXPONENT_2),
            ("COEFFICIENT", CKA_COEFFICIENT),
        ] {
            assert_unreadable(&s, k, a, &format!("RSA private key {n}"));
        }
    }
    let (_, ec) = ec_pair(&s, true, &[CKA_SIGN]);
    assert_unreadable(&s, ec, CKA_VALUE, "EC private key VALUE");

    // Mixed read: the public attribute comes back, the value does not, the call says so.
    let mut label = vec![0u8; 64];
    let mut value = vec![0u8; 64];
    let mut a = [
        CK_ATTRIBUTE {
            type_: CKA_LABEL,
            pValue: label.as_mut_ptr() as *mut std::ffi::c_void,
            ulValueLen: 64,
        },
        CK_ATTRIBUTE {
            type_: CKA_VALUE,
            pValue: value.as_mut_ptr() as *mut std::ffi::c_void,
            ulValueLen: 64,
        },
    ];
    assert_rv!(
        ck!(
            common::raw().f,
            C_GetAttributeValue,
            s.h,
            x,
            a.as_mut_ptr(),
            2
        ),
        CKR_ATTRIBUTE_SENSITIVE,
        "C_GetAttributeValue(wrap CMK, LABEL+VALUE)"
    );
    assert!(
        label[..a[0].ulValueLen as usize].starts_with(b"policy-wrap-cmk"),
        "label not returned next to the refused value"
    );
    assert_eq!(a[1].ulValueLen, CK_UNAVAILABLE_INFORMATION);
    assert!(value.iter().all(|b| *b == 0), "value buffer written");
}

#[test]
#[serial]
fn legit_public_attributes_stay_readable() {
    let s = s();
    let x = wrap_cmk(&s, 32);
    assert_eq!(s.get_ulong(x, CKA_VALUE_LEN), 32);
    assert_eq!(s.get_ulong(x, CKA_KEY_TYPE), CKK_AES);
    let (public, private) = rsa_pair(&s, true, &[CKA_SIGN]);
    let modulus = s
        .get_attr(private, CKA_MODULUS)
        .expect("CKA_MODULUS of private key");
    assert_eq!(modulus.len(), 256);
    assert_eq!(s.get_attr(public, CKA_MODULUS).unwrap(), modulus);
    assert_eq!(s.get_attr(private, CKA_PUBLIC_EXPONENT).unwrap(), [1, 0, 1]);
    let (ep, _) = ec_pair(&s, true, &[CKA_SIGN]);
    assert_eq!(ec_point(&s, ep).len(), 65);
}

// =======================================================================================
// Clulow 2003 / Tookan a2 / CryptokiX "non-local objects": Trojan keys.
// =======================================================================================

#[test]
#[serial]
fn clulow_plaintext_import_of_secret_and_private_keys_refused() {
    let s = s();
    let known = [0x5au8; 32];
    let secret = |token: bool, usage: &[CK_ATTRIBUTE_TYPE]| {
        let mut t = Template::default()
            .ulong(CKA_CLASS, CKO_SECRET_KEY)
            .ulong(CKA_KEY_TYPE, CKK_AES)
            .boolean(CKA_TOKEN, token)
            .bytes(CKA_VALUE, &known);
        for u in usage {
            t = t.boolean(*u, true);
        }
        t
    };
    expect_rv(
        s.create_object(secret(true, &[CKA_WRAP, CKA_UNWRAP])),
        CKR_TEMPLATE_INCONSISTENT,
        "C_CreateObject(token AES WRAP+UNWRAP with VALUE): Trojan wrap CMK",
    );
    expect_rv(
        s.create_object(secret(true, &[CKA_ENCRYPT, CKA_DECRYPT])),
        CKR_TEMPLATE_INCONSISTENT,
        "C_CreateObject(token AES ENCRYPT+DECRYPT with VALUE)",
    );
    expect_rv(
        s.create_object(secret(false, &[CKA_ENCRYPT, CKA_DECRYPT])),
        CKR_TEMPLATE_INCONSISTENT,
        "C_CreateObject(session AES with VALUE)",
    );
    expect_rv(
        s.create_object(secret(false, &[])),
        CKR_TEMPLATE_INCONSISTENT,
        "C_CreateObject(session AES with VALUE, silent)",
    );
    expect_rv(
        s.create_object(
            Template::default()
                .ulong(CKA_CLASS, CKO_SECRET_KEY)
                .ulong(CKA_KEY_TYPE, CKK_GENERIC_SECRET)
                .boolean(CKA_TOKEN, true)
                .boolean(CKA_SIGN, true)
                .bytes(CKA_VALUE, &known),
        ),
        CKR_TEMPLATE_INCONSISTENT,
        "C_CreateObject(generic secret with VALUE)",
    );
    // A private key whose components the attacker knows (RSA and EC).
    let n = {
        let mut n = vec![0xc3u8; 256];
        n[255] |= 1;
        n
    };
    expect_rv(
        s.create_object(
            Template::default()
                .ulong(CKA_CLASS, CKO_PRIVATE_KEY)
                .ulong(CKA_KEY_TYPE, CKK_RSA)
                .boolean(CKA_TOKEN, true)
                .boolean(CKA_UNWRAP, true)
                .boolean(CKA_DECRYPT, true)
                .bytes(CKA_MODULUS, &n)
                .bytes(CKA_PUBLIC_EXPONENT, &[1, 0, 1])
                .bytes(CKA_PRIVATE_EXPONENT, &[0x11; 256]),
        ),
        CKR_TEMPLATE_INCONSISTENT,
        "C_CreateObject(RSA private key)",
    );
    expect_rv(
        s.create_object(
            Template::default()
                .ulong(CKA_CLASS, CKO_PRIVATE_KEY)
                .ulong(CKA_KEY_TYPE, CKK_EC)
                .boolean(CKA_TOKEN, false)
                .boolean(CKA_DERIVE, true)
                .bytes(CKA_EC_PARAMS, &common::P256_PARAMS)
                .bytes(CKA_VALUE, &[0x22; 32]),
        ),
        CKR_TEMPLATE_INCONSISTENT,
        "C_CreateObject(EC private key)",
    );
}

#[test]
#[serial]
fn clulow_key_value_in_generate_or_unwrap_template_does_not_conjure_a_known_key() {
    // Some tokens honour CKA_VALUE in a C_GenerateKey template; then the "generated" key
    // is known to the attacker.
    let s = s();
    let r = s.generate_key(
        CKM_AES_KEY_GEN,
        aes(false, 32)
            .boolean(CKA_ENCRYPT, true)
            .bytes(CKA_VALUE, &[0x41; 32]),
    );
    expect_rv_in(
        r,
        &[CKR_TEMPLATE_INCONSISTENT, CKR_ATTRIBUTE_READ_ONLY],
        "C_GenerateKey with CKA_VALUE",
    );
    let x = wrap_cmk(&s, 32);
    let d = dek(&s, 32, true);
    let blob = kwp_blob(&s, x, d);
    expect_rv_in(
        s.unwrap(
            &mut Mech::new(KWP),
            x,
            &blob,
            unwrap_t().bytes(CKA_VALUE, &[0x41; 32]),
        ),
        &[CKR_TEMPLATE_INCONSISTENT, CKR_ATTRIBUTE_READ_ONLY],
        "C_UnwrapKey with CKA_VALUE in the template",
    );
}

/// A public key the attacker made off-token (random 2048-bit odd modulus).
fn trojan_rsa_public(s: &S) -> Rv<H> {
    let mut n = random(s, 256);
    n[0] |= 0x80;
    n[255] |= 1;
    s.create_object(
        Template::default()
            .ulong(CKA_CLASS, CKO_PUBLIC_KEY)
            .ulong(CKA_KEY_TYPE, CKK_RSA)
            .boolean(CKA_TOKEN, false)
            .boolean(CKA_WRAP, true)
            .boolean(CKA_ENCRYPT, true)
            .bytes(CKA_MODULUS, &n)
            .bytes(CKA_PUBLIC_EXPONENT, &[1, 0, 1]),
    )
}

#[test]
#[serial]
fn clulow_trojan_public_key_wraps_a_dek_refused() {
    let s = s();
    let d = dek(&s, 32, true);
    // Public objects pass through the policy; refusing them at creation also stops the
    // attack, so both outcomes are accepted here, but the wrap must never happen.
    match trojan_rsa_public(&s) {
        Err(rv) => assert_eq!(
            rv,
            CKR_TEMPLATE_INCONSISTENT,
            "C_CreateObject(public key WRAP=TRUE): {}",
            common::rv_name(rv)
        ),
        Ok(trojan) => {
            expect_rv(
                s.wrap(&mut Mech::oaep(), trojan, d),
                CKR_KEY_FUNCTION_NOT_PERMITTED,
                "C_WrapKey(RSA_PKCS_OAEP, attacker's public key, DEK)",
            );
            expect_rv_in(
                s.wrap(&mut Mech::new(CKM_RSA_PKCS), trojan, d),
                &[CKR_KEY_FUNCTION_NOT_PERMITTED, CKR_MECHANISM_INVALID],
                "C_WrapKey(RSA_PKCS, attacker's public key, DEK)",
            );
        }
    }
}

#[test]
#[serial]
fn tookan_a2_asymmetric_wrap_decrypt_refused() {
    // Wrap a DEK under a token-generated public key, decrypt the blob with its private key.
    let s = s();
    let d = dek(&s, 32, true);
    let public_t = Template::default()
        .ulong(CKA_CLASS, CKO_PUBLIC_KEY)
        .ulong(CKA_KEY_TYPE, CKK_RSA)
        .ulong(CKA_MODULUS_BITS, 2048)
        .bytes(CKA_PUBLIC_EXPONENT, &[1, 0, 1])
        .boolean(CKA_TOKEN, false)
        .boolean(CKA_WRAP, true)
        .boolean(CKA_ENCRYPT, true);
    let private_t = Template::default()
        .ulong(CKA_CLASS, CKO_PRIVATE_KEY)
        .boolean(CKA_TOKEN, false)
        .boolean(CKA_DECRYPT, true);
    let (public, private) = ok(
        s.generate_key_pair(CKM_RSA_PKCS_KEY_PAIR_GEN, public_t, private_t),
        "C_GenerateKeyPair(RSA, public WRAP, private DECRYPT)",
    );
    expect_rv(
        s.wrap(&mut Mech::oaep(), public, d),
        CKR_KEY_FUNCTION_NOT_PERMITTED,
        "C_WrapKey(RSA_PKCS_OAEP, public key, DEK)",
    );
    // The private half still decrypts legitimately (RSA-OAEP).
    let ct = ok(
        s.encrypt(&mut Mech::oaep(), public, &[3u8; 32]),
        "OAEP encrypt with the public key",
    );
    assert_eq!(
        ok(s.decrypt(&mut Mech::oaep(), private, &ct), "OAEP decrypt"),
        [3u8; 32]
    );
}

// =======================================================================================
// Clulow 2003 / Tookan: encrypt/unwrap key conjuring.
// =======================================================================================

#[test]
#[serial]
fn clulow_encrypt_then_unwrap_key_conjuring_refused() {
    let s = s();
    let x = wrap_cmk(&s, 32);
    let c = data_cmk(&s);
    let d = dek(&s, 32, true);
    let known = [0x42u8; 32];
    // 1. With the wrap CMK: encrypt a known key to make a blob (needs an encryption role).
    for m in [KW, KWP] {
        expect_rv(
            s.encrypt_init(&mut Mech::new(m), x),
            CKR_MECHANISM_INVALID,
            "C_EncryptInit(KW/KWP, wrap CMK)",
        );
    }
    expect_rv(
        s.encrypt(&mut Mech::new(CKM_AES_ECB), x, &known),
        CKR_KEY_FUNCTION_NOT_PERMITTED,
        "C_EncryptInit(ECB, wrap CMK)",
    );
    // 2. With the data CMK: encrypt the known key (legitimate), then unwrap it.
    let ct = ok(
        s.encrypt(&mut Mech::bytes(CKM_AES_CBC_PAD, &CBC_IV), c, &known),
        "CBC-PAD encrypt with data CMK",
    );
    expect_rv_in(
        s.unwrap(
            &mut Mech::bytes(CKM_AES_CBC_PAD, &CBC_IV),
            c,
            &ct,
            unwrap_t().boolean(CKA_WRAP, false),
        ),
        &[CKR_MECHANISM_INVALID, CKR_KEY_FUNCTION_NOT_PERMITTED],
        "C_UnwrapKey(CBC_PAD, data CMK)",
    );
    expect_rv(
        s.unwrap(&mut Mech::new(KWP), c, &ct, unwrap_t()),
        CKR_KEY_FUNCTION_NOT_PERMITTED,
        "C_UnwrapKey(KWP, data CMK)",
    );
    // 3. With a DEK as unwrapping key.
    expect_rv(
        s.unwrap(&mut Mech::new(KWP), d, &ct, unwrap_t()),
        CKR_KEY_FUNCTION_NOT_PERMITTED,
        "C_UnwrapKey(KWP, DEK)",
    );
    // 4. Attacker-chosen bytes under the wrap CMK do not even make a key.
    let mut junk = known.to_vec();
    junk.extend_from_slice(&[0u8; 8]);
    expect_rv(
        s.unwrap(&mut Mech::new(KWP), x, &junk, unwrap_t()),
        CKR_WRAPPED_KEY_INVALID,
        "C_UnwrapKey(KWP, wrap CMK, chosen bytes)",
    );
    expect_rv(
        s.unwrap(&mut Mech::new(KW), x, &junk, unwrap_t()),
        CKR_WRAPPED_KEY_INVALID,
        "C_UnwrapKey(KW, wrap CMK, chosen bytes)",
    );
}

#[test]
#[serial]
fn unwrapped_key_can_never_wrap() {
    let s = s();
    let x = wrap_cmk(&s, 32);
    let d = dek(&s, 32, true);
    let d2 = dek(&s, 32, true);
    let blob = kwp_blob(&s, x, d);
    for (name, a) in [
        ("WRAP", CKA_WRAP),
        ("UNWRAP", CKA_UNWRAP),
        ("DERIVE", CKA_DERIVE),
    ] {
        expect_rv(
            s.unwrap(&mut Mech::new(KWP), x, &blob, unwrap_t().boolean(a, true)),
            CKR_TEMPLATE_INCONSISTENT,
            &format!("C_UnwrapKey(template {name}=TRUE)"),
        );
    }
    let u = ok(
        s.unwrap(&mut Mech::new(KWP), x, &blob, unwrap_t()),
        "C_UnwrapKey(silent template)",
    );
    assert_usage(&s, u, &[CKA_ENCRYPT, CKA_DECRYPT], "silently unwrapped DEK");
    assert!(s.get_bool(u, CKA_SENSITIVE), "unwrapped DEK not sensitive");
    assert!(!s.get_bool(u, CKA_TOKEN), "unwrapped DEK is a token object");
    assert_eq!(s.get_ulong(u, CKA_VALUE_LEN), 32);
    for m in [KW, KWP] {
        expect_rv(
            s.wrap(&mut Mech::new(m), u, d2),
            CKR_KEY_FUNCTION_NOT_PERMITTED,
            "C_WrapKey(wrapping key = unwrapped DEK)",
        );
        expect_rv(
            s.unwrap(&mut Mech::new(m), u, &blob, unwrap_t()),
            CKR_KEY_FUNCTION_NOT_PERMITTED,
            "C_UnwrapKey(unwrapping key = unwrapped DEK)",
        );
    }
}

#[test]
#[serial]
fn rsa_oaep_unwrap_conjures_only_a_dek_that_cannot_wrap() {
    // The attacker encrypts a key he knows under the public key (public operations are
    // free), then unwraps it with the private key: he gets a key he knows, so it must be
    // a DEK that can never wrap, never reach a token object with a wrap role, and never be
    // wrapped by another CMK.
    let s = s();
    let (public, private) = rsa_pair(&s, true, &[CKA_UNWRAP]);
    let known = [0x24u8; 32];
    let ct = ok(
        s.encrypt(&mut Mech::oaep(), public, &known),
        "OAEP encrypt with the public key",
    );
    for (name, a) in [
        ("WRAP", CKA_WRAP),
        ("UNWRAP", CKA_UNWRAP),
        ("DERIVE", CKA_DERIVE),
    ] {
        expect_rv(
            s.unwrap(&mut Mech::oaep(), private, &ct, unwrap_t().boolean(a, true)),
            CKR_TEMPLATE_INCONSISTENT,
            &format!("C_UnwrapKey(OAEP, template {name}=TRUE)"),
        );
    }
    expect_rv(
        s.unwrap(
            &mut Mech::oaep(),
            private,
            &ct,
            unwrap_t().boolean(CKA_TOKEN, true),
        ),
        CKR_TEMPLATE_INCONSISTENT,
        "C_UnwrapKey(OAEP, template TOKEN=TRUE)",
    );
    let k = ok(
        s.unwrap(
            &mut Mech::oaep(),
            private,
            &ct,
            unwrap_t()
                .boolean(CKA_ENCRYPT, true)
                .boolean(CKA_DECRYPT, true)
                .boolean(CKA_EXTRACTABLE, true),
        ),
        "C_UnwrapKey(OAEP) into a DEK",
    );
    assert_usage(&s, k, &[CKA_ENCRYPT, CKA_DECRYPT], "OAEP-unwrapped DEK");
    assert!(!s.get_bool(k, CKA_TOKEN));
    assert!(s.get_bool(k, CKA_SENSITIVE));
    let d = dek(&s, 32, true);
    expect_rv(
        s.wrap(&mut Mech::new(KWP), k, d),
        CKR_KEY_FUNCTION_NOT_PERMITTED,
        "C_WrapKey(wrapping key = conjured DEK)",
    );
    let y = wrap_cmk(&s, 32);
    expect_rv(
        s.wrap(&mut Mech::new(KWP), y, k),
        CKR_KEY_NOT_WRAPPABLE,
        "C_WrapKey(wrap CMK Y, DEK unwrapped by the RSA CMK)",
    );
    expect_rv(
        s.copy_object(
            k,
            Template::default()
                .boolean(CKA_TOKEN, true)
                .boolean(CKA_WRAP, true)
                .boolean(CKA_UNWRAP, true),
        ),
        CKR_TEMPLATE_INCONSISTENT,
        "C_CopyObject(conjured DEK -> token wrap key)",
    );
}

// =======================================================================================
// Clulow 2003: wrapping under a weaker key.
// =======================================================================================

#[test]
#[serial]
fn clulow_wrap_under_weaker_key_refused() {
    let s = s();
    let x128 = wrap_cmk(&s, 16);
    let d256 = dek(&s, 32, true);
    for m in [KW, KWP] {
        expect_rv(
            s.wrap(&mut Mech::new(m), x128, d256),
            CKR_WRAPPING_KEY_SIZE_RANGE,
            &format!("C_WrapKey(0x{m:x}, AES-128 CMK, AES-256 DEK)"),
        );
    }
}

#[test]
#[serial]
fn legit_wrap_under_equal_or_stronger_key() {
    let s = s();
    let x128 = wrap_cmk(&s, 16);
    let x256 = wrap_cmk(&s, 32);
    let d128 = dek(&s, 16, true);
    let d128b = dek(&s, 16, true);
    let d256 = dek(&s, 32, true);
    assert_eq!(
        ok(
            s.wrap(&mut Mech::new(KWP), x128, d128),
            "AES-128 wraps AES-128"
        )
        .len(),
        24
    );
    assert_eq!(
        ok(
            s.wrap(&mut Mech::new(KWP), x256, d128b),
            "AES-256 wraps AES-128"
        )
        .len(),
        24
    );
    assert_eq!(
        ok(
            s.wrap(&mut Mech::new(KWP), x256, d256),
            "AES-256 wraps AES-256"
        )
        .len(),
        40
    );
}

// =======================================================================================
// Tookan / DKS: re-importing a wrapped DEK with a weakened or changed template.
// =======================================================================================

#[test]
#[serial]
fn tookan_reimport_wrapped_dek_with_weaker_template_refused() {
    let s = s();
    let x = wrap_cmk(&s, 32);
    let d = dek(&s, 32, true);
    let blob = kwp_blob(&s, x, d);
    let cases: Vec<(&str, Template)> = vec![
        ("SENSITIVE=FALSE", unwrap_t().boolean(CKA_SENSITIVE, false)),
        (
            "EXTRACTABLE=TRUE+SENSITIVE=FALSE",
            unwrap_t()
                .boolean(CKA_EXTRACTABLE, true)
                .boolean(CKA_SENSITIVE, false),
        ),
        ("TOKEN=TRUE", unwrap_t().boolean(CKA_TOKEN, true)),
        (
            "TOKEN=TRUE+ENCRYPT+DECRYPT",
            unwrap_t()
                .boolean(CKA_TOKEN, true)
                .boolean(CKA_ENCRYPT, true)
                .boolean(CKA_DECRYPT, true),
        ),
        (
            "TOKEN=TRUE+WRAP+UNWRAP (a new wrap CMK)",
            unwrap_t()
                .boolean(CKA_TOKEN, true)
                .boolean(CKA_WRAP, true)
                .boolean(CKA_UNWRAP, true),
        ),
        ("WRAP=TRUE", unwrap_t().boolean(CKA_WRAP, true)),
        (
            "WRAP_WITH_TRUSTED=FALSE",
            unwrap_t().boolean(CKA_WRAP_WITH_TRUSTED, false),
        ),
        (
            "DECRYPT+UNWRAP",
            unwrap_t()
                .boolean(CKA_DECRYPT, true)
                .boolean(CKA_UNWRAP, true),
        ),
        (
            "ENCRYPT+WRAP",
            unwrap_t()
                .boolean(CKA_ENCRYPT, true)
                .boolean(CKA_WRAP, true),
        ),
        (
            "ENCRYPT+SIGN (mixed data/mac)",
            unwrap_t()
                .boolean(CKA_ENCRYPT, true)
                .boolean(CKA_SIGN, true),
        ),
    ];
    for (name, t) in cases {
        expect_rv(
            s.unwrap(&mut Mech::new(KWP), x, &blob, t),
            CKR_TEMPLATE_INCONSISTENT,
            &format!("C_UnwrapKey(template {name})"),
        );
    }
    for (name, a) in [
        ("ALWAYS_SENSITIVE", CKA_ALWAYS_SENSITIVE),
        ("NEVER_EXTRACTABLE", CKA_NEVER_EXTRACTABLE),
        ("LOCAL", CKA_LOCAL),
        ("TRUSTED", CKA_TRUSTED),
    ] {
        for v in [true, false] {
            expect_rv(
                s.unwrap(&mut Mech::new(KWP), x, &blob, unwrap_t().boolean(a, v)),
                CKR_ATTRIBUTE_READ_ONLY,
                &format!("C_UnwrapKey(template {name}={v})"),
            );
        }
    }
}

#[test]
#[serial]
fn legit_reimport_wrapped_dek_as_data_dek() {
    let s = s();
    let x = wrap_cmk(&s, 32);
    let d = dek(&s, 32, true);
    let ct = ok(
        s.encrypt(&mut Mech::gcm(&GCM_IV, b""), d, b"row 17"),
        "GCM encrypt",
    );
    let blob = kwp_blob(&s, x, d);
    let u = ok(
        s.unwrap(
            &mut Mech::new(KWP),
            x,
            &blob,
            unwrap_t()
                .boolean(CKA_ENCRYPT, true)
                .boolean(CKA_DECRYPT, true)
                .boolean(CKA_EXTRACTABLE, true)
                .boolean(CKA_SENSITIVE, true)
                .bytes(CKA_LABEL, b"dek"),
        ),
        "C_UnwrapKey(data DEK template)",
    );
    assert_eq!(
        ok(
            s.decrypt(&mut Mech::gcm(&GCM_IV, b""), u, &ct),
            "GCM decrypt"
        ),
        b"row 17"
    );
}

// =======================================================================================
// Delaune-Kremer-Steel 2008: role change by wrapping a wrap key and re-importing it.
// =======================================================================================

#[test]
#[serial]
fn dks_wrap_a_cmk_refused() {
    let s = s();
    let x1 = wrap_cmk(&s, 32);
    let x2 = wrap_cmk(&s, 32);
    let c = data_cmk(&s);
    let m = mac_cmk(&s);
    let (_, rsa) = rsa_pair(&s, true, &[CKA_SIGN]);
    let (_, ec_session) = ec_pair(&s, false, &[CKA_SIGN]);
    for mech in [KW, KWP] {
        for (name, k) in [
            ("another wrap CMK", x2),
            ("itself", x1),
            ("a data CMK", c),
            ("a mac CMK", m),
            ("an RSA private key", rsa),
            ("an EC session private key", ec_session),
        ] {
            expect_rv(
                s.wrap(&mut Mech::new(mech), x1, k),
                CKR_KEY_UNEXTRACTABLE,
                &format!("C_WrapKey(0x{mech:x}, wrap CMK, {name})"),
            );
        }
    }
    // Making a wrap CMK extractable in the first place is refused too.
    expect_rv(
        s.generate_key(
            CKM_AES_KEY_GEN,
            aes(true, 32)
                .boolean(CKA_WRAP, true)
                .boolean(CKA_UNWRAP, true)
                .boolean(CKA_EXTRACTABLE, true),
        ),
        CKR_TEMPLATE_INCONSISTENT,
        "C_GenerateKey(wrap CMK, EXTRACTABLE=TRUE)",
    );
    // And a session "wrap key" (a DEK with a wrap role) cannot be made.
    for (name, t) in [
        ("WRAP", aes(false, 32).boolean(CKA_WRAP, true)),
        ("UNWRAP", aes(false, 32).boolean(CKA_UNWRAP, true)),
        (
            "WRAP+DECRYPT",
            aes(false, 32)
                .boolean(CKA_WRAP, true)
                .boolean(CKA_DECRYPT, true),
        ),
    ] {
        expect_rv(
            s.generate_key(CKM_AES_KEY_GEN, t.boolean(CKA_EXTRACTABLE, true)),
            CKR_TEMPLATE_INCONSISTENT,
            &format!("C_GenerateKey(session AES {name})"),
        );
    }
}

// =======================================================================================
// Derivation: Clulow's EXTRACT/XOR attacks and the ECB_ENCRYPT_DATA key-forging attack.
// =======================================================================================

fn derive_t() -> Template {
    aes(false, 16)
        .boolean(CKA_ENCRYPT, true)
        .boolean(CKA_DECRYPT, true)
}

#[test]
#[serial]
fn derive_from_cmk_or_dek_with_forbidden_mechanisms_refused() {
    let s = s();
    let x = wrap_cmk(&s, 32);
    let c = data_cmk(&s);
    let m = mac_cmk(&s);
    let d = dek(&s, 32, true);
    let other = dek(&s, 32, true);
    let mechs = || -> Vec<(&'static str, Mech)> {
        vec![
            (
                "AES_ECB_ENCRYPT_DATA",
                Mech::string_data(CKM_AES_ECB_ENCRYPT_DATA, &[0xa6; 16]),
            ),
            (
                "AES_CBC_ENCRYPT_DATA",
                Mech::aes_cbc_encrypt_data([0u8; 16], &[0xa6; 16]),
            ),
            (
                "DES_ECB_ENCRYPT_DATA",
                Mech::string_data(CKM_DES_ECB_ENCRYPT_DATA, &[0xa6; 8]),
            ),
            (
                "DES3_ECB_ENCRYPT_DATA",
                Mech::string_data(CKM_DES3_ECB_ENCRYPT_DATA, &[0xa6; 8]),
            ),
            (
                "CONCATENATE_BASE_AND_KEY",
                Mech::ulong(CKM_CONCATENATE_BASE_AND_KEY, other),
            ),
            (
                "CONCATENATE_BASE_AND_DATA",
                Mech::string_data(CKM_CONCATENATE_BASE_AND_DATA, &[0; 16]),
            ),
            (
                "CONCATENATE_DATA_AND_BASE",
                Mech::string_data(CKM_CONCATENATE_DATA_AND_BASE, &[0; 16]),
            ),
            (
                "XOR_BASE_AND_DATA",
                Mech::string_data(CKM_XOR_BASE_AND_DATA, &[0xff; 32]),
            ),
            (
                "EXTRACT_KEY_FROM_KEY",
                Mech::ulong(CKM_EXTRACT_KEY_FROM_KEY, 0),
            ),
            (
                "DH_PKCS_DERIVE",
                Mech::bytes(CKM_DH_PKCS_DERIVE, &[2u8; 128]),
            ),
        ]
    };
    for (bname, base) in [("wrap CMK", x), ("data CMK", c), ("mac CMK", m), ("DEK", d)] {
        for (mname, mut mech) in mechs() {
            expect_rv(
                s.derive(&mut mech, base, derive_t()),
                CKR_MECHANISM_INVALID,
                &format!("C_DeriveKey({mname}, {bname})"),
            );
        }
        // ECDH1 is offered, but never with a secret key as base: the key's type does not
        // fit the mechanism, which the spec ranks before the key's usage.
        let (peer, _) = ec_pair(&s, false, &[CKA_SIGN]);
        let point = ec_point(&s, peer);
        expect_rv(
            s.derive(&mut Mech::ecdh(&point), base, derive_t()),
            CKR_KEY_TYPE_INCONSISTENT,
            &format!("C_DeriveKey(ECDH1_DERIVE, {bname})"),
        );
    }
}

#[test]
#[serial]
fn key_forging_through_ecb_encrypt_data_refused() {
    // The forging attack: derive K' = AES-ECB(CMK, chosen block) non-sensitive, read K',
    // and so compute the raw block cipher under the wrap CMK (forge KW blobs).
    let s = s();
    let x = wrap_cmk(&s, 32);
    let mut t = aes(false, 16)
        .boolean(CKA_SENSITIVE, false)
        .boolean(CKA_EXTRACTABLE, true);
    t = t.boolean(CKA_ENCRYPT, true);
    let r = s.derive(
        &mut Mech::string_data(CKM_AES_ECB_ENCRYPT_DATA, &[0xa6; 16]),
        x,
        t,
    );
    expect_rv_in(
        r,
        &[CKR_MECHANISM_INVALID, CKR_TEMPLATE_INCONSISTENT],
        "C_DeriveKey(AES_ECB_ENCRYPT_DATA, wrap CMK, SENSITIVE=FALSE)",
    );
    // A secret key with a derive role (the precondition of the attack) cannot be made.
    for token in [true, false] {
        expect_rv(
            s.generate_key(CKM_AES_KEY_GEN, aes(token, 32).boolean(CKA_DERIVE, true)),
            CKR_TEMPLATE_INCONSISTENT,
            &format!("C_GenerateKey(AES token={token} DERIVE=TRUE)"),
        );
    }
    expect_rv(
        s.generate_key(
            CKM_GENERIC_SECRET_KEY_GEN,
            Template::default()
                .ulong(CKA_CLASS, CKO_SECRET_KEY)
                .ulong(CKA_KEY_TYPE, CKK_GENERIC_SECRET)
                .ulong(CKA_VALUE_LEN, 32)
                .boolean(CKA_TOKEN, false)
                .boolean(CKA_DERIVE, true),
        ),
        CKR_TEMPLATE_INCONSISTENT,
        "C_GenerateKey(generic secret DERIVE=TRUE)",
    );
}

#[test]
#[serial]
fn ecdh_derive_needs_the_derive_role() {
    let s = s();
    let (peer, _) = ec_pair(&s, false, &[CKA_DERIVE]);
    let point = ec_point(&s, peer);
    let (_, sign_only) = ec_pair(&s, true, &[CKA_SIGN]);
    expect_rv(
        s.derive(&mut Mech::ecdh(&point), sign_only, derive_t()),
        CKR_KEY_FUNCTION_NOT_PERMITTED,
        "C_DeriveKey(ECDH1, EC key with sign role only)",
    );
    // An RSA key does not fit ECDH1 at all (CKR_KEY_TYPE_INCONSISTENT outranks the usage).
    let (_, rsa) = rsa_pair(&s, false, &[CKA_SIGN, CKA_DECRYPT]);
    expect_rv(
        s.derive(&mut Mech::ecdh(&point), rsa, derive_t()),
        CKR_KEY_TYPE_INCONSISTENT,
        "C_DeriveKey(ECDH1, RSA private key)",
    );
}

#[test]
#[serial]
fn legit_ecdh_derive_yields_sensitive_unextractable_session_key() {
    let s = s();
    // NSS asks sign+derive for EC keys.
    let (a_pub, a_priv) = ec_pair(&s, true, &[CKA_SIGN, CKA_DERIVE]);
    let (b_pub, b_priv) = ec_pair(&s, false, &[CKA_DERIVE]);
    let a_point = ec_point(&s, a_pub);
    let b_point = ec_point(&s, b_pub);
    let ka = ok(
        s.derive(&mut Mech::ecdh(&b_point), a_priv, derive_t()),
        "C_DeriveKey(ECDH1, A with B's point)",
    );
    let kb = ok(
        s.derive(&mut Mech::ecdh(&a_point), b_priv, derive_t()),
        "C_DeriveKey(ECDH1, B with A's point)",
    );
    for k in [ka, kb] {
        assert!(s.get_bool(k, CKA_SENSITIVE), "derived key not sensitive");
        assert!(!s.get_bool(k, CKA_EXTRACTABLE), "derived key extractable");
        assert!(!s.get_bool(k, CKA_TOKEN), "derived key is a token object");
        assert_unreadable(&s, k, CKA_VALUE, "derived key");
    }
    let ct = ok(
        s.encrypt(&mut Mech::gcm(&GCM_IV, b""), ka, b"agreed"),
        "GCM with A's key",
    );
    assert_eq!(
        ok(
            s.decrypt(&mut Mech::gcm(&GCM_IV, b""), kb, &ct),
            "GCM with B's key"
        ),
        b"agreed"
    );
    // The derive template cannot weaken or re-role the result.
    let cases: Vec<(&str, Template, CK_RV)> = vec![
        (
            "TOKEN=TRUE",
            derive_t().boolean(CKA_TOKEN, true),
            CKR_TEMPLATE_INCONSISTENT,
        ),
        (
            "SENSITIVE=FALSE",
            derive_t().boolean(CKA_SENSITIVE, false),
            CKR_TEMPLATE_INCONSISTENT,
        ),
        (
            "DERIVE=TRUE",
            derive_t().boolean(CKA_DERIVE, true),
            CKR_TEMPLATE_INCONSISTENT,
        ),
        (
            "WRAP=TRUE",
            aes(false, 16).boolean(CKA_WRAP, true),
            CKR_TEMPLATE_INCONSISTENT,
        ),
        (
            "UNWRAP=TRUE",
            aes(false, 16).boolean(CKA_UNWRAP, true),
            CKR_TEMPLATE_INCONSISTENT,
        ),
        (
            "ALWAYS_SENSITIVE=TRUE",
            derive_t().boolean(CKA_ALWAYS_SENSITIVE, true),
            CKR_ATTRIBUTE_READ_ONLY,
        ),
        (
            "LOCAL=TRUE",
            derive_t().boolean(CKA_LOCAL, true),
            CKR_ATTRIBUTE_READ_ONLY,
        ),
    ];
    for (name, t, want) in cases {
        expect_rv(
            s.derive(&mut Mech::ecdh(&b_point), a_priv, t),
            want,
            &format!("C_DeriveKey(ECDH1, template {name})"),
        );
    }
}

// =======================================================================================
// Tookan: C_CopyObject relaxing attributes, duplicating token keys.
// =======================================================================================

#[test]
#[serial]
fn tookan_copy_object_relaxing_attributes_refused() {
    let s = s();
    let d = dek(&s, 32, false);
    let cases: Vec<(&str, Template)> = vec![
        (
            "SENSITIVE=FALSE",
            Template::default().boolean(CKA_SENSITIVE, false),
        ),
        (
            "EXTRACTABLE=TRUE",
            Template::default().boolean(CKA_EXTRACTABLE, true),
        ),
        ("WRAP=TRUE", Template::default().boolean(CKA_WRAP, true)),
        ("UNWRAP=TRUE", Template::default().boolean(CKA_UNWRAP, true)),
        ("DERIVE=TRUE", Template::default().boolean(CKA_DERIVE, true)),
        ("SIGN=TRUE", Template::default().boolean(CKA_SIGN, true)),
        (
            "TOKEN=TRUE+WRAP+UNWRAP",
            Template::default()
                .boolean(CKA_TOKEN, true)
                .boolean(CKA_WRAP, true)
                .boolean(CKA_UNWRAP, true),
        ),
        (
            "TOKEN=TRUE+EXTRACTABLE=TRUE",
            Template::default()
                .boolean(CKA_TOKEN, true)
                .boolean(CKA_EXTRACTABLE, true),
        ),
    ];
    for (name, t) in cases {
        expect_rv(
            s.copy_object(d, t),
            CKR_TEMPLATE_INCONSISTENT,
            &format!("C_CopyObject(DEK, {name})"),
        );
    }
    for (name, a) in [
        ("ALWAYS_SENSITIVE", CKA_ALWAYS_SENSITIVE),
        ("NEVER_EXTRACTABLE", CKA_NEVER_EXTRACTABLE),
        ("LOCAL", CKA_LOCAL),
        ("TRUSTED", CKA_TRUSTED),
    ] {
        // Two rules of the contract apply (read-only attribute; copy may only add
        // TOKEN/ID/LABEL); either refusal is accepted.
        expect_rv_in(
            s.copy_object(d, Template::default().boolean(a, true)),
            &[CKR_ATTRIBUTE_READ_ONLY, CKR_TEMPLATE_INCONSISTENT],
            &format!("C_CopyObject(DEK, {name}=TRUE)"),
        );
    }
    let (_, session_rsa) = rsa_pair(&s, false, &[CKA_SIGN]);
    for (name, t) in [
        (
            "EXTRACTABLE=TRUE",
            Template::default().boolean(CKA_EXTRACTABLE, true),
        ),
        (
            "SENSITIVE=FALSE",
            Template::default().boolean(CKA_SENSITIVE, false),
        ),
        (
            "DECRYPT=TRUE",
            Template::default().boolean(CKA_DECRYPT, true),
        ),
    ] {
        expect_rv(
            s.copy_object(session_rsa, t.boolean(CKA_TOKEN, true)),
            CKR_TEMPLATE_INCONSISTENT,
            &format!("C_CopyObject(session private key, TOKEN+{name})"),
        );
    }
}

#[test]
#[serial]
fn copying_a_token_key_is_prohibited() {
    let s = s();
    let x = wrap_cmk(&s, 32);
    let c = data_cmk(&s);
    let (_, rsa) = rsa_pair(&s, true, &[CKA_SIGN]);
    for (name, k) in [
        ("wrap CMK", x),
        ("data CMK", c),
        ("RSA token private key", rsa),
    ] {
        expect_rv(
            s.copy_object(k, Template::default()),
            CKR_ACTION_PROHIBITED,
            &format!("C_CopyObject({name})"),
        );
        // Copying it out of the token as a session object would make it a DEK.
        expect_rv(
            s.copy_object(k, Template::default().boolean(CKA_TOKEN, false)),
            CKR_ACTION_PROHIBITED,
            &format!("C_CopyObject({name}, TOKEN=FALSE)"),
        );
    }
}

#[test]
#[serial]
fn promoted_dek_becomes_an_unwrappable_cmk() {
    let s = s();
    let x = wrap_cmk(&s, 32);
    // An extractable DEK may exist outside the token (wrapped): it never becomes a CMK.
    let extractable = dek(&s, 32, true);
    expect_rv(
        s.copy_object(
            extractable,
            Template::default()
                .boolean(CKA_TOKEN, true)
                .bytes(CKA_LABEL, &unique_label("promoted")),
        ),
        CKR_ACTION_PROHIBITED,
        "C_CopyObject(extractable DEK -> token)",
    );
    let d = dek(&s, 32, false);
    let copy = ok(
        s.copy_object(
            d,
            Template::default()
                .boolean(CKA_TOKEN, true)
                .bytes(CKA_LABEL, &unique_label("promoted"))
                .bytes(CKA_ID, &[9]),
        ),
        "C_CopyObject(non-extractable DEK -> token)",
    );
    assert!(s.get_bool(copy, CKA_TOKEN));
    assert!(s.get_bool(copy, CKA_SENSITIVE));
    assert!(
        !s.get_bool(copy, CKA_EXTRACTABLE),
        "promoted copy still extractable"
    );
    expect_rv(
        s.wrap(&mut Mech::new(KWP), x, copy),
        CKR_KEY_UNEXTRACTABLE,
        "C_WrapKey(wrap CMK, promoted copy)",
    );
    expect_rv(
        s.copy_object(copy, Template::default()),
        CKR_ACTION_PROHIBITED,
        "C_CopyObject(promoted copy)",
    );
}

#[test]
#[serial]
fn legit_keytool_promotes_a_session_private_key() {
    // Java keytool: session key pair, then C_CopyObject(private, {TOKEN, ID}).
    let s = s();
    let (public, private) = rsa_pair(&s, false, &[CKA_SIGN]);
    let copy = ok(
        s.copy_object(
            private,
            Template::default()
                .boolean(CKA_TOKEN, true)
                .bytes(CKA_ID, b"keytool-alias"),
        ),
        "C_CopyObject(session private key, TOKEN+ID)",
    );
    assert!(s.get_bool(copy, CKA_TOKEN));
    assert!(s.get_bool(copy, CKA_SENSITIVE));
    assert!(!s.get_bool(copy, CKA_EXTRACTABLE));
    assert_eq!(s.get_attr(copy, CKA_ID).unwrap(), b"keytool-alias");
    assert_unreadable(&s, copy, CKA_PRIVATE_EXPONENT, "promoted private key");
    let msg = b"signed by the promoted key";
    let sig = ok(
        s.sign(&mut Mech::pss(CKM_SHA256_RSA_PKCS_PSS), copy, msg),
        "PSS sign with the copy",
    );
    ok(
        s.verify(&mut Mech::pss(CKM_SHA256_RSA_PKCS_PSS), public, msg, &sig),
        "PSS verify",
    );
    // The copy is a CMK: it cannot be copied again.
    expect_rv(
        s.copy_object(copy, Template::default()),
        CKR_ACTION_PROHIBITED,
        "C_CopyObject(promoted private key)",
    );
}

// =======================================================================================
// Bardou et al. 2012: padding oracles; Clulow: raw RSA.
// =======================================================================================

#[test]
#[serial]
fn bardou_rsa_pkcs1_v15_unwrap_and_decrypt_oracle_refused() {
    let s = s();
    // pkcs11-tool style RSA key (sign+decrypt) that may also unwrap.
    let (public, private) = rsa_pair(&s, true, &[CKA_SIGN, CKA_DECRYPT, CKA_UNWRAP]);
    let ct = random(&s, 256);
    expect_rv(
        s.unwrap(&mut Mech::new(CKM_RSA_PKCS), private, &ct, unwrap_t()),
        CKR_MECHANISM_INVALID,
        "C_UnwrapKey(RSA_PKCS)",
    );
    // Decryption with PKCS#1 v1.5 is off by default (the contract gives no code: the
    // mechanism is not offered for decryption; both codes are accepted).
    expect_rv_in(
        s.decrypt_init(&mut Mech::new(CKM_RSA_PKCS), private),
        &[CKR_MECHANISM_INVALID, CKR_KEY_FUNCTION_NOT_PERMITTED],
        "C_DecryptInit(RSA_PKCS) without allow_rsa_pkcs1_decrypt",
    );
    // Raw RSA: a decryption oracle under any name.
    expect_rv(
        s.decrypt_init(&mut Mech::new(CKM_RSA_X_509), private),
        CKR_MECHANISM_INVALID,
        "C_DecryptInit(RSA_X_509)",
    );
    expect_rv(
        s.sign_init(&mut Mech::new(CKM_RSA_X_509), private),
        CKR_MECHANISM_INVALID,
        "C_SignInit(RSA_X_509)",
    );
    expect_rv(
        s.unwrap(&mut Mech::new(CKM_RSA_X_509), private, &ct, unwrap_t()),
        CKR_MECHANISM_INVALID,
        "C_UnwrapKey(RSA_X_509)",
    );
    expect_rv(
        s.encrypt_init(&mut Mech::new(CKM_RSA_X_509), public),
        CKR_MECHANISM_INVALID,
        "C_EncryptInit(RSA_X_509, public key)",
    );
    // Legitimate: RSA-OAEP decryption and PKCS#1 v1.5 / PSS signatures.
    let ct = ok(
        s.encrypt(&mut Mech::oaep(), public, b"premaster"),
        "OAEP encrypt",
    );
    assert_eq!(
        ok(s.decrypt(&mut Mech::oaep(), private, &ct), "OAEP decrypt"),
        b"premaster"
    );
    let sig = ok(
        s.sign(&mut Mech::new(CKM_SHA256_RSA_PKCS), private, b"tls"),
        "SHA256_RSA_PKCS sign",
    );
    ok(
        s.verify(&mut Mech::new(CKM_SHA256_RSA_PKCS), public, b"tls", &sig),
        "SHA256_RSA_PKCS verify",
    );
}

#[test]
#[serial]
fn bardou_cbc_pad_and_other_block_mode_unwrap_refused() {
    let s = s();
    let x = wrap_cmk(&s, 32);
    let blob = random(&s, 48);
    for (name, mut m) in block_modes() {
        expect_rv(
            s.unwrap(&mut m, x, &blob, unwrap_t()),
            CKR_MECHANISM_INVALID,
            &format!("C_UnwrapKey({name}, wrap CMK)"),
        );
    }
    let d = dek(&s, 32, true);
    for (name, mut m) in block_modes() {
        expect_rv(
            s.wrap(&mut m, x, d),
            CKR_MECHANISM_INVALID,
            &format!("C_WrapKey({name}, wrap CMK)"),
        );
    }
}

#[test]
#[serial]
fn manger_rsa_oaep_unwrap_failures_are_uniform() {
    let s = s();
    let (public, private) = rsa_pair(&s, true, &[CKA_UNWRAP]);
    let good = ok(
        s.encrypt(&mut Mech::oaep(), public, &[0x11; 32]),
        "OAEP encrypt",
    );
    let mut high = good.clone();
    high[0] = 0xff; // >= modulus, or a first byte != 0 after decryption
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    for i in [1usize, 2, 17, 64, 100, 128, 200, 254, 255] {
        let mut b = good.clone();
        b[i] ^= 0x01;
        cases.push((format!("byte {i} flipped"), b));
    }
    let more: Vec<(&str, Vec<u8>)> = vec![
        ("first byte 0xff", high),
        ("random", random(&s, 256)),
        ("all 0xff", vec![0xff; 256]),
        ("truncated by one", good[..255].to_vec()),
        ("half length", good[..128].to_vec()),
        ("one byte too long", [good.as_slice(), &[0]].concat()),
    ];
    cases.extend(more.into_iter().map(|(n, b)| (n.to_string(), b)));
    for (name, blob) in cases {
        expect_rv(
            s.unwrap(&mut Mech::oaep(), private, &blob, unwrap_t()),
            CKR_WRAPPED_KEY_INVALID,
            &format!("C_UnwrapKey(OAEP, {name})"),
        );
    }
}

#[test]
#[serial]
fn corrupted_truncated_wrong_length_kw_blobs_give_one_code() {
    let s = s();
    let x = wrap_cmk(&s, 32);
    let y = wrap_cmk(&s, 32);
    let d = dek(&s, 32, true);
    for m in [KWP, KW] {
        let blob = ok(s.wrap(&mut Mech::new(m), x, d), "C_WrapKey");
        let flip = |i: usize| {
            let mut b = blob.clone();
            b[i] ^= 0x80;
            b
        };
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("first byte flipped (integrity check value)", flip(0)),
            ("middle byte flipped", flip(20)),
            ("last byte flipped", flip(blob.len() - 1)),
            ("truncated by 8", blob[..blob.len() - 8].to_vec()),
            ("truncated by 1", blob[..blob.len() - 1].to_vec()),
            ("extended by 8", [blob.as_slice(), &[0u8; 8]].concat()),
            ("extended by 1", [blob.as_slice(), &[0u8; 1]].concat()),
            ("8 bytes", blob[..8].to_vec()),
            ("16 zero bytes", vec![0u8; 16]),
        ];
        for (name, b) in cases {
            expect_rv(
                s.unwrap(&mut Mech::new(m), x, &b, unwrap_t()),
                CKR_WRAPPED_KEY_INVALID,
                &format!("C_UnwrapKey(0x{m:x}, {name})"),
            );
        }
        expect_rv(
            s.unwrap(&mut Mech::new(m), y, &blob, unwrap_t()),
            CKR_WRAPPED_KEY_INVALID,
            &format!("C_UnwrapKey(0x{m:x}, blob of another CMK)"),
        );
    }
    // KWP blob through KW and the reverse: also the blob's fault.
    let kwp = ok(s.wrap(&mut Mech::new(KWP), x, d), "C_WrapKey(KWP)");
    let kw = ok(s.wrap(&mut Mech::new(KW), x, d), "C_WrapKey(KW)");
    expect_rv(
        s.unwrap(&mut Mech::new(KW), x, &kwp, unwrap_t()),
        CKR_WRAPPED_KEY_INVALID,
        "C_UnwrapKey(KW, KWP blob)",
    );
    expect_rv(
        s.unwrap(&mut Mech::new(KWP), x, &kw, unwrap_t()),
        CKR_WRAPPED_KEY_INVALID,
        "C_UnwrapKey(KWP, KW blob)",
    );
}

#[test]
#[serial]
fn unwrap_value_len_comes_from_the_blob() {
    // Clulow-style key shortening: ask for 16 bytes of a 32-byte key. The contract takes
    // CKA_VALUE_LEN from the blob only; the call may be refused (no code specified), but
    // it must never produce a shortened key.
    let s = s();
    let x = wrap_cmk(&s, 32);
    let d = dek(&s, 32, true);
    let ct = ok(
        s.encrypt(&mut Mech::gcm(&GCM_IV, b""), d, b"full key"),
        "GCM",
    );
    let blob = kwp_blob(&s, x, d);
    if let Ok(u) = s.unwrap(
        &mut Mech::new(KWP),
        x,
        &blob,
        unwrap_t()
            .ulong(CKA_VALUE_LEN, 16)
            .boolean(CKA_ENCRYPT, true)
            .boolean(CKA_DECRYPT, true),
    ) {
        assert_eq!(
            s.get_ulong(u, CKA_VALUE_LEN),
            32,
            "CKA_VALUE_LEN not from the blob"
        );
        assert_eq!(
            ok(
                s.decrypt(&mut Mech::gcm(&GCM_IV, b""), u, &ct),
                "GCM decrypt"
            ),
            b"full key"
        );
    }
}

// =======================================================================================
// Key provenance: a DEK stays with the CMK it came from.
// =======================================================================================

#[test]
#[serial]
fn session_copy_does_not_launder_dek_provenance() {
    // DESIGN.md allows C_CopyObject only to promote a session key into the token; a
    // session-to-session copy may be refused outright (that stops the attack too). If it
    // is allowed, the copy must keep the provenance of its source.
    let s = s();
    let x = wrap_cmk(&s, 32);
    let y = wrap_cmk(&s, 32);
    let d = dek(&s, 32, true);
    let blob = kwp_blob(&s, x, d);
    let u = ok(
        s.unwrap(
            &mut Mech::new(KWP),
            x,
            &blob,
            unwrap_t()
                .boolean(CKA_EXTRACTABLE, true)
                .boolean(CKA_ENCRYPT, true)
                .boolean(CKA_DECRYPT, true),
        ),
        "C_UnwrapKey(X)",
    );
    for (name, k) in [("DEK first wrapped by X", d), ("DEK unwrapped by X", u)] {
        match s.copy_object(k, Template::default().bytes(CKA_LABEL, b"laundered")) {
            Err(rv) => assert!(
                rv == CKR_ACTION_PROHIBITED || rv == CKR_TEMPLATE_INCONSISTENT,
                "C_CopyObject({name}, LABEL): {}",
                common::rv_name(rv)
            ),
            Ok(copy) => {
                expect_rv(
                    s.wrap(&mut Mech::new(KWP), y, copy),
                    CKR_KEY_NOT_WRAPPABLE,
                    &format!("C_WrapKey(Y, session copy of a {name})"),
                );
                assert_eq!(
                    kwp_blob(&s, x, copy),
                    blob,
                    "X re-wraps the copy of a {name}"
                );
            }
        }
    }
}

#[test]
#[serial]
fn dek_from_cmk_x_cannot_be_wrapped_by_cmk_y() {
    let s = s();
    let x = wrap_cmk(&s, 32);
    let y = wrap_cmk(&s, 32);
    // First wrapped by X.
    let d = dek(&s, 32, true);
    let blob = kwp_blob(&s, x, d);
    expect_rv(
        s.wrap(&mut Mech::new(KWP), y, d),
        CKR_KEY_NOT_WRAPPABLE,
        "C_WrapKey(Y, DEK first wrapped by X)",
    );
    expect_rv(
        s.wrap(&mut Mech::new(KW), y, d),
        CKR_KEY_NOT_WRAPPABLE,
        "C_WrapKey(KW, Y, DEK first wrapped by X)",
    );
    // X may wrap it again (KW and KWP are deterministic: same blob).
    assert_eq!(kwp_blob(&s, x, d), blob, "re-wrap by X");
    ok(
        s.wrap(&mut Mech::new(KW), x, d),
        "C_WrapKey(KW, X, same DEK)",
    );
    // Unwrapped by X.
    let u = ok(
        s.unwrap(
            &mut Mech::new(KWP),
            x,
            &blob,
            unwrap_t()
                .boolean(CKA_EXTRACTABLE, true)
                .boolean(CKA_ENCRYPT, true)
                .boolean(CKA_DECRYPT, true),
        ),
        "C_UnwrapKey(X)",
    );
    expect_rv(
        s.wrap(&mut Mech::new(KWP), y, u),
        CKR_KEY_NOT_WRAPPABLE,
        "C_WrapKey(Y, DEK unwrapped by X)",
    );
    assert_eq!(
        kwp_blob(&s, x, u),
        blob,
        "re-wrap of the unwrapped DEK by X"
    );
    // A fresh DEK first wrapped by Y belongs to Y.
    let d2 = dek(&s, 32, true);
    ok(
        s.wrap(&mut Mech::new(KWP), y, d2),
        "C_WrapKey(Y, fresh DEK)",
    );
    expect_rv(
        s.wrap(&mut Mech::new(KWP), x, d2),
        CKR_KEY_NOT_WRAPPABLE,
        "C_WrapKey(X, DEK first wrapped by Y)",
    );
    // A non-extractable DEK is not wrapped by anyone.
    let fixed = dek(&s, 32, false);
    expect_rv(
        s.wrap(&mut Mech::new(KWP), x, fixed),
        CKR_KEY_UNEXTRACTABLE,
        "C_WrapKey(X, non-extractable DEK)",
    );
}

// =======================================================================================
// Caml Crush / CryptokiX: trusted-key and read-only attributes in templates.
// =======================================================================================

#[test]
#[serial]
fn read_only_attributes_in_creating_templates_refused() {
    let s = s();
    let ro = [
        ("ALWAYS_SENSITIVE", CKA_ALWAYS_SENSITIVE),
        ("NEVER_EXTRACTABLE", CKA_NEVER_EXTRACTABLE),
        ("LOCAL", CKA_LOCAL),
        ("TRUSTED", CKA_TRUSTED),
    ];
    let x = wrap_cmk(&s, 32);
    let blob = kwp_blob(&s, x, dek(&s, 32, true));
    for (name, a) in ro {
        for v in [true, false] {
            expect_rv(
                s.generate_key(
                    CKM_AES_KEY_GEN,
                    aes(true, 32)
                        .boolean(CKA_WRAP, true)
                        .boolean(CKA_UNWRAP, true)
                        .boolean(a, v),
                ),
                CKR_ATTRIBUTE_READ_ONLY,
                &format!("C_GenerateKey(wrap CMK, {name}={v})"),
            );
            expect_rv(
                s.generate_key(
                    CKM_AES_KEY_GEN,
                    aes(false, 32).boolean(CKA_ENCRYPT, true).boolean(a, v),
                ),
                CKR_ATTRIBUTE_READ_ONLY,
                &format!("C_GenerateKey(DEK, {name}={v})"),
            );
            let public = Template::default()
                .ulong(CKA_CLASS, CKO_PUBLIC_KEY)
                .ulong(CKA_KEY_TYPE, CKK_EC)
                .bytes(CKA_EC_PARAMS, &common::P256_PARAMS)
                .boolean(CKA_TOKEN, false)
                .boolean(CKA_VERIFY, true);
            let private = Template::default()
                .ulong(CKA_CLASS, CKO_PRIVATE_KEY)
                .boolean(CKA_TOKEN, false)
                .boolean(CKA_SIGN, true)
                .boolean(a, v);
            expect_rv(
                s.generate_key_pair(CKM_EC_KEY_PAIR_GEN, public, private),
                CKR_ATTRIBUTE_READ_ONLY,
                &format!("C_GenerateKeyPair(private {name}={v})"),
            );
            expect_rv(
                s.unwrap(&mut Mech::new(KWP), x, &blob, unwrap_t().boolean(a, v)),
                CKR_ATTRIBUTE_READ_ONLY,
                &format!("C_UnwrapKey({name}={v})"),
            );
        }
    }
}

#[test]
#[serial]
fn weakening_creation_templates_refused() {
    let s = s();
    let cases: Vec<(&str, Template)> = vec![
        (
            "token AES EXTRACTABLE=TRUE",
            aes(true, 32)
                .boolean(CKA_ENCRYPT, true)
                .boolean(CKA_DECRYPT, true)
                .boolean(CKA_EXTRACTABLE, true),
        ),
        (
            "token AES SENSITIVE=FALSE",
            aes(true, 32)
                .boolean(CKA_WRAP, true)
                .boolean(CKA_UNWRAP, true)
                .boolean(CKA_SENSITIVE, false),
        ),
        (
            "session AES SENSITIVE=FALSE",
            aes(false, 32)
                .boolean(CKA_ENCRYPT, true)
                .boolean(CKA_SENSITIVE, false),
        ),
        (
            "session AES SENSITIVE=FALSE EXTRACTABLE=TRUE",
            aes(false, 32)
                .boolean(CKA_ENCRYPT, true)
                .boolean(CKA_SENSITIVE, false)
                .boolean(CKA_EXTRACTABLE, true),
        ),
        (
            "token AES WRAP_WITH_TRUSTED=FALSE",
            aes(true, 32)
                .boolean(CKA_ENCRYPT, true)
                .boolean(CKA_DECRYPT, true)
                .boolean(CKA_WRAP_WITH_TRUSTED, false),
        ),
        (
            "session AES WRAP_WITH_TRUSTED=FALSE",
            aes(false, 32)
                .boolean(CKA_ENCRYPT, true)
                .boolean(CKA_EXTRACTABLE, true)
                .boolean(CKA_WRAP_WITH_TRUSTED, false),
        ),
    ];
    for (name, t) in cases {
        expect_rv(
            s.generate_key(CKM_AES_KEY_GEN, t),
            CKR_TEMPLATE_INCONSISTENT,
            &format!("C_GenerateKey({name})"),
        );
    }
    for token in [true, false] {
        for (name, a, v) in [
            ("EXTRACTABLE=TRUE", CKA_EXTRACTABLE, true),
            ("SENSITIVE=FALSE", CKA_SENSITIVE, false),
        ] {
            let public = Template::default()
                .ulong(CKA_CLASS, CKO_PUBLIC_KEY)
                .ulong(CKA_KEY_TYPE, CKK_RSA)
                .ulong(CKA_MODULUS_BITS, 2048)
                .bytes(CKA_PUBLIC_EXPONENT, &[1, 0, 1])
                .boolean(CKA_TOKEN, token)
                .boolean(CKA_VERIFY, true);
            let private = Template::default()
                .ulong(CKA_CLASS, CKO_PRIVATE_KEY)
                .boolean(CKA_TOKEN, token)
                .boolean(CKA_SIGN, true)
                .boolean(a, v);
            expect_rv(
                s.generate_key_pair(CKM_RSA_PKCS_KEY_PAIR_GEN, public, private),
                CKR_TEMPLATE_INCONSISTENT,
                &format!("C_GenerateKeyPair(RSA private token={token} {name})"),
            );
        }
    }
}

// =======================================================================================
// Silent templates do not inherit the backend's permissive defaults.
// =======================================================================================

#[test]
#[serial]
fn silent_templates_get_policy_defaults_not_backend_defaults() {
    let s = s();
    let x = ok(
        s.generate_key(CKM_AES_KEY_GEN, aes(true, 32)),
        "C_GenerateKey(token AES, no usage)",
    );
    assert_usage(&s, x, &[CKA_WRAP, CKA_UNWRAP], "silent token AES key");
    assert!(s.get_bool(x, CKA_SENSITIVE));
    assert!(!s.get_bool(x, CKA_EXTRACTABLE));
    // It really is a wrap CMK.
    let d = dek(&s, 32, true);
    ok(s.wrap(&mut Mech::new(KWP), x, d), "silent wrap CMK wraps");

    let d = ok(
        s.generate_key(CKM_AES_KEY_GEN, aes(false, 32)),
        "C_GenerateKey(session AES, no usage)",
    );
    assert_usage(&s, d, &[CKA_ENCRYPT, CKA_DECRYPT], "silent session AES key");
    assert!(s.get_bool(d, CKA_SENSITIVE));

    for token in [true, false] {
        let public = Template::default()
            .ulong(CKA_CLASS, CKO_PUBLIC_KEY)
            .ulong(CKA_KEY_TYPE, CKK_RSA)
            .ulong(CKA_MODULUS_BITS, 2048)
            .bytes(CKA_PUBLIC_EXPONENT, &[1, 0, 1])
            .boolean(CKA_TOKEN, token);
        let private = Template::default()
            .ulong(CKA_CLASS, CKO_PRIVATE_KEY)
            .boolean(CKA_TOKEN, token);
        let (_, rsa) = ok(
            s.generate_key_pair(CKM_RSA_PKCS_KEY_PAIR_GEN, public, private),
            "C_GenerateKeyPair(RSA, silent)",
        );
        assert_usage(&s, rsa, &[CKA_SIGN], "silent RSA private key");
        if let Ok(v) = s.get_attr(rsa, CKA_SIGN_RECOVER) {
            assert_eq!(v, [0], "silent RSA private key has SIGN_RECOVER");
        }
        assert!(s.get_bool(rsa, CKA_SENSITIVE));
        assert!(!s.get_bool(rsa, CKA_EXTRACTABLE));

        let public = Template::default()
            .ulong(CKA_CLASS, CKO_PUBLIC_KEY)
            .ulong(CKA_KEY_TYPE, CKK_EC)
            .bytes(CKA_EC_PARAMS, &common::P256_PARAMS)
            .boolean(CKA_TOKEN, token);
        let private = Template::default()
            .ulong(CKA_CLASS, CKO_PRIVATE_KEY)
            .boolean(CKA_TOKEN, token);
        let (_, ec) = ok(
            s.generate_key_pair(CKM_EC_KEY_PAIR_GEN, public, private),
            "C_GenerateKeyPair(EC, silent)",
        );
        assert_usage(&s, ec, &[CKA_SIGN], "silent EC private key");
        assert!(s.get_bool(ec, CKA_SENSITIVE));
        assert!(!s.get_bool(ec, CKA_EXTRACTABLE));
    }
}

// =======================================================================================
// Key separation between roles (every *Init, C_WrapKey, C_UnwrapKey).
// =======================================================================================

#[test]
#[serial]
fn keys_cannot_be_used_outside_their_role() {
    let s = s();
    let x = wrap_cmk(&s, 32);
    let c = data_cmk(&s);
    let m = mac_cmk(&s);
    let d = dek(&s, 32, true);
    let d2 = dek(&s, 32, true);
    let blob = kwp_blob(&s, x, d);
    // data CMK: no wrap, unwrap, mac.
    expect_rv(
        s.wrap(&mut Mech::new(KWP), c, d2),
        CKR_KEY_FUNCTION_NOT_PERMITTED,
        "C_WrapKey(data CMK)",
    );
    expect_rv(
        s.unwrap(&mut Mech::new(KWP), c, &blob, unwrap_t()),
        CKR_KEY_FUNCTION_NOT_PERMITTED,
        "C_UnwrapKey(data CMK)",
    );
    expect_rv(
        s.sign_init(&mut Mech::new(CKM_AES_CMAC), c),
        CKR_KEY_FUNCTION_NOT_PERMITTED,
        "C_SignInit(CMAC, data CMK)",
    );
    // mac CMK: no encryption, no wrap. (An AES mac CMK, for CMAC, so that the key type
    // fits GCM and only the role is wrong.)
    let aes_mac = ok(
        s.generate_key(
            CKM_AES_KEY_GEN,
            aes(true, 32)
                .boolean(CKA_SIGN, true)
                .boolean(CKA_VERIFY, true),
        ),
        "C_GenerateKey(AES mac CMK)",
    );
    expect_rv(
        s.encrypt_init(&mut Mech::gcm(&GCM_IV, b""), aes_mac),
        CKR_KEY_FUNCTION_NOT_PERMITTED,
        "C_EncryptInit(GCM, AES mac CMK)",
    );
    expect_rv(
        s.decrypt_init(&mut Mech::bytes(CKM_AES_CBC_PAD, &CBC_IV), aes_mac),
        CKR_KEY_FUNCTION_NOT_PERMITTED,
        "C_DecryptInit(CBC_PAD, AES mac CMK)",
    );
    ok(
        s.sign(&mut Mech::new(CKM_AES_CMAC), aes_mac, b"x"),
        "CMAC with the AES mac CMK",
    );
    expect_rv(
        s.wrap(&mut Mech::new(KWP), aes_mac, d2),
        CKR_KEY_FUNCTION_NOT_PERMITTED,
        "C_WrapKey(AES mac CMK)",
    );
    // data DEK: no wrap, no mac.
    expect_rv(
        s.wrap(&mut Mech::new(KWP), d, d2),
        CKR_KEY_FUNCTION_NOT_PERMITTED,
        "C_WrapKey(DEK)",
    );
    expect_rv(
        s.sign_init(&mut Mech::new(CKM_AES_CMAC), d),
        CKR_KEY_FUNCTION_NOT_PERMITTED,
        "C_SignInit(CMAC, data DEK)",
    );
    // Data CMKs get only GCM and CBC-PAD; ECB/CBC (codebook oracles) are for DEKs only.
    for (name, mut mech) in [
        ("AES_ECB", Mech::new(CKM_AES_ECB)),
        ("AES_CBC", Mech::bytes(CKM_AES_CBC, &CBC_IV)),
    ] {
        expect_rv_in(
            s.encrypt_init(&mut mech, c),
            &[CKR_KEY_FUNCTION_NOT_PERMITTED, CKR_MECHANISM_INVALID],
            &format!("C_EncryptInit({name}, data CMK)"),
        );
    }
    // Private keys: sign-only RSA cannot decrypt/unwrap; decrypt-only cannot sign.
    let (public, sign_only) = rsa_pair(&s, true, &[CKA_SIGN]);
    let ct = ok(
        s.encrypt(&mut Mech::oaep(), public, &[1; 32]),
        "OAEP encrypt",
    );
    expect_rv(
        s.decrypt_init(&mut Mech::oaep(), sign_only),
        CKR_KEY_FUNCTION_NOT_PERMITTED,
        "C_DecryptInit(OAEP, sign-only RSA key)",
    );
    expect_rv(
        s.unwrap(&mut Mech::oaep(), sign_only, &ct, unwrap_t()),
        CKR_KEY_FUNCTION_NOT_PERMITTED,
        "C_UnwrapKey(OAEP, sign-only RSA key)",
    );
    let (_, decrypt_only) = rsa_pair(&s, false, &[CKA_DECRYPT]);
    expect_rv(
        s.sign_init(&mut Mech::new(CKM_SHA256_RSA_PKCS), decrypt_only),
        CKR_KEY_FUNCTION_NOT_PERMITTED,
        "C_SignInit(SHA256_RSA_PKCS, decrypt-only RSA key)",
    );
    // Legit: each key in its own role.
    ok(
        s.encrypt(&mut Mech::gcm(&GCM_IV, b""), c, b"x"),
        "GCM with data CMK",
    );
    ok(
        s.sign(&mut Mech::new(CKM_SHA256_HMAC), m, b"x"),
        "HMAC with mac CMK",
    );
    ok(
        s.encrypt(&mut Mech::new(CKM_AES_ECB), d, &[0u8; 16]),
        "ECB with data DEK",
    );
}

// =======================================================================================
// Other leaks: C_DigestKey, operation state, DES.
// =======================================================================================

#[test]
#[serial]
fn digest_key_refused() {
    let s = s();
    let x = wrap_cmk(&s, 32);
    let c = data_cmk(&s);
    let d = dek(&s, 32, true);
    for (name, k) in [("wrap CMK", x), ("data CMK", c), ("DEK", d)] {
        let mut m = Mech::new(CKM_SHA256);
        let mut cm = m.raw();
        assert_rv!(
            ck!(common::raw().f, C_DigestInit, s.h, &mut cm),
            CKR_OK,
            "C_DigestInit"
        );
        assert_rv!(
            ck!(common::raw().f, C_DigestKey, s.h, k),
            CKR_KEY_INDIGESTIBLE,
            "C_DigestKey({})",
            name
        );
        // End the digest operation.
        let mut out = [0u8; 32];
        let mut n: CK_ULONG = 32;
        let _ = ck!(
            common::raw().f,
            C_DigestFinal,
            s.h,
            out.as_mut_ptr(),
            &mut n
        );
    }
}

#[test]
#[serial]
fn operation_state_cannot_be_exported_or_forged() {
    let s = s();
    let c = data_cmk(&s);
    let mut m = Mech::bytes(CKM_AES_CBC_PAD, &CBC_IV);
    let mut cm = m.raw();
    assert_rv!(
        ck!(common::raw().f, C_EncryptInit, s.h, &mut cm, c),
        CKR_OK,
        "C_EncryptInit"
    );
    let mut n: CK_ULONG = 0;
    assert_rv!(
        ck!(
            common::raw().f,
            C_GetOperationState,
            s.h,
            std::ptr::null_mut(),
            &mut n
        ),
        CKR_FUNCTION_NOT_SUPPORTED,
        "C_GetOperationState"
    );
    let x = wrap_cmk(&s, 32);
    let mut state = vec![0u8; 64];
    assert_rv!(
        ck!(
            common::raw().f,
            C_SetOperationState,
            s.h,
            state.as_mut_ptr(),
            state.len() as CK_ULONG,
            x,
            0
        ),
        CKR_FUNCTION_NOT_SUPPORTED,
        "C_SetOperationState(encryption key = wrap CMK)"
    );
}

#[test]
#[serial]
fn des_is_not_offered() {
    let s = s();
    for (name, m) in [
        ("DES_KEY_GEN", CKM_DES_KEY_GEN),
        ("DES2_KEY_GEN", CKM_DES2_KEY_GEN),
        ("DES3_KEY_GEN", CKM_DES3_KEY_GEN),
    ] {
        expect_rv(
            s.generate_key(
                m,
                Template::default()
                    .ulong(CKA_CLASS, CKO_SECRET_KEY)
                    .boolean(CKA_TOKEN, false)
                    .boolean(CKA_ENCRYPT, true),
            ),
            CKR_MECHANISM_INVALID,
            &format!("C_GenerateKey({name})"),
        );
    }
    let d = dek(&s, 32, true);
    expect_rv(
        s.encrypt_init(&mut Mech::new(CKM_DES3_ECB), d),
        CKR_MECHANISM_INVALID,
        "C_EncryptInit(DES3_ECB)",
    );
}

// =======================================================================================
// What the token reports: mechanism list and flags.
// =======================================================================================

fn mechanism_list(slot: CK_SLOT_ID) -> Vec<CK_MECHANISM_TYPE> {
    let f = common::raw().f;
    let mut n: CK_ULONG = 0;
    assert_rv!(
        ck!(f, C_GetMechanismList, slot, std::ptr::null_mut(), &mut n),
        CKR_OK
    );
    let mut v = vec![0 as CK_MECHANISM_TYPE; n as usize];
    assert_rv!(
        ck!(f, C_GetMechanismList, slot, v.as_mut_ptr(), &mut n),
        CKR_OK
    );
    v.truncate(n as usize);
    v
}

fn mechanism_info(slot: CK_SLOT_ID, m: CK_MECHANISM_TYPE) -> Rv<CK_MECHANISM_INFO> {
    let mut info = CK_MECHANISM_INFO {
        ulMinKeySize: 0,
        ulMaxKeySize: 0,
        flags: 0,
    };
    let r = ck!(common::raw().f, C_GetMechanismInfo, slot, m, &mut info);
    if r == CKR_OK {
        Ok(info)
    } else {
        Err(r)
    }
}

#[test]
#[serial]
fn mechanism_list_hides_what_the_policy_refuses() {
    let slot = init("");
    let list = mechanism_list(slot);
    let hidden = [
        ("RSA_X_509", CKM_RSA_X_509),
        ("DES_KEY_GEN", CKM_DES_KEY_GEN),
        ("DES2_KEY_GEN", CKM_DES2_KEY_GEN),
        ("DES3_KEY_GEN", CKM_DES3_KEY_GEN),
        ("DES_ECB", CKM_DES_ECB),
        ("DES_CBC", CKM_DES_CBC),
        ("DES_CBC_PAD", CKM_DES_CBC_PAD),
        ("DES3_ECB", CKM_DES3_ECB),
        ("DES3_CBC", CKM_DES3_CBC),
        ("DES3_CBC_PAD", CKM_DES3_CBC_PAD),
        ("DES3_CMAC", CKM_DES3_CMAC),
        ("AES_ECB_ENCRYPT_DATA", CKM_AES_ECB_ENCRYPT_DATA),
        ("AES_CBC_ENCRYPT_DATA", CKM_AES_CBC_ENCRYPT_DATA),
        ("DES_ECB_ENCRYPT_DATA", CKM_DES_ECB_ENCRYPT_DATA),
        ("DES_CBC_ENCRYPT_DATA", CKM_DES_CBC_ENCRYPT_DATA),
        ("DES3_ECB_ENCRYPT_DATA", CKM_DES3_ECB_ENCRYPT_DATA),
        ("DES3_CBC_ENCRYPT_DATA", CKM_DES3_CBC_ENCRYPT_DATA),
        ("CONCATENATE_BASE_AND_KEY", CKM_CONCATENATE_BASE_AND_KEY),
        ("CONCATENATE_BASE_AND_DATA", CKM_CONCATENATE_BASE_AND_DATA),
        ("CONCATENATE_DATA_AND_BASE", CKM_CONCATENATE_DATA_AND_BASE),
        ("XOR_BASE_AND_DATA", CKM_XOR_BASE_AND_DATA),
        ("EXTRACT_KEY_FROM_KEY", CKM_EXTRACT_KEY_FROM_KEY),
        ("DH_PKCS_DERIVE", CKM_DH_PKCS_DERIVE),
    ];
    for (name, m) in hidden {
        assert!(!list.contains(&m), "mechanism list offers {name}");
        expect_rv(
            mechanism_info(slot, m),
            CKR_MECHANISM_INVALID,
            &format!("C_GetMechanismInfo({name})"),
        );
    }
    for (name, m) in [
        ("AES_KEY_GEN", CKM_AES_KEY_GEN),
        ("AES_KEY_WRAP", KW),
        ("AES_KEY_WRAP_PAD", KWP),
        ("AES_GCM", CKM_AES_GCM),
        ("AES_CBC_PAD", CKM_AES_CBC_PAD),
        ("RSA_PKCS_KEY_PAIR_GEN", CKM_RSA_PKCS_KEY_PAIR_GEN),
        ("RSA_PKCS_PSS", CKM_RSA_PKCS_PSS),
        ("SHA256_RSA_PKCS_PSS", CKM_SHA256_RSA_PKCS_PSS),
        ("RSA_PKCS_OAEP", CKM_RSA_PKCS_OAEP),
        ("EC_KEY_PAIR_GEN", CKM_EC_KEY_PAIR_GEN),
        ("ECDSA", CKM_ECDSA),
        ("ECDH1_DERIVE", CKM_ECDH1_DERIVE),
        ("SHA256_HMAC", CKM_SHA256_HMAC),
    ] {
        assert!(list.contains(&m), "mechanism list lacks {name}");
    }
    for m in [KW, KWP] {
        let info = ok(mechanism_info(slot, m), "C_GetMechanismInfo(KW/KWP)");
        assert_eq!(
            info.flags & (CKF_ENCRYPT | CKF_DECRYPT),
            0,
            "AES key wrap 0x{m:x} advertises encrypt/decrypt"
        );
        assert_eq!(
            info.flags & (CKF_WRAP | CKF_UNWRAP),
            CKF_WRAP | CKF_UNWRAP,
            "AES key wrap 0x{m:x} lacks wrap/unwrap"
        );
    }
    for (name, m) in [
        ("AES_CBC", CKM_AES_CBC),
        ("AES_ECB", CKM_AES_ECB),
        ("AES_CBC_PAD", CKM_AES_CBC_PAD),
        ("AES_GCM", CKM_AES_GCM),
    ] {
        if let Ok(info) = mechanism_info(slot, m) {
            assert_eq!(
                info.flags & (CKF_WRAP | CKF_UNWRAP),
                0,
                "{name} advertises wrap/unwrap"
            );
            assert_eq!(info.flags & CKF_DERIVE, 0, "{name} advertises derive");
        }
    }
    let rsa = ok(
        mechanism_info(slot, CKM_RSA_PKCS),
        "C_GetMechanismInfo(RSA_PKCS)",
    );
    assert_eq!(rsa.flags & CKF_UNWRAP, 0, "RSA_PKCS advertises unwrap");
    assert_eq!(
        rsa.flags & CKF_DECRYPT,
        0,
        "RSA_PKCS advertises decrypt without allow_rsa_pkcs1_decrypt"
    );
    assert_ne!(rsa.flags & CKF_SIGN, 0, "RSA_PKCS lost sign");
}
