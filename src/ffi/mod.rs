//! The C boundary: the only module with `unsafe` code and raw pointers.
//!
//! Every exported entry point is a thin `extern "C"` function that converts its raw
//! arguments into safe values ([`args`]) and runs the safe body inside [`guard`], which
//! catches panics and maps `Result` to `CK_RV`. Each `unsafe` block states why it is sound.

pub mod admin;
pub mod args;
pub mod client;
pub mod entry;
pub mod exports;
pub mod tables;

use crate::backend::rv;
use crate::error::Result;
use cryptoki_sys::*;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Runs the body of an entry point: no panic crosses the C boundary (it becomes
/// `CKR_GENERAL_ERROR`), errors become their `CK_RV`, and a debug line records the result.
pub fn guard(name: &'static str, body: impl FnOnce() -> Result<()>) -> CK_RV {
    // counted in, so that fork() waits until no thread is inside (see `sys::fork`)
    let _inside = crate::sys::fork::enter();
    let rv = match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => CKR_OK,
        Ok(Err(e)) => failed(name, e),
        Err(_) => panicked(name),
    };
    if log::max_level() >= log::LevelFilter::Debug {
        log_result(name, rv);
    }
    rv
}

// The three paths below are out of line and cold, so that the code every call runs stays
// a few cache lines: between two calls of an application the token's own code (~80 KiB
// per AES-GCM operation with SoftHSM2) evicts cmkp11's from the instruction cache, and
// each line cmkp11 runs is then fetched again (measured: the count of distinct code lines
// per operation, not of instructions, is what the benchmark's ratio follows).

/// The code of an error (a backend error is also logged at debug level).
#[cold]
#[inline(never)]
fn failed(name: &'static str, e: crate::error::Error) -> CK_RV {
    if let crate::error::Error::Backend(_) = e {
        log::debug!("{name}: {e}");
    }
    e.rv()
}

#[cold]
#[inline(never)]
fn panicked(name: &'static str) -> CK_RV {
    log::error!("{name}: internal error (panic caught at the C boundary)");
    CKR_GENERAL_ERROR
}

#[cold]
#[inline(never)]
fn log_result(name: &'static str, rv: CK_RV) {
    log::debug!("{name} -> {}", rv::name(rv));
}

/// Installs the `pthread_atfork` handlers once per process.
pub(crate) fn install_atfork() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    // First no thread inside cmkp11 (and so inside its backend), then the state lock.
    extern "C" fn prepare() {
        crate::sys::fork::prepare();
        crate::runtime::fork_prepare();
    }
    extern "C" fn parent() {
        crate::runtime::fork_parent();
        crate::sys::fork::parent();
    }
    extern "C" fn child() {
        crate::runtime::fork_child();
        crate::sys::fork::child();
    }
    ONCE.call_once(|| {
        install_panic_hook();
        // SAFETY: the handlers are plain functions that live as long as the process; they
        // only touch a lock, atomics and a thread-local counter.
        let rc = unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
        if rc != 0 {
            log::warn!("pthread_atfork failed ({rc}): fork detection is off");
        }
    });
}

/// Replaces the standard library's panic hook (which prints the panic's text on stderr,
/// the application's) with one that logs it: the location at error level, the text at
/// debug level only (a message could quote data). The hook is this library's own: a
/// `cdylib` carries its own copy of the standard library, so the application's panics
/// (if it is written in Rust) keep their own hook. Every panic caught at the C boundary
/// also gives an error line naming the entry point ([`guard`]).
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let at = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_else(|| "an unknown place".into());
        log::error!("internal error: panic at {at}");
        let text = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        log::debug!("panic at {at}: {text}");
    }));
}
