//! Legitimate flows of DESIGN.md §1 through the built module with the CMK policy on (the
//! default, strict profile) over a real SoftHSM2 token: the policy must not break them.
//!
//! Every test is `#[serial]` (SoftHSM2 2.6.1 races token key generation against
//! `C_FindObjects` in another thread).

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

/// Envelope encryption: a wrap CMK in the token, a DEK generated in the token, the DEK
/// leaves only as an AES-KWP blob stored with the data, and comes back by C_UnwrapKey.
#[test]
#[serial]
fn envelope_flow_kwp_and_gcm() {
    let s = s();
    let cmk = ok(
        s.generate_key(
            CKM_AES_KEY_GEN,
            aes(true, 32)
                .boolean(CKA_WRAP, true)
                .boolean(CKA_UNWRAP, true)
                .bytes(CKA_LABEL, b"envelope-cmk")
                .bytes(CKA_ID, b"env-1"),
        ),
        "generate wrap CMK",
    );
    assert!(!s.get_bool(cmk, CKA_EXTRACTABLE));
    assert!(s.get_bool(cmk, CKA_SENSITIVE));

    // Encrypt: fresh DEK, GCM over the payload, wrap the DEK.
    let dek = ok(
        s.generate_key(
            CKM_AES_KEY_GEN,
            aes(false, 32)
                .boolean(CKA_ENCRYPT, true)
                .boolean(CKA_DECRYPT, true)
                .boolean(CKA_EXTRACTABLE, true),
        ),
        "generate DEK",
    );
    let payload: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
    let iv = random(&s, 12);
    let aad = b"object-id=42";
    let ct = ok(
        s.encrypt(&mut Mech::gcm(&iv, aad), dek, &payload),
        "GCM encrypt",
    );
    assert_eq!(ct.len(), payload.len() + 16);
    let blob = ok(s.wrap(&mut Mech::kwp(), cmk, dek), "C_WrapKey(KWP)");
    assert_eq!(blob.len(), 40);
    ok(s.destroy(dek), "destroy DEK");

    // Decrypt, later: unwrap the blob, GCM-decrypt, and encrypt again with the same DEK.
    let dek2 = ok(
        s.unwrap(
            &mut Mech::kwp(),
            cmk,
            &blob,
            Template::default()
                .ulong(CKA_CLASS, CKO_SECRET_KEY)
                .ulong(CKA_KEY_TYPE, CKK_AES)
                .boolean(CKA_TOKEN, false)
                .boolean(CKA_ENCRYPT, true)
                .boolean(CKA_DECRYPT, true),
        ),
        "C_UnwrapKey(KWP)",
    );
    assert_eq!(s.get_ulong(dek2, CKA_VALUE_LEN), 32);
    assert_eq!(
        ok(
            s.decrypt(&mut Mech::gcm(&iv, aad), dek2, &ct),
            "GCM decrypt"
        ),
        payload
    );
    let iv2 = random(&s, 12);
    let ct2 = ok(
        s.encrypt(&mut Mech::gcm(&iv2, aad), dek2, b"second object"),
        "GCM encrypt with the unwrapped DEK",
    );
    assert_eq!(
        ok(
            s.decrypt(&mut Mech::gcm(&iv2, aad), dek2, &ct2),
            "GCM decrypt"
        ),
        b"second object"
    );
    // Tampering is detected (and is not a key problem).
    let mut bad = ct.clone();
    bad[0] ^= 1;
    expect_rv(
        s.decrypt(&mut Mech::gcm(&iv, aad), dek2, &bad),
        CKR_ENCRYPTED_DATA_INVALID,
        "GCM decrypt of tampered ciphertext",
    );
}

