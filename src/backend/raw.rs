//! The backend's own function table, for the data path of cryptographic operations.
//!
//! cryptoki finishes an operation in one call and returns a freshly allocated `Vec`; for
//! `C_Encrypt`, `C_Decrypt`, `C_Sign`, `C_Verify`, `C_Digest` and their multi-part forms
//! cmkp11 instead calls the backend's functions directly with the application's own
//! buffers and lengths, after the policy decided at `*Init` (through the runtime). The
//! backend then applies the two-call convention itself, errors come at the call the
//! specification names (the backend's `*Init` runs at the application's `*Init`), and no
//! intermediate buffer is allocated, copied or wiped on the hot path. The table is the
//! one of the module instance cryptoki already loaded and initialized (`dlopen` returns
//! the same instance), and session and object handles are the backend's, from cryptoki.

use crate::backend::mech::Mech;
use crate::policy::templates::{Completion, ShortTemplate, SHORT_MAX};
use crate::sys::Published;
use cryptoki::object::ObjectHandle;
use cryptoki_sys::*;

/// The kinds of cryptographic operation a session can have active at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `C_Encrypt*`
    Encrypt,
    /// `C_Decrypt*`
    Decrypt,
    /// `C_Digest*`
    Digest,
    /// `C_Sign*`
    Sign,
    /// `C_Verify*`
    Verify,
}

/// A loaded backend's function table: fetched once per module and process, and used for
/// everything (cmkp11's `C_Initialize` of the backend, cryptoki's calls and the data
/// path). A module may hand out a new, separately initialized table per
/// `C_GetFunctionList`/`C_GetInterface` call (p11-kit's client module does): a table that
/// was not initialized answers `CKR_CRYPTOKI_NOT_INITIALIZED`.
pub struct RawBackend {
    _lib: cryptoki_sys::Pkcs11,
    list: &'static CK_FUNCTION_LIST,
    /// The interface the table came with, when the module gave it through
    /// `C_GetInterface` (a v3.0 table); `None` for a v2.40 table.
    interface: Option<Interface>,
}

/// A `CK_INTERFACE` whose pointers point to static data (a C string, a function table).
struct Interface(CK_INTERFACE);

// SAFETY: the function table is immutable data of the loaded module, which stays loaded
// while `_lib` lives (forever: tables are never freed); PKCS#11 functions are callable
// from any thread (the backend was initialized with CKF_OS_LOCKING_OK). The interface
// points to the same table and to a static string.
unsafe impl Send for RawBackend {}
// SAFETY: as above.
unsafe impl Sync for RawBackend {}

/// The installed table. The entry points read it with one atomic load (no lock, no
/// reference count); tables are never freed, so a thread still in a call keeps valid
/// function pointers.
static RAW: Published<RawBackend> = Published::new();

