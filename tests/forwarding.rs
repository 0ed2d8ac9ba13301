//! Forwarding tests: the module used through `cryptoki`, exactly as an application would.
//!
//! Every test is `#[serial]`: login state is shared by all sessions of a process (some
//! tests need a precise login state or close every session), and SoftHSM2 2.6.1 itself
//! fails (`CKR_GENERAL_ERROR`) when a token key pair is generated while another thread
//! runs `C_FindObjects` on the same token, with or without cmkp11 in between. Concurrency
//! is exercised on purpose, without that race, in `threads.rs`.

#[macro_use]
mod common;

use common::{expect_rv, pkcs11, slot, user_session, P256_PARAMS, TOKEN_LABEL};
use cryptoki::error::RvError;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::types::AuthPin;
use serial_test::serial;

/// SHA-256("abc"), FIPS 180-2 appendix B.1.
const SHA256_ABC: [u8; 32] = [
    0xba, 0x78, 0x16, 0xbf, 0x8f, 0x01, 0xcf, 0xea, 0x41, 0x41, 0x40, 0xde, 0x5d, 0xae, 0x22, 0x23,
    0xb0, 0x03, 0x61, 0xa3, 0x96, 0x17, 0x7a, 0x9c, 0xb4, 0x10, 0xff, 0x61, 0xf2, 0x00, 0x15, 0xad,
];

fn label(s: &str) -> Attribute {
    Attribute::Label(s.as_bytes().to_vec())
}

/// Deterministic test data of `len` bytes.
fn data(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + 7) as u8).collect()
}

/// A token AES-256 data key (encrypt/decrypt), sensitive and non-extractable.
fn token_data_key(s: &Session, name: &str) -> ObjectHandle {
    s.generate_key(
        &Mechanism::AesKeyGen,
        &[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(32.into()),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            label(name),
        ],
    )
    .expect("C_GenerateKey (token AES data key)")
}

/// A session AES-256 key (encrypt/decrypt), sensitive, extractable as asked.
fn session_data_key(s: &Session, name: &str, extractable: bool) -> ObjectHandle {
    s.generate_key(
        &Mechanism::AesKeyGen,
        &[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(32.into()),
            Attribute::Token(false),
            Attribute::Sensitive(true),
            Attribute::Extractable(extractable),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            label(name),
        ],
    )
    .expect("C_GenerateKey (session AES key)")
}

/// A token AES-256 wrap key (wrap/unwrap only), sensitive and non-extractable.
fn token_wrap_key(s: &Session, name: &str) -> ObjectHandle {
    s.generate_key(
        &Mechanism::AesKeyGen,
        &[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(32.into()),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Wrap(true),
            Attribute::Unwrap(true),
            label(name),
        ],
    )
    .expect("generate wrap key")
}

fn gcm_encrypt(s: &Session, key: ObjectHandle, iv: &[u8; 12], aad: &[u8], pt: &[u8]) -> Vec<u8> {
    let mut iv = *iv;
    let params = GcmParams::new(&mut iv, aad, 128.into()).expect("GcmParams");
    s.encrypt(&Mechanism::AesGcm(params), key, pt)
        .expect("C_Encrypt AES-GCM")
}

fn gcm_decrypt(
    s: &Session,
    key: ObjectHandle,
    iv: &[u8; 12],
    aad: &[u8],
    ct: &[u8],
) -> cryptoki::error::Result<Vec<u8>> {
    let mut iv = *iv;
    let params = GcmParams::new(&mut iv, aad, 128.into()).expect("GcmParams");
    s.decrypt(&Mechanism::AesGcm(params), key, ct)
}

/// Closes every session of the test slot (which also logs the application out).
fn close_all_sessions() {
    let rv = ck!(common::raw().f, C_CloseAllSessions, slot().id());
    assert_rv!(rv, cryptoki_sys::CKR_OK, "C_CloseAllSessions");
}

#[test]
#[serial]
fn library_info() {
    let info = pkcs11().get_library_info().expect("C_GetInfo");
    let v = info.cryptoki_version();
    assert!(
        (v.major(), v.minor()) == (3, 0) || (v.major(), v.minor()) == (2, 40),
        "cryptokiVersion {}.{}",
        v.major(),
        v.minor()
    );
    assert_eq!(info.manufacturer_id(), "cmkp11");
}

