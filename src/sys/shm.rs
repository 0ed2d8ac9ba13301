//! Process-shared state of the audit writer, behind a safe API: a cached process id that
//! follows `fork`, and the *audit lock file* (a one-page file mapped shared by every
//! process that writes one audit log) holding a robust process-shared mutex and the
//! chain-head hint. The audit module decides what to do with them (see `crate::audit`).
//!
//! The lock file is 4096 bytes:
//!
//! ```text
//! 0    magic "cmkp11-audit-lck" (16 bytes)
//! 16   ABI tag (32 bytes, NUL padded): C library, architecture, size of pthread_mutex_t
//! 64   pthread_mutex_t (PTHREAD_PROCESS_SHARED, PTHREAD_MUTEX_ROBUST)
//! 192  hint, only read or written with the mutex held: valid flag, the log's device and
//!      inode, its length after the last append, seq and line hash of its last record
//! ```
//!
//! A lock file is always complete when it appears under its name: it is built under a
//! temporary name and renamed into place. It holds no secret and nothing a verifier
//! needs: the log alone verifies.

use std::cell::UnsafeCell;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

/// Size of the lock file.
pub const LOCK_FILE_LEN: usize = 4096;
const MAGIC: &[u8; 16] = b"cmkp11-audit-lck";
/// The extended attribute holding a file's access ACL.
const ACL_XATTR: &str = "system.posix_acl_access";

/// The process id, without a `getpid` system call per use.
///
/// glibc does not cache the pid; this does, and a `pthread_atfork` child handler
/// (registered on first use) clears the cache in a forked child, so the child reads its
/// own pid on its next call.
pub fn pid() -> u32 {
    static PID: AtomicU32 = AtomicU32::new(0);
    static HANDLER: AtomicBool = AtomicBool::new(false);
    static ONCE: std::sync::Once = std::sync::Once::new();
    extern "C" fn child() {
        PID.store(0, Ordering::Relaxed);
    }
    let p = PID.load(Ordering::Relaxed);
    if p != 0 {
        return p;
    }
    ONCE.call_once(|| {
        // SAFETY: `child` is a plain function living as long as this library (glibc
        // unregisters the handlers of an unloaded library); it only stores to an atomic,
        // which is async-signal-safe.
        let rc = unsafe { libc::pthread_atfork(None, None, Some(child)) };
        if rc == 0 {
            HANDLER.store(true, Ordering::Relaxed);
        } else {
            log::warn!("audit: pthread_atfork failed ({rc}); the pid cache is off");
        }
    });
    let p = std::process::id();
    // without the handler the cache stays empty (a fork would go unnoticed)
    if HANDLER.load(Ordering::Relaxed) {
        PID.store(p, Ordering::Relaxed);
    }
    p
}

/// The hint kept in the lock file: where the log ended after the last append made under
/// the lock, and the chain head there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hint {
    /// (device, inode) of the log it describes.
    pub log_id: (u64, u64),
    /// Length of the log after that append.
    pub len: u64,
    /// `seq` of its last record.
    pub seq: u64,
    /// SHA-256 of its last record's line.
    pub hash: [u8; 32],
}

#[repr(C)]
struct RawHint {
    valid: u64,
    dev: u64,
    ino: u64,
    len: u64,
    seq: u64,
    hash: [u8; 32],
}

#[repr(C)]
struct Shared {
    magic: [u8; 16],
    abi: [u8; 32],
    _pad: [u8; 16],
    mutex: UnsafeCell<libc::pthread_mutex_t>,
    _pad2: [u8; 128 - std::mem::size_of::<libc::pthread_mutex_t>()],
    hint: UnsafeCell<RawHint>,
}

const _: () = assert!(std::mem::size_of::<Shared>() <= LOCK_FILE_LEN);
const _: () = assert!(std::mem::offset_of!(Shared, mutex) == 64);
const _: () = assert!(std::mem::offset_of!(Shared, hint) == 192);

