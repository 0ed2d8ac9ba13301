//! One application session: its backend session, the operations in progress, and the
//! results the backend produced that the application has not collected yet.
//!
//! Applications (through the FFI layer): `C_*Init` starts the backend's operation at once
//! (`Session::started`), and every data call goes to the backend's function table with
//! the application's own buffers, so the two-call convention and its codes are the
//! backend's. Only an AES-GCM decryption under a CMK with older versions keeps its
//! mechanism, to start again with the next version when the tag does not match.
//!
//! The runtime's own callers (the CLI) go through cryptoki, which finishes an operation
//! in one call (it asks the backend for the length itself): there `*Init` only makes the
//! operation ready (`Session::init`), the backend is told at the first data call, and a
//! result is kept here until it is collected with a large enough buffer. A wrapped key's
//! blob is kept the same way for the application's collecting `C_WrapKey`.

use super::Library;
use crate::backend::mech::Mech;
use crate::backend::rv;
use crate::error::{err, Error, Result};
use crate::policy::{KeyInfo, Usage};
use cryptoki::object::{Attribute, AttributeInfo, AttributeType, ObjectHandle};
use cryptoki::session::Session as BackendSession;
use cryptoki_sys::*;
use std::sync::Arc;

/// The backend's `C_*Init` as the FFI layer calls it: (backend session, mechanism, key).
pub type RawInit<'a> = dyn Fn(CK_SESSION_HANDLE, &mut Mech, CK_OBJECT_HANDLE) -> CK_RV + 'a;

/// One backend call of an active operation, made by the FFI layer with the application's
/// buffers: returns the code and whether the operation is still active.
pub type RawStep<'a> = dyn FnMut(CK_SESSION_HANDLE) -> (CK_RV, bool) + 'a;

/// The backend's `C_WrapKey` as the FFI layer calls it, into a buffer of cmkp11's:
/// (backend session, mechanism, wrapping key, key, buffer) -> the length written, or the
/// backend's code.
pub type RawWrap<'a> = dyn Fn(
        CK_SESSION_HANDLE,
        &mut Mech,
        CK_OBJECT_HANDLE,
        CK_OBJECT_HANDLE,
        &mut [u8],
    ) -> std::result::Result<usize, CK_RV>
    + 'a;

/// The buffer a wrap through [`RawWrap`] is first tried with: a DEK's blob is at most its
/// length plus 16 bytes (AES-KWP); a larger one takes the two-call way.
const WRAP_BUFFER: usize = 512;

/// The key objects of an operation: the one to use, then older versions of a CMK that an
/// authenticated decryption or an unwrap may also try. Inline up to four: the data path
/// allocates nothing (an allocation per operation measurably slows the backend's own
/// allocator pattern, by more than the allocation itself costs).
pub type Keys = smallvec::SmallVec<[ObjectHandle; 4]>;

/// What the application's output buffer did with a result (decided by the FFI layer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Copied into the application's buffer: the result is consumed.
    Delivered,
    /// The application passed NULL: only the length was returned.
    LengthOnly,
    /// The buffer is too small: the length was returned, `CKR_BUFFER_TOO_SMALL`.
    TooSmall,
}

pub use crate::backend::raw::Kind;

/// A result kept for the application. Decrypted data may be key material (a database's
/// table keys): it is wiped when dropped. Ciphertexts, signatures and digests are not
/// secret, and wiping them would cost the hot path a pass over every output.
struct Output {
    data: Vec<u8>,
    secret: bool,
}

impl Output {
    fn of(kind: Kind, data: Vec<u8>) -> Output {
        Output {
            data,
            secret: kind == Kind::Decrypt,
        }
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        if self.secret {
            wipe(&mut self.data);
        }
    }
}

/// Overwrites a buffer with zeros in one `memset`; `black_box` keeps the compiler from
/// dropping the stores as dead (`zeroize` writes byte by byte, ~20x slower on 4 KiB).
pub fn wipe(b: &mut [u8]) {
    b.fill(0);
    std::hint::black_box(b);
}

enum Stage {
    Idle,
    /// `*Init` done; the backend has not been told yet (the CLI's way). The keys: the one
    /// to use first, then older versions of a CMK that an authenticated decryption may
    /// also try. (The mechanism is boxed, as in `Active`, to keep every `Stage` small:
    /// stages are moved on the hot path.)
    Ready(Box<Mech>, Keys),
    /// The backend has a multi-part operation in progress.
    Streaming,
    /// The final result, waiting for the application to collect it.
    Done(Output),
    /// The backend's operation is active and the FFI layer calls the backend directly
    /// with the application's buffers. `tried`: how many of `keys` were initialized;
    /// `retry`: the mechanism again, kept only when there are other keys to try (an
    /// AES-GCM decryption under a CMK with older versions). `tag`: for AES-GCM that no
    /// data call has reached yet, the tag's length in bytes (the output's length is then
    /// known without asking the backend, see [`Session::single_output_len`]); else 0.
    Active {
        ty: CK_MECHANISM_TYPE,
        retry: Option<Box<Mech>>,
        keys: Keys,
        tried: usize,
        tag: u8,
    },
}

