//! Process state: `C_Initialize`/`C_Finalize`, slots, sessions and handle tables.
//!
//! # Locks and their order
//! 1. `STATE` (global `RwLock<Option<&Library>>`): taken exclusively by
//!    `C_Initialize`, `C_Finalize` and across `fork()` (atfork handlers). Entry points do
//!    not take it: they read the library published in `CURRENT` with one atomic load.
//!    A library is never freed (`C_Finalize` closes its sessions and finalizes the
//!    backend, then leaks the small rest), so a call still in flight on another thread
//!    keeps valid memory without a reference count on every call.
//! 2. `Library::sessions` (`RwLock`): held only to clone a session's `Arc`, or to insert
//!    or remove one. The same lock guards each slot's count of sessions and its idle
//!    backend sessions (`SlotSessions`), so opening or closing a session takes it once.
//! 3. A session's own `Mutex`: held for the whole call on that session, including the
//!    backend call. Different sessions never wait for each other.
//! 4. `HandleTable` (`RwLock`): held only for a lookup or insert, never across a call.
//!
//! # Idle backend sessions
//! Opening a session costs a backend call (and, for a network HSM, a round trip), and many
//! applications open a session per operation. `C_CloseSession` therefore keeps the backend
//! session for the next `C_OpenSession` of the same slot and kind (read-only or
//! read-write) when it is exactly as good as a new one: no backend operation in progress
//! and no session object ever created in it (closing is what destroys those). The login
//! state is the token's, shared by every session of the application, so a kept session
//! carries nothing of its previous owner. When the application's last session of a slot
//! closes, the kept ones close too, so the token logs the application out as PKCS#11
//! §5.6 says; an SO login first closes the kept read-only ones (the token refuses an SO
//! login while a read-only session exists).
//!
//! A lock of a lower number is never taken while one of a higher number is held, no lock
//! is held across a call into application callbacks (cmkp11 makes none), and no
//! process-wide lock is held across a backend call.
//!
//! # fork()
//! The `pthread_atfork` prepare handler (installed by the FFI layer) first waits until no
//! thread is inside cmkp11 (`sys::fork`): the process is copied with every lock of
//! cmkp11, of its backend and of the libraries the backend uses free. The child handler
//! marks the inherited state as stale: every call in the child then returns
//! `CKR_CRYPTOKI_NOT_INITIALIZED` until the child calls `C_Initialize`, which leaks (never
//! drops) the parent's state so that the parent's backend sessions are not closed from the
//! child, and finalizes and initializes the backend's copy (consistent: no call was in
//! progress in it).

pub mod admin;
pub mod audit_mac;
pub mod caps;
pub mod export;
pub mod gcm_limit;
pub mod handles;
pub mod iv;
pub mod ops;
pub mod session;
mod slot;
pub mod store;

use crate::backend::token::Backend;
use crate::config::Config;
use crate::error::{err, Error, Result};
use cryptoki_sys::*;
use handles::HandleTable;
use parking_lot::{Mutex, RwLock};
use session::Session;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// The initialized library: configuration, backend, sessions and object handles.
pub struct Library {
    /// The configuration in force.
    pub cfg: Config,
    /// The backend module and the slots cmkp11 exposes.
    pub backend: Backend,
    /// The application's sessions and, per slot, their count and the idle backend
    /// sessions: one lock, taken once per `C_OpenSession` and once per `C_CloseSession`.
    sessions: RwLock<Sessions>,
    next_session: AtomicU64,
    /// Counts sessions removed from the table: a thread's remembered lookup (see
    /// [`Library::session`]) made before the latest removal is not used.
    removals: AtomicU64,
    /// cmkp11's object handles.
    pub objects: HandleTable,
    /// Policy switches.
    pub settings: crate::policy::Settings,
    /// This process, for access rules.
    pub caller: crate::policy::access::Caller,
    /// Each slot's keystore view.
    pub stores: Vec<store::SlotStore>,
    /// The audit log.
    pub audit: crate::audit::Auditor,
    /// The audit log's token side, when the log is on.
    audit_mac: Option<Arc<audit_mac::TokenAuditMac>>,
    /// Each slot's token label (for audit records).
    pub token_labels: Vec<String>,
    /// The IVs cmkp11 generates for AES-GCM encryption under a CMK.
    pub ivs: iv::IvSource,
    /// Mechanism parameters the backend accepted when probed (slot, operation, mechanism).
    pub probed: RwLock<std::collections::HashSet<(CK_SLOT_ID, u8, crate::backend::mech::Mech)>>,
    /// Each slot's capabilities record, probed when first needed (see [`caps`]).
    pub caps: crate::backend::probe::Cache,
    /// The `[[rate_limit]]` buckets of this process.
    pub rate: crate::policy::rate::Limiter,
    /// The AES-GCM invocation counts of this process (see [`gcm_limit`]).
    pub gcm: gcm_limit::Counters,
}