/// Tables fetched so far, by module path: one per module for the life of the process
/// (its library stays loaded, as a backend's must: unloading SoftHSM2 would run its
/// destructors under OpenSSL's feet), so that reinitializing allocates nothing.
static TABLES: parking_lot::Mutex<Vec<(std::path::PathBuf, &'static RawBackend)>> =
    parking_lot::Mutex::new(Vec::new());

impl RawBackend {
    /// `module`'s table: fetched (and the module loaded) the first time, the same one
    /// afterwards. Prefers the v3.0 default interface, as cryptoki does.
    pub fn open(module: &std::path::Path) -> std::result::Result<&'static RawBackend, String> {
        let mut tables = TABLES.lock();
        if let Some((_, t)) = tables.iter().find(|(p, _)| p == module) {
            return Ok(t);
        }
        // SAFETY: loading a PKCS#11 module, which its configuration names.
        let lib = unsafe { cryptoki_sys::Pkcs11::new(module) }.map_err(|e| e.to_string())?;
        let mut interface = None;
        if lib.C_GetInterface.is_ok() {
            let mut i: *mut CK_INTERFACE = std::ptr::null_mut();
            // SAFETY: C_GetInterface with no name and no version writes one pointer to the
            // module's default interface.
            let rv = unsafe {
                lib.C_GetInterface(std::ptr::null_mut(), std::ptr::null_mut(), &mut i, 0)
            };
            // SAFETY: on success, NULL or a pointer to an interface that lives as long as
            // the module stays loaded.
            if let (CKR_OK, Some(i)) = (rv, unsafe { i.as_ref() }) {
                let list = i.pFunctionList as *const CK_FUNCTION_LIST;
                // SAFETY: every table starts with its CK_VERSION.
                if !list.is_null() && unsafe { (*list).version.major } >= 3 {
                    interface = Some(Interface(*i));
                }
            }
        }
        let list: *const CK_FUNCTION_LIST = match &interface {
            Some(i) => i.0.pFunctionList as *const CK_FUNCTION_LIST,
            None => {
                let mut list: *mut CK_FUNCTION_LIST = std::ptr::null_mut();
                if lib.C_GetFunctionList.is_err() {
                    return Err("no C_GetFunctionList".into());
                }
                // SAFETY: C_GetFunctionList writes one pointer to a function table.
                let rv = unsafe { lib.C_GetFunctionList(&mut list) };
                if rv != CKR_OK {
                    return Err(format!("C_GetFunctionList: {}", crate::error::rv::name(rv)));
                }
                list
            }
        };
        // SAFETY: a table of the module, alive while the module stays loaded: forever,
        // since `lib` is kept in a leaked RawBackend.
        let list = unsafe { list.as_ref() }.ok_or("a NULL function table")?;
        let t: &'static RawBackend = Box::leak(Box::new(RawBackend {
            _lib: lib,
            list,
            interface,
        }));
        tables.push((module.to_path_buf(), t));
        Ok(t)
    }

    /// The backend's `C_Initialize` through this table, with cmkp11's mutexes
    /// ([`crate::sys::locks`]).
    pub fn initialize(&self) -> CK_RV {
        crate::sys::locks::initialize_list(self.list)
    }

    /// Runs `f` (which loads a cryptoki context from cmkp11's own library) while this
    /// thread's calls of cmkp11's `C_GetInterface`/`C_GetFunctionList` answer with this
    /// table: the context then calls the backend through this very table.
    pub fn lend<R>(&'static self, f: impl FnOnce() -> R) -> R {
        LENT.with(|l| l.set(Some(self)));
        let r = f();
        LENT.with(|l| l.set(None));
        r
    }
}

thread_local! {
    static LENT: std::cell::Cell<Option<&'static RawBackend>> = const { std::cell::Cell::new(None) };
}

/// The table lent to this thread by [`RawBackend::lend`], as the interface cmkp11's
/// `C_GetInterface` then answers (NULL for a v2.40 table, which sends cryptoki to
/// `C_GetFunctionList`) and the table its `C_GetFunctionList` answers.
pub fn lent() -> Option<(*mut CK_INTERFACE, *mut CK_FUNCTION_LIST)> {
    LENT.with(|l| l.get()).map(|t| {
        let i = t.interface.as_ref().map_or(std::ptr::null_mut(), |i| {
            &i.0 as *const CK_INTERFACE as *mut _
        });
        (i, t.list as *const CK_FUNCTION_LIST as *mut _)
    })
}

/// Installs (or, with `None`, removes) the table used by the entry points.
pub fn install(raw: Option<&'static RawBackend>) {
    RAW.set(raw);
}

/// The installed table.
pub fn get() -> Option<&'static RawBackend> {
    RAW.get()
}

impl RawBackend {
    /// The backend's `C_*Init` for `kind`. The mechanisms of the data path (no parameter,
    /// a 16-byte IV, AES-GCM) go to the backend as they are; others through cryptoki's
    /// conversion.
    pub fn init(
        &self,
        kind: Kind,
        session: CK_SESSION_HANDLE,
        mech: &mut Mech,
        key: CK_OBJECT_HANDLE,
    ) -> CK_RV {
        if let Some(rv) = mech.with_raw(|m| self.init_raw(kind, session, m, key)) {
            return rv;
        }
        match mech.to_cryptoki() {
            Ok(c) => self.init_raw(kind, session, &mut CK_MECHANISM::from(&c), key),
            Err(e) => e.rv(),
        }
    }