/// Oracle TDE style: a data CMK found by label, AES-CBC-PAD encrypt/decrypt of a 32-byte
/// table key, from a second session as the database would after a restart.
#[test]
#[serial]
fn oracle_tde_style_cbc_pad_with_data_cmk_by_label() {
    let s = s();
    let hex: String = random(&s, 16).iter().map(|b| format!("{b:02X}")).collect();
    let label = format!("ORACLE.TDE.HSM.MK.{hex}");
    let mk = ok(
        s.generate_key(
            CKM_AES_KEY_GEN,
            aes(true, 32)
                .boolean(CKA_ENCRYPT, true)
                .boolean(CKA_DECRYPT, true)
                .boolean(CKA_PRIVATE, true)
                .bytes(CKA_LABEL, label.as_bytes()),
        ),
        "generate TDE master key",
    );
    let table_key = random(&s, 32);
    let iv = random(&s, 16);
    let ct = ok(
        s.encrypt(&mut Mech::bytes(CKM_AES_CBC_PAD, &iv), mk, &table_key),
        "CBC-PAD encrypt of the table key",
    );
    assert_eq!(ct.len(), 48);
    drop(s);

    let s2 = session();
    let found = ok(
        s2.find(
            Template::default()
                .ulong(CKA_CLASS, CKO_SECRET_KEY)
                .bytes(CKA_LABEL, label.as_bytes()),
        ),
        "C_FindObjects by label",
    );
    assert_eq!(found.len(), 1, "objects labelled {label}");
    let mk2 = found[0];
    assert_eq!(s2.get_ulong(mk2, CKA_KEY_TYPE), CKK_AES);
    assert_eq!(
        ok(
            s2.decrypt(&mut Mech::bytes(CKM_AES_CBC_PAD, &iv), mk2, &ct),
            "CBC-PAD decrypt of the table key"
        ),
        table_key
    );
    let _ = mk;
    // GCM is also offered to a data CMK.
    let gcm_iv = random(&s2, 12);
    let ct = ok(
        s2.encrypt(&mut Mech::gcm(&gcm_iv, b""), mk2, &table_key),
        "GCM encrypt with the master key",
    );
    assert_eq!(
        ok(
            s2.decrypt(&mut Mech::gcm(&gcm_iv, b""), mk2, &ct),
            "GCM decrypt"
        ),
        table_key
    );
}

/// TLS server key: RSA-PSS and PKCS#1 v1.5 signatures with a token private key.
#[test]
#[serial]
fn rsa_pss_and_pkcs1_signing() {
    let s = s();
    let (public, private) = rsa_pair(&s, true, &[CKA_SIGN]);
    let msg = b"TLS 1.3 CertificateVerify content";
    let sig = ok(
        s.sign(&mut Mech::pss(CKM_SHA256_RSA_PKCS_PSS), private, msg),
        "SHA256_RSA_PKCS_PSS sign",
    );
    assert_eq!(sig.len(), 256);
    ok(
        s.verify(&mut Mech::pss(CKM_SHA256_RSA_PKCS_PSS), public, msg, &sig),
        "PSS verify",
    );
    expect_rv(
        s.verify(
            &mut Mech::pss(CKM_SHA256_RSA_PKCS_PSS),
            public,
            b"other message",
            &sig,
        ),
        CKR_SIGNATURE_INVALID,
        "PSS verify of another message",
    );
    // Raw PSS over a pre-computed hash (what the OpenSSL engine sends).
    let digest = [0x5cu8; 32];
    let sig = ok(
        s.sign(&mut Mech::pss(CKM_RSA_PKCS_PSS), private, &digest),
        "RSA_PKCS_PSS sign of a digest",
    );
    ok(
        s.verify(&mut Mech::pss(CKM_RSA_PKCS_PSS), public, &digest, &sig),
        "RSA_PKCS_PSS verify",
    );
    // PKCS#1 v1.5 signatures (TLS 1.2).
    let sig = ok(
        s.sign(&mut Mech::new(CKM_SHA256_RSA_PKCS), private, msg),
        "SHA256_RSA_PKCS sign",
    );
    ok(
        s.verify(&mut Mech::new(CKM_SHA256_RSA_PKCS), public, msg, &sig),
        "SHA256_RSA_PKCS verify",
    );
    let sig = ok(
        s.sign(&mut Mech::new(CKM_RSA_PKCS), private, &digest),
        "RSA_PKCS sign",
    );
    ok(
        s.verify(&mut Mech::new(CKM_RSA_PKCS), public, &digest, &sig),
        "RSA_PKCS verify",
    );
}

