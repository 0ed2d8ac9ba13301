//! The daemon side of a call: runs a [`Request`] through cmkp11's own PKCS#11 function
//! table, in the daemon's process, so that service mode and library mode share one
//! runtime, one policy and one audit path.
//!
//! This module owns the raw buffers of those in-process calls (the only `unsafe` code of
//! the service). Everything it passes is built here from owned, typed values: mechanism
//! parameters are rebuilt from [`Param`], and template values that would carry pointers
//! (nested templates) are refused before any call, so nothing a client sends is ever used
//! as an address.
//!
//! Outputs are produced whole: the daemon calls with a buffer of the expected size and,
//! on `CKR_BUFFER_TOO_SMALL`, once more with the size the runtime asked for (the
//! operation stays active in between), so the client gets the result in one round trip
//! and serves the application's two-call convention itself.

use crate::ffi::tables::FUNCTION_LIST_3_0 as F;
use crate::service::proto::{
    Attr, DataCall, Info, Mech, Op, Param, Reply, Request, SlotInfo, TokenInfo, MAX_OUTPUT,
};
use cryptoki_sys::*;
use std::ptr;

macro_rules! call {
    ($f:ident $(, $a:expr)* $(,)?) => {{
        match F.$f {
            // SAFETY: cmkp11's own entry point, with arguments built by this module: every
            // pointer refers to a live local buffer of the length passed beside it.
            Some(f) => unsafe { f($($a),*) },
            None => CKR_FUNCTION_NOT_SUPPORTED,
        }
    }};
}

/// `C_Initialize` of the in-process runtime, with OS locking.
pub fn initialize() -> CK_RV {
    let mut args = CK_C_INITIALIZE_ARGS {
        CreateMutex: None,
        DestroyMutex: None,
        LockMutex: None,
        UnlockMutex: None,
        flags: CKF_OS_LOCKING_OK,
        pReserved: ptr::null_mut(),
    };
    call!(
        C_Initialize,
        (&mut args as *mut CK_C_INITIALIZE_ARGS).cast()
    )
}

/// `C_Finalize` of the in-process runtime.
pub fn finalize() -> CK_RV {
    call!(C_Finalize, ptr::null_mut())
}

/// Whether an attribute type with the array bit holds plain bytes: `CKA_ALLOWED_MECHANISMS`
/// (`CK_MECHANISM_TYPE`s) and cmkp11's own vendor attributes (`CK_ULONG`s, whose type
/// numbers carry that bit as `CKA_VENDOR_DEFINED | 0x434D4B00` does).
fn flat_array(ty: u64) -> bool {
    ty == CKA_ALLOWED_MECHANISMS
        || (crate::vendor::CKA_CMKP11_STATE..=crate::vendor::CKA_CMKP11_ROLE).contains(&ty)
}

/// Whether a template value could hold pointers (a nested template): refused.
fn pointer_attr(a: &Attr) -> bool {
    a.ty & CKF_ARRAY_ATTRIBUTE != 0
        && !flat_array(a.ty)
        && a.value.as_ref().is_some_and(|v| !v.is_empty())
}

/// Checks the templates of a request: `Err(rv)` for a value that could hold a pointer.
pub fn check_templates(req: &Request) -> Result<(), CK_RV> {
    let bad = |t: &[Attr]| t.iter().any(pointer_attr);
    let refused = match req {
        Request::CreateObject { template, .. }
        | Request::CopyObject { template, .. }
        | Request::SetAttributeValue { template, .. }
        | Request::FindObjectsInit { template, .. }
        | Request::GenerateKey { template, .. }
        | Request::UnwrapKey { template, .. }
        | Request::DeriveKey { template, .. } => bad(template),
        Request::GenerateKeyPair {
            public, private, ..
        } => bad(public) || bad(private),
        Request::GetAttributeValue { query, .. } => query
            .iter()
            .any(|(t, l)| t & CKF_ARRAY_ATTRIBUTE != 0 && !flat_array(*t) && l.is_some()),
        _ => false,
    };
    if refused {
        Err(CKR_ATTRIBUTE_VALUE_INVALID)
    } else {
        Ok(())
    }
}