    /// The backend's `C_WrapKey` of `key` under `wrapping` into `out` (cmkp11's buffer):
    /// the length written, or the backend's code (`CKR_BUFFER_TOO_SMALL` when `out` is).
    pub fn wrap_key(
        &self,
        session: CK_SESSION_HANDLE,
        mech: &mut Mech,
        wrapping: CK_OBJECT_HANDLE,
        key: CK_OBJECT_HANDLE,
        out: &mut [u8],
    ) -> Result<usize, CK_RV> {
        let f = self.list;
        let mut call = |m: &mut CK_MECHANISM| {
            let mut len = out.len() as CK_ULONG;
            // SAFETY: `m` and its parameter live for the call (the caller's owned data);
            // `out` is valid for `len` bytes; the handles are the backend's own.
            let rv = unsafe {
                f.C_WrapKey.map_or(CKR_FUNCTION_NOT_SUPPORTED, |c| {
                    c(session, m, wrapping, key, out.as_mut_ptr(), &mut len)
                })
            };
            match rv {
                CKR_OK if len as usize <= out.len() => Ok(len as usize),
                CKR_OK => Err(CKR_GENERAL_ERROR),
                rv => Err(rv),
            }
        };
        if let Some(r) = mech.with_raw(&mut call) {
            return r;
        }
        match mech.to_cryptoki() {
            Ok(c) => call(&mut CK_MECHANISM::from(&c)),
            Err(e) => Err(e.rv()),
        }
    }

    /// The backend's `C_*Init` with a mechanism as the application passed it.
    pub fn init_raw(
        &self,
        kind: Kind,
        session: CK_SESSION_HANDLE,
        m: &mut CK_MECHANISM,
        key: CK_OBJECT_HANDLE,
    ) -> CK_RV {
        let f = self.list;
        // SAFETY: `m` and its parameter are alive for the call (the caller's owned data,
        // or the application's own mechanism during its `*Init`); the handles are the
        // backend's own (from cryptoki).
        unsafe {
            match kind {
                Kind::Encrypt => f
                    .C_EncryptInit
                    .map_or(CKR_FUNCTION_NOT_SUPPORTED, |c| c(session, m, key)),
                Kind::Decrypt => f
                    .C_DecryptInit
                    .map_or(CKR_FUNCTION_NOT_SUPPORTED, |c| c(session, m, key)),
                Kind::Sign => f
                    .C_SignInit
                    .map_or(CKR_FUNCTION_NOT_SUPPORTED, |c| c(session, m, key)),
                Kind::Verify => f
                    .C_VerifyInit
                    .map_or(CKR_FUNCTION_NOT_SUPPORTED, |c| c(session, m, key)),
                Kind::Digest => f
                    .C_DigestInit
                    .map_or(CKR_FUNCTION_NOT_SUPPORTED, |c| c(session, m)),
            }
        }
    }

    /// Single-part `C_Encrypt`/`C_Decrypt`/`C_Sign`/`C_Digest` with the application's
    /// buffers.
    ///
    /// # Safety
    /// The application's pointers, valid for their lengths (PKCS#11 contract).
    pub unsafe fn single(
        &self,
        kind: Kind,
        h: CK_SESSION_HANDLE,
        data: *mut u8,
        len: CK_ULONG,
        out: *mut u8,
        out_len: *mut CK_ULONG,
    ) -> CK_RV {
        // SAFETY: forwarded caller contract; the query passes NULL for the output.
        unsafe {
            with_needed_len(kind, out, out_len, |o, l| {
                self.single_call(kind, h, data, len, o, l)
            })
        }
    }