/// ECDSA P-256 signing with a token key (and a session key).
#[test]
#[serial]
fn ecdsa_signing() {
    let s = s();
    for token in [true, false] {
        let (public, private) = ec_pair(&s, token, &[CKA_SIGN]);
        // SoftHSM2 2.6 offers CKM_ECDSA only (the caller hashes), as TLS stacks use it.
        let hash = [0xabu8; 32];
        let sig = ok(
            s.sign(&mut Mech::new(CKM_ECDSA), private, &hash),
            "ECDSA sign of a hash",
        );
        assert_eq!(sig.len(), 64);
        ok(
            s.verify(&mut Mech::new(CKM_ECDSA), public, &hash, &sig),
            "ECDSA verify",
        );
        let mut bad = sig.clone();
        bad[10] ^= 1;
        expect_rv(
            s.verify(&mut Mech::new(CKM_ECDSA), public, &hash, &bad),
            CKR_SIGNATURE_INVALID,
            "ECDSA verify of a bad signature",
        );
    }
}

/// Java SunPKCS11 KeyGenerator: the template holds only CKA_CLASS and CKA_VALUE_LEN; the
/// key is a session DEK used for AES-GCM.
#[test]
#[serial]
fn java_style_session_key_with_class_and_length_only() {
    let s = s();
    let k = ok(
        s.generate_key(
            CKM_AES_KEY_GEN,
            Template::default()
                .ulong(CKA_CLASS, CKO_SECRET_KEY)
                .ulong(CKA_VALUE_LEN, 32),
        ),
        "C_GenerateKey(CLASS + VALUE_LEN)",
    );
    assert!(!s.get_bool(k, CKA_TOKEN), "Java key became a token object");
    assert_usage(&s, k, &[CKA_ENCRYPT, CKA_DECRYPT], "Java session key");
    let iv = random(&s, 12);
    let ct = ok(
        s.encrypt(&mut Mech::gcm(&iv, b"java aad"), k, b"Cipher.doFinal"),
        "GCM encrypt",
    );
    assert_eq!(
        ok(
            s.decrypt(&mut Mech::gcm(&iv, b"java aad"), k, &ct),
            "GCM decrypt"
        ),
        b"Cipher.doFinal"
    );
    // Java also uses AES/CBC/PKCS5Padding and AES/ECB/NoPadding with session keys.
    let iv16 = random(&s, 16);
    let ct = ok(
        s.encrypt(&mut Mech::bytes(CKM_AES_CBC_PAD, &iv16), k, b"cbc"),
        "CBC-PAD encrypt",
    );
    assert_eq!(
        ok(
            s.decrypt(&mut Mech::bytes(CKM_AES_CBC_PAD, &iv16), k, &ct),
            "CBC-PAD decrypt"
        ),
        b"cbc"
    );
    let block = [0x33u8; 16];
    let ct = ok(
        s.encrypt(&mut Mech::new(CKM_AES_ECB), k, &block),
        "ECB encrypt",
    );
    assert_eq!(
        ok(
            s.decrypt(&mut Mech::new(CKM_AES_ECB), k, &ct),
            "ECB decrypt"
        ),
        block
    );
}

