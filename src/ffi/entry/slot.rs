//! Slot and token management (PKCS#11 v3.0 §5.5).

use super::with_session;
use crate::error::{err, Error, Result};
use crate::ffi::{args, guard};
use crate::runtime;
use cryptoki::types::AuthPin;
use cryptoki_sys::*;

/// A PIN from the application as a zeroizing secret (cryptoki takes UTF-8 PINs here).
pub(super) fn auth_pin(pin: &[u8]) -> Result<AuthPin> {
    let s = String::from_utf8(pin.to_vec()).map_err(|e| {
        zeroize::Zeroize::zeroize(&mut e.into_bytes());
        Error::Rv(CKR_PIN_INVALID)
    })?;
    Ok(AuthPin::from(s))
}

/// `C_GetSlotList`: one slot per backend token, numbered from 0.
///
/// # Safety
/// `count` valid; `list` NULL or valid for `*count` slot ids.
pub unsafe extern "C" fn C_GetSlotList(
    _token_present: CK_BBOOL,
    list: *mut CK_SLOT_ID,
    count: *mut CK_ULONG,
) -> CK_RV {
    guard("C_GetSlotList", || {
        let lib = runtime::library()?;
        let ids: Vec<CK_SLOT_ID> = (0..lib.backend.slots.len() as CK_SLOT_ID).collect();
        // SAFETY: two-call convention over application buffers (contract).
        unsafe { args::write_list(&ids, list, count) }
    })
}

/// `C_GetSlotInfo`.
///
/// # Safety
/// `info` NULL or valid for writes.
pub unsafe extern "C" fn C_GetSlotInfo(slot: CK_SLOT_ID, info: *mut CK_SLOT_INFO) -> CK_RV {
    guard("C_GetSlotInfo", || {
        let lib = runtime::library()?;
        let s = lib.slot(slot)?;
        // SAFETY: NULL-checked output (contract).
        let info = unsafe { args::out(info)? };
        *info = lib.backend.slot_info(s)?;
        Ok(())
    })
}

/// `C_GetTokenInfo`.
///
/// # Safety
/// `info` NULL or valid for writes.
pub unsafe extern "C" fn C_GetTokenInfo(slot: CK_SLOT_ID, info: *mut CK_TOKEN_INFO) -> CK_RV {
    guard("C_GetTokenInfo", || {
        let lib = runtime::library()?;
        let s = lib.slot(slot)?;
        // SAFETY: NULL-checked output (contract).
        let info = unsafe { args::out(info)? };
        *info = lib.backend.token_info(s)?;
        Ok(())
    })
}

/// `C_GetMechanismList`: the backend's mechanisms that cmkp11 forwards.
///
/// # Safety
/// `count` valid; `list` NULL or valid for `*count` entries.
pub unsafe extern "C" fn C_GetMechanismList(
    slot: CK_SLOT_ID,
    list: *mut CK_MECHANISM_TYPE,
    count: *mut CK_ULONG,
) -> CK_RV {
    guard("C_GetMechanismList", || {
        let mechs = runtime::library()?.mechanism_list(slot)?;
        // SAFETY: two-call convention over application buffers (contract).
        unsafe { args::write_list(&mechs, list, count) }
    })
}

/// `C_GetMechanismInfo`.
///
/// # Safety
/// `info` NULL or valid for writes.
pub unsafe extern "C" fn C_GetMechanismInfo(
    slot: CK_SLOT_ID,
    ty: CK_MECHANISM_TYPE,
    info: *mut CK_MECHANISM_INFO,
) -> CK_RV {
    guard("C_GetMechanismInfo", || {
        let lib = runtime::library()?;
        lib.slot(slot)?;
        // SAFETY: NULL-checked output (contract).
        let info = unsafe { args::out(info)? };
        *info = lib.mechanism_info(slot, ty)?;
        Ok(())
    })
}

/// `C_InitToken`: forwarded to the backend.
///
/// # Safety
/// `pin` valid for `pin_len` bytes; `label` NULL or 32 bytes.
pub unsafe extern "C" fn C_InitToken(
    slot: CK_SLOT_ID,
    pin: *mut CK_UTF8CHAR,
    pin_len: CK_ULONG,
    label: *mut CK_UTF8CHAR,
) -> CK_RV {
    guard("C_InitToken", || {
        let lib = runtime::library()?;
        lib.slot(slot)?;
        // SAFETY: application buffers of the given lengths (contract).
        let (pin, label) = unsafe {
            (
                args::bytes_max(pin, pin_len, args::MAX_PIN)?,
                args::bytes(label, 32)?,
            )
        };
        let label: &[u8; 32] = label.try_into().or(err(CKR_ARGUMENTS_BAD))?;
        lib.init_token(slot, pin, label)
    })
}

/// `C_InitPIN`: forwarded to the backend.
///
/// # Safety
/// `pin` valid for `pin_len` bytes.
pub unsafe extern "C" fn C_InitPIN(
    h: CK_SESSION_HANDLE,
    pin: *mut CK_UTF8CHAR,
    pin_len: CK_ULONG,
) -> CK_RV {
    guard("C_InitPIN", || {
        with_session(h, |_, s| {
            // SAFETY: application buffer of the given length (contract).
            let pin = unsafe { args::bytes_max(pin, pin_len, args::MAX_PIN)? };
            Ok(s.backend().init_pin(&auth_pin(pin)?)?)
        })
    })
}

/// `C_SetPIN`: forwarded to the backend.
///
/// # Safety
/// `old`/`new` valid for their lengths.
pub unsafe extern "C" fn C_SetPIN(
    h: CK_SESSION_HANDLE,
    old: *mut CK_UTF8CHAR,
    old_len: CK_ULONG,
    new: *mut CK_UTF8CHAR,
    new_len: CK_ULONG,
) -> CK_RV {
    guard("C_SetPIN", || {
        with_session(h, |_, s| {
            // SAFETY: application buffers of the given lengths (contract).
            let (old, new) = unsafe {
                (
                    args::bytes_max(old, old_len, args::MAX_PIN)?,
                    args::bytes_max(new, new_len, args::MAX_PIN)?,
                )
            };
            Ok(s.backend().set_pin(&auth_pin(old)?, &auth_pin(new)?)?)
        })
    })
}
