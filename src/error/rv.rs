//! `CK_RV` names and the map from cryptoki's errors back to `CK_RV`.

use cryptoki::error::{Error as CkError, Rv, RvError};
use cryptoki_sys::*;

/// Every standard return code, with its name (for logs and the audit log).
pub const ALL: &[(CK_RV, &str)] = &[
    (CKR_OK, "CKR_OK"),
    (CKR_CANCEL, "CKR_CANCEL"),
    (CKR_HOST_MEMORY, "CKR_HOST_MEMORY"),
    (CKR_SLOT_ID_INVALID, "CKR_SLOT_ID_INVALID"),
    (CKR_GENERAL_ERROR, "CKR_GENERAL_ERROR"),
    (CKR_FUNCTION_FAILED, "CKR_FUNCTION_FAILED"),
    (CKR_ARGUMENTS_BAD, "CKR_ARGUMENTS_BAD"),
    (CKR_NO_EVENT, "CKR_NO_EVENT"),
    (CKR_NEED_TO_CREATE_THREADS, "CKR_NEED_TO_CREATE_THREADS"),
    (CKR_CANT_LOCK, "CKR_CANT_LOCK"),
    (CKR_ATTRIBUTE_READ_ONLY, "CKR_ATTRIBUTE_READ_ONLY"),
    (CKR_ATTRIBUTE_SENSITIVE, "CKR_ATTRIBUTE_SENSITIVE"),
    (CKR_ATTRIBUTE_TYPE_INVALID, "CKR_ATTRIBUTE_TYPE_INVALID"),
    (CKR_ATTRIBUTE_VALUE_INVALID, "CKR_ATTRIBUTE_VALUE_INVALID"),
    (CKR_ACTION_PROHIBITED, "CKR_ACTION_PROHIBITED"),
    (CKR_DATA_INVALID, "CKR_DATA_INVALID"),
    (CKR_DATA_LEN_RANGE, "CKR_DATA_LEN_RANGE"),
    (CKR_DEVICE_ERROR, "CKR_DEVICE_ERROR"),
    (CKR_DEVICE_MEMORY, "CKR_DEVICE_MEMORY"),
    (CKR_DEVICE_REMOVED, "CKR_DEVICE_REMOVED"),
    (CKR_ENCRYPTED_DATA_INVALID, "CKR_ENCRYPTED_DATA_INVALID"),
    (CKR_ENCRYPTED_DATA_LEN_RANGE, "CKR_ENCRYPTED_DATA_LEN_RANGE"),
    (CKR_AEAD_DECRYPT_FAILED, "CKR_AEAD_DECRYPT_FAILED"),
    (CKR_FUNCTION_CANCELED, "CKR_FUNCTION_CANCELED"),
    (CKR_FUNCTION_NOT_PARALLEL, "CKR_FUNCTION_NOT_PARALLEL"),
    (CKR_FUNCTION_NOT_SUPPORTED, "CKR_FUNCTION_NOT_SUPPORTED"),
    (CKR_KEY_HANDLE_INVALID, "CKR_KEY_HANDLE_INVALID"),
    (CKR_KEY_SIZE_RANGE, "CKR_KEY_SIZE_RANGE"),
    (CKR_KEY_TYPE_INCONSISTENT, "CKR_KEY_TYPE_INCONSISTENT"),
    (CKR_KEY_NOT_NEEDED, "CKR_KEY_NOT_NEEDED"),
    (CKR_KEY_CHANGED, "CKR_KEY_CHANGED"),
    (CKR_KEY_NEEDED, "CKR_KEY_NEEDED"),
    (CKR_KEY_INDIGESTIBLE, "CKR_KEY_INDIGESTIBLE"),
    (
        CKR_KEY_FUNCTION_NOT_PERMITTED,
        "CKR_KEY_FUNCTION_NOT_PERMITTED",
    ),
    (CKR_KEY_NOT_WRAPPABLE, "CKR_KEY_NOT_WRAPPABLE"),
    (CKR_KEY_UNEXTRACTABLE, "CKR_KEY_UNEXTRACTABLE"),
    (CKR_MECHANISM_INVALID, "CKR_MECHANISM_INVALID"),
    (CKR_MECHANISM_PARAM_INVALID, "CKR_MECHANISM_PARAM_INVALID"),
    (CKR_OBJECT_HANDLE_INVALID, "CKR_OBJECT_HANDLE_INVALID"),
    (CKR_OPERATION_ACTIVE, "CKR_OPERATION_ACTIVE"),
    (
        CKR_OPERATION_NOT_INITIALIZED,
        "CKR_OPERATION_NOT_INITIALIZED",
    ),
    (CKR_PIN_INCORRECT, "CKR_PIN_INCORRECT"),
    (CKR_PIN_INVALID, "CKR_PIN_INVALID"),
    (CKR_PIN_LEN_RANGE, "CKR_PIN_LEN_RANGE"),
    (CKR_PIN_EXPIRED, "CKR_PIN_EXPIRED"),
    (CKR_PIN_LOCKED, "CKR_PIN_LOCKED"),
    (CKR_SESSION_CLOSED, "CKR_SESSION_CLOSED"),
    (CKR_SESSION_COUNT, "CKR_SESSION_COUNT"),
    (CKR_SESSION_HANDLE_INVALID, "CKR_SESSION_HANDLE_INVALID"),
    (
        CKR_SESSION_PARALLEL_NOT_SUPPORTED,
        "CKR_SESSION_PARALLEL_NOT_SUPPORTED",
    ),
    (CKR_SESSION_READ_ONLY, "CKR_SESSION_READ_ONLY"),
    (CKR_SESSION_EXISTS, "CKR_SESSION_EXISTS"),
    (CKR_SESSION_READ_ONLY_EXISTS, "CKR_SESSION_READ_ONLY_EXISTS"),
    (
        CKR_SESSION_READ_WRITE_SO_EXISTS,
        "CKR_SESSION_READ_WRITE_SO_EXISTS",
    ),
    (CKR_SIGNATURE_INVALID, "CKR_SIGNATURE_INVALID"),
    (CKR_SIGNATURE_LEN_RANGE, "CKR_SIGNATURE_LEN_RANGE"),
    (CKR_TEMPLATE_INCOMPLETE, "CKR_TEMPLATE_INCOMPLETE"),
    (CKR_TEMPLATE_INCONSISTENT, "CKR_TEMPLATE_INCONSISTENT"),
    (CKR_TOKEN_NOT_PRESENT, "CKR_TOKEN_NOT_PRESENT"),
    (CKR_TOKEN_NOT_RECOGNIZED, "CKR_TOKEN_NOT_RECOGNIZED"),
    (CKR_TOKEN_WRITE_PROTECTED, "CKR_TOKEN_WRITE_PROTECTED"),
    (
        CKR_UNWRAPPING_KEY_HANDLE_INVALID,
        "CKR_UNWRAPPING_KEY_HANDLE_INVALID",
    ),
    (
        CKR_UNWRAPPING_KEY_SIZE_RANGE,
        "CKR_UNWRAPPING_KEY_SIZE_RANGE",
    ),
    (
        CKR_UNWRAPPING_KEY_TYPE_INCONSISTENT,
        "CKR_UNWRAPPING_KEY_TYPE_INCONSISTENT",
    ),
    (CKR_USER_ALREADY_LOGGED_IN, "CKR_USER_ALREADY_LOGGED_IN"),
    (CKR_USER_NOT_LOGGED_IN, "CKR_USER_NOT_LOGGED_IN"),
    (CKR_USER_PIN_NOT_INITIALIZED, "CKR_USER_PIN_NOT_INITIALIZED"),
    (CKR_USER_TYPE_INVALID, "CKR_USER_TYPE_INVALID"),
    (
        CKR_USER_ANOTHER_ALREADY_LOGGED_IN,
        "CKR_USER_ANOTHER_ALREADY_LOGGED_IN",
    ),
    (CKR_USER_TOO_MANY_TYPES, "CKR_USER_TOO_MANY_TYPES"),
    (CKR_WRAPPED_KEY_INVALID, "CKR_WRAPPED_KEY_INVALID"),
    (CKR_WRAPPED_KEY_LEN_RANGE, "CKR_WRAPPED_KEY_LEN_RANGE"),
    (
        CKR_WRAPPING_KEY_HANDLE_INVALID,
        "CKR_WRAPPING_KEY_HANDLE_INVALID",
    ),
    (CKR_WRAPPING_KEY_SIZE_RANGE, "CKR_WRAPPING_KEY_SIZE_RANGE"),
    (
        CKR_WRAPPING_KEY_TYPE_INCONSISTENT,
        "CKR_WRAPPING_KEY_TYPE_INCONSISTENT",
    ),
    (
        CKR_RANDOM_SEED_NOT_SUPPORTED,
        "CKR_RANDOM_SEED_NOT_SUPPORTED",
    ),
    (CKR_RANDOM_NO_RNG, "CKR_RANDOM_NO_RNG"),
    (CKR_DOMAIN_PARAMS_INVALID, "CKR_DOMAIN_PARAMS_INVALID"),
    (CKR_CURVE_NOT_SUPPORTED, "CKR_CURVE_NOT_SUPPORTED"),
    (CKR_BUFFER_TOO_SMALL, "CKR_BUFFER_TOO_SMALL"),
    (CKR_SAVED_STATE_INVALID, "CKR_SAVED_STATE_INVALID"),
    (CKR_INFORMATION_SENSITIVE, "CKR_INFORMATION_SENSITIVE"),
    (CKR_STATE_UNSAVEABLE, "CKR_STATE_UNSAVEABLE"),
    (CKR_CRYPTOKI_NOT_INITIALIZED, "CKR_CRYPTOKI_NOT_INITIALIZED"),
    (
        CKR_CRYPTOKI_ALREADY_INITIALIZED,
        "CKR_CRYPTOKI_ALREADY_INITIALIZED",
    ),
    (CKR_MUTEX_BAD, "CKR_MUTEX_BAD"),
    (CKR_MUTEX_NOT_LOCKED, "CKR_MUTEX_NOT_LOCKED"),
    (CKR_NEW_PIN_MODE, "CKR_NEW_PIN_MODE"),
    (CKR_NEXT_OTP, "CKR_NEXT_OTP"),
    (CKR_EXCEEDED_MAX_ITERATIONS, "CKR_EXCEEDED_MAX_ITERATIONS"),
    (CKR_FIPS_SELF_TEST_FAILED, "CKR_FIPS_SELF_TEST_FAILED"),
    (CKR_LIBRARY_LOAD_FAILED, "CKR_LIBRARY_LOAD_FAILED"),
    (CKR_PIN_TOO_WEAK, "CKR_PIN_TOO_WEAK"),
    (CKR_PUBLIC_KEY_INVALID, "CKR_PUBLIC_KEY_INVALID"),
    (CKR_FUNCTION_REJECTED, "CKR_FUNCTION_REJECTED"),
    (CKR_TOKEN_RESOURCE_EXCEEDED, "CKR_TOKEN_RESOURCE_EXCEEDED"),
    (CKR_OPERATION_CANCEL_FAILED, "CKR_OPERATION_CANCEL_FAILED"),
    (CKR_KEY_EXHAUSTED, "CKR_KEY_EXHAUSTED"),
    (CKR_PENDING, "CKR_PENDING"),
    (
        CKR_SESSION_ASYNC_NOT_SUPPORTED,
        "CKR_SESSION_ASYNC_NOT_SUPPORTED",
    ),
    (CKR_SEED_RANDOM_REQUIRED, "CKR_SEED_RANDOM_REQUIRED"),
    (CKR_OPERATION_NOT_VALIDATED, "CKR_OPERATION_NOT_VALIDATED"),
    (CKR_TOKEN_NOT_INITIALIZED, "CKR_TOKEN_NOT_INITIALIZED"),
    (
        CKR_PARAMETER_SET_NOT_SUPPORTED,
        "CKR_PARAMETER_SET_NOT_SUPPORTED",
    ),
];

