//! Raw arguments into safe values, with every NULL and length checked first.

use crate::backend::mech::{param_kind, Bytes, Mech, Param, ParamKind};
use crate::error::{err, Result};
use crate::policy::templates::{RawAttr, ShortTemplate, SHORT_MAX};
use crate::runtime::session::Delivery;
use cryptoki::object::{Attribute, AttributeType};
use cryptoki_sys::*;
use std::mem::size_of;

/// The largest length any buffer of this process can have: a user address space on
/// 64-bit Linux is at most 2^47 bytes (2^56 with 5-level paging, never handed out unless
/// asked for), so a longer "buffer" is an application error, refused before anything is
/// read or allocated.
pub const MAX_BUFFER: u64 = 1 << 47;

/// The most attributes cmkp11 accepts in one template (real templates have a few dozen).
pub const MAX_TEMPLATE: CK_ULONG = 4096;

/// The longest attribute value cmkp11 copies out of a template.
pub const MAX_VALUE: CK_ULONG = 64 << 20;

/// The longest PIN cmkp11 copies (SoftHSM2 accepts up to 255 bytes).
pub const MAX_PIN: CK_ULONG = 4096;

/// Whether `len` elements of `size` bytes at `p` cannot be a buffer of this process:
/// longer than [`MAX_BUFFER`], or past the end of the address space.
#[inline]
pub fn absurd(p: *const u8, len: CK_ULONG, size: usize) -> bool {
    let bytes = u128::from(len) * size as u128;
    bytes > u128::from(MAX_BUFFER) || p as usize as u128 + bytes > usize::MAX as u128
}

/// An input buffer of a data call (`C_Encrypt`, `C_SignUpdate`, a signature...): NULL is
/// refused whatever the length, as the backend would (SoftHSM2 answers
/// `CKR_ARGUMENTS_BAD` and keeps its operation: cmkp11 answers first, so that it knows
/// what the backend's state is), and so is an absurd length. Returns nothing: the
/// pointer goes to the backend unchanged.
#[inline]
pub fn input(p: *const u8, len: CK_ULONG) -> Result<()> {
    if p.is_null() || absurd(p, len, 1) {
        return err(CKR_ARGUMENTS_BAD);
    }
    Ok(())
}

/// [`bytes`] for a buffer cmkp11 copies: at most `max` bytes, else `CKR_ARGUMENTS_BAD`.
///
/// # Safety
/// As for [`bytes`].
pub unsafe fn bytes_max<'a>(p: *const u8, len: CK_ULONG, max: CK_ULONG) -> Result<&'a [u8]> {
    if len > max {
        return err(CKR_ARGUMENTS_BAD);
    }
    // SAFETY: forwarded contract.
    unsafe { bytes(p, len) }
}

/// A read-only byte buffer from the application (NULL allowed only with length 0).
///
/// # Safety
/// If `p` is not NULL it must be valid for reads of `len` bytes for `'a`.
pub unsafe fn bytes<'a>(p: *const u8, len: CK_ULONG) -> Result<&'a [u8]> {
    if len == 0 {
        return Ok(&[]);
    }
    if p.is_null() || absurd(p, len, 1) {
        return err(CKR_ARGUMENTS_BAD);
    }
    // SAFETY: non-null, and the caller guarantees `len` readable bytes.
    Ok(unsafe { std::slice::from_raw_parts(p, len as usize) })
}

/// A writable byte buffer from the application.
///
/// # Safety
/// If `p` is not NULL it must be valid for writes of `len` bytes for `'a`.
pub unsafe fn bytes_mut<'a>(p: *mut u8, len: CK_ULONG) -> Result<&'a mut [u8]> {
    if len == 0 {
        return Ok(&mut []);
    }
    if p.is_null() || absurd(p, len, 1) {
        return err(CKR_ARGUMENTS_BAD);
    }
    // SAFETY: non-null, and the caller guarantees `len` writable bytes.
    Ok(unsafe { std::slice::from_raw_parts_mut(p, len as usize) })
}

