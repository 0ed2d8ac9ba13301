//! Each slot's view of its CMKs, shared by the sessions of the process and refreshed from
//! the token at most every [`REFRESH`], so that a change made by another process (the CLI
//! rotates, disables, schedules deletion) takes effect here within that time.

use crate::keystore::{self, View};
use cryptoki::context::Pkcs11;
use cryptoki::session::Session as BackendSession;
use cryptoki::slot::Slot;
use parking_lot::{Mutex, RwLock};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How often the background refresher (see [`Refresher`]) reads the token again for a
/// view in use; also how old a view may get before a call reloads it itself when no
/// refresher runs (the application forbade threads, or none could be started).
pub const REFRESH: Duration = Duration::from_millis(400);

/// How old a view may get before a call reloads it itself while a refresher runs: the
/// refresher skips a view nobody used in its last period, so the first use after a quiet
/// spell finds it older than [`REFRESH`]. Below one second with the reload's own time:
/// a change made by another process takes effect here within one second.
const STALE_WITH_REFRESHER: Duration = Duration::from_millis(900);

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
    /// Secret keys already known to be usable (see `keystore::load`).
    usable: Mutex<std::collections::HashSet<cryptoki_sys::CK_OBJECT_HANDLE>>,
    /// Counts [`SlotStore::invalidate`] calls; a load marks its view fresh only if none
    /// came while it read the token (the lock orders the two).
    changes: Mutex<u64>,
    /// The view was used since the refresher's last visit.
    used: AtomicBool,
    /// A refresher keeps this view fresh.
    background: AtomicBool,
}

impl Default for SlotStore {
    fn default() -> Self {
        SlotStore {
            view: RwLock::new((0, Arc::new(View::default()))),
            generation: AtomicU64::new(0),
            loaded: AtomicU64::new(u64::MAX),
            loading: Mutex::new(None),
            usable: Mutex::new(std::collections::HashSet::new()),
            changes: Mutex::new(0),
            used: AtomicBool::new(false),
            background: AtomicBool::new(false),
        }
    }
}

impl SlotStore {
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

    /// Reloads the view if it is stale, unless another thread is loading it. With a
    /// refresher running this only notes the use: the refresher reloads, in its own
    /// thread, and the application's threads reload only a view marked stale (after a
    /// login or a change made by this process) or one the refresher left alone.
    fn refresh(&self, ctx: &Pkcs11, slot: Slot) {
        let loaded = self.loaded.load(Ordering::Acquire);
        if loaded == u64::MAX {
            // Marked stale (a login, a change made by this process): the caller must see
            // a view read after that, so it waits for a load in progress and loads again
            // unless that load began after the mark.
            let mut s = self.loading.lock();
            if self.loaded.load(Ordering::Acquire) == u64::MAX {
                self.load(&mut s, ctx, slot);
            }
            return;
        }
        {
            if !self.used.load(Ordering::Relaxed) {
                self.used.store(true, Ordering::Relaxed);
            }
            let limit = if self.background.load(Ordering::Relaxed) {
                STALE_WITH_REFRESHER
            } else {
                REFRESH
            };
            if crate::ffi::coarse_ms().saturating_sub(loaded) <= limit.as_millis() as u64 {
                return;
            }
        }
        // Only old: a thread that finds another one loading uses the current view.
        if let Some(mut s) = self.loading.try_lock() {
            self.load(&mut s, ctx, slot);
        }
    }

    /// The refresher's visit: reloads a view used since the last visit (a view marked
    /// stale is left to its next use).
    fn refresh_in_background(&self, ctx: &Pkcs11, slot: Slot) {
        if self.loaded.load(Ordering::Acquire) == u64::MAX
            || !self.used.swap(false, Ordering::Relaxed)
        {
            return;
        }
        self.load(&mut self.loading.lock(), ctx, slot);
    }

    /// The refresher stopped: calls reload stale views themselves again.
    fn foreground(&self) {
        self.background.store(false, Ordering::Relaxed);
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
        let started = crate::ffi::coarse_ms();
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

/// A thread of cmkp11's own that reloads the keystore views in use every [`REFRESH`], so
/// that the application's threads do not. A reload in an application's thread costs more
/// than its own ~1 ms: the views and the token's buffers it allocates end up among that
/// thread's per-operation buffers, and every later operation of the thread pays for it
/// (measured with two threads: 5-8 % fewer AES-GCM operations per second, the median
/// operation slower). Started by `C_Initialize` unless the application forbids threads
/// (`CKF_LIBRARY_CANT_CREATE_OS_THREADS`), stopped and joined by `C_Finalize`; `fork()`
/// waits for a reload in progress (see [`Refresher::busy`]).
#[derive(Default)]
pub struct Refresher {
    stop: Mutex<bool>,
    wake: parking_lot::Condvar,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Held during a reload. The atfork handlers hold it across `fork()`, so that the
    /// child never inherits the token's locks taken by a reload cut in half.
    pub busy: Mutex<()>,
}

impl Refresher {
    /// Starts the thread for `stores` (the slot of each in `slots`); false if it could
    /// not be started (calls then reload stale views themselves).
    pub fn start(
        &'static self,
        ctx: &'static Pkcs11,
        stores: &'static [SlotStore],
        slots: &'static [Slot],
    ) -> bool {
        let run = move || loop {
            {
                let mut stop = self.stop.lock();
                if !*stop {
                    self.wake.wait_for(&mut stop, REFRESH);
                }
                if *stop {
                    return;
                }
            }
            let _busy = self.busy.lock();
            for (store, slot) in stores.iter().zip(slots) {
                store.refresh_in_background(ctx, *slot);
            }
        };
        for s in stores {
            s.background.store(true, Ordering::Relaxed);
        }
        match std::thread::Builder::new()
            .name("cmkp11-refresh".into())
            .spawn(run)
        {
            Ok(t) => {
                *self.thread.lock() = Some(t);
                true
            }
            Err(e) => {
                for s in stores {
                    s.foreground();
                }
                log::warn!("cannot start the keystore refresher thread ({e}): calls will reload the keystore themselves");
                false
            }
        }
    }

    /// Stops and joins the thread (if one runs); the views go back to reloading in the
    /// calling threads.
    pub fn stop(&self, stores: &[SlotStore]) {
        *self.stop.lock() = true;
        self.wake.notify_all();
        if let Some(t) = self.thread.lock().take() {
            if t.join().is_err() {
                log::error!("the keystore refresher thread panicked");
            }
        }
        for s in stores {
            s.foreground();
        }
    }
}
