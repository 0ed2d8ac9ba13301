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

use common::{raw, rv_name};
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