/// A required output pointer.
///
/// # Safety
/// If `p` is not NULL it must be valid for writes of a `T` for `'a`.
pub unsafe fn out<'a, T>(p: *mut T) -> Result<&'a mut T> {
    // SAFETY: the caller guarantees a valid `T` behind a non-null pointer.
    match unsafe { p.as_mut() } {
        Some(r) => Ok(r),
        None => err(CKR_ARGUMENTS_BAD),
    }
}

/// The two-call convention for a variable-length output: returns a sink for the result.
/// NULL buffer: the length only. Too small: the length and `TooSmall`. Else: copied.
///
/// # Safety
/// `len` must be valid for reads and writes; if `buf` is not NULL it must be valid for
/// writes of `*len` bytes.
pub unsafe fn sink(buf: *mut u8, len: *mut CK_ULONG) -> Result<impl FnOnce(&[u8]) -> Delivery> {
    if len.is_null() {
        return err(CKR_ARGUMENTS_BAD);
    }
    Ok(move |data: &[u8]| {
        // SAFETY: `len` was checked non-null above and the caller guarantees it is valid.
        let len = unsafe { &mut *len };
        let have = *len as usize;
        *len = data.len() as CK_ULONG;
        if buf.is_null() {
            Delivery::LengthOnly
        } else if have < data.len() {
            Delivery::TooSmall
        } else {
            // SAFETY: `buf` holds at least `have >= data.len()` writable bytes (caller), and
            // cannot overlap `data`, which cmkp11 owns.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), buf, data.len()) };
            Delivery::Delivered
        }
    })
}

/// Writes a list with the two-call convention (`C_GetSlotList`, `C_GetMechanismList`).
///
/// # Safety
/// As for [`sink`], with `buf` holding `*count` elements.
pub unsafe fn write_list<T: Copy>(items: &[T], buf: *mut T, count: *mut CK_ULONG) -> Result<()> {
    // SAFETY: the caller guarantees `count` is valid when non-null.
    let count = unsafe { out(count)? };
    let have = *count as usize;
    *count = items.len() as CK_ULONG;
    if buf.is_null() {
        return Ok(());
    }
    if have < items.len() {
        return err(CKR_BUFFER_TOO_SMALL);
    }
    // SAFETY: `buf` holds `have >= items.len()` elements (caller).
    unsafe { std::ptr::copy_nonoverlapping(items.as_ptr(), buf, items.len()) };
    Ok(())
}

/// Reads a `T` parameter struct after checking its length exactly.
///
/// # Safety
/// `m.pParameter`, if not NULL, must be valid for `m.ulParameterLen` bytes.
unsafe fn param<T: Copy>(m: &CK_MECHANISM) -> Result<T> {
    if m.pParameter.is_null() || m.ulParameterLen as usize != size_of::<T>() {
        return err(CKR_MECHANISM_PARAM_INVALID);
    }
    // SAFETY: non-null with exactly size_of::<T>() bytes; read_unaligned tolerates any
    // alignment the application used.
    Ok(unsafe { std::ptr::read_unaligned(m.pParameter as *const T) })
}

/// The longest byte string cmkp11 copies out of a mechanism parameter (an OAEP label, an
/// ECDH public value, an EdDSA context).
const MAX_PARAM: CK_ULONG = 1 << 20;

/// Copies `len` bytes at `p` (a pointer inside a parameter struct).
///
/// # Safety
/// As for [`bytes`].
unsafe fn owned(p: *const u8, len: CK_ULONG) -> Result<Vec<u8>> {
    // SAFETY: forwarded contract.
    unsafe { bytes_max(p, len, MAX_PARAM) }
        .map(<[u8]>::to_vec)
        .map_err(|_| crate::error::Error::Rv(CKR_MECHANISM_PARAM_INVALID))
}

/// The application's `CK_MECHANISM`, read once by value: every later check and use reads
/// this copy, so a second thread of the application that rewrites the structure during
/// the call changes nothing cmkp11 decided on. `None` for NULL.
///
/// # Safety
/// `p` NULL or valid for reads of a `CK_MECHANISM`.
pub unsafe fn read_mechanism(p: *const CK_MECHANISM) -> Option<CK_MECHANISM> {
    if p.is_null() {
        return None;
    }
    // SAFETY: non-NULL and valid (contract); read by value, whatever its alignment.
    Some(unsafe { std::ptr::read_unaligned(p) })
}