#[test]
#[serial]
fn slot_list_and_token_info() {
    let ctx = pkcs11();
    let initialized = ctx
        .get_slots_with_initialized_token()
        .expect("C_GetSlotList");
    assert_eq!(initialized.len(), 1, "slots with an initialized token");
    let s = initialized[0];
    assert_eq!(s, slot());
    let token = ctx.get_token_info(s).expect("C_GetTokenInfo");
    assert_eq!(token.label(), TOKEN_LABEL);
    assert_eq!(token.manufacturer_id(), "cmkp11");
    assert!(token.token_initialized());
    assert!(token.user_pin_initialized());
    assert!(token.login_required());
    let slot_info = ctx.get_slot_info(s).expect("C_GetSlotInfo");
    assert!(slot_info.token_present());
    // Every slot reported as having a token is a slot from get_all_slots.
    let all = ctx.get_all_slots().expect("C_GetSlotList(all)");
    assert!(all.contains(&s));
}

#[test]
#[serial]
fn mechanism_list() {
    let mechs = pkcs11()
        .get_mechanism_list(slot())
        .expect("C_GetMechanismList");
    assert!(!mechs.is_empty());
    for m in [
        MechanismType::AES_KEY_GEN,
        MechanismType::AES_GCM,
        MechanismType::AES_CBC_PAD,
        MechanismType::AES_KEY_WRAP_PAD,
        MechanismType::RSA_PKCS_KEY_PAIR_GEN,
        MechanismType::SHA256_RSA_PKCS,
        MechanismType::SHA256_RSA_PKCS_PSS,
        MechanismType::ECC_KEY_PAIR_GEN,
        MechanismType::ECDSA,
    ] {
        assert!(mechs.contains(&m), "mechanism {m} missing from {mechs:?}");
    }
    // Mechanism info is available for a listed mechanism and is sensible.
    let info = pkcs11()
        .get_mechanism_info(slot(), MechanismType::AES_KEY_GEN)
        .expect("C_GetMechanismInfo");
    assert!(info.generate());
    assert!(info.min_key_size() <= 16 && info.max_key_size() >= 32);
}

#[test]
#[serial]
fn login_good_and_bad_pin() {
    close_all_sessions();
    let s = pkcs11().open_rw_session(slot()).expect("C_OpenSession");
    assert_eq!(
        s.get_session_info().unwrap().session_state(),
        SessionState::RwPublic
    );
    let bad = AuthPin::new("9999".into());
    assert_eq!(
        expect_rv(s.login(UserType::User, Some(&bad))),
        RvError::PinIncorrect
    );
    assert_eq!(
        s.get_session_info().unwrap().session_state(),
        SessionState::RwPublic
    );
    s.login(UserType::User, Some(&common::user_pin()))
        .expect("C_Login good PIN");
    assert_eq!(
        s.get_session_info().unwrap().session_state(),
        SessionState::RwUser
    );
    assert_eq!(
        expect_rv(s.login(UserType::User, Some(&common::user_pin()))),
        RvError::UserAlreadyLoggedIn
    );
    s.logout().expect("C_Logout");
    // SoftHSM2 2.6.1 returns CKR_OK here; the spec says CKR_USER_NOT_LOGGED_IN.
    assert_eq!(expect_rv(s.logout()), RvError::UserNotLoggedIn);
}

#[test]
#[serial]
fn generate_aes_256_token_and_session_keys() {
    let s = user_session();
    let tok = token_data_key(&s, "fwd-gen-token");
    let ses = session_data_key(&s, "fwd-gen-session", false);
    assert_ne!(tok.handle(), 0);
    assert_ne!(ses.handle(), 0);
    assert_ne!(tok, ses);
    for (h, is_token) in [(tok, true), (ses, false)] {
        let attrs = s
            .get_attributes(
                h,
                &[
                    AttributeType::Class,
                    AttributeType::KeyType,
                    AttributeType::ValueLen,
                    AttributeType::Token,
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::Local,
                ],
            )
            .expect("C_GetAttributeValue");
        assert_eq!(
            attrs,
            vec![
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen(32.into()),
                Attribute::Token(is_token),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Local(true),
            ]
        );
    }
}

#[test]
#[serial]
fn aes_gcm_round_trip_4k() {
    let s = user_session();
    let key = token_data_key(&s, "fwd-gcm");
    let pt = data(4096);
    let iv = [7u8; 12];
    let aad = b"header";
    let ct = gcm_encrypt(&s, key, &iv, aad, &pt);
    assert_eq!(ct.len(), 4096 + 16);
    assert_ne!(&ct[..4096], &pt[..]);
    assert_eq!(gcm_decrypt(&s, key, &iv, aad, &ct).expect("decrypt"), pt);
}