/// The `CKR_*` name of a return code (`CKR_VENDOR_DEFINED+0x..` for vendor codes).
pub fn name(rv: CK_RV) -> &'static str {
    ALL.iter()
        .find(|(c, _)| *c == rv)
        .map(|(_, n)| *n)
        .unwrap_or(if rv >= CKR_VENDOR_DEFINED {
            "CKR_VENDOR_DEFINED"
        } else {
            "CKR_UNKNOWN"
        })
}

/// The `CK_RV` of a cryptoki `RvError` (cryptoki maps codes one way only).
pub fn from_rv_error(e: RvError) -> CK_RV {
    match e {
        RvError::VendorDefined(c) | RvError::UnknownErrorCode(c) => c,
        e => ALL
            .iter()
            .find(|(c, _)| matches!(Rv::from(*c), Rv::Error(x) if x == e))
            .map(|(c, _)| *c)
            .unwrap_or(CKR_GENERAL_ERROR),
    }
}

/// The `CK_RV` an application sees for a code the backend returned to a direct call: the
/// same as through cryptoki ([`from_cryptoki`]).
pub fn from_backend(rv: CK_RV) -> CK_RV {
    match Rv::from(rv) {
        Rv::Ok => CKR_OK,
        Rv::Error(e) => from_rv_error(e),
    }
}