struct Op {
    stage: Stage,
    /// Output of an update call that the application has not collected yet.
    pending: Option<Output>,
}

impl Op {
    const fn idle() -> Op {
        Op {
            stage: Stage::Idle,
            pending: None,
        }
    }
}

struct Find {
    found: Vec<CK_OBJECT_HANDLE>,
    pos: usize,
}

/// The identity of a `C_WrapKey` call, so that its second (collecting) call is served
/// from the first call's result.
#[derive(PartialEq, Eq)]
struct WrapCall {
    mech: Mech,
    wrapping: CK_OBJECT_HANDLE,
    key: CK_OBJECT_HANDLE,
}

/// One of the outcomes of reading one attribute.
pub enum AttrValue {
    /// The value.
    Value(Attribute),
    /// The attribute is sensitive or unextractable.
    Sensitive,
    /// The object has no such attribute (or cmkp11 does not know the type).
    Invalid,
}

/// An application session.
pub struct Session {
    /// cmkp11's handle of this session.
    pub handle: CK_SESSION_HANDLE,
    /// cmkp11's slot id.
    pub slot_id: CK_SLOT_ID,
    /// A read-write session.
    pub rw: bool,
    backend: BackendSession,
    ops: [Op; 5],
    find: Option<Find>,
    wrap: Option<(WrapCall, Vec<u8>)>,
    /// A session object was created in this session: closing the backend session is
    /// what destroys it, so the backend session is never reused.
    made_session_objects: bool,
    /// The backend may hold an operation cmkp11 does not know of (an error after which
    /// the backend's state could not be confirmed idle): the backend session is never
    /// reused for another application session.
    uncertain: bool,
    /// The last decision of a cryptographic `*Init` in this session, reused by the next
    /// one with the same key, operation and mechanism while nothing it depends on changed.
    pub decided: Option<Decided>,
}

/// A decision of `Library::crypto_init` or `Library::unwrap_key` (policy, lifecycle state,
/// versions) that can be reused: it depends only on the key's facts (valid while the
/// handle table's epoch is unchanged), the static policy and, for a CMK, the keystore
/// view it was made under (a new generation after any reload). Decisions that depend on the time of day (access rules)
/// are never kept; a CMK's state can change with time only once it is no longer enabled,
/// and only allowed uses are kept.
pub struct Decided {
    /// cmkp11's key handle.
    pub key: CK_OBJECT_HANDLE,
    /// The operation.
    pub op: crate::policy::Op,
    /// The mechanism type.
    pub mech: CK_MECHANISM_TYPE,
    /// `HandleTable::epoch` before the decision was made.
    pub epoch: u64,
    /// For a CMK: the generation of the keystore view the decision was made under.
    pub view_generation: Option<u64>,
    /// The objects to use.
    pub objects: Keys,
    /// The CMK version used (for the audit record).
    pub version: Option<u32>,
    /// The key's facts.
    pub info: Arc<KeyInfo>,
}

impl Kind {
    /// The policy's operation of this kind (`None` for a digest, which uses no key).
    #[inline]
    pub fn op(self) -> Option<crate::policy::Op> {
        use crate::policy::Op;
        match self {
            Kind::Encrypt => Some(Op::Encrypt),
            Kind::Decrypt => Some(Op::Decrypt),
            Kind::Sign => Some(Op::Sign),
            Kind::Verify => Some(Op::Verify),
            Kind::Digest => None,
        }
    }
}

fn idx(k: Kind) -> usize {
    k as usize
}

impl Session {
    /// Wraps a freshly opened backend session.
    pub fn new(
        handle: CK_SESSION_HANDLE,
        slot_id: CK_SLOT_ID,
        rw: bool,
        backend: BackendSession,
    ) -> Session {
        Session {
            handle,
            slot_id,
            rw,
            backend,
            ops: [Op::idle(), Op::idle(), Op::idle(), Op::idle(), Op::idle()],
            find: None,
            wrap: None,
            made_session_objects: false,
            uncertain: false,
            decided: None,
        }
    }

    /// Whether a session object was created in this session.
    pub fn made_session_objects(&self) -> bool {
        self.made_session_objects
    }

