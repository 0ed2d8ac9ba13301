//! cmkp11's own object handles: non-zero, never reused in a process, and stable for the
//! same backend object. Session objects are forgotten when their session closes.

use crate::error::{Error, Result};
use crate::policy::{KeyInfo, Origin};
use cryptoki::object::ObjectHandle;
use cryptoki_sys::*;
use parking_lot::RwLock;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A fast hasher for the handle maps: their keys are handles (integers cmkp11 or the
/// backend allocates, not chosen by an attacker who could aim for collisions), so
/// SipHash's protection buys nothing on this hot path.
#[derive(Default, Clone, Copy)]
pub struct HandleHasher(u64);

impl Hasher for HandleHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(5) ^ u64::from(*b)).wrapping_mul(0x517c_c1b7_2722_0a95);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// A `HashMap` keyed by handles.
pub type HandleMap<K, V> = HashMap<K, V, BuildHasherDefault<HandleHasher>>;
use std::sync::Arc;

#[derive(Clone)]
struct Entry {
    slot: CK_SLOT_ID,
    obj: ObjectHandle,
    owner: Option<CK_SESSION_HANDLE>,
    /// `CKA_VALUE_LEN` known to cmkp11 where the backend reports none (unwrapped keys).
    value_len: Option<CK_ULONG>,
    /// What the policy knows of the object, loaded on first use.
    info: Option<Arc<KeyInfo>>,
    /// For a DEK: the CMK that unwrapped it or first wrapped it.
    origin: Origin,
    /// Imported in plaintext (test switch).
    imported: bool,
    /// Generated inside the token through cmkp11 (`C_GenerateKey`, `C_GenerateKeyPair`).
    generated: bool,
    /// For a CMK's logical handle: the CMK's identity (operations use its primary).
    cmk: Option<Vec<u8>>,
    /// A session may hold a decision about this object (see [`HandleTable::epoch`]):
    /// changing or forgetting the entry then moves the epoch on.
    decided: bool,
}

#[derive(Default)]
struct Tables {
    next: CK_OBJECT_HANDLE,
    ours: HandleMap<CK_OBJECT_HANDLE, Entry>,
    backend: HandleMap<(CK_SLOT_ID, CK_OBJECT_HANDLE), CK_OBJECT_HANDLE>,
    logical: HandleMap<(CK_SLOT_ID, Vec<u8>), CK_OBJECT_HANDLE>,
}

/// The map between cmkp11's object handles and the backend's.
#[derive(Default)]
pub struct HandleTable {
    t: RwLock<Tables>,
    /// Counts changes to entries decided about (forgotten objects, changed facts): a
    /// decision remembered under an older epoch is not reused.
    epoch: std::sync::atomic::AtomicU64,
}

