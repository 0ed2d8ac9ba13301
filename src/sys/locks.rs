//! The mutexes cmkp11 gives its backend module (`CK_C_INITIALIZE_ARGS` callbacks).
//!
//! PKCS#11 lets the application that initializes a module supply the module's locking
//! primitives; cmkp11 is that application for its backend. A module then takes these
//! mutexes for its own shared state: SoftHSM2 takes several per operation (session and
//! handle tables, the object, its secure-memory registry). Its own mutexes are plain
//! pthread mutexes, which put a waiting thread to sleep at once; with two threads the
//! sleep and the wake-up (an inter-processor interrupt, costly in a virtual machine)
//! dominate an AES-GCM operation. These spin briefly before they sleep
//! (`parking_lot`), which is what short critical sections need, and each has a cache
//! line of its own, so that two mutexes allocated side by side are never contended
//! together (measured with two threads on SoftHSM2: AES-GCM 4 KiB encryption from about
//! 29,000 to 46,000 operations per second; see the README's Performance section).
//!
//! The callbacks are `extern "C"`: they never unwind (a panic would abort rather than
//! cross), and they check their pointer before using it.

use cryptoki_sys::*;
use parking_lot::lock_api::RawMutex as _;
use std::ffi::c_void;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Mutexes created and not destroyed yet (counted only at creation and destruction, never
/// on the lock path).
static LIVE: AtomicUsize = AtomicUsize::new(0);

/// How many of cmkp11's mutexes a module holds now: each one it created and has not
/// destroyed.
pub fn live_mutexes() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// One mutex, alone on its cache line.
#[repr(align(64))]
struct Mutex(parking_lot::RawMutex);

/// `CK_CREATEMUTEX`: a new unlocked mutex.
///
/// # Safety
/// `out` NULL or valid for one pointer write (PKCS#11 contract of the module calling it).
unsafe extern "C" fn create_mutex(out: *mut *mut c_void) -> CK_RV {
    if out.is_null() {
        return CKR_GENERAL_ERROR;
    }
    let m = Box::into_raw(Box::new(Mutex(parking_lot::RawMutex::INIT)));
    // SAFETY: checked non-NULL; the module passes a pointer it can receive the mutex in.
    unsafe { *out = m.cast() };
    LIVE.fetch_add(1, Ordering::Relaxed);
    CKR_OK
}

/// `CK_DESTROYMUTEX`.
///
/// # Safety
/// `m` NULL or a mutex from [`create_mutex`] not destroyed yet, which no thread holds or
/// uses any more (PKCS#11 contract).
unsafe extern "C" fn destroy_mutex(m: *mut c_void) -> CK_RV {
    if m.is_null() {
        return CKR_MUTEX_BAD;
    }
    // SAFETY: made by `create_mutex` with `Box::into_raw` and destroyed once (contract).
    drop(unsafe { Box::from_raw(m.cast::<Mutex>()) });
    LIVE.fetch_sub(1, Ordering::Relaxed);
    CKR_OK
}

/// `CK_LOCKMUTEX`.
///
/// # Safety
/// `m` NULL or a live mutex from [`create_mutex`].
unsafe extern "C" fn lock_mutex(m: *mut c_void) -> CK_RV {
    // SAFETY: a live mutex from `create_mutex` (contract), only ever shared.
    match unsafe { m.cast::<Mutex>().as_ref() } {
        Some(m) => {
            m.0.lock();
            CKR_OK
        }
        None => CKR_MUTEX_BAD,
    }
}

/// `CK_UNLOCKMUTEX`.
///
/// # Safety
/// `m` NULL or a live mutex from [`create_mutex`], held by the calling thread.
unsafe extern "C" fn unlock_mutex(m: *mut c_void) -> CK_RV {
    // SAFETY: a live mutex from `create_mutex` (contract), only ever shared.
    let Some(m) = (unsafe { m.cast::<Mutex>().as_ref() }) else {
        return CKR_MUTEX_BAD;
    };
    if !m.0.is_locked() {
        return CKR_MUTEX_NOT_LOCKED;
    }
    // SAFETY: locked, and by the calling thread (the module unlocks what it locked,
    // PKCS#11 contract).
    unsafe { m.0.unlock() };
    CKR_OK
}

/// The arguments cmkp11 initializes its backend with: its mutexes, and
/// `CKF_OS_LOCKING_OK` (a module may use the operating system's locks instead).
pub fn init_args() -> CK_C_INITIALIZE_ARGS {
    CK_C_INITIALIZE_ARGS {
        CreateMutex: Some(create_mutex),
        DestroyMutex: Some(destroy_mutex),
        LockMutex: Some(lock_mutex),
        UnlockMutex: Some(unlock_mutex),
        flags: CKF_OS_LOCKING_OK,
        pReserved: std::ptr::null_mut(),
    }
}

/// `C_Initialize` of the module at `module` (already loaded by cryptoki: this takes
/// another reference to the same instance) with [`init_args`].
pub fn initialize_module(module: &std::path::Path) -> CK_RV {
    // SAFETY: the module cryptoki has already loaded; dlopen only takes a reference.
    let Ok(lib) = (unsafe { cryptoki_sys::Pkcs11::new(module) }) else {
        return CKR_GENERAL_ERROR;
    };
    // Through the function table, as cryptoki calls it: a module need export nothing else.
    let mut list: *mut CK_FUNCTION_LIST = std::ptr::null_mut();
    // SAFETY: C_GetFunctionList writes one pointer to the module's static table.
    let rv = unsafe { lib.C_GetFunctionList(&mut list) };
    if rv != CKR_OK {
        return rv;
    }
    // SAFETY: on success, a table that lives as long as the module stays loaded (cryptoki
    // holds it loaded; `lib` too, during this call).
    let Some(initialize) = (unsafe { list.as_ref() }).and_then(|l| l.C_Initialize) else {
        return CKR_GENERAL_ERROR;
    };
    let mut args = init_args();
    // SAFETY: the arguments live through the call; the callbacks are functions of this
    // library, which stays loaded while the backend it initializes is in use.
    unsafe { initialize((&mut args as *mut CK_C_INITIALIZE_ARGS).cast()) }
}

/// `C_Initialize` through a module's function table with [`init_args`].
pub fn initialize_list(list: &CK_FUNCTION_LIST) -> CK_RV {
    let Some(initialize) = list.C_Initialize else {
        return CKR_GENERAL_ERROR;
    };
    let mut args = init_args();
    // SAFETY: the arguments live through the call; the callbacks are functions of this
    // library, which stays loaded while the backend it initializes is in use.
    unsafe { initialize((&mut args as *mut CK_C_INITIALIZE_ARGS).cast()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutex_callbacks() {
        let args = init_args();
        let (c, d, l, u) = (
            args.CreateMutex.unwrap(),
            args.DestroyMutex.unwrap(),
            args.LockMutex.unwrap(),
            args.UnlockMutex.unwrap(),
        );
        let mut m: *mut c_void = std::ptr::null_mut();
        // SAFETY: the callbacks used as a module would, with valid pointers.
        unsafe {
            assert_eq!(c(&mut m), CKR_OK);
            assert!(!m.is_null());
            assert_eq!(m as usize % 64, 0, "a cache line of its own");
            assert_eq!(u(m), CKR_MUTEX_NOT_LOCKED);
            assert_eq!(l(m), CKR_OK);
            assert_eq!(u(m), CKR_OK);
            assert_eq!(u(m), CKR_MUTEX_NOT_LOCKED);
            assert_eq!(l(std::ptr::null_mut()), CKR_MUTEX_BAD);
            assert_eq!(u(std::ptr::null_mut()), CKR_MUTEX_BAD);
            assert_eq!(d(std::ptr::null_mut()), CKR_MUTEX_BAD);
            assert_eq!(c(std::ptr::null_mut()), CKR_GENERAL_ERROR);
            assert_eq!(d(m), CKR_OK);
        }
    }

    #[test]
    fn mutex_excludes() {
        let args = init_args();
        let mut m: *mut c_void = std::ptr::null_mut();
        // SAFETY: as above.
        unsafe { assert_eq!(args.CreateMutex.unwrap()(&mut m), CKR_OK) };
        let m = m as usize;
        let counter = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let inside = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (counter, inside) = (counter.clone(), inside.clone());
                std::thread::spawn(move || {
                    let args = init_args();
                    for _ in 0..10_000 {
                        // SAFETY: a live mutex, locked and unlocked by this thread.
                        unsafe { assert_eq!(args.LockMutex.unwrap()(m as *mut c_void), CKR_OK) };
                        assert_eq!(inside.fetch_add(1, std::sync::atomic::Ordering::SeqCst), 0);
                        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        inside.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                        // SAFETY: as above.
                        unsafe { assert_eq!(args.UnlockMutex.unwrap()(m as *mut c_void), CKR_OK) };
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(counter.load(std::sync::atomic::Ordering::Relaxed), 40_000);
        // SAFETY: no thread uses it any more.
        unsafe { assert_eq!(args.DestroyMutex.unwrap()(m as *mut c_void), CKR_OK) };
    }
}
