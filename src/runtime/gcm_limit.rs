//! The AES-GCM invocation limit per CMK version (NIST SP 800-38D §8.3): every AES-GCM
//! `C_EncryptInit` under a secret CMK counts one invocation of its primary version; when
//! a version has made `keys.gcm_invocation_limit` of them, cmkp11 rotates the key (an
//! audited `rotate` whose reason names the limit) and the encryption goes on with the new
//! version. Older versions keep decrypting.
//!
//! Counts are reserved from the token in blocks before use ([`crate::keystore::counter`]),
//! so they survive restarts and crashes and are never under-counted. A block is
//! `limit / 1024` invocations, between 1 and 65,536: one token write per block per
//! process. The in-memory part is one mutex per version, found by (slot, backend object),
//! so the cost per encryption is two uncontended locks and a hash lookup.

use super::session::Session;
use super::Library;
use crate::error::{err, Error, Result};
use crate::keystore::{self, counter, lifecycle, State};
use cryptoki::object::ObjectHandle;
use cryptoki_sys::*;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;

/// One version's count in this process.
#[derive(Debug)]
struct Count {
    /// The CMK's identity and name.
    id: Vec<u8>,
    name: String,
    version: u32,
    /// Invocations counted (used or reserved by others before this process's block).
    next: u64,
    /// End of this process's reserved block.
    end: u64,
}

/// One version's counter, shared by the threads that encrypt with it.
type Shared = Arc<Mutex<Count>>;

/// This process's counters, by (slot, backend object of the version); only versions of
/// secret CMKs have one.
#[derive(Debug, Default)]
pub struct Counters {
    map: Mutex<HashMap<(CK_SLOT_ID, CK_OBJECT_HANDLE), Shared>>,
}

impl Counters {
    /// Forgets every in-memory count (after a purge: a backend handle could be given to
    /// another object). Conservative: the rest of each reserved block is not used.
    pub fn forget(&self) {
        self.map.lock().clear();
    }
}

/// What a count said.
enum Taken {
    /// One invocation is this encryption's.
    Yes,
    /// The version reached the limit: rotate first.
    Exhausted,
}

/// The block of invocations reserved at once for `limit`.
pub fn block(limit: u64) -> u64 {
    (limit / 1024).clamp(1, 65_536)
}

/// Internal code of a decision to make again: the version reached its limit and the key
/// was rotated (or found rotated). Never returned to an application
/// ([`Library::crypto_decide`] decides again; anything else maps it to
/// `CKR_FUNCTION_FAILED`).
pub(crate) const DECIDE_AGAIN: CK_RV = CKR_VENDOR_DEFINED | 0x434D_4B47;

impl Library {
    /// Counts the use about to be made of `obj` when it is an AES-GCM encryption under a
    /// version of a secret CMK. When that version reached the limit, rotates the key and
    /// returns [`DECIDE_AGAIN`]: nothing was used, nothing audited as used.
    #[inline]
    pub(crate) fn gcm_gate(
        &self,
        s: &Session,
        op: crate::policy::Op,
        mech: CK_MECHANISM_TYPE,
        info: &crate::policy::KeyInfo,
        obj: Option<ObjectHandle>,
    ) -> Result<()> {
        let Some(obj) = obj else {
            return Ok(());
        };
        if op != crate::policy::Op::Encrypt
            || mech != CKM_AES_GCM
            || info.class != CKO_SECRET_KEY
            || !info.token
        {
            return Ok(());
        }
        self.gcm_gate_cmk(s, obj)
    }

    #[inline(never)]
    fn gcm_gate_cmk(&self, s: &Session, obj: ObjectHandle) -> Result<()> {
        let limit = self.cfg.keys.gcm_invocation_limit;
        let Some(count) = self.gcm_count(s, obj) else {
            return Ok(());
        };
        let mut c = count.lock();
        match self.gcm_take(s, &mut c, limit)? {
            Taken::Yes => Ok(()),
            Taken::Exhausted => {
                self.gcm_rotate(s, &c, limit)?;
                err(DECIDE_AGAIN)
            }
        }
    }

