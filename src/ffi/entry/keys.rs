//! Key management and random numbers (PKCS#11 v3.0 §5.14-5.15).

use super::with_session;
use crate::ffi::{args, guard};
use cryptoki_sys::*;

/// `C_GenerateKey`.
///
/// # Safety
/// `mech` a valid `CK_MECHANISM`; `template` valid for `count`; `key` valid for writes.
pub unsafe extern "C" fn C_GenerateKey(
    h: CK_SESSION_HANDLE,
    mech: *mut CK_MECHANISM,
    template: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
    key: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    guard("C_GenerateKey", || {
        with_session(h, |lib, s| {
            // SAFETY: application arguments (contract); NULLs checked.
            let mech = unsafe { args::mechanism(mech)? };
            // SAFETY: as above.
            let raw = unsafe { args::raw_template(template, count)? };
            if !key.is_null() {
                // Copied before the policy reads it: the decision and the backend see
                // the same bytes.
                let mut copy = args::ShortCopy::new();
                // SAFETY: the template's values are valid for their lengths (contract).
                let filled = unsafe { copy.fill(raw) };
                let view = if filled { copy.view() } else { None };
                if let (Some(b), Some(t)) = (crate::backend::raw::get(), view) {
                    let ty = mech.ty;
                    let short = lib.generate_dek_short(s, &mech, &t, |bh, completion| {
                        b.generate_key(bh, ty, &t, completion)
                    });
                    if let Some(made) = short {
                        // SAFETY: checked non-NULL above; the application's output.
                        unsafe { *key = made? };
                        return Ok(());
                    }
                }
            }
            // SAFETY: application arguments (contract); NULLs checked.
            let (attrs, key) = unsafe { (args::template(template, count)?, args::out(key)?) };
            *key = lib.generate_key(s, mech, attrs)?;
            Ok(())
        })
    })
}

/// `C_GenerateKeyPair`.
///
/// # Safety
/// As for [`C_GenerateKey`], for both templates and both outputs.
pub unsafe extern "C" fn C_GenerateKeyPair(
    h: CK_SESSION_HANDLE,
    mech: *mut CK_MECHANISM,
    pub_template: *mut CK_ATTRIBUTE,
    pub_count: CK_ULONG,
    priv_template: *mut CK_ATTRIBUTE,
    priv_count: CK_ULONG,
    pub_key: *mut CK_OBJECT_HANDLE,
    priv_key: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    guard("C_GenerateKeyPair", || {
        with_session(h, |lib, s| {
            // SAFETY: application arguments (contract); NULLs checked.
            let (mech, pub_attrs, priv_attrs, pub_key, priv_key) = unsafe {
                (
                    args::mechanism(mech)?,
                    args::template(pub_template, pub_count)?,
                    args::template(priv_template, priv_count)?,
                    args::out(pub_key)?,
                    args::out(priv_key)?,
                )
            };
            (*pub_key, *priv_key) = lib.generate_key_pair(s, mech, pub_attrs, priv_attrs)?;
            Ok(())
        })
    })
}

/// `C_WrapKey`, with the two-call convention (the blob of the length query is kept and
/// handed out by the collecting call).
///
/// # Safety
/// `mech` a valid `CK_MECHANISM`; `out_len` valid; `out` NULL or valid for `*out_len`.
pub unsafe extern "C" fn C_WrapKey(
    h: CK_SESSION_HANDLE,
    mech: *mut CK_MECHANISM,
    wrapping: CK_OBJECT_HANDLE,
    key: CK_OBJECT_HANDLE,
    out: *mut u8,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    guard("C_WrapKey", || {
        with_session(h, |lib, s| {
            // SAFETY: application arguments (contract); NULLs checked.
            let (mech, sink) = unsafe { (args::mechanism(mech)?, args::sink(out, out_len)?) };
            let b = crate::backend::raw::get().ok_or(crate::error::Error::Rv(CKR_GENERAL_ERROR))?;
            let raw = |h, m: &mut crate::backend::mech::Mech, w, k, out: &mut [u8]| {
                b.wrap_key(h, m, w, k, out)
            };
            lib.wrap_key(s, mech, wrapping, key, sink, Some(&raw))
        })
    })
}