/// A thread's last session lookup (see [`Library::session`]).
struct LastLookup {
    library: usize,
    removals: u64,
    handle: CK_SESSION_HANDLE,
    session: std::sync::Weak<Mutex<Session>>,
}

/// A session in the table: its slot (readable without the session's lock) and the session.
type SessionEntry = (CK_SLOT_ID, Arc<Mutex<Session>>);

/// The session table.
#[derive(Default)]
struct Sessions {
    map: handles::HandleMap<CK_SESSION_HANDLE, SessionEntry>,
    slots: Vec<SlotSessions>,
}

/// What closing a session left to do outside the table's lock.
struct Gone {
    slot_id: CK_SLOT_ID,
    /// It was the application's last session of the slot.
    last: bool,
    /// Backend sessions to close (dropped outside the lock).
    to_close: Option<[Vec<cryptoki::session::Session>; 2]>,
    /// The closed session when it is not kept: dropped (closing its backend session, or
    /// releasing this reference to it) outside the lock.
    close_later: Option<Box<dyn Send>>,
}

impl Gone {
    /// Counts one application session of `slot_id` gone and keeps `idle` (a reusable
    /// backend session and whether it is read-write) unless that was the application's
    /// last session of the slot: then every kept session of the slot is to be closed.
    fn of(
        t: &mut Sessions,
        slot_id: CK_SLOT_ID,
        idle: Option<(bool, cryptoki::session::Session)>,
    ) -> Gone {
        let c = &mut t.slots[slot_id as usize];
        c.open = c.open.saturating_sub(1);
        if c.open == 0 {
            return Gone {
                slot_id,
                last: true,
                to_close: Some(std::mem::take(c.idle.get_mut())),
                close_later: None,
            };
        }
        let mut extra = None;
        if let Some((rw, b)) = idle {
            let kept = &mut c.idle.get_mut()[usize::from(rw)];
            if kept.len() < IDLE_MAX {
                kept.push(b);
            } else {
                extra = Some(Box::new(b) as Box<dyn Send>);
            }
        }
        Gone {
            slot_id,
            last: false,
            to_close: None,
            close_later: extra,
        }
    }
}

/// How many idle backend sessions a slot keeps per kind.
const IDLE_MAX: usize = 32;

/// A slot's session bookkeeping.
#[derive(Default)]
struct SlotSessions {
    /// The application's open sessions on this slot.
    open: usize,
    /// Idle backend sessions: `[read-only, read-write]`. Only ever used under the table's
    /// write lock, through `get_mut` (this `Mutex` is never locked: it only makes the
    /// table `Sync`, which a backend session alone is not).
    idle: Mutex<[Vec<cryptoki::session::Session>; 2]>,
}

static STATE: RwLock<Option<&'static Library>> = RwLock::new(None);
/// The initialized library as entry points see it (`None` when not initialized).
static CURRENT: crate::sys::Published<Library> = crate::sys::Published::new();
static FORKED: AtomicBool = AtomicBool::new(false);

/// The initialized library, or `CKR_CRYPTOKI_NOT_INITIALIZED` (also in a forked child
/// that has not called `C_Initialize` yet).
pub fn library() -> Result<&'static Library> {
    if FORKED.load(Ordering::Acquire) {
        return err(CKR_CRYPTOKI_NOT_INITIALIZED);
    }
    match CURRENT.get() {
        Some(lib) => Ok(lib),
        None => err(CKR_CRYPTOKI_NOT_INITIALIZED),
    }
}