/// A data-path mechanism (no parameter, a 16-byte IV, `CK_GCM_PARAMS`), copied out of the
/// application's memory before anything is decided ([`direct_mechanism`]): the type, the
/// parameter structure and the IV bytes are cmkp11's, and the backend's `*Init` reads
/// them from here ([`Direct::raw`]). Only AES-GCM's additional data stays where the
/// application put it: it is data, like the plaintext, that no decision reads.
pub struct Direct {
    ty: CK_MECHANISM_TYPE,
    /// For `CK_GCM_PARAMS`, the tag's length in bytes; else 0.
    pub tag: u8,
    param: DirectParam,
    /// The application's IV buffer and its length, as read once (for a module IV).
    app_iv: (*mut u8, CK_ULONG),
}

/// The parameter of a [`Direct`], owned.
enum DirectParam {
    None,
    Iv16([u8; 16]),
    Gcm { g: CK_GCM_PARAMS, iv: Bytes },
}

impl Direct {
    /// The mechanism's type.
    #[inline]
    pub fn ty(&self) -> CK_MECHANISM_TYPE {
        self.ty
    }

    /// The `CK_MECHANISM` for the backend, pointing into `self` (which must not move
    /// until the backend call returns).
    #[inline]
    pub fn raw(&mut self) -> CK_MECHANISM {
        let (p, len): (*mut std::ffi::c_void, usize) = match &mut self.param {
            DirectParam::None => (std::ptr::null_mut(), 0),
            DirectParam::Iv16(iv) => (iv.as_mut_ptr().cast(), iv.len()),
            DirectParam::Gcm { g, iv } => {
                g.pIv = iv.as_mut_ptr();
                ((g as *mut CK_GCM_PARAMS).cast(), size_of::<CK_GCM_PARAMS>())
            }
        };
        CK_MECHANISM {
            mechanism: self.ty,
            pParameter: p,
            ulParameterLen: len as CK_ULONG,
        }
    }

    /// The IV of cmkp11's copy for cmkp11 to write an IV of its own into (see
    /// `Library::module_iv`): the application's IV buffer must be `len` bytes
    /// (`CKR_MECHANISM_PARAM_INVALID` otherwise). [`Direct::write_back_iv`] then gives
    /// the application the IV the backend used.
    pub fn module_iv(&mut self, len: usize) -> Result<&mut [u8]> {
        let (p, n) = self.app_iv;
        let iv: Option<&mut [u8]> = match &mut self.param {
            DirectParam::Iv16(iv) => Some(iv),
            DirectParam::Gcm { iv, .. } => Some(iv),
            DirectParam::None => None,
        };
        match iv {
            Some(iv) if !p.is_null() && n as usize == len && iv.len() == len => Ok(iv),
            _ => {
                log::warn!(
                    "C_EncryptInit refused: cmkp11 generates the IV for this key and writes it into the {len}-byte IV buffer of the mechanism parameter; this one is {n} bytes"
                );
                err(CKR_MECHANISM_PARAM_INVALID)
            }
        }
    }

    /// Copies the IV of cmkp11's copy into the application's IV buffer (after
    /// [`Direct::module_iv`]).
    ///
    /// # Safety
    /// The application's IV buffer, as read once, writable for its length (PKCS#11
    /// declares it `CK_BYTE_PTR`; modules generating IVs write it back).
    pub unsafe fn write_back_iv(&self) {
        let iv: &[u8] = match &self.param {
            DirectParam::Iv16(iv) => iv,
            DirectParam::Gcm { iv, .. } => iv,
            DirectParam::None => return,
        };
        let (p, n) = self.app_iv;
        if !p.is_null() && n as usize == iv.len() {
            // SAFETY: the application's buffer of `n` bytes (contract), not cmkp11's.
            unsafe { std::ptr::copy_nonoverlapping(iv.as_ptr(), p, iv.len()) };
        }
    }