/// Calls `f` with a raw template over `t` (valid during the call).
fn with_template<R>(t: &mut [Attr], f: impl FnOnce(*mut CK_ATTRIBUTE, CK_ULONG) -> R) -> R {
    let mut raw: Vec<CK_ATTRIBUTE> = t
        .iter_mut()
        .map(|a| match &mut a.value {
            Some(v) => CK_ATTRIBUTE {
                type_: a.ty,
                pValue: v.as_mut_ptr().cast(),
                ulValueLen: v.len() as CK_ULONG,
            },
            None => CK_ATTRIBUTE {
                type_: a.ty,
                pValue: ptr::null_mut(),
                ulValueLen: 0,
            },
        })
        .collect();
    let p = if raw.is_empty() {
        ptr::null_mut()
    } else {
        raw.as_mut_ptr()
    };
    f(p, raw.len() as CK_ULONG)
}

/// A buffer as pointer and length. An empty one is a non-NULL pointer with length 0, as
/// applications pass an empty slice: some tokens (SoftHSM2) refuse a NULL data pointer
/// even with a length of 0.
fn len_ptr(v: &mut [u8]) -> (*mut u8, CK_ULONG) {
    (v.as_mut_ptr(), v.len() as CK_ULONG)
}

/// Calls `f` with a raw `CK_MECHANISM` built from `m` (NULL for `None`).
/// The IV of an AES-GCM or AES-CBC mechanism.
fn iv_of(m: &Mech) -> Option<Vec<u8>> {
    match &m.param {
        Param::Gcm { iv, .. } => Some(iv.to_vec()),
        Param::Iv16(iv) => Some(iv.to_vec()),
        _ => None,
    }
}

fn with_mech<R>(m: Option<&mut Mech>, f: impl FnOnce(*mut CK_MECHANISM) -> R) -> R {
    let Some(m) = m else {
        return f(ptr::null_mut());
    };
    let ty = m.ty;
    let mk = |p: *mut std::ffi::c_void, len: usize| CK_MECHANISM {
        mechanism: ty,
        pParameter: p,
        ulParameterLen: len as CK_ULONG,
    };
    fn size<T>(_: &T) -> usize {
        std::mem::size_of::<T>()
    }
    match &mut m.param {
        Param::None => f(&mut mk(ptr::null_mut(), 0)),
        Param::Iv16(iv) => f(&mut mk(iv.as_mut_ptr().cast(), 16)),
        Param::Iv8(iv) => f(&mut mk(iv.as_mut_ptr().cast(), 8)),
        Param::Gcm { iv, aad, tag_bits } => {
            let (piv, liv) = len_ptr(iv);
            let (paad, laad) = len_ptr(aad);
            let mut g = CK_GCM_PARAMS {
                pIv: piv,
                ulIvLen: liv,
                ulIvBits: liv * 8,
                pAAD: paad,
                ulAADLen: laad,
                ulTagBits: *tag_bits,
            };
            let n = size(&g);
            f(&mut mk((&mut g as *mut CK_GCM_PARAMS).cast(), n))
        }
        Param::Pss { hash, mgf, salt } => {
            let mut p = CK_RSA_PKCS_PSS_PARAMS {
                hashAlg: *hash,
                mgf: *mgf,
                sLen: *salt,
            };
            let n = size(&p);
            f(&mut mk((&mut p as *mut CK_RSA_PKCS_PSS_PARAMS).cast(), n))
        }
        Param::Oaep { hash, mgf, label } => {
            let (pl, ll) = match label {
                Some(l) => len_ptr(l),
                None => (ptr::null_mut(), 0),
            };
            let mut p = CK_RSA_PKCS_OAEP_PARAMS {
                hashAlg: *hash,
                mgf: *mgf,
                source: if label.is_some() {
                    CKZ_DATA_SPECIFIED
                } else {
                    0
                },
                pSourceData: pl.cast(),
                ulSourceDataLen: ll,
            };
            let n = size(&p);
            f(&mut mk((&mut p as *mut CK_RSA_PKCS_OAEP_PARAMS).cast(), n))
        }
        Param::Ecdh1 {
            kdf,
            shared,
            public,
        } => {
            let (ps, ls) = len_ptr(shared);
            let (pp, lp) = len_ptr(public);
            let mut p = CK_ECDH1_DERIVE_PARAMS {
                kdf: *kdf,
                ulSharedDataLen: ls,
                pSharedData: ps,
                ulPublicDataLen: lp,
                pPublicData: pp,
            };
            let n = size(&p);
            f(&mut mk((&mut p as *mut CK_ECDH1_DERIVE_PARAMS).cast(), n))
        }
        Param::Eddsa { prehash, context } => match context {
            None => f(&mut mk(ptr::null_mut(), 0)),
            Some(c) => {
                let (pc, lc) = len_ptr(c);
                let mut p = CK_EDDSA_PARAMS {
                    phFlag: CK_BBOOL::from(*prehash),
                    ulContextDataLen: lc,
                    pContextData: pc,
                };
                let n = size(&p);
                f(&mut mk((&mut p as *mut CK_EDDSA_PARAMS).cast(), n))
            }
        },
    }
}