fn abi_tag() -> [u8; 32] {
    let s = format!(
        "{}-{}-mutex{}",
        if cfg!(target_env = "gnu") {
            "glibc"
        } else if cfg!(target_env = "musl") {
            "musl"
        } else {
            "libc"
        },
        std::env::consts::ARCH,
        std::mem::size_of::<libc::pthread_mutex_t>()
    );
    let mut t = [0u8; 32];
    let n = s.len().min(32);
    t[..n].copy_from_slice(&s.as_bytes()[..n]);
    t
}

/// Why a lock file cannot be used.
#[derive(Debug)]
pub enum OpenError {
    /// There is none.
    Missing,
    /// It is not a lock file (wrong size or magic, or its mutex is unrecoverable): it may
    /// be replaced.
    Invalid(String),
    /// It exists but this process cannot use it (permission, another C library's layout).
    Unusable(io::Error),
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::Missing => f.write_str("missing"),
            OpenError::Invalid(s) => write!(f, "not a valid lock file ({s})"),
            OpenError::Unusable(e) => write!(f, "{e}"),
        }
    }
}

/// A mapped audit lock file.
pub struct LockFile {
    map: NonNull<Shared>,
    id: (u64, u64),
    // Keeps the file open for the life of the mapping (not needed by mmap, but makes the
    // (device, inode) pair stay meaningful).
    _file: File,
}

impl std::fmt::Debug for LockFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockFile").field("id", &self.id).finish()
    }
}

// SAFETY: the mapping is process-wide memory; the mutex is process-shared and made for
// concurrent use, and the hint is only touched through a `Guard`, i.e. with the mutex held.
unsafe impl Send for LockFile {}
// SAFETY: as above.
unsafe impl Sync for LockFile {}

fn map(file: &File) -> io::Result<NonNull<Shared>> {
    // SAFETY: a fresh shared mapping of LOCK_FILE_LEN bytes of an open file whose length
    // the caller checked (or allocated) to be LOCK_FILE_LEN; no existing memory is touched.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            LOCK_FILE_LEN,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(p.cast::<Shared>()).ok_or_else(|| io::Error::other("mmap returned null"))
}

