//! Encryption, decryption, digests, signatures and verification (PKCS#11 v3.0 §5.8-5.13).
//!
//! `*Init` lets the runtime decide (policy, lifecycle state, access rules, audit) and then
//! starts the backend's operation; the data calls go straight to the backend's function
//! table with the application's buffers ([`crate::backend::raw`]), so the two-call convention
//! and every code are the backend's own, and nothing is copied on the hot path. One
//! exception: the length query of a single-part AES-GCM call, which cmkp11 answers itself
//! as the token does (see `Session::single_output_len`), saving a backend call.

use super::with_session;
use crate::backend::raw::{self, RawBackend};
use crate::error::{Error, Result};
use crate::ffi::{args, guard};
use crate::runtime::session::{Kind, Session};
use cryptoki_sys::*;
fn backend() -> Result<&'static RawBackend> {
    match raw::get() {
        Some(b) => Ok(b),
        None => Err(Error::Rv(CKR_CRYPTOKI_NOT_INITIALIZED)),
    }
}

/// Runs one backend call of an active operation of `kind`.
fn step(
    s: &mut Session,
    kind: Kind,
    call: &mut dyn FnMut(&RawBackend, CK_SESSION_HANDLE) -> (CK_RV, bool),
) -> Result<()> {
    let b = backend()?;
    let init = |h, m: &mut crate::backend::mech::Mech, k| b.init(kind, h, m, k);
    s.raw_call(kind, &mut |h| call(b, h), &init)
}

/// Whether a call with an output buffer leaves the operation active: a length query
/// (NULL buffer) or a buffer too small.
fn keeps(rv: CK_RV, out: *mut u8) -> bool {
    rv == CKR_BUFFER_TOO_SMALL || (rv == CKR_OK && out.is_null())
}

/// `C_*Init`: the runtime's decision, then the backend's `*Init`.
///
/// # Safety
/// `mech` NULL or a valid `CK_MECHANISM` (contract).
unsafe fn init(
    name: &'static str,
    kind: Kind,
    h: CK_SESSION_HANDLE,
    mech: *mut CK_MECHANISM,
    key: CK_OBJECT_HANDLE,
) -> CK_RV {
    guard(name, || {
        with_session(h, |lib, s| {
            let b = backend()?;
            // Read once: the checks, the decision and the backend see this copy (and
            // cmkp11's copies of its parameter), never the application's memory again.
            // SAFETY: NULL or a valid CK_MECHANISM (contract).
            let m = unsafe { args::read_mechanism(mech) };
            let ty = m.map_or(0, |m| m.mechanism);
            if m.is_some() && !crate::policy::mechanisms::fits_init(kind.op(), ty) {
                return Err(Error::Rv(CKR_MECHANISM_INVALID));
            }
            // SAFETY: forwarded caller contract.
            let (rv, ty, keys, tag, retry) = match unsafe { args::direct_mechanism(m.as_ref())? } {
                // The data path's mechanisms: decided by type, given to the backend as
                // cmkp11 copied them.
                Some(mut d) => {
                    let keys = lib.crypto_decide(s, kind, d.ty(), key)?;
                    let module_iv = match lib.module_iv(s, kind, d.ty(), key) {
                        Some(len) => {
                            lib.fill_iv(s, d.module_iv(len)?)?;
                            true
                        }
                        None => false,
                    };
                    let first = keys.first().map_or(CK_INVALID_HANDLE, |k| k.handle());
                    let mut raw = d.raw();
                    let rv = b.init_raw(kind, s.backend().handle(), &mut raw, first);
                    if rv == CKR_OK && module_iv {
                        // SAFETY: the application's IV buffer as read once (contract).
                        unsafe { d.write_back_iv() };
                    }
                    // Only for a retry under an older CMK version.
                    let retry = if keys.len() > 1 {
                        // SAFETY: forwarded caller contract (the additional data).
                        Some(unsafe { d.to_mech()? })
                    } else {
                        None
                    };
                    (rv, d.ty(), keys, d.tag, retry)
                }
                None => {
                    let Some(app) = m.as_ref() else {
                        return Err(Error::Rv(CKR_ARGUMENTS_BAD));
                    };
                    // SAFETY: forwarded caller contract.
                    let mut m = unsafe { args::mechanism_of(app)? };
                    let keys = lib.crypto_decide(s, kind, m.ty, key)?;
                    lib.probe_if_needed(s, kind, &mut m, &keys)?;
                    let first = keys.first().map_or(CK_INVALID_HANDLE, |k| k.handle());
                    let rv = b.init(kind, s.backend().handle(), &mut m, first);
                    let ty = m.ty;
                    let retry = (keys.len() > 1).then_some(m);
                    (rv, ty, keys, 0, retry)
                }
            };
            if rv != CKR_OK {
                return Err(Error::Rv(rv));
            }
            s.started(kind, ty, keys, tag, retry)
        })
    })
}