/// Runs a call with an output buffer: first of `hint` bytes, then, on
/// `CKR_BUFFER_TOO_SMALL`, of the size asked for (at most [`MAX_OUTPUT`]).
fn output(hint: u64, mut f: impl FnMut(*mut u8, *mut CK_ULONG) -> CK_RV) -> Reply {
    let mut cap = (hint as usize).min(MAX_OUTPUT);
    for _ in 0..3 {
        let mut buf = vec![0u8; cap];
        let mut len = cap as CK_ULONG;
        // A non-NULL pointer even for 0 bytes: a NULL one would be a length query.
        let p = if cap == 0 {
            ptr::NonNull::<u8>::dangling().as_ptr()
        } else {
            buf.as_mut_ptr()
        };
        let rv = f(p, &mut len);
        match rv {
            CKR_OK if (len as usize) <= cap => {
                buf.truncate(len as usize);
                return Reply::Bytes(buf);
            }
            CKR_BUFFER_TOO_SMALL if (len as usize) > cap && (len as usize) <= MAX_OUTPUT => {
                cap = len as usize;
            }
            CKR_BUFFER_TOO_SMALL | CKR_OK => return Reply::Rv(CKR_DEVICE_MEMORY),
            rv => return Reply::Rv(rv),
        }
    }
    Reply::Rv(CKR_DEVICE_MEMORY)
}

/// Reads a list with the two-call convention.
fn list<T: Copy + Default>(
    mut f: impl FnMut(*mut T, *mut CK_ULONG) -> CK_RV,
) -> Result<Vec<T>, CK_RV> {
    for _ in 0..4 {
        let mut n: CK_ULONG = 0;
        let rv = f(ptr::null_mut(), &mut n);
        if rv != CKR_OK {
            return Err(rv);
        }
        if n as usize > MAX_OUTPUT / 8 {
            return Err(CKR_DEVICE_MEMORY);
        }
        let mut v = vec![T::default(); n as usize];
        let rv = f(v.as_mut_ptr(), &mut n);
        match rv {
            CKR_OK => {
                v.truncate(n as usize);
                return Ok(v);
            }
            CKR_BUFFER_TOO_SMALL => continue,
            rv => return Err(rv),
        }
    }
    Err(CKR_GENERAL_ERROR)
}

fn ver(v: CK_VERSION) -> (u8, u8) {
    (v.major, v.minor)
}

fn rv_or(rv: CK_RV, ok: impl FnOnce() -> Reply) -> Reply {
    if rv == CKR_OK {
        ok()
    } else {
        Reply::Rv(rv)
    }
}

