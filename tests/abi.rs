//! ABI tests: the exported C functions called directly, asserting exact `CK_RV` codes.
//!
//! Every test here changes process-global state (`C_Initialize`/`C_Finalize`), so all of
//! them are `#[serial]` and each one finalizes before it returns (also when it fails,
//! through the [`Init`] guard).

#[macro_use]
mod common;

use std::ffi::{c_void, CStr};
use std::mem::size_of;
use std::ptr;

use common::{
    gcm_params, mech, mech_with, padded, raw, raw_aes_key as aes_key, raw_login as login,
    raw_open_session as open_session, raw_token_slot as token_slot, testing_cmkp11, Template,
    TOKEN_LABEL, USER_PIN,
};
use cryptoki_sys::*;
use serial_test::serial;

fn f() -> &'static CK_FUNCTION_LIST {
    raw().f
}

/// Brings the module back to "not initialized" whatever an earlier (failed) test left,
/// so that one failure does not cascade into every later test.
fn reset() {
    let rv = ck!(f(), C_Finalize, ptr::null_mut());
    assert!(
        rv == CKR_OK || rv == CKR_CRYPTOKI_NOT_INITIALIZED,
        "C_Finalize(NULL) while resetting: {}",
        common::rv_name(rv)
    );
}

/// Calls [`reset`] when dropped (also when the test fails).
struct ResetOnDrop;

impl Drop for ResetOnDrop {
    fn drop(&mut self) {
        let _ = ck!(f(), C_Finalize, ptr::null_mut());
    }
}

/// `C_Initialize(NULL)` now, `C_Finalize(NULL)` on drop.
struct Init;

impl Init {
    fn new() -> Self {
        reset();
        assert_rv!(
            ck!(f(), C_Initialize, ptr::null_mut()),
            CKR_OK,
            "C_Initialize(NULL)"
        );
        Init
    }
}

impl Drop for Init {
    fn drop(&mut self) {
        let rv = ck!(f(), C_Finalize, ptr::null_mut());
        if !std::thread::panicking() {
            assert_rv!(rv, CKR_OK, "C_Finalize(NULL)");
        }
    }
}

/// An initialized module, the token's slot and a logged-in RW session.
fn setup() -> (Init, CK_SLOT_ID, CK_SESSION_HANDLE) {
    let init = Init::new();
    let slot = token_slot();
    let s = open_session(slot);
    login(s);
    (init, slot, s)
}

/// Checks that every function pointer of a table (after its version) is non-null.
fn assert_table_complete(table: *const c_void, size: usize, what: &str) {
    assert!(!table.is_null(), "{what}: NULL table");
    let n = (size - 8) / size_of::<usize>();
    // SAFETY: the table is `size` bytes: a CK_VERSION padded to 8 then `n` pointers.
    let ptrs =
        unsafe { std::slice::from_raw_parts((table as *const u8).add(8) as *const usize, n) };
    let missing: Vec<usize> = (0..n).filter(|&i| ptrs[i] == 0).collect();
    assert!(
        missing.is_empty(),
        "{what}: NULL entries at indexes {missing:?}"
    );
}

fn table_version(table: *const c_void) -> (u8, u8) {
    // SAFETY: every function table starts with a CK_VERSION.
    let v = unsafe { *(table as *const CK_VERSION) };
    (v.major, v.minor)
}

/// The interfaces as (name, version of the table, table pointer, flags).
fn interface_list() -> Vec<(String, (u8, u8), *mut c_void, CK_FLAGS)> {
    let lib = &raw().lib;
    let mut n: CK_ULONG = 0;
    assert_rv!(
        unsafe { lib.C_GetInterfaceList(ptr::null_mut(), &mut n) },
        CKR_OK
    );
    let mut list = vec![
        CK_INTERFACE {
            pInterfaceName: ptr::null_mut(),
            pFunctionList: ptr::null_mut(),
            flags: 0
        };
        n as usize
    ];
    assert_rv!(
        unsafe { lib.C_GetInterfaceList(list.as_mut_ptr(), &mut n) },
        CKR_OK
    );
    assert_eq!(n as usize, list.len());
    list.iter()
        .map(|i| {
            assert!(!i.pInterfaceName.is_null());
            // SAFETY: interface names are NUL-terminated static strings.
            let name = unsafe { CStr::from_ptr(i.pInterfaceName as *const _) }
                .to_string_lossy()
                .into_owned();
            (
                name,
                table_version(i.pFunctionList),
                i.pFunctionList,
                i.flags,
            )
        })
        .collect()
}

/// The default ("PKCS 11" 3.0) function table.
fn table_3_0() -> &'static CK_FUNCTION_LIST_3_0 {
    let mut iface: *mut CK_INTERFACE = ptr::null_mut();
    assert_rv!(
        unsafe {
            raw()
                .lib
                .C_GetInterface(ptr::null_mut(), ptr::null_mut(), &mut iface, 0)
        },
        CKR_OK
    );
    // SAFETY: returned interface and table are static data of the module.
    let table = unsafe { (*iface).pFunctionList };
    assert_eq!(table_version(table), (3, 0));
    unsafe { &*(table as *const CK_FUNCTION_LIST_3_0) }
}

// ---------------------------------------------------------------------------------------
// Getters and function tables
// ---------------------------------------------------------------------------------------

#[test]
#[serial]
fn get_function_list_null_is_arguments_bad() {
    assert_rv!(
        unsafe { raw().lib.C_GetFunctionList(ptr::null_mut()) },
        CKR_ARGUMENTS_BAD
    );
}

#[test]
#[serial]
fn function_list_is_2_40_and_complete() {
    let table = f() as *const CK_FUNCTION_LIST as *const c_void;
    assert_eq!(table_version(table), (2, 40));
    assert_table_complete(
        table,
        size_of::<CK_FUNCTION_LIST>(),
        "C_GetFunctionList table",
    );
    // The table's own C_GetFunctionList returns the same table.
    let mut again: *mut CK_FUNCTION_LIST = ptr::null_mut();
    assert_rv!(ck!(f(), C_GetFunctionList, &mut again), CKR_OK);
    assert_eq!(again as *const c_void, table);
}

#[test]
#[serial]
fn interface_list_two_call_convention() {
    let lib = &raw().lib;
    assert_rv!(
        unsafe { lib.C_GetInterfaceList(ptr::null_mut(), ptr::null_mut()) },
        CKR_ARGUMENTS_BAD
    );
    let mut n: CK_ULONG = 0;
    assert_rv!(
        unsafe { lib.C_GetInterfaceList(ptr::null_mut(), &mut n) },
        CKR_OK
    );
    assert!(n >= 2, "at least PKCS 11 3.0 and 2.40, got {n}");
    let empty = CK_INTERFACE {
        pInterfaceName: ptr::null_mut(),
        pFunctionList: ptr::null_mut(),
        flags: 0,
    };
    let mut small = vec![empty; n as usize];
    let mut short = n - 1;
    assert_rv!(
        unsafe { lib.C_GetInterfaceList(small.as_mut_ptr(), &mut short) },
        CKR_BUFFER_TOO_SMALL
    );
    assert_eq!(short, n, "needed count after CKR_BUFFER_TOO_SMALL");

    let list = interface_list();
    assert_eq!(list.len(), n as usize);
    let pkcs11: Vec<(u8, u8)> = list
        .iter()
        .filter(|(name, ..)| name == "PKCS 11")
        .map(|(_, v, ..)| *v)
        .collect();
    assert!(pkcs11.contains(&(3, 0)), "PKCS 11 3.0 in {list:?}");
    assert!(pkcs11.contains(&(2, 40)), "PKCS 11 2.40 in {list:?}");
    for (name, version, table, _) in &list {
        match (name.as_str(), version) {
            ("PKCS 11", (3, 0)) => {
                assert_table_complete(*table, size_of::<CK_FUNCTION_LIST_3_0>(), "PKCS 11 3.0")
            }
            ("PKCS 11", (2, 40)) => {
                assert_table_complete(*table, size_of::<CK_FUNCTION_LIST>(), "PKCS 11 2.40")
            }
            ("cmkp11 admin", _) => {}
            other => panic!("unexpected interface {other:?}"),
        }
    }
}

#[test]
#[serial]
fn get_interface() {
    let lib = &raw().lib;
    let mut iface: *mut CK_INTERFACE = ptr::null_mut();

    // Default interface: PKCS 11 3.0.
    assert_rv!(
        unsafe { lib.C_GetInterface(ptr::null_mut(), ptr::null_mut(), &mut iface, 0) },
        CKR_OK
    );
    assert!(!iface.is_null());
    let i = unsafe { &*iface };
    assert_eq!(
        unsafe { CStr::from_ptr(i.pInterfaceName as *const _) }.to_bytes(),
        b"PKCS 11"
    );
    assert_eq!(table_version(i.pFunctionList), (3, 0));
    let table30 = unsafe { &*(i.pFunctionList as *const CK_FUNCTION_LIST_3_0) };
    assert_eq!((table30.version.major, table30.version.minor), (3, 0));

    // By name and version 2.40.
    let mut name = *b"PKCS 11\0";
    let mut v240 = CK_VERSION {
        major: 2,
        minor: 40,
    };
    iface = ptr::null_mut();
    assert_rv!(
        unsafe { lib.C_GetInterface(name.as_mut_ptr(), &mut v240, &mut iface, 0) },
        CKR_OK
    );
    assert!(!iface.is_null());
    assert_eq!(table_version(unsafe { (*iface).pFunctionList }), (2, 40));

    // By name and version 3.0.
    let mut v30 = CK_VERSION { major: 3, minor: 0 };
    iface = ptr::null_mut();
    assert_rv!(
        unsafe { lib.C_GetInterface(name.as_mut_ptr(), &mut v30, &mut iface, 0) },
        CKR_OK
    );
    assert_eq!(table_version(unsafe { (*iface).pFunctionList }), (3, 0));

    // By name only: some PKCS 11 version.
    iface = ptr::null_mut();
    assert_rv!(
        unsafe { lib.C_GetInterface(name.as_mut_ptr(), ptr::null_mut(), &mut iface, 0) },
        CKR_OK
    );
    let v = table_version(unsafe { (*iface).pFunctionList });
    assert!(v == (3, 0) || v == (2, 40), "version {v:?}");

    // Unknown name, unknown version, NULL out-pointer.
    let mut unknown = *b"no such interface\0";
    iface = ptr::null_mut();
    assert_rv!(
        unsafe { lib.C_GetInterface(unknown.as_mut_ptr(), ptr::null_mut(), &mut iface, 0) },
        CKR_ARGUMENTS_BAD
    );
    assert!(iface.is_null());
    let mut v99 = CK_VERSION { major: 9, minor: 9 };
    assert_rv!(
        unsafe { lib.C_GetInterface(name.as_mut_ptr(), &mut v99, &mut iface, 0) },
        CKR_ARGUMENTS_BAD
    );
    assert_rv!(
        unsafe { lib.C_GetInterface(ptr::null_mut(), ptr::null_mut(), ptr::null_mut(), 0) },
        CKR_ARGUMENTS_BAD
    );
}

