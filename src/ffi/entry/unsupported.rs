//! Functions cmkp11 does not offer: each returns `CKR_FUNCTION_NOT_SUPPORTED`.
//!
//! Operation state save/restore, recover signatures, dual-function operations, usernames
//! and the v3.0 message-based API are not reachable through cryptoki's backend API.

#![allow(non_snake_case)]

use cryptoki_sys::*;

/// Not supported: returns `CKR_FUNCTION_NOT_SUPPORTED`.
pub extern "C" fn C_GetOperationState(
    _arg1: CK_SESSION_HANDLE,
    _arg2: *mut CK_BYTE,
    _arg3: *mut CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// Not supported: returns `CKR_FUNCTION_NOT_SUPPORTED`.
pub extern "C" fn C_SetOperationState(
    _arg1: CK_SESSION_HANDLE,
    _arg2: *mut CK_BYTE,
    _arg3: CK_ULONG,
    _arg4: CK_OBJECT_HANDLE,
    _arg5: CK_OBJECT_HANDLE,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// Not supported: returns `CKR_FUNCTION_NOT_SUPPORTED`.
pub extern "C" fn C_SignRecoverInit(
    _arg1: CK_SESSION_HANDLE,
    _arg2: *mut CK_MECHANISM,
    _arg3: CK_OBJECT_HANDLE,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// Not supported: returns `CKR_FUNCTION_NOT_SUPPORTED`.
pub extern "C" fn C_SignRecover(
    _arg1: CK_SESSION_HANDLE,
    _arg2: *mut CK_BYTE,
    _arg3: CK_ULONG,
    _arg4: *mut CK_BYTE,
    _arg5: *mut CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// Not supported: returns `CKR_FUNCTION_NOT_SUPPORTED`.
pub extern "C" fn C_VerifyRecoverInit(
    _arg1: CK_SESSION_HANDLE,
    _arg2: *mut CK_MECHANISM,
    _arg3: CK_OBJECT_HANDLE,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// Not supported: returns `CKR_FUNCTION_NOT_SUPPORTED`.
pub extern "C" fn C_VerifyRecover(
    _arg1: CK_SESSION_HANDLE,
    _arg2: *mut CK_BYTE,
    _arg3: CK_ULONG,
    _arg4: *mut CK_BYTE,
    _arg5: *mut CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// Not supported: returns `CKR_FUNCTION_NOT_SUPPORTED`.
pub extern "C" fn C_DigestEncryptUpdate(
    _arg1: CK_SESSION_HANDLE,
    _arg2: *mut CK_BYTE,
    _arg3: CK_ULONG,
    _arg4: *mut CK_BYTE,
    _arg5: *mut CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// Not supported: returns `CKR_FUNCTION_NOT_SUPPORTED`.
pub extern "C" fn C_DecryptDigestUpdate(
    _arg1: CK_SESSION_HANDLE,
    _arg2: *mut CK_BYTE,
    _arg3: CK_ULONG,
    _arg4: *mut CK_BYTE,
    _arg5: *mut CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// Not supported: returns `CKR_FUNCTION_NOT_SUPPORTED`.
pub extern "C" fn C_SignEncryptUpdate(
    _arg1: CK_SESSION_HANDLE,
    _arg2: *mut CK_BYTE,
    _arg3: CK_ULONG,
    _arg4: *mut CK_BYTE,
    _arg5: *mut CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// Not supported: returns `CKR_FUNCTION_NOT_SUPPORTED`.
pub extern "C" fn C_DecryptVerifyUpdate(
    _arg1: CK_SESSION_HANDLE,
    _arg2: *mut CK_BYTE,
    _arg3: CK_ULONG,
    _arg4: *mut CK_BYTE,
    _arg5: *mut CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// Not supported: returns `CKR_FUNCTION_NOT_SUPPORTED`.
pub extern "C" fn C_LoginUser(
    _arg1: CK_SESSION_HANDLE,
    _arg2: CK_USER_TYPE,
    _arg3: *mut CK_UTF8CHAR,
    _arg4: CK_ULONG,
    _arg5: *mut CK_UTF8CHAR,
    _arg6: CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// Not supported: returns `CKR_FUNCTION_NOT_SUPPORTED`.
pub extern "C" fn C_MessageEncryptInit(
    _arg1: CK_SESSION_HANDLE,
    _arg2: *mut CK_MECHANISM,
    _arg3: CK_OBJECT_HANDLE,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// Not supported: returns `CKR_FUNCTION_NOT_SUPPORTED`.
pub extern "C" fn C_EncryptMessage(
    _arg1: CK_SESSION_HANDLE,
    _arg2: *mut std::os::raw::c_void,
    _arg3: CK_ULONG,
    _arg4: *mut CK_BYTE,
    _arg5: CK_ULONG,
    _arg6: *mut CK_BYTE,
    _arg7: CK_ULONG,
    _arg8: *mut CK_BYTE,
    _arg9: *mut CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// Not supported: returns `CKR_FUNCTION_NOT_SUPPORTED`.
pub extern "C" fn C_EncryptMessageBegin(
    _arg1: CK_SESSION_HANDLE,
    _arg2: *mut std::os::raw::c_void,
    _arg3: CK_ULONG,
    _arg4: *mut CK_BYTE,
    _arg5: CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// Not supported: returns `CKR_FUNCTION_NOT_SUPPORTED`.
pub extern "C" fn C_EncryptMessageNext(
    _arg1: CK_SESSION_HANDLE,
    _arg2: *mut std::os::raw::c_void,
    _arg3: CK_ULONG,
    _arg4: *mut CK_BYTE,
    _arg5: CK_ULONG,
    _arg6: *mut CK_BYTE,
    _arg7: *mut CK_ULONG,
    _arg8: CK_FLAGS,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// Not supported: returns `CKR_FUNCTION_NOT_SUPPORTED`.
pub extern "C" fn C_MessageEncryptFinal(_arg1: CK_SESSION_HANDLE) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// Not supported: returns `CKR_FUNCTION_NOT_SUPPORTED`.
pub extern "C" fn C_MessageDecryptInit(
    _arg1: CK_SESSION_HANDLE,
    _arg2: *mut CK_MECHANISM,
    _arg3: CK_OBJECT_HANDLE,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// Not supported: returns `CKR_FUNCTION_NOT_SUPPORTED`.
pub extern "C" fn C_DecryptMessage(
    _arg1: CK_SESSION_HANDLE,
    _arg2: *mut std::os::raw::c_void,
    _arg3: CK_ULONG,
    _arg4: *mut CK_BYTE,
    _arg5: CK_ULONG,
    _arg6: *mut CK_BYTE,
    _arg7: CK_ULONG,
    _arg8: *mut CK_BYTE,
    _arg9: *mut CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// Not supported: returns `CKR_FUNCTION_NOT_SUPPORTED`.
pub extern "C" fn C_DecryptMessageBegin(
    _arg1: CK_SESSION_HANDLE,
    _arg2: *mut std::os::raw::c_void,
    _arg3: CK_ULONG,
    _arg4: *mut CK_BYTE,
    _arg5: CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// Not supported: returns `CKR_FUNCTION_NOT_SUPPORTED`.
pub extern "C" fn C_DecryptMessageNext(
    _arg1: CK_SESSION_HANDLE,
    _arg2: *mut std::os::raw::c_void,
    _arg3: CK_ULONG,
    _arg4: *mut CK_BYTE,
    _arg5: CK_ULONG,
    _arg6: *mut CK_BYTE,
    _arg7: *mut CK_ULONG,
    _arg8: CK_FLAGS,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// Not supported: returns `CKR_FUNCTION_NOT_SUPPORTED`.
pub extern "C" fn C_MessageDecryptFinal(_arg1: CK_SESSION_HANDLE) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// Not supported: returns `CKR_FUNCTION_NOT_SUPPORTED`.
pub extern "C" fn C_MessageSignInit(
    _arg1: CK_SESSION_HANDLE,
    _arg2: *mut CK_MECHANISM,
    _arg3: CK_OBJECT_HANDLE,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// Not supported: returns `CKR_FUNCTION_NOT_SUPPORTED`.
pub extern "C" fn C_SignMessage(
    _arg1: CK_SESSION_HANDLE,
    _arg2: *mut std::os::raw::c_void,
    _arg3: CK_ULONG,
    _arg4: *mut CK_BYTE,
    _arg5: CK_ULONG,
    _arg6: *mut CK_BYTE,
    _arg7: *mut CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// Not supported: returns `CKR_FUNCTION_NOT_SUPPORTED`.
pub extern "C" fn C_SignMessageBegin(
    _arg1: CK_SESSION_HANDLE,
    _arg2: *mut std::os::raw::c_void,
    _arg3: CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// Not supported: returns `CKR_FUNCTION_NOT_SUPPORTED`.
pub extern "C" fn C_SignMessageNext(
    _arg1: CK_SESSION_HANDLE,
    _arg2: *mut std::os::raw::c_void,
    _arg3: CK_ULONG,
    _arg4: *mut CK_BYTE,
    _arg5: CK_ULONG,
    _arg6: *mut CK_BYTE,
    _arg7: *mut CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// Not supported: returns `CKR_FUNCTION_NOT_SUPPORTED`.
pub extern "C" fn C_MessageSignFinal(_arg1: CK_SESSION_HANDLE) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// Not supported: returns `CKR_FUNCTION_NOT_SUPPORTED`.
pub extern "C" fn C_MessageVerifyInit(
    _arg1: CK_SESSION_HANDLE,
    _arg2: *mut CK_MECHANISM,
    _arg3: CK_OBJECT_HANDLE,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// Not supported: returns `CKR_FUNCTION_NOT_SUPPORTED`.
pub extern "C" fn C_VerifyMessage(
    _arg1: CK_SESSION_HANDLE,
    _arg2: *mut std::os::raw::c_void,
    _arg3: CK_ULONG,
    _arg4: *mut CK_BYTE,
    _arg5: CK_ULONG,
    _arg6: *mut CK_BYTE,
    _arg7: CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// Not supported: returns `CKR_FUNCTION_NOT_SUPPORTED`.
pub extern "C" fn C_VerifyMessageBegin(
    _arg1: CK_SESSION_HANDLE,
    _arg2: *mut std::os::raw::c_void,
    _arg3: CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// Not supported: returns `CKR_FUNCTION_NOT_SUPPORTED`.
pub extern "C" fn C_VerifyMessageNext(
    _arg1: CK_SESSION_HANDLE,
    _arg2: *mut std::os::raw::c_void,
    _arg3: CK_ULONG,
    _arg4: *mut CK_BYTE,
    _arg5: CK_ULONG,
    _arg6: *mut CK_BYTE,
    _arg7: CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// Not supported: returns `CKR_FUNCTION_NOT_SUPPORTED`.
pub extern "C" fn C_MessageVerifyFinal(_arg1: CK_SESSION_HANDLE) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}