#[test]
#[serial]
fn aes_gcm_tampered_input_rejected() {
    let s = user_session();
    let key = token_data_key(&s, "fwd-gcm-tamper");
    let pt = data(4096);
    let iv = [8u8; 12];
    let aad = b"header";
    let ct = gcm_encrypt(&s, key, &iv, aad, &pt);
    // Tampered tag, tampered data and wrong AAD are all rejected with
    // CKR_ENCRYPTED_DATA_INVALID (SoftHSM2 2.6.1 returns CKR_GENERAL_ERROR).
    let mut bad = ct.clone();
    bad[4100] ^= 1;
    assert_eq!(
        expect_rv(gcm_decrypt(&s, key, &iv, aad, &bad)),
        RvError::EncryptedDataInvalid
    );
    let mut bad = ct.clone();
    bad[0] ^= 1;
    assert_eq!(
        expect_rv(gcm_decrypt(&s, key, &iv, aad, &bad)),
        RvError::EncryptedDataInvalid
    );
    assert_eq!(
        expect_rv(gcm_decrypt(&s, key, &iv, b"other", &ct)),
        RvError::EncryptedDataInvalid
    );
}

#[test]
#[serial]
fn aes_cbc_pad_round_trip() {
    let s = user_session();
    let key = token_data_key(&s, "fwd-cbc");
    let iv = [0x42u8; 16];
    for len in [0usize, 1, 15, 16, 17, 1000] {
        let pt = data(len);
        let ct = s
            .encrypt(&Mechanism::AesCbcPad(iv), key, &pt)
            .expect("C_Encrypt CBC-PAD");
        assert_eq!(ct.len(), (len / 16 + 1) * 16, "ciphertext length for {len}");
        let back = s
            .decrypt(&Mechanism::AesCbcPad(iv), key, &ct)
            .expect("C_Decrypt CBC-PAD");
        assert_eq!(back, pt, "round trip of {len} bytes");
    }
}

#[test]
#[serial]
fn multi_part_encrypt_decrypt() {
    let s = user_session();
    let key = token_data_key(&s, "fwd-multipart");
    let iv = [0x11u8; 16];
    let mech = Mechanism::AesCbcPad(iv);
    let pt = data(1000);
    let single = s.encrypt(&mech, key, &pt).expect("single-part encrypt");

    s.encrypt_init(&mech, key).expect("C_EncryptInit");
    let mut ct = Vec::new();
    for chunk in [&pt[..7], &pt[7..107], &pt[107..500], &pt[500..]] {
        let out = s.encrypt_update(chunk).expect("C_EncryptUpdate");
        assert_eq!(out.len() % 16, 0, "update output is whole blocks");
        ct.extend(out);
    }
    ct.extend(s.encrypt_final().expect("C_EncryptFinal"));
    assert_eq!(ct, single, "multi-part equals single-part ciphertext");

    s.decrypt_init(&mech, key).expect("C_DecryptInit");
    let mut back = Vec::new();
    for chunk in ct.chunks(33) {
        back.extend(s.decrypt_update(chunk).expect("C_DecryptUpdate"));
    }
    back.extend(s.decrypt_final().expect("C_DecryptFinal"));
    assert_eq!(back, pt);

    // The operation is over: another update is refused.
    assert_eq!(
        expect_rv(s.encrypt_update(b"x")),
        RvError::OperationNotInitialized
    );
}

#[test]
#[serial]
fn aes_kwp_wrap_unwrap() {
    let s = user_session();
    let kek = token_wrap_key(&s, "fwd-kwp-kek");
    let dek = session_data_key(&s, "fwd-kwp-dek", true);
    let blob = s
        .wrap_key(&Mechanism::AesKeyWrapPad, kek, dek)
        .expect("C_WrapKey AES-KWP");
    // RFC 5649: 32-byte key -> 8-byte AIV block + 32 bytes.
    assert_eq!(blob.len(), 40);

    let unwrapped = s
        .unwrap_key(
            &Mechanism::AesKeyWrapPad,
            kek,
            &blob,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::Token(false),
                Attribute::Sensitive(true),
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
                label("fwd-kwp-unwrapped"),
            ],
        )
        .expect("C_UnwrapKey AES-KWP");
    assert_ne!(unwrapped, dek);

    // Same key material: the same GCM encryption gives the same ciphertext, and each key
    // decrypts what the other encrypted.
    let pt = data(256);
    let iv = [3u8; 12];
    let a = gcm_encrypt(&s, dek, &iv, b"", &pt);
    let b = gcm_encrypt(&s, unwrapped, &iv, b"", &pt);
    assert_eq!(a, b);
    assert_eq!(gcm_decrypt(&s, unwrapped, &iv, b"", &a).unwrap(), pt);

    // CKA_VALUE_LEN of the unwrapped key comes from the blob (SoftHSM2 2.6.1 leaves 0).
    let len = s
        .get_attributes(unwrapped, &[AttributeType::ValueLen])
        .unwrap();
    assert_eq!(len, vec![Attribute::ValueLen(32.into())]);
}

