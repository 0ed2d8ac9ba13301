//! The function tables of client mode: the same PKCS#11 ABI, each call converted into a
//! [`Request`] for `cmkp11d` ([`crate::service::client`]) and its [`Reply`] written back
//! into the application's buffers with the two-call convention.
//!
//! The getters ([`super::exports`]) hand these tables out instead of the library's when
//! the process runs in client mode, so library mode runs exactly its own code (no branch
//! on the mode in any entry point).

#![allow(non_snake_case)]

use super::{args, entry, guard};
use crate::error::{err, Error, Result};
use crate::service::client::{self, Client, Kept};
use crate::service::proto::{Attr, DataCall, Mech, Op, Reply, Request};
use cryptoki_sys::*;
use std::ptr;

fn c() -> Result<&'static Client> {
    client::current().map_err(Error::Rv)
}

fn call(req: &Request) -> Result<Reply> {
    c()?.call(req).map_err(Error::Rv)
}

fn unit(req: &Request) -> Result<()> {
    match call(req)? {
        Reply::Rv(CKR_OK) => Ok(()),
        Reply::Rv(rv) => err(rv),
        _ => err(CKR_DEVICE_ERROR),
    }
}

fn handle(req: &Request) -> Result<CK_ULONG> {
    match call(req)? {
        Reply::Handle(h) => Ok(h),
        Reply::Rv(CKR_OK) => err(CKR_DEVICE_ERROR),
        Reply::Rv(rv) => err(rv),
        _ => err(CKR_DEVICE_ERROR),
    }
}

fn fail<T>(r: Reply) -> Result<T> {
    match r {
        Reply::Rv(rv) if rv != CKR_OK => err(rv),
        _ => err(CKR_DEVICE_ERROR),
    }
}

/// Copies a blank-padded text field.
fn text(dst: &mut [u8], src: &[u8]) {
    dst.fill(b' ');
    let n = dst.len().min(src.len());
    dst[..n].copy_from_slice(&src[..n]);
}

fn version((major, minor): (u8, u8)) -> CK_VERSION {
    CK_VERSION { major, minor }
}

/// The application's template as owned attributes.
///
/// # Safety
/// `p` NULL or valid for `n` attributes whose values are valid for their lengths.
unsafe fn template(p: *mut CK_ATTRIBUTE, n: CK_ULONG) -> Result<Vec<Attr>> {
    // SAFETY: forwarded contract.
    let raw = unsafe { args::raw_template(p, n)? };
    raw.iter()
        .map(|a| {
            // One read of the attribute (its fields are not read again).
            // SAFETY: an element of the application's array (contract).
            let a: CK_ATTRIBUTE = unsafe { ptr::read_volatile(a) };
            let value = if a.pValue.is_null() {
                if a.ulValueLen != 0 {
                    return err(CKR_ATTRIBUTE_VALUE_INVALID);
                }
                None
            } else {
                // SAFETY: the application's value, valid for its length (contract).
                Some(unsafe { args::bytes(a.pValue as *const u8, a.ulValueLen)? }.to_vec())
            };
            Ok(Attr { ty: a.type_, value })
        })
        .collect()
}

/// The application's mechanism (NULL: `None`), parsed and length-checked as in library
/// mode.
///
/// # Safety
/// `p` NULL or a valid `CK_MECHANISM`.
unsafe fn mechanism(s: CK_SESSION_HANDLE, p: *mut CK_MECHANISM) -> Result<Option<Mech>> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: forwarded contract.
    match unsafe { args::mechanism(p) } {
        Ok(m) => Ok(Some(m.into())),
        // A bad session handle comes before a bad mechanism, as in library mode (one more
        // round trip, on the error path only).
        Err(e) => match call(&Request::GetSessionInfo(s))? {
            Reply::Rv(rv) if rv != CKR_OK => err(rv),
            _ => Err(e),
        },
    }
}

/// Writes `data` with the two-call convention; a length query or a buffer too small keeps
/// the output for the collecting call.
///
/// # Safety
/// `len` valid; `out` NULL or valid for `*len` bytes.
unsafe fn deliver(
    s: CK_SESSION_HANDLE,
    what: Kept,
    input: &[u8],
    data: Vec<u8>,
    out: *mut u8,
    len: *mut CK_ULONG,
) -> Result<()> {
    // SAFETY: forwarded contract.
    let len = unsafe { args::out(len)? };
    let have = *len as usize;
    *len = data.len() as CK_ULONG;
    if out.is_null() {
        c()?.keep(s, what, input, data);
        return Ok(());
    }
    if have < data.len() {
        c()?.keep(s, what, input, data);
        return err(CKR_BUFFER_TOO_SMALL);
    }
    // SAFETY: `out` holds `have >= data.len()` bytes (contract); `data` is ours.
    unsafe { ptr::copy_nonoverlapping(data.as_ptr(), out, data.len()) };
    Ok(())
}