    /// The backend session and whether it is read-write, if it can serve another
    /// application session exactly as a freshly opened one would: no backend operation in
    /// progress and no session object created in it. Otherwise the session itself, whose
    /// drop closes the backend session.
    pub fn into_reusable(self) -> std::result::Result<(bool, BackendSession), Box<Session>> {
        let busy = self
            .ops
            .iter()
            .any(|o| matches!(o.stage, Stage::Streaming | Stage::Active { .. }));
        if busy || self.made_session_objects || self.uncertain {
            return Err(Box::new(self));
        }
        Ok((self.rw, self.backend))
    }

    /// The backend session (for calls that need no state of cmkp11's).
    pub fn backend(&self) -> &BackendSession {
        &self.backend
    }

    /// Resolves an object handle of this session's slot.
    pub fn object(
        &self,
        lib: &Library,
        h: CK_OBJECT_HANDLE,
        invalid: CK_RV,
    ) -> Result<ObjectHandle> {
        lib.objects.backend(self.slot_id, h, invalid)
    }

    /// The policy facts of an object (cached in the handle table after the first read).
    pub fn key_info(
        &self,
        lib: &Library,
        h: CK_OBJECT_HANDLE,
        invalid: CK_RV,
    ) -> Result<(ObjectHandle, Arc<KeyInfo>)> {
        let (obj, cached, _) = lib.objects.lookup(self.slot_id, h, invalid)?;
        if let Some(info) = cached {
            return Ok((obj, info));
        }
        use AttributeType as T;
        let attrs = self.backend.get_attributes(
            obj,
            &[
                T::Class,
                T::KeyType,
                T::Token,
                T::Sensitive,
                T::Extractable,
                T::Local,
                T::Encrypt,
                T::Decrypt,
                T::Sign,
                T::Verify,
                T::Wrap,
                T::Unwrap,
                T::Derive,
                T::ValueLen,
                T::Label,
                T::Id,
                T::AlwaysSensitive,
                T::NeverExtractable,
            ],
        )?;
        let (value_len, _, imported) = lib.objects.local_facts(h);
        let mut info = KeyInfo {
            key_type: CK_UNAVAILABLE_INFORMATION,
            imported_plaintext: imported,
            label_exact: true,
            ..KeyInfo::default()
        };
        for a in attrs {
            let mut usage = |u: Usage, on: bool| {
                if on {
                    info.usage = info.usage.with(u)
                }
            };
            match a {
                Attribute::Encrypt(b) => usage(Usage::ENCRYPT, b),
                Attribute::Decrypt(b) => usage(Usage::DECRYPT, b),
                Attribute::Sign(b) => usage(Usage::SIGN, b),
                Attribute::Verify(b) => usage(Usage::VERIFY, b),
                Attribute::Wrap(b) => usage(Usage::WRAP, b),
                Attribute::Unwrap(b) => usage(Usage::UNWRAP, b),
                Attribute::Derive(b) => usage(Usage::DERIVE, b),
                Attribute::Class(c) => info.class = c.into(),
                Attribute::KeyType(k) => info.key_type = k.into(),
                Attribute::Token(b) => info.token = b,
                Attribute::Sensitive(b) => info.sensitive = b,
                Attribute::Extractable(b) => info.extractable = b,
                Attribute::Local(b) => info.local = b,
                Attribute::ValueLen(l) => info.value_len = l.into(),
                Attribute::Label(l) => {
                    info.label_exact = std::str::from_utf8(&l).is_ok();
                    info.label = String::from_utf8_lossy(&l).into_owned();
                }
                Attribute::AlwaysSensitive(b) => info.always_sensitive = b,
                Attribute::NeverExtractable(b) => info.never_extractable = b,
                Attribute::Id(i) => info.raw_id = i,
                _ => {}
            }
        }
        if info.value_len == 0 {
            info.value_len = value_len.unwrap_or(0);
        }
        if info.label.starts_with(crate::keystore::RESERVED_PREFIX) {
            // One of cmkp11's own objects: never reachable by a handle (none is ever
            // made for one; this is the second line).
            lib.objects.forget(h);
            return err(invalid);
        }
        let info = Arc::new(info);
        lib.objects.set_info(h, Some(info.clone()));
        Ok((obj, info))
    }

    /// Registers a backend object and returns cmkp11's handle. `session_object` says
    /// whether it lives only as long as this session.
    pub fn register(
        &mut self,
        lib: &Library,
        obj: ObjectHandle,
        session_object: bool,
    ) -> CK_OBJECT_HANDLE {
        self.made_session_objects |= session_object;
        // A new object: straight to the table's write lock.
        lib.objects.ours_with(
            self.slot_id,
            obj,
            session_object.then_some(self.handle),
            None,
            None,
            false,
        )
    }