/// The `CK_RV` an application sees for an error from the cryptoki layer.
pub fn from_cryptoki(e: &CkError) -> CK_RV {
    match e {
        CkError::Pkcs11(rv, _) => from_rv_error(*rv),
        CkError::NullFunctionPointer | CkError::NotSupported => CKR_FUNCTION_NOT_SUPPORTED,
        CkError::LibraryLoading(_) | CkError::MissingSymbol(_) => CKR_GENERAL_ERROR,
        CkError::InvalidValue
        | CkError::TryFromInt(_)
        | CkError::TryFromSlice(_)
        | CkError::ParseInt(_)
        | CkError::Utf8(_)
        | CkError::NulError(_) => CKR_ATTRIBUTE_VALUE_INVALID,
        _ => CKR_GENERAL_ERROR,
    }
}

/// Codes about the call itself (arguments, handles, state, templates, permissions): they
/// reveal nothing about the content of ciphertext or a wrapped key, so they pass
/// through unchanged where content failures are made uniform. The unwrapping key's type
/// and size are checked by cmkp11 before the backend is called, so the backend's
/// `CKR_UNWRAPPING_KEY_*` answers can only come from the blob (SoftHSM2 answers
/// `CKR_UNWRAPPING_KEY_TYPE_INCONSISTENT` for some bad RSA-OAEP blobs) and are made
/// uniform too.
fn is_call_error(rv: CK_RV) -> bool {
    matches!(
        rv,
        CKR_ARGUMENTS_BAD
            | CKR_HOST_MEMORY
            | CKR_DEVICE_MEMORY
            | CKR_DEVICE_REMOVED
            | CKR_CRYPTOKI_NOT_INITIALIZED
            | CKR_SESSION_HANDLE_INVALID
            | CKR_SESSION_CLOSED
            | CKR_SESSION_READ_ONLY
            | CKR_USER_NOT_LOGGED_IN
            | CKR_OPERATION_ACTIVE
            | CKR_OPERATION_NOT_INITIALIZED
            | CKR_KEY_HANDLE_INVALID
            | CKR_KEY_TYPE_INCONSISTENT
            | CKR_KEY_FUNCTION_NOT_PERMITTED
            | CKR_KEY_SIZE_RANGE
            | CKR_MECHANISM_INVALID
            | CKR_MECHANISM_PARAM_INVALID
            | CKR_UNWRAPPING_KEY_HANDLE_INVALID
            | CKR_ATTRIBUTE_READ_ONLY
            | CKR_ATTRIBUTE_TYPE_INVALID
            | CKR_ATTRIBUTE_VALUE_INVALID
            | CKR_TEMPLATE_INCOMPLETE
            | CKR_TEMPLATE_INCONSISTENT
            | CKR_BUFFER_TOO_SMALL
            | CKR_TOKEN_WRITE_PROTECTED
    )
}