/// HMAC with a mac CMK (and CMAC with an AES mac CMK).
#[test]
#[serial]
fn hmac_and_cmac_with_mac_cmks() {
    let s = s();
    // 64 bytes: SoftHSM2 wants at least the hash length for SHA-384/512 HMAC keys.
    let m = ok(
        s.generate_key(
            CKM_GENERIC_SECRET_KEY_GEN,
            Template::default()
                .ulong(CKA_CLASS, CKO_SECRET_KEY)
                .ulong(CKA_KEY_TYPE, CKK_GENERIC_SECRET)
                .ulong(CKA_VALUE_LEN, 64)
                .boolean(CKA_TOKEN, true)
                .boolean(CKA_SIGN, true)
                .boolean(CKA_VERIFY, true)
                .bytes(CKA_LABEL, b"hmac-cmk"),
        ),
        "generate 64-byte mac CMK",
    );
    let msg = b"message to authenticate";
    for mech in [CKM_SHA256_HMAC, CKM_SHA384_HMAC, CKM_SHA512_HMAC] {
        let tag = ok(s.sign(&mut Mech::new(mech), m, msg), "HMAC sign");
        ok(s.verify(&mut Mech::new(mech), m, msg, &tag), "HMAC verify");
        expect_rv(
            s.verify(&mut Mech::new(mech), m, b"other", &tag),
            CKR_SIGNATURE_INVALID,
            "HMAC verify of another message",
        );
    }
    let tag = ok(
        s.sign(&mut Mech::new(CKM_SHA256_HMAC), m, msg),
        "HMAC-SHA256",
    );
    assert_eq!(tag.len(), 32);
    let cmac_key = ok(
        s.generate_key(
            CKM_AES_KEY_GEN,
            aes(true, 32)
                .boolean(CKA_SIGN, true)
                .boolean(CKA_VERIFY, true),
        ),
        "generate AES mac CMK",
    );
    let tag = ok(
        s.sign(&mut Mech::new(CKM_AES_CMAC), cmac_key, msg),
        "AES-CMAC sign",
    );
    assert_eq!(tag.len(), 16);
    ok(
        s.verify(&mut Mech::new(CKM_AES_CMAC), cmac_key, msg, &tag),
        "AES-CMAC verify",
    );
    // A session HMAC DEK (mac role).
    let mac_dek = ok(
        s.generate_key(
            CKM_GENERIC_SECRET_KEY_GEN,
            Template::default()
                .ulong(CKA_CLASS, CKO_SECRET_KEY)
                .ulong(CKA_KEY_TYPE, CKK_GENERIC_SECRET)
                .ulong(CKA_VALUE_LEN, 32)
                .boolean(CKA_TOKEN, false)
                .boolean(CKA_SIGN, true)
                .boolean(CKA_VERIFY, true),
        ),
        "generate mac DEK",
    );
    let tag = ok(
        s.sign(&mut Mech::new(CKM_SHA256_HMAC), mac_dek, msg),
        "HMAC with mac DEK",
    );
    ok(
        s.verify(&mut Mech::new(CKM_SHA256_HMAC), mac_dek, msg, &tag),
        "HMAC verify with mac DEK",
    );
}

/// pkcs11-tool asks sign+decrypt for RSA keys; NSS asks sign+derive for EC keys.
#[test]
#[serial]
fn multi_role_private_keys_as_clients_ask_them() {
    let s = s();
    let (public, private) = rsa_pair(&s, true, &[CKA_SIGN, CKA_DECRYPT]);
    assert_usage(&s, private, &[CKA_SIGN, CKA_DECRYPT], "pkcs11-tool RSA key");
    let sig = ok(
        s.sign(&mut Mech::pss(CKM_SHA256_RSA_PKCS_PSS), private, b"m"),
        "PSS sign",
    );
    ok(
        s.verify(&mut Mech::pss(CKM_SHA256_RSA_PKCS_PSS), public, b"m", &sig),
        "PSS verify",
    );
    let ct = ok(
        s.encrypt(&mut Mech::oaep(), public, b"secret"),
        "OAEP encrypt",
    );
    assert_eq!(
        ok(s.decrypt(&mut Mech::oaep(), private, &ct), "OAEP decrypt"),
        b"secret"
    );

    let (a_pub, a_priv) = ec_pair(&s, true, &[CKA_SIGN, CKA_DERIVE]);
    assert_usage(&s, a_priv, &[CKA_SIGN, CKA_DERIVE], "NSS EC key");
    let sig = ok(
        s.sign(&mut Mech::new(CKM_ECDSA), a_priv, &[0x61; 32]),
        "ECDSA sign",
    );
    ok(
        s.verify(&mut Mech::new(CKM_ECDSA), a_pub, &[0x61; 32], &sig),
        "ECDSA verify",
    );
    let (b_pub, _) = ec_pair(&s, false, &[CKA_DERIVE]);
    let k = ok(
        s.derive(
            &mut Mech::ecdh(&ec_point(&s, b_pub)),
            a_priv,
            Template::default()
                .ulong(CKA_CLASS, CKO_SECRET_KEY)
                .ulong(CKA_KEY_TYPE, CKK_GENERIC_SECRET)
                .ulong(CKA_VALUE_LEN, 32)
                .boolean(CKA_TOKEN, false)
                .boolean(CKA_SIGN, true)
                .boolean(CKA_VERIFY, true),
        ),
        "ECDH1 derive of a mac DEK",
    );
    assert!(s.get_bool(k, CKA_SENSITIVE));
    assert!(!s.get_bool(k, CKA_EXTRACTABLE));
    ok(
        s.sign(&mut Mech::new(CKM_SHA256_HMAC), k, b"m"),
        "HMAC with the derived key",
    );
}

