//! Quiescing the library around `fork()`.
//!
//! A forked child has one thread, and a copy of every lock as it was at the fork: a lock
//! held by another thread of the parent stays held in the child for ever. Such locks are
//! not only cmkp11's own (its state, the audit writer, the logger, `parking_lot`'s table of
//! parked threads) and the mutexes it gives its backend, but also the backend's own
//! (SoftHSM2's internal ones), its crypto library's (OpenSSL's, taken by SoftHSM2 on every
//! operation), and the `cryptoki` context's. The child's `C_Initialize` finalizes and
//! initializes the inherited backend (a backend that is not fork-aware still believes
//! itself initialized), which takes many of them: one copied held, and the child hangs.
//!
//! Registering each lock is not possible (most belong to other libraries), so every entry
//! point counts itself in ([`enter`]) and the `pthread_atfork` "prepare" handler
//! ([`prepare`]) makes new callers wait and waits until the threads inside have left: the
//! process is copied while no thread is inside cmkp11, its backend or the libraries they
//! call through it, so every such lock is free in the child. A thread that forks from
//! inside cmkp11 (a backend that starts a helper process) is not waited for.
//!
//! A caller blocked inside the backend for longer than [`QUIESCE_LIMIT`] (a network HSM
//! that does not answer) does not block `fork()` for ever: the fork goes ahead, and the
//! child is told ([`child_inherited_busy`]) so that its `C_Initialize` refuses to touch the
//! inherited backend instead of hanging in it.
//!
//! Cost per entry point: two atomic operations on a shared counter and a thread-local
//! depth; no lock, no system call.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};

/// Threads inside an entry point now (a nested entry counts again).
static INSIDE: AtomicUsize = AtomicUsize::new(0);
/// A fork is being prepared: new callers wait.
static FORKING: AtomicBool = AtomicBool::new(false);
/// The last `prepare` gave up waiting (read by the child).
static GAVE_UP: AtomicBool = AtomicBool::new(false);
/// Set in a child whose parent forked while a thread was still inside.
static CHILD_BUSY: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// How many entry points this thread is inside (nesting).
    static DEPTH: Cell<usize> = const { Cell::new(0) };
}

/// How long `fork()` waits for the threads inside cmkp11 to leave.
pub const QUIESCE_LIMIT: Duration = Duration::from_secs(10);

/// An entry point in progress; leaves on drop.
pub struct Entered(());

impl Drop for Entered {
    fn drop(&mut self) {
        DEPTH.with(|d| d.set(d.get() - 1));
        INSIDE.fetch_sub(1, SeqCst);
    }
}

/// Counts the calling thread in for the duration of an entry point; waits first while a
/// `fork()` is being prepared (unless this thread is inside already).
pub fn enter() -> Entered {
    let nested = DEPTH.with(|d| {
        let n = d.get();
        d.set(n + 1);
        n > 0
    });
    loop {
        INSIDE.fetch_add(1, SeqCst);
        // (SeqCst on both sides: either `prepare` sees this thread counted, or this
        // thread sees the fork being prepared)
        if nested || !FORKING.load(SeqCst) {
            return Entered(());
        }
        INSIDE.fetch_sub(1, SeqCst);
        while FORKING.load(SeqCst) {
            std::thread::sleep(Duration::from_micros(100));
        }
    }
}

/// atfork "prepare": new callers wait; waits (at most [`QUIESCE_LIMIT`]) until no other
/// thread is inside.
pub fn prepare() {
    FORKING.store(true, SeqCst);
    let own = DEPTH.with(Cell::get);
    let start = Instant::now();
    let mut pause = Duration::from_micros(20);
    while INSIDE.load(SeqCst) > own {
        if start.elapsed() >= QUIESCE_LIMIT {
            GAVE_UP.store(true, SeqCst);
            return;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(2));
    }
    GAVE_UP.store(false, SeqCst);
}

/// atfork "parent": callers go on.
pub fn parent() {
    FORKING.store(false, SeqCst);
}

/// atfork "child": only this thread exists; it is inside as deep as it was.
pub fn child() {
    INSIDE.store(DEPTH.with(Cell::get), SeqCst);
    CHILD_BUSY.store(GAVE_UP.swap(false, SeqCst), SeqCst);
    FORKING.store(false, SeqCst);
}

/// Whether this process is a child forked while another thread was inside cmkp11 (the
/// parent's `prepare` gave up waiting): the inherited backend may hold locks for ever.
pub fn child_inherited_busy() -> bool {
    CHILD_BUSY.load(SeqCst)
}