    /// [`RawBackend::single`] as the backend answers it.
    ///
    /// # Safety
    /// As for [`RawBackend::single`].
    unsafe fn single_call(
        &self,
        kind: Kind,
        h: CK_SESSION_HANDLE,
        data: *mut u8,
        len: CK_ULONG,
        out: *mut u8,
        out_len: *mut CK_ULONG,
    ) -> CK_RV {
        let f = self.list;
        // SAFETY: forwarded caller contract.
        unsafe {
            match kind {
                Kind::Encrypt => f.C_Encrypt.map_or(CKR_FUNCTION_NOT_SUPPORTED, |c| {
                    c(h, data, len, out, out_len)
                }),
                Kind::Decrypt => f.C_Decrypt.map_or(CKR_FUNCTION_NOT_SUPPORTED, |c| {
                    c(h, data, len, out, out_len)
                }),
                Kind::Sign => f.C_Sign.map_or(CKR_FUNCTION_NOT_SUPPORTED, |c| {
                    c(h, data, len, out, out_len)
                }),
                Kind::Digest => f.C_Digest.map_or(CKR_FUNCTION_NOT_SUPPORTED, |c| {
                    c(h, data, len, out, out_len)
                }),
                Kind::Verify => f.C_Verify.map_or(CKR_FUNCTION_NOT_SUPPORTED, |c| {
                    c(h, data, len, out, *out_len)
                }),
            }
        }
    }

    /// `C_EncryptUpdate`/`C_DecryptUpdate` (with output) or `C_SignUpdate`/`C_VerifyUpdate`/
    /// `C_DigestUpdate` (without: `out` and `out_len` ignored).
    ///
    /// # Safety
    /// As for [`RawBackend::single`].
    pub unsafe fn update(
        &self,
        kind: Kind,
        h: CK_SESSION_HANDLE,
        data: *mut u8,
        len: CK_ULONG,
        out: *mut u8,
        out_len: *mut CK_ULONG,
    ) -> CK_RV {
        // SAFETY: forwarded caller contract; the query passes NULL for the output.
        unsafe {
            with_needed_len(kind, out, out_len, |o, l| {
                self.update_call(kind, h, data, len, o, l)
            })
        }
    }

    /// [`RawBackend::update`] as the backend answers it.
    ///
    /// # Safety
    /// As for [`RawBackend::single`].
    unsafe fn update_call(
        &self,
        kind: Kind,
        h: CK_SESSION_HANDLE,
        data: *mut u8,
        len: CK_ULONG,
        out: *mut u8,
        out_len: *mut CK_ULONG,
    ) -> CK_RV {
        let f = self.list;
        // SAFETY: forwarded caller contract.
        unsafe {
            match kind {
                Kind::Encrypt => f.C_EncryptUpdate.map_or(CKR_FUNCTION_NOT_SUPPORTED, |c| {
                    c(h, data, len, out, out_len)
                }),
                Kind::Decrypt => f.C_DecryptUpdate.map_or(CKR_FUNCTION_NOT_SUPPORTED, |c| {
                    c(h, data, len, out, out_len)
                }),
                Kind::Sign => f
                    .C_SignUpdate
                    .map_or(CKR_FUNCTION_NOT_SUPPORTED, |c| c(h, data, len)),
                Kind::Verify => f
                    .C_VerifyUpdate
                    .map_or(CKR_FUNCTION_NOT_SUPPORTED, |c| c(h, data, len)),
                Kind::Digest => f
                    .C_DigestUpdate
                    .map_or(CKR_FUNCTION_NOT_SUPPORTED, |c| c(h, data, len)),
            }
        }
    }

    /// `C_*Final` (for `C_VerifyFinal`, `out`/`*out_len` is the signature).
    ///
    /// # Safety
    /// As for [`RawBackend::single`].
    pub unsafe fn finish(
        &self,
        kind: Kind,
        h: CK_SESSION_HANDLE,
        out: *mut u8,
        out_len: *mut CK_ULONG,
    ) -> CK_RV {
        // SAFETY: forwarded caller contract; the query passes NULL for the output.
        unsafe { with_needed_len(kind, out, out_len, |o, l| self.finish_call(kind, h, o, l)) }
    }