    /// [`Session::register`] for a key cmkp11 saw generated inside the token (the only
    /// session keys that `C_CopyObject` may promote to CMKs).
    pub fn register_generated(
        &mut self,
        lib: &Library,
        obj: ObjectHandle,
        session_object: bool,
    ) -> CK_OBJECT_HANDLE {
        self.made_session_objects |= session_object;
        lib.objects.ours_with(
            self.slot_id,
            obj,
            session_object.then_some(self.handle),
            None,
            None,
            true,
        )
    }

    /// [`Session::register`] for a session key whose value length and origin cmkp11
    /// knows (an unwrapped DEK), in one step.
    pub fn register_dek(
        &mut self,
        lib: &Library,
        obj: ObjectHandle,
        value_len: Option<CK_ULONG>,
        origin: CK_OBJECT_HANDLE,
    ) -> CK_OBJECT_HANDLE {
        self.made_session_objects = true;
        lib.objects.ours_with(
            self.slot_id,
            obj,
            Some(self.handle),
            value_len,
            Some(origin),
            false,
        )
    }

    /// `C_*Init`: starts an operation of `kind`.
    pub fn init(&mut self, kind: Kind, mech: Mech, keys: Keys) -> Result<()> {
        let op = &mut self.ops[idx(kind)];
        if !matches!(op.stage, Stage::Idle) {
            return err(CKR_OPERATION_ACTIVE);
        }
        op.stage = Stage::Ready(Box::new(mech), keys);
        op.pending = None;
        Ok(())
    }

    /// Ends an operation of `kind` whatever its stage (`C_SessionCancel`). A backend
    /// multi-part operation is ended by finishing it and discarding the result.
    pub fn cancel(&mut self, kind: Kind) {
        let op = &mut self.ops[idx(kind)];
        op.pending = None;
        if let Stage::Streaming | Stage::Active { .. } =
            std::mem::replace(&mut op.stage, Stage::Idle)
        {
            self.settle(kind);
        }
    }

    /// Ends an active operation of `kind` after an error cmkp11 returns for it (PKCS#11:
    /// a data call that fails with anything but `CKR_BUFFER_TOO_SMALL` ends the
    /// operation), in cmkp11 and in the backend. Out of line: only error paths call it.
    #[cold]
    #[inline(never)]
    pub fn abort(&mut self, kind: Kind) {
        let op = &mut self.ops[idx(kind)];
        op.pending = None;
        if !matches!(std::mem::replace(&mut op.stage, Stage::Idle), Stage::Idle) {
            self.settle(kind);
        }
    }

    /// Makes sure the backend has no operation of `kind` left, after cmkp11 ended its own
    /// on an error: a backend may keep its operation after an error (SoftHSM2 does after
    /// `CKR_ARGUMENTS_BAD`), and the next `*Init` in this session, or in the next
    /// application session given this backend session, would then fail with
    /// `CKR_OPERATION_ACTIVE`. The backend's final call ends an operation whatever its
    /// result (PKCS#11), and answers `CKR_OPERATION_NOT_INITIALIZED` when there is none:
    /// only that answer proves the backend idle. Otherwise the session is marked
    /// uncertain and its backend session is closed, never reused.
    #[cold]
    #[inline(never)]
    fn settle(&mut self, kind: Kind) {
        // Through the backend's table with a buffer of cmkp11's (cryptoki's final calls
        // trust the length the backend answers a query with, whatever it is). Without the
        // table (the runtime used directly, not through C_Initialize) nothing is tried.
        if let Some(b) = crate::backend::raw::get() {
            if b.end_operation(kind, self.backend.handle()) {
                return;
            }
        }
        log::debug!(
            "session {}: the backend's {kind:?} operation may still be active; its backend session will not be reused",
            self.handle
        );
        self.uncertain = true;
    }

    /// Records that the FFI layer started an operation of `kind` in the backend (its
    /// `C_*Init` succeeded with `keys[0]`), after [`Library::crypto_decide`] found none
    /// active: the application's `C_*Init`. `mech` (cmkp11's copy of the application's
    /// mechanism, the one the decision saw) is given only when `keys` has others to try.
    ///
    /// [`Library::crypto_decide`]: super::Library::crypto_decide
    /// `tag`: an AES-GCM tag's length in bytes (0 for other mechanisms).
    pub fn started(
        &mut self,
        kind: Kind,
        ty: CK_MECHANISM_TYPE,
        keys: Keys,
        tag: u8,
        mech: Option<Mech>,
    ) -> Result<()> {
        let retry = mech.filter(|_| keys.len() > 1).map(Box::new);
        let op = &mut self.ops[idx(kind)];
        op.pending = None;
        op.stage = Stage::Active {
            ty,
            retry,
            keys,
            tried: 1,
            tag: if ty == CKM_AES_GCM { tag } else { 0 },
        };
        Ok(())
    }