#[test]
#[serial]
fn aes_kwp_unwrap_corrupted_blob_rejected() {
    let s = user_session();
    let kek = token_wrap_key(&s, "fwd-kwp-corrupt-kek");
    let dek = session_data_key(&s, "fwd-kwp-corrupt-dek", true);
    let blob = s
        .wrap_key(&Mechanism::AesKeyWrapPad, kek, dek)
        .expect("C_WrapKey AES-KWP");
    // A corrupted blob does not unwrap: CKR_WRAPPED_KEY_INVALID (SoftHSM2 2.6.1 returns
    // CKR_GENERAL_ERROR).
    let mut bad = blob.clone();
    bad[10] ^= 0x80;
    let r = s.unwrap_key(
        &Mechanism::AesKeyWrapPad,
        kek,
        &bad,
        &[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Token(false),
            Attribute::Encrypt(true),
        ],
    );
    assert_eq!(expect_rv(r), RvError::WrappedKeyInvalid);
}

#[test]
#[serial]
fn rsa_2048_sign_verify_pkcs1_and_pss() {
    let s = user_session();
    let (public, private) = s
        .generate_key_pair(
            &Mechanism::RsaPkcsKeyPairGen,
            &[
                Attribute::Token(false),
                Attribute::ModulusBits(2048.into()),
                Attribute::PublicExponent(vec![1, 0, 1]),
                Attribute::Verify(true),
                label("fwd-rsa"),
            ],
            &[
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Sign(true),
                label("fwd-rsa"),
            ],
        )
        .expect("C_GenerateKeyPair RSA-2048");
    let modulus = s.get_attributes(public, &[AttributeType::Modulus]).unwrap();
    match &modulus[..] {
        [Attribute::Modulus(m)] => assert_eq!(m.len(), 256),
        other => panic!("modulus: {other:?}"),
    }
    let msg = b"cmkp11 forwarding test message";

    let sig = s
        .sign(&Mechanism::Sha256RsaPkcs, private, msg)
        .expect("C_Sign SHA256-RSA-PKCS");
    assert_eq!(sig.len(), 256);
    // PKCS#1 v1.5 is deterministic.
    assert_eq!(
        s.sign(&Mechanism::Sha256RsaPkcs, private, msg).unwrap(),
        sig
    );
    s.verify(&Mechanism::Sha256RsaPkcs, public, msg, &sig)
        .expect("C_Verify SHA256-RSA-PKCS");
    assert_eq!(
        expect_rv(s.verify(&Mechanism::Sha256RsaPkcs, public, b"other message", &sig)),
        RvError::SignatureInvalid
    );

    let pss = PkcsPssParams {
        hash_alg: MechanismType::SHA256,
        mgf: PkcsMgfType::MGF1_SHA256,
        s_len: 32.into(),
    };
    let sig1 = s
        .sign(&Mechanism::Sha256RsaPkcsPss(pss), private, msg)
        .expect("C_Sign SHA256-RSA-PSS");
    let sig2 = s
        .sign(&Mechanism::Sha256RsaPkcsPss(pss), private, msg)
        .unwrap();
    assert_eq!(sig1.len(), 256);
    assert_ne!(sig1, sig2, "PSS uses a random salt");
    for sig in [&sig1, &sig2] {
        s.verify(&Mechanism::Sha256RsaPkcsPss(pss), public, msg, sig)
            .expect("C_Verify SHA256-RSA-PSS");
    }
    let mut bad = sig1.clone();
    bad[100] ^= 1;
    assert_eq!(
        expect_rv(s.verify(&Mechanism::Sha256RsaPkcsPss(pss), public, msg, &bad)),
        RvError::SignatureInvalid
    );
}

#[test]
#[serial]
fn ec_p256_ecdsa_sign_verify() {
    let s = user_session();
    let (public, private) = s
        .generate_key_pair(
            &Mechanism::EccKeyPairGen,
            &[
                Attribute::Token(false),
                Attribute::EcParams(P256_PARAMS.to_vec()),
                Attribute::Verify(true),
                label("fwd-ec"),
            ],
            &[
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Sign(true),
                label("fwd-ec"),
            ],
        )
        .expect("C_GenerateKeyPair EC P-256");
    let point = s.get_attributes(public, &[AttributeType::EcPoint]).unwrap();
    match &point[..] {
        // DER OCTET STRING holding an uncompressed point.
        [Attribute::EcPoint(p)] => {
            assert_eq!(p.len(), 67);
            assert_eq!(&p[..3], &[0x04, 0x41, 0x04]);
        }
        other => panic!("EC point: {other:?}"),
    }
    let digest = s.digest(&Mechanism::Sha256, b"ecdsa message").unwrap();
    let sig = s
        .sign(&Mechanism::Ecdsa, private, &digest)
        .expect("C_Sign ECDSA");
    assert_eq!(sig.len(), 64);
    s.verify(&Mechanism::Ecdsa, public, &digest, &sig)
        .expect("C_Verify ECDSA");
    let mut other = digest.clone();
    other[0] ^= 1;
    assert_eq!(
        expect_rv(s.verify(&Mechanism::Ecdsa, public, &other, &sig)),
        RvError::SignatureInvalid
    );
}

