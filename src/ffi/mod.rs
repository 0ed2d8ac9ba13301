//! The C boundary: the only module with `unsafe` code and raw pointers.
//!
//! Every exported entry point is a thin `extern "C"` function that converts its raw
//! arguments into safe values ([`args`]) and runs the safe body inside [`guard`], which
//! catches panics and maps `Result` to `CK_RV`. Each `unsafe` block states why it is sound.

pub mod admin;
pub mod args;
pub mod entry;
pub mod exports;
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
        Ok(Err(e)) => {
            if let crate::error::Error::Backend(_) = e {
                log::debug!("{name}: {e}");
            }
            e.rv()
        }
        Err(_) => {
            log::error!("{name}: internal error (panic caught at the C boundary)");
            CKR_GENERAL_ERROR
        }
    };
    log::debug!("{name} -> {}", rv::name(rv));
    rv
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