    /// The answer to a length query (NULL output) of a single-part `C_Encrypt`/`C_Decrypt`
    /// of `len` bytes, when cmkp11 knows it without asking the backend: AES-GCM before any
    /// data call. Encryption: the plaintext and the tag, exactly. Decryption: the
    /// ciphertext's length, the bound the token itself gives (SoftHSM2 asks for a buffer
    /// that large; the plaintext is `len - tag`, and PKCS#11 lets a length query answer a
    /// little more than needed); a ciphertext shorter than the tag is left to the token,
    /// which refuses it. A length query answered here saves a backend call (a round trip
    /// to a network HSM).
    #[inline]
    pub fn single_output_len(&self, kind: Kind, len: CK_ULONG) -> Option<CK_ULONG> {
        let Stage::Active { tag, .. } = self.ops[idx(kind)].stage else {
            return None;
        };
        let tag = CK_ULONG::from(tag);
        match kind {
            _ if tag == 0 => None,
            Kind::Encrypt => len.checked_add(tag),
            Kind::Decrypt => (len >= tag).then_some(len),
            _ => None,
        }
    }

    /// A call of an active backend operation, made by `call` with the application's
    /// buffers; `call` returns the backend's code and whether the operation is still
    /// active (a length query, a buffer too small, a multi-part step). An AES-GCM
    /// decryption that fails is tried again under the CMK's older versions, newest first.
    pub fn raw_call(&mut self, kind: Kind, call: &mut RawStep, init: &RawInit) -> Result<()> {
        let h = self.backend.handle();
        loop {
            if !matches!(self.ops[idx(kind)].stage, Stage::Active { .. }) {
                return err(CKR_OPERATION_NOT_INITIALIZED);
            }
            let (rv, still) = call(h);
            if still {
                // The backend has seen data (an update) or answered itself: from now on
                // it alone knows the output's length.
                if let Stage::Active { tag, .. } = &mut self.ops[idx(kind)].stage {
                    *tag = 0;
                }
                return if rv == CKR_OK { Ok(()) } else { err(rv) };
            }
            if rv == CKR_OK {
                self.ops[idx(kind)].stage = Stage::Idle;
                return Ok(());
            }
            if let Err(e) = self.failed(kind, h, rv, init) {
                self.settle(kind);
                return Err(e);
            }
        }
    }

    /// After an active operation's final call failed with `rv`: the operation ends, unless
    /// an AES-GCM decryption has another version of its CMK to try (then it is started
    /// again with it and `Ok` says to repeat the call). Out of line: not the hot path.
    #[inline(never)]
    fn failed(
        &mut self,
        kind: Kind,
        h: CK_SESSION_HANDLE,
        rv: CK_RV,
        init: &RawInit,
    ) -> Result<()> {
        let Stage::Active {
            ty,
            retry,
            keys,
            tried,
            tag,
        } = std::mem::replace(&mut self.ops[idx(kind)].stage, Stage::Idle)
        else {
            return err(rv);
        };
        let aead = kind == Kind::Decrypt && ty == CKM_AES_GCM;
        if !aead {
            return err(rv);
        }
        let rv = rv::aead_failure(rv);
        let Some(mut mech) = retry else {
            return err(rv);
        };
        if rv != CKR_ENCRYPTED_DATA_INVALID || tried >= keys.len() {
            return err(rv);
        }
        let again = init(h, &mut mech, keys[tried].handle());
        if again != CKR_OK {
            return err(rv);
        }
        self.ops[idx(kind)].stage = Stage::Active {
            ty,
            retry: Some(mech),
            keys,
            tried: tried + 1,
            tag,
        };
        Ok(())
    }

    /// Whether an operation of `kind` is active.
    pub fn active(&self, kind: Kind) -> bool {
        !matches!(self.ops[idx(kind)].stage, Stage::Idle)
    }

