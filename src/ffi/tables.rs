//! The function tables, generated from one list of names: the v2.40 table is the v3.0
//! table's prefix, so a function is listed exactly once.

use super::entry::*;
use cryptoki_sys::*;

/// The v2.40 and v3.0 function tables `$l2`/`$l3` made of the functions of those names in
/// scope where it is invoked (the library's here, client mode's in [`super::client`]).
macro_rules! function_tables {
    ($l2:ident, $l3:ident, $what:literal, [$($base:ident),* $(,)?], [$($v3:ident),* $(,)?]) => {
        #[doc = concat!("The v2.40 function list", $what, ".")]
        pub static $l2: CK_FUNCTION_LIST = CK_FUNCTION_LIST {
            version: CK_VERSION { major: 2, minor: 40 },
            $($base: Some($base),)*
        };
        #[doc = concat!("The v3.0 function list", $what, ".")]
        pub static $l3: CK_FUNCTION_LIST_3_0 = CK_FUNCTION_LIST_3_0 {
            version: CK_VERSION { major: 3, minor: 0 },
            $($base: Some($base),)*
            $($v3: Some($v3),)*
        };
    };
}

/// `with_function_names!(m!(args,))` expands to `m!(args, [v2.40 functions], [v3.0
/// functions])`: the one list of PKCS#11 functions, in the order of the spec's tables,
/// from which every function table is made.
macro_rules! with_function_names {
    ($m:ident!($($args:tt)*)) => {
        $m!($($args)*
            [
                C_Initialize,
                C_Finalize,
                C_GetInfo,
                C_GetFunctionList,
                C_GetSlotList,
                C_GetSlotInfo,
                C_GetTokenInfo,
                C_GetMechanismList,
                C_GetMechanismInfo,
                C_InitToken,
                C_InitPIN,
                C_SetPIN,
                C_OpenSession,
                C_CloseSession,
                C_CloseAllSessions,
                C_GetSessionInfo,
                C_GetOperationState,
                C_SetOperationState,
                C_Login,
                C_Logout,
                C_CreateObject,
                C_CopyObject,
                C_DestroyObject,
                C_GetObjectSize,
                C_GetAttributeValue,
                C_SetAttributeValue,
                C_FindObjectsInit,
                C_FindObjects,
                C_FindObjectsFinal,
                C_EncryptInit,
                C_Encrypt,
                C_EncryptUpdate,
                C_EncryptFinal,
                C_DecryptInit,
                C_Decrypt,
                C_DecryptUpdate,
                C_DecryptFinal,
                C_DigestInit,
                C_Digest,
                C_DigestUpdate,
                C_DigestKey,
                C_DigestFinal,
                C_SignInit,
                C_Sign,
                C_SignUpdate,
                C_SignFinal,
                C_SignRecoverInit,
                C_SignRecover,
                C_VerifyInit,
                C_Verify,
                C_VerifyUpdate,
                C_VerifyFinal,
                C_VerifyRecoverInit,
                C_VerifyRecover,
                C_DigestEncryptUpdate,
                C_DecryptDigestUpdate,
                C_SignEncryptUpdate,
                C_DecryptVerifyUpdate,
                C_GenerateKey,
                C_GenerateKeyPair,
                C_WrapKey,
                C_UnwrapKey,
                C_DeriveKey,
                C_SeedRandom,
                C_GenerateRandom,
                C_GetFunctionStatus,
                C_CancelFunction,
                C_WaitForSlotEvent,
            ],
            [
                C_GetInterfaceList,
                C_GetInterface,
                C_LoginUser,
                C_SessionCancel,
                C_MessageEncryptInit,
                C_EncryptMessage,
                C_EncryptMessageBegin,
                C_EncryptMessageNext,
                C_MessageEncryptFinal,
                C_MessageDecryptInit,
                C_DecryptMessage,
                C_DecryptMessageBegin,
                C_DecryptMessageNext,
                C_MessageDecryptFinal,
                C_MessageSignInit,
                C_SignMessage,
                C_SignMessageBegin,
                C_SignMessageNext,
                C_MessageSignFinal,
                C_MessageVerifyInit,
                C_VerifyMessage,
                C_VerifyMessageBegin,
                C_VerifyMessageNext,
                C_MessageVerifyFinal,
            ]
        );
    };
}

pub(crate) use {function_tables, with_function_names};

use super::exports::{C_GetFunctionList, C_GetInterface, C_GetInterfaceList};

with_function_names!(function_tables!(
    FUNCTION_LIST_2_40,
    FUNCTION_LIST_3_0,
    " (`C_GetFunctionList`, interface \"PKCS 11\" 2.40; 3.0 for the v3.0 list)",
));