    /// [`RawBackend::finish`] as the backend answers it.
    ///
    /// # Safety
    /// As for [`RawBackend::single`].
    unsafe fn finish_call(
        &self,
        kind: Kind,
        h: CK_SESSION_HANDLE,
        out: *mut u8,
        out_len: *mut CK_ULONG,
    ) -> CK_RV {
        let f = self.list;
        // SAFETY: forwarded caller contract.
        unsafe {
            match kind {
                Kind::Encrypt => f
                    .C_EncryptFinal
                    .map_or(CKR_FUNCTION_NOT_SUPPORTED, |c| c(h, out, out_len)),
                Kind::Decrypt => f
                    .C_DecryptFinal
                    .map_or(CKR_FUNCTION_NOT_SUPPORTED, |c| c(h, out, out_len)),
                Kind::Sign => f
                    .C_SignFinal
                    .map_or(CKR_FUNCTION_NOT_SUPPORTED, |c| c(h, out, out_len)),
                Kind::Digest => f
                    .C_DigestFinal
                    .map_or(CKR_FUNCTION_NOT_SUPPORTED, |c| c(h, out, out_len)),
                Kind::Verify => f
                    .C_VerifyFinal
                    .map_or(CKR_FUNCTION_NOT_SUPPORTED, |c| c(h, out, *out_len)),
            }
        }
    }

    /// Ends the backend's operation of `kind` in session `h`, if it has one. True when the
    /// backend answered that it has none (`CKR_OPERATION_NOT_INITIALIZED`), the only proof
    /// that it is idle. Tried in turn: the final call (which ends a multi-part operation
    /// whatever it answers, except `CKR_BUFFER_TOO_SMALL`), then a single-part call on one
    /// block of zeros (for an operation no data reached, whose final call a backend may
    /// refuse without ending it: SoftHSM2 answers an AES-CBC-PAD decryption's with
    /// `CKR_BUFFER_TOO_SMALL` and a length of 2^64-1), each followed by a final call to
    /// learn the outcome.
    pub fn end_operation(&self, kind: Kind, h: CK_SESSION_HANDLE) -> bool {
        let mut buf = [0u8; 1024];
        let mut block = [0u8; 16];
        let mut last = || {
            let mut len = buf.len() as CK_ULONG;
            // SAFETY: `buf` is valid for `len` bytes and `len` for one write; a
            // verification reads `len` bytes of `buf` as its signature.
            unsafe { self.finish(kind, h, buf.as_mut_ptr(), &mut len) }
        };
        if last() == CKR_OPERATION_NOT_INITIALIZED || last() == CKR_OPERATION_NOT_INITIALIZED {
            return true;
        }
        let mut out = [0u8; 1024];
        let mut len = if kind == Kind::Verify {
            1
        } else {
            out.len() as CK_ULONG
        };
        // SAFETY: `block` valid for 16 bytes, `out` for `len` (1 for a verification's
        // signature, which the backend only reads), `len` for one write.
        unsafe { self.single(kind, h, block.as_mut_ptr(), 16, out.as_mut_ptr(), &mut len) };
        last() == CKR_OPERATION_NOT_INITIALIZED
    }

    /// `C_DigestKey`.
    pub fn digest_key(&self, h: CK_SESSION_HANDLE, key: CK_OBJECT_HANDLE) -> CK_RV {
        // SAFETY: plain handles, no pointers.
        unsafe {
            self.list
                .C_DigestKey
                .map_or(CKR_FUNCTION_NOT_SUPPORTED, |c| c(h, key))
        }
    }
}

