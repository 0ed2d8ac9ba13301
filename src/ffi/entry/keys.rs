//! Key management and random numbers (PKCS#11 v3.0 §5.14-5.15).

use super::with_session;
use crate::backend::rv;
use crate::error::{err, Error};
use crate::ffi::{args, guard};
use crate::policy::{self, templates, Class, Op};
use cryptoki::object::{Attribute, KeyType};
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
            let (mut mech, attrs, key) = unsafe {
                (
                    args::mechanism(mech)?,
                    args::template(template, count)?,
                    args::out(key)?,
                )
            };
            if !policy::mechanisms::is_generation(mech.ty)
                || templates::pair_key_type(mech.ty).is_ok()
            {
                return err(CKR_MECHANISM_INVALID);
            }
            let attrs = templates::generate_key(attrs, &lib.settings).map_err(Error::Rv)?;
            let k = s.backend().generate_key(&mech.to_cryptoki()?, &attrs)?;
            *key = s.register(lib, k, !args::is_token(&attrs));
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
            let (mut mech, pub_attrs, priv_attrs, pub_key, priv_key) = unsafe {
                (
                    args::mechanism(mech)?,
                    args::template(pub_template, pub_count)?,
                    args::template(priv_template, priv_count)?,
                    args::out(pub_key)?,
                    args::out(priv_key)?,
                )
            };
            let key_type = templates::pair_key_type(mech.ty).map_err(Error::Rv)?;
            let priv_attrs = templates::private_key(priv_attrs, key_type).map_err(Error::Rv)?;
            let (p, q) =
                s.backend()
                    .generate_key_pair(&mech.to_cryptoki()?, &pub_attrs, &priv_attrs)?;
            *pub_key = s.register(lib, p, !args::is_token(&pub_attrs));
            *priv_key = s.register(lib, q, !args::is_token(&priv_attrs));
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
            let (w, winfo) = s.key_info(lib, wrapping, CKR_WRAPPING_KEY_HANDLE_INVALID)?;
            let (k, kinfo) = s.key_info(lib, key, CKR_KEY_HANDLE_INVALID)?;
            let (_, origin, _) = lib.objects.local_facts(key);
            policy::check_wrap(mech.ty, &winfo, wrapping, &kinfo, origin, &lib.settings)
                .map_err(Error::Rv)?;
            lib.check_access(&winfo.label, Op::Wrap)?;
            s.wrap(mech, (wrapping, w), (key, k), sink)?;
            // A DEK first wrapped by X can from now on be wrapped only by X.
            lib.objects.set_origin(key, wrapping);
            Ok(())
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
            let (mut mech, wrapped, attrs, key) = unsafe {
                (
                    args::mechanism(mech)?,
                    args::bytes(wrapped, wrapped_len)?,
                    args::template(template, count)?,
                    args::out(key)?,
                )
            };
            let (u, uinfo) = s.key_info(lib, unwrapping, CKR_UNWRAPPING_KEY_HANDLE_INVALID)?;
            policy::check_use(Op::Unwrap, mech.ty, &uinfo, &lib.settings).map_err(Error::Rv)?;
            if uinfo.class() == Class::Cmk {
                lib.check_access(&uinfo.label, Op::Unwrap)?;
            }
            let attrs = templates::unwrapped(attrs, &lib.settings).map_err(Error::Rv)?;
            let k = s
                .backend()
                .unwrap_key(&mech.to_cryptoki()?, u, wrapped, &attrs)
                .map_err(|e| Error::Rv(rv::unwrap_failure(Error::from(e).rv())))?;
            *key = s.register(lib, k, !args::is_token(&attrs));
            if let Some(len) = aes_value_len_from_blob(mech.ty, wrapped.len(), &attrs) {
                lib.objects.set_value_len(*key, len);
            }
            // A DEK unwrapped by X can be wrapped only by X (an RSA key never wraps, so a
            // DEK conjured through RSA-OAEP can never leave the token).
            lib.objects.set_origin(*key, unwrapping);
            Ok(())
        })
    })
}

/// An AES key unwrapped with AES-KW (RFC 3394) or AES-KWP (RFC 5649) is as long as the
/// blob minus its 8-byte integrity block (AES key lengths are multiples of 8, so KWP adds
/// no padding). SoftHSM2 reports `CKA_VALUE_LEN` 0 for such a key and refuses the
/// attribute in an unwrap template, so cmkp11 answers it from the blob.
fn aes_value_len_from_blob(
    mech: CK_MECHANISM_TYPE,
    blob_len: usize,
    attrs: &[Attribute],
) -> Option<CK_ULONG> {
    let aes = attrs
        .iter()
        .any(|a| matches!(a, Attribute::KeyType(t) if *t == KeyType::AES));
    (matches!(mech, CKM_AES_KEY_WRAP | CKM_AES_KEY_WRAP_PAD) && aes && blob_len > 8)
        .then(|| (blob_len - 8) as CK_ULONG)
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
            let (mut mech, attrs, key) = unsafe {
                (
                    args::mechanism(mech)?,
                    args::template(template, count)?,
                    args::out(key)?,
                )
            };
            let (b, binfo) = s.key_info(lib, base, CKR_KEY_HANDLE_INVALID)?;
            policy::check_use(Op::Derive, mech.ty, &binfo, &lib.settings).map_err(Error::Rv)?;
            lib.check_access(&binfo.label, Op::Derive)?;
            let attrs = templates::derived(attrs, &lib.settings).map_err(Error::Rv)?;
            let k = s.backend().derive_key(&mech.to_cryptoki()?, b, &attrs)?;
            *key = s.register(lib, k, !args::is_token(&attrs));
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