// ---------------------------------------------------------------------------------------
// C_Initialize / C_Finalize
// ---------------------------------------------------------------------------------------

#[test]
#[serial]
fn calls_before_initialize_are_not_initialized() {
    reset();
    let mut info: CK_INFO = unsafe { std::mem::zeroed() };
    assert_rv!(ck!(f(), C_GetInfo, &mut info), CKR_CRYPTOKI_NOT_INITIALIZED);
    let mut n: CK_ULONG = 0;
    assert_rv!(
        ck!(f(), C_GetSlotList, CK_FALSE, ptr::null_mut(), &mut n),
        CKR_CRYPTOKI_NOT_INITIALIZED
    );
    let mut h: CK_SESSION_HANDLE = 0;
    assert_rv!(
        ck!(
            f(),
            C_OpenSession,
            0,
            CKF_SERIAL_SESSION,
            ptr::null_mut(),
            None,
            &mut h
        ),
        CKR_CRYPTOKI_NOT_INITIALIZED
    );
    assert_rv!(
        ck!(f(), C_CloseAllSessions, 0),
        CKR_CRYPTOKI_NOT_INITIALIZED
    );
    assert_rv!(
        ck!(f(), C_Finalize, ptr::null_mut()),
        CKR_CRYPTOKI_NOT_INITIALIZED
    );
}

unsafe extern "C" fn create_mutex(pp: *mut *mut c_void) -> CK_RV {
    if pp.is_null() {
        return CKR_ARGUMENTS_BAD;
    }
    *pp = Box::into_raw(Box::new(0u8)) as *mut c_void;
    CKR_OK
}

unsafe extern "C" fn destroy_mutex(p: *mut c_void) -> CK_RV {
    if p.is_null() {
        return CKR_MUTEX_BAD;
    }
    drop(Box::from_raw(p as *mut u8));
    CKR_OK
}

// The abi tests are single-threaded (#[serial]), so a lock that never blocks is enough.
unsafe extern "C" fn lock_mutex(p: *mut c_void) -> CK_RV {
    if p.is_null() {
        CKR_MUTEX_BAD
    } else {
        CKR_OK
    }
}

unsafe extern "C" fn unlock_mutex(p: *mut c_void) -> CK_RV {
    if p.is_null() {
        CKR_MUTEX_BAD
    } else {
        CKR_OK
    }
}

fn init_args(callbacks: bool, flags: CK_FLAGS) -> CK_C_INITIALIZE_ARGS {
    CK_C_INITIALIZE_ARGS {
        CreateMutex: callbacks.then_some(create_mutex as _),
        DestroyMutex: callbacks.then_some(destroy_mutex as _),
        LockMutex: callbacks.then_some(lock_mutex as _),
        UnlockMutex: callbacks.then_some(unlock_mutex as _),
        flags,
        pReserved: ptr::null_mut(),
    }
}

fn initialize_with(args: &mut CK_C_INITIALIZE_ARGS) -> CK_RV {
    ck!(
        f(),
        C_Initialize,
        args as *mut CK_C_INITIALIZE_ARGS as *mut c_void
    )
}

fn assert_not_initialized(context: &str) {
    let mut info: CK_INFO = unsafe { std::mem::zeroed() };
    assert_rv!(
        ck!(f(), C_GetInfo, &mut info),
        CKR_CRYPTOKI_NOT_INITIALIZED,
        "{context}"
    );
}

fn finalize_ok(context: &str) {
    assert_rv!(ck!(f(), C_Finalize, ptr::null_mut()), CKR_OK, "{context}");
}

#[test]
#[serial]
fn initialize_arguments() {
    reset();
    let _reset = ResetOnDrop;
    // pReserved must be NULL.
    let mut reserved = 0u64;
    let mut args = init_args(false, CKF_OS_LOCKING_OK);
    args.pReserved = &mut reserved as *mut u64 as *mut c_void;
    assert_rv!(initialize_with(&mut args), CKR_ARGUMENTS_BAD, "pReserved");
    assert_not_initialized("after pReserved != NULL");

    // Some but not all mutex callbacks.
    let mut args = init_args(true, CKF_OS_LOCKING_OK);
    args.UnlockMutex = None;
    assert_rv!(
        initialize_with(&mut args),
        CKR_ARGUMENTS_BAD,
        "3 of 4 callbacks"
    );
    assert_not_initialized("after partial callbacks");

    // Callbacks without CKF_OS_LOCKING_OK: cmkp11 cannot use application locks.
    let mut args = init_args(true, 0);
    assert_rv!(initialize_with(&mut args), CKR_CANT_LOCK, "callbacks only");
    assert_not_initialized("after CKR_CANT_LOCK");

    // CKF_OS_LOCKING_OK without callbacks.
    let mut args = init_args(false, CKF_OS_LOCKING_OK);
    assert_rv!(initialize_with(&mut args), CKR_OK, "OS_LOCKING_OK");
    finalize_ok("after OS_LOCKING_OK");

    // CKF_OS_LOCKING_OK with callbacks.
    let mut args = init_args(true, CKF_OS_LOCKING_OK);
    assert_rv!(
        initialize_with(&mut args),
        CKR_OK,
        "OS_LOCKING_OK + callbacks"
    );
    let mut info: CK_INFO = unsafe { std::mem::zeroed() };
    assert_rv!(ck!(f(), C_GetInfo, &mut info), CKR_OK);
    finalize_ok("after OS_LOCKING_OK + callbacks");

    // No flags and no callbacks: a single-threaded application.
    let mut args = init_args(false, 0);
    assert_rv!(initialize_with(&mut args), CKR_OK, "no flags");
    finalize_ok("after no flags");

    // NULL, then a second C_Initialize.
    assert_rv!(ck!(f(), C_Initialize, ptr::null_mut()), CKR_OK, "NULL");
    assert_rv!(
        ck!(f(), C_Initialize, ptr::null_mut()),
        CKR_CRYPTOKI_ALREADY_INITIALIZED
    );
    let mut args = init_args(false, CKF_OS_LOCKING_OK);
    assert_rv!(initialize_with(&mut args), CKR_CRYPTOKI_ALREADY_INITIALIZED);
    finalize_ok("after double initialize");
    assert_not_initialized("after C_Finalize");
}

#[test]
#[serial]
fn finalize_arguments() {
    let _init = Init::new();
    let mut junk = 0u64;
    assert_rv!(
        ck!(f(), C_Finalize, &mut junk as *mut u64 as *mut c_void),
        CKR_ARGUMENTS_BAD
    );
    // Still initialized.
    let mut info: CK_INFO = unsafe { std::mem::zeroed() };
    assert_rv!(ck!(f(), C_GetInfo, &mut info), CKR_OK);
}