/// A data call with output: one round trip, or none when the output was kept.
///
/// # Safety
/// PKCS#11 contract of the call.
unsafe fn data_out(
    name: &'static str,
    s: CK_SESSION_HANDLE,
    dc: DataCall,
    input: *const u8,
    input_len: CK_ULONG,
    out: *mut u8,
    len: *mut CK_ULONG,
) -> CK_RV {
    guard(name, || {
        // SAFETY: forwarded contract.
        let input = unsafe { args::bytes(input, input_len)? };
        if len.is_null() {
            return err(CKR_ARGUMENTS_BAD);
        }
        let what = Kept::Data(dc);
        let data = match c()?.kept(s, what, input) {
            Some(d) => d,
            None => {
                let hint = if out.is_null() {
                    input.len() as u64 + 512
                } else {
                    // SAFETY: checked non-null above; valid (contract).
                    unsafe { *len }
                };
                match call(&Request::Data {
                    call: dc,
                    session: s,
                    input: input.to_vec(),
                    extra: Vec::new(),
                    hint,
                })? {
                    Reply::Bytes(v) => v,
                    r => return fail(r),
                }
            }
        };
        // SAFETY: forwarded contract.
        unsafe { deliver(s, what, input, data, out, len) }
    })
}

/// A data call without output.
///
/// # Safety
/// `input`/`extra` NULL with length 0 or valid for their lengths.
unsafe fn data_in(
    name: &'static str,
    s: CK_SESSION_HANDLE,
    dc: DataCall,
    input: (*const u8, CK_ULONG),
    extra: (*const u8, CK_ULONG),
) -> CK_RV {
    guard(name, || {
        // SAFETY: forwarded contract.
        let input = unsafe { args::bytes(input.0, input.1)? }.to_vec();
        // SAFETY: forwarded contract.
        let extra = unsafe { args::bytes(extra.0, extra.1)? }.to_vec();
        unit(&Request::Data {
            call: dc,
            session: s,
            input,
            extra,
            hint: 0,
        })
    })
}

/// `C_*Init`.
///
/// # Safety
/// `mech` NULL or valid.
unsafe fn init(
    name: &'static str,
    op: Op,
    s: CK_SESSION_HANDLE,
    mech: *mut CK_MECHANISM,
    key: CK_OBJECT_HANDLE,
) -> CK_RV {
    guard(name, || {
        // SAFETY: forwarded contract.
        let parsed = unsafe { mechanism(s, mech)? };
        c()?.forget(s);
        match call(&Request::Init {
            op,
            session: s,
            mech: parsed,
            key,
        })? {
            Reply::Rv(CKR_OK) => Ok(()),
            Reply::Rv(rv) => err(rv),
            // The IV cmkp11 chose (an encryption under a CMK): written into the
            // application's parameter, as in library mode.
            Reply::Bytes(iv) => {
                // SAFETY: the application's mechanism, parsed above (contract); its IV
                // buffer is as long as the IV the daemon returns (checked there).
                let m =
                    unsafe { args::read_mechanism(mech) }.ok_or(Error::Rv(CKR_ARGUMENTS_BAD))?;
                // SAFETY: as above.
                unsafe { args::iv_out(&m, iv.len())? }.copy_from_slice(&iv);
                Ok(())
            }
            _ => err(CKR_DEVICE_ERROR),
        }
    })
}

/// `C_Initialize` (client mode).
///
/// # Safety
/// `a` NULL or a valid `CK_C_INITIALIZE_ARGS`.
pub unsafe extern "C" fn C_Initialize(a: CK_VOID_PTR) -> CK_RV {
    guard("C_Initialize", || {
        // SAFETY: NULL or a valid CK_C_INITIALIZE_ARGS (contract).
        if let Some(a) = unsafe { (a as *const CK_C_INITIALIZE_ARGS).as_ref() } {
            if !a.pReserved.is_null() {
                return err(CKR_ARGUMENTS_BAD);
            }
            let some = a.CreateMutex.is_some() as u8
                + a.DestroyMutex.is_some() as u8
                + a.LockMutex.is_some() as u8
                + a.UnlockMutex.is_some() as u8;
            if some != 0 && some != 4 {
                return err(CKR_ARGUMENTS_BAD);
            }
            if some == 4 && a.flags & CKF_OS_LOCKING_OK == 0 {
                return err(CKR_CANT_LOCK);
            }
        }
        client::initialize().map_err(Error::Rv)
    })
}

/// `C_Finalize` (client mode).
pub extern "C" fn C_Finalize(p: CK_VOID_PTR) -> CK_RV {
    guard("C_Finalize", || {
        if !p.is_null() {
            return err(CKR_ARGUMENTS_BAD);
        }
        client::finalize().map_err(Error::Rv)
    })
}