/// Runs `req` in this process's runtime. The caller (the daemon's server) has checked
/// that the client owns every session and object named, and is logged in where needed.
pub fn execute(req: Request) -> Reply {
    if let Err(rv) = check_templates(&req) {
        return Reply::Rv(rv);
    }
    match req {
        Request::Admin { session, key, call } => {
            use crate::ffi::admin as a;
            use crate::service::proto::AdminCall as C;
            Reply::Rv(match call {
                C::Rotate => a::CMKP11_Rotate(session, key),
                C::Enable => a::CMKP11_Enable(session, key),
                C::Disable => a::CMKP11_Disable(session, key),
                C::ScheduleDeletion(days) => a::CMKP11_ScheduleDeletion(session, key, days),
                C::CancelDeletion => a::CMKP11_CancelDeletion(session, key),
                C::Purge => a::CMKP11_Purge(session),
            })
        }
        Request::GetInfo => {
            let mut i = CK_INFO::default();
            let rv = call!(C_GetInfo, &mut i);
            rv_or(rv, || {
                Reply::Info(Info {
                    cryptoki: ver(i.cryptokiVersion),
                    manufacturer: i.manufacturerID.to_vec(),
                    flags: i.flags,
                    description: i.libraryDescription.to_vec(),
                    library: ver(i.libraryVersion),
                })
            })
        }
        Request::GetSlotList { present } => {
            let present = CK_BBOOL::from(present);
            match list(|p, n| call!(C_GetSlotList, present, p, n)) {
                Ok(v) => Reply::Ulongs(v),
                Err(rv) => Reply::Rv(rv),
            }
        }
        Request::GetSlotInfo(slot) => {
            let mut i = CK_SLOT_INFO::default();
            let rv = call!(C_GetSlotInfo, slot, &mut i);
            rv_or(rv, || {
                Reply::SlotInfo(SlotInfo {
                    description: i.slotDescription.to_vec(),
                    manufacturer: i.manufacturerID.to_vec(),
                    flags: i.flags,
                    hw: ver(i.hardwareVersion),
                    fw: ver(i.firmwareVersion),
                })
            })
        }
        Request::GetTokenInfo(slot) => {
            let mut i = CK_TOKEN_INFO::default();
            let rv = call!(C_GetTokenInfo, slot, &mut i);
            rv_or(rv, || {
                Reply::TokenInfo(TokenInfo {
                    label: i.label.to_vec(),
                    manufacturer: i.manufacturerID.to_vec(),
                    model: i.model.to_vec(),
                    serial: i.serialNumber.to_vec(),
                    flags: i.flags,
                    counts: [
                        i.ulMaxSessionCount,
                        i.ulSessionCount,
                        i.ulMaxRwSessionCount,
                        i.ulRwSessionCount,
                        i.ulMaxPinLen,
                        i.ulMinPinLen,
                        i.ulTotalPublicMemory,
                        i.ulFreePublicMemory,
                        i.ulTotalPrivateMemory,
                        i.ulFreePrivateMemory,
                    ],
                    hw: ver(i.hardwareVersion),
                    fw: ver(i.firmwareVersion),
                    time: i.utcTime.to_vec(),
                })
            })
        }
        Request::GetMechanismList(slot) => {
            match list(|p, n| call!(C_GetMechanismList, slot, p, n)) {
                Ok(v) => Reply::Ulongs(v),
                Err(rv) => Reply::Rv(rv),
            }
        }
        Request::GetMechanismInfo { slot, mech } => {
            let mut i = CK_MECHANISM_INFO::default();
            let rv = call!(C_GetMechanismInfo, slot, mech, &mut i);
            rv_or(rv, || Reply::MechanismInfo {
                min: i.ulMinKeySize,
                max: i.ulMaxKeySize,
                flags: i.flags,
            })
        }
        Request::OpenSession { slot, flags } => {
            let mut h: CK_SESSION_HANDLE = 0;
            let rv = call!(C_OpenSession, slot, flags, ptr::null_mut(), None, &mut h);
            rv_or(rv, || Reply::Handle(h))
        }
        Request::CloseSession(h) => Reply::Rv(call!(C_CloseSession, h)),
        Request::GetSessionInfo(h) => {
            let mut i = CK_SESSION_INFO::default();
            let rv = call!(C_GetSessionInfo, h, &mut i);
            rv_or(rv, || Reply::SessionInfo {
                slot: i.slotID,
                state: i.state,
                flags: i.flags,
                device_error: i.ulDeviceError,
            })
        }
        Request::Login {
            session,
            user,
            mut pin,
        } => {
            let (p, l) = len_ptr(&mut pin);
            let rv = call!(C_Login, session, user, p, l);
            zeroize::Zeroize::zeroize(&mut pin);
            Reply::Rv(rv)
        }
        Request::CreateObject {
            session,
            mut template,
        } => {
            let mut h: CK_OBJECT_HANDLE = 0;
            let rv = with_template(&mut template, |t, n| {
                call!(C_CreateObject, session, t, n, &mut h)
            });
            rv_or(rv, || Reply::Handle(h))
        }
        Request::CopyObject {
            session,
            object,
            mut template,
        } => {
            let mut h: CK_OBJECT_HANDLE = 0;
            let rv = with_template(&mut template, |t, n| {
                call!(C_CopyObject, session, object, t, n, &mut h)
            });
            rv_or(rv, || Reply::Handle(h))
        }
        Request::DestroyObject { session, object } => {
            Reply::Rv(call!(C_DestroyObject, session, object))
        }
        Request::GetObjectSize { session, object } => {
            let mut n: CK_ULONG = 0;
            let rv = call!(C_GetObjectSize, session, object, &mut n);
            rv_or(rv, || Reply::Ulong(n))
        }
        Request::GetAttributeValue {
            session,
            object,
            query,
        } => {
            let total: u64 = query
                .iter()
                .filter_map(|(_, l)| *l)
                .fold(0, u64::saturating_add);
            if total > MAX_OUTPUT as u64 {
                return Reply::Rv(CKR_DEVICE_MEMORY);
            }
            let mut bufs: Vec<Option<Vec<u8>>> = query
                .iter()
                .map(|(_, l)| l.map(|l| vec![0u8; l as usize]))
                .collect();
            let mut raw: Vec<CK_ATTRIBUTE> = query
                .iter()
                .zip(bufs.iter_mut())
                .map(|((t, _), b)| match b {
                    Some(b) => CK_ATTRIBUTE {
                        type_: *t,
                        pValue: if b.is_empty() {
                            ptr::NonNull::<u8>::dangling().as_ptr().cast()
                        } else {
                            b.as_mut_ptr().cast()
                        },
                        ulValueLen: b.len() as CK_ULONG,
                    },
                    None => CK_ATTRIBUTE {
                        type_: *t,
                        pValue: ptr::null_mut(),
                        ulValueLen: 0,
                    },
                })
                .collect();
            let p = if raw.is_empty() {
                ptr::null_mut()
            } else {
                raw.as_mut_ptr()
            };
            let rv = call!(
                C_GetAttributeValue,
                session,
                object,
                p,
                raw.len() as CK_ULONG
            );
            let values = raw
                .iter()
                .zip(bufs)
                .map(|(a, b)| {
                    let v = b.and_then(|mut b| {
                        let n = a.ulValueLen as usize;
                        (a.ulValueLen != CK_UNAVAILABLE_INFORMATION && n <= b.len()).then(|| {
                            b.truncate(n);
                            b
                        })
                    });
                    (a.ulValueLen, v)
                })
                .collect();
            Reply::Attributes { rv, values }
        }
        Request::SetAttributeValue {
            session,
            object,
            mut template,
        } => Reply::Rv(with_template(&mut template, |t, n| {
            call!(C_SetAttributeValue, session, object, t, n)
        })),
        Request::FindObjectsInit {
            session,
            mut template,
        } => Reply::Rv(with_template(&mut template, |t, n| {
            call!(C_FindObjectsInit, session, t, n)
        })),
        Request::FindObjects { session, max } => {
            let max = max.min(4096);
            let mut v = vec![0 as CK_OBJECT_HANDLE; max as usize];
            let mut n: CK_ULONG = 0;
            let p = if v.is_empty() {
                ptr::NonNull::dangling().as_ptr()
            } else {
                v.as_mut_ptr()
            };
            let rv = call!(C_FindObjects, session, p, max, &mut n);
            rv_or(rv, || {
                v.truncate((n as usize).min(max as usize));
                Reply::Handles(v)
            })
        }
        Request::FindObjectsFinal(h) => Reply::Rv(call!(C_FindObjectsFinal, h)),
        Request::Init {
            op,
            session,
            mut mech,
            key,
        } => {
            let before = mech.as_ref().and_then(iv_of);
            let rv = with_mech(mech.as_mut(), |m| match op {
                Op::Encrypt => call!(C_EncryptInit, session, m, key),
                Op::Decrypt => call!(C_DecryptInit, session, m, key),
                Op::Digest => call!(C_DigestInit, session, m),
                Op::Sign => call!(C_SignInit, session, m, key),
                Op::Verify => call!(C_VerifyInit, session, m, key),
            });
            // An IV cmkp11 chose for an encryption under a CMK goes back to the client,
            // which writes it into the application's parameter.
            match mech.as_ref().and_then(iv_of) {
                Some(iv) if rv == CKR_OK && op == Op::Encrypt && Some(&iv) != before.as_ref() => {
                    Reply::Bytes(iv)
                }
                _ => Reply::Rv(rv),
            }
        }
        Request::Data {
            call,
            session,
            mut input,
            mut extra,
            hint,
        } => data(call, session, &mut input, &mut extra, hint),
        Request::DigestKey { session, key } => Reply::Rv(call!(C_DigestKey, session, key)),
        Request::GenerateKey {
            session,
            mut mech,
            mut template,
        } => {
            let mut h: CK_OBJECT_HANDLE = 0;
            let rv = with_mech(mech.as_mut(), |m| {
                with_template(&mut template, |t, n| {
                    call!(C_GenerateKey, session, m, t, n, &mut h)
                })
            });
            rv_or(rv, || Reply::Handle(h))
        }
        Request::GenerateKeyPair {
            session,
            mut mech,
            mut public,
            mut private,
        } => {
            let (mut a, mut b): (CK_OBJECT_HANDLE, CK_OBJECT_HANDLE) = (0, 0);
            let rv = with_mech(mech.as_mut(), |m| {
                with_template(&mut public, |pt, pn| {
                    with_template(&mut private, |qt, qn| {
                        call!(
                            C_GenerateKeyPair,
                            session,
                            m,
                            pt,
                            pn,
                            qt,
                            qn,
                            &mut a,
                            &mut b
                        )
                    })
                })
            });
            rv_or(rv, || Reply::Pair(a, b))
        }
        Request::WrapKey {
            session,
            mut mech,
            wrapping,
            key,
        } => with_mech(mech.as_mut(), |m| {
            output(512, |p, n| {
                call!(C_WrapKey, session, m, wrapping, key, p, n)
            })
        }),
        Request::UnwrapKey {
            session,
            mut mech,
            unwrapping,
            mut blob,
            mut template,
        } => {
            let mut h: CK_OBJECT_HANDLE = 0;
            let (pb, lb) = len_ptr(&mut blob);
            let rv = with_mech(mech.as_mut(), |m| {
                with_template(&mut template, |t, n| {
                    call!(C_UnwrapKey, session, m, unwrapping, pb, lb, t, n, &mut h)
                })
            });
            rv_or(rv, || Reply::Handle(h))
        }
        Request::DeriveKey {
            session,
            mut mech,
            base,
            mut template,
        } => {
            let mut h: CK_OBJECT_HANDLE = 0;
            let rv = with_mech(mech.as_mut(), |m| {
                with_template(&mut template, |t, n| {
                    call!(C_DeriveKey, session, m, base, t, n, &mut h)
                })
            });
            rv_or(rv, || Reply::Handle(h))
        }
        Request::SeedRandom { session, mut seed } => {
            let (p, l) = len_ptr(&mut seed);
            Reply::Rv(call!(C_SeedRandom, session, p, l))
        }
        Request::GenerateRandom { session, len } => {
            if len as usize > MAX_OUTPUT {
                return Reply::Rv(CKR_DEVICE_MEMORY);
            }
            let mut v = vec![0u8; len as usize];
            let (p, l) = len_ptr(&mut v);
            let rv = call!(C_GenerateRandom, session, p, l);
            rv_or(rv, || Reply::Bytes(v))
        }
        // Handled by the server (per-client state), never reach the runtime as such.
        Request::CloseAllSessions(_) | Request::Logout(_) => Reply::Rv(CKR_GENERAL_ERROR),
    }
}

