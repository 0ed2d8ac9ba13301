//! Each slot's view of its CMKs, shared by the sessions of the process and refreshed from
//! the token at most every [`REFRESH`], so that a change made by another process (the CLI
//! rotates, disables, schedules deletion) takes effect here within that time.

use crate::keystore::{self, View};
use cryptoki::context::Pkcs11;
use cryptoki::session::Session as BackendSession;
use cryptoki::slot::Slot;
use parking_lot::{Mutex, RwLock};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The longest a view is used without reading the token again.
pub const REFRESH: Duration = Duration::from_millis(500);

/// One slot's keystore view.
pub struct SlotStore {
    /// The view and its generation (counts loads).
    view: RwLock<(u64, Arc<View>)>,
    /// The generation of the current view, readable without the lock.
    generation: AtomicU64,
    /// [`now_ms`] of the last load; `u64::MAX` when stale.
    loaded: AtomicU64,
    /// A read-only backend session of cmkp11's own for reading the keystore, so that an
    /// application's session with an operation in progress is never disturbed (SoftHSM2
    /// refuses a search while a session has an active operation).
    loading: Mutex<Option<BackendSession>>,
    /// What is known of key objects already (see `keystore::load`).
    usable: Mutex<keystore::Cache>,
    /// Counts [`SlotStore::invalidate`] calls; a load marks its view fresh only if none
    /// came while it read the token (the lock orders the two).
    changes: Mutex<u64>,
}

impl Default for SlotStore {
    fn default() -> Self {
        SlotStore {
            view: RwLock::new((0, Arc::new(View::default()))),
            generation: AtomicU64::new(0),
            loaded: AtomicU64::new(u64::MAX),
            loading: Mutex::new(None),
            usable: Mutex::new(keystore::Cache::default()),
            changes: Mutex::new(0),
        }
    }
}

impl SlotStore {
    /// A store that trusts, besides keys born in the token, what `trust` says.
    pub fn new(trust: keystore::Trust) -> SlotStore {
        let s = SlotStore::default();
        s.usable.lock().trust = trust;
        s
    }

    /// The current view, reloaded when older than [`REFRESH`]. A thread that finds another
    /// one loading uses the previous view rather than wait.
    pub fn get(&self, ctx: &Pkcs11, slot: Slot) -> Arc<View> {
        self.get_with_generation(ctx, slot).1
    }

    /// [`SlotStore::get`] and the view's generation (a new one after every load).
    pub fn get_with_generation(&self, ctx: &Pkcs11, slot: Slot) -> (u64, Arc<View>) {
        self.refresh(ctx, slot);
        self.view.read().clone()
    }

    /// The generation [`SlotStore::get`] would return now, without taking the view.
    pub fn generation(&self, ctx: &Pkcs11, slot: Slot) -> u64 {
        self.refresh(ctx, slot);
        self.generation.load(Ordering::Acquire)
    }

    /// Reloads the view if it is stale: a view marked stale (a login, a change made by
    /// this process) always, one only older than [`REFRESH`] unless another thread is
    /// loading it (the caller then uses the current one rather than wait).
    fn refresh(&self, ctx: &Pkcs11, slot: Slot) {
        let loaded = self.loaded.load(Ordering::Acquire);
        if loaded == u64::MAX {
            // The caller must see a view read after the mark: it waits for a load in
            // progress and loads again unless that load began after the mark.
            let mut s = self.loading.lock();
            if self.loaded.load(Ordering::Acquire) == u64::MAX {
                self.load(&mut s, ctx, slot);
            }
            return;
        }
        if crate::sys::coarse_ms().saturating_sub(loaded) <= REFRESH.as_millis() as u64 {
            return;
        }
        if let Some(mut s) = self.loading.try_lock() {
            self.load(&mut s, ctx, slot);
        }
    }

    /// Reloads now (after a change made by this process).
    pub fn reload(&self, ctx: &Pkcs11, slot: Slot) -> Arc<View> {
        let mut s = self.loading.lock();
        self.load(&mut s, ctx, slot)
    }

    /// Runs `f` with cmkp11's own session of this slot.
    pub fn with_session<R>(
        &self,
        ctx: &Pkcs11,
        slot: Slot,
        f: impl FnOnce(&BackendSession) -> crate::error::Result<R>,
    ) -> crate::error::Result<R> {
        let mut s = self.loading.lock();
        if s.is_none() {
            *s = Some(ctx.open_ro_session(slot)?);
        }
        f(s.as_ref().expect("opened above"))
    }

    fn load(&self, s: &mut Option<BackendSession>, ctx: &Pkcs11, slot: Slot) -> Arc<View> {
        let started = crate::sys::coarse_ms();
        let seen = *self.changes.lock();
        if s.is_none() {
            match ctx.open_ro_session(slot) {
                Ok(new) => *s = Some(new),
                Err(e) => {
                    log::debug!("keystore: cannot open a session: {e}");
                    return self.view.read().1.clone();
                }
            }
        }
        let loaded = keystore::load(s.as_ref().expect("opened above"), &mut self.usable.lock());
        match loaded {
            Ok(v) => {
                let kept = {
                    let cur = self.view.read();
                    // Nothing changed (the usual case): the current view stays, with its
                    // generation, so the decisions remembered under it stay valid.
                    (*cur.1 == v).then(|| cur.1.clone())
                };
                let v = match kept {
                    Some(v) => v,
                    None => {
                        let v = Arc::new(v);
                        let mut cur = self.view.write();
                        let generation = cur.0 + 1;
                        *cur = (generation, v.clone());
                        self.generation.store(generation, Ordering::Release);
                        v
                    }
                };
                // Fresh only if no change of this process's was announced while the token
                // was read: a load that began before it would otherwise hide it until the
                // next refresh (the view it installed may predate the change).
                let changes = self.changes.lock();
                if *changes == seen {
                    self.loaded.store(started, Ordering::Release);
                }
                v
            }
            Err(e) => {
                log::debug!("keystore: cannot read the token's keys now: {e}");
                // The session may have been closed under us (C_CloseAllSessions): reopen
                // next time.
                *s = None;
                self.view.read().1.clone()
            }
        }
    }

    /// Closes cmkp11's own session (the application closed its last one: the token must
    /// log the application out, which an open session of ours would prevent).
    pub fn close_session(&self) {
        *self.loading.lock() = None;
        self.invalidate();
    }

    /// Marks the view stale (login state changed, or this process changed a key).
    pub fn invalidate(&self) {
        let mut changes = self.changes.lock();
        *changes += 1;
        self.loaded.store(u64::MAX, Ordering::Release);
    }
}
