//! The C boundary: the only module with `unsafe` code and raw pointers.
//!
//! Every exported entry point is a thin `extern "C"` function that converts its raw
//! arguments into safe values ([`args`]) and runs the safe body inside [`guard`], which
//! catches panics and maps `Result` to `CK_RV`. Each `unsafe` block states why it is sound.

pub mod admin;
pub mod args;
pub mod entry;
pub mod exports;
pub mod locks;
pub mod raw;
pub mod shm;
pub mod tables;

use crate::backend::rv;
use crate::error::Result;
use cryptoki_sys::*;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Runs the body of an entry point: no panic crosses the C boundary (it becomes
/// `CKR_GENERAL_ERROR`), errors become their `CK_RV`, and a debug line records the result.
pub fn guard(name: &'static str, body: impl FnOnce() -> Result<()>) -> CK_RV {
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

/// Releases a write lock taken by `fork_prepare` (used only by the atfork handlers).
pub(crate) fn force_unlock_write<T>(lock: &parking_lot::RwLock<T>) {
    // SAFETY: called only from the atfork parent/child handlers, after the prepare handler
    // (same thread, before fork) took this write lock and forgot its guard.
    unsafe { lock.force_unlock_write() }
}

/// Installs the `pthread_atfork` handlers once per process.
pub(crate) fn install_atfork() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    extern "C" fn prepare() {
        crate::runtime::fork_prepare();
    }
    extern "C" fn parent() {
        crate::runtime::fork_parent();
    }
    extern "C" fn child() {
        crate::runtime::fork_child();
    }
    ONCE.call_once(|| {
        // SAFETY: the handlers are plain functions that live as long as the process; they
        // only touch a lock and an atomic flag.
        let rc = unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
        if rc != 0 {
            log::warn!("pthread_atfork failed ({rc}): fork detection is off");
        }
    });
}

/// Milliseconds of the monotonic clock at its coarse resolution (a few ms: ample for the
/// keystore's refresh period of hundreds). Every cryptographic `*Init` reads it: glibc reads
/// the coarse clock from the vDSO without the TSC (~4 ns here against ~24 ns for
/// `Instant::now`) in a few instructions. (rustix's own vDSO parser is not used: it faults
/// under valgrind, which has no vDSO.)
pub fn coarse_ms() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid timespec to write. CLOCK_MONOTONIC_COARSE exists on every
    // Linux since 2.6.32, so the call cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut t) };
    (t.tv_sec as u64).wrapping_mul(1000) + (t.tv_nsec as u64) / 1_000_000
}

/// The real uid of this process.
pub fn uid() -> u32 {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() }
}

/// Runs `f` without leaving OpenSSL errors on the calling thread's queue.
///
/// A backend built on OpenSSL (SoftHSM2) may push errors while it initializes (SoftHSM2
/// leaves 0x12800067, a missing `rdrand` engine). An application that shares the process's
/// libcrypto sees them as its own: nginx's workers initialize the module inside a TLS
/// handshake (libp11 does it after `fork()`), and a stale error there fails the
/// handshake. When libcrypto is in the global scope, everything `f` adds is popped.
pub fn preserving_openssl_errors<R>(f: impl FnOnce() -> R) -> R {
    type Mark = unsafe extern "C" fn() -> std::os::raw::c_int;
    let find = |name: &std::ffi::CStr| {
        // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name only looks a symbol up.
        let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
        (!p.is_null()).then(|| {
            // SAFETY: OpenSSL declares `int ERR_set_mark(void)` and `int ERR_pop_to_mark(void)`.
            unsafe { std::mem::transmute::<*mut std::os::raw::c_void, Mark>(p) }
        })
    };
    let marks = find(c"ERR_set_mark").zip(find(c"ERR_pop_to_mark"));
    if let Some((set, _)) = marks {
        // SAFETY: a libcrypto function without arguments, on this thread's own queue.
        unsafe { set() };
    }
    let r = f();
    if let Some((_, pop)) = marks {
        // SAFETY: as above; pops only what was pushed since our mark.
        unsafe { pop() };
    }
    r
}