/// A data call of an active operation: `check` validates the application's pointers,
/// `call` makes the backend call and says whether the operation stays active.
fn data(
    name: &'static str,
    kind: Kind,
    h: CK_SESSION_HANDLE,
    check: impl FnOnce() -> Result<()>,
    mut call: impl FnMut(&RawBackend, CK_SESSION_HANDLE) -> (CK_RV, bool),
) -> CK_RV {
    guard(name, || {
        with_session(h, |_, s| {
            if let Err(e) = check() {
                s.abort(kind);
                return Err(e);
            }
            step(s, kind, &mut call)
        })
    })
}

/// The checks of a data call with output: the input ([`args::input`]), and the length
/// the output's size is written to (the output itself may be NULL: a length query).
///
/// # Safety
/// `out_len` NULL or valid.
unsafe fn check_output(data: *mut u8, len: CK_ULONG, out_len: *mut CK_ULONG) -> Result<()> {
    args::input(data, len)?;
    // SAFETY: caller contract.
    unsafe { args::out(out_len)? };
    Ok(())
}

/// A single-part operation with output (`C_Encrypt`, `C_Decrypt`, `C_Digest`, `C_Sign`).
///
/// # Safety
/// `data` valid for `len`; `out_len` valid; `out` NULL or valid for `*out_len` bytes.
unsafe fn single(
    name: &'static str,
    kind: Kind,
    h: CK_SESSION_HANDLE,
    data_p: *mut u8,
    len: CK_ULONG,
    out: *mut u8,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    guard(name, || {
        with_session(h, |_, s| {
            // SAFETY: NULL checks only; the pointers go to the backend unchanged.
            if let Err(e) = unsafe { check_output(data_p, len, out_len) } {
                s.abort(kind);
                return Err(e);
            }
            if out.is_null() {
                // A length query cmkp11 can answer exactly: the backend is not asked.
                if let Some(n) = s.single_output_len(kind, len) {
                    // SAFETY: checked non-NULL above; the application's output.
                    unsafe { *out_len = n };
                    return Ok(());
                }
            }
            step(s, kind, &mut |b, bh| {
                // SAFETY: the application's buffers, checked above, passed on (contract).
                let rv = unsafe { b.single(kind, bh, data_p, len, out, out_len) };
                (rv, keeps(rv, out))
            })
        })
    })
}

/// A multi-part update with output (`C_EncryptUpdate`, `C_DecryptUpdate`).
///
/// # Safety
/// As for [`single`].
unsafe fn update_out(
    name: &'static str,
    kind: Kind,
    h: CK_SESSION_HANDLE,
    data_p: *mut u8,
    len: CK_ULONG,
    out: *mut u8,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    data(
        name,
        kind,
        h,
        // SAFETY: NULL checks only; the pointers go to the backend unchanged.
        || unsafe { check_output(data_p, len, out_len) },
        |b, bh| {
            // SAFETY: the application's buffers, checked above, passed on (contract).
            let rv = unsafe { b.update(kind, bh, data_p, len, out, out_len) };
            (rv, rv == CKR_OK || rv == CKR_BUFFER_TOO_SMALL)
        },
    )
}

/// A multi-part update without output (`C_DigestUpdate`, `C_SignUpdate`, `C_VerifyUpdate`).
///
/// # Safety
/// `data` valid for `len` bytes.
unsafe fn update(
    name: &'static str,
    kind: Kind,
    h: CK_SESSION_HANDLE,
    data_p: *mut u8,
    len: CK_ULONG,
) -> CK_RV {
    data(
        name,
        kind,
        h,
        || args::input(data_p, len),
        |b, bh| {
            // SAFETY: the application's buffer, checked above, passed on (contract).
            let rv = unsafe {
                b.update(
                    kind,
                    bh,
                    data_p,
                    len,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                )
            };
            (rv, rv == CKR_OK)
        },
    )
}

/// A final call with output (`C_EncryptFinal`, `C_DecryptFinal`, `C_DigestFinal`, `C_SignFinal`).
///
/// # Safety
/// `out_len` valid; `out` NULL or valid for `*out_len` bytes.
unsafe fn finish(
    name: &'static str,
    kind: Kind,
    h: CK_SESSION_HANDLE,
    out: *mut u8,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    data(
        name,
        kind,
        h,
        || {
            // SAFETY: NULL check only; the pointer goes to the backend unchanged.
            unsafe { args::out(out_len) }.map(drop)
        },
        |b, bh| {
            // SAFETY: the application's buffers, checked above, passed on (contract).
            let rv = unsafe { b.finish(kind, bh, out, out_len) };
            (rv, keeps(rv, out))
        },
    )
}

