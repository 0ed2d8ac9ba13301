//! Session management (PKCS#11 v3.0 §5.6).

use super::with_session;
use crate::error::err;
use crate::ffi::{args, guard};
use crate::runtime::{self, session::Kind};
use cryptoki::session::{SessionState, UserType};
use cryptoki::types::RawAuthPin;
use cryptoki_sys::*;
use std::os::raw::c_void;

/// `C_OpenSession`. Notification callbacks are accepted and never called.
///
/// # Safety
/// `session` NULL or valid for writes.
pub unsafe extern "C" fn C_OpenSession(
    slot: CK_SLOT_ID,
    flags: CK_FLAGS,
    _application: *mut c_void,
    _notify: CK_NOTIFY,
    session: *mut CK_SESSION_HANDLE,
) -> CK_RV {
    guard("C_OpenSession", || {
        let lib = runtime::library()?;
        lib.slot(slot)?;
        // SAFETY: NULL-checked output (contract).
        let session = unsafe { args::out(session)? };
        if flags & CKF_SERIAL_SESSION == 0 {
            return err(CKR_SESSION_PARALLEL_NOT_SUPPORTED);
        }
        *session = lib.open_session(slot, flags & CKF_RW_SESSION != 0)?;
        Ok(())
    })
}

/// `C_CloseSession`.
pub extern "C" fn C_CloseSession(h: CK_SESSION_HANDLE) -> CK_RV {
    guard("C_CloseSession", || runtime::library()?.close_session(h))
}

/// `C_CloseAllSessions`.
pub extern "C" fn C_CloseAllSessions(slot: CK_SLOT_ID) -> CK_RV {
    guard("C_CloseAllSessions", || {
        runtime::library()?.close_all_sessions(slot)
    })
}

/// `C_GetSessionInfo`: the backend's state, with cmkp11's slot id.
///
/// # Safety
/// `info` NULL or valid for writes.
pub unsafe extern "C" fn C_GetSessionInfo(
    h: CK_SESSION_HANDLE,
    info: *mut CK_SESSION_INFO,
) -> CK_RV {
    guard("C_GetSessionInfo", || {
        with_session(h, |_, s| {
            // SAFETY: NULL-checked output (contract).
            let info = unsafe { args::out(info)? };
            let i = s.backend().get_session_info()?;
            let state = match i.session_state() {
                SessionState::RoPublic => CKS_RO_PUBLIC_SESSION,
                SessionState::RoUser => CKS_RO_USER_FUNCTIONS,
                SessionState::RwPublic => CKS_RW_PUBLIC_SESSION,
                SessionState::RwUser => CKS_RW_USER_FUNCTIONS,
                SessionState::RwSecurityOfficer => CKS_RW_SO_FUNCTIONS,
            };
            *info = CK_SESSION_INFO {
                slotID: s.slot_id,
                state,
                flags: CKF_SERIAL_SESSION | if i.read_write() { CKF_RW_SESSION } else { 0 },
                ulDeviceError: i.device_error() as CK_ULONG,
            };
            Ok(())
        })
    })
}

/// `C_Login`: the application's PIN is the backend token's PIN.
///
/// # Safety
/// `pin` NULL (protected authentication path) or valid for `pin_len` bytes.
pub unsafe extern "C" fn C_Login(
    h: CK_SESSION_HANDLE,
    user: CK_USER_TYPE,
    pin: *mut CK_UTF8CHAR,
    pin_len: CK_ULONG,
) -> CK_RV {
    guard("C_Login", || {
        with_session(h, |lib, s| {
            let user = match user {
                CKU_SO => UserType::So,
                CKU_USER => UserType::User,
                CKU_CONTEXT_SPECIFIC => UserType::ContextSpecific,
                _ => return err(CKR_USER_TYPE_INVALID),
            };
            if pin.is_null() {
                return lib.login(s, user, None);
            }
            // SAFETY: application buffer of the given length (contract).
            let pin = unsafe { args::bytes_max(pin, pin_len, args::MAX_PIN)? };
            let pin = RawAuthPin::new(Box::new(pin.to_vec()));
            lib.login(s, user, Some(&pin))
        })
    })
}

/// `C_Logout`. `CKR_USER_NOT_LOGGED_IN` when nobody is logged in, as the specification
/// says, even over a backend (SoftHSM2) that returns `CKR_OK` then.
pub extern "C" fn C_Logout(h: CK_SESSION_HANDLE) -> CK_RV {
    guard("C_Logout", || with_session(h, |lib, s| lib.logout(s)))
}

/// `C_SessionCancel` (v3.0): ends the operations named in `flags`.
pub extern "C" fn C_SessionCancel(h: CK_SESSION_HANDLE, flags: CK_FLAGS) -> CK_RV {
    guard("C_SessionCancel", || {
        with_session(h, |_, s| {
            for (flag, kind) in [
                (CKF_ENCRYPT, Kind::Encrypt),
                (CKF_DECRYPT, Kind::Decrypt),
                (CKF_DIGEST, Kind::Digest),
                (CKF_SIGN, Kind::Sign),
                (CKF_VERIFY, Kind::Verify),
            ] {
                if flags & flag != 0 {
                    s.cancel(kind);
                }
            }
            if flags & CKF_FIND_OBJECTS != 0 {
                let _ = s.find_final();
            }
            Ok(())
        })
    })
}