    /// Single-part `C_Encrypt`, `C_Decrypt`, `C_Digest`, `C_Sign`.
    pub fn single(
        &mut self,
        kind: Kind,
        data: &[u8],
        sink: impl FnOnce(&[u8]) -> Delivery,
    ) -> Result<()> {
        let out = match std::mem::replace(&mut self.ops[idx(kind)].stage, Stage::Idle) {
            Stage::Idle => return err(CKR_OPERATION_NOT_INITIALIZED),
            other @ (Stage::Streaming | Stage::Active { .. }) => {
                self.ops[idx(kind)].stage = other;
                return err(CKR_OPERATION_ACTIVE);
            }
            Stage::Ready(mut mech, keys) => match self.backend_single(kind, &mut mech, &keys, data)
            {
                Ok(v) => Output::of(kind, v),
                Err(e) => {
                    // cryptoki's one call is several backend calls: make sure none is left.
                    self.settle(kind);
                    return Err(e);
                }
            },
            Stage::Done(out) => out,
        };
        self.deliver_final(kind, out, sink)
    }

    fn backend_single(
        &self,
        kind: Kind,
        mech: &mut Mech,
        keys: &[ObjectHandle],
        data: &[u8],
    ) -> Result<Vec<u8>> {
        let b = &self.backend;
        let ty = mech.ty;
        let m = mech.to_cryptoki()?;
        let key = || keys.first().copied().ok_or(Error::Rv(CKR_GENERAL_ERROR));
        Ok(match kind {
            Kind::Encrypt => b.encrypt(&m, key()?, data)?,
            // An authenticated decryption tells the right version by its tag: try every
            // enabled version, newest first.
            Kind::Decrypt if ty == CKM_AES_GCM => {
                let mut last = CKR_ENCRYPTED_DATA_INVALID;
                for k in keys {
                    match b.decrypt(&m, *k, data) {
                        Ok(out) => return Ok(out),
                        Err(e) => last = rv::aead_failure(Error::from(e).rv()),
                    }
                    if last != CKR_ENCRYPTED_DATA_INVALID {
                        break;
                    }
                }
                return err(last);
            }
            Kind::Decrypt => b.decrypt(&m, key()?, data)?,
            Kind::Digest => b.digest(&m, data)?,
            Kind::Sign => b.sign(&m, key()?, data)?,
            Kind::Verify => return err(CKR_GENERAL_ERROR),
        })
    }

    fn deliver_final(
        &mut self,
        kind: Kind,
        out: Output,
        sink: impl FnOnce(&[u8]) -> Delivery,
    ) -> Result<()> {
        match sink(&out.data) {
            Delivery::Delivered => Ok(()),
            Delivery::LengthOnly => {
                self.ops[idx(kind)].stage = Stage::Done(out);
                Ok(())
            }
            Delivery::TooSmall => {
                self.ops[idx(kind)].stage = Stage::Done(out);
                err(CKR_BUFFER_TOO_SMALL)
            }
        }
    }

    /// Tells the backend about a `Ready` operation (first multi-part call).
    fn start_streaming(&mut self, kind: Kind) -> Result<()> {
        let op = &mut self.ops[idx(kind)];
        match std::mem::replace(&mut op.stage, Stage::Idle) {
            Stage::Idle => err(CKR_OPERATION_NOT_INITIALIZED),
            other @ (Stage::Done(_) | Stage::Active { .. }) => {
                op.stage = other;
                err(CKR_OPERATION_ACTIVE)
            }
            Stage::Streaming => {
                op.stage = Stage::Streaming;
                Ok(())
            }
            Stage::Ready(mut mech, keys) => {
                let b = &self.backend;
                let m = mech.to_cryptoki()?;
                let key = || keys.first().copied().ok_or(Error::Rv(CKR_GENERAL_ERROR));
                match kind {
                    Kind::Encrypt => b.encrypt_init(&m, key()?)?,
                    Kind::Decrypt => b.decrypt_init(&m, key()?)?,
                    Kind::Digest => b.digest_init(&m)?,
                    Kind::Sign => b.sign_init(&m, key()?)?,
                    Kind::Verify => b.verify_init(&m, key()?)?,
                }
                self.ops[idx(kind)].stage = Stage::Streaming;
                Ok(())
            }
        }
    }

    /// `C_EncryptUpdate` / `C_DecryptUpdate`: multi-part with output.
    pub fn update_out(
        &mut self,
        kind: Kind,
        data: &[u8],
        sink: impl FnOnce(&[u8]) -> Delivery,
    ) -> Result<()> {
        let out = match self.ops[idx(kind)].pending.take() {
            Some(p) => p,
            None => {
                self.start_streaming(kind)?;
                let r = match kind {
                    Kind::Encrypt => self.backend.encrypt_update(data),
                    _ => self.backend.decrypt_update(data),
                };
                match r {
                    Ok(v) => Output::of(kind, v),
                    Err(e) => {
                        self.abort(kind);
                        return Err(e.into());
                    }
                }
            }
        };
        match sink(&out.data) {
            Delivery::Delivered => Ok(()),
            d => {
                self.ops[idx(kind)].pending = Some(out);
                if d == Delivery::TooSmall {
                    err(CKR_BUFFER_TOO_SMALL)
                } else {
                    Ok(())
                }
            }
        }
    }