macro_rules! entry_points {
    ($kind:expr, $init:ident, $single:ident, $update:ident, $final:ident) => {
        #[doc = concat!("`", stringify!($init), "`.")]
        ///
        /// # Safety
        /// `mech` NULL or a valid `CK_MECHANISM`.
        pub unsafe extern "C" fn $init(
            h: CK_SESSION_HANDLE,
            mech: *mut CK_MECHANISM,
            key: CK_OBJECT_HANDLE,
        ) -> CK_RV {
            // SAFETY: the application's pointers, passed on under the same contract.
            unsafe { init(stringify!($init), $kind, h, mech, key) }
        }

        #[doc = concat!("`", stringify!($single), "`, with the two-call convention.")]
        ///
        /// # Safety
        /// `data` valid for `len`; `out_len` valid; `out` NULL or valid for `*out_len`.
        pub unsafe extern "C" fn $single(
            h: CK_SESSION_HANDLE,
            data: *mut u8,
            len: CK_ULONG,
            out: *mut u8,
            out_len: *mut CK_ULONG,
        ) -> CK_RV {
            // SAFETY: the application's pointers, passed on under the same contract.
            unsafe { single(stringify!($single), $kind, h, data, len, out, out_len) }
        }

        #[doc = concat!("`", stringify!($update), "`, with the two-call convention.")]
        ///
        /// # Safety
        /// As for the single-part call.
        pub unsafe extern "C" fn $update(
            h: CK_SESSION_HANDLE,
            data: *mut u8,
            len: CK_ULONG,
            out: *mut u8,
            out_len: *mut CK_ULONG,
        ) -> CK_RV {
            // SAFETY: the application's pointers, passed on under the same contract.
            unsafe { update_out(stringify!($update), $kind, h, data, len, out, out_len) }
        }

        #[doc = concat!("`", stringify!($final), "`, with the two-call convention.")]
        ///
        /// # Safety
        /// `out_len` valid; `out` NULL or valid for `*out_len`.
        pub unsafe extern "C" fn $final(
            h: CK_SESSION_HANDLE,
            out: *mut u8,
            out_len: *mut CK_ULONG,
        ) -> CK_RV {
            // SAFETY: the application's pointers, passed on under the same contract.
            unsafe { finish(stringify!($final), $kind, h, out, out_len) }
        }
    };
}

entry_points!(
    Kind::Encrypt,
    C_EncryptInit,
    C_Encrypt,
    C_EncryptUpdate,
    C_EncryptFinal
);
entry_points!(
    Kind::Decrypt,
    C_DecryptInit,
    C_Decrypt,
    C_DecryptUpdate,
    C_DecryptFinal
);

/// `C_DigestInit`.
///
/// # Safety
/// `mech` NULL or a valid `CK_MECHANISM`.
pub unsafe extern "C" fn C_DigestInit(h: CK_SESSION_HANDLE, mech: *mut CK_MECHANISM) -> CK_RV {
    // SAFETY: the application's pointer, passed on under the same contract.
    unsafe { init("C_DigestInit", Kind::Digest, h, mech, CK_INVALID_HANDLE) }
}

/// `C_Digest`, with the two-call convention.
///
/// # Safety
/// As for `C_Encrypt`.
pub unsafe extern "C" fn C_Digest(
    h: CK_SESSION_HANDLE,
    data: *mut u8,
    len: CK_ULONG,
    out: *mut u8,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    // SAFETY: the application's pointers, passed on under the same contract.
    unsafe { single("C_Digest", Kind::Digest, h, data, len, out, out_len) }
}

/// `C_DigestUpdate`.
///
/// # Safety
/// `data` valid for `len` bytes.
pub unsafe extern "C" fn C_DigestUpdate(
    h: CK_SESSION_HANDLE,
    data: *mut u8,
    len: CK_ULONG,
) -> CK_RV {
    // SAFETY: the application's pointer, passed on under the same contract.
    unsafe { update("C_DigestUpdate", Kind::Digest, h, data, len) }
}

/// `C_DigestKey`: refused for secret and private keys (an equality oracle on keys).
pub extern "C" fn C_DigestKey(h: CK_SESSION_HANDLE, key: CK_OBJECT_HANDLE) -> CK_RV {
    guard("C_DigestKey", || {
        with_session(h, |lib, s| {
            let obj = lib.digestible_key(s, key)?;
            step(s, Kind::Digest, &mut |b, bh| {
                let rv = b.digest_key(bh, obj.handle());
                (rv, rv == CKR_OK)
            })
        })
    })
}

