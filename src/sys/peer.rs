//! The identity a call is made for, in the daemon: the kernel-attested peer of the
//! connection the call came from.
//!
//! In library mode nothing here is set, and the runtime and the audit log use the
//! process's own identity (one relaxed atomic load, a predictable branch). `cmkp11d` sets
//! the peer of each connection on the thread that serves it, before it calls into the
//! runtime, so that the access rules and every audit record name the application's uid,
//! pid and executable as the kernel reported them, never anything the client sent.

use std::cell::RefCell;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A connected application, as the kernel describes it.
#[derive(Debug)]
pub struct Peer {
    /// Process id (`SO_PEERCRED`).
    pub pid: u32,
    /// Real user id (`SO_PEERCRED`).
    pub uid: u32,
    /// Group id (`SO_PEERCRED`).
    pub gid: u32,
    /// The executable (`/proc/PID/exe`).
    pub exe: PathBuf,
    /// The executable as a JSON string, escaped once for audit records.
    pub exe_json: String,
}

/// Set once when a process starts serving peers (the daemon); never in library mode.
static HOSTING: AtomicBool = AtomicBool::new(false);

thread_local! {
    static CURRENT: RefCell<Option<Arc<Peer>>> = const { RefCell::new(None) };
}

/// Runs `f` with `peer` as the identity of every call the runtime makes on this thread.
pub fn serve_as<R>(peer: &Arc<Peer>, f: impl FnOnce() -> R) -> R {
    HOSTING.store(true, Ordering::Relaxed);
    let old = CURRENT.with(|c| c.replace(Some(peer.clone())));
    let r = f();
    CURRENT.with(|c| *c.borrow_mut() = old);
    r
}

/// The peer this thread serves, if any.
#[inline]
pub fn current() -> Option<Arc<Peer>> {
    if !HOSTING.load(Ordering::Relaxed) {
        return None;
    }
    CURRENT.with(|c| c.borrow().clone())
}