impl LockFile {
    /// Maps the lock file at `path`.
    pub fn open(path: &Path) -> Result<LockFile, OpenError> {
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(OpenError::Missing),
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(OpenError::Invalid("a symbolic link".into()))
            }
            Err(e) => return Err(OpenError::Unusable(e)),
        };
        let m = file.metadata().map_err(OpenError::Unusable)?;
        if !m.is_file() || m.len() != LOCK_FILE_LEN as u64 {
            return Err(OpenError::Invalid(format!("{} bytes", m.len())));
        }
        let map = map(&file).map_err(OpenError::Unusable)?;
        let lf = LockFile {
            map,
            id: (m.dev(), m.ino()),
            _file: file,
        };
        // SAFETY: the mapping is LOCK_FILE_LEN bytes, larger than `Shared` (checked at
        // compile time); magic and ABI tag are plain bytes written once before the file
        // got its name and never changed after.
        let (magic, abi) = unsafe { ((*map.as_ptr()).magic, (*map.as_ptr()).abi) };
        if &magic != MAGIC {
            return Err(OpenError::Invalid("bad magic".into()));
        }
        if abi != abi_tag() {
            let theirs = String::from_utf8_lossy(&abi);
            return Err(OpenError::Unusable(io::Error::other(format!(
                "made for {}, this process is {}",
                theirs.trim_end_matches('\0'),
                String::from_utf8_lossy(&abi_tag()).trim_end_matches('\0')
            ))));
        }
        Ok(lf)
    }

    /// Builds a fresh lock file holding `hint` and gives it the name `path` (replacing any
    /// file there), with the permission bits, and where possible the group and the access
    /// ACL, of the file `like` (the log): whoever may append to the log may use it. The
    /// caller serializes creation (it holds the log's `flock`).
    pub fn create(path: &Path, like: &File, hint: Option<Hint>) -> io::Result<LockFile> {
        let m = like.metadata()?;
        let (mode, gid) = (m.mode(), m.gid());
        let mut acl = vec![0u8; 4096];
        let acl = match rustix::fs::fgetxattr(like, ACL_XATTR, &mut acl[..]) {
            Ok(n) => Some(acl[..n].to_vec()),
            Err(_) => None,
        };
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".{}.tmp", std::process::id()));
        let tmp = std::path::PathBuf::from(tmp);
        let _ = std::fs::remove_file(&tmp);
        let res = Self::build(&tmp, mode, Some(gid), acl.as_deref(), hint).and_then(|lf| {
            std::fs::rename(&tmp, path)?;
            Ok(lf)
        });
        if res.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        res
    }

    fn build(
        tmp: &Path,
        mode: u32,
        gid: Option<u32>,
        acl: Option<&[u8]>,
        hint: Option<Hint>,
    ) -> io::Result<LockFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(mode & 0o666)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(tmp)?;
        // the umask may have removed bits the log has: the lock file needs the same ones
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(mode & 0o666))?;
        if let Some(g) = gid {
            let _ = rustix::fs::fchown(&file, None, Some(rustix::fs::Gid::from_raw(g)));
        }
        if let Some(acl) = acl {
            rustix::fs::fsetxattr(&file, ACL_XATTR, acl, rustix::fs::XattrFlags::empty())?;
        }
        // allocated blocks, not a sparse file: a store into a hole on a full disk would
        // raise SIGBUS
        rustix::fs::fallocate(
            &file,
            rustix::fs::FallocateFlags::empty(),
            0,
            LOCK_FILE_LEN as u64,
        )?;
        let m = file.metadata()?;
        if m.len() != LOCK_FILE_LEN as u64 {
            return Err(io::Error::other("fallocate did not size the lock file"));
        }
        let map = map(&file)?;
        let lf = LockFile {
            map,
            id: (m.dev(), m.ino()),
            _file: file,
        };
        let s = map.as_ptr();
        // SAFETY: nobody else can see this file yet (fresh name, O_EXCL); the mapping is
        // large enough and zero-filled; the attribute object lives on this stack frame and
        // is destroyed after use; the mutex is initialized before the file gets its name.
        unsafe {
            let mut attr: libc::pthread_mutexattr_t = std::mem::zeroed();
            let mut rc = libc::pthread_mutexattr_init(&mut attr);
            if rc == 0 {
                rc = libc::pthread_mutexattr_setpshared(&mut attr, libc::PTHREAD_PROCESS_SHARED);
                if rc == 0 {
                    rc = libc::pthread_mutexattr_setrobust(&mut attr, libc::PTHREAD_MUTEX_ROBUST);
                }
                if rc == 0 {
                    rc = libc::pthread_mutex_init((*s).mutex.get(), &attr);
                }
                libc::pthread_mutexattr_destroy(&mut attr);
            }
            if rc != 0 {
                return Err(io::Error::from_raw_os_error(rc));
            }
            write_hint((*s).hint.get(), hint);
            (*s).abi = abi_tag();
            (*s).magic = *MAGIC;
        }
        Ok(lf)
    }

    /// (device, inode) of the mapped file.
    pub fn id(&self) -> (u64, u64) {
        self.id
    }

    /// Whether `path` still names the mapped file, whole (false once it was replaced,
    /// removed or truncated).
    pub fn still_current(&self, path: &Path) -> bool {
        std::fs::symlink_metadata(path)
            .map(|m| (m.dev(), m.ino()) == self.id && m.len() == LOCK_FILE_LEN as u64)
            .unwrap_or(false)
    }

    /// Takes the mutex (blocks while another thread or process holds it). No system call
    /// when it is free. If its holder died holding it, the mutex is made consistent
    /// again, the hint is cleared and [`Guard::owner_died`] says so: the log's end may be
    /// half-written. Fails only if the mutex is unusable (`ENOTRECOVERABLE`).
    pub fn lock(&self) -> io::Result<Guard<'_>> {
        let m = self.mutex();
        // SAFETY: `m` points into our live mapping at an initialized process-shared robust
        // mutex (checked magic); the mapping outlives the guard, which unlocks it.
        let rc = unsafe { libc::pthread_mutex_lock(m) };
        match rc {
            0 => Ok(Guard {
                lf: self,
                owner_died: false,
            }),
            libc::EOWNERDEAD => {
                // SAFETY: we hold the mutex (EOWNERDEAD means it was acquired).
                let rc = unsafe { libc::pthread_mutex_consistent(m) };
                let mut g = Guard {
                    lf: self,
                    owner_died: true,
                };
                if rc != 0 {
                    drop(g);
                    return Err(io::Error::from_raw_os_error(rc));
                }
                // whatever the dead holder was changing, nobody may trust the hint now
                // (also not a holder after us, who will not see EOWNERDEAD)
                g.set_hint(None);
                Ok(g)
            }
            rc => Err(io::Error::from_raw_os_error(rc)),
        }
    }

    fn mutex(&self) -> *mut libc::pthread_mutex_t {
        // SAFETY: field projection inside the live mapping, no read or write.
        unsafe { (*self.map.as_ptr()).mutex.get() }
    }
}

