//! Object management (PKCS#11 v3.0 §5.7).

use super::with_session;
use crate::error::err;
use crate::ffi::{args, guard};
use crate::runtime::session::AttrValue;
use cryptoki_sys::*;

/// `C_CreateObject`.
///
/// # Safety
/// `template` valid for `count` attributes; `object` NULL or valid for writes.
pub unsafe extern "C" fn C_CreateObject(
    h: CK_SESSION_HANDLE,
    template: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
    object: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    guard("C_CreateObject", || {
        with_session(h, |lib, s| {
            // SAFETY: application template and output (contract); NULLs checked.
            let (attrs, object) = unsafe { (args::template(template, count)?, args::out(object)?) };
            *object = lib.create_object(s, attrs)?;
            Ok(())
        })
    })
}

/// `C_CopyObject`.
///
/// # Safety
/// As for [`C_CreateObject`].
pub unsafe extern "C" fn C_CopyObject(
    h: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
    template: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
    new_object: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    guard("C_CopyObject", || {
        with_session(h, |lib, s| {
            // SAFETY: application template and output (contract); NULLs checked.
            let (attrs, new_object) =
                unsafe { (args::template(template, count)?, args::out(new_object)?) };
            *new_object = lib.copy_object(s, object, attrs)?;
            Ok(())
        })
    })
}

/// `C_DestroyObject` (on a CMK: schedules its deletion).
pub extern "C" fn C_DestroyObject(h: CK_SESSION_HANDLE, object: CK_OBJECT_HANDLE) -> CK_RV {
    guard("C_DestroyObject", || {
        with_session(h, |lib, s| lib.destroy_object(s, object))
    })
}

/// `C_GetObjectSize`: the handle is checked; the size is `CK_UNAVAILABLE_INFORMATION`,
/// as the specification allows (cryptoki does not expose the backend's figure).
///
/// # Safety
/// `size` NULL or valid for writes.
pub unsafe extern "C" fn C_GetObjectSize(
    h: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
    size: *mut CK_ULONG,
) -> CK_RV {
    guard("C_GetObjectSize", || {
        with_session(h, |lib, s| {
            s.object(lib, object, CKR_OBJECT_HANDLE_INVALID)?;
            // SAFETY: NULL-checked output (contract).
            *unsafe { args::out(size)? } = CK_UNAVAILABLE_INFORMATION;
            Ok(())
        })
    })
}

/// `C_GetAttributeValue`, attribute by attribute: a NULL `pValue` gets the length; a
/// buffer too small, a sensitive or an invalid attribute gets
/// `CK_UNAVAILABLE_INFORMATION` while the others are still filled, and the call returns
/// `CKR_ATTRIBUTE_SENSITIVE`, `CKR_ATTRIBUTE_TYPE_INVALID` or `CKR_BUFFER_TOO_SMALL`.
///
/// # Safety
/// `template` valid for `count` attributes, each `pValue` NULL or valid for its length.
pub unsafe extern "C" fn C_GetAttributeValue(
    h: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
    template: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
) -> CK_RV {
    guard("C_GetAttributeValue", || {
        with_session(h, |lib, s| {
            // SAFETY: application template (contract); NULL checked.
            let raw = unsafe { args::raw_template(template, count)? };
            let types: Vec<CK_ATTRIBUTE_TYPE> = raw.iter().map(|a| a.type_).collect();
            let values = lib.get_attributes(s, object, &types)?;
            let (mut sensitive, mut invalid, mut small) = (false, false, false);
            for (dst, v) in raw.iter_mut().zip(values) {
                match v {
                    AttrValue::Value(a) => {
                        // SAFETY: `dst.pValue` NULL or valid for `dst.ulValueLen` (contract).
                        small |= !unsafe { args::put_attribute(dst, &a) };
                    }
                    AttrValue::Sensitive => {
                        dst.ulValueLen = CK_UNAVAILABLE_INFORMATION;
                        sensitive = true;
                    }
                    AttrValue::Invalid => {
                        dst.ulValueLen = CK_UNAVAILABLE_INFORMATION;
                        invalid = true;
                    }
                }
            }
            match (sensitive, invalid, small) {
                (true, _, _) => err(CKR_ATTRIBUTE_SENSITIVE),
                (_, true, _) => err(CKR_ATTRIBUTE_TYPE_INVALID),
                (_, _, true) => err(CKR_BUFFER_TOO_SMALL),
                _ => Ok(()),
            }
        })
    })
}

/// `C_SetAttributeValue`.
///
/// # Safety
/// `template` valid for `count` attributes.
pub unsafe extern "C" fn C_SetAttributeValue(
    h: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
    template: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
) -> CK_RV {
    guard("C_SetAttributeValue", || {
        with_session(h, |lib, s| {
            // SAFETY: application template (contract); NULL checked.
            let attrs = unsafe { args::template(template, count)? };
            lib.set_attributes(s, object, attrs)
        })
    })
}

/// `C_FindObjectsInit`.
///
/// # Safety
/// `template` valid for `count` attributes.
pub unsafe extern "C" fn C_FindObjectsInit(
    h: CK_SESSION_HANDLE,
    template: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
) -> CK_RV {
    guard("C_FindObjectsInit", || {
        with_session(h, |lib, s| {
            if s.finding() {
                return err(CKR_OPERATION_ACTIVE);
            }
            // SAFETY: application template (contract); NULL checked.
            let attrs = unsafe { args::template(template, count)? };
            lib.find_init(s, attrs)
        })
    })
}

/// `C_FindObjects`.
///
/// # Safety
/// `objects` valid for `max` handles; `count` valid for writes.
pub unsafe extern "C" fn C_FindObjects(
    h: CK_SESSION_HANDLE,
    objects: *mut CK_OBJECT_HANDLE,
    max: CK_ULONG,
    count: *mut CK_ULONG,
) -> CK_RV {
    guard("C_FindObjects", || {
        with_session(h, |_, s| {
            // SAFETY: NULL-checked output (contract).
            let count = unsafe { args::out(count)? };
            if objects.is_null() && max > 0 {
                return err(CKR_ARGUMENTS_BAD);
            }
            let found = s.find_next(max as usize)?;
            if !found.is_empty() {
                // SAFETY: `objects` holds `max >= found.len()` handles (contract).
                unsafe { std::ptr::copy_nonoverlapping(found.as_ptr(), objects, found.len()) };
            }
            *count = found.len() as CK_ULONG;
            Ok(())
        })
    })
}

/// `C_FindObjectsFinal`.
pub extern "C" fn C_FindObjectsFinal(h: CK_SESSION_HANDLE) -> CK_RV {
    guard("C_FindObjectsFinal", || {
        with_session(h, |_, s| s.find_final())
    })
}