    /// The counter of backend object `obj`, made on first use (`None`: not a version of
    /// a secret CMK).
    fn gcm_count(&self, s: &Session, obj: ObjectHandle) -> Option<Shared> {
        let k = (s.slot_id, obj.handle());
        if let Some(c) = self.gcm.map.lock().get(&k) {
            return Some(c.clone());
        }
        let view = self.view(s);
        let made = view.of_object(obj).and_then(|(cmk, version)| {
            (cmk.class == CKO_SECRET_KEY).then(|| {
                Arc::new(Mutex::new(Count {
                    id: cmk.id.clone(),
                    name: cmk.name(),
                    version,
                    next: 0,
                    end: 0,
                }))
            })
        });
        // Only versions are remembered (a bounded set); anything else is looked up again.
        let made = made?;
        Some(self.gcm.map.lock().entry(k).or_insert(made).clone())
    }

    /// Takes one invocation of `c`, reserving a block from the token when needed.
    fn gcm_take(&self, s: &Session, c: &mut Count, limit: u64) -> Result<Taken> {
        if c.next >= limit {
            return Ok(Taken::Exhausted);
        }
        if c.next >= c.end {
            let b = self.rw_backend(s)?;
            let (start, end) = counter::reserve(&b, &c.id, c.version, block(limit), limit)
                .inspect_err(|e| {
                    log::error!(
                        "key `{}` version {}: cannot reserve AES-GCM invocations in the token ({e}); encryption refused",
                        c.name, c.version
                    )
                })?;
            c.next = c.next.max(start);
            c.end = end;
            if c.next >= c.end {
                c.next = limit;
                return Ok(Taken::Exhausted);
            }
        }
        c.next += 1;
        Ok(Taken::Yes)
    }

    /// A read-write backend session of the slot of `s` (the application's own may be
    /// read-only; the login state is the process's).
    fn rw_backend(&self, s: &Session) -> Result<cryptoki::session::Session> {
        Ok(self
            .backend
            .ctx
            .open_rw_session(self.backend.slots[s.slot_id as usize])?)
    }

    /// Rotates the CMK of `c` because its version reached the limit, unless a newer
    /// version exists already (another thread or process rotated it).
    fn gcm_rotate(&self, s: &Session, c: &Count, limit: u64) -> Result<()> {
        let view = self.reload_view(s);
        let Some(cmk) = view.cmks.get(&c.id) else {
            return err(CKR_KEY_HANDLE_INVALID);
        };
        if cmk.primary().is_some_and(|(v, _)| v > c.version) {
            return Ok(());
        }
        if cmk.state(keystore::now()) != State::Enabled {
            return err(CKR_KEY_FUNCTION_NOT_PERMITTED);
        }
        let reason = format!(
            "AES-GCM invocation limit: version {} made {limit} encryptions (keys.gcm_invocation_limit)",
            c.version
        );
        // Not `audit_intent`'s operator gate: this rotation is cmkp11's own policy at work
        // inside an application's call, not a lifecycle step the application asked for.
        self.policy_intent(s, "rotate", Some(&cmk.name()), Some(&cmk.id), None)?;
        let b = self.rw_backend(s)?;
        let result = lifecycle::rotate(&b, cmk);
        self.stores[s.slot_id as usize].invalidate();
        let mut rec =
            crate::audit::Record::new("rotate", result.as_ref().map_or_else(Error::rv, |_| CKR_OK));
        rec.key = Some(cmk.name());
        rec.key_id = Some(cmk.id.clone());
        rec.version = result.as_ref().ok().copied();
        rec.reason = Some(reason.clone());
        let _ = self.audit_record(s, rec);
        match result {
            Ok(v) => {
                log::warn!(
                    "CMK `{}` rotated: {reason}; version {v} is primary",
                    cmk.name()
                );
                Ok(())
            }
            Err(e) => {
                log::error!(
                    "CMK `{}`: {reason}, and the rotation failed ({e}): AES-GCM encryption with it is refused until it is rotated",
                    cmk.name()
                );
                Err(e)
            }
        }
    }
}