/// `C_Initialize` once the arguments are checked: reads the configuration, loads and
/// initializes the backend.
pub fn initialize(via: Option<&std::path::Path>) -> Result<()> {
    if crate::sys::fork::child_inherited_busy() {
        // The parent forked while a thread was inside cmkp11 for longer than
        // `sys::fork::QUIESCE_LIMIT`: the backend's copy may hold a lock for ever, and
        // finalizing or using it could hang this process.
        log::error!(
            "C_Initialize: this process was forked while another thread had been inside \
             cmkp11 (its backend) for more than {} s: the backend state it inherited may be \
             locked; refusing to use it (fork when no call is in progress)",
            crate::sys::fork::QUIESCE_LIMIT.as_secs()
        );
        return err(CKR_GENERAL_ERROR);
    }
    let mut state = STATE.write();
    let after_fork = FORKED.swap(false, Ordering::AcqRel);
    if after_fork {
        // In a forked child: the parent's state must not be closed (that would close the
        // parent's backend sessions and finalize its module); it stays leaked.
        state.take();
        CURRENT.set(None);
    }
    if state.is_some() {
        return err(CKR_CRYPTOKI_ALREADY_INITIALIZED);
    }
    crate::logging::init_default();
    let cfg = Config::load().inspect_err(|e| log::error!("{e}"))?;
    crate::logging::init(&cfg.log);
    let lib: &'static Library = crate::sys::leak(Box::new(Library::open(cfg, after_fork, via)?));
    *state = Some(lib);
    CURRENT.set(Some(lib));
    Ok(())
}

/// `C_Finalize`: closes every session and finalizes the backend.
pub fn finalize() -> Result<()> {
    if FORKED.load(Ordering::Acquire) {
        return err(CKR_CRYPTOKI_NOT_INITIALIZED);
    }
    let lib = {
        let mut state = STATE.write();
        CURRENT.set(None);
        state.take()
    };
    match lib {
        None => err(CKR_CRYPTOKI_NOT_INITIALIZED),
        Some(lib) => {
            lib.close();
            // `lib` came from `sys::leak` in `initialize` and is unpublished now (CURRENT
            // and STATE are empty); PKCS#11 forbids calls into the library while
            // C_Finalize runs, so no other reference is in use. Freed, so that an
            // application that reloads the module does not grow (the audit log's and its
            // lock's file descriptors, handle tables, keystore views).
            drop(crate::sys::reclaim(lib));
            Ok(())
        }
    }
}

/// atfork "prepare": take the state lock so that no thread holds it across `fork()`.
pub fn fork_prepare() {
    std::mem::forget(STATE.write());
}

/// atfork "parent": release what [`fork_prepare`] took.
pub fn fork_parent() {
    // SAFETY-free: parking_lot's force_unlock_write is unsafe only because the caller must
    // own the lock, which fork_prepare took on this same thread.
    unlock_state();
}

/// atfork "child": release the lock and mark the inherited state stale.
pub fn fork_child() {
    FORKED.store(true, Ordering::Release);
    unlock_state();
}

fn unlock_state() {
    crate::sys::force_unlock_write(&STATE);
}

impl Library {
    /// Opens the configured backend: the library behind `C_Initialize`, and the one the
    /// `cmkp11` command uses directly (never through raw pointers).
    pub fn new(cfg: Config, after_fork: bool) -> Result<Library> {
        Library::open(cfg, after_fork, None)
    }