impl HandleTable {
    /// The current epoch: it moves on whenever an entry that a session's remembered
    /// decision may rest on changes or is forgotten (see [`HandleTable::mark_decided`]).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(std::sync::atomic::Ordering::Acquire)
    }

    fn changed(&self) {
        self.epoch.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// Notes that a decision about `h` may be remembered. Call it before reading the
    /// epoch and the facts the decision rests on, so that any later change to the entry
    /// moves the epoch on. Changes to entries never decided about leave it alone (an
    /// application destroying the DEKs it unwraps does not void the unwrapping key's
    /// remembered decision).
    pub fn mark_decided(&self, h: CK_OBJECT_HANDLE) {
        if self.t.read().ours.get(&h).is_none_or(|e| e.decided) {
            return;
        }
        if let Some(e) = self.t.write().ours.get_mut(&h) {
            e.decided = true;
        }
    }

    /// Runs `f` on entry `h` under the write lock; moves the epoch on if the entry was
    /// decided about.
    fn change(&self, h: CK_OBJECT_HANDLE, f: impl FnOnce(&mut Entry)) {
        let mut t = self.t.write();
        if let Some(e) = t.ours.get_mut(&h) {
            if e.decided {
                self.changed();
            }
            f(e);
        }
    }

    /// cmkp11's handle for a backend object, allocating one the first time it is seen.
    /// `owner` is the session of a session object created through cmkp11.
    pub fn ours(
        &self,
        slot: CK_SLOT_ID,
        obj: ObjectHandle,
        owner: Option<CK_SESSION_HANDLE>,
    ) -> CK_OBJECT_HANDLE {
        self.ours_found(slot, obj, owner)
    }

    /// [`HandleTable::ours`] for a new key whose value length and origin cmkp11 knows (an
    /// unwrapped DEK), recorded in the same step.
    ///
    /// One write lock and no lookup beforehand: the object is nearly always new (it was
    /// just made), so a read-locked lookup first would only add a second lock.
    pub fn ours_with(
        &self,
        slot: CK_SLOT_ID,
        obj: ObjectHandle,
        owner: Option<CK_SESSION_HANDLE>,
        value_len: Option<CK_ULONG>,
        origin: Origin,
        generated: bool,
    ) -> CK_OBJECT_HANDLE {
        let (h, new) = {
            let mut t = self.t.write();
            let t = &mut *t;
            let next = t.next + 1;
            let h = *t.backend.entry((slot, obj.handle())).or_insert(next);
            if h == next {
                t.next = next;
                t.ours.insert(
                    h,
                    Entry {
                        slot,
                        obj,
                        owner,
                        value_len,
                        info: None,
                        origin,
                        imported: false,
                        generated,
                        cmk: None,
                        decided: false,
                    },
                );
            }
            (h, h == next)
        };
        if !new {
            // Seen before (a token object found again, or a backend that reuses the handle
            // of an object cmkp11 was not told is gone): record the facts as changes to the
            // existing entry (rare: two more locks).
            if let Some(len) = value_len {
                self.set_value_len(h, len);
            }
            if let Some(o) = origin {
                self.set_origin(h, o);
            }
        }
        h
    }

    /// [`HandleTable::ours`] without taking the write lock when the object has a handle
    /// already (objects found, or read from the keystore, again and again).
    fn ours_found(
        &self,
        slot: CK_SLOT_ID,
        obj: ObjectHandle,
        owner: Option<CK_SESSION_HANDLE>,
    ) -> CK_OBJECT_HANDLE {
        if let Some(h) = self.t.read().backend.get(&(slot, obj.handle())) {
            return *h;
        }
        self.ours_with(slot, obj, owner, None, None, false)
    }

    /// cmkp11's handle of a backend object it has handed out already, if any.
    pub fn known(&self, slot: CK_SLOT_ID, obj: ObjectHandle) -> Option<CK_OBJECT_HANDLE> {
        self.t.read().backend.get(&(slot, obj.handle())).copied()
    }

    /// The logical handle of CMK `id` (one per CMK, whatever its versions); `obj` is a
    /// version object of it, used until the keystore names the primary.
    pub fn logical(&self, slot: CK_SLOT_ID, id: &[u8], obj: ObjectHandle) -> CK_OBJECT_HANDLE {
        let key = (slot, id.to_vec());
        {
            let t = self.t.read();
            if let Some(h) = t.logical.get(&key) {
                if t.ours.get(h).is_some_and(|e| e.obj == obj) {
                    return *h;
                }
            }
        }
        let mut t = self.t.write();
        if let Some(h) = t.logical.get(&key).copied() {
            // Found again through another backend handle (the token renumbers private
            // objects after a logout): the entry follows, or it would point to a handle
            // the token no longer knows.
            drop(t);
            self.repoint(h, obj);
            return h;
        }
        t.next += 1;
        let h = t.next;
        t.logical.insert(key, h);
        t.ours.insert(
            h,
            Entry {
                slot,
                obj,
                owner: None,
                value_len: None,
                info: None,
                origin: None,
                imported: false,
                generated: true,
                cmk: Some(id.to_vec()),
                decided: false,
            },
        );
        h
    }

    /// Points logical handle `h` at backend object `obj` (a version of its CMK), when it
    /// pointed elsewhere.
    pub fn repoint(&self, h: CK_OBJECT_HANDLE, obj: ObjectHandle) {
        let mut t = self.t.write();
        if let Some(e) = t.ours.get_mut(&h) {
            if e.cmk.is_some() && e.obj != obj {
                e.obj = obj;
                e.info = None;
                if e.decided {
                    self.changed();
                }
            }
        }
    }

    /// The logical handles of `slot` with their CMK identities.
    pub fn logical_of(&self, slot: CK_SLOT_ID) -> Vec<(CK_OBJECT_HANDLE, Vec<u8>)> {
        self.t
            .read()
            .logical
            .iter()
            .filter(|((s, _), _)| *s == slot)
            .map(|((_, id), h)| (*h, id.clone()))
            .collect()
    }

    /// The CMK identity of a logical handle.
    pub fn logical_id(&self, h: CK_OBJECT_HANDLE) -> Option<Vec<u8>> {
        self.t.read().ours.get(&h).and_then(|e| e.cmk.clone())
    }

    /// Runs `f` on the CMK identity of a logical handle, without copying it.
    pub fn with_logical_id<R>(&self, h: CK_OBJECT_HANDLE, f: impl FnOnce(Option<&[u8]>) -> R) -> R {
        let t = self.t.read();
        f(t.ours.get(&h).and_then(|e| e.cmk.as_deref()))
    }

    /// The backend object behind cmkp11's handle `h` in `slot`; `invalid` is the code to
    /// return when there is none (`CKR_OBJECT_HANDLE_INVALID`, `CKR_KEY_HANDLE_INVALID`...).
    pub fn backend(
        &self,
        slot: CK_SLOT_ID,
        h: CK_OBJECT_HANDLE,
        invalid: CK_RV,
    ) -> Result<ObjectHandle> {
        match self.t.read().ours.get(&h) {
            Some(e) if e.slot == slot => Ok(e.obj),
            _ => Err(Error::Rv(invalid)),
        }
    }

    /// The backend object behind `h` if it is a session object created through cmkp11 in
    /// `slot` (such an object is never a CMK).
    pub fn session_object(&self, slot: CK_SLOT_ID, h: CK_OBJECT_HANDLE) -> Option<ObjectHandle> {
        match self.t.read().ours.get(&h) {
            Some(e) if e.slot == slot && e.owner.is_some() => Some(e.obj),
            _ => None,
        }
    }

    /// Records the `CKA_VALUE_LEN` of an object whose backend reports none.
    pub fn set_value_len(&self, h: CK_OBJECT_HANDLE, len: CK_ULONG) {
        self.change(h, |e| e.value_len = Some(len));
    }

    /// The `CKA_VALUE_LEN` recorded by [`set_value_len`](Self::set_value_len).
    pub fn value_len(&self, h: CK_OBJECT_HANDLE) -> Option<CK_ULONG> {
        self.t.read().ours.get(&h).and_then(|e| e.value_len)
    }

    /// The cached policy facts of an object, with the facts only cmkp11 knows applied.
    pub fn info(&self, h: CK_OBJECT_HANDLE) -> Option<Arc<KeyInfo>> {
        self.t.read().ours.get(&h).and_then(|e| e.info.clone())
    }

    /// Caches the policy facts of an object (`None` forgets them, e.g. after a change).
    pub fn set_info(&self, h: CK_OBJECT_HANDLE, info: Option<Arc<KeyInfo>>) {
        self.change(h, |e| e.info = info);
    }

    /// The facts cmkp11 alone knows: (value length override, origin, imported).
    pub fn local_facts(&self, h: CK_OBJECT_HANDLE) -> (Option<CK_ULONG>, Origin, bool) {
        self.t
            .read()
            .ours
            .get(&h)
            .map(|e| (e.value_len, e.origin, e.imported))
            .unwrap_or_default()
    }

    /// Records where a DEK came from (only the first time).
    pub fn set_origin(&self, h: CK_OBJECT_HANDLE, origin: CK_OBJECT_HANDLE) {
        if self
            .t
            .read()
            .ours
            .get(&h)
            .is_none_or(|e| e.origin.is_some())
        {
            return;
        }
        self.change(h, |e| {
            e.origin.get_or_insert(origin);
        });
    }

    /// Marks an object as generated inside the token through cmkp11.
    pub fn mark_generated(&self, h: CK_OBJECT_HANDLE) {
        self.change(h, |e| e.generated = true);
    }

    /// Whether cmkp11 saw the object generated inside the token.
    pub fn generated(&self, h: CK_OBJECT_HANDLE) -> bool {
        self.t.read().ours.get(&h).is_some_and(|e| e.generated)
    }

    /// Marks an object as imported in plaintext.
    pub fn mark_imported(&self, h: CK_OBJECT_HANDLE) {
        self.change(h, |e| {
            e.imported = true;
            e.info = None;
        });
    }

    /// One lookup for a use: the backend object, the cached facts, and whether `h` is a
    /// CMK's logical handle.
    pub fn lookup(
        &self,
        slot: CK_SLOT_ID,
        h: CK_OBJECT_HANDLE,
        invalid: CK_RV,
    ) -> Result<(ObjectHandle, Option<Arc<KeyInfo>>, bool)> {
        match self.t.read().ours.get(&h) {
            Some(e) if e.slot == slot => Ok((e.obj, e.info.clone(), e.cmk.is_some())),
            _ => Err(Error::Rv(invalid)),
        }
    }

    /// The entries of `slot`: (cmkp11's handle, backend object).
    pub fn entries_of(&self, slot: CK_SLOT_ID) -> Vec<(CK_OBJECT_HANDLE, ObjectHandle)> {
        self.t
            .read()
            .ours
            .iter()
            .filter(|(_, e)| e.slot == slot)
            .map(|(h, e)| (*h, e.obj))
            .collect()
    }

    /// Forgets handles whose backend object is gone (e.g. private objects after a
    /// logout: PKCS#11 makes their handles invalid for good, and the token may give the
    /// same objects other handles later), so that a stale entry never answers for an
    /// object the backend may later number the same way. A CMK's logical handle is
    /// cmkp11's, not the token's: it stays, and is pointed at the CMK's current object at
    /// the next login ([`HandleTable::repoint`]) or find.
    pub fn forget_all(&self, gone: &[CK_OBJECT_HANDLE]) {
        if gone.is_empty() {
            return;
        }
        let mut t = self.t.write();
        let t = &mut *t;
        let mut decided = false;
        for h in gone {
            if t.ours.get(h).is_some_and(|e| e.cmk.is_some()) {
                continue;
            }
            if let Some(e) = t.ours.remove(h) {
                decided |= e.decided;
                t.backend.remove(&(e.slot, e.obj.handle()));
            }
        }
        if decided {
            self.changed();
        }
    }

    /// Forgets one handle (the object was destroyed).
    pub fn forget(&self, h: CK_OBJECT_HANDLE) {
        let mut t = self.t.write();
        if let Some(e) = t.ours.remove(&h) {
            if e.decided {
                self.changed();
            }
            t.backend.remove(&(e.slot, e.obj.handle()));
        }
    }

    /// Forgets the session objects created in the sessions `closed` (they closed): one
    /// pass over the table, so that making and destroying an object needs no per-session
    /// list (which a destroy would have to search).
    pub fn forget_owned_by(&self, closed: &[CK_SESSION_HANDLE]) {
        let mut t = self.t.write();
        let t = &mut *t;
        let mut decided = false;
        t.ours.retain(|_, e| {
            let gone = e.owner.is_some_and(|o| closed.contains(&o));
            if gone {
                decided |= e.decided;
                t.backend.remove(&(e.slot, e.obj.handle()));
            }
            !gone
        });
        if decided {
            self.changed();
        }
    }
}