/// `C_UnwrapKey`.
///
/// # Safety
/// `mech` a valid `CK_MECHANISM`; `wrapped` valid for `wrapped_len`; `template` valid for
/// `count`; `key` valid for writes.
pub unsafe extern "C" fn C_UnwrapKey(
    h: CK_SESSION_HANDLE,
    mech: *mut CK_MECHANISM,
    unwrapping: CK_OBJECT_HANDLE,
    wrapped: *mut u8,
    wrapped_len: CK_ULONG,
    template: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
    key: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    guard("C_UnwrapKey", || {
        with_session(h, |lib, s| {
            // SAFETY: application arguments (contract); NULLs checked.
            let (mech, wrapped, raw) = unsafe {
                (
                    args::mechanism(mech)?,
                    args::bytes(wrapped, wrapped_len)?,
                    args::raw_template(template, count)?,
                )
            };
            if !key.is_null() {
                // Copied before the policy reads it (see `C_GenerateKey`).
                let mut copy = args::ShortCopy::new();
                // SAFETY: the template's values are valid for their lengths (contract).
                let filled = unsafe { copy.fill(raw) };
                let view = if filled { copy.view() } else { None };
                if let (Some(b), Some(t)) = (crate::backend::raw::get(), view) {
                    let ty = mech.ty;
                    let short = lib.unwrap_dek_short(
                        s,
                        &mech,
                        unwrapping,
                        wrapped.len(),
                        &t,
                        |bh, obj, completion| b.unwrap_key(bh, ty, obj, wrapped, &t, completion),
                    );
                    if let Some(made) = short {
                        // SAFETY: checked non-NULL above; the application's output.
                        unsafe { *key = made? };
                        return Ok(());
                    }
                }
            }
            // SAFETY: application arguments (contract); NULLs checked.
            let (attrs, key) = unsafe { (args::template(template, count)?, args::out(key)?) };
            *key = lib.unwrap_key(s, mech, unwrapping, wrapped, attrs)?;
            Ok(())
        })
    })
}

/// `C_DeriveKey`.
///
/// # Safety
/// `mech` a valid `CK_MECHANISM`; `template` valid for `count`; `key` valid for writes.
pub unsafe extern "C" fn C_DeriveKey(
    h: CK_SESSION_HANDLE,
    mech: *mut CK_MECHANISM,
    base: CK_OBJECT_HANDLE,
    template: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
    key: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    guard("C_DeriveKey", || {
        with_session(h, |lib, s| {
            // SAFETY: application arguments (contract); NULLs checked.
            let (mech, attrs, key) = unsafe {
                (
                    args::mechanism(mech)?,
                    args::template(template, count)?,
                    args::out(key)?,
                )
            };
            *key = lib.derive_key(s, mech, base, attrs)?;
            Ok(())
        })
    })
}

/// `C_SeedRandom`.
///
/// # Safety
/// `seed` valid for `len` bytes.
pub unsafe extern "C" fn C_SeedRandom(h: CK_SESSION_HANDLE, seed: *mut u8, len: CK_ULONG) -> CK_RV {
    guard("C_SeedRandom", || {
        with_session(h, |_, s| {
            // SAFETY: application buffer of the given length (contract).
            let seed = unsafe { args::bytes(seed, len)? };
            Ok(s.backend().seed_random(seed)?)
        })
    })
}

/// `C_GenerateRandom`: the backend writes straight into the application's buffer.
///
/// # Safety
/// `out` valid for `len` bytes.
pub unsafe extern "C" fn C_GenerateRandom(
    h: CK_SESSION_HANDLE,
    out: *mut u8,
    len: CK_ULONG,
) -> CK_RV {
    guard("C_GenerateRandom", || {
        with_session(h, |_, s| {
            // SAFETY: application buffer of the given length (contract).
            let out = unsafe { args::bytes_mut(out, len)? };
            Ok(s.backend().generate_random_slice(out)?)
        })
    })
}