    /// [`Library::new`]; `via` is cmkp11's own library when it runs as a module (see
    /// [`Backend::open`]).
    pub fn open(cfg: Config, after_fork: bool, via: Option<&std::path::Path>) -> Result<Library> {
        let settings = cfg.policy_settings();
        let backend = Backend::open(&cfg, after_fork, via)
            .inspect_err(|e| log::error!("C_Initialize: {e}"))?;
        log::info!(
            "initialized over {} with {} slot(s)",
            cfg.backend.module.display(),
            backend.slots.len()
        );
        let sessions = Sessions {
            map: handles::HandleMap::default(),
            slots: (0..backend.slots.len())
                .map(|_| SlotSessions::default())
                .collect(),
        };
        let trust = crate::keystore::Trust {
            allow_import: cfg.policy.allow_import,
            allow_plaintext_import: cfg.policy.allow_plaintext_import,
        };
        let stores = (0..backend.slots.len())
            .map(|_| store::SlotStore::new(trust))
            .collect();
        let token_labels = backend
            .slots
            .iter()
            .map(|s| {
                backend
                    .ctx
                    .get_token_info(*s)
                    .map(|t| t.label().to_string())
                    .unwrap_or_default()
            })
            .collect();
        let audit_mac = match (&cfg.audit.file, backend.slots.first()) {
            (Some(file), Some(slot)) => Some(Arc::new(
                audit_mac::TokenAuditMac::new(backend.ctx.clone(), *slot).for_log(file),
            )),
            _ => None,
        };
        let mac = audit_mac
            .clone()
            .map(|m| m as Arc<dyn crate::audit::TokenMac>);
        let audit =
            crate::audit::Auditor::open(&cfg.audit, mac).map_err(|problem| Error::Config {
                file: cfg
                    .source
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "defaults".into()),
                key: "audit".into(),
                problem,
            })?;
        Ok(Library {
            stores,
            audit,
            audit_mac,
            token_labels,
            probed: RwLock::new(std::collections::HashSet::new()),
            caps: crate::backend::probe::Cache::new(backend.slots.len()),
            ivs: iv::IvSource::new(),
            rate: crate::policy::rate::Limiter::default(),
            gcm: gcm_limit::Counters::default(),
            cfg,
            backend,
            sessions: RwLock::new(sessions),
            next_session: AtomicU64::new(1),
            removals: AtomicU64::new(0),
            objects: HandleTable::default(),
            settings,
            caller: crate::policy::access::Caller {
                uid: crate::sys::uid(),
                exe: std::fs::read_link("/proc/self/exe").unwrap_or_default(),
            },
        })
    }

    /// Closes every session and finalizes the backend (the CLI's end; `C_Finalize`).
    pub fn close(&self) {
        let (sessions, idle): (Vec<_>, Vec<_>) = {
            let mut t = self.sessions.write();
            let map = std::mem::take(&mut t.map);
            let idle = t
                .slots
                .iter_mut()
                .map(|c| std::mem::take(c.idle.get_mut()))
                .collect();
            self.removed();
            (map.into_iter().collect(), idle)
        };
        for (h, _) in &sessions {
            self.audit.session_closed(*h);
        }
        // Before the sessions close: the token logs the application out with its last
        // session, and the checkpoint needs the login.
        if let Err(rv) = self.audit.checkpoint() {
            log::warn!(
                "audit: no checkpoint at finalize: {}",
                crate::backend::rv::name(rv)
            );
        }
        drop(sessions);
        drop(idle);
        // cmkp11's own sessions close before the backend is finalized: nothing of this
        // library may call the backend afterwards (a later C_Initialize may give the
        // same session numbers to others).
        for store in &self.stores {
            store.close_session();
        }
        if let Some(m) = &self.audit_mac {
            m.disconnect();
        }
        self.audit.detach_mac();
        if let Err(e) = self.backend.finalize() {
            log::warn!("finalize: backend: {e}");
        }
    }

    /// The backend slot behind cmkp11 slot `id`.
    pub fn slot(&self, id: CK_SLOT_ID) -> Result<cryptoki::slot::Slot> {
        usize::try_from(id)
            .ok()
            .and_then(|i| self.backend.slots.get(i).copied())
            .ok_or(crate::error::Error::Rv(CKR_SLOT_ID_INVALID))
    }

    /// A session by handle.
    ///
    /// Each thread remembers its last lookup (library, removal count, handle, and a weak
    /// reference to the session), so a thread working on one session does not write the
    /// table lock's shared cache line on every call (no gain measurable on the 2-core
    /// development VM, where SoftHSM2's own locks dominate; meant for many threads). A
    /// removal (close) after the remembered lookup voids it; a session that is gone
    /// cannot be upgraded to.
    pub fn session(&self, h: CK_SESSION_HANDLE) -> Result<Arc<Mutex<Session>>> {
        thread_local! {
            static LAST: std::cell::RefCell<Option<LastLookup>> =
                const { std::cell::RefCell::new(None) };
        }
        let me = self as *const Library as usize;
        let removals = self.removals.load(Ordering::Acquire);
        let hit = LAST.with(|l| match &*l.borrow() {
            Some(last) if last.library == me && last.removals == removals && last.handle == h => {
                last.session.upgrade()
            }
            _ => None,
        });
        if let Some(s) = hit {
            return Ok(s);
        }
        let s = match self.sessions.read().map.get(&h) {
            Some((_, s)) => s.clone(),
            None => return err(CKR_SESSION_HANDLE_INVALID),
        };
        LAST.with(|l| {
            *l.borrow_mut() = Some(LastLookup {
                library: me,
                removals,
                handle: h,
                session: Arc::downgrade(&s),
            })
        });
        Ok(s)
    }

    /// Counts a removal from the session table (after it, see [`Library::session`]).
    fn removed(&self) {
        self.removals.fetch_add(1, Ordering::AcqRel);
    }

    /// `C_OpenSession`: an idle backend session of the slot, else a new one; returns
    /// cmkp11's handle for it.
    pub fn open_session(&self, slot_id: CK_SLOT_ID, rw: bool) -> Result<CK_SESSION_HANDLE> {
        let slot = self.slot(slot_id)?;
        let add = |t: &mut Sessions, backend| {
            let h = self.next_session.fetch_add(1, Ordering::Relaxed);
            let s = Session::new(h, slot_id, rw, backend);
            t.map.insert(h, (slot_id, Arc::new(Mutex::new(s))));
            h
        };
        {
            let mut t = self.sessions.write();
            let c = &mut t.slots[slot_id as usize];
            c.open += 1;
            if let Some(b) = c.idle.get_mut()[usize::from(rw)].pop() {
                return Ok(add(&mut t, b));
            }
        }
        let opened = if rw {
            self.backend.ctx.open_rw_session(slot)
        } else {
            self.backend.ctx.open_ro_session(slot)
        };
        match opened {
            Ok(b) => Ok(add(&mut self.sessions.write(), b)),
            Err(e) => {
                self.gone(|t| Gone::of(t, slot_id, None));
                Err(e.into())
            }
        }
    }

    /// `C_CloseSession`.
    pub fn close_session(&self, h: CK_SESSION_HANDLE) -> Result<()> {
        let mut made_objects = true;
        let gone = (|| {
            let t = &mut *self.sessions.write();
            let (slot_id, s) = t.map.remove(&h)?;
            self.removed();
            // A call in flight on the session keeps it (and its backend session) alive
            // until it returns; otherwise the backend session may serve the next one.
            let (reusable, not) = match Arc::try_unwrap(s) {
                Ok(m) => {
                    let s = m.into_inner();
                    made_objects = s.made_session_objects();
                    match s.into_reusable() {
                        Ok(b) => (Some(b), None),
                        Err(s) => (None, Some(s as Box<dyn Send>)),
                    }
                }
                Err(shared) => (None, Some(Box::new(shared) as Box<dyn Send>)),
            };
            let mut g = Gone::of(t, slot_id, reusable);
            if not.is_some() {
                g.close_later = not;
            }
            Some(g)
        })();
        let Some(gone) = gone else {
            return err(CKR_SESSION_HANDLE_INVALID);
        };
        if made_objects {
            self.objects.forget_owned_by(&[h]);
        }
        // Before `after_gone`: closing the application's last session logs it out, and
        // the record belongs before the checkpoint written then (which needs the login).
        self.audit.session_closed(h);
        self.after_gone(gone);
        Ok(())
    }

    /// `C_CloseAllSessions` for one slot.
    pub fn close_all_sessions(&self, slot_id: CK_SLOT_ID) -> Result<()> {
        self.slot(slot_id)?;
        let mut closed = Vec::new();
        {
            let mut t = self.sessions.write();
            t.map.retain(|h, e| {
                let keep = e.0 != slot_id;
                if !keep {
                    closed.push((*h, e.1.clone()));
                }
                keep
            });
            self.removed();
        }
        let handles: Vec<CK_SESSION_HANDLE> = closed.iter().map(|(h, _)| *h).collect();
        self.objects.forget_owned_by(&handles);
        for (h, s) in closed {
            self.audit.session_closed(h);
            drop(s);
            self.gone(|t| Gone::of(t, slot_id, None));
        }
        Ok(())
    }

    /// Runs `f` under the session table's lock (`f` counts a session of a slot gone, see
    /// [`Gone`]), then what is left to do outside it.
    fn gone(&self, f: impl FnOnce(&mut Sessions) -> Gone) {
        let g = f(&mut self.sessions.write());
        self.after_gone(g);
    }

    /// After the table counted a session gone: backend sessions close outside the lock;
    /// when it was the application's last session of the slot, cmkp11's own sessions of
    /// the slot close too, so that the token logs the application out (PKCS#11 §5.6); the
    /// audit log first writes its checkpoint, which needs the login.
    fn after_gone(&self, g: Gone) {
        drop(g.to_close);
        drop(g.close_later);
        if !g.last {
            return;
        }
        if g.slot_id == 0 {
            if let Some(m) = &self.audit_mac {
                let _ = self.audit.checkpoint();
                m.disconnect();
            }
        }
        self.stores[g.slot_id as usize].close_session();
    }

    /// Before an SO login on `slot_id`: closes the idle read-only backend sessions and
    /// cmkp11's own read-only session of the slot, which would make the token refuse it
    /// (`CKR_SESSION_READ_ONLY_EXISTS`) although the application has none.
    pub fn before_so_login(&self, slot_id: CK_SLOT_ID) {
        let idle =
            std::mem::take(&mut self.sessions.write().slots[slot_id as usize].idle.get_mut()[0]);
        drop(idle);
        self.stores[slot_id as usize].close_session();
    }

    /// Number of open sessions (for tests and diagnostics).
    pub fn session_count(&self) -> usize {
        self.sessions.read().map.len()
    }
}
