//! Process state: `C_Initialize`/`C_Finalize`, slots, sessions and handle tables.
//!
//! # Locks and their order
//! 1. [`STATE`] (global `RwLock<Option<&Library>>`): taken exclusively by
//!    `C_Initialize`, `C_Finalize` and across `fork()` (atfork handlers). Entry points do
//!    not take it: they read the library published in [`CURRENT`] with one atomic load.
//!    A library is never freed (`C_Finalize` closes its sessions and finalizes the
//!    backend, then leaks the small rest), so a call still in flight on another thread
//!    keeps valid memory without a reference count on every call.
//! 2. `Library::sessions` (`RwLock<HashMap>`): held only to clone a session's `Arc`, or
//!    to insert/remove one.
//! 3. A session's own `Mutex`: held for the whole call on that session, including the
//!    backend call. Different sessions never wait for each other.
//! 4. `HandleTable` (`RwLock`): held only for a lookup or insert, never across a call.
//! 5. A slot's [`SlotSessions`] (`Mutex`): held only to count sessions and to take or
//!    return an idle backend session, never across a backend call.
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
//! The `pthread_atfork` child handler (installed by the FFI layer) marks the inherited
//! state as stale: every call in the child then returns `CKR_CRYPTOKI_NOT_INITIALIZED`
//! until the child calls `C_Initialize`, which leaks (never drops) the parent's state so
//! that the parent's backend sessions are not closed from the child.

pub mod admin;
pub mod audit_mac;
pub mod handles;
pub mod ops;
pub mod session;
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
    /// The application's sessions, each with its slot (readable without its lock).
    sessions: RwLock<handles::HandleMap<CK_SESSION_HANDLE, SessionEntry>>,
    /// Per slot: the application's open sessions and idle backend sessions.
    slot_sessions: Vec<Mutex<SlotSessions>>,
    next_session: AtomicU64,
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
    /// Mechanism parameters the backend accepted when probed (slot, operation, mechanism).
    pub probed: RwLock<std::collections::HashSet<(CK_SLOT_ID, u8, crate::backend::mech::Mech)>>,
}

/// A session in the table: its slot (readable without the session's lock) and the session.
type SessionEntry = (CK_SLOT_ID, Arc<Mutex<Session>>);

/// How many idle backend sessions a slot keeps per kind.
const IDLE_MAX: usize = 32;

/// A slot's session bookkeeping.
#[derive(Default)]
struct SlotSessions {
    /// The application's open sessions on this slot.
    open: usize,
    /// Idle backend sessions: `[read-only, read-write]`.
    idle: [Vec<cryptoki::session::Session>; 2],
}

static STATE: RwLock<Option<&'static Library>> = RwLock::new(None);
/// The initialized library as entry points see it (`None` when not initialized).
static CURRENT: crate::ffi::raw::Published<Library> = crate::ffi::raw::Published::new();
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
pub fn initialize() -> Result<()> {
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
    let lib: &'static Library = Box::leak(Box::new(Library::new(cfg, after_fork)?));
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
    crate::ffi::force_unlock_write(&STATE);
}