/// `C_GetInfo` (client mode).
///
/// # Safety
/// `info` valid for writes.
pub unsafe extern "C" fn C_GetInfo(info: *mut CK_INFO) -> CK_RV {
    guard("C_GetInfo", || {
        // SAFETY: forwarded contract.
        let info = unsafe { args::out(info)? };
        match call(&Request::GetInfo)? {
            Reply::Info(i) => {
                info.cryptokiVersion = version(i.cryptoki);
                text(&mut info.manufacturerID, &i.manufacturer);
                info.flags = i.flags;
                text(&mut info.libraryDescription, &i.description);
                info.libraryVersion = version(i.library);
                Ok(())
            }
            r => fail(r),
        }
    })
}

/// `C_GetSlotList` (client mode).
///
/// # Safety
/// `count` valid; `list` NULL or valid for `*count` ids.
pub unsafe extern "C" fn C_GetSlotList(
    present: CK_BBOOL,
    list: *mut CK_SLOT_ID,
    count: *mut CK_ULONG,
) -> CK_RV {
    guard("C_GetSlotList", || {
        match call(&Request::GetSlotList {
            present: present != 0,
        })? {
            // SAFETY: forwarded contract.
            Reply::Ulongs(v) => unsafe { args::write_list(&v, list, count) },
            r => fail(r),
        }
    })
}

/// `C_GetSlotInfo` (client mode).
///
/// # Safety
/// `info` valid for writes.
pub unsafe extern "C" fn C_GetSlotInfo(slot: CK_SLOT_ID, info: *mut CK_SLOT_INFO) -> CK_RV {
    guard("C_GetSlotInfo", || {
        // SAFETY: forwarded contract.
        let info = unsafe { args::out(info)? };
        match call(&Request::GetSlotInfo(slot))? {
            Reply::SlotInfo(i) => {
                text(&mut info.slotDescription, &i.description);
                text(&mut info.manufacturerID, &i.manufacturer);
                info.flags = i.flags;
                info.hardwareVersion = version(i.hw);
                info.firmwareVersion = version(i.fw);
                Ok(())
            }
            r => fail(r),
        }
    })
}

/// `C_GetTokenInfo` (client mode).
///
/// # Safety
/// `info` valid for writes.
pub unsafe extern "C" fn C_GetTokenInfo(slot: CK_SLOT_ID, info: *mut CK_TOKEN_INFO) -> CK_RV {
    guard("C_GetTokenInfo", || {
        // SAFETY: forwarded contract.
        let info = unsafe { args::out(info)? };
        match call(&Request::GetTokenInfo(slot))? {
            Reply::TokenInfo(i) => {
                text(&mut info.label, &i.label);
                text(&mut info.manufacturerID, &i.manufacturer);
                text(&mut info.model, &i.model);
                text(&mut info.serialNumber, &i.serial);
                info.flags = i.flags;
                let c = i.counts;
                info.ulMaxSessionCount = c[0];
                info.ulSessionCount = c[1];
                info.ulMaxRwSessionCount = c[2];
                info.ulRwSessionCount = c[3];
                info.ulMaxPinLen = c[4];
                info.ulMinPinLen = c[5];
                info.ulTotalPublicMemory = c[6];
                info.ulFreePublicMemory = c[7];
                info.ulTotalPrivateMemory = c[8];
                info.ulFreePrivateMemory = c[9];
                info.hardwareVersion = version(i.hw);
                info.firmwareVersion = version(i.fw);
                text(&mut info.utcTime, &i.time);
                Ok(())
            }
            r => fail(r),
        }
    })
}

/// `C_GetMechanismList` (client mode).
///
/// # Safety
/// `count` valid; `list` NULL or valid for `*count` entries.
pub unsafe extern "C" fn C_GetMechanismList(
    slot: CK_SLOT_ID,
    list: *mut CK_MECHANISM_TYPE,
    count: *mut CK_ULONG,
) -> CK_RV {
    guard("C_GetMechanismList", || {
        match call(&Request::GetMechanismList(slot))? {
            // SAFETY: forwarded contract.
            Reply::Ulongs(v) => unsafe { args::write_list(&v, list, count) },
            r => fail(r),
        }
    })
}

/// `C_GetMechanismInfo` (client mode).
///
/// # Safety
/// `info` valid for writes.
pub unsafe extern "C" fn C_GetMechanismInfo(
    slot: CK_SLOT_ID,
    mech: CK_MECHANISM_TYPE,
    info: *mut CK_MECHANISM_INFO,
) -> CK_RV {
    guard("C_GetMechanismInfo", || {
        // SAFETY: forwarded contract.
        let info = unsafe { args::out(info)? };
        match call(&Request::GetMechanismInfo { slot, mech })? {
            Reply::MechanismInfo { min, max, flags } => {
                info.ulMinKeySize = min;
                info.ulMaxKeySize = max;
                info.flags = flags;
                Ok(())
            }
            r => fail(r),
        }
    })
}