    /// `C_DigestUpdate`, `C_SignUpdate`, `C_VerifyUpdate`: multi-part without output.
    pub fn update(&mut self, kind: Kind, data: &[u8]) -> Result<()> {
        self.start_streaming(kind)?;
        let r = match kind {
            Kind::Digest => self.backend.digest_update(data),
            Kind::Sign => self.backend.sign_update(data),
            _ => self.backend.verify_update(data),
        };
        r.inspect_err(|_| self.abort(kind)).map_err(Into::into)
    }

    /// `C_DigestKey`.
    pub fn digest_key(&mut self, key: ObjectHandle) -> Result<()> {
        self.start_streaming(Kind::Digest)?;
        self.backend
            .digest_key(key)
            .inspect_err(|_| self.ops[idx(Kind::Digest)].stage = Stage::Idle)
            .map_err(Into::into)
    }

    /// `C_EncryptFinal`, `C_DecryptFinal`, `C_DigestFinal`, `C_SignFinal`.
    pub fn finish(&mut self, kind: Kind, sink: impl FnOnce(&[u8]) -> Delivery) -> Result<()> {
        let out = if let Stage::Done(_) = self.ops[idx(kind)].stage {
            match std::mem::replace(&mut self.ops[idx(kind)].stage, Stage::Idle) {
                Stage::Done(out) => out,
                _ => unreachable!("checked above"),
            }
        } else {
            self.start_streaming(kind)?;
            self.ops[idx(kind)].stage = Stage::Idle;
            self.ops[idx(kind)].pending = None;
            Output::of(
                kind,
                match kind {
                    Kind::Encrypt => self.backend.encrypt_final()?,
                    Kind::Decrypt => self.backend.decrypt_final()?,
                    Kind::Digest => self.backend.digest_final()?,
                    Kind::Sign => self.backend.sign_final()?,
                    Kind::Verify => return err(CKR_GENERAL_ERROR),
                },
            )
        };
        self.deliver_final(kind, out, sink)
    }

    /// Single-part `C_Verify`.
    pub fn verify(&mut self, data: &[u8], signature: &[u8]) -> Result<()> {
        let k = idx(Kind::Verify);
        match std::mem::replace(&mut self.ops[k].stage, Stage::Idle) {
            Stage::Ready(mut mech, keys) if !keys.is_empty() => {
                let m = mech.to_cryptoki()?;
                Ok(self.backend.verify(&m, keys[0], data, signature)?)
            }
            Stage::Idle => err(CKR_OPERATION_NOT_INITIALIZED),
            other => {
                self.ops[k].stage = other;
                err(CKR_OPERATION_ACTIVE)
            }
        }
    }

    /// `C_VerifyFinal`.
    pub fn verify_final(&mut self, signature: &[u8]) -> Result<()> {
        self.start_streaming(Kind::Verify)?;
        self.ops[idx(Kind::Verify)].stage = Stage::Idle;
        Ok(self.backend.verify_final(signature)?)
    }

    /// `C_FindObjectsInit`: keeps the handles of a search done by the caller.
    pub fn set_find(&mut self, found: Vec<CK_OBJECT_HANDLE>) -> Result<()> {
        if self.find.is_some() {
            return err(CKR_OPERATION_ACTIVE);
        }
        self.find = Some(Find { found, pos: 0 });
        Ok(())
    }

    /// Whether a search is active.
    pub fn finding(&self) -> bool {
        self.find.is_some()
    }

    /// `C_FindObjects`: up to `max` more handles.
    pub fn find_next(&mut self, max: usize) -> Result<&[CK_OBJECT_HANDLE]> {
        let f = self
            .find
            .as_mut()
            .ok_or(Error::Rv(CKR_OPERATION_NOT_INITIALIZED))?;
        let start = f.pos;
        // `max` is the application's (up to CK_ULONG's maximum): never an overflow.
        f.pos = start.saturating_add(max).min(f.found.len());
        Ok(&f.found[start..f.pos])
    }

    /// `C_FindObjectsFinal`.
    pub fn find_final(&mut self) -> Result<()> {
        self.find
            .take()
            .map(|_| ())
            .ok_or(Error::Rv(CKR_OPERATION_NOT_INITIALIZED))
    }

