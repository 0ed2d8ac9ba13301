//! Many threads, each with its own session, running at the same time through one
//! initialized module (`CKF_OS_LOCKING_OK`).
//!
//! The keys are made before the workers start, and the two tests do not overlap
//! (`#[serial]`): SoftHSM2 2.6.1 returns `CKR_GENERAL_ERROR` when a token key pair is
//! generated while another thread runs `C_FindObjects` (see `forwarding.rs`).

mod common;

use std::sync::{Arc, Barrier};
use std::thread;

use serial_test::serial;

use common::{pkcs11, slot, user_session, P256_PARAMS};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState};

const THREADS: usize = 8;
const ROUNDS: usize = 200;
const SIGN_EVERY: usize = 10;

struct Keys {
    aes: ObjectHandle,
    ec_private: ObjectHandle,
    ec_public: ObjectHandle,
    rsa_private: ObjectHandle,
    rsa_public: ObjectHandle,
}

/// Makes the keys in `s`; the public keys are session objects, alive while `s` is open.
fn make_keys(s: &Session) -> Keys {
    let aes = s
        .generate_key(
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
                Attribute::Label(b"threads-aes".to_vec()),
            ],
        )
        .expect("generate AES key");
    let (ec_public, ec_private) = s
        .generate_key_pair(
            &Mechanism::EccKeyPairGen,
            &[
                Attribute::Token(false),
                Attribute::EcParams(P256_PARAMS.to_vec()),
                Attribute::Verify(true),
                Attribute::Label(b"threads-ec".to_vec()),
            ],
            &[
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Sign(true),
                Attribute::Label(b"threads-ec".to_vec()),
            ],
        )
        .expect("generate EC key pair");
    let (rsa_public, rsa_private) = s
        .generate_key_pair(
            &Mechanism::RsaPkcsKeyPairGen,
            &[
                Attribute::Token(false),
                Attribute::ModulusBits(2048.into()),
                Attribute::PublicExponent(vec![1, 0, 1]),
                Attribute::Verify(true),
                Attribute::Label(b"threads-rsa".to_vec()),
            ],
            &[
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Sign(true),
                Attribute::Label(b"threads-rsa".to_vec()),
            ],
        )
        .expect("generate RSA key pair");
    Keys {
        aes,
        ec_private,
        ec_public,
        rsa_private,
        rsa_public,
    }
}

/// One worker: its own session, ROUNDS AES-GCM round trips, signatures every SIGN_EVERY.
/// Returns (session handle, round trips, signatures).
fn worker(id: usize, keys: &Keys, start: &Barrier) -> (u64, usize, usize) {
    let s = pkcs11().open_rw_session(slot()).expect("C_OpenSession");
    // The application is logged in already (main thread's session).
    assert_eq!(
        s.get_session_info().unwrap().session_state(),
        SessionState::RwUser
    );
    start.wait();
    let mut round_trips = 0;
    let mut signatures = 0;
    for i in 0..ROUNDS {
        let mut iv = [0u8; 12];
        iv[..8].copy_from_slice(&(i as u64).to_be_bytes());
        iv[8] = id as u8;
        let aad = format!("thread {id} round {i}");
        let pt: Vec<u8> = (0..(64 + i * 7)).map(|j| (j ^ id ^ i) as u8).collect();

        let mut iv_e = iv;
        let params = GcmParams::new(&mut iv_e, aad.as_bytes(), 128.into()).unwrap();
        let ct = s
            .encrypt(&Mechanism::AesGcm(params), keys.aes, &pt)
            .unwrap_or_else(|e| panic!("thread {id} round {i}: encrypt: {e}"));
        assert_eq!(ct.len(), pt.len() + 16, "thread {id} round {i}");

        let mut iv_d = iv;
        let params = GcmParams::new(&mut iv_d, aad.as_bytes(), 128.into()).unwrap();
        let back = s
            .decrypt(&Mechanism::AesGcm(params), keys.aes, &ct)
            .unwrap_or_else(|e| panic!("thread {id} round {i}: decrypt: {e}"));
        assert_eq!(back, pt, "thread {id} round {i}: round trip");
        round_trips += 1;

        if i % SIGN_EVERY == 0 {
            let digest = s.digest(&Mechanism::Sha256, &pt).unwrap();
            let sig = s
                .sign(&Mechanism::Ecdsa, keys.ec_private, &digest)
                .unwrap_or_else(|e| panic!("thread {id} round {i}: ECDSA sign: {e}"));
            assert_eq!(sig.len(), 64);
            s.verify(&Mechanism::Ecdsa, keys.ec_public, &digest, &sig)
                .unwrap_or_else(|e| panic!("thread {id} round {i}: ECDSA verify: {e}"));
            signatures += 1;
        }
        if i % (SIGN_EVERY * 5) == 0 {
            let sig = s
                .sign(&Mechanism::Sha256RsaPkcs, keys.rsa_private, &pt)
                .unwrap_or_else(|e| panic!("thread {id} round {i}: RSA sign: {e}"));
            assert_eq!(sig.len(), 256);
            s.verify(&Mechanism::Sha256RsaPkcs, keys.rsa_public, &pt, &sig)
                .unwrap_or_else(|e| panic!("thread {id} round {i}: RSA verify: {e}"));
            signatures += 1;
        }
    }
    (s.handle(), round_trips, signatures)
}