/// `C_InitToken`, `C_InitPIN`, `C_SetPIN`: operators' business, not an application's, in
/// service mode (`CKR_FUNCTION_NOT_SUPPORTED`).
pub extern "C" fn C_InitToken(
    _slot: CK_SLOT_ID,
    _pin: *mut CK_UTF8CHAR,
    _len: CK_ULONG,
    _label: *mut CK_UTF8CHAR,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// See [`C_InitToken`].
pub extern "C" fn C_InitPIN(
    _s: CK_SESSION_HANDLE,
    _pin: *mut CK_UTF8CHAR,
    _len: CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// See [`C_InitToken`].
pub extern "C" fn C_SetPIN(
    _s: CK_SESSION_HANDLE,
    _old: *mut CK_UTF8CHAR,
    _old_len: CK_ULONG,
    _new: *mut CK_UTF8CHAR,
    _new_len: CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// `C_OpenSession` (client mode; notification callbacks are not called).
///
/// # Safety
/// `out` valid for writes.
pub unsafe extern "C" fn C_OpenSession(
    slot: CK_SLOT_ID,
    flags: CK_FLAGS,
    _app: CK_VOID_PTR,
    _notify: CK_NOTIFY,
    out: *mut CK_SESSION_HANDLE,
) -> CK_RV {
    guard("C_OpenSession", || {
        // SAFETY: forwarded contract.
        let out = unsafe { args::out(out)? };
        *out = handle(&Request::OpenSession { slot, flags })?;
        Ok(())
    })
}

/// `C_CloseSession` (client mode).
pub extern "C" fn C_CloseSession(s: CK_SESSION_HANDLE) -> CK_RV {
    guard("C_CloseSession", || {
        c()?.forget(s);
        unit(&Request::CloseSession(s))
    })
}

/// `C_CloseAllSessions` (client mode: this process's sessions of the slot).
pub extern "C" fn C_CloseAllSessions(slot: CK_SLOT_ID) -> CK_RV {
    guard("C_CloseAllSessions", || {
        unit(&Request::CloseAllSessions(slot))
    })
}

/// `C_GetSessionInfo` (client mode).
///
/// # Safety
/// `info` valid for writes.
pub unsafe extern "C" fn C_GetSessionInfo(
    s: CK_SESSION_HANDLE,
    info: *mut CK_SESSION_INFO,
) -> CK_RV {
    guard("C_GetSessionInfo", || {
        // SAFETY: forwarded contract.
        let info = unsafe { args::out(info)? };
        match call(&Request::GetSessionInfo(s))? {
            Reply::SessionInfo {
                slot,
                state,
                flags,
                device_error,
            } => {
                info.slotID = slot;
                info.state = state;
                info.flags = flags;
                info.ulDeviceError = device_error;
                Ok(())
            }
            r => fail(r),
        }
    })
}

/// `C_Login` (client mode): the PIN is the application credential the daemon checks.
///
/// # Safety
/// `pin` NULL with length 0 or valid for `len` bytes.
pub unsafe extern "C" fn C_Login(
    s: CK_SESSION_HANDLE,
    user: CK_USER_TYPE,
    pin: *mut CK_UTF8CHAR,
    len: CK_ULONG,
) -> CK_RV {
    guard("C_Login", || {
        // SAFETY: forwarded contract.
        let pin = zeroize::Zeroizing::new(unsafe { args::bytes(pin, len)? }.to_vec());
        let req = Request::Login {
            session: s,
            user,
            pin: pin.to_vec(),
        };
        let r = unit(&req);
        if let Request::Login { mut pin, .. } = req {
            zeroize::Zeroize::zeroize(&mut pin);
        }
        r
    })
}

/// `C_LoginUser` (v3.0; client mode): no user names; as `C_Login` without one.
///
/// # Safety
/// As for [`C_Login`].
pub unsafe extern "C" fn C_LoginUser(
    s: CK_SESSION_HANDLE,
    user: CK_USER_TYPE,
    pin: *mut CK_UTF8CHAR,
    len: CK_ULONG,
    name: *mut CK_UTF8CHAR,
    name_len: CK_ULONG,
) -> CK_RV {
    if !name.is_null() || name_len != 0 {
        return CKR_ARGUMENTS_BAD;
    }
    // SAFETY: forwarded contract.
    unsafe { C_Login(s, user, pin, len) }
}

/// `C_Logout` (client mode).
pub extern "C" fn C_Logout(s: CK_SESSION_HANDLE) -> CK_RV {
    guard("C_Logout", || unit(&Request::Logout(s)))
}

/// `C_CreateObject` (client mode).
///
/// # Safety
/// PKCS#11 contract.
pub unsafe extern "C" fn C_CreateObject(
    s: CK_SESSION_HANDLE,
    t: *mut CK_ATTRIBUTE,
    n: CK_ULONG,
    out: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    guard("C_CreateObject", || {
        // SAFETY: forwarded contract.
        let out = unsafe { args::out(out)? };
        // SAFETY: forwarded contract.
        let template = unsafe { template(t, n)? };
        *out = handle(&Request::CreateObject {
            session: s,
            template,
        })?;
        Ok(())
    })
}

/// `C_CopyObject` (client mode).
///
/// # Safety
/// PKCS#11 contract.
pub unsafe extern "C" fn C_CopyObject(
    s: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
    t: *mut CK_ATTRIBUTE,
    n: CK_ULONG,
    out: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    guard("C_CopyObject", || {
        // SAFETY: forwarded contract.
        let out = unsafe { args::out(out)? };
        // SAFETY: forwarded contract.
        let template = unsafe { template(t, n)? };
        *out = handle(&Request::CopyObject {
            session: s,
            object,
            template,
        })?;
        Ok(())
    })
}

/// `C_DestroyObject` (client mode).
pub extern "C" fn C_DestroyObject(s: CK_SESSION_HANDLE, object: CK_OBJECT_HANDLE) -> CK_RV {
    guard("C_DestroyObject", || {
        unit(&Request::DestroyObject { session: s, object })
    })
}

/// `C_GetObjectSize` (client mode).
///
/// # Safety
/// `size` valid for writes.
pub unsafe extern "C" fn C_GetObjectSize(
    s: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
    size: *mut CK_ULONG,
) -> CK_RV {
    guard("C_GetObjectSize", || {
        // SAFETY: forwarded contract.
        let size = unsafe { args::out(size)? };
        match call(&Request::GetObjectSize { session: s, object })? {
            Reply::Ulong(n) => {
                *size = n;
                Ok(())
            }
            r => fail(r),
        }
    })
}

/// `C_GetAttributeValue` (client mode): lengths and values as the daemon's runtime wrote
/// them into buffers of the application's sizes.
///
/// # Safety
/// `t` valid for `n` attributes whose non-NULL values are valid for their lengths.
pub unsafe extern "C" fn C_GetAttributeValue(
    s: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
    t: *mut CK_ATTRIBUTE,
    n: CK_ULONG,
) -> CK_RV {
    guard("C_GetAttributeValue", || {
        // SAFETY: forwarded contract.
        let raw = unsafe { args::raw_template(t, n)? };
        let query = raw
            .iter()
            .map(|a| (a.type_, (!a.pValue.is_null()).then_some(a.ulValueLen)))
            .collect();
        let (rv, values) = match call(&Request::GetAttributeValue {
            session: s,
            object,
            query,
        })? {
            Reply::Attributes { rv, values } if values.len() == raw.len() => (rv, values),
            r => return fail(r),
        };
        for (a, (len, value)) in raw.iter_mut().zip(values) {
            match value {
                Some(v) if !a.pValue.is_null() && v.len() <= a.ulValueLen as usize => {
                    // SAFETY: the application's buffer holds `ulValueLen >= v.len()` bytes.
                    unsafe { ptr::copy_nonoverlapping(v.as_ptr(), a.pValue as *mut u8, v.len()) };
                    a.ulValueLen = v.len() as CK_ULONG;
                }
                _ => a.ulValueLen = len,
            }
        }
        if rv == CKR_OK {
            Ok(())
        } else {
            err(rv)
        }
    })
}

/// `C_SetAttributeValue` (client mode).
///
/// # Safety
/// PKCS#11 contract.
pub unsafe extern "C" fn C_SetAttributeValue(
    s: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
    t: *mut CK_ATTRIBUTE,
    n: CK_ULONG,
) -> CK_RV {
    guard("C_SetAttributeValue", || {
        // SAFETY: forwarded contract.
        let template = unsafe { template(t, n)? };
        unit(&Request::SetAttributeValue {
            session: s,
            object,
            template,
        })
    })
}

/// `C_FindObjectsInit` (client mode).
///
/// # Safety
/// PKCS#11 contract.
pub unsafe extern "C" fn C_FindObjectsInit(
    s: CK_SESSION_HANDLE,
    t: *mut CK_ATTRIBUTE,
    n: CK_ULONG,
) -> CK_RV {
    guard("C_FindObjectsInit", || {
        // SAFETY: forwarded contract.
        let template = unsafe { template(t, n)? };
        unit(&Request::FindObjectsInit {
            session: s,
            template,
        })
    })
}

/// `C_FindObjects` (client mode).
///
/// # Safety
/// `out` valid for `max` handles, `count` valid.
pub unsafe extern "C" fn C_FindObjects(
    s: CK_SESSION_HANDLE,
    out: *mut CK_OBJECT_HANDLE,
    max: CK_ULONG,
    count: *mut CK_ULONG,
) -> CK_RV {
    guard("C_FindObjects", || {
        // SAFETY: forwarded contract.
        let count = unsafe { args::out(count)? };
        if out.is_null() && max != 0 {
            return err(CKR_ARGUMENTS_BAD);
        }
        match call(&Request::FindObjects { session: s, max })? {
            Reply::Handles(v) => {
                let n = v.len().min(max as usize);
                if n > 0 {
                    // SAFETY: `out` holds `max >= n` handles (contract).
                    unsafe { ptr::copy_nonoverlapping(v.as_ptr(), out, n) };
                }
                *count = n as CK_ULONG;
                Ok(())
            }
            r => fail(r),
        }
    })
}

/// `C_FindObjectsFinal` (client mode).
pub extern "C" fn C_FindObjectsFinal(s: CK_SESSION_HANDLE) -> CK_RV {
    guard("C_FindObjectsFinal", || unit(&Request::FindObjectsFinal(s)))
}

macro_rules! init_fn {
    ($name:ident, $op:expr) => {
        /// `*Init` (client mode).
        ///
        /// # Safety
        /// `mech` NULL or a valid mechanism.
        pub unsafe extern "C" fn $name(
            s: CK_SESSION_HANDLE,
            mech: *mut CK_MECHANISM,
            key: CK_OBJECT_HANDLE,
        ) -> CK_RV {
            // SAFETY: forwarded contract.
            unsafe { init(stringify!($name), $op, s, mech, key) }
        }
    };
}
init_fn!(C_EncryptInit, Op::Encrypt);
init_fn!(C_DecryptInit, Op::Decrypt);
init_fn!(C_SignInit, Op::Sign);
init_fn!(C_VerifyInit, Op::Verify);

/// `C_DigestInit` (client mode).
///
/// # Safety
/// `mech` NULL or a valid mechanism.
pub unsafe extern "C" fn C_DigestInit(s: CK_SESSION_HANDLE, mech: *mut CK_MECHANISM) -> CK_RV {
    // SAFETY: forwarded contract.
    unsafe { init("C_DigestInit", Op::Digest, s, mech, 0) }
}

macro_rules! single_fn {
    ($name:ident, $dc:expr) => {
        /// Single-part or update call with output (client mode).
        ///
        /// # Safety
        /// PKCS#11 contract.
        pub unsafe extern "C" fn $name(
            s: CK_SESSION_HANDLE,
            input: *mut u8,
            input_len: CK_ULONG,
            out: *mut u8,
            len: *mut CK_ULONG,
        ) -> CK_RV {
            // SAFETY: forwarded contract.
            unsafe { data_out(stringify!($name), s, $dc, input, input_len, out, len) }
        }
    };
}
single_fn!(C_Encrypt, DataCall::Encrypt);
single_fn!(C_EncryptUpdate, DataCall::EncryptUpdate);
single_fn!(C_Decrypt, DataCall::Decrypt);
single_fn!(C_DecryptUpdate, DataCall::DecryptUpdate);
single_fn!(C_Digest, DataCall::Digest);
single_fn!(C_Sign, DataCall::Sign);

macro_rules! final_fn {
    ($name:ident, $dc:expr) => {
        /// Final call with output (client mode).
        ///
        /// # Safety
        /// PKCS#11 contract.
        pub unsafe extern "C" fn $name(
            s: CK_SESSION_HANDLE,
            out: *mut u8,
            len: *mut CK_ULONG,
        ) -> CK_RV {
            // SAFETY: forwarded contract.
            unsafe { data_out(stringify!($name), s, $dc, ptr::null(), 0, out, len) }
        }
    };
}
final_fn!(C_EncryptFinal, DataCall::EncryptFinal);
final_fn!(C_DecryptFinal, DataCall::DecryptFinal);
final_fn!(C_DigestFinal, DataCall::DigestFinal);
final_fn!(C_SignFinal, DataCall::SignFinal);

macro_rules! update_fn {
    ($name:ident, $dc:expr) => {
        /// Update call without output (client mode).
        ///
        /// # Safety
        /// PKCS#11 contract.
        pub unsafe extern "C" fn $name(s: CK_SESSION_HANDLE, p: *mut u8, n: CK_ULONG) -> CK_RV {
            // SAFETY: forwarded contract.
            unsafe { data_in(stringify!($name), s, $dc, (p, n), (ptr::null(), 0)) }
        }
    };
}
update_fn!(C_DigestUpdate, DataCall::DigestUpdate);
update_fn!(C_SignUpdate, DataCall::SignUpdate);
update_fn!(C_VerifyUpdate, DataCall::VerifyUpdate);

/// `C_Verify` (client mode).
///
/// # Safety
/// PKCS#11 contract.
pub unsafe extern "C" fn C_Verify(
    s: CK_SESSION_HANDLE,
    data: *mut u8,
    data_len: CK_ULONG,
    sig: *mut u8,
    sig_len: CK_ULONG,
) -> CK_RV {
    // SAFETY: forwarded contract.
    unsafe {
        data_in(
            "C_Verify",
            s,
            DataCall::Verify,
            (data, data_len),
            (sig, sig_len),
        )
    }
}

/// `C_VerifyFinal` (client mode).
///
/// # Safety
/// PKCS#11 contract.
pub unsafe extern "C" fn C_VerifyFinal(
    s: CK_SESSION_HANDLE,
    sig: *mut u8,
    sig_len: CK_ULONG,
) -> CK_RV {
    // SAFETY: forwarded contract.
    unsafe {
        data_in(
            "C_VerifyFinal",
            s,
            DataCall::VerifyFinal,
            (ptr::null(), 0),
            (sig, sig_len),
        )
    }
}

/// `C_DigestKey` (client mode).
pub extern "C" fn C_DigestKey(s: CK_SESSION_HANDLE, key: CK_OBJECT_HANDLE) -> CK_RV {
    guard("C_DigestKey", || {
        unit(&Request::DigestKey { session: s, key })
    })
}

/// `C_GenerateKey` (client mode).
///
/// # Safety
/// PKCS#11 contract.
pub unsafe extern "C" fn C_GenerateKey(
    s: CK_SESSION_HANDLE,
    mech: *mut CK_MECHANISM,
    t: *mut CK_ATTRIBUTE,
    n: CK_ULONG,
    out: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    guard("C_GenerateKey", || {
        // SAFETY: forwarded contract.
        let out = unsafe { args::out(out)? };
        // SAFETY: forwarded contract.
        let mech = unsafe { mechanism(s, mech)? };
        // SAFETY: forwarded contract.
        let template = unsafe { template(t, n)? };
        *out = handle(&Request::GenerateKey {
            session: s,
            mech,
            template,
        })?;
        Ok(())
    })
}

/// `C_GenerateKeyPair` (client mode).
///
/// # Safety
/// PKCS#11 contract.
pub unsafe extern "C" fn C_GenerateKeyPair(
    s: CK_SESSION_HANDLE,
    mech: *mut CK_MECHANISM,
    pt: *mut CK_ATTRIBUTE,
    pn: CK_ULONG,
    qt: *mut CK_ATTRIBUTE,
    qn: CK_ULONG,
    public: *mut CK_OBJECT_HANDLE,
    private: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    guard("C_GenerateKeyPair", || {
        // SAFETY: forwarded contract.
        let public = unsafe { args::out(public)? };
        // SAFETY: forwarded contract.
        let private = unsafe { args::out(private)? };
        // SAFETY: forwarded contract.
        let mech = unsafe { mechanism(s, mech)? };
        // SAFETY: forwarded contract.
        let (pt, qt) = unsafe { (template(pt, pn)?, template(qt, qn)?) };
        match call(&Request::GenerateKeyPair {
            session: s,
            mech,
            public: pt,
            private: qt,
        })? {
            Reply::Pair(a, b) => {
                *public = a;
                *private = b;
                Ok(())
            }
            r => fail(r),
        }
    })
}

/// `C_WrapKey` (client mode): one round trip; a length query keeps the blob.
///
/// # Safety
/// PKCS#11 contract.
pub unsafe extern "C" fn C_WrapKey(
    s: CK_SESSION_HANDLE,
    mech: *mut CK_MECHANISM,
    wrapping: CK_OBJECT_HANDLE,
    key: CK_OBJECT_HANDLE,
    out: *mut u8,
    len: *mut CK_ULONG,
) -> CK_RV {
    guard("C_WrapKey", || {
        if len.is_null() {
            return err(CKR_ARGUMENTS_BAD);
        }
        // SAFETY: forwarded contract.
        let mech = unsafe { mechanism(s, mech)? };
        let what = Kept::Wrap(wrapping, key);
        let data = match c()?.kept(s, what, &[]) {
            Some(d) => d,
            None => match call(&Request::WrapKey {
                session: s,
                mech,
                wrapping,
                key,
            })? {
                Reply::Bytes(v) => v,
                r => return fail(r),
            },
        };
        // SAFETY: forwarded contract.
        unsafe { deliver(s, what, &[], data, out, len) }
    })
}

/// `C_UnwrapKey` (client mode).
///
/// # Safety
/// PKCS#11 contract.
pub unsafe extern "C" fn C_UnwrapKey(
    s: CK_SESSION_HANDLE,
    mech: *mut CK_MECHANISM,
    unwrapping: CK_OBJECT_HANDLE,
    blob: *mut u8,
    blob_len: CK_ULONG,
    t: *mut CK_ATTRIBUTE,
    n: CK_ULONG,
    out: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    guard("C_UnwrapKey", || {
        // SAFETY: forwarded contract.
        let out = unsafe { args::out(out)? };
        // SAFETY: forwarded contract.
        let mech = unsafe { mechanism(s, mech)? };
        // SAFETY: forwarded contract.
        let blob = unsafe { args::bytes(blob, blob_len)? }.to_vec();
        // SAFETY: forwarded contract.
        let template = unsafe { template(t, n)? };
        *out = handle(&Request::UnwrapKey {
            session: s,
            mech,
            unwrapping,
            blob,
            template,
        })?;
        Ok(())
    })
}

/// `C_DeriveKey` (client mode).
///
/// # Safety
/// PKCS#11 contract.
pub unsafe extern "C" fn C_DeriveKey(
    s: CK_SESSION_HANDLE,
    mech: *mut CK_MECHANISM,
    base: CK_OBJECT_HANDLE,
    t: *mut CK_ATTRIBUTE,
    n: CK_ULONG,
    out: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    guard("C_DeriveKey", || {
        // SAFETY: forwarded contract.
        let out = unsafe { args::out(out)? };
        // SAFETY: forwarded contract.
        let mech = unsafe { mechanism(s, mech)? };
        // SAFETY: forwarded contract.
        let template = unsafe { template(t, n)? };
        *out = handle(&Request::DeriveKey {
            session: s,
            mech,
            base,
            template,
        })?;
        Ok(())
    })
}

/// `C_SeedRandom` (client mode).
///
/// # Safety
/// `seed` valid for `len` bytes.
pub unsafe extern "C" fn C_SeedRandom(s: CK_SESSION_HANDLE, seed: *mut u8, len: CK_ULONG) -> CK_RV {
    guard("C_SeedRandom", || {
        // SAFETY: forwarded contract.
        let seed = unsafe { args::bytes(seed, len)? }.to_vec();
        unit(&Request::SeedRandom { session: s, seed })
    })
}

/// `C_GenerateRandom` (client mode).
///
/// # Safety
/// `out` valid for `len` bytes.
pub unsafe extern "C" fn C_GenerateRandom(
    s: CK_SESSION_HANDLE,
    out: *mut u8,
    len: CK_ULONG,
) -> CK_RV {
    guard("C_GenerateRandom", || {
        // SAFETY: forwarded contract.
        let out = unsafe { args::bytes_mut(out, len)? };
        match call(&Request::GenerateRandom { session: s, len })? {
            Reply::Bytes(v) if v.len() == out.len() => {
                out.copy_from_slice(&v);
                Ok(())
            }
            r => fail(r),
        }
    })
}

/// `C_GetFunctionStatus`: legacy (`CKR_FUNCTION_NOT_PARALLEL`).
pub extern "C" fn C_GetFunctionStatus(_s: CK_SESSION_HANDLE) -> CK_RV {
    CKR_FUNCTION_NOT_PARALLEL
}

/// `C_CancelFunction`: legacy (`CKR_FUNCTION_NOT_PARALLEL`).
pub extern "C" fn C_CancelFunction(_s: CK_SESSION_HANDLE) -> CK_RV {
    CKR_FUNCTION_NOT_PARALLEL
}

/// `C_WaitForSlotEvent`: not supported in client mode.
pub extern "C" fn C_WaitForSlotEvent(
    _f: CK_FLAGS,
    _slot: *mut CK_SLOT_ID,
    _r: CK_VOID_PTR,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

/// `C_SessionCancel`: not supported in client mode.
pub extern "C" fn C_SessionCancel(_s: CK_SESSION_HANDLE, _f: CK_FLAGS) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

use super::exports::{C_GetFunctionList, C_GetInterface, C_GetInterfaceList};
use entry::{
    C_DecryptDigestUpdate, C_DecryptMessage, C_DecryptMessageBegin, C_DecryptMessageNext,
    C_DecryptVerifyUpdate, C_DigestEncryptUpdate, C_EncryptMessage, C_EncryptMessageBegin,
    C_EncryptMessageNext, C_GetOperationState, C_MessageDecryptFinal, C_MessageDecryptInit,
    C_MessageEncryptFinal, C_MessageEncryptInit, C_MessageSignFinal, C_MessageSignInit,
    C_MessageVerifyFinal, C_MessageVerifyInit, C_SetOperationState, C_SignEncryptUpdate,
    C_SignMessage, C_SignMessageBegin, C_SignMessageNext, C_SignRecover, C_SignRecoverInit,
    C_VerifyMessage, C_VerifyMessageBegin, C_VerifyMessageNext, C_VerifyRecover,
    C_VerifyRecoverInit,
};

use super::tables::{function_tables, with_function_names};

with_function_names!(function_tables!(
    CLIENT_LIST_2_40,
    CLIENT_LIST_3_0,
    " of client mode",
));