/// A creating template for the backend: the application's attributes (borrowed, as it
/// gave them) less those the policy replaces, then the policy's explicit ones, whose
/// values point into `bools` (FALSE, TRUE). Returns the array and how many of it are used.
/// Runs `call` (a data call with output) with the application's `out`/`out_len`; when the
/// backend answers `CKR_BUFFER_TOO_SMALL` without raising `*out_len` to the length needed
/// (quirk `kryoptic:buffer-too-small-no-length`: PKCS#11 §5.2 says it must), asks again with
/// a NULL buffer (a length query, which leaves the operation as it is) and reports that
/// length. Never for `Kind::Verify`, whose `out` is an input.
///
/// # Safety
/// `out_len` NULL or valid; `call` as for [`RawBackend::single`].
unsafe fn with_needed_len(
    kind: Kind,
    out: *mut u8,
    out_len: *mut CK_ULONG,
    mut call: impl FnMut(*mut u8, *mut CK_ULONG) -> CK_RV,
) -> CK_RV {
    if kind == Kind::Verify || out.is_null() || out_len.is_null() {
        return call(out, out_len);
    }
    // SAFETY: valid (checked non-NULL; caller contract).
    let given = unsafe { *out_len };
    let rv = call(out, out_len);
    // SAFETY: as above.
    if rv == CKR_BUFFER_TOO_SMALL && unsafe { *out_len } <= given {
        let mut needed: CK_ULONG = 0;
        if call(std::ptr::null_mut(), &mut needed) == CKR_OK && needed > given {
            // SAFETY: as above.
            unsafe { *out_len = needed };
        }
    }
    rv
}

fn creating_template(
    t: &ShortTemplate,
    completion: &Completion,
    bools: &mut [CK_BBOOL; 2],
) -> ([CK_ATTRIBUTE; SHORT_MAX + 9], usize) {
    let (f, rest) = bools.split_at_mut(1);
    let (f, tr) = (f.as_mut_ptr(), rest.as_mut_ptr());
    let mut out = [CK_ATTRIBUTE {
        type_: 0,
        pValue: std::ptr::null_mut(),
        ulValueLen: 0,
    }; SHORT_MAX + 9];
    let mut n = 0;
    for a in t.iter() {
        if !crate::policy::templates::is_replaced(a.ty) {
            out[n] = CK_ATTRIBUTE {
                type_: a.ty,
                // The backend only reads a creating template (PKCS#11 passes it as input).
                pValue: a.value.as_ptr().cast_mut().cast(),
                ulValueLen: a.value.len() as CK_ULONG,
            };
            n += 1;
        }
    }
    for (slot, &(ty, b)) in out[n..].iter_mut().zip(completion) {
        *slot = CK_ATTRIBUTE {
            type_: ty,
            pValue: if b { tr } else { f }.cast(),
            ulValueLen: 1,
        };
    }
    (out, n + completion.len())
}

impl RawBackend {
    /// A backend call that makes one object from a short-way template: builds the
    /// mechanism (without parameter) and the template, and returns the new object.
    fn make(
        &self,
        mech: CK_MECHANISM_TYPE,
        t: &ShortTemplate,
        completion: &Completion,
        call: impl FnOnce(
            &CK_FUNCTION_LIST,
            &mut CK_MECHANISM,
            &mut [CK_ATTRIBUTE],
            &mut CK_OBJECT_HANDLE,
        ) -> CK_RV,
    ) -> std::result::Result<ObjectHandle, CK_RV> {
        let mut bools = [CK_FALSE, CK_TRUE];
        let (mut tmpl, n) = creating_template(t, completion, &mut bools);
        let mut m = CK_MECHANISM {
            mechanism: mech,
            pParameter: std::ptr::null_mut(),
            ulParameterLen: 0,
        };
        let mut h: CK_OBJECT_HANDLE = CK_INVALID_HANDLE;
        let rv = call(self.list, &mut m, &mut tmpl[..n], &mut h);
        if rv != CKR_OK {
            return Err(rv);
        }
        // SAFETY: the handle the backend has just returned for the new object.
        Ok(unsafe { ObjectHandle::new_from_raw(h) })
    }

    /// `C_GenerateKey` of a key whose template the policy decided on the short way
    /// ([`crate::policy::templates::dek_raw`]); `mech` without parameter.
    pub fn generate_key(
        &self,
        session: CK_SESSION_HANDLE,
        mech: CK_MECHANISM_TYPE,
        t: &ShortTemplate,
        completion: &Completion,
    ) -> std::result::Result<ObjectHandle, CK_RV> {
        self.make(mech, t, completion, |f, m, tmpl, h| {
            let Some(c) = f.C_GenerateKey else {
                return CKR_FUNCTION_NOT_SUPPORTED;
            };
            // SAFETY: the mechanism, the template (and the values it points to: the
            // application's, alive for its call, and `make`'s) and `h` outlive the call.
            unsafe { c(session, m, tmpl.as_mut_ptr(), tmpl.len() as CK_ULONG, h) }
        })
    }