/// A data call of an active operation.
fn data(
    call: DataCall,
    s: CK_SESSION_HANDLE,
    input: &mut [u8],
    extra: &mut [u8],
    hint: u64,
) -> Reply {
    let (pi, li) = len_ptr(input);
    let (pe, le) = len_ptr(extra);
    use DataCall::*;
    match call {
        Encrypt => output(hint, |p, n| call!(C_Encrypt, s, pi, li, p, n)),
        EncryptUpdate => output(hint, |p, n| call!(C_EncryptUpdate, s, pi, li, p, n)),
        EncryptFinal => output(hint, |p, n| call!(C_EncryptFinal, s, p, n)),
        Decrypt => output(hint, |p, n| call!(C_Decrypt, s, pi, li, p, n)),
        DecryptUpdate => output(hint, |p, n| call!(C_DecryptUpdate, s, pi, li, p, n)),
        DecryptFinal => output(hint, |p, n| call!(C_DecryptFinal, s, p, n)),
        Digest => output(hint, |p, n| call!(C_Digest, s, pi, li, p, n)),
        DigestUpdate => Reply::Rv(call!(C_DigestUpdate, s, pi, li)),
        DigestFinal => output(hint, |p, n| call!(C_DigestFinal, s, p, n)),
        Sign => output(hint, |p, n| call!(C_Sign, s, pi, li, p, n)),
        SignUpdate => Reply::Rv(call!(C_SignUpdate, s, pi, li)),
        SignFinal => output(hint, |p, n| call!(C_SignFinal, s, p, n)),
        Verify => Reply::Rv(call!(C_Verify, s, pi, li, pe, le)),
        VerifyUpdate => Reply::Rv(call!(C_VerifyUpdate, s, pi, li)),
        VerifyFinal => Reply::Rv(call!(C_VerifyFinal, s, pe, le)),
    }
}

/// The listening socket systemd passed (socket activation: `LISTEN_PID` is this process
/// and `LISTEN_FDS` is 1), if any. The variables are removed so that no child inherits them.
pub fn systemd_listener() -> Option<std::os::unix::net::UnixListener> {
    use std::os::fd::FromRawFd;
    let pid = std::env::var("LISTEN_PID").ok()?.parse::<u32>().ok()?;
    let fds = std::env::var("LISTEN_FDS").ok()?.parse::<u32>().ok()?;
    std::env::remove_var("LISTEN_PID");
    std::env::remove_var("LISTEN_FDS");
    std::env::remove_var("LISTEN_FDNAMES");
    if pid != std::process::id() || fds != 1 {
        return None;
    }
    // Check that fd 3 is a listening Unix socket before taking ownership of it.
    // SAFETY: fd 3 is the socket systemd passed (sd_listen_fds protocol: LISTEN_PID is
    // this process and LISTEN_FDS is 1); nothing else in this process owns it.
    let l = unsafe { std::os::unix::net::UnixListener::from_raw_fd(3) };
    match rustix::net::sockopt::socket_type(&l) {
        Ok(rustix::net::SocketType::STREAM) => Some(l),
        _ => {
            std::mem::forget(l);
            None
        }
    }
}