#[test]
#[serial]
fn find_objects_by_label() {
    let s = user_session();
    let name = "fwd-find";
    let (public, private) = s
        .generate_key_pair(
            &Mechanism::EccKeyPairGen,
            &[
                Attribute::Token(false),
                Attribute::EcParams(P256_PARAMS.to_vec()),
                Attribute::Verify(true),
                label(name),
            ],
            &[
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Sign(true),
                label(name),
            ],
        )
        .expect("C_GenerateKeyPair");
    let mut found = s.find_objects(&[label(name)]).expect("C_FindObjects");
    found.sort_by_key(|h| h.handle());
    let mut want = vec![public, private];
    want.sort_by_key(|h| h.handle());
    assert_eq!(found, want);
    assert_eq!(
        s.find_objects(&[label(name), Attribute::Class(ObjectClass::PRIVATE_KEY)])
            .unwrap(),
        vec![private]
    );
    assert_eq!(
        s.find_objects(&[label(name), Attribute::Token(false)])
            .unwrap(),
        vec![public]
    );
    assert!(s
        .find_objects(&[label("fwd-find-no-such-label")])
        .unwrap()
        .is_empty());
}

#[test]
#[serial]
fn get_and_set_attribute_label() {
    let s = user_session();
    let key = session_data_key(&s, "fwd-attr-before", false);
    assert_eq!(
        s.get_attributes(key, &[AttributeType::Label]).unwrap(),
        vec![label("fwd-attr-before")]
    );
    s.update_attributes(key, &[label("fwd-attr-after")])
        .expect("C_SetAttributeValue label");
    assert_eq!(
        s.get_attributes(key, &[AttributeType::Label]).unwrap(),
        vec![label("fwd-attr-after")]
    );
    assert_eq!(
        s.find_objects(&[label("fwd-attr-after")]).unwrap(),
        vec![key]
    );
    assert!(s
        .find_objects(&[label("fwd-attr-before")])
        .unwrap()
        .is_empty());
}

#[test]
#[serial]
fn destroy_object_invalidates_handle() {
    let s = user_session();
    let key = session_data_key(&s, "fwd-destroy", false);
    s.destroy_object(key).expect("C_DestroyObject");
    assert_eq!(
        expect_rv(s.get_attributes(key, &[AttributeType::Label])),
        RvError::ObjectHandleInvalid
    );
    assert_eq!(
        expect_rv(s.destroy_object(key)),
        RvError::ObjectHandleInvalid
    );
    assert!(s.find_objects(&[label("fwd-destroy")]).unwrap().is_empty());

    // A key used again and again, then destroyed (by this session or by the other one):
    // the next use is refused with the key handle code, never served from before.
    let iv = [0x44u8; 16];
    for destroyer_is_other in [false, true] {
        let other = user_session();
        let key = session_data_key(&s, "fwd-destroy-used", false);
        for _ in 0..3 {
            s.encrypt(&Mechanism::AesCbcPad(iv), key, &data(16))
                .unwrap();
        }
        if destroyer_is_other {
            other
                .destroy_object(key)
                .expect("C_DestroyObject from another session");
        } else {
            s.destroy_object(key).expect("C_DestroyObject");
        }
        // PKCS#11 names CKR_KEY_HANDLE_INVALID; SoftHSM2 2.6 itself says
        // CKR_OBJECT_HANDLE_INVALID (seen when this file runs against it directly).
        let want = if common::testing_cmkp11() {
            RvError::KeyHandleInvalid
        } else {
            RvError::ObjectHandleInvalid
        };
        assert_eq!(
            expect_rv(s.encrypt_init(&Mechanism::AesCbcPad(iv), key)),
            want,
            "destroyed by the other session: {destroyer_is_other}"
        );
    }
}

#[test]
#[serial]
fn digest_sha256_known_vector() {
    let s = user_session();
    assert_eq!(
        s.digest(&Mechanism::Sha256, b"abc").expect("C_Digest"),
        SHA256_ABC
    );
    s.digest_init(&Mechanism::Sha256).expect("C_DigestInit");
    s.digest_update(b"a").unwrap();
    s.digest_update(b"bc").unwrap();
    assert_eq!(s.digest_final().expect("C_DigestFinal"), SHA256_ABC);
}