/// The code for a failed `C_UnwrapKey`: every failure that depends on the blob's content
/// is `CKR_WRAPPED_KEY_INVALID`, so that the answer is no padding oracle (SoftHSM2
/// answers `CKR_GENERAL_ERROR` for a bad AES key-wrap blob).
pub fn unwrap_failure(rv: CK_RV) -> CK_RV {
    if is_call_error(rv) {
        rv
    } else {
        CKR_WRAPPED_KEY_INVALID
    }
}

/// The code for a failed authenticated decryption (AES-GCM): a wrong tag, ciphertext or
/// AAD is `CKR_ENCRYPTED_DATA_INVALID` (SoftHSM2 answers `CKR_GENERAL_ERROR`).
pub fn aead_failure(rv: CK_RV) -> CK_RV {
    if is_call_error(rv) || rv == CKR_ENCRYPTED_DATA_LEN_RANGE {
        rv
    } else {
        CKR_ENCRYPTED_DATA_INVALID
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips_through_cryptoki() {
        for (c, n) in ALL {
            if *c == CKR_OK {
                continue;
            }
            let back = match Rv::from(*c) {
                Rv::Error(e) => from_rv_error(e),
                Rv::Ok => CKR_OK,
            };
            assert_eq!(back, *c, "{n}");
        }
    }

    #[test]
    fn names() {
        assert_eq!(name(CKR_BUFFER_TOO_SMALL), "CKR_BUFFER_TOO_SMALL");
        assert_eq!(name(CKR_VENDOR_DEFINED + 7), "CKR_VENDOR_DEFINED");
    }
}