#[test]
#[serial]
fn reinitialize_after_finalize_works() {
    for round in 0..3 {
        let _init = Init::new();
        let slot = token_slot();
        let s = open_session(slot);
        let mut info: CK_SESSION_INFO = unsafe { std::mem::zeroed() };
        assert_rv!(
            ck!(f(), C_GetSessionInfo, s, &mut info),
            CKR_OK,
            "round {round}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// General purpose, slots and tokens
// ---------------------------------------------------------------------------------------

#[test]
#[serial]
fn get_info() {
    let _init = Init::new();
    assert_rv!(ck!(f(), C_GetInfo, ptr::null_mut()), CKR_ARGUMENTS_BAD);
    let mut info: CK_INFO = unsafe { std::mem::zeroed() };
    assert_rv!(ck!(f(), C_GetInfo, &mut info), CKR_OK);
    let v = (info.cryptokiVersion.major, info.cryptokiVersion.minor);
    assert!(v == (3, 0) || v == (2, 40), "cryptokiVersion {v:?}");
    assert_eq!(padded(&info.manufacturerID), "cmkp11");
    // Text fields are blank padded, not NUL terminated.
    assert!(!info.manufacturerID.contains(&0));
    assert!(!info.libraryDescription.contains(&0));
    assert_eq!(info.flags, 0);
}

#[test]
#[serial]
fn slot_list_two_call_convention() {
    let _init = Init::new();
    for present in [CK_TRUE, CK_FALSE] {
        assert_rv!(
            ck!(
                f(),
                C_GetSlotList,
                present,
                ptr::null_mut(),
                ptr::null_mut()
            ),
            CKR_ARGUMENTS_BAD
        );
        let mut n: CK_ULONG = 0;
        assert_rv!(
            ck!(f(), C_GetSlotList, present, ptr::null_mut(), &mut n),
            CKR_OK
        );
        assert!(n >= 1, "tokenPresent={present}: {n} slots");
        let mut ids = vec![CK_UNAVAILABLE_INFORMATION; n as usize];
        let mut short = n - 1;
        assert_rv!(
            ck!(f(), C_GetSlotList, present, ids.as_mut_ptr(), &mut short),
            CKR_BUFFER_TOO_SMALL
        );
        assert_eq!(short, n, "needed count");
        let mut full = n;
        assert_rv!(
            ck!(f(), C_GetSlotList, present, ids.as_mut_ptr(), &mut full),
            CKR_OK
        );
        assert_eq!(full, n);
        assert!(!ids.contains(&CK_UNAVAILABLE_INFORMATION));
        // A larger buffer reports the real count.
        let mut big = vec![0 as CK_SLOT_ID; n as usize + 3];
        let mut big_n = big.len() as CK_ULONG;
        assert_rv!(
            ck!(f(), C_GetSlotList, present, big.as_mut_ptr(), &mut big_n),
            CKR_OK
        );
        assert_eq!(big_n, n);
        assert_eq!(&big[..n as usize], &ids[..]);
    }
    assert!(token_slot() != CK_UNAVAILABLE_INFORMATION);
}

#[test]
#[serial]
fn mechanism_list_two_call_convention() {
    let _init = Init::new();
    let slot = token_slot();
    assert_rv!(
        ck!(
            f(),
            C_GetMechanismList,
            slot,
            ptr::null_mut(),
            ptr::null_mut()
        ),
        CKR_ARGUMENTS_BAD
    );
    let mut n: CK_ULONG = 0;
    assert_rv!(
        ck!(f(), C_GetMechanismList, slot, ptr::null_mut(), &mut n),
        CKR_OK
    );
    assert!(n > 5, "{n} mechanisms");
    let mut list = vec![CK_UNAVAILABLE_INFORMATION; n as usize];
    let mut short = n - 1;
    assert_rv!(
        ck!(f(), C_GetMechanismList, slot, list.as_mut_ptr(), &mut short),
        CKR_BUFFER_TOO_SMALL
    );
    assert_eq!(short, n);
    let mut full = n;
    assert_rv!(
        ck!(f(), C_GetMechanismList, slot, list.as_mut_ptr(), &mut full),
        CKR_OK
    );
    assert_eq!(full, n);
    for m in [CKM_AES_KEY_GEN, CKM_AES_GCM, CKM_AES_KEY_WRAP, CKM_ECDSA] {
        assert!(list.contains(&m), "mechanism 0x{m:x}");
    }
    // AES-KWP as cmkp11 uses it (CKM_AES_KEY_WRAP_PAD) is the token's to offer: kryoptic
    // 1.0 has RFC 5649 only as CKM_AES_KEY_WRAP_KWP (quirk `kryoptic:kwp-is-0x210b`).
    assert_eq!(
        list.contains(&CKM_AES_KEY_WRAP_PAD),
        common::token_has_kwp(),
        "CKM_AES_KEY_WRAP_PAD listed"
    );
    let mut info: CK_MECHANISM_INFO = unsafe { std::mem::zeroed() };
    assert_rv!(
        ck!(f(), C_GetMechanismInfo, slot, CKM_AES_GCM, &mut info),
        CKR_OK
    );
    assert!(info.flags & CKF_ENCRYPT != 0);
    assert_rv!(
        ck!(f(), C_GetMechanismInfo, slot, CKM_AES_GCM, ptr::null_mut()),
        CKR_ARGUMENTS_BAD
    );
    assert_rv!(
        ck!(f(), C_GetMechanismInfo, slot, 0x7fff_fff0, &mut info),
        CKR_MECHANISM_INVALID
    );
}

#[test]
#[serial]
fn invalid_slot_id() {
    let _init = Init::new();
    let bad: CK_SLOT_ID = 0x0bad_51d0;
    let mut slot_info: CK_SLOT_INFO = unsafe { std::mem::zeroed() };
    let mut token_info: CK_TOKEN_INFO = unsafe { std::mem::zeroed() };
    let mut mech_info: CK_MECHANISM_INFO = unsafe { std::mem::zeroed() };
    let mut n: CK_ULONG = 0;
    let mut h: CK_SESSION_HANDLE = 0;
    assert_rv!(
        ck!(f(), C_GetSlotInfo, bad, &mut slot_info),
        CKR_SLOT_ID_INVALID
    );
    assert_rv!(
        ck!(f(), C_GetTokenInfo, bad, &mut token_info),
        CKR_SLOT_ID_INVALID
    );
    assert_rv!(
        ck!(f(), C_GetMechanismList, bad, ptr::null_mut(), &mut n),
        CKR_SLOT_ID_INVALID
    );
    assert_rv!(
        ck!(f(), C_GetMechanismInfo, bad, CKM_AES_GCM, &mut mech_info),
        CKR_SLOT_ID_INVALID
    );
    assert_rv!(
        ck!(
            f(),
            C_OpenSession,
            bad,
            CKF_SERIAL_SESSION,
            ptr::null_mut(),
            None,
            &mut h
        ),
        CKR_SLOT_ID_INVALID
    );
    assert_rv!(ck!(f(), C_CloseAllSessions, bad), CKR_SLOT_ID_INVALID);
    // The real slot answers.
    let slot = token_slot();
    assert_rv!(ck!(f(), C_GetSlotInfo, slot, &mut slot_info), CKR_OK);
    assert!(slot_info.flags & CKF_TOKEN_PRESENT != 0);
    assert_rv!(ck!(f(), C_GetTokenInfo, slot, &mut token_info), CKR_OK);
    assert_eq!(padded(&token_info.label), TOKEN_LABEL);
    assert_eq!(padded(&token_info.manufacturerID), "cmkp11");
    assert_rv!(
        ck!(f(), C_GetSlotInfo, slot, ptr::null_mut()),
        CKR_ARGUMENTS_BAD
    );
    assert_rv!(
        ck!(f(), C_GetTokenInfo, slot, ptr::null_mut()),
        CKR_ARGUMENTS_BAD
    );
}

// ---------------------------------------------------------------------------------------
// Sessions and login
// ---------------------------------------------------------------------------------------

#[test]
#[serial]
fn open_session_flags_and_arguments() {
    let _init = Init::new();
    let slot = token_slot();
    let mut h: CK_SESSION_HANDLE = 0;
    assert_rv!(
        ck!(f(), C_OpenSession, slot, 0, ptr::null_mut(), None, &mut h),
        CKR_SESSION_PARALLEL_NOT_SUPPORTED
    );
    assert_rv!(
        ck!(
            f(),
            C_OpenSession,
            slot,
            CKF_RW_SESSION,
            ptr::null_mut(),
            None,
            &mut h
        ),
        CKR_SESSION_PARALLEL_NOT_SUPPORTED
    );
    assert_rv!(
        ck!(
            f(),
            C_OpenSession,
            slot,
            CKF_SERIAL_SESSION,
            ptr::null_mut(),
            None,
            ptr::null_mut()
        ),
        CKR_ARGUMENTS_BAD
    );
    assert_rv!(
        ck!(
            f(),
            C_OpenSession,
            slot,
            CKF_SERIAL_SESSION,
            ptr::null_mut(),
            None,
            &mut h
        ),
        CKR_OK
    );
    let mut info: CK_SESSION_INFO = unsafe { std::mem::zeroed() };
    assert_rv!(ck!(f(), C_GetSessionInfo, h, &mut info), CKR_OK);
    assert_eq!(info.slotID, slot);
    assert_eq!(info.state, CKS_RO_PUBLIC_SESSION);
    assert_eq!(info.flags, CKF_SERIAL_SESSION);
    assert_rv!(
        ck!(f(), C_GetSessionInfo, h, ptr::null_mut()),
        CKR_ARGUMENTS_BAD
    );
}

#[test]
#[serial]
fn bad_session_handles() {
    let _init = Init::new();
    let slot = token_slot();
    let mut info: CK_SESSION_INFO = unsafe { std::mem::zeroed() };
    for bad in [
        0 as CK_SESSION_HANDLE,
        0x7fff_1234,
        CK_UNAVAILABLE_INFORMATION,
    ] {
        assert_rv!(
            ck!(f(), C_GetSessionInfo, bad, &mut info),
            CKR_SESSION_HANDLE_INVALID,
            "C_GetSessionInfo({bad:#x})"
        );
        assert_rv!(
            ck!(f(), C_CloseSession, bad),
            CKR_SESSION_HANDLE_INVALID,
            "C_CloseSession({bad:#x})"
        );
        let mut m = mech(CKM_AES_GCM);
        assert_rv!(
            ck!(f(), C_EncryptInit, bad, &mut m, 1),
            CKR_SESSION_HANDLE_INVALID,
            "C_EncryptInit({bad:#x})"
        );
        let mut pin = USER_PIN.as_bytes().to_vec();
        assert_rv!(
            ck!(f(), C_Login, bad, CKU_USER, pin.as_mut_ptr(), 4),
            CKR_SESSION_HANDLE_INVALID,
            "C_Login({bad:#x})"
        );
    }
    // A closed session's handle is invalid.
    let s = open_session(slot);
    assert_rv!(ck!(f(), C_CloseSession, s), CKR_OK);
    assert_rv!(
        ck!(f(), C_GetSessionInfo, s, &mut info),
        CKR_SESSION_HANDLE_INVALID
    );
    assert_rv!(ck!(f(), C_CloseSession, s), CKR_SESSION_HANDLE_INVALID);
}

#[test]
#[serial]
fn session_handles_nonzero_distinct_never_reused() {
    let _init = Init::new();
    let slot = token_slot();
    let first: Vec<CK_SESSION_HANDLE> = (0..20).map(|_| open_session(slot)).collect();
    let mut sorted = first.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), first.len(), "distinct handles");
    for &h in &first[..10] {
        assert_rv!(ck!(f(), C_CloseSession, h), CKR_OK);
    }
    assert_rv!(ck!(f(), C_CloseAllSessions, slot), CKR_OK);
    let mut info: CK_SESSION_INFO = unsafe { std::mem::zeroed() };
    for &h in &first {
        assert_rv!(
            ck!(f(), C_GetSessionInfo, h, &mut info),
            CKR_SESSION_HANDLE_INVALID
        );
    }
    let second: Vec<CK_SESSION_HANDLE> = (0..20).map(|_| open_session(slot)).collect();
    for h in &second {
        assert!(!first.contains(h), "session handle {h} reused");
    }
}

#[test]
#[serial]
fn login_logout_states() {
    let _init = Init::new();
    let slot = token_slot();
    let s = open_session(slot);
    let mut pin = USER_PIN.as_bytes().to_vec();
    assert_rv!(ck!(f(), C_Logout, s), CKR_USER_NOT_LOGGED_IN);
    let mut wrong = b"0000".to_vec();
    assert_rv!(
        ck!(f(), C_Login, s, CKU_USER, wrong.as_mut_ptr(), 4),
        CKR_PIN_INCORRECT
    );
    assert_rv!(
        ck!(f(), C_Login, s, 77, pin.as_mut_ptr(), 4),
        CKR_USER_TYPE_INVALID
    );
    assert_rv!(
        ck!(
            f(),
            C_Login,
            s,
            CKU_USER,
            pin.as_mut_ptr(),
            pin.len() as CK_ULONG
        ),
        CKR_OK
    );
    assert_rv!(
        ck!(
            f(),
            C_Login,
            s,
            CKU_USER,
            pin.as_mut_ptr(),
            pin.len() as CK_ULONG
        ),
        CKR_USER_ALREADY_LOGGED_IN
    );
    let mut info: CK_SESSION_INFO = unsafe { std::mem::zeroed() };
    assert_rv!(ck!(f(), C_GetSessionInfo, s, &mut info), CKR_OK);
    assert_eq!(info.state, CKS_RW_USER_FUNCTIONS);
    assert_rv!(ck!(f(), C_Logout, s), CKR_OK);
    assert_rv!(ck!(f(), C_Logout, s), CKR_USER_NOT_LOGGED_IN);
    assert_rv!(ck!(f(), C_GetSessionInfo, s, &mut info), CKR_OK);
    assert_eq!(info.state, CKS_RW_PUBLIC_SESSION);
}

// ---------------------------------------------------------------------------------------
// Objects and attributes
// ---------------------------------------------------------------------------------------

fn attr(t: CK_ATTRIBUTE_TYPE, p: *mut c_void, len: usize) -> CK_ATTRIBUTE {
    CK_ATTRIBUTE {
        type_: t,
        pValue: p,
        ulValueLen: len as CK_ULONG,
    }
}

fn get_attrs(s: CK_SESSION_HANDLE, o: CK_OBJECT_HANDLE, t: &mut [CK_ATTRIBUTE]) -> CK_RV {
    ck!(
        f(),
        C_GetAttributeValue,
        s,
        o,
        t.as_mut_ptr(),
        t.len() as CK_ULONG
    )
}

#[test]
#[serial]
fn get_attribute_value_per_attribute_results() {
    let (_init, _slot, s) = setup();
    let label = "abi-attr-key"; // 12 bytes
    let key = aes_key(s, label);
    let ulong = size_of::<CK_ULONG>();

    // NULL pValue: lengths only.
    let mut t = [
        attr(CKA_LABEL, ptr::null_mut(), 0),
        attr(CKA_VALUE_LEN, ptr::null_mut(), 0),
        attr(CKA_CLASS, ptr::null_mut(), 0),
    ];
    assert_rv!(get_attrs(s, key, &mut t), CKR_OK, "NULL pValue");
    assert_eq!(t[0].ulValueLen, 12);
    assert_eq!(t[1].ulValueLen as usize, ulong);
    assert_eq!(t[2].ulValueLen as usize, ulong);

    // One buffer too small: that one is unavailable, the others are filled, and nothing
    // is written past the short buffer.
    let mut class: CK_ULONG = CK_UNAVAILABLE_INFORMATION;
    let mut label_buf = [0xAAu8; 16];
    let mut value_len: CK_ULONG = CK_UNAVAILABLE_INFORMATION;
    let mut t = [
        attr(CKA_CLASS, &mut class as *mut _ as *mut c_void, ulong),
        attr(CKA_LABEL, label_buf.as_mut_ptr() as *mut c_void, 4),
        attr(
            CKA_VALUE_LEN,
            &mut value_len as *mut _ as *mut c_void,
            ulong,
        ),
    ];
    assert_rv!(
        get_attrs(s, key, &mut t),
        CKR_BUFFER_TOO_SMALL,
        "short label"
    );
    assert_eq!(t[1].ulValueLen, CK_UNAVAILABLE_INFORMATION);
    assert!(
        label_buf[4..].iter().all(|&b| b == 0xAA),
        "overflow: {label_buf:?}"
    );
    assert_eq!(t[0].ulValueLen as usize, ulong);
    assert_eq!(class, CKO_SECRET_KEY);
    assert_eq!(t[2].ulValueLen as usize, ulong);
    assert_eq!(value_len, 32);

    // Exact-size buffer works.
    let mut t = [attr(CKA_LABEL, label_buf.as_mut_ptr() as *mut c_void, 12)];
    assert_rv!(get_attrs(s, key, &mut t), CKR_OK);
    assert_eq!(t[0].ulValueLen, 12);
    assert_eq!(&label_buf[..12], label.as_bytes());

    // Sensitive value: unavailable, CKR_ATTRIBUTE_SENSITIVE, the rest filled.
    let mut value = [0xAAu8; 64];
    let mut value_len: CK_ULONG = 0;
    let mut t = [
        attr(CKA_VALUE, value.as_mut_ptr() as *mut c_void, 64),
        attr(
            CKA_VALUE_LEN,
            &mut value_len as *mut _ as *mut c_void,
            ulong,
        ),
    ];
    assert_rv!(
        get_attrs(s, key, &mut t),
        CKR_ATTRIBUTE_SENSITIVE,
        "CKA_VALUE"
    );
    assert_eq!(t[0].ulValueLen, CK_UNAVAILABLE_INFORMATION);
    assert!(value.iter().all(|&b| b == 0xAA), "sensitive value written");
    assert_eq!(value_len, 32);
    let mut t = [attr(CKA_VALUE, ptr::null_mut(), 0)];
    assert_rv!(
        get_attrs(s, key, &mut t),
        CKR_ATTRIBUTE_SENSITIVE,
        "CKA_VALUE size"
    );
    assert_eq!(t[0].ulValueLen, CK_UNAVAILABLE_INFORMATION);

    // Unknown attribute type.
    let mut value_len: CK_ULONG = 0;
    let mut junk = [0u8; 8];
    let mut t = [
        attr(0x0def_abcd, junk.as_mut_ptr() as *mut c_void, 8),
        attr(
            CKA_VALUE_LEN,
            &mut value_len as *mut _ as *mut c_void,
            ulong,
        ),
    ];
    assert_rv!(
        get_attrs(s, key, &mut t),
        CKR_ATTRIBUTE_TYPE_INVALID,
        "unknown type"
    );
    assert_eq!(t[0].ulValueLen, CK_UNAVAILABLE_INFORMATION);
    assert_eq!(value_len, 32);

    // Bad arguments and a bad object handle.
    assert_rv!(
        ck!(f(), C_GetAttributeValue, s, key, ptr::null_mut(), 1),
        CKR_ARGUMENTS_BAD
    );
    let mut t = [attr(CKA_CLASS, ptr::null_mut(), 0)];
    assert_rv!(
        get_attrs(s, 0, &mut t),
        CKR_OBJECT_HANDLE_INVALID,
        "handle 0"
    );
    assert_rv!(
        get_attrs(s, 0x0bad_0b1e, &mut t),
        CKR_OBJECT_HANDLE_INVALID,
        "bogus handle"
    );
}

// ---------------------------------------------------------------------------------------
// Encryption
// ---------------------------------------------------------------------------------------

/// The 2.40 layout of CK_GCM_PARAMS without ulIvBits (what Java sends first): 40 bytes.
#[repr(C)]
struct GcmParams240 {
    p_iv: *mut u8,
    ul_iv_len: CK_ULONG,
    p_aad: *mut u8,
    ul_aad_len: CK_ULONG,
    ul_tag_bits: CK_ULONG,
}

fn encrypt_init(s: CK_SESSION_HANDLE, m: &mut CK_MECHANISM, key: CK_OBJECT_HANDLE) -> CK_RV {
    ck!(f(), C_EncryptInit, s, m, key)
}

fn encrypt(s: CK_SESSION_HANDLE, data: &[u8], out: *mut u8, out_len: &mut CK_ULONG) -> CK_RV {
    let mut d = data.to_vec();
    ck!(
        f(),
        C_Encrypt,
        s,
        d.as_mut_ptr(),
        d.len() as CK_ULONG,
        out,
        out_len
    )
}

fn decrypt_all(
    s: CK_SESSION_HANDLE,
    m: &mut CK_MECHANISM,
    key: CK_OBJECT_HANDLE,
    ct: &[u8],
) -> (CK_RV, Vec<u8>) {
    let rv = ck!(f(), C_DecryptInit, s, m, key);
    if rv != CKR_OK {
        return (rv, Vec::new());
    }
    let mut c = ct.to_vec();
    let mut out = vec![0u8; ct.len() + 32];
    let mut n = out.len() as CK_ULONG;
    let rv = ck!(
        f(),
        C_Decrypt,
        s,
        c.as_mut_ptr(),
        c.len() as CK_ULONG,
        out.as_mut_ptr(),
        &mut n
    );
    out.truncate(n as usize);
    (rv, out)
}

#[test]
#[serial]
fn encrypt_two_call_convention() {
    let (_init, _slot, s) = setup();
    let key = aes_key(s, "abi-two-call");
    let pt: Vec<u8> = (0..100u8).collect();

    // CBC-PAD: 100 bytes -> 112.
    let mut iv = [5u8; 16];
    let mut m = mech_with(CKM_AES_CBC_PAD, &mut iv, 16);
    assert_rv!(encrypt_init(s, &mut m, key), CKR_OK);
    let mut n: CK_ULONG = 0;
    assert_rv!(
        encrypt(s, &pt, ptr::null_mut(), &mut n),
        CKR_OK,
        "size query"
    );
    assert_eq!(n, 112, "size from NULL buffer");
    let mut out = vec![0xEEu8; 200];
    let mut short: CK_ULONG = 50;
    assert_rv!(
        encrypt(s, &pt, out.as_mut_ptr(), &mut short),
        CKR_BUFFER_TOO_SMALL
    );
    assert_eq!(short, 112, "size after CKR_BUFFER_TOO_SMALL");
    assert!(
        out[50..].iter().all(|&b| b == 0xEE),
        "written past the buffer"
    );
    // The operation is still active: the right-sized call succeeds.
    let mut exact: CK_ULONG = 112;
    assert_rv!(encrypt(s, &pt, out.as_mut_ptr(), &mut exact), CKR_OK);
    assert_eq!(exact, 112);
    let ct = out[..112].to_vec();
    // ...and then the operation is finished.
    let mut again: CK_ULONG = 200;
    assert_rv!(
        encrypt(s, &pt, out.as_mut_ptr(), &mut again),
        CKR_OPERATION_NOT_INITIALIZED
    );
    let mut m = mech_with(CKM_AES_CBC_PAD, &mut iv, 16);
    let (rv, back) = decrypt_all(s, &mut m, key, &ct);
    assert_rv!(rv, CKR_OK, "decrypt");
    assert_eq!(back, pt);

    // GCM: 4096 bytes -> 4112; the size query, too small, then right-sized.
    let pt = vec![0x5Au8; 4096];
    let mut gcm_iv = [1u8; 12];
    let mut p = gcm_params(&mut gcm_iv, 128);
    let mut m = mech_with(CKM_AES_GCM, &mut p, size_of::<CK_GCM_PARAMS>());
    assert_rv!(encrypt_init(s, &mut m, key), CKR_OK);
    let mut n: CK_ULONG = 0;
    assert_rv!(encrypt(s, &pt, ptr::null_mut(), &mut n), CKR_OK);
    assert_eq!(n, 4112);
    let mut out = vec![0u8; 4112];
    let mut short: CK_ULONG = 4111;
    assert_rv!(
        encrypt(s, &pt, out.as_mut_ptr(), &mut short),
        CKR_BUFFER_TOO_SMALL
    );
    assert_eq!(short, 4112);
    let mut exact: CK_ULONG = 4112;
    assert_rv!(encrypt(s, &pt, out.as_mut_ptr(), &mut exact), CKR_OK);
    assert_eq!(exact, 4112);
    let mut m = mech_with(CKM_AES_GCM, &mut p, size_of::<CK_GCM_PARAMS>());
    let (rv, back) = decrypt_all(s, &mut m, key, &out);
    assert_rv!(rv, CKR_OK, "GCM decrypt");
    assert_eq!(back, pt);
}

/// AES-GCM length queries, which cmkp11 answers itself while the backend has seen no data
/// (the ciphertext is the plaintext and the tag): the answer is the token's own, for
/// several tag lengths, and the operation stays active; a ciphertext shorter than the tag,
/// and a query after a multi-part update, get the token's answer (the same codes run
/// against SoftHSM2 directly, `CMKP11_TEST_MODULE`).
#[test]
#[serial]
fn gcm_length_queries() {
    let (_init, _slot, s) = setup();
    let key = aes_key(s, "abi-gcm-len");
    let pt: Vec<u8> = (0..100u8).collect();
    let mut iv = [3u8; 12];
    for tag_bits in [128, 96, 64] {
        let tag = tag_bits / 8;
        let mut p = gcm_params(&mut iv, tag_bits);
        let mut m = mech_with(CKM_AES_GCM, &mut p, size_of::<CK_GCM_PARAMS>());
        assert_rv!(encrypt_init(s, &mut m, key), CKR_OK);
        let mut n: CK_ULONG = 0;
        assert_rv!(encrypt(s, &pt, ptr::null_mut(), &mut n), CKR_OK, "query");
        assert_eq!(n, 100 + tag, "ciphertext length, tag of {tag_bits} bits");
        // Asked twice: the same answer, the operation still active.
        assert_rv!(encrypt(s, &pt, ptr::null_mut(), &mut n), CKR_OK, "again");
        assert_eq!(n, 100 + tag);
        let mut ct = vec![0u8; n as usize];
        assert_rv!(encrypt(s, &pt, ct.as_mut_ptr(), &mut n), CKR_OK, "encrypt");
        assert_eq!(n, 100 + tag);

        assert_rv!(ck!(f(), C_DecryptInit, s, &mut m, key), CKR_OK);
        let mut q: CK_ULONG = 0;
        assert_rv!(
            ck!(
                f(),
                C_Decrypt,
                s,
                ct.as_mut_ptr(),
                n,
                ptr::null_mut(),
                &mut q
            ),
            CKR_OK,
            "decrypt query"
        );
        // The token's own answer: a buffer of the ciphertext's length (SoftHSM2).
        assert_eq!(q, 100 + tag, "decryption's buffer, tag of {tag_bits} bits");
        let mut back = vec![0u8; q as usize];
        assert_rv!(
            ck!(
                f(),
                C_Decrypt,
                s,
                ct.as_mut_ptr(),
                n,
                back.as_mut_ptr(),
                &mut q
            ),
            CKR_OK,
            "decrypt"
        );
        assert_eq!(q, 100, "plaintext length");
        back.truncate(100);
        assert_eq!(back, pt);
    }

    // A ciphertext shorter than the tag: the token answers the query, then refuses.
    let mut p = gcm_params(&mut iv, 128);
    let mut m = mech_with(CKM_AES_GCM, &mut p, size_of::<CK_GCM_PARAMS>());
    assert_rv!(ck!(f(), C_DecryptInit, s, &mut m, key), CKR_OK);
    let mut short = [0u8; 8];
    let mut q: CK_ULONG = 0;
    let rv = ck!(
        f(),
        C_Decrypt,
        s,
        short.as_mut_ptr(),
        8,
        ptr::null_mut(),
        &mut q
    );
    assert_rv!(
        rv,
        CKR_OK,
        "ciphertext shorter than the tag: the token's answer"
    );
    // The token's answer to a query on data it will refuse: SoftHSM2 says the ciphertext's
    // length, kryoptic 0 (the length less the tag, saturated): README "token differences".
    let want = match common::backend() {
        common::Backend::Softhsm2 => 8,
        common::Backend::Kryoptic => 0,
    };
    assert_eq!(
        q, want,
        "the token's answer (SoftHSM2: the ciphertext's length)"
    );
    let mut out = [0u8; 64];
    let mut n: CK_ULONG = 64;
    assert_rv!(
        ck!(
            f(),
            C_Decrypt,
            s,
            short.as_mut_ptr(),
            8,
            out.as_mut_ptr(),
            &mut n
        ),
        // cmkp11 names a failed authenticated decryption CKR_ENCRYPTED_DATA_INVALID
        // (SoftHSM2 2.6 itself says CKR_GENERAL_ERROR).
        if common::testing_cmkp11() {
            CKR_ENCRYPTED_DATA_INVALID
        } else {
            CKR_GENERAL_ERROR
        },
        "the decryption"
    );

    // After a multi-part update, the single-part query goes to the token.
    assert_rv!(encrypt_init(s, &mut m, key), CKR_OK);
    let mut part = pt.clone();
    let mut pn: CK_ULONG = 256;
    let mut pout = vec![0u8; 256];
    assert_rv!(
        ck!(
            f(),
            C_EncryptUpdate,
            s,
            part.as_mut_ptr(),
            100,
            pout.as_mut_ptr(),
            &mut pn
        ),
        CKR_OK,
        "update"
    );
    let mut n: CK_ULONG = 0;
    let rv = encrypt(s, &pt[..40], ptr::null_mut(), &mut n);
    assert_rv!(rv, CKR_OK, "single-part query after an update");
    assert_eq!(n, 56, "the token's answer");
}

#[test]
#[serial]
fn operation_state_errors() {
    let (_init, _slot, s) = setup();
    let key = aes_key(s, "abi-op-state");
    let mut out = [0u8; 64];
    let mut n: CK_ULONG = 64;
    assert_rv!(
        encrypt(s, b"data", out.as_mut_ptr(), &mut n),
        CKR_OPERATION_NOT_INITIALIZED
    );
    let mut d = *b"0123456789abcdef";
    let mut n: CK_ULONG = 64;
    assert_rv!(
        ck!(
            f(),
            C_Decrypt,
            s,
            d.as_mut_ptr(),
            16,
            out.as_mut_ptr(),
            &mut n
        ),
        CKR_OPERATION_NOT_INITIALIZED
    );
    let mut n: CK_ULONG = 64;
    assert_rv!(
        ck!(f(), C_Sign, s, d.as_mut_ptr(), 16, out.as_mut_ptr(), &mut n),
        CKR_OPERATION_NOT_INITIALIZED
    );
    let mut n: CK_ULONG = 64;
    assert_rv!(
        ck!(f(), C_EncryptFinal, s, out.as_mut_ptr(), &mut n),
        CKR_OPERATION_NOT_INITIALIZED
    );

    let mut iv = [6u8; 16];
    let mut m = mech_with(CKM_AES_CBC_PAD, &mut iv, 16);
    assert_rv!(encrypt_init(s, &mut m, key), CKR_OK);
    assert_rv!(encrypt_init(s, &mut m, key), CKR_OPERATION_ACTIVE);
    // The first operation is untouched by the refused second init.
    let mut n: CK_ULONG = 64;
    assert_rv!(
        encrypt(s, b"sixteen byte msg", out.as_mut_ptr(), &mut n),
        CKR_OK
    );
    assert_eq!(n, 32);

    // NULL mechanism and bad key handle.
    assert_rv!(
        ck!(f(), C_EncryptInit, s, ptr::null_mut(), key),
        CKR_ARGUMENTS_BAD
    );
    let mut m = mech_with(CKM_AES_CBC_PAD, &mut iv, 16);
    assert_rv!(encrypt_init(s, &mut m, 0x0bad_0b1e), CKR_KEY_HANDLE_INVALID);
}

#[test]
#[serial]
fn gcm_params_length_is_checked() {
    let (_init, _slot, s) = setup();
    let key = aes_key(s, "abi-gcm-params");
    let mut iv = [2u8; 12];
    let mut aad = *b"aad";
    let mut p40 = GcmParams240 {
        p_iv: iv.as_mut_ptr(),
        ul_iv_len: 12,
        p_aad: aad.as_mut_ptr(),
        ul_aad_len: 3,
        ul_tag_bits: 128,
    };
    assert_eq!(size_of::<GcmParams240>(), 40);
    let mut m = mech_with(CKM_AES_GCM, &mut p40, 40);
    assert_rv!(
        encrypt_init(s, &mut m, key),
        CKR_MECHANISM_PARAM_INVALID,
        "40-byte GCM params"
    );
    let mut m = mech_with(CKM_AES_GCM, &mut p40, 40);
    let (rv, _) = decrypt_all(s, &mut m, key, &[0u8; 32]);
    assert_rv!(
        rv,
        CKR_MECHANISM_PARAM_INVALID,
        "40-byte GCM params (decrypt)"
    );
    let mut m = mech(CKM_AES_GCM);
    assert_rv!(
        encrypt_init(s, &mut m, key),
        CKR_MECHANISM_PARAM_INVALID,
        "NULL GCM params"
    );

    // The 48-byte (3.0 header) struct works.
    let mut p48 = CK_GCM_PARAMS {
        pIv: iv.as_mut_ptr(),
        ulIvLen: 12,
        ulIvBits: 96,
        pAAD: aad.as_mut_ptr(),
        ulAADLen: 3,
        ulTagBits: 128,
    };
    let mut m = mech_with(CKM_AES_GCM, &mut p48, 48);
    assert_rv!(encrypt_init(s, &mut m, key), CKR_OK, "48-byte GCM params");
    let pt = b"java retries with the long struct";
    let mut out = vec![0u8; pt.len() + 16];
    let mut n = out.len() as CK_ULONG;
    assert_rv!(encrypt(s, pt, out.as_mut_ptr(), &mut n), CKR_OK);
    assert_eq!(n as usize, pt.len() + 16);
    let mut m = mech_with(CKM_AES_GCM, &mut p48, 48);
    let (rv, back) = decrypt_all(s, &mut m, key, &out);
    assert_rv!(rv, CKR_OK);
    assert_eq!(back, pt);
}

#[test]
#[serial]
fn cbc_iv_length_is_checked() {
    let (_init, _slot, s) = setup();
    let key = aes_key(s, "abi-cbc-iv");
    let mut iv = [0u8; 32];
    for len in [0usize, 15, 17, 32] {
        let mut m = mech_with(CKM_AES_CBC_PAD, &mut iv, len);
        assert_rv!(
            encrypt_init(s, &mut m, key),
            CKR_MECHANISM_PARAM_INVALID,
            "CBC-PAD IV of {len} bytes"
        );
    }
    let mut m = mech(CKM_AES_CBC_PAD);
    assert_rv!(
        encrypt_init(s, &mut m, key),
        CKR_MECHANISM_PARAM_INVALID,
        "CBC-PAD without IV"
    );
    let mut m = mech_with(CKM_AES_CBC_PAD, &mut iv, 16);
    assert_rv!(encrypt_init(s, &mut m, key), CKR_OK, "16-byte IV");
}

// ---------------------------------------------------------------------------------------
// Unsupported functions
// ---------------------------------------------------------------------------------------

fn rsa_key_pair(s: CK_SESSION_HANDLE) -> (CK_OBJECT_HANDLE, CK_OBJECT_HANDLE) {
    let mut pub_t = Template::default()
        .boolean(CKA_TOKEN, false)
        .ulong(CKA_MODULUS_BITS, 2048)
        .bytes(CKA_PUBLIC_EXPONENT, &[1, 0, 1])
        .boolean(CKA_VERIFY, true);
    let mut priv_t = Template::default()
        .boolean(CKA_TOKEN, false)
        .boolean(CKA_SENSITIVE, true)
        .boolean(CKA_SIGN, true);
    let mut pa = pub_t.raw();
    let mut pr = priv_t.raw();
    let mut m = mech(CKM_RSA_PKCS_KEY_PAIR_GEN);
    let (mut public, mut private) = (0, 0);
    assert_rv!(
        ck!(
            f(),
            C_GenerateKeyPair,
            s,
            &mut m,
            pa.as_mut_ptr(),
            pa.len() as CK_ULONG,
            pr.as_mut_ptr(),
            pr.len() as CK_ULONG,
            &mut public,
            &mut private
        ),
        CKR_OK,
        "C_GenerateKeyPair"
    );
    (public, private)
}

#[test]
#[serial]
fn unsupported_functions() {
    let (_init, _slot, s) = setup();
    let (public, private) = rsa_key_pair(s);
    let mut m = mech(CKM_RSA_PKCS);
    assert_rv!(
        ck!(f(), C_SignRecoverInit, s, &mut m, private),
        CKR_FUNCTION_NOT_SUPPORTED,
        "C_SignRecoverInit"
    );
    assert_rv!(
        ck!(f(), C_VerifyRecoverInit, s, &mut m, public),
        CKR_FUNCTION_NOT_SUPPORTED,
        "C_VerifyRecoverInit"
    );
    let mut buf = [0u8; 64];
    let mut out = [0u8; 64];
    let mut n: CK_ULONG = 64;
    assert_rv!(
        ck!(
            f(),
            C_DigestEncryptUpdate,
            s,
            buf.as_mut_ptr(),
            16,
            out.as_mut_ptr(),
            &mut n
        ),
        CKR_FUNCTION_NOT_SUPPORTED,
        "C_DigestEncryptUpdate"
    );
    assert_rv!(
        ck!(
            f(),
            C_DecryptDigestUpdate,
            s,
            buf.as_mut_ptr(),
            16,
            out.as_mut_ptr(),
            &mut n
        ),
        CKR_FUNCTION_NOT_SUPPORTED,
        "C_DecryptDigestUpdate"
    );
    assert_rv!(
        ck!(
            f(),
            C_SignEncryptUpdate,
            s,
            buf.as_mut_ptr(),
            16,
            out.as_mut_ptr(),
            &mut n
        ),
        CKR_FUNCTION_NOT_SUPPORTED,
        "C_SignEncryptUpdate"
    );
    assert_rv!(
        ck!(
            f(),
            C_DecryptVerifyUpdate,
            s,
            buf.as_mut_ptr(),
            16,
            out.as_mut_ptr(),
            &mut n
        ),
        CKR_FUNCTION_NOT_SUPPORTED,
        "C_DecryptVerifyUpdate"
    );
    assert_rv!(
        ck!(f(), C_GetOperationState, s, ptr::null_mut(), &mut n),
        CKR_FUNCTION_NOT_SUPPORTED,
        "C_GetOperationState"
    );
    // Legacy parallel functions (spec: they simply return CKR_FUNCTION_NOT_PARALLEL).
    assert_rv!(ck!(f(), C_GetFunctionStatus, s), CKR_FUNCTION_NOT_PARALLEL);
    assert_rv!(ck!(f(), C_CancelFunction, s), CKR_FUNCTION_NOT_PARALLEL);
}

#[test]
#[serial]
fn message_functions_not_supported() {
    let (_init, _slot, s) = setup();
    let key = aes_key(s, "abi-message");
    let t = table_3_0();
    let mut m = mech(CKM_AES_GCM);
    let null = ptr::null_mut();
    let mut n: CK_ULONG = 0;
    let results: Vec<(&str, CK_RV)> = vec![
        (
            "C_MessageEncryptInit",
            ck!(t, C_MessageEncryptInit, s, &mut m, key),
        ),
        (
            "C_EncryptMessage",
            ck!(
                t,
                C_EncryptMessage,
                s,
                null,
                0,
                null as _,
                0,
                null as _,
                0,
                null as _,
                &mut n
            ),
        ),
        (
            "C_EncryptMessageBegin",
            ck!(t, C_EncryptMessageBegin, s, null, 0, null as _, 0),
        ),
        (
            "C_EncryptMessageNext",
            ck!(
                t,
                C_EncryptMessageNext,
                s,
                null,
                0,
                null as _,
                0,
                null as _,
                &mut n,
                0
            ),
        ),
        ("C_MessageEncryptFinal", ck!(t, C_MessageEncryptFinal, s)),
        (
            "C_MessageDecryptInit",
            ck!(t, C_MessageDecryptInit, s, &mut m, key),
        ),
        (
            "C_DecryptMessage",
            ck!(
                t,
                C_DecryptMessage,
                s,
                null,
                0,
                null as _,
                0,
                null as _,
                0,
                null as _,
                &mut n
            ),
        ),
        (
            "C_DecryptMessageBegin",
            ck!(t, C_DecryptMessageBegin, s, null, 0, null as _, 0),
        ),
        (
            "C_DecryptMessageNext",
            ck!(
                t,
                C_DecryptMessageNext,
                s,
                null,
                0,
                null as _,
                0,
                null as _,
                &mut n,
                0
            ),
        ),
        ("C_MessageDecryptFinal", ck!(t, C_MessageDecryptFinal, s)),
        (
            "C_MessageSignInit",
            ck!(t, C_MessageSignInit, s, &mut m, key),
        ),
        (
            "C_SignMessage",
            ck!(
                t,
                C_SignMessage,
                s,
                null,
                0,
                null as _,
                0,
                null as _,
                &mut n
            ),
        ),
        ("C_SignMessageBegin", ck!(t, C_SignMessageBegin, s, null, 0)),
        (
            "C_SignMessageNext",
            ck!(
                t,
                C_SignMessageNext,
                s,
                null,
                0,
                null as _,
                0,
                null as _,
                &mut n
            ),
        ),
        ("C_MessageSignFinal", ck!(t, C_MessageSignFinal, s)),
        (
            "C_MessageVerifyInit",
            ck!(t, C_MessageVerifyInit, s, &mut m, key),
        ),
        (
            "C_VerifyMessage",
            ck!(t, C_VerifyMessage, s, null, 0, null as _, 0, null as _, 0),
        ),
        (
            "C_VerifyMessageBegin",
            ck!(t, C_VerifyMessageBegin, s, null, 0),
        ),
        (
            "C_VerifyMessageNext",
            ck!(
                t,
                C_VerifyMessageNext,
                s,
                null,
                0,
                null as _,
                0,
                null as _,
                0
            ),
        ),
        ("C_MessageVerifyFinal", ck!(t, C_MessageVerifyFinal, s)),
    ];
    let wrong: Vec<String> = results
        .iter()
        .filter(|(_, rv)| *rv != CKR_FUNCTION_NOT_SUPPORTED)
        .map(|(name, rv)| format!("{name}: {}", common::rv_name(*rv)))
        .collect();
    assert!(
        wrong.is_empty(),
        "expected CKR_FUNCTION_NOT_SUPPORTED from: {wrong:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Panic guard
// ---------------------------------------------------------------------------------------

#[test]
#[serial]
fn panic_never_crosses_the_c_boundary() {
    if testing_cmkp11() && !cfg!(debug_assertions) {
        eprintln!("panic_never_crosses_the_c_boundary: release build has no fault hook");
        return;
    }
    let _init = Init::new();
    let mut info: CK_INFO = unsafe { std::mem::zeroed() };
    std::env::set_var("CMKP11_FAULT", "panic-in-get-info");
    let rv = ck!(f(), C_GetInfo, &mut info);
    std::env::remove_var("CMKP11_FAULT");
    assert_rv!(
        rv,
        CKR_GENERAL_ERROR,
        "C_GetInfo with CMKP11_FAULT=panic-in-get-info"
    );
    // The process and the module carry on.
    assert_rv!(
        ck!(f(), C_GetInfo, &mut info),
        CKR_OK,
        "C_GetInfo after the fault"
    );
    assert_eq!(padded(&info.manufacturerID), "cmkp11");
    let slot = token_slot();
    let s = open_session(slot);
    let mut sinfo: CK_SESSION_INFO = unsafe { std::mem::zeroed() };
    assert_rv!(ck!(f(), C_GetSessionInfo, s, &mut sinfo), CKR_OK);
}

// ---------------------------------------------------------------------------------------
// The two-call convention for other outputs, and operation life cycles
// ---------------------------------------------------------------------------------------

/// A session EC P-256 key pair (sign / verify).
fn ec_key_pair(s: CK_SESSION_HANDLE) -> (CK_OBJECT_HANDLE, CK_OBJECT_HANDLE) {
    let mut pub_t = Template::default()
        .boolean(CKA_TOKEN, false)
        .bytes(CKA_EC_PARAMS, &common::P256_PARAMS)
        .boolean(CKA_VERIFY, true);
    let mut priv_t = Template::default()
        .boolean(CKA_TOKEN, false)
        .boolean(CKA_SENSITIVE, true)
        .boolean(CKA_SIGN, true);
    let mut pa = pub_t.raw();
    let mut pr = priv_t.raw();
    let mut m = mech(CKM_EC_KEY_PAIR_GEN);
    let (mut public, mut private) = (0, 0);
    assert_rv!(
        ck!(
            f(),
            C_GenerateKeyPair,
            s,
            &mut m,
            pa.as_mut_ptr(),
            pa.len() as CK_ULONG,
            pr.as_mut_ptr(),
            pr.len() as CK_ULONG,
            &mut public,
            &mut private
        ),
        CKR_OK,
        "C_GenerateKeyPair EC"
    );
    (public, private)
}

#[test]
#[serial]
fn sign_two_call_convention() {
    let (_init, _slot, s) = setup();
    let (public, private) = ec_key_pair(s);
    let mut digest = [0x33u8; 32];
    let mut m = mech(CKM_ECDSA);
    assert_rv!(ck!(f(), C_SignInit, s, &mut m, private), CKR_OK);
    let mut n: CK_ULONG = 0;
    assert_rv!(
        ck!(
            f(),
            C_Sign,
            s,
            digest.as_mut_ptr(),
            32,
            ptr::null_mut(),
            &mut n
        ),
        CKR_OK,
        "size query"
    );
    assert_eq!(n, 64);
    let mut sig = [0xEEu8; 80];
    let mut short: CK_ULONG = 10;
    assert_rv!(
        ck!(
            f(),
            C_Sign,
            s,
            digest.as_mut_ptr(),
            32,
            sig.as_mut_ptr(),
            &mut short
        ),
        CKR_BUFFER_TOO_SMALL
    );
    assert_eq!(short, 64);
    assert!(
        sig[10..].iter().all(|&b| b == 0xEE),
        "written past the buffer"
    );
    let mut big: CK_ULONG = 80;
    assert_rv!(
        ck!(
            f(),
            C_Sign,
            s,
            digest.as_mut_ptr(),
            32,
            sig.as_mut_ptr(),
            &mut big
        ),
        CKR_OK
    );
    assert_eq!(big, 64);
    // The signature is over the same digest: it verifies.
    assert_rv!(ck!(f(), C_VerifyInit, s, &mut m, public), CKR_OK);
    assert_rv!(
        ck!(
            f(),
            C_Verify,
            s,
            digest.as_mut_ptr(),
            32,
            sig.as_mut_ptr(),
            64
        ),
        CKR_OK,
        "verify the signature collected after CKR_BUFFER_TOO_SMALL"
    );
    // The sign operation is over.
    let mut n: CK_ULONG = 80;
    assert_rv!(
        ck!(
            f(),
            C_Sign,
            s,
            digest.as_mut_ptr(),
            32,
            sig.as_mut_ptr(),
            &mut n
        ),
        CKR_OPERATION_NOT_INITIALIZED
    );

    // Multi-part: C_SignFinal follows the same convention.
    let (rsa_public, rsa_private) = rsa_key_pair(s);
    let mut m = mech(CKM_SHA256_RSA_PKCS);
    assert_rv!(ck!(f(), C_SignInit, s, &mut m, rsa_private), CKR_OK);
    let mut part = *b"multi-part message";
    assert_rv!(
        ck!(
            f(),
            C_SignUpdate,
            s,
            part.as_mut_ptr(),
            part.len() as CK_ULONG
        ),
        CKR_OK
    );
    let mut n: CK_ULONG = 0;
    assert_rv!(ck!(f(), C_SignFinal, s, ptr::null_mut(), &mut n), CKR_OK);
    assert_eq!(n, 256);
    let mut rsa_sig = [0u8; 256];
    let mut short: CK_ULONG = 255;
    assert_rv!(
        ck!(f(), C_SignFinal, s, rsa_sig.as_mut_ptr(), &mut short),
        CKR_BUFFER_TOO_SMALL
    );
    assert_eq!(short, 256);
    let mut n: CK_ULONG = 256;
    assert_rv!(
        ck!(f(), C_SignFinal, s, rsa_sig.as_mut_ptr(), &mut n),
        CKR_OK
    );
    assert_eq!(n, 256);
    assert_rv!(ck!(f(), C_VerifyInit, s, &mut m, rsa_public), CKR_OK);
    assert_rv!(
        ck!(
            f(),
            C_Verify,
            s,
            part.as_mut_ptr(),
            part.len() as CK_ULONG,
            rsa_sig.as_mut_ptr(),
            256
        ),
        CKR_OK
    );
}

#[test]
#[serial]
fn digest_and_random_two_call_and_arguments() {
    let (_init, _slot, s) = setup();
    let mut data = *b"abc";
    let mut m = mech(CKM_SHA256);
    assert_rv!(ck!(f(), C_DigestInit, s, &mut m), CKR_OK);
    assert_rv!(ck!(f(), C_DigestInit, s, &mut m), CKR_OPERATION_ACTIVE);
    let mut n: CK_ULONG = 0;
    assert_rv!(
        ck!(
            f(),
            C_Digest,
            s,
            data.as_mut_ptr(),
            3,
            ptr::null_mut(),
            &mut n
        ),
        CKR_OK
    );
    assert_eq!(n, 32);
    let mut out = [0u8; 32];
    let mut short: CK_ULONG = 31;
    assert_rv!(
        ck!(
            f(),
            C_Digest,
            s,
            data.as_mut_ptr(),
            3,
            out.as_mut_ptr(),
            &mut short
        ),
        CKR_BUFFER_TOO_SMALL
    );
    assert_eq!(short, 32);
    let mut n: CK_ULONG = 32;
    assert_rv!(
        ck!(
            f(),
            C_Digest,
            s,
            data.as_mut_ptr(),
            3,
            out.as_mut_ptr(),
            &mut n
        ),
        CKR_OK
    );
    assert_eq!(out[..4], [0xba, 0x78, 0x16, 0xbf]);
    assert_eq!(out[28..], [0xf2, 0x00, 0x15, 0xad]);

    assert_rv!(
        ck!(f(), C_GenerateRandom, s, ptr::null_mut(), 16),
        CKR_ARGUMENTS_BAD
    );
    let mut rnd = [0u8; 16];
    assert_rv!(ck!(f(), C_GenerateRandom, s, rnd.as_mut_ptr(), 16), CKR_OK);
    assert_ne!(rnd, [0u8; 16]);
    assert_rv!(
        ck!(f(), C_GenerateRandom, 0x0bad_5e55, rnd.as_mut_ptr(), 16),
        CKR_SESSION_HANDLE_INVALID
    );
}

#[test]
#[serial]
fn decrypt_two_call_convention() {
    let (_init, _slot, s) = setup();
    let key = aes_key(s, "abi-decrypt-two-call");
    let pt: Vec<u8> = (0..37u8).collect();
    let mut iv = [9u8; 16];
    let mut m = mech_with(CKM_AES_CBC_PAD, &mut iv, 16);
    assert_rv!(ck!(f(), C_EncryptInit, s, &mut m, key), CKR_OK);
    let mut p = pt.clone();
    let mut ct = [0u8; 48];
    let mut n: CK_ULONG = 48;
    assert_rv!(
        ck!(
            f(),
            C_Encrypt,
            s,
            p.as_mut_ptr(),
            37,
            ct.as_mut_ptr(),
            &mut n
        ),
        CKR_OK
    );
    assert_eq!(n, 48);

    let mut m = mech_with(CKM_AES_CBC_PAD, &mut iv, 16);
    assert_rv!(ck!(f(), C_DecryptInit, s, &mut m, key), CKR_OK);
    let mut n: CK_ULONG = 0;
    assert_rv!(
        ck!(
            f(),
            C_Decrypt,
            s,
            ct.as_mut_ptr(),
            48,
            ptr::null_mut(),
            &mut n
        ),
        CKR_OK,
        "size query"
    );
    // With a NULL buffer the answer may be an upper bound (the padding is unknown yet).
    assert!((37..=48).contains(&n), "decrypt size query gave {n}");
    let mut out = [0xEEu8; 48];
    let mut short: CK_ULONG = 36;
    assert_rv!(
        ck!(
            f(),
            C_Decrypt,
            s,
            ct.as_mut_ptr(),
            48,
            out.as_mut_ptr(),
            &mut short
        ),
        CKR_BUFFER_TOO_SMALL
    );
    assert!((37..=48).contains(&short), "needed length {short}");
    assert!(
        out[36..].iter().all(|&b| b == 0xEE),
        "written past the buffer"
    );
    let mut n: CK_ULONG = 48;
    assert_rv!(
        ck!(
            f(),
            C_Decrypt,
            s,
            ct.as_mut_ptr(),
            48,
            out.as_mut_ptr(),
            &mut n
        ),
        CKR_OK
    );
    assert_eq!(n, 37);
    assert_eq!(&out[..37], &pt[..]);
}

#[test]
#[serial]
fn encrypt_update_two_call_convention() {
    let (_init, _slot, s) = setup();
    let key = aes_key(s, "abi-update-two-call");
    let pt: Vec<u8> = (0..40u8).collect();
    let mut iv = [4u8; 16];
    let mut m = mech_with(CKM_AES_CBC_PAD, &mut iv, 16);
    assert_rv!(ck!(f(), C_EncryptInit, s, &mut m, key), CKR_OK);
    let mut single = [0u8; 48];
    let mut n: CK_ULONG = 48;
    let mut p = pt.clone();
    assert_rv!(
        ck!(
            f(),
            C_Encrypt,
            s,
            p.as_mut_ptr(),
            40,
            single.as_mut_ptr(),
            &mut n
        ),
        CKR_OK
    );

    let mut m = mech_with(CKM_AES_CBC_PAD, &mut iv, 16);
    assert_rv!(ck!(f(), C_EncryptInit, s, &mut m, key), CKR_OK);
    let mut out = Vec::new();
    let mut buf = [0u8; 64];
    // 40 bytes in: 32 out now (16 held back for padding).
    let mut n: CK_ULONG = 0;
    assert_rv!(
        ck!(
            f(),
            C_EncryptUpdate,
            s,
            p.as_mut_ptr(),
            40,
            ptr::null_mut(),
            &mut n
        ),
        CKR_OK,
        "update size query"
    );
    assert!(n >= 32, "update size query gave {n}");
    let mut short: CK_ULONG = 16;
    assert_rv!(
        ck!(
            f(),
            C_EncryptUpdate,
            s,
            p.as_mut_ptr(),
            40,
            buf.as_mut_ptr(),
            &mut short
        ),
        CKR_BUFFER_TOO_SMALL
    );
    assert!(short >= 32, "needed {short}");
    // The same input again, now with room: it was not consumed by the refused call.
    let mut n: CK_ULONG = 64;
    assert_rv!(
        ck!(
            f(),
            C_EncryptUpdate,
            s,
            p.as_mut_ptr(),
            40,
            buf.as_mut_ptr(),
            &mut n
        ),
        CKR_OK
    );
    out.extend_from_slice(&buf[..n as usize]);
    let mut n: CK_ULONG = 0;
    assert_rv!(ck!(f(), C_EncryptFinal, s, ptr::null_mut(), &mut n), CKR_OK);
    assert!(n >= 48 - out.len() as CK_ULONG, "final size query gave {n}");
    let mut n: CK_ULONG = 64;
    assert_rv!(
        ck!(f(), C_EncryptFinal, s, buf.as_mut_ptr(), &mut n),
        CKR_OK
    );
    out.extend_from_slice(&buf[..n as usize]);
    assert_eq!(out, single, "multi-part with retries equals single-part");
}

#[test]
#[serial]
fn failed_operation_is_terminated() {
    let (_init, _slot, s) = setup();
    let key = aes_key(s, "abi-terminated");
    // AES-CBC without padding refuses 15 bytes; the error ends the operation.
    let mut iv = [1u8; 16];
    let mut m = mech_with(CKM_AES_CBC, &mut iv, 16);
    assert_rv!(ck!(f(), C_EncryptInit, s, &mut m, key), CKR_OK);
    let mut d = [0u8; 15];
    let mut out = [0u8; 32];
    let mut n: CK_ULONG = 32;
    assert_rv!(
        ck!(
            f(),
            C_Encrypt,
            s,
            d.as_mut_ptr(),
            15,
            out.as_mut_ptr(),
            &mut n
        ),
        CKR_DATA_LEN_RANGE
    );
    let mut d16 = [0u8; 16];
    let mut n: CK_ULONG = 32;
    assert_rv!(
        ck!(
            f(),
            C_Encrypt,
            s,
            d16.as_mut_ptr(),
            16,
            out.as_mut_ptr(),
            &mut n
        ),
        CKR_OPERATION_NOT_INITIALIZED
    );
    // A new operation can start.
    assert_rv!(ck!(f(), C_EncryptInit, s, &mut m, key), CKR_OK);
    let mut n: CK_ULONG = 32;
    assert_rv!(
        ck!(
            f(),
            C_Encrypt,
            s,
            d16.as_mut_ptr(),
            16,
            out.as_mut_ptr(),
            &mut n
        ),
        CKR_OK
    );
    assert_eq!(n, 16);
}

#[test]
#[serial]
fn init_checks_key_usage() {
    let (_init, _slot, s) = setup();
    // An AES key that may encrypt but not decrypt.
    let mut t = Template::default()
        .ulong(CKA_CLASS, CKO_SECRET_KEY)
        .ulong(CKA_KEY_TYPE, CKK_AES)
        .ulong(CKA_VALUE_LEN, 32)
        .boolean(CKA_TOKEN, false)
        .boolean(CKA_SENSITIVE, true)
        .boolean(CKA_ENCRYPT, true)
        .boolean(CKA_DECRYPT, false);
    let mut a = t.raw();
    let mut m = mech(CKM_AES_KEY_GEN);
    let mut key: CK_OBJECT_HANDLE = 0;
    assert_rv!(
        ck!(
            f(),
            C_GenerateKey,
            s,
            &mut m,
            a.as_mut_ptr(),
            a.len() as CK_ULONG,
            &mut key
        ),
        CKR_OK
    );
    let mut iv = [0u8; 16];
    let mut m = mech_with(CKM_AES_CBC_PAD, &mut iv, 16);
    // The refusal comes from C_DecryptInit itself, not later from C_Decrypt.
    assert_rv!(
        ck!(f(), C_DecryptInit, s, &mut m, key),
        CKR_KEY_FUNCTION_NOT_PERMITTED,
        "C_DecryptInit with CKA_DECRYPT=FALSE"
    );
    let mut ct = [0u8; 16];
    let mut out = [0u8; 16];
    let mut n: CK_ULONG = 16;
    assert_rv!(
        ck!(
            f(),
            C_Decrypt,
            s,
            ct.as_mut_ptr(),
            16,
            out.as_mut_ptr(),
            &mut n
        ),
        CKR_OPERATION_NOT_INITIALIZED
    );
    assert_rv!(ck!(f(), C_EncryptInit, s, &mut m, key), CKR_OK);
    let mut pt = [0u8; 16];
    let mut out = [0u8; 32];
    let mut n: CK_ULONG = 32;
    assert_rv!(
        ck!(
            f(),
            C_Encrypt,
            s,
            pt.as_mut_ptr(),
            16,
            out.as_mut_ptr(),
            &mut n
        ),
        CKR_OK
    );
    // An EC public key cannot sign.
    let (public, _private) = ec_key_pair(s);
    let mut m = mech(CKM_ECDSA);
    let rv = ck!(f(), C_SignInit, s, &mut m, public);
    assert!(
        rv == CKR_KEY_TYPE_INCONSISTENT || rv == CKR_KEY_FUNCTION_NOT_PERMITTED,
        "C_SignInit with a public key: {}",
        common::rv_name(rv)
    );
}

#[test]
#[serial]
fn find_objects_states_and_arguments() {
    let (_init, _slot, s) = setup();
    let key = aes_key(s, "abi-find");
    let mut found = [0 as CK_OBJECT_HANDLE; 4];
    let mut n: CK_ULONG = 0;
    assert_rv!(
        ck!(f(), C_FindObjects, s, found.as_mut_ptr(), 4, &mut n),
        CKR_OPERATION_NOT_INITIALIZED
    );
    assert_rv!(
        ck!(f(), C_FindObjectsFinal, s),
        CKR_OPERATION_NOT_INITIALIZED
    );
    let mut t = Template::default().bytes(CKA_LABEL, b"abi-find");
    let mut attrs = t.raw();
    assert_rv!(
        ck!(f(), C_FindObjectsInit, s, ptr::null_mut(), 1),
        CKR_ARGUMENTS_BAD
    );
    assert_rv!(
        ck!(f(), C_FindObjectsInit, s, attrs.as_mut_ptr(), 1),
        CKR_OK
    );
    assert_rv!(
        ck!(f(), C_FindObjectsInit, s, attrs.as_mut_ptr(), 1),
        CKR_OPERATION_ACTIVE
    );
    assert_rv!(
        ck!(
            f(),
            C_FindObjects,
            s,
            found.as_mut_ptr(),
            4,
            ptr::null_mut()
        ),
        CKR_ARGUMENTS_BAD
    );
    // One at a time: the key, then nothing more.
    assert_rv!(
        ck!(f(), C_FindObjects, s, found.as_mut_ptr(), 1, &mut n),
        CKR_OK
    );
    assert_eq!((n, found[0]), (1, key));
    assert_rv!(
        ck!(f(), C_FindObjects, s, found.as_mut_ptr(), 4, &mut n),
        CKR_OK
    );
    assert_eq!(n, 0);
    assert_rv!(ck!(f(), C_FindObjectsFinal, s), CKR_OK);
    assert_rv!(
        ck!(f(), C_FindObjectsFinal, s),
        CKR_OPERATION_NOT_INITIALIZED
    );
    // An empty template (count 0, NULL) finds every visible object, the key included.
    assert_rv!(ck!(f(), C_FindObjectsInit, s, ptr::null_mut(), 0), CKR_OK);
    let mut all = vec![0 as CK_OBJECT_HANDLE; 256];
    assert_rv!(
        ck!(f(), C_FindObjects, s, all.as_mut_ptr(), 256, &mut n),
        CKR_OK
    );
    assert_rv!(ck!(f(), C_FindObjectsFinal, s), CKR_OK);
    all.truncate(n as usize);
    assert!(all.contains(&key));
    assert!(!all.contains(&0));
    // Object size of the key is answered or explicitly unavailable.
    let mut size: CK_ULONG = 0;
    let rv = ck!(f(), C_GetObjectSize, s, key, &mut size);
    assert!(
        rv == CKR_OK || rv == CKR_FUNCTION_NOT_SUPPORTED,
        "C_GetObjectSize: {}",
        common::rv_name(rv)
    );
    assert_rv!(
        ck!(f(), C_GetObjectSize, s, key, ptr::null_mut()),
        CKR_ARGUMENTS_BAD
    );
}

#[test]
#[serial]
fn wrap_key_two_call_convention() {
    let (_init, _slot, s) = setup();
    let mut kek_t = Template::default()
        .ulong(CKA_CLASS, CKO_SECRET_KEY)
        .ulong(CKA_KEY_TYPE, CKK_AES)
        .ulong(CKA_VALUE_LEN, 32)
        .boolean(CKA_TOKEN, true)
        .boolean(CKA_PRIVATE, true)
        .boolean(CKA_SENSITIVE, true)
        .boolean(CKA_EXTRACTABLE, false)
        .boolean(CKA_WRAP, true)
        .boolean(CKA_UNWRAP, true)
        .bytes(CKA_LABEL, b"abi-kek");
    let mut dek_t = Template::default()
        .ulong(CKA_CLASS, CKO_SECRET_KEY)
        .ulong(CKA_KEY_TYPE, CKK_AES)
        .ulong(CKA_VALUE_LEN, 32)
        .boolean(CKA_TOKEN, false)
        .boolean(CKA_SENSITIVE, true)
        .boolean(CKA_EXTRACTABLE, true)
        .boolean(CKA_ENCRYPT, true)
        .boolean(CKA_DECRYPT, true)
        .bytes(CKA_LABEL, b"abi-dek");
    let mut keys = [0 as CK_OBJECT_HANDLE; 2];
    for (i, t) in [&mut kek_t, &mut dek_t].into_iter().enumerate() {
        let mut a = t.raw();
        let mut m = mech(CKM_AES_KEY_GEN);
        assert_rv!(
            ck!(
                f(),
                C_GenerateKey,
                s,
                &mut m,
                a.as_mut_ptr(),
                a.len() as CK_ULONG,
                &mut keys[i]
            ),
            CKR_OK
        );
    }
    let [kek, dek] = keys;
    // AES-KWP where the token has it, else AES-KW: both make 40 bytes of a 32-byte key.
    let mut m = mech(if common::token_has_kwp() {
        CKM_AES_KEY_WRAP_PAD
    } else {
        CKM_AES_KEY_WRAP
    });
    let mut n: CK_ULONG = 0;
    assert_rv!(
        ck!(f(), C_WrapKey, s, &mut m, kek, dek, ptr::null_mut(), &mut n),
        CKR_OK,
        "size query"
    );
    assert_eq!(n, 40);
    let mut blob = [0xEEu8; 64];
    let mut short: CK_ULONG = 39;
    assert_rv!(
        ck!(
            f(),
            C_WrapKey,
            s,
            &mut m,
            kek,
            dek,
            blob.as_mut_ptr(),
            &mut short
        ),
        CKR_BUFFER_TOO_SMALL
    );
    assert_eq!(short, 40);
    assert!(
        blob[39..].iter().all(|&b| b == 0xEE),
        "written past the buffer"
    );
    let mut n: CK_ULONG = 64;
    assert_rv!(
        ck!(
            f(),
            C_WrapKey,
            s,
            &mut m,
            kek,
            dek,
            blob.as_mut_ptr(),
            &mut n
        ),
        CKR_OK
    );
    assert_eq!(n, 40);
    // The blob unwraps.
    let mut ut = Template::default()
        .ulong(CKA_CLASS, CKO_SECRET_KEY)
        .ulong(CKA_KEY_TYPE, CKK_AES)
        .boolean(CKA_TOKEN, false)
        .boolean(CKA_ENCRYPT, true)
        .boolean(CKA_DECRYPT, true);
    let mut ua = ut.raw();
    let mut unwrapped: CK_OBJECT_HANDLE = 0;
    assert_rv!(
        ck!(
            f(),
            C_UnwrapKey,
            s,
            &mut m,
            kek,
            blob.as_mut_ptr(),
            40,
            ua.as_mut_ptr(),
            ua.len() as CK_ULONG,
            &mut unwrapped
        ),
        CKR_OK
    );
    assert_ne!(unwrapped, 0);
    assert_ne!(unwrapped, dek);
    // NULL out-pointer for the new handle.
    assert_rv!(
        ck!(
            f(),
            C_UnwrapKey,
            s,
            &mut m,
            kek,
            blob.as_mut_ptr(),
            40,
            ua.as_mut_ptr(),
            ua.len() as CK_ULONG,
            ptr::null_mut()
        ),
        CKR_ARGUMENTS_BAD
    );
}