#[test]
#[serial]
fn generate_random() {
    let s = user_session();
    let a = s.generate_random_vec(32).expect("C_GenerateRandom");
    let b = s.generate_random_vec(32).expect("C_GenerateRandom");
    assert_eq!(a.len(), 32);
    assert_ne!(a, b);
    assert_ne!(a, vec![0u8; 32]);
    let mut buf = [0u8; 1000];
    s.generate_random_slice(&mut buf).unwrap();
    assert!(buf.iter().filter(|&&x| x == 0).count() < 50);
}

#[test]
#[serial]
fn session_info_states() {
    close_all_sessions();
    let ctx = pkcs11();
    let ro = ctx.open_ro_session(slot()).expect("open RO");
    let rw = ctx.open_rw_session(slot()).expect("open RW");
    let ro_info = ro.get_session_info().unwrap();
    let rw_info = rw.get_session_info().unwrap();
    assert!(!ro_info.read_write());
    assert!(rw_info.read_write());
    assert_eq!(ro_info.slot_id(), slot());
    assert_eq!(ro_info.session_state(), SessionState::RoPublic);
    assert_eq!(rw_info.session_state(), SessionState::RwPublic);

    ro.login(UserType::User, Some(&common::user_pin()))
        .expect("C_Login");
    assert_eq!(
        ro.get_session_info().unwrap().session_state(),
        SessionState::RoUser
    );
    assert_eq!(
        rw.get_session_info().unwrap().session_state(),
        SessionState::RwUser
    );
    // Writing a token object is refused in a read-only session.
    let r = ro.generate_key(
        &Mechanism::AesKeyGen,
        &[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::ValueLen(32.into()),
            Attribute::Token(true),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            label("fwd-ro-token-key"),
        ],
    );
    assert_eq!(expect_rv(r), RvError::SessionReadOnly);

    rw.logout().expect("C_Logout");
    assert_eq!(
        ro.get_session_info().unwrap().session_state(),
        SessionState::RoPublic
    );
    assert_eq!(
        rw.get_session_info().unwrap().session_state(),
        SessionState::RwPublic
    );
}

#[test]
#[serial]
fn close_all_sessions_closes_every_session() {
    let s1 = user_session();
    let s2 = pkcs11().open_ro_session(slot()).unwrap();
    close_all_sessions();
    assert_eq!(
        expect_rv(s1.get_session_info()),
        RvError::SessionHandleInvalid
    );
    assert_eq!(
        expect_rv(s2.get_session_info()),
        RvError::SessionHandleInvalid
    );
    // Closing the last session logged the application out.
    let s3 = pkcs11().open_rw_session(slot()).unwrap();
    assert_eq!(
        s3.get_session_info().unwrap().session_state(),
        SessionState::RwPublic
    );
    drop(s3);
    // s1 and s2 are already closed: do not let their Drop close anything else.
    std::mem::forget(s1);
    std::mem::forget(s2);
}

/// A session object lives as long as its session: when the session closes (alone, or
/// with every session of the slot), its handle is refused everywhere, while the objects of
/// the sessions still open keep working; a token key is untouched.
#[test]
#[serial]
fn session_objects_go_with_their_session() {
    let a = user_session();
    let b = user_session();
    let c = user_session();
    let iv = [0x21u8; 16];
    let mech = Mechanism::AesCbcPad(iv);
    let of_a = [
        session_data_key(&a, "fwd-owned-a1", false),
        session_data_key(&a, "fwd-owned-a2", false),
    ];
    let of_b = session_data_key(&b, "fwd-owned-b", false);
    let token = token_data_key(&c, "fwd-owned-token");
    for k in of_a.iter().chain([&of_b, &token]) {
        c.encrypt(&mech, *k, &data(16)).expect("usable before");
    }
    a.close().expect("C_CloseSession");
    // SoftHSM2 2.6 itself says CKR_OBJECT_HANDLE_INVALID (as in
    // `destroy_object_invalidates_handle`).
    let gone = if common::testing_cmkp11() {
        RvError::KeyHandleInvalid
    } else {
        RvError::ObjectHandleInvalid
    };
    for k in of_a {
        assert_eq!(
            expect_rv(c.encrypt_init(&mech, k)),
            gone,
            "an object of the closed session"
        );
    }
    c.encrypt(&mech, of_b, &data(16))
        .expect("an object of a session still open");
    c.encrypt(&mech, token, &data(16)).expect("a token key");

    close_all_sessions();
    let d = user_session();
    assert_eq!(
        expect_rv(d.encrypt_init(&mech, of_b)),
        gone,
        "after C_CloseAllSessions"
    );
    // The token key stays (its handle may change once every session is closed: SoftHSM2
    // itself gives a new one, cmkp11 keeps it).
    let found = d.find_objects(&[label("fwd-owned-token")]).unwrap();
    assert_eq!(found.len(), 1, "the token key");
    d.encrypt(&mech, found[0], &data(16))
        .expect("the token key");
    destroy_cmk(&d, found[0]);
    std::mem::forget(b);
    std::mem::forget(c);
}