impl Library {
    /// Opens the configured backend: the library behind `C_Initialize`, and the one the
    /// `cmkp11` command uses directly (never through raw pointers).
    pub fn new(cfg: Config, after_fork: bool) -> Result<Library> {
        let settings = crate::policy::Settings::from_config(&cfg);
        let backend =
            Backend::open(&cfg, after_fork).inspect_err(|e| log::error!("C_Initialize: {e}"))?;
        log::info!(
            "initialized over {} with {} slot(s)",
            cfg.backend.module.display(),
            backend.slots.len()
        );
        let slot_sessions = (0..backend.slots.len())
            .map(|_| Mutex::new(SlotSessions::default()))
            .collect();
        let stores = (0..backend.slots.len())
            .map(|_| store::SlotStore::default())
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
        let audit_mac = match (cfg.audit.file.is_some(), backend.slots.first()) {
            (true, Some(slot)) => Some(Arc::new(audit_mac::TokenAuditMac::new(
                backend.ctx.clone(),
                *slot,
            ))),
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
            cfg,
            backend,
            sessions: RwLock::new(handles::HandleMap::default()),
            slot_sessions,
            next_session: AtomicU64::new(1),
            objects: HandleTable::default(),
            settings,
            caller: crate::policy::access::Caller {
                uid: crate::ffi::uid(),
                exe: std::fs::read_link("/proc/self/exe").unwrap_or_default(),
            },
        })
    }

    /// Closes every session and finalizes the backend (the CLI's end; `C_Finalize`).
    pub fn close(&self) {
        let sessions = std::mem::take(&mut *self.sessions.write());
        for h in sessions.keys() {
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
        for slot in &self.slot_sessions {
            let idle = std::mem::take(&mut slot.lock().idle);
            drop(idle);
        }
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
    pub fn session(&self, h: CK_SESSION_HANDLE) -> Result<Arc<Mutex<Session>>> {
        match self.sessions.read().get(&h) {
            Some((_, s)) => Ok(s.clone()),
            None => err(CKR_SESSION_HANDLE_INVALID),
        }
    }

    /// `C_OpenSession`: an idle backend session of the slot, else a new one; returns
    /// cmkp11's handle for it.
    pub fn open_session(&self, slot_id: CK_SLOT_ID, rw: bool) -> Result<CK_SESSION_HANDLE> {
        let slot = self.slot(slot_id)?;
        let counts = &self.slot_sessions[slot_id as usize];
        let idle = {
            let mut c = counts.lock();
            c.open += 1;
            c.idle[usize::from(rw)].pop()
        };
        let backend = match idle {
            Some(b) => b,
            None => {
                let opened = if rw {
                    self.backend.ctx.open_rw_session(slot)
                } else {
                    self.backend.ctx.open_ro_session(slot)
                };
                match opened {
                    Ok(b) => b,
                    Err(e) => {
                        self.session_gone(slot_id, None);
                        return Err(e.into());
                    }
                }
            }
        };
        let h = self.next_session.fetch_add(1, Ordering::Relaxed);
        let s = Session::new(h, slot_id, rw, backend);
        self.sessions
            .write()
            .insert(h, (slot_id, Arc::new(Mutex::new(s))));
        Ok(h)
    }

    /// `C_CloseSession`.
    pub fn close_session(&self, h: CK_SESSION_HANDLE) -> Result<()> {
        let s = self
            .sessions
            .write()
            .remove(&h)
            .ok_or(crate::error::Error::Rv(CKR_SESSION_HANDLE_INVALID))?;
        self.closed(h, s);
        Ok(())
    }

    /// `C_CloseAllSessions` for one slot.
    pub fn close_all_sessions(&self, slot_id: CK_SLOT_ID) -> Result<()> {
        self.slot(slot_id)?;
        let mut closed = Vec::new();
        self.sessions.write().retain(|h, e| {
            let keep = e.0 != slot_id;
            if !keep {
                closed.push((*h, e.clone()));
            }
            keep
        });
        for (h, s) in closed {
            self.closed(h, s);
        }
        Ok(())
    }

    /// The end of an application session removed from the table: its session objects
    /// are forgotten, its audit record written, and its backend session kept for reuse or
    /// closed (when the last call in flight on it is over, if one is).
    fn closed(&self, h: CK_SESSION_HANDLE, (slot_id, s): SessionEntry) {
        self.objects.forget_owned_by(h);
        self.audit.session_closed(h);
        let reusable = Arc::try_unwrap(s).ok().and_then(|m| {
            let s = m.into_inner();
            let rw = s.rw;
            s.into_reusable().map(|b| (rw, b))
        });
        self.session_gone(slot_id, reusable);
    }

    /// Counts one application session of `slot_id` gone and keeps `idle` (a reusable
    /// backend session and whether it is read-write) unless that was the application's
    /// last session of the slot: then every kept session of the slot closes, and so do
    /// cmkp11's own sessions of it, so that the token logs the application out (PKCS#11
    /// §5.6); the audit log first writes its checkpoint, which needs the login.
    fn session_gone(&self, slot_id: CK_SLOT_ID, idle: Option<(bool, cryptoki::session::Session)>) {
        let (last, to_close) = {
            let mut c = self.slot_sessions[slot_id as usize].lock();
            c.open = c.open.saturating_sub(1);
            if c.open == 0 {
                (true, Some(std::mem::take(&mut c.idle)))
            } else {
                if let Some((rw, b)) = idle {
                    let kept = &mut c.idle[usize::from(rw)];
                    if kept.len() < IDLE_MAX {
                        kept.push(b);
                    }
                }
                (false, None)
            }
        };
        // Backend sessions close here, outside the lock.
        drop(to_close);
        if !last {
            return;
        }
        if slot_id == 0 {
            if let Some(m) = &self.audit_mac {
                let _ = self.audit.checkpoint();
                m.disconnect();
            }
        }
        self.stores[slot_id as usize].close_session();
    }

    /// Before an SO login on `slot_id`: closes the idle read-only backend sessions and
    /// cmkp11's own read-only session of the slot, which would make the token refuse it
    /// (`CKR_SESSION_READ_ONLY_EXISTS`) although the application has none.
    pub fn before_so_login(&self, slot_id: CK_SLOT_ID) {
        let idle = std::mem::take(&mut self.slot_sessions[slot_id as usize].lock().idle[0]);
        drop(idle);
        self.stores[slot_id as usize].close_session();
    }

    /// Number of open sessions (for tests and diagnostics).
    pub fn session_count(&self) -> usize {
        self.sessions.read().len()
    }
}
