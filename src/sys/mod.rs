//! Operating-system primitives, below every other layer: the cached process id and the
//! audit lock file ([`shm`]), the mutexes given to the backend module ([`locks`]), the
//! quiescence of the library around `fork()` ([`fork`]), clocks,
//! the process's uid, lock-free publication of a value, and OpenSSL's error queue.
//! Nothing here knows PKCS#11 policy, sessions or the application's pointers.

pub mod fork;
pub mod locks;
pub mod peer;
pub mod shm;

use std::sync::atomic::{AtomicPtr, Ordering};

/// Releases a write lock taken by `fork_prepare` (used only by the atfork handlers).
pub fn force_unlock_write<T>(lock: &parking_lot::RwLock<T>) {
    // SAFETY: called only from the atfork parent/child handlers, after the prepare handler
    // (same thread, before fork) took this write lock and forgot its guard.
    unsafe { lock.force_unlock_write() }
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
/// A value published to every thread with one atomic store and read with one atomic
/// load: no lock and no reference count on the hot path. Values are leaked (`&'static`),
/// never freed, so a reader may keep using the one it loaded after it was replaced.
pub struct Published<T: 'static>(AtomicPtr<T>);

impl<T: 'static> Published<T> {
    /// Nothing published.
    pub const fn new() -> Self {
        Published(AtomicPtr::new(std::ptr::null_mut()))
    }

    /// Publishes `v` (or nothing).
    pub fn set(&self, v: Option<&'static T>) {
        let p = v.map_or(std::ptr::null_mut(), |r| (r as *const T).cast_mut());
        self.0.store(p, Ordering::Release);
    }

    /// What is published.
    pub fn get(&self) -> Option<&'static T> {
        // SAFETY: the pointer is null or came from a `&'static T` in `set`; it is never
        // written through (only turned back into a shared reference).
        unsafe { self.0.load(Ordering::Acquire).as_ref() }
    }
}

/// Leaks `v` for publication, keeping the right to free it later with [`reclaim`].
pub fn leak<T>(v: Box<T>) -> &'static T {
    Box::leak(v)
}

/// Frees a value made by [`leak`].
///
/// The caller's contract (not expressible in types, which is why this lives here): `v`
/// came from [`leak`], is no longer published anywhere, and no reference to it is in use
/// or will be used (for the library state: PKCS#11 forbids calls while `C_Finalize`
/// runs, and every way to reach it was removed first).
pub fn reclaim<T>(v: &'static T) -> Box<T> {
    // SAFETY: `v` came from `Box::leak` in `leak` (caller's contract), so it is a unique
    // heap allocation of a `T`; nothing uses it any more (caller's contract).
    unsafe { Box::from_raw((v as *const T).cast_mut()) }
}

impl<T: 'static> Default for Published<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// Registers `child` to run in the child process after every `fork()`.
pub fn atfork_child(child: extern "C" fn()) -> Result<(), i32> {
    // SAFETY: `child` is a plain function that lives as long as the process.
    let rc = unsafe { libc::pthread_atfork(None, None, Some(child)) };
    if rc == 0 {
        Ok(())
    } else {
        Err(rc)
    }
}