#[test]
#[serial]
fn object_handles_are_stable_and_nonzero() {
    let a = user_session();
    let b = user_session();
    assert_ne!(a.handle(), 0);
    assert_ne!(b.handle(), 0);
    assert_ne!(a.handle(), b.handle());
    let key = token_data_key(&a, "fwd-stable");
    assert_ne!(key.handle(), 0);
    let tmpl = [label("fwd-stable")];
    let in_a1 = a.find_objects(&tmpl).unwrap();
    let in_a2 = a.find_objects(&tmpl).unwrap();
    let in_b = b.find_objects(&tmpl).unwrap();
    assert_eq!(in_a1, vec![key]);
    assert_eq!(in_a2, vec![key]);
    assert_eq!(in_b, vec![key]);
    // A session object is visible from the other session with the same handle too.
    let ses = session_data_key(&a, "fwd-stable-session", false);
    assert_eq!(
        b.find_objects(&[label("fwd-stable-session")]).unwrap(),
        vec![ses]
    );
    // The handle from a find works for an operation in the other session.
    let iv = [9u8; 12];
    let ct = gcm_encrypt(&b, in_b[0], &iv, b"", b"stable");
    assert_eq!(gcm_decrypt(&a, key, &iv, b"", &ct).unwrap(), b"stable");
    // All handles of every object seen are non-zero.
    for h in a.find_objects(&[]).unwrap() {
        assert_ne!(h.handle(), 0);
    }
}

/// What a session can leave behind when it is closed.
/// `C_DestroyObject` of a token key (a CMK): it schedules the key's deletion in library
/// mode; in service mode that is an operator's action, refused to applications.
fn destroy_cmk(s: &Session, key: ObjectHandle) {
    if common::service_mode() {
        assert_eq!(
            expect_rv(s.destroy_object(key)),
            RvError::UserNotLoggedIn,
            "service mode: C_DestroyObject of a CMK is an operator's action"
        );
    } else {
        s.destroy_object(key)
            .expect("C_DestroyObject of a token key");
    }
}

#[derive(Debug, Clone, Copy)]
enum Leftover {
    Nothing,
    SessionKey,
    InitOnly,
    MultiPartUnfinished,
    FinishedOperation,
}

#[test]
#[serial]
fn a_new_session_inherits_nothing_from_a_closed_one() {
    // Another session stays open, so the application stays logged in throughout (and
    // cmkp11 may hand a closed session's backend session to the next one).
    let anchor = user_session();
    let key = token_data_key(&anchor, "fwd-reuse-token-key");
    let iv = [0x11u8; 16];
    let all = [
        Leftover::Nothing,
        Leftover::SessionKey,
        Leftover::InitOnly,
        Leftover::MultiPartUnfinished,
        Leftover::FinishedOperation,
    ];
    for round in 0..3 {
        for left in all {
            for rw in [false, true] {
                let ctx = format!("round {round}, {left:?}, rw {rw}");
                let p = pkcs11();
                let s = if rw {
                    p.open_rw_session(slot()).unwrap()
                } else {
                    p.open_ro_session(slot()).unwrap()
                };
                let mut session_key = None;
                match left {
                    Leftover::Nothing => {}
                    Leftover::SessionKey => {
                        session_key = Some(session_data_key(&s, "fwd-reuse-session-key", false))
                    }
                    Leftover::InitOnly => s.encrypt_init(&Mechanism::AesCbcPad(iv), key).unwrap(),
                    Leftover::MultiPartUnfinished => {
                        s.encrypt_init(&Mechanism::AesCbcPad(iv), key).unwrap();
                        assert_eq!(s.encrypt_update(&data(40)).unwrap().len(), 32, "{ctx}");
                    }
                    Leftover::FinishedOperation => {
                        s.encrypt(&Mechanism::AesCbcPad(iv), key, &data(40))
                            .unwrap();
                    }
                }
                drop(s);
                for rw2 in [false, true] {
                    let t = if rw2 {
                        p.open_rw_session(slot()).unwrap()
                    } else {
                        p.open_ro_session(slot()).unwrap()
                    };
                    let want = if rw2 {
                        SessionState::RwUser
                    } else {
                        SessionState::RoUser
                    };
                    assert_eq!(t.get_session_info().unwrap().session_state(), want, "{ctx}");
                    assert_eq!(
                        t.find_objects(&[label("fwd-reuse-session-key")]).unwrap(),
                        vec![],
                        "{ctx}: a session key outlived its session"
                    );
                    if let Some(k) = session_key {
                        assert_eq!(
                            expect_rv(t.get_attributes(k, &[AttributeType::Label])),
                            RvError::ObjectHandleInvalid,
                            "{ctx}"
                        );
                    }
                    // No operation is active in the new session: a full round trip works.
                    let ct = t
                        .encrypt(&Mechanism::AesCbcPad(iv), key, &data(40))
                        .unwrap_or_else(|e| panic!("{ctx}: C_Encrypt in the next session: {e}"));
                    assert_eq!(
                        t.decrypt(&Mechanism::AesCbcPad(iv), key, &ct).unwrap(),
                        data(40),
                        "{ctx}"
                    );
                }
            }
        }
    }
    destroy_cmk(&anchor, key);
}