#[test]
#[serial]
fn eight_threads_own_sessions_in_parallel() {
    // Stays open (and logged in) for the whole test.
    let main_session = user_session();
    let keys = Arc::new(make_keys(&main_session));
    let start = Arc::new(Barrier::new(THREADS));

    let handles: Vec<_> = (0..THREADS)
        .map(|id| {
            let keys = Arc::clone(&keys);
            let start = Arc::clone(&start);
            thread::Builder::new()
                .name(format!("worker-{id}"))
                .spawn(move || worker(id, &keys, &start))
                .expect("spawn")
        })
        .collect();

    let mut sessions = Vec::new();
    let mut total_round_trips = 0;
    let mut total_signatures = 0;
    let mut failures = Vec::new();
    for (id, h) in handles.into_iter().enumerate() {
        match h.join() {
            Ok((session, rt, sigs)) => {
                sessions.push(session);
                total_round_trips += rt;
                total_signatures += sigs;
            }
            Err(e) => failures.push(format!(
                "worker {id}: {}",
                e.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
            )),
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    assert_eq!(total_round_trips, THREADS * ROUNDS);
    let per_thread = ROUNDS.div_ceil(SIGN_EVERY) + ROUNDS.div_ceil(SIGN_EVERY * 5);
    assert_eq!(total_signatures, THREADS * per_thread);
    sessions.push(main_session.handle());
    assert!(!sessions.contains(&0));
    sessions.sort_unstable();
    sessions.dedup();
    assert_eq!(sessions.len(), THREADS + 1, "distinct session handles");
}

#[test]
#[serial]
fn sessions_open_and_close_concurrently_with_unique_handles() {
    const WORKERS: usize = 4;
    const CYCLES: usize = 100;
    // Stays open (and logged in) for the whole test.
    let main_session = user_session();
    let key = main_session
        .generate_key(
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
                Attribute::Label(b"threads-open-close".to_vec()),
            ],
        )
        .expect("generate AES key");
    let start = Arc::new(Barrier::new(WORKERS));
    let workers: Vec<_> = (0..WORKERS)
        .map(|id| {
            let start = Arc::clone(&start);
            thread::spawn(move || {
                start.wait();
                let mut handles = Vec::with_capacity(CYCLES);
                for i in 0..CYCLES {
                    let s = pkcs11().open_ro_session(slot()).expect("C_OpenSession");
                    let found = s
                        .find_objects(&[Attribute::Label(b"threads-open-close".to_vec())])
                        .expect("C_FindObjects");
                    assert_eq!(found, vec![key], "worker {id} cycle {i}: same handle");
                    let mut iv = [id as u8; 12];
                    let params = GcmParams::new(&mut iv, b"", 128.into()).unwrap();
                    let ct = s
                        .encrypt(&Mechanism::AesGcm(params), key, b"open-close")
                        .expect("C_Encrypt");
                    assert_eq!(ct.len(), 10 + 16);
                    handles.push(s.handle());
                    s.close().expect("C_CloseSession");
                }
                handles
            })
        })
        .collect();
    let mut all: Vec<u64> = Vec::new();
    for w in workers {
        all.extend(w.join().expect("worker panicked"));
    }
    assert_eq!(all.len(), WORKERS * CYCLES);
    assert!(!all.contains(&0));
    assert!(!all.contains(&main_session.handle()));
    all.sort_unstable();
    all.dedup();
    // cmkp11 never reuses a session handle in a process (SoftHSM2 does).
    assert_eq!(all.len(), WORKERS * CYCLES, "session handles reused");
}