    /// `C_UnwrapKey` into a key whose template the policy decided on the short way;
    /// `mech` without parameter.
    pub fn unwrap_key(
        &self,
        session: CK_SESSION_HANDLE,
        mech: CK_MECHANISM_TYPE,
        unwrapping: CK_OBJECT_HANDLE,
        blob: &[u8],
        t: &ShortTemplate,
        completion: &Completion,
    ) -> std::result::Result<ObjectHandle, CK_RV> {
        self.make(mech, t, completion, |f, m, tmpl, h| {
            let Some(c) = f.C_UnwrapKey else {
                return CKR_FUNCTION_NOT_SUPPORTED;
            };
            // SAFETY: as in `generate_key`; the blob is only read (PKCS#11 input).
            unsafe {
                c(
                    session,
                    m,
                    unwrapping,
                    blob.as_ptr().cast_mut(),
                    blob.len() as CK_ULONG,
                    tmpl.as_mut_ptr(),
                    tmpl.len() as CK_ULONG,
                    h,
                )
            }
        })
    }
}

impl RawBackend {
    /// `C_GetMechanismList` of `slot`: every type the token lists, including those cryptoki's
    /// own conversion does not know (it drops them, with an error line each).
    pub fn mechanism_list(
        &self,
        slot: CK_SLOT_ID,
    ) -> std::result::Result<Vec<CK_MECHANISM_TYPE>, CK_RV> {
        let Some(f) = self.list.C_GetMechanismList else {
            return Err(CKR_FUNCTION_NOT_SUPPORTED);
        };
        // The list may grow between the two calls (a token inserted, a module reloaded): ask
        // again with the new length until it fits.
        for _ in 0..4 {
            let mut n: CK_ULONG = 0;
            // SAFETY: a NULL list asks only for the count, written to `n`.
            let rv = unsafe { f(slot, std::ptr::null_mut(), &mut n) };
            if rv != CKR_OK {
                return Err(rv);
            }
            let mut out = vec![0; n as usize];
            // SAFETY: `out` has room for `n` entries, the count passed in.
            let rv = unsafe { f(slot, out.as_mut_ptr(), &mut n) };
            match rv {
                CKR_OK => {
                    out.truncate(n as usize);
                    return Ok(out);
                }
                CKR_BUFFER_TOO_SMALL => continue,
                rv => return Err(rv),
            }
        }
        Err(CKR_GENERAL_ERROR)
    }

    /// `C_GetMechanismInfo` of `ty` on `slot`.
    pub fn mechanism_info(
        &self,
        slot: CK_SLOT_ID,
        ty: CK_MECHANISM_TYPE,
    ) -> std::result::Result<CK_MECHANISM_INFO, CK_RV> {
        let Some(f) = self.list.C_GetMechanismInfo else {
            return Err(CKR_FUNCTION_NOT_SUPPORTED);
        };
        let mut info = CK_MECHANISM_INFO::default();
        // SAFETY: `info` is a valid CK_MECHANISM_INFO to write.
        match unsafe { f(slot, ty, &mut info) } {
            CKR_OK => Ok(info),
            rv => Err(rv),
        }
    }
}

impl RawBackend {
    /// `C_InitToken` with the application's PIN bytes and its 32-byte label as given
    /// (blank padded, any bytes the token accepts: PKCS#11 defines the field, not its text).
    pub fn init_token(&self, slot: CK_SLOT_ID, pin: &[u8], label: &[u8; 32]) -> CK_RV {
        let Some(f) = self.list.C_InitToken else {
            return CKR_FUNCTION_NOT_SUPPORTED;
        };
        // SAFETY: the PIN and the label are only read (PKCS#11 inputs) and outlive the call;
        // the label is exactly the 32 bytes the function reads.
        unsafe {
            f(
                slot,
                pin.as_ptr().cast_mut(),
                pin.len() as CK_ULONG,
                label.as_ptr().cast_mut(),
            )
        }
    }
}