#[test]
#[serial]
fn closing_the_last_session_logs_out_even_after_key_use() {
    close_all_sessions();
    let s = user_session();
    let key = token_data_key(&s, "fwd-last-close-key");
    let iv = [0x22u8; 16];
    s.encrypt(&Mechanism::AesCbcPad(iv), key, &data(20))
        .unwrap();
    let ro = pkcs11().open_ro_session(slot()).unwrap();
    s.encrypt(&Mechanism::AesCbcPad(iv), key, &data(20))
        .unwrap();
    drop(ro);
    destroy_cmk(&s, key);
    drop(s); // C_CloseSession of the application's last session
    for rw in [false, true] {
        let t = if rw {
            pkcs11().open_rw_session(slot()).unwrap()
        } else {
            pkcs11().open_ro_session(slot()).unwrap()
        };
        let want = if rw {
            SessionState::RwPublic
        } else {
            SessionState::RoPublic
        };
        assert_eq!(t.get_session_info().unwrap().session_state(), want);
    }
}

#[test]
#[serial]
fn so_login_works_once_the_application_has_no_read_only_session() {
    close_all_sessions();
    let u = user_session();
    let key = token_data_key(&u, "fwd-so-login-key");
    let iv = [0x33u8; 16];
    // Key uses and read-only sessions that come and go.
    for _ in 0..3 {
        let ro = pkcs11().open_ro_session(slot()).unwrap();
        ro.encrypt(&Mechanism::AesCbcPad(iv), key, &data(20))
            .unwrap();
    }
    destroy_cmk(&u, key);
    u.logout().unwrap();
    // With a read-only session open, the token refuses the SO...
    let ro = pkcs11().open_ro_session(slot()).unwrap();
    let so_pin = AuthPin::new(common::SO_PIN.into());
    assert_eq!(
        expect_rv(u.login(UserType::So, Some(&so_pin))),
        RvError::SessionReadOnlyExists
    );
    drop(ro);
    // ... and accepts them once the application has none.
    u.login(UserType::So, Some(&so_pin))
        .expect("C_Login(SO) with only a read-write session open");
    assert_eq!(
        u.get_session_info().unwrap().session_state(),
        SessionState::RwSecurityOfficer
    );
    assert_eq!(
        expect_rv(pkcs11().open_ro_session(slot())),
        RvError::SessionReadWriteSoExists
    );
    u.logout().unwrap();
}

#[test]
#[serial]
fn a_session_closed_by_another_thread_is_invalid_in_this_one() {
    use cryptoki_sys::*;
    let f = common::raw().f;
    for _ in 0..3 {
        let mut h: CK_SESSION_HANDLE = 0;
        let rv = ck!(
            f,
            C_OpenSession,
            slot().id(),
            CKF_SERIAL_SESSION,
            std::ptr::null_mut(),
            None,
            &mut h
        );
        assert_rv!(rv, CKR_OK, "C_OpenSession");
        let mut info = CK_SESSION_INFO::default();
        // Used by this thread (which may remember the lookup)...
        assert_rv!(ck!(f, C_GetSessionInfo, h, &mut info), CKR_OK, "before");
        assert_rv!(ck!(f, C_GetSessionInfo, h, &mut info), CKR_OK, "again");
        // ... closed by another one.
        let closer = std::thread::spawn(move || ck!(common::raw().f, C_CloseSession, h));
        assert_rv!(
            closer.join().unwrap(),
            CKR_OK,
            "C_CloseSession in the other thread"
        );
        assert_rv!(
            ck!(f, C_GetSessionInfo, h, &mut info),
            CKR_SESSION_HANDLE_INVALID,
            "after the other thread closed it"
        );
    }
}
