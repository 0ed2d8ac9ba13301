//! The three exported symbols: `C_GetFunctionList`, `C_GetInterfaceList`, `C_GetInterface`.
//! Every other entry point is reached through the tables they return.

use super::client::{CLIENT_LIST_2_40, CLIENT_LIST_3_0};
use super::tables::{FUNCTION_LIST_2_40, FUNCTION_LIST_3_0};
use super::{args, guard};
use crate::error::err;
use crate::vendor::CK_CMKP11_ADMIN_FUNCTION_LIST;
use cryptoki_sys::*;
use std::ffi::CStr;

/// The standard interface name.
const PKCS11: &CStr = c"PKCS 11";
/// cmkp11's vendor interface name (`CMKP11_ADMIN_INTERFACE_NAME`).
const ADMIN: &CStr = c"cmkp11 admin";

/// A `CK_INTERFACE` in static memory. Its pointers point to immutable statics.
#[repr(transparent)]
pub struct Interface(CK_INTERFACE);

// SAFETY: the pointers inside point to immutable 'static data (a C string and a function
// table) that nobody writes, so sharing them between threads is sound.
unsafe impl Sync for Interface {}

/// The interfaces cmkp11 offers, the default (v3.0) first.
pub static INTERFACES: [Interface; 3] = [
    Interface(CK_INTERFACE {
        pInterfaceName: PKCS11.as_ptr() as *mut CK_UTF8CHAR,
        pFunctionList: &FUNCTION_LIST_3_0 as *const CK_FUNCTION_LIST_3_0 as *mut _,
        flags: 0,
    }),
    Interface(CK_INTERFACE {
        pInterfaceName: PKCS11.as_ptr() as *mut CK_UTF8CHAR,
        pFunctionList: &FUNCTION_LIST_2_40 as *const CK_FUNCTION_LIST as *mut _,
        flags: 0,
    }),
    Interface(CK_INTERFACE {
        pInterfaceName: ADMIN.as_ptr() as *mut CK_UTF8CHAR,
        pFunctionList: &super::admin::ADMIN_FUNCTIONS as *const CK_CMKP11_ADMIN_FUNCTION_LIST
            as *mut _,
        flags: 0,
    }),
];

/// The interfaces of client mode (service mode's application side): the standard ones,
/// over the client tables, and the admin interface whose every function the daemon
/// refuses to applications (and records): lifecycle changes are for operators.
pub static CLIENT_INTERFACES: [Interface; 3] = [
    Interface(CK_INTERFACE {
        pInterfaceName: PKCS11.as_ptr() as *mut CK_UTF8CHAR,
        pFunctionList: &CLIENT_LIST_3_0 as *const CK_FUNCTION_LIST_3_0 as *mut _,
        flags: 0,
    }),
    Interface(CK_INTERFACE {
        pInterfaceName: PKCS11.as_ptr() as *mut CK_UTF8CHAR,
        pFunctionList: &CLIENT_LIST_2_40 as *const CK_FUNCTION_LIST as *mut _,
        flags: 0,
    }),
    Interface(CK_INTERFACE {
        pInterfaceName: ADMIN.as_ptr() as *mut CK_UTF8CHAR,
        pFunctionList: &super::admin::client::CLIENT_ADMIN_FUNCTIONS
            as *const CK_CMKP11_ADMIN_FUNCTION_LIST as *mut _,
        flags: 0,
    }),
];

/// The interfaces of this process's mode (decided once, at the first getter call).
fn interfaces() -> &'static [Interface] {
    if crate::service::client::socket().is_some() {
        &CLIENT_INTERFACES
    } else {
        &INTERFACES
    }
}

fn version_of(i: &Interface) -> CK_VERSION {
    // Both tables start with a CK_VERSION: read it through the type each one really has.
    let p = i.0.pFunctionList as *const CK_FUNCTION_LIST_3_0;
    if std::ptr::eq(p, &FUNCTION_LIST_3_0) || std::ptr::eq(p, &CLIENT_LIST_3_0) {
        FUNCTION_LIST_3_0.version
    } else {
        FUNCTION_LIST_2_40.version
    }
}

/// `C_GetFunctionList`: the v2.40 table.
///
/// # Safety
/// `list` NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn C_GetFunctionList(list: *mut *mut CK_FUNCTION_LIST) -> CK_RV {
    guard("C_GetFunctionList", || {
        // SAFETY: NULL-checked output (contract).
        let list = unsafe { args::out(list)? };
        // cmkp11 loading its backend's cryptoki context through itself: the backend's
        // table (see `RawBackend::lend`), on that thread only and during that call only.
        if let Some((_, backend)) = crate::backend::raw::lent() {
            *list = backend;
            return Ok(());
        }
        let table = if crate::service::client::socket().is_some() {
            &CLIENT_LIST_2_40
        } else {
            &FUNCTION_LIST_2_40
        };
        *list = table as *const CK_FUNCTION_LIST as *mut CK_FUNCTION_LIST;
        Ok(())
    })
}

/// `C_GetInterfaceList`, with the two-call convention.
///
/// # Safety
/// `count` valid; `list` NULL or valid for `*count` interfaces.
#[no_mangle]
pub unsafe extern "C" fn C_GetInterfaceList(
    list: *mut CK_INTERFACE,
    count: *mut CK_ULONG,
) -> CK_RV {
    guard("C_GetInterfaceList", || {
        let all: Vec<CK_INTERFACE> = interfaces().iter().map(|i| i.0).collect();
        // SAFETY: two-call convention over application buffers (contract).
        unsafe { args::write_list(&all, list, count) }
    })
}

/// `C_GetInterface`: by name (NULL: the default, "PKCS 11" 3.0), optional version, and
/// flags the interface must have.
///
/// # Safety
/// `name` NULL or a NUL-terminated string; `version` NULL or valid; `out` valid for writes.
#[no_mangle]
pub unsafe extern "C" fn C_GetInterface(
    name: *mut CK_UTF8CHAR,
    version: *mut CK_VERSION,
    out: *mut *mut CK_INTERFACE,
    flags: CK_FLAGS,
) -> CK_RV {
    guard("C_GetInterface", || {
        // SAFETY: NULL-checked output (contract).
        let out = unsafe { args::out(out)? };
        // As in C_GetFunctionList: the backend's interface while it is lent to this
        // thread (NULL for a v2.40 table, which sends the loader to C_GetFunctionList).
        if let Some((backend, _)) = crate::backend::raw::lent() {
            *out = backend;
            return Ok(());
        }
        // SAFETY: NULL or a NUL-terminated string (contract).
        let name = (!name.is_null()).then(|| unsafe { CStr::from_ptr(name as *const _) });
        // SAFETY: NULL or a valid CK_VERSION (contract).
        let version = unsafe { version.as_ref() };
        let found = interfaces().iter().find(|i| {
            // SAFETY: our own static NUL-terminated names.
            let iname = unsafe { CStr::from_ptr(i.0.pInterfaceName as *const _) };
            let v = version_of(i);
            name.is_none_or(|n| n == iname)
                && version.is_none_or(|w| w.major == v.major && w.minor == v.minor)
                && i.0.flags & flags == flags
        });
        match found {
            Some(i) => {
                *out = &i.0 as *const CK_INTERFACE as *mut CK_INTERFACE;
                Ok(())
            }
            None => err(CKR_ARGUMENTS_BAD),
        }
    })
}