    /// The mechanism as owned data (for a retry under an older CMK version): cmkp11's
    /// copy, with the additional data read once more as data.
    ///
    /// # Safety
    /// The additional data's buffer, as read once, valid for its length (contract).
    pub unsafe fn to_mech(&self) -> Result<Mech> {
        let param = match &self.param {
            DirectParam::None => Param::None,
            DirectParam::Iv16(iv) => Param::Iv16(*iv),
            DirectParam::Gcm { g, iv } => Param::Gcm {
                iv: iv.clone(),
                // SAFETY: forwarded contract; checked for NULL with a length at the read.
                aad: Bytes::from_slice(unsafe { bytes(g.pAAD, g.ulAADLen)? }),
                tag_bits: g.ulTagBits,
            },
        };
        Ok(Mech { ty: self.ty, param })
    }
}

/// The application's mechanism (read once, [`read_mechanism`]) copied for the shapes of
/// the data path (no parameter, a 16-byte IV, `CK_GCM_PARAMS`), after exactly the checks
/// [`mechanism`] makes; the hot path copies a few dozen bytes and allocates nothing (an
/// IV up to 32 bytes stays inline). `None` for the other shapes: parse them with
/// [`mechanism_of`].
///
/// # Safety
/// As for [`mechanism_of`].
pub unsafe fn direct_mechanism(m: Option<&CK_MECHANISM>) -> Result<Option<Direct>> {
    let Some(m) = m else {
        return err(CKR_ARGUMENTS_BAD);
    };
    let none = (std::ptr::null_mut(), 0);
    // SAFETY: the checks read the parameter only as `mechanism` does (caller contract).
    let (param, tag, app_iv) = unsafe {
        match param_kind(m.mechanism) {
            None => return err(CKR_MECHANISM_INVALID),
            Some(ParamKind::None) => {
                no_param(m)?;
                (DirectParam::None, 0, none)
            }
            Some(ParamKind::Iv16) => (
                DirectParam::Iv16(param::<[u8; 16]>(m)?),
                0,
                (m.pParameter.cast::<u8>(), m.ulParameterLen),
            ),
            Some(ParamKind::Gcm) => {
                let (g, iv, _) = gcm(m)?;
                // At most 128 bits, whole bytes (checked).
                let tag = (g.ulTagBits / 8) as u8;
                (
                    DirectParam::Gcm {
                        g,
                        iv: Bytes::from_slice(iv),
                    },
                    tag,
                    (g.pIv, g.ulIvLen),
                )
            }
            Some(_) => return Ok(None),
        }
    };
    Ok(Some(Direct {
        ty: m.mechanism,
        tag,
        param,
        app_iv,
    }))
}

/// The IV buffer of the application's AES-GCM or AES-CBC parameter, for cmkp11 to write
/// an IV of its own into (client mode: the daemon chose the IV and used its own copy):
/// the IV must be `len` bytes (`CKR_MECHANISM_PARAM_INVALID` otherwise).
///
/// # Safety
/// As for [`mechanism`], and the IV buffer writable (PKCS#11 declares it `CK_BYTE_PTR`;
/// modules generating IVs write it back).
pub unsafe fn iv_out<'a>(m: &CK_MECHANISM, len: usize) -> Result<&'a mut [u8]> {
    let (p, n) = match m.mechanism {
        // SAFETY: forwarded contract; `gcm` checks the length and the pointers.
        CKM_AES_GCM => unsafe {
            let (g, _, _) = gcm(m)?;
            (g.pIv, g.ulIvLen)
        },
        _ => (m.pParameter.cast::<u8>(), m.ulParameterLen),
    };
    if p.is_null() || n as usize != len {
        log::warn!(
            "C_EncryptInit refused: cmkp11 generates the IV for this key and writes it into the {len}-byte IV buffer of the mechanism parameter; this one is {n} bytes"
        );
        return err(CKR_MECHANISM_PARAM_INVALID);
    }
    // SAFETY: non-NULL, `len` bytes, writable (contract).
    Ok(unsafe { std::slice::from_raw_parts_mut(p, len) })
}

