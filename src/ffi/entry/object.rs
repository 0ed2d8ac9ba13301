//! Object management (PKCS#11 v3.0 §5.7).

use super::with_session;
use crate::error::{err, Error};
use crate::ffi::{args, guard};
use crate::policy::templates;
use crate::runtime::session::AttrValue;
use cryptoki::object::{Attribute, AttributeType};
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
            templates::create(&attrs, &lib.settings).map_err(Error::Rv)?;
            let o = s.backend().create_object(&attrs)?;
            *object = s.register(lib, o, !args::is_token(&attrs));
            if matches!(
                templates::class_of(&attrs),
                Some(CKO_SECRET_KEY | CKO_PRIVATE_KEY)
            ) {
                lib.objects.mark_imported(*object);
            }
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
            let o = s.object(lib, object, CKR_OBJECT_HANDLE_INVALID)?;
            // SAFETY: application template and output (contract); NULLs checked.
            let (attrs, new_object) =
                unsafe { (args::template(template, count)?, args::out(new_object)?) };
            let token = match attrs.iter().find_map(|a| match a {
                Attribute::Token(t) => Some(*t),
                _ => None,
            }) {
                Some(t) => t,
                None => s
                    .backend()
                    .get_attributes(o, &[AttributeType::Token])?
                    .iter()
                    .any(|a| matches!(a, Attribute::Token(true))),
            };
            let copy = s.backend().copy_object(o, &attrs)?;
            *new_object = s.register(lib, copy, !token);
            Ok(())
        })
    })
}

/// `C_DestroyObject`.
pub extern "C" fn C_DestroyObject(h: CK_SESSION_HANDLE, object: CK_OBJECT_HANDLE) -> CK_RV {
    guard("C_DestroyObject", || {
        with_session(h, |lib, s| {
            let o = s.object(lib, object, CKR_OBJECT_HANDLE_INVALID)?;
            s.backend().destroy_object(o)?;
            lib.objects.forget(object);
            Ok(())
        })
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
            let o = s.object(lib, object, CKR_OBJECT_HANDLE_INVALID)?;
            // SAFETY: application template (contract); NULL checked.
            let raw = unsafe { args::raw_template(template, count)? };
            let types: Vec<Option<AttributeType>> = raw
                .iter()
                .map(|a| AttributeType::try_from(a.type_).ok())
                .collect();
            let (_, info) = s.key_info(lib, object, CKR_OBJECT_HANDLE_INVALID)?;
            let mut values = s.attributes(o, &types)?;
            if info.is_protected() {
                // Key material of a CMK or DEK is never returned, whatever the backend says.
                for (v, t) in values.iter_mut().zip(&types) {
                    if t.is_some_and(templates::is_secret_value) {
                        *v = AttrValue::Sensitive;
                    }
                }
            }
            if let Some(len) = lib.objects.value_len(object) {
                for v in &mut values {
                    if matches!(v, AttrValue::Value(Attribute::ValueLen(l)) if u64::from(*l) == 0) {
                        *v = AttrValue::Value(Attribute::ValueLen(len.into()));
                    }
                }
            }
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
            let (o, info) = s.key_info(lib, object, CKR_OBJECT_HANDLE_INVALID)?;
            // SAFETY: application template (contract); NULL checked.
            let attrs = unsafe { args::template(template, count)? };
            templates::set(&info, &attrs).map_err(Error::Rv)?;
            let r = s.backend().update_attributes(o, &attrs);
            lib.objects.set_info(object, None);
            Ok(r?)
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
            // SAFETY: application template (contract); NULL checked.
            let attrs = unsafe { args::template(template, count)? };
            s.find_init(lib, &attrs)
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