impl Drop for LockFile {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `map` with this length; no guard borrows it (a
        // guard borrows the LockFile), so nothing of this process uses it any more.
        unsafe {
            libc::munmap(self.map.as_ptr().cast(), LOCK_FILE_LEN);
        }
    }
}

/// The lock file's mutex, held; unlocked on drop.
pub struct Guard<'a> {
    lf: &'a LockFile,
    owner_died: bool,
}

impl Guard<'_> {
    /// The previous holder died holding the mutex: the hint is not to be trusted.
    pub fn owner_died(&self) -> bool {
        self.owner_died
    }

    /// The hint, if one is stored.
    pub fn hint(&self) -> Option<Hint> {
        // SAFETY: we hold the mutex, so no cooperating process writes the hint now; it is
        // plain integers and bytes, any bit pattern is a valid value.
        let r = unsafe { std::ptr::read((*self.lf.map.as_ptr()).hint.get()) };
        (r.valid == 1).then_some(Hint {
            log_id: (r.dev, r.ino),
            len: r.len,
            seq: r.seq,
            hash: r.hash,
        })
    }

    /// Stores (or clears) the hint.
    pub fn set_hint(&mut self, h: Option<Hint>) {
        // SAFETY: we hold the mutex; the hint is plain data inside the live mapping.
        unsafe { write_hint((*self.lf.map.as_ptr()).hint.get(), h) }
    }
}

/// # Safety
/// `p` points at the hint inside a live mapping, and the caller holds the mutex or is the
/// only one who can see the file.
unsafe fn write_hint(p: *mut RawHint, h: Option<Hint>) {
    let r = match h {
        Some(h) => RawHint {
            valid: 1,
            dev: h.log_id.0,
            ino: h.log_id.1,
            len: h.len,
            seq: h.seq,
            hash: h.hash,
        },
        None => RawHint {
            valid: 0,
            dev: 0,
            ino: 0,
            len: 0,
            seq: 0,
            hash: [0; 32],
        },
    };
    // SAFETY: guaranteed by the caller.
    unsafe { std::ptr::write(p, r) }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        // SAFETY: this guard exists only while this thread holds the mutex.
        unsafe {
            libc::pthread_mutex_unlock(self.lf.mutex());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_is_cached_and_follows_fork() {
        let parent = pid();
        assert_eq!(parent, std::process::id());
        assert_eq!(pid(), parent);
        // SAFETY: the child only calls `pid` (an atomic load, one getpid, an atomic store: no
        // allocation, no lock) and `_exit`, which is all a child of a threaded process may do.
        let child = unsafe { libc::fork() };
        assert!(child >= 0, "fork failed");
        if child == 0 {
            // SAFETY: getpid and _exit are async-signal-safe.
            let own = unsafe { libc::getpid() } as u32;
            let code = if pid() == own && own != parent { 0 } else { 1 };
            // SAFETY: as above; no destructor or atexit handler of the parent runs twice.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child; `status` is a valid out pointer.
        let r = unsafe { libc::waitpid(child, &mut status, 0) };
        assert_eq!(r, child);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
        assert_eq!(pid(), parent);
    }
}