/// The check of a mechanism that takes no parameter.
fn no_param(m: &CK_MECHANISM) -> Result<()> {
    if m.ulParameterLen != 0 {
        return err(CKR_MECHANISM_PARAM_INVALID);
    }
    Ok(())
}

/// A `CK_GCM_PARAMS`, checked: its length, an IV, a tag of whole bytes from 32 to 128 bits,
/// and no NULL where a length is given.
///
/// # Safety
/// As for [`param`]; the IV and AAD pointers valid for their lengths (contract).
unsafe fn gcm(m: &CK_MECHANISM) -> Result<(CK_GCM_PARAMS, &[u8], &[u8])> {
    // SAFETY: forwarded contract.
    let g: CK_GCM_PARAMS = unsafe { param(m)? };
    // Tags of whole bytes from 32 to 128 bits: the specification allows 0 to 128, but a
    // tag shorter than 32 bits authenticates nothing worth the name (NIST SP 800-38D
    // allows 32 and 64 only with strict limits, 96 to 128 in general).
    if g.ulIvLen == 0 || !(32..=128).contains(&g.ulTagBits) || g.ulTagBits % 8 != 0 {
        return err(CKR_MECHANISM_PARAM_INVALID);
    }
    let part = |p: *const u8, len| {
        // SAFETY: forwarded contract.
        unsafe { bytes(p, len) }.map_err(|_| crate::error::Error::Rv(CKR_MECHANISM_PARAM_INVALID))
    };
    Ok((g, part(g.pIv, g.ulIvLen)?, part(g.pAAD, g.ulAADLen)?))
}

/// The application's mechanism, parsed into owned data. Parameter lengths are checked
/// before anything is read: Java's 40-byte v2.40 `CK_GCM_PARAMS` gets
/// `CKR_MECHANISM_PARAM_INVALID`, and Java then retries with the 48-byte v3.0 layout.
///
/// # Safety
/// `p`, if not NULL, must point to a valid `CK_MECHANISM` whose parameter pointers are
/// valid for their lengths.
pub unsafe fn mechanism(p: *const CK_MECHANISM) -> Result<Mech> {
    // SAFETY: caller contract.
    match unsafe { read_mechanism(p) } {
        // SAFETY: forwarded contract.
        Some(m) => unsafe { mechanism_of(&m) },
        None => err(CKR_ARGUMENTS_BAD),
    }
}

/// [`mechanism`] of a `CK_MECHANISM` already read ([`read_mechanism`]).
///
/// # Safety
/// The parameter pointers of `m` valid for their lengths.
pub unsafe fn mechanism_of(m: &CK_MECHANISM) -> Result<Mech> {
    let Some(kind) = param_kind(m.mechanism) else {
        return err(CKR_MECHANISM_INVALID);
    };
    // SAFETY: `param` checks the length and non-NULL before reading the struct; the
    // pointers inside parameter structs are the application's, valid for their lengths by
    // the PKCS#11 contract, and `owned` checks them for NULL.
    let param = unsafe {
        match kind {
            ParamKind::None => {
                no_param(m)?;
                Param::None
            }
            ParamKind::Iv16 => Param::Iv16(param::<[u8; 16]>(m)?),
            ParamKind::Iv8 => Param::Iv8(param::<[u8; 8]>(m)?),
            ParamKind::Gcm => {
                let (g, iv, aad) = gcm(m)?;
                Param::Gcm {
                    iv: Bytes::from_slice(iv),
                    aad: Bytes::from_slice(aad),
                    tag_bits: g.ulTagBits,
                }
            }
            ParamKind::Pss => {
                let p: CK_RSA_PKCS_PSS_PARAMS = param(m)?;
                Param::Pss {
                    hash: p.hashAlg,
                    mgf: p.mgf,
                    salt: p.sLen,
                }
            }
            ParamKind::Oaep => {
                let p: CK_RSA_PKCS_OAEP_PARAMS = param(m)?;
                let label = match p.source {
                    CKZ_DATA_SPECIFIED if p.ulSourceDataLen > 0 => {
                        Some(owned(p.pSourceData as *const u8, p.ulSourceDataLen)?)
                    }
                    0 | CKZ_DATA_SPECIFIED => None,
                    _ => return err(CKR_MECHANISM_PARAM_INVALID),
                };
                Param::Oaep {
                    hash: p.hashAlg,
                    mgf: p.mgf,
                    label,
                }
            }
            ParamKind::Ecdh1 => {
                let p: CK_ECDH1_DERIVE_PARAMS = param(m)?;
                Param::Ecdh1 {
                    kdf: p.kdf,
                    shared: owned(p.pSharedData, p.ulSharedDataLen)?,
                    public: owned(p.pPublicData, p.ulPublicDataLen)?,
                }
            }
            ParamKind::Eddsa => {
                if m.ulParameterLen == 0 {
                    Param::Eddsa {
                        prehash: false,
                        context: None,
                    }
                } else {
                    let p: CK_EDDSA_PARAMS = param(m)?;
                    Param::Eddsa {
                        prehash: p.phFlag != 0,
                        context: Some(owned(p.pContextData, p.ulContextDataLen)?),
                    }
                }
            }
        }
    };
    Ok(Mech {
        ty: m.mechanism,
        param,
    })
}

