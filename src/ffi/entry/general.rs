//! General-purpose functions (PKCS#11 v3.0 §5.4).

use crate::error::err;
use crate::ffi::{args, guard, install_atfork};
use crate::runtime;
use cryptoki_sys::*;
use std::os::raw::c_void;

/// The library version reported by `C_GetInfo`.
pub const LIBRARY_VERSION: CK_VERSION = CK_VERSION { major: 0, minor: 1 };

/// `C_Initialize`.
///
/// # Safety
/// `init_args` is NULL or points to a valid `CK_C_INITIALIZE_ARGS`.
pub unsafe extern "C" fn C_Initialize(init_args: *mut c_void) -> CK_RV {
    guard("C_Initialize", || {
        // SAFETY: NULL or a valid CK_C_INITIALIZE_ARGS (PKCS#11 contract).
        if let Some(a) = unsafe { (init_args as *const CK_C_INITIALIZE_ARGS).as_ref() } {
            if !a.pReserved.is_null() {
                return err(CKR_ARGUMENTS_BAD);
            }
            let callbacks = [
                a.CreateMutex.is_some(),
                a.DestroyMutex.is_some(),
                a.LockMutex.is_some(),
                a.UnlockMutex.is_some(),
            ];
            let set = callbacks.iter().filter(|c| **c).count();
            if set != 0 && set != 4 {
                return err(CKR_ARGUMENTS_BAD);
            }
            // cmkp11 locks with the OS's primitives only: callbacks without permission to
            // use OS locking cannot be honoured.
            if set == 4 && a.flags & CKF_OS_LOCKING_OK == 0 {
                return err(CKR_CANT_LOCK);
            }
        }
        install_atfork();
        let me = own_path();
        crate::sys::preserving_openssl_errors(|| runtime::initialize(me.as_deref()))?;
        crate::backend::raw::install(Some(runtime::library()?.backend.raw));
        Ok(())
    })
}

/// The path of the library this code is in (cmkp11's `.so`), from the dynamic loader.
fn own_path() -> Option<std::path::PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: Dl_info is plain C data, for which all zeros is a valid value.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: dladdr only reads the loader's tables for an address of this library and
    // fills `info`; `dli_fname` then points to a NUL-terminated string of the loader's.
    let found = unsafe { libc::dladdr(C_Initialize as *const c_void, &mut info) };
    if found == 0 || info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: non-NULL, NUL-terminated (dladdr's contract).
    let name = unsafe { std::ffi::CStr::from_ptr(info.dli_fname) };
    let path: std::path::PathBuf = std::ffi::OsStr::from_bytes(name.to_bytes()).into();
    // Linked into a program (the service daemon) rather than loaded as a module: there
    // is no library of cmkp11's own to load a context from.
    let exe = std::fs::canonicalize("/proc/self/exe").ok();
    if std::fs::canonicalize(&path).ok() == exe {
        return None;
    }
    Some(path)
}

/// `C_Finalize`.
///
/// # Safety
/// Any pointer value is accepted (it must be NULL).
pub unsafe extern "C" fn C_Finalize(reserved: *mut c_void) -> CK_RV {
    guard("C_Finalize", || {
        if !reserved.is_null() {
            runtime::library()?;
            return err(CKR_ARGUMENTS_BAD);
        }
        crate::sys::preserving_openssl_errors(runtime::finalize)?;
        crate::backend::raw::install(None);
        Ok(())
    })
}

/// `C_GetInfo`.
///
/// # Safety
/// `info` is NULL or valid for writing a `CK_INFO`.
pub unsafe extern "C" fn C_GetInfo(info: *mut CK_INFO) -> CK_RV {
    guard("C_GetInfo", || {
        runtime::library()?;
        #[cfg(debug_assertions)]
        if std::env::var_os("CMKP11_FAULT").is_some_and(|v| v == "panic-in-get-info") {
            panic!("fault injected by CMKP11_FAULT=panic-in-get-info");
        }
        // SAFETY: NULL-checked; valid for writes by contract.
        let info = unsafe { args::out(info)? };
        *info = CK_INFO {
            cryptokiVersion: CK_VERSION { major: 3, minor: 0 },
            manufacturerID: crate::backend::token::padded("cmkp11"),
            flags: 0,
            libraryDescription: crate::backend::token::padded("cmkp11 customer-managed keys"),
            libraryVersion: LIBRARY_VERSION,
        };
        Ok(())
    })
}

/// `C_GetFunctionStatus`: legacy; cmkp11 runs no function in parallel.
pub extern "C" fn C_GetFunctionStatus(h: CK_SESSION_HANDLE) -> CK_RV {
    guard("C_GetFunctionStatus", || {
        runtime::library()?.session(h)?;
        err(CKR_FUNCTION_NOT_PARALLEL)
    })
}

/// `C_CancelFunction`: legacy; cmkp11 runs no function in parallel.
pub extern "C" fn C_CancelFunction(h: CK_SESSION_HANDLE) -> CK_RV {
    guard("C_CancelFunction", || {
        runtime::library()?.session(h)?;
        err(CKR_FUNCTION_NOT_PARALLEL)
    })
}

/// `C_WaitForSlotEvent`: slots are fixed at `C_Initialize`, so there are no events.
///
/// # Safety
/// Pointers are not dereferenced.
pub unsafe extern "C" fn C_WaitForSlotEvent(
    flags: CK_FLAGS,
    slot: *mut CK_SLOT_ID,
    _reserved: *mut c_void,
) -> CK_RV {
    guard("C_WaitForSlotEvent", || {
        runtime::library()?;
        if slot.is_null() {
            return err(CKR_ARGUMENTS_BAD);
        }
        if flags & CKF_DONT_BLOCK != 0 {
            return err(CKR_NO_EVENT);
        }
        err(CKR_FUNCTION_NOT_SUPPORTED)
    })
}
