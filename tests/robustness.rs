//! Robustness of the module under bad calls, logout/login, fork, reloads and odd lengths
//! (issue 13 and 17.13), through the built `.so` over a real SoftHSM2 token.
//!
//! The module is initialized once for the process (`policy_support::init`), with a
//! logged-in session kept open for its whole life: the application then always has a
//! session of the slot, so a closed session's backend session goes to cmkp11's reuse pool
//! (which is what the poisoning tests need). Tests that initialize and finalize the module
//! themselves run in child processes (`reload_*`, `fork_*`).

#[macro_use]
mod common;
mod policy_support;

use common::{raw, rv_name, Template};
use cryptoki_sys::*;
use policy_support::*;
use serial_test::serial;
use std::ptr;

fn f() -> &'static CK_FUNCTION_LIST {
    raw().f
}

fn s() -> S {
    init("");
    session()
}

// ---------------------------------------------------------------------------------------
// 13.1: a bad call must not poison the session, nor a later session through the pool
// ---------------------------------------------------------------------------------------

/// The keys of the poisoning tests (token objects: a session that made a session object
/// never goes to the pool, and the test is about the pool).
struct Keys {
    data: H,
    mac: H,
}

fn keys() -> &'static Keys {
    static K: std::sync::OnceLock<Keys> = std::sync::OnceLock::new();
    K.get_or_init(|| {
        let s = s();
        Keys {
            data: data_cmk(&s),
            mac: mac_cmk(&s),
        }
    })
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Encrypt,
    Decrypt,
    Sign,
    Verify,
    Digest,
}

const KINDS: [Kind; 5] = [
    Kind::Encrypt,
    Kind::Decrypt,
    Kind::Sign,
    Kind::Verify,
    Kind::Digest,
];

/// `C_*Init` of `kind` with the test's key and mechanism.
fn op_init(h: CK_SESSION_HANDLE, kind: Kind) -> CK_RV {
    let k = keys();
    let mut cbc = Mech::bytes(CKM_AES_CBC_PAD, &[7u8; 16]);
    let mut hmac = Mech::new(CKM_SHA256_HMAC);
    let mut sha = Mech::new(CKM_SHA256);
    match kind {
        Kind::Encrypt => ck!(f(), C_EncryptInit, h, &mut cbc.raw(), k.data),
        Kind::Decrypt => ck!(f(), C_DecryptInit, h, &mut cbc.raw(), k.data),
        Kind::Sign => ck!(f(), C_SignInit, h, &mut hmac.raw(), k.mac),
        Kind::Verify => ck!(f(), C_VerifyInit, h, &mut hmac.raw(), k.mac),
        Kind::Digest => ck!(f(), C_DigestInit, h, &mut sha.raw()),
    }
}

/// A valid single-part call that ends the operation of `kind` (for decryption and
/// verification the result is an error of the data, which ends it too).
fn op_complete(h: CK_SESSION_HANDLE, kind: Kind) -> CK_RV {
    let mut data = [0x5au8; 32];
    let mut out = [0u8; 256];
    let mut n: CK_ULONG = out.len() as CK_ULONG;
    let (d, dl, o) = (data.as_mut_ptr(), 32, out.as_mut_ptr());
    match kind {
        Kind::Encrypt => ck!(f(), C_Encrypt, h, d, dl, o, &mut n),
        Kind::Decrypt => ck!(f(), C_Decrypt, h, d, dl, o, &mut n),
        Kind::Sign => ck!(f(), C_Sign, h, d, dl, o, &mut n),
        Kind::Verify => ck!(f(), C_Verify, h, d, dl, o, 32),
        Kind::Digest => ck!(f(), C_Digest, h, d, dl, o, &mut n),
    }
}