/// A silent token AES key is a wrap CMK and works for the envelope flow as is.
#[test]
#[serial]
fn default_role_wrap_cmk_works_for_envelopes() {
    let s = s();
    let cmk = ok(
        s.generate_key(
            CKM_AES_KEY_GEN,
            aes(true, 32).bytes(CKA_LABEL, b"silent-cmk"),
        ),
        "generate silent token AES key",
    );
    let d = dek(&s, 32, true);
    let blob = ok(
        s.wrap(&mut Mech::new(CKM_AES_KEY_WRAP), cmk, d),
        "C_WrapKey(KW)",
    );
    let u = ok(
        s.unwrap(
            &mut Mech::new(CKM_AES_KEY_WRAP),
            cmk,
            &blob,
            Template::default()
                .ulong(CKA_CLASS, CKO_SECRET_KEY)
                .ulong(CKA_KEY_TYPE, CKK_AES),
        ),
        "C_UnwrapKey(KW, silent template)",
    );
    let iv = random(&s, 12);
    let ct = ok(s.encrypt(&mut Mech::gcm(&iv, b""), d, b"x"), "GCM");
    assert_eq!(ok(s.decrypt(&mut Mech::gcm(&iv, b""), u, &ct), "GCM"), b"x");
}

/// The usual session-DEK templates (C_GenerateKey, C_UnwrapKey) take cmkp11's short way,
/// which reads the application's attributes as they came; any other attribute sends the
/// template the general way. Both must make the same key and refuse the same templates:
/// each template is tried as it is and with a CKA_SIGN_RECOVER=FALSE added (which the
/// policy drops from a secret key's template, and which only the general way takes).
#[test]
#[serial]
fn session_dek_short_and_general_way_agree() {
    let s = s();
    let cmk = wrap_cmk(&s, 32);
    let source = dek(&s, 32, true);
    let blob = ok(s.wrap(&mut Mech::kwp(), cmk, source), "wrap");
    const READ: [CK_ATTRIBUTE_TYPE; 11] = [
        CKA_ENCRYPT,
        CKA_DECRYPT,
        CKA_SIGN,
        CKA_VERIFY,
        CKA_WRAP,
        CKA_UNWRAP,
        CKA_DERIVE,
        CKA_SENSITIVE,
        CKA_EXTRACTABLE,
        CKA_TOKEN,
        CKA_PRIVATE,
    ];
    let facts = |k: CK_OBJECT_HANDLE| {
        let mut v: Vec<(CK_ATTRIBUTE_TYPE, Vec<u8>)> = READ
            .iter()
            .map(|&t| (t, vec![u8::from(s.get_bool(k, t))]))
            .collect();
        for t in [CKA_CLASS, CKA_KEY_TYPE, CKA_VALUE_LEN] {
            v.push((t, s.get_ulong(k, t).to_ne_bytes().to_vec()));
        }
        v.push((CKA_LABEL, s.get_attr(k, CKA_LABEL).unwrap_or_default()));
        v
    };
    type Make = fn() -> Template;
    let templates: [(&str, Make); 8] = [
        ("class only", || {
            Template::default().ulong(CKA_CLASS, CKO_SECRET_KEY)
        }),
        ("benchmark's complete data DEK", complete_dek),
        ("over the short way's 16 attributes", || {
            complete_dek()
                .bytes(CKA_LABEL, b"dek-many")
                .bytes(CKA_ID, b"8")
                .boolean(CKA_MODIFIABLE, true)
                .boolean(CKA_COPYABLE, true)
                .boolean(CKA_DESTROYABLE, true)
        }),
        ("silent on usage, labelled", || {
            dek_template()
                .bytes(CKA_LABEL, b"dek-label")
                .bytes(CKA_ID, b"7")
        }),
        ("mac DEK", || {
            dek_template()
                .boolean(CKA_SIGN, true)
                .boolean(CKA_VERIFY, true)
        }),
        ("encrypt only", || {
            dek_template()
                .boolean(CKA_ENCRYPT, true)
                .boolean(CKA_DECRYPT, false)
        }),
        ("not sensitive (refused)", || {
            dek_template().boolean(CKA_SENSITIVE, false)
        }),
        ("mixed roles (refused)", || {
            dek_template()
                .boolean(CKA_ENCRYPT, true)
                .boolean(CKA_SIGN, true)
        }),
    ];
    let mut made = 0;
    let mut refused = Vec::new();
    for (what, make) in templates {
        let general = || make().boolean(CKA_SIGN_RECOVER, false);
        // C_GenerateKey (with a length).
        let short = s.generate_key(CKM_AES_KEY_GEN, make().ulong(CKA_VALUE_LEN, 16));
        let long = s.generate_key(CKM_AES_KEY_GEN, general().ulong(CKA_VALUE_LEN, 16));
        match (short, long) {
            (Ok(a), Ok(b)) => {
                assert_eq!(facts(a), facts(b), "C_GenerateKey, {what}");
                made += 1;
            }
            (a, b) => {
                assert_eq!(a.err(), b.err(), "C_GenerateKey, {what}");
                refused.push(("generate", what, a.unwrap_err()));
            }
        }
        // C_UnwrapKey of the same blob.
        let mut m = Mech::kwp();
        let short = s.unwrap(&mut m, cmk, &blob, make());
        let long = s.unwrap(&mut m, cmk, &blob, general());
        match (short, long) {
            (Ok(a), Ok(b)) => {
                assert_eq!(facts(a), facts(b), "C_UnwrapKey, {what}");
                assert_eq!(s.get_ulong(a, CKA_VALUE_LEN), 32, "{what}");
                made += 1;
            }
            (a, b) => {
                assert_eq!(a.err(), b.err(), "C_UnwrapKey, {what}");
                refused.push(("unwrap", what, a.unwrap_err()));
            }
        }
    }
    assert_eq!(made, 11, "keys made both ways");
    assert_eq!(
        refused,
        [
            // The token needs the key type to unwrap (both ways alike).
            ("unwrap", "class only", CKR_TEMPLATE_INCOMPLETE),
            (
                "generate",
                "not sensitive (refused)",
                CKR_TEMPLATE_INCONSISTENT
            ),
            (
                "unwrap",
                "not sensitive (refused)",
                CKR_TEMPLATE_INCONSISTENT
            ),
            (
                "generate",
                "mixed roles (refused)",
                CKR_TEMPLATE_INCONSISTENT
            ),
            ("unwrap", "mixed roles (refused)", CKR_TEMPLATE_INCONSISTENT),
        ]
    );
}

/// A session AES key's template, silent on usage and length.
/// The benchmark's data DEK template: every usage flag stated (13 attributes).
fn complete_dek() -> Template {
    dek_template()
        .boolean(CKA_PRIVATE, true)
        .boolean(CKA_SENSITIVE, true)
        .boolean(CKA_EXTRACTABLE, false)
        .boolean(CKA_ENCRYPT, true)
        .boolean(CKA_DECRYPT, true)
        .boolean(CKA_SIGN, false)
        .boolean(CKA_VERIFY, false)
        .boolean(CKA_WRAP, false)
        .boolean(CKA_UNWRAP, false)
        .boolean(CKA_DERIVE, false)
}

fn dek_template() -> Template {
    Template::default()
        .ulong(CKA_CLASS, CKO_SECRET_KEY)
        .ulong(CKA_KEY_TYPE, CKK_AES)
        .boolean(CKA_TOKEN, false)
}