    /// `C_WrapKey`'s collecting call: the blob a previous call with the same mechanism
    /// and keys computed and the application has not taken yet (the decision to wrap was
    /// made, and recorded, by that call).
    pub fn pending_wrap(
        &mut self,
        mech: &Mech,
        wrapping: CK_OBJECT_HANDLE,
        key: CK_OBJECT_HANDLE,
    ) -> Option<Vec<u8>> {
        match self.wrap.take() {
            Some((c, blob)) if c.mech == *mech && c.wrapping == wrapping && c.key == key => {
                Some(blob)
            }
            _ => None,
        }
    }

    /// `C_WrapKey` through the backend, with the two-call convention: a blob the
    /// application did not take is kept for its next call (see [`Session::pending_wrap`]).
    /// With `raw` (the FFI layer's direct call) the token wraps once, into a buffer large
    /// enough for any DEK; cryptoki's way asks the token twice (the length, then the
    /// blob), and a token computes the whole wrap for the length too.
    pub fn wrap(
        &mut self,
        mut mech: Mech,
        wrapping: (CK_OBJECT_HANDLE, ObjectHandle),
        key: (CK_OBJECT_HANDLE, ObjectHandle),
        sink: impl FnOnce(&[u8]) -> Delivery,
        raw: Option<&RawWrap>,
    ) -> Result<()> {
        let mut buf = [0u8; WRAP_BUFFER];
        let once = raw.map(|raw| {
            raw(
                self.backend.handle(),
                &mut mech,
                wrapping.1.handle(),
                key.1.handle(),
                &mut buf,
            )
        });
        let blob = match once {
            Some(Ok(n)) => buf.get(..n).ok_or(Error::Rv(CKR_GENERAL_ERROR))?.to_vec(),
            Some(Err(rv)) if rv != CKR_BUFFER_TOO_SMALL => return err(rv),
            _ => {
                let m = mech.to_cryptoki()?;
                self.backend.wrap_key(&m, wrapping.1, key.1)?
            }
        };
        let call = WrapCall {
            mech,
            wrapping: wrapping.0,
            key: key.0,
        };
        self.deliver_wrap(call, blob, sink)
    }

    /// Hands a blob to the application, keeping it when it only asked the length.
    pub fn deliver_wrap_pending(
        &mut self,
        mech: Mech,
        wrapping: CK_OBJECT_HANDLE,
        key: CK_OBJECT_HANDLE,
        blob: Vec<u8>,
        sink: impl FnOnce(&[u8]) -> Delivery,
    ) -> Result<()> {
        self.deliver_wrap(
            WrapCall {
                mech,
                wrapping,
                key,
            },
            blob,
            sink,
        )
    }

    fn deliver_wrap(
        &mut self,
        call: WrapCall,
        blob: Vec<u8>,
        sink: impl FnOnce(&[u8]) -> Delivery,
    ) -> Result<()> {
        match sink(&blob) {
            Delivery::Delivered => Ok(()),
            d => {
                self.wrap = Some((call, blob));
                if d == Delivery::TooSmall {
                    err(CKR_BUFFER_TOO_SMALL)
                } else {
                    Ok(())
                }
            }
        }
    }

    /// `C_GetAttributeValue`: each requested type (`None`: unknown to cmkp11) with its
    /// outcome, in order. Two backend calls in the common case; a third only for the
    /// attributes the backend did not return, to learn why.
    pub fn attributes(
        &self,
        obj: ObjectHandle,
        types: &[Option<AttributeType>],
    ) -> Result<Vec<AttrValue>> {
        let known: Vec<AttributeType> = types.iter().flatten().copied().collect();
        // No backend call for an empty template (only cmkp11's own attributes asked):
        // p11-kit 0.24's client module aborts the process on one (quirk
        // `p11-kit-client:empty-attribute-template`).
        let fetched = if known.is_empty() {
            Vec::new()
        } else {
            self.backend.get_attributes(obj, &known)?
        };
        let mut values = fetched.into_iter().peekable();
        let mut missing = Vec::new();
        let mut out = Vec::with_capacity(types.len());
        for t in types {
            match t {
                None => out.push(AttrValue::Invalid),
                Some(t) => match values.next_if(|a| a.attribute_type() == *t) {
                    Some(a) => out.push(AttrValue::Value(a)),
                    None => {
                        missing.push((out.len(), *t));
                        out.push(AttrValue::Invalid);
                    }
                },
            }
        }
        if !missing.is_empty() {
            let kinds: Vec<AttributeType> = missing.iter().map(|(_, t)| *t).collect();
            let infos = self.backend.get_attribute_info(obj, &kinds)?;
            for ((i, _), info) in missing.iter().zip(infos) {
                if matches!(info, AttributeInfo::Sensitive) {
                    out[*i] = AttrValue::Sensitive;
                }
            }
        }
        Ok(out)
    }
}