/// The bad calls of `kind`: a NULL pointer with length 0 where data goes in, a NULL
/// length pointer where one comes out. Each returns its code.
/// A named bad call.
type BadCall = (&'static str, Box<dyn Fn(CK_SESSION_HANDLE) -> CK_RV>);

fn bad_calls(kind: Kind) -> Vec<BadCall> {
    let null = ptr::null_mut::<u8>();
    let mut v: Vec<BadCall> = Vec::new();
    macro_rules! with_out {
        ($single:ident, $update:ident, $final:ident) => {
            v.push((
                stringify!($single),
                Box::new(move |h| {
                    let mut out = [0u8; 256];
                    let mut n: CK_ULONG = 256;
                    ck!(f(), $single, h, null, 0, out.as_mut_ptr(), &mut n)
                }),
            ));
            v.push((
                stringify!($update),
                Box::new(move |h| {
                    let mut out = [0u8; 256];
                    let mut n: CK_ULONG = 256;
                    ck!(f(), $update, h, null, 0, out.as_mut_ptr(), &mut n)
                }),
            ));
            v.push((
                stringify!($final),
                Box::new(move |h| {
                    let mut out = [0u8; 256];
                    ck!(f(), $final, h, out.as_mut_ptr(), ptr::null_mut())
                }),
            ));
        };
    }
    match kind {
        Kind::Encrypt => {
            with_out!(C_Encrypt, C_EncryptUpdate, C_EncryptFinal);
        }
        Kind::Decrypt => {
            with_out!(C_Decrypt, C_DecryptUpdate, C_DecryptFinal);
        }
        Kind::Sign | Kind::Digest => {
            let sign = kind == Kind::Sign;
            v.push((
                if sign { "C_Sign" } else { "C_Digest" },
                Box::new(move |h| {
                    let mut out = [0u8; 256];
                    let mut n: CK_ULONG = 256;
                    if sign {
                        ck!(f(), C_Sign, h, null, 0, out.as_mut_ptr(), &mut n)
                    } else {
                        ck!(f(), C_Digest, h, null, 0, out.as_mut_ptr(), &mut n)
                    }
                }),
            ));
            v.push((
                if sign {
                    "C_SignUpdate"
                } else {
                    "C_DigestUpdate"
                },
                Box::new(move |h| {
                    if sign {
                        ck!(f(), C_SignUpdate, h, null, 0)
                    } else {
                        ck!(f(), C_DigestUpdate, h, null, 0)
                    }
                }),
            ));
            v.push((
                if sign { "C_SignFinal" } else { "C_DigestFinal" },
                Box::new(move |h| {
                    let mut out = [0u8; 256];
                    if sign {
                        ck!(f(), C_SignFinal, h, out.as_mut_ptr(), ptr::null_mut())
                    } else {
                        ck!(f(), C_DigestFinal, h, out.as_mut_ptr(), ptr::null_mut())
                    }
                }),
            ));
        }
        Kind::Verify => {
            v.push((
                "C_Verify(data NULL)",
                Box::new(move |h| {
                    let mut sig = [0u8; 32];
                    ck!(f(), C_Verify, h, null, 0, sig.as_mut_ptr(), 32)
                }),
            ));
            v.push((
                "C_Verify(signature NULL)",
                Box::new(move |h| {
                    let mut data = [0u8; 32];
                    ck!(f(), C_Verify, h, data.as_mut_ptr(), 32, null, 0)
                }),
            ));
            v.push((
                "C_VerifyUpdate",
                Box::new(move |h| ck!(f(), C_VerifyUpdate, h, null, 0)),
            ));
            v.push((
                "C_VerifyFinal",
                Box::new(move |h| ck!(f(), C_VerifyFinal, h, null, 0)),
            ));
        }
    }
    v
}

/// Every bad call of every operation: refused with `CKR_ARGUMENTS_BAD`, the operation is
/// over (PKCS#11: an error other than `CKR_BUFFER_TOO_SMALL` ends it), a new one starts
/// in the same session, and the session's backend session, back in the pool, serves the
/// next sessions as a fresh one would.
#[test]
#[serial]
fn bad_data_call_poisons_neither_session_nor_pool() {
    for kind in KINDS {
        for (name, call) in bad_calls(kind) {
            // The same session goes on.
            let a = s();
            assert_rv!(op_init(a.h, kind), CKR_OK, "{kind:?} init before {name}");
            assert_rv!(call(a.h), CKR_ARGUMENTS_BAD, "{name}");
            assert_rv!(
                op_init(a.h, kind),
                CKR_OK,
                "{kind:?} init in the same session after {name}"
            );
            op_complete(a.h, kind);
            drop(a);
            // Closed right after the bad call: the next sessions are not poisoned.
            let b = s();
            assert_rv!(op_init(b.h, kind), CKR_OK, "{kind:?} init before {name}");
            assert_rv!(call(b.h), CKR_ARGUMENTS_BAD, "{name}");
            drop(b);
            for i in 0..3 {
                let c = s();
                for k in KINDS {
                    assert_rv!(
                        op_init(c.h, k),
                        CKR_OK,
                        "{k:?} init in new session {i} after {name} and close"
                    );
                    op_complete(c.h, k);
                }
            }
        }
    }
}

/// The class: a backend error of a data call whatever its cause (here a CBC input that
/// is no multiple of the block, a wrong signature): the operation is over in the same
/// session, and the pool serves clean sessions after it.
#[test]
#[serial]
fn backend_errors_end_the_operation_everywhere() {
    let k = keys();
    for round in 0..2 {
        let a = s();
        let mut cbc = Mech::bytes(CKM_AES_CBC_PAD, &[7u8; 16]);
        assert_rv!(ck!(f(), C_DecryptInit, a.h, &mut cbc.raw(), k.data), CKR_OK);
        let mut bad = [1u8; 15];
        let mut out = [0u8; 64];
        let mut n: CK_ULONG = 64;
        let rv = ck!(
            f(),
            C_DecryptUpdate,
            a.h,
            bad.as_mut_ptr(),
            15,
            out.as_mut_ptr(),
            &mut n
        );
        let rv2 = ck!(f(), C_DecryptFinal, a.h, out.as_mut_ptr(), &mut n);
        assert!(
            rv != CKR_OK || rv2 != CKR_OK,
            "15 bytes of CBC-PAD ciphertext decrypted: {} {}",
            rv_name(rv),
            rv_name(rv2)
        );
        let mut hmac = Mech::new(CKM_SHA256_HMAC);
        assert_rv!(ck!(f(), C_VerifyInit, a.h, &mut hmac.raw(), k.mac), CKR_OK);
        let mut data = [0u8; 8];
        assert_rv!(ck!(f(), C_VerifyUpdate, a.h, data.as_mut_ptr(), 8), CKR_OK);
        let mut sig = [0u8; 32];
        assert_rv!(
            ck!(f(), C_VerifyFinal, a.h, sig.as_mut_ptr(), 32),
            CKR_SIGNATURE_INVALID
        );
        if round == 0 {
            for kind in KINDS {
                assert_rv!(op_init(a.h, kind), CKR_OK, "{kind:?} after the errors");
                op_complete(a.h, kind);
            }
        }
        drop(a);
        for i in 0..3 {
            let c = s();
            for kind in KINDS {
                assert_rv!(op_init(c.h, kind), CKR_OK, "{kind:?} in new session {i}");
                op_complete(c.h, kind);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// 13.9: exact codes; absurd lengths; panics logged, not printed
// ---------------------------------------------------------------------------------------

/// A mechanism given to a function it is not made for is `CKR_MECHANISM_INVALID`,
/// whatever its parameter (valid, NULL or garbage), never `CKR_GENERAL_ERROR`.
#[test]
#[serial]
fn mechanism_for_the_wrong_function_is_mechanism_invalid() {
    let k = keys();
    let a = s();
    let not_digests = [
        Mech::oaep(),
        Mech::pss(CKM_RSA_PKCS_PSS),
        Mech::pss(CKM_SHA256_RSA_PKCS_PSS),
        Mech::new(CKM_RSA_PKCS_OAEP),
        Mech::new(CKM_SHA256_RSA_PKCS_PSS),
        Mech::gcm(&[1u8; 12], b""),
        Mech::new(CKM_ECDSA),
        Mech::new(CKM_SHA256_HMAC),
        Mech::new(CKM_AES_KEY_WRAP_PAD),
        Mech::new(CKM_AES_KEY_GEN),
        Mech::new(CKM_ECDH1_DERIVE),
    ];
    for mut m in not_digests {
        let ty = m.ty;
        assert_rv!(
            ck!(f(), C_DigestInit, a.h, &mut m.raw()),
            CKR_MECHANISM_INVALID,
            "C_DigestInit with {ty:#x}"
        );
    }
    // The session is still fine.
    assert_rv!(op_init(a.h, Kind::Digest), CKR_OK);
    op_complete(a.h, Kind::Digest);
    for (kind, mut m, key) in [
        (Kind::Encrypt, Mech::new(CKM_SHA256), k.data),
        (Kind::Decrypt, Mech::new(CKM_SHA256_HMAC), k.data),
        (Kind::Sign, Mech::bytes(CKM_AES_CBC_PAD, &[0u8; 16]), k.mac),
        (Kind::Verify, Mech::new(CKM_SHA256), k.mac),
        (Kind::Encrypt, Mech::new(CKM_AES_KEY_WRAP_PAD), k.data),
    ] {
        let ty = m.ty;
        let mut cm = m.raw();
        let rv = match kind {
            Kind::Encrypt => ck!(f(), C_EncryptInit, a.h, &mut cm, key),
            Kind::Decrypt => ck!(f(), C_DecryptInit, a.h, &mut cm, key),
            Kind::Sign => ck!(f(), C_SignInit, a.h, &mut cm, key),
            _ => ck!(f(), C_VerifyInit, a.h, &mut cm, key),
        };
        assert_rv!(rv, CKR_MECHANISM_INVALID, "{kind:?}Init with {ty:#x}");
    }
}

/// Lengths no buffer can have, with a real pointer: refused with `CKR_ARGUMENTS_BAD` by
/// every entry point that takes one, before anything is read or allocated (the process
/// survives to assert it).
#[test]
#[serial]
fn absurd_lengths_are_refused_before_anything_is_read() {
    let k = keys();
    let a = s();
    let mut buf = [0u8; 64];
    let p = buf.as_mut_ptr();
    let mut out = [0u8; 64];
    let o = out.as_mut_ptr();
    for huge in [CK_ULONG::MAX, CK_ULONG::MAX / 2, 1 << 60] {
        for kind in KINDS {
            assert_rv!(op_init(a.h, kind), CKR_OK);
            let mut n: CK_ULONG = 64;
            let rv = match kind {
                Kind::Encrypt => ck!(f(), C_Encrypt, a.h, p, huge, o, &mut n),
                Kind::Decrypt => ck!(f(), C_DecryptUpdate, a.h, p, huge, o, &mut n),
                Kind::Sign => ck!(f(), C_SignUpdate, a.h, p, huge),
                Kind::Verify => ck!(f(), C_Verify, a.h, p, 32, o, huge),
                Kind::Digest => ck!(f(), C_Digest, a.h, p, huge, o, &mut n),
            };
            assert_rv!(rv, CKR_ARGUMENTS_BAD, "{kind:?} data of {huge:#x} bytes");
            // The failed call ended the operation: a new one starts.
            assert_rv!(op_init(a.h, kind), CKR_OK, "{kind:?} after the refusal");
            op_complete(a.h, kind);
        }
        assert_rv!(op_init(a.h, Kind::Verify), CKR_OK);
        assert_rv!(
            ck!(f(), C_VerifyFinal, a.h, p, huge),
            CKR_ARGUMENTS_BAD,
            "C_VerifyFinal"
        );
        assert_rv!(
            ck!(f(), C_Login, a.h, CKU_USER, p, huge),
            CKR_ARGUMENTS_BAD,
            "C_Login"
        );
        assert_rv!(
            ck!(f(), C_SetPIN, a.h, p, huge, p, 4),
            CKR_ARGUMENTS_BAD,
            "C_SetPIN"
        );
        assert_rv!(
            ck!(f(), C_SeedRandom, a.h, p, huge),
            CKR_ARGUMENTS_BAD,
            "C_SeedRandom"
        );
        assert_rv!(
            ck!(f(), C_GenerateRandom, a.h, p, huge),
            CKR_ARGUMENTS_BAD,
            "C_GenerateRandom"
        );
        // Templates: an absurd count, and an absurd value length.
        let mut t = aes(false, 32).boolean(CKA_ENCRYPT, true);
        let mut attrs = t.raw();
        let mut m = Mech::new(CKM_AES_KEY_GEN).raw();
        let mut h: H = 0;
        assert_rv!(
            ck!(
                f(),
                C_GenerateKey,
                a.h,
                &mut m,
                attrs.as_mut_ptr(),
                huge,
                &mut h
            ),
            CKR_ARGUMENTS_BAD,
            "C_GenerateKey count"
        );
        let mut long = attrs.clone();
        long.push(CK_ATTRIBUTE {
            type_: CKA_LABEL,
            pValue: p.cast(),
            ulValueLen: huge,
        });
        assert_rv!(
            ck!(
                f(),
                C_GenerateKey,
                a.h,
                &mut m,
                long.as_mut_ptr(),
                long.len() as CK_ULONG,
                &mut h
            ),
            CKR_ARGUMENTS_BAD,
            "C_GenerateKey value length"
        );
        assert_rv!(
            ck!(
                f(),
                C_CreateObject,
                a.h,
                long.as_mut_ptr(),
                long.len() as CK_ULONG,
                &mut h
            ),
            CKR_ARGUMENTS_BAD,
            "C_CreateObject value length"
        );
        assert_rv!(
            ck!(f(), C_FindObjectsInit, a.h, attrs.as_mut_ptr(), huge),
            CKR_ARGUMENTS_BAD,
            "C_FindObjectsInit count"
        );
        assert_rv!(
            ck!(
                f(),
                C_GetAttributeValue,
                a.h,
                k.data,
                attrs.as_mut_ptr(),
                huge
            ),
            CKR_ARGUMENTS_BAD,
            "C_GetAttributeValue count"
        );
        let mut kwp = Mech::new(CKM_AES_KEY_WRAP_PAD).raw();
        assert_rv!(
            ck!(
                f(),
                C_UnwrapKey,
                a.h,
                &mut kwp,
                k.data,
                p,
                huge,
                attrs.as_mut_ptr(),
                attrs.len() as CK_ULONG,
                &mut h
            ),
            CKR_ARGUMENTS_BAD,
            "C_UnwrapKey blob length"
        );
    }
    // And the legitimate calls still work.
    assert_rv!(ck!(f(), C_GenerateRandom, a.h, p, 64), CKR_OK);
}

// ---------------------------------------------------------------------------------------
// 17.13: C_FindObjects with a huge maximum, AES-GCM tag lengths
// ---------------------------------------------------------------------------------------

/// `ulMaxObjectCount` near `CK_ULONG`'s maximum after a partial read: the rest of the
/// objects, no panic (`CKR_GENERAL_ERROR`).
#[test]
#[serial]
fn find_objects_with_a_huge_maximum_after_a_partial_read() {
    keys();
    let a = s();
    assert_rv!(ck!(f(), C_FindObjectsInit, a.h, ptr::null_mut(), 0), CKR_OK);
    let mut hs = [0 as H; 4096];
    let mut n: CK_ULONG = 0;
    assert_rv!(
        ck!(f(), C_FindObjects, a.h, hs.as_mut_ptr(), 1, &mut n),
        CKR_OK
    );
    assert_eq!(n, 1, "the test token holds at least two objects");
    for max in [CK_ULONG::MAX, CK_ULONG::MAX - 1, (CK_ULONG::MAX >> 1) + 1] {
        assert_rv!(
            ck!(f(), C_FindObjects, a.h, hs.as_mut_ptr(), max, &mut n),
            CKR_OK,
            "C_FindObjects max {max:#x}"
        );
    }
    assert_rv!(ck!(f(), C_FindObjectsFinal, a.h), CKR_OK);
}

fn gcm_tag(tag_bits: CK_ULONG) -> Mech {
    let mut m = Mech::gcm(&[9u8; 12], b"aad");
    // The parameter is a CK_GCM_PARAMS; patch its tag length.
    let mut raw = m.raw();
    // SAFETY: `raw.pParameter` points at the CK_GCM_PARAMS `m` owns.
    unsafe { (*(raw.pParameter as *mut CK_GCM_PARAMS)).ulTagBits = tag_bits };
    let _ = &mut raw;
    m
}

/// AES-GCM tags: whole bytes from 32 to 128 bits; anything else (0 included, which the
/// specification allows) is `CKR_MECHANISM_PARAM_INVALID` at `*Init`, for encryption and
/// decryption.
#[test]
#[serial]
fn gcm_tag_lengths() {
    let k = keys();
    let a = s();
    for bits in [0, 8, 24, 31, 33, 100, 127, 136, 256, CK_ULONG::MAX] {
        let mut m = gcm_tag(bits);
        assert_rv!(
            ck!(f(), C_EncryptInit, a.h, &mut m.raw(), k.data),
            CKR_MECHANISM_PARAM_INVALID,
            "encrypt, tag of {bits} bits"
        );
        assert_rv!(
            ck!(f(), C_DecryptInit, a.h, &mut m.raw(), k.data),
            CKR_MECHANISM_PARAM_INVALID,
            "decrypt, tag of {bits} bits"
        );
    }
    for bits in [32, 64, 96, 104, 112, 120, 128] {
        let mut m = gcm_tag(bits);
        let ct = a
            .encrypt(&mut m, k.data, b"attack at dawn")
            .unwrap_or_else(|rv| {
                panic!("encrypt, tag of {bits} bits: {}", rv_name(rv));
            });
        assert_eq!(ct.len(), 14 + bits as usize / 8);
        let pt = ok(a.decrypt(&mut m, k.data, &ct), "decrypt");
        assert_eq!(pt, b"attack at dawn");
    }
}

// ---------------------------------------------------------------------------------------
// Tests that need a process of their own: the test binary runs itself with one test
// selected and ROBUSTNESS_CHILD naming it.
// ---------------------------------------------------------------------------------------

const CHILD_ENV: &str = "ROBUSTNESS_CHILD";

/// Whether this process is the child running test `name`.
fn child_of(name: &str) -> bool {
    std::env::var(CHILD_ENV).is_ok_and(|v| v == name)
}

/// Runs test `name` of this binary in a child process; its output.
fn run_child(name: &str, extra_env: &[(&str, &str)]) -> std::process::Output {
    let mut c = std::process::Command::new(std::env::current_exe().expect("current_exe"));
    c.args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, name)
        .env_remove("SOFTHSM2_CONF")
        .env_remove("CMKP11_CONFIG");
    for (k, v) in extra_env {
        c.env(k, v);
    }
    c.output().expect("run the child test")
}

/// `C_Initialize(NULL)` through the raw table, asserting `CKR_OK`.
fn raw_initialize() {
    common::test_env();
    assert_rv!(
        ck!(f(), C_Initialize, ptr::null_mut()),
        CKR_OK,
        "C_Initialize"
    );
}

#[test]
fn child_panic_in_get_info() {
    if !child_of("child_panic_in_get_info") {
        return;
    }
    raw_initialize();
    let mut info: CK_INFO = unsafe { std::mem::zeroed() };
    std::env::set_var("CMKP11_FAULT", "panic-in-get-info");
    assert_rv!(ck!(f(), C_GetInfo, &mut info), CKR_GENERAL_ERROR);
    std::env::remove_var("CMKP11_FAULT");
    assert_rv!(ck!(f(), C_GetInfo, &mut info), CKR_OK);
    assert_rv!(ck!(f(), C_Finalize, ptr::null_mut()), CKR_OK);
}

/// A panic caught at the C boundary does not print its text on the application's
/// stderr: it is logged (the location at error level, which names no data).
#[test]
fn caught_panic_is_logged_not_printed() {
    if !cfg!(debug_assertions) {
        return; // the fault hook exists in debug builds only
    }
    let out = run_child("child_panic_in_get_info", &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed: {err}");
    assert!(
        !err.contains("fault injected") && !err.contains("panicked at"),
        "the panic's text reached stderr:\n{err}"
    );
    assert!(
        err.contains("internal error") && err.contains("C_GetInfo"),
        "the panic was not logged:\n{err}"
    );
}

// ---------------------------------------------------------------------------------------
// 13.2: a key found again after C_Logout/C_Login works
// ---------------------------------------------------------------------------------------

fn find_by_label(a: &S, label: &[u8]) -> Vec<H> {
    ok(a.find(Template::default().bytes(CKA_LABEL, label)), "find")
}

/// Keys found before `C_Logout` and found again after `C_Login` (a secret CMK, whose
/// handle is one per CMK, and a private key) give handles that work, every round.
#[test]
#[serial]
fn keys_found_again_after_logout_and_login_work() {
    let a = s();
    let data_label = unique_label("relogin-data");
    ok(
        a.generate_key(
            CKM_AES_KEY_GEN,
            aes(true, 32)
                .boolean(CKA_ENCRYPT, true)
                .boolean(CKA_DECRYPT, true)
                .bytes(CKA_LABEL, &data_label),
        ),
        "data CMK",
    );
    let sign_label = unique_label("relogin-sign");
    let public = Template::default()
        .ulong(CKA_CLASS, CKO_PUBLIC_KEY)
        .ulong(CKA_KEY_TYPE, CKK_EC)
        .bytes(CKA_EC_PARAMS, &common::P256_PARAMS)
        .boolean(CKA_TOKEN, true)
        .boolean(CKA_VERIFY, true)
        .bytes(CKA_LABEL, &sign_label);
    let private = Template::default()
        .ulong(CKA_CLASS, CKO_PRIVATE_KEY)
        .ulong(CKA_KEY_TYPE, CKK_EC)
        .boolean(CKA_TOKEN, true)
        .boolean(CKA_PRIVATE, true)
        .boolean(CKA_SIGN, true)
        .bytes(CKA_LABEL, &sign_label);
    ok(
        a.generate_key_pair(CKM_EC_KEY_PAIR_GEN, public, private),
        "EC pair",
    );
    let use_keys = |a: &S, round: usize| {
        let data = find_by_label(a, &data_label);
        assert_eq!(data.len(), 1, "round {round}: data CMK found once");
        for t in [CKA_LABEL, CKA_ID, CKA_CLASS, CKA_KEY_TYPE, CKA_VALUE_LEN] {
            if let Err((rv, _)) = a.get_attr(data[0], t) {
                panic!(
                    "round {round}: attribute {t:#x} of the data CMK: {}",
                    rv_name(rv)
                );
            }
        }
        let ct = a
            .encrypt(&mut Mech::gcm(&[3u8; 12], b""), data[0], b"still mine")
            .unwrap_or_else(|rv| panic!("round {round}: encrypt: {}", rv_name(rv)));
        let pt = ok(
            a.decrypt(&mut Mech::gcm(&[3u8; 12], b""), data[0], &ct),
            "decrypt",
        );
        assert_eq!(pt, b"still mine");
        let signer: Vec<H> = find_by_label(a, &sign_label)
            .into_iter()
            .filter(|h| a.get_ulong(*h, CKA_CLASS) == CKO_PRIVATE_KEY)
            .collect();
        assert_eq!(signer.len(), 1, "round {round}: private key found once");
        for t in [CKA_LABEL, CKA_ID, CKA_KEY_TYPE, CKA_EC_PARAMS] {
            if let Err((rv, _)) = a.get_attr(signer[0], t) {
                panic!(
                    "round {round}: attribute {t:#x} of the private key: {}",
                    rv_name(rv)
                );
            }
        }
        a.sign(&mut Mech::new(CKM_ECDSA), signer[0], &[1u8; 32])
            .unwrap_or_else(|rv| panic!("round {round}: sign: {}", rv_name(rv)));
        (data[0], signer[0])
    };
    // Found, not used, before the first logout (no facts of them cached yet).
    assert_eq!(find_by_label(&a, &data_label).len(), 1);
    assert_eq!(find_by_label(&a, &sign_label).len(), 2);
    for round in 1..=3 {
        assert_rv!(ck!(f(), C_Logout, a.h), CKR_OK, "C_Logout");
        let mut pin = common::USER_PIN.as_bytes().to_vec();
        assert_rv!(
            ck!(
                f(),
                C_Login,
                a.h,
                CKU_USER,
                pin.as_mut_ptr(),
                pin.len() as CK_ULONG
            ),
            CKR_OK,
            "C_Login"
        );
        use_keys(&a, round);
        // Another session sees the same working keys.
        let b = s();
        use_keys(&b, round);
    }
}

// ---------------------------------------------------------------------------------------
// 13.8: p11-kit's client module as the backend
// ---------------------------------------------------------------------------------------

const P11_KIT_CLIENT: &str = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so";

/// A `p11-kit server` serving the test token over a private socket, stopped on drop.
struct P11KitServer {
    child: std::process::Child,
    address: String,
    _stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl Drop for P11KitServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn p11_kit_server(env: &common::TestEnv) -> P11KitServer {
    let socket = env.dir.join("p11-kit.sock");
    let mut child = std::process::Command::new("p11-kit")
        .args([
            "server",
            "--foreground",
            "--sh",
            "--provider",
            common::SOFTHSM_MODULE,
            "--name",
        ])
        .arg(&socket)
        .arg(format!("pkcs11:token={}", common::TOKEN_LABEL))
        .env("SOFTHSM2_CONF", &env.softhsm_conf)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("p11-kit server (installed by scripts/setup.sh)");
    // It prints its address once it listens.
    let mut line = String::new();
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    std::io::BufRead::read_line(&mut stdout, &mut line).expect("read p11-kit server's output");
    assert!(
        line.contains("P11_KIT_SERVER_ADDRESS") && socket.exists(),
        "p11-kit server did not start: {line:?}"
    );
    P11KitServer {
        child,
        address: format!("unix:path={}", socket.display()),
        _stdout: stdout,
    }
}

#[test]
fn child_p11_kit_backend() {
    if !child_of("child_p11_kit_backend") {
        return;
    }
    let env = common::test_env();
    let server = p11_kit_server(env);
    std::env::set_var("P11_KIT_SERVER_ADDRESS", &server.address);
    std::fs::write(
        &env.cmkp11_conf,
        format!("[backend]\nmodule = \"{P11_KIT_CLIENT}\"\n"),
    )
    .expect("write cmkp11.toml");
    for cycle in 0..3 {
        assert_rv!(
            ck!(f(), C_Initialize, ptr::null_mut()),
            CKR_OK,
            "C_Initialize over p11-kit-client.so, cycle {cycle}"
        );
        eprintln!("p11-kit cycle {cycle}");
        let slot = common::raw_token_slot();
        let h = common::raw_open_session(slot);
        common::raw_login(h);
        let a = S { h };
        // Mechanisms without parameters (p11-kit 0.24's RPC carries few parameters).
        let key = mac_cmk(&a);
        let mac = ok(
            a.sign(&mut Mech::new(CKM_SHA256_HMAC), key, b"through p11-kit"),
            "sign",
        );
        ok(
            a.verify(
                &mut Mech::new(CKM_SHA256_HMAC),
                key,
                b"through p11-kit",
                &mac,
            ),
            "verify",
        );
        let mut sha = Mech::new(CKM_SHA256).raw();
        assert_rv!(ck!(f(), C_DigestInit, h, &mut sha), CKR_OK);
        let mut data = *b"abc";
        let mut out = [0u8; 32];
        let mut n: CK_ULONG = 32;
        assert_rv!(
            ck!(
                f(),
                C_Digest,
                h,
                data.as_mut_ptr(),
                3,
                out.as_mut_ptr(),
                &mut n
            ),
            CKR_OK
        );
        assert_eq!(out[..4], [0xba, 0x78, 0x16, 0xbf], "SHA-256 of abc");
        drop(a);
        assert_rv!(ck!(f(), C_Finalize, ptr::null_mut()), CKR_OK, "C_Finalize");
    }
}

/// p11-kit's client module hands out a new, separately initialized function table per
/// `C_GetFunctionList`/`C_GetInterface`: cmkp11 fetches one and uses it for everything
/// (initialization, cryptoki's calls, the data path).
#[test]
fn p11_kit_client_module_as_backend() {
    assert!(
        std::path::Path::new(P11_KIT_CLIENT).exists(),
        "{P11_KIT_CLIENT} missing (scripts/setup.sh installs p11-kit-modules)"
    );
    let out = run_child("child_p11_kit_backend", &[]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------------------
// 13.4: no leak per C_Initialize/C_Finalize
// ---------------------------------------------------------------------------------------

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
}

fn rss_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4
}

/// One cycle as an application that reloads its module: initialize, log in, use a CMK
/// (audited), close, finalize.
fn reload_cycle() {
    assert_rv!(
        ck!(f(), C_Initialize, ptr::null_mut()),
        CKR_OK,
        "C_Initialize"
    );
    let slot = common::raw_token_slot();
    let h = common::raw_open_session(slot);
    common::raw_login(h);
    let a = S { h };
    let key = ok(
        a.find(Template::default().bytes(CKA_LABEL, b"reload-mac")),
        "find",
    );
    ok(
        a.sign(&mut Mech::new(CKM_SHA256_HMAC), key[0], b"reload"),
        "sign",
    );
    drop(a);
    assert_rv!(ck!(f(), C_Finalize, ptr::null_mut()), CKR_OK, "C_Finalize");
}

#[test]
fn child_reload_cycles() {
    if !child_of("child_reload_cycles") {
        return;
    }
    let env = common::test_env();
    let mut text = std::fs::read_to_string(&env.cmkp11_conf).unwrap();
    text.push_str(&format!(
        "[audit]\nfile = \"{}\"\n",
        env.dir.join("audit.log").display()
    ));
    std::fs::write(&env.cmkp11_conf, text).unwrap();
    assert_rv!(ck!(f(), C_Initialize, ptr::null_mut()), CKR_OK);
    let h = common::raw_open_session(common::raw_token_slot());
    common::raw_login(h);
    ok(
        S { h }.generate_key(
            CKM_GENERIC_SECRET_KEY_GEN,
            Template::default()
                .ulong(CKA_CLASS, CKO_SECRET_KEY)
                .ulong(CKA_KEY_TYPE, CKK_GENERIC_SECRET)
                .ulong(CKA_VALUE_LEN, 32)
                .boolean(CKA_TOKEN, true)
                .boolean(CKA_SIGN, true)
                .boolean(CKA_VERIFY, true)
                .bytes(CKA_LABEL, b"reload-mac"),
        ),
        "mac CMK",
    );
    assert_rv!(ck!(f(), C_Finalize, ptr::null_mut()), CKR_OK);
    // Warm-up: allocator pools, the loader's and OpenSSL's one-time state.
    for _ in 0..30 {
        reload_cycle();
    }
    let (fds, rss) = (open_fds(), rss_kib());
    for _ in 0..300 {
        reload_cycle();
    }
    let (fds2, rss2) = (open_fds(), rss_kib());
    println!("reload: fds {fds} -> {fds2}, RSS {rss} -> {rss2} KiB over 300 cycles");
    assert!(fds2 <= fds, "file descriptors grew: {fds} -> {fds2}");
    // 22-28 KiB per cycle before the fix (7-8 MiB here); allow allocator noise.
    assert!(
        rss2 <= rss + 1024,
        "RSS grew by {} KiB over 300 cycles",
        rss2.saturating_sub(rss)
    );
    // Every key use was recorded.
    let log = std::fs::read_to_string(env.dir.join("audit.log")).unwrap();
    let uses = log
        .lines()
        .filter(|l| l.contains("\"op\":\"sign\"") && l.contains("reload-mac"))
        .count();
    assert_eq!(uses, 330, "audit records of the 330 signatures");
}

/// An application that reloads the module (nginx reload, a Java provider reload) does
/// not grow: file descriptors and memory stay flat over 300 C_Initialize/C_Finalize
/// cycles with the audit log on.
#[test]
fn reload_cycles_do_not_leak() {
    let out = run_child("child_reload_cycles", &[]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    let figures = text
        .lines()
        .find_map(|l| l.find("reload: fds").map(|i| &l[i..]));
    eprintln!("{}", figures.unwrap_or("no figures"));
}
