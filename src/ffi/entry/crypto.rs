//! Encryption, decryption, digests, signatures and verification (PKCS#11 v3.0 §5.8-5.13).

use super::with_session;
use crate::ffi::{args, guard};
use crate::runtime::session::Kind;
use cryptoki_sys::*;

/// `C_*Init` with a key: parses the mechanism, resolves the key, starts the operation.
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
            // SAFETY: forwarded caller contract.
            let mech = unsafe { args::mechanism(mech)? };
            lib.crypto_init(s, kind, mech, key)
        })
    })
}

/// A single-part operation with output (`C_Encrypt`, `C_Decrypt`, `C_Digest`, `C_Sign`).
///
/// # Safety
/// `data` valid for `len`; `out_len` valid; `out` NULL or valid for `*out_len` bytes.
unsafe fn single(
    name: &'static str,
    kind: Kind,
    h: CK_SESSION_HANDLE,
    data: *mut u8,
    len: CK_ULONG,
    out: *mut u8,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    guard(name, || {
        with_session(h, |_, s| {
            // SAFETY: forwarded caller contract.
            let (data, sink) = unsafe { (args::bytes(data, len)?, args::sink(out, out_len)?) };
            s.single(kind, data, sink)
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
    data: *mut u8,
    len: CK_ULONG,
    out: *mut u8,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    guard(name, || {
        with_session(h, |_, s| {
            // SAFETY: forwarded caller contract.
            let (data, sink) = unsafe { (args::bytes(data, len)?, args::sink(out, out_len)?) };
            s.update_out(kind, data, sink)
        })
    })
}

/// A multi-part update without output (`C_DigestUpdate`, `C_SignUpdate`, `C_VerifyUpdate`).
///
/// # Safety
/// `data` valid for `len` bytes.
unsafe fn update(
    name: &'static str,
    kind: Kind,
    h: CK_SESSION_HANDLE,
    data: *mut u8,
    len: CK_ULONG,
) -> CK_RV {
    guard(name, || {
        with_session(h, |_, s| {
            // SAFETY: forwarded caller contract.
            let data = unsafe { args::bytes(data, len)? };
            s.update(kind, data)
        })
    })
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
    guard(name, || {
        with_session(h, |_, s| {
            // SAFETY: forwarded caller contract.
            let sink = unsafe { args::sink(out, out_len)? };
            s.finish(kind, sink)
        })
    })
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

/// `C_DigestKey`.
pub extern "C" fn C_DigestKey(h: CK_SESSION_HANDLE, key: CK_OBJECT_HANDLE) -> CK_RV {
    guard("C_DigestKey", || {
        with_session(h, |lib, s| lib.digest_key(s, key))
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
    data: *mut u8,
    len: CK_ULONG,
    sig: *mut u8,
    sig_len: CK_ULONG,
) -> CK_RV {
    guard("C_Verify", || {
        with_session(h, |_, s| {
            // SAFETY: application buffers of the given lengths (contract).
            let (data, sig) = unsafe { (args::bytes(data, len)?, args::bytes(sig, sig_len)?) };
            s.verify(data, sig)
        })
    })
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
    guard("C_VerifyFinal", || {
        with_session(h, |_, s| {
            // SAFETY: application buffer of the given length (contract).
            let sig = unsafe { args::bytes(sig, sig_len)? };
            s.verify_final(sig)
        })
    })
}