/// The raw attribute array of a template.
///
/// # Safety
/// If `p` is not NULL it must be valid for `n` `CK_ATTRIBUTE`s.
pub unsafe fn raw_template<'a>(
    p: *mut CK_ATTRIBUTE,
    n: CK_ULONG,
) -> Result<&'a mut [CK_ATTRIBUTE]> {
    if n == 0 {
        return Ok(&mut []);
    }
    if p.is_null() || n > MAX_TEMPLATE {
        return err(CKR_ARGUMENTS_BAD);
    }
    // SAFETY: non-null and valid for `n` elements (caller).
    Ok(unsafe { std::slice::from_raw_parts_mut(p, n as usize) })
}

/// The most value bytes a short-way template has (a longer one takes the general way).
const SHORT_BYTES: usize = 256;

/// An application's template on the short way, copied out of the application's memory
/// before the policy reads it ([`ShortCopy::fill`]): the policy decides on this copy and
/// the backend is given this copy ([`ShortCopy::view`]), so that a second thread of the
/// application rewriting its template during the call (`CKA_TOKEN`, `CKA_SENSITIVE`...)
/// changes neither. Fixed arrays on the caller's stack: no allocation, no growth path.
pub struct ShortCopy {
    tys: [CK_ATTRIBUTE_TYPE; SHORT_MAX],
    ends: [u16; SHORT_MAX],
    len: usize,
    bytes: [u8; SHORT_BYTES],
}

impl ShortCopy {
    /// An empty copy, to [`ShortCopy::fill`].
    #[inline]
    pub fn new() -> ShortCopy {
        ShortCopy {
            tys: [0; SHORT_MAX],
            ends: [0; SHORT_MAX],
            len: 0,
            bytes: [0; SHORT_BYTES],
        }
    }

    /// Copies the application's template; false (take the general way, [`template`],
    /// which gives the exact error) when a value is NULL with a length, when the values
    /// are longer than the short way keeps, or when there are more than [`SHORT_MAX`]
    /// attributes. Each `CK_ATTRIBUTE` is read once, by value, and each value once.
    ///
    /// # Safety
    /// Each `pValue` of `raw` valid for its `ulValueLen` bytes.
    #[inline]
    pub unsafe fn fill(&mut self, raw: &[CK_ATTRIBUTE]) -> bool {
        if raw.len() > SHORT_MAX {
            return false;
        }
        let mut end = 0usize;
        for (i, a) in raw.iter().enumerate() {
            // One read of the attribute; its fields are not read again.
            // SAFETY: an element of the application's array (contract).
            let a: CK_ATTRIBUTE = unsafe { std::ptr::read_volatile(a) };
            let n = a.ulValueLen as usize;
            if n != 0 {
                if a.ulValueLen > SHORT_BYTES as CK_ULONG
                    || n > SHORT_BYTES - end
                    || a.pValue.is_null()
                {
                    return false;
                }
                // SAFETY: non-NULL and valid for `n` bytes (caller contract).
                let v = unsafe { std::slice::from_raw_parts(a.pValue as *const u8, n) };
                self.bytes[end..end + n].copy_from_slice(v);
                end += n;
            }
            self.tys[i] = a.type_;
            self.ends[i] = end as u16;
        }
        self.len = raw.len();
        true
    }

