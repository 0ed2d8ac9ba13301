//! Each slot's view of its CMKs, shared by the sessions of the process and refreshed from
//! the token at most every [`REFRESH`], so that a change made by another process (the CLI
//! rotates, disables, schedules deletion) takes effect here within that time.

use crate::keystore::{self, View};
use cryptoki::session::Session as BackendSession;
use parking_lot::{Mutex, RwLock};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The longest a view is used without reading the token again.
pub const REFRESH: Duration = Duration::from_millis(500);

/// One slot's keystore view.
pub struct SlotStore {
    view: RwLock<Arc<View>>,
    /// Milliseconds since `epoch` of the last load; `u64::MAX` when stale.
    loaded: AtomicU64,
    epoch: Instant,
    loading: Mutex<()>,
}

impl Default for SlotStore {
    fn default() -> Self {
        SlotStore {
            view: RwLock::new(Arc::new(View::default())),
            loaded: AtomicU64::new(u64::MAX),
            epoch: Instant::now(),
            loading: Mutex::new(()),
        }
    }
}

impl SlotStore {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The current view, reloaded through `s` when older than [`REFRESH`]. A thread that
    /// finds another one loading uses the previous view rather than wait.
    pub fn get(&self, s: &BackendSession) -> Arc<View> {
        let loaded = self.loaded.load(Ordering::Acquire);
        if loaded == u64::MAX || self.now_ms().saturating_sub(loaded) > REFRESH.as_millis() as u64 {
            if let Some(_g) = self.loading.try_lock() {
                return self.load(s);
            }
        }
        self.view.read().clone()
    }

    /// Reloads now (after a change made by this process).
    pub fn reload(&self, s: &BackendSession) -> Arc<View> {
        let _g = self.loading.lock();
        self.load(s)
    }

    fn load(&self, s: &BackendSession) -> Arc<View> {
        let started = self.now_ms();
        match keystore::load(s) {
            Ok(v) => {
                let v = Arc::new(v);
                *self.view.write() = v.clone();
                self.loaded.store(started, Ordering::Release);
                v
            }
            Err(e) => {
                log::debug!("keystore: cannot read the token's keys now: {e}");
                self.view.read().clone()
            }
        }
    }

    /// Marks the view stale (login state changed, or this process changed a key).
    pub fn invalidate(&self) {
        self.loaded.store(u64::MAX, Ordering::Release);
    }
}