/// `C_DigestFinal`, with the two-call convention.
///
/// # Safety
/// `out_len` valid; `out` NULL or valid for `*out_len`.
pub unsafe extern "C" fn C_DigestFinal(
    h: CK_SESSION_HANDLE,
    out: *mut u8,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    // SAFETY: the application's pointers, passed on under the same contract.
    unsafe { finish("C_DigestFinal", Kind::Digest, h, out, out_len) }
}

/// `C_SignInit`.
///
/// # Safety
/// `mech` NULL or a valid `CK_MECHANISM`.
pub unsafe extern "C" fn C_SignInit(
    h: CK_SESSION_HANDLE,
    mech: *mut CK_MECHANISM,
    key: CK_OBJECT_HANDLE,
) -> CK_RV {
    // SAFETY: the application's pointer, passed on under the same contract.
    unsafe { init("C_SignInit", Kind::Sign, h, mech, key) }
}

/// `C_Sign`, with the two-call convention.
///
/// # Safety
/// As for `C_Encrypt`.
pub unsafe extern "C" fn C_Sign(
    h: CK_SESSION_HANDLE,
    data: *mut u8,
    len: CK_ULONG,
    out: *mut u8,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    // SAFETY: the application's pointers, passed on under the same contract.
    unsafe { single("C_Sign", Kind::Sign, h, data, len, out, out_len) }
}

/// `C_SignUpdate`.
///
/// # Safety
/// `data` valid for `len` bytes.
pub unsafe extern "C" fn C_SignUpdate(h: CK_SESSION_HANDLE, data: *mut u8, len: CK_ULONG) -> CK_RV {
    // SAFETY: the application's pointer, passed on under the same contract.
    unsafe { update("C_SignUpdate", Kind::Sign, h, data, len) }
}

/// `C_SignFinal`, with the two-call convention.
///
/// # Safety
/// `out_len` valid; `out` NULL or valid for `*out_len`.
pub unsafe extern "C" fn C_SignFinal(
    h: CK_SESSION_HANDLE,
    out: *mut u8,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    // SAFETY: the application's pointers, passed on under the same contract.
    unsafe { finish("C_SignFinal", Kind::Sign, h, out, out_len) }
}

/// `C_VerifyInit`.
///
/// # Safety
/// `mech` NULL or a valid `CK_MECHANISM`.
pub unsafe extern "C" fn C_VerifyInit(
    h: CK_SESSION_HANDLE,
    mech: *mut CK_MECHANISM,
    key: CK_OBJECT_HANDLE,
) -> CK_RV {
    // SAFETY: the application's pointer, passed on under the same contract.
    unsafe { init("C_VerifyInit", Kind::Verify, h, mech, key) }
}

/// `C_Verify`.
///
/// # Safety
/// `data` and `sig` valid for their lengths.
pub unsafe extern "C" fn C_Verify(
    h: CK_SESSION_HANDLE,
    data_p: *mut u8,
    len: CK_ULONG,
    sig: *mut u8,
    sig_len: CK_ULONG,
) -> CK_RV {
    let mut sig_len_io = sig_len;
    data(
        "C_Verify",
        Kind::Verify,
        h,
        || {
            args::input(data_p, len)?;
            args::input(sig, sig_len)
        },
        |b, bh| {
            // SAFETY: the application's buffers, checked above, passed on (contract).
            let rv = unsafe { b.single(Kind::Verify, bh, data_p, len, sig, &mut sig_len_io) };
            (rv, false)
        },
    )
}

/// `C_VerifyUpdate`.
///
/// # Safety
/// `data` valid for `len` bytes.
pub unsafe extern "C" fn C_VerifyUpdate(
    h: CK_SESSION_HANDLE,
    data: *mut u8,
    len: CK_ULONG,
) -> CK_RV {
    // SAFETY: the application's pointer, passed on under the same contract.
    unsafe { update("C_VerifyUpdate", Kind::Verify, h, data, len) }
}

/// `C_VerifyFinal`.
///
/// # Safety
/// `sig` valid for `sig_len` bytes.
pub unsafe extern "C" fn C_VerifyFinal(
    h: CK_SESSION_HANDLE,
    sig: *mut u8,
    sig_len: CK_ULONG,
) -> CK_RV {
    let mut sig_len_io = sig_len;
    data(
        "C_VerifyFinal",
        Kind::Verify,
        h,
        || args::input(sig, sig_len),
        |b, bh| {
            // SAFETY: the application's buffer, checked above, passed on (contract).
            let rv = unsafe { b.finish(Kind::Verify, bh, sig, &mut sig_len_io) };
            (rv, false)
        },
    )
}