    /// The copy as the policy's [`ShortTemplate`] (always `Some`: the copy has at most
    /// [`SHORT_MAX`] attributes).
    #[inline]
    pub fn view(&self) -> Option<ShortTemplate<'_>> {
        ShortTemplate::build(self.len, |i| {
            let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
            Some(RawAttr {
                ty: self.tys[i],
                value: &self.bytes[start..self.ends[i] as usize],
            })
        })
    }
}

impl Default for ShortCopy {
    fn default() -> Self {
        ShortCopy::new()
    }
}

/// An input template as cryptoki attributes: unknown types give
/// `CKR_ATTRIBUTE_TYPE_INVALID`, malformed values `CKR_ATTRIBUTE_VALUE_INVALID`.
///
/// # Safety
/// As for [`raw_template`], and each `pValue` valid for its `ulValueLen` bytes.
pub unsafe fn template(p: *mut CK_ATTRIBUTE, n: CK_ULONG) -> Result<Vec<Attribute>> {
    // SAFETY: caller contract.
    let raw = unsafe { raw_template(p, n)? };
    // Room for the attributes a policy template adds (up to 9), so completing it does not
    // reallocate.
    let mut out = Vec::with_capacity(raw.len() + 9);
    for a in raw.iter() {
        // One read of the attribute: the checks and the copy see the same fields.
        // SAFETY: an element of the application's array (contract).
        let a: CK_ATTRIBUTE = unsafe { std::ptr::read_volatile(a) };
        if AttributeType::try_from(a.type_).is_err() {
            return err(CKR_ATTRIBUTE_TYPE_INVALID);
        }
        // Refused before cryptoki copies the value.
        if a.ulValueLen > MAX_VALUE {
            return err(CKR_ARGUMENTS_BAD);
        }
        // cryptoki reads `ulValueLen` bytes at `pValue` (NULL only with length 0), which
        // the caller guarantees are valid.
        match Attribute::try_from(a) {
            Ok(v) => out.push(v),
            Err(_) => return err(CKR_ATTRIBUTE_VALUE_INVALID),
        }
    }
    Ok(out)
}

/// Whether a template asks for a token object (`CKA_TOKEN` = TRUE).
pub fn is_token(template: &[Attribute]) -> bool {
    template.iter().any(|a| matches!(a, Attribute::Token(true)))
}

/// Copies one attribute value into the application's `CK_ATTRIBUTE`, per the rules of
/// `C_GetAttributeValue`: NULL `pValue` gets the length; too small gets
/// `CK_UNAVAILABLE_INFORMATION` and returns false.
///
/// # Safety
/// `dst.pValue`, if not NULL, must be valid for `dst.ulValueLen` bytes.
pub unsafe fn put_attribute(dst: &mut CK_ATTRIBUTE, value: &Attribute) -> bool {
    let src = CK_ATTRIBUTE::from(value);
    let len = src.ulValueLen;
    if dst.pValue.is_null() {
        dst.ulValueLen = len;
        return true;
    }
    if dst.ulValueLen < len {
        dst.ulValueLen = CK_UNAVAILABLE_INFORMATION;
        return false;
    }
    if len > 0 {
        // SAFETY: `src.pValue` points into `value`, alive for this call, `len` bytes;
        // `dst.pValue` holds at least `len` bytes (checked above, caller contract).
        unsafe {
            std::ptr::copy_nonoverlapping(
                src.pValue as *const u8,
                dst.pValue as *mut u8,
                len as usize,
            )
        };
    }
    dst.ulValueLen = len;
    true
}
