//! Process-shared state of the audit writer, behind a safe API: a cached process id that
//! follows `fork`, and the *audit lock*: a robust process-shared mutex and the chain-head
//! hint, kept in a System V shared memory segment that every process writing one audit
//! log attaches, and found through the *audit lock file* next to the log. The audit
//! module decides what to do with them (see `crate::audit`).
//!
//! Why a System V segment and not a mapped file: the size of a segment is fixed at its
//! creation, so no process can shrink it under the others (a shared file mapping whose
//! file is truncated kills every process touching it with `SIGBUS`). The lock file is only
//! read, never mapped; truncating or replacing it makes writers build a new segment.
//!
//! The lock file is 64 bytes, read with `pread`:
//!
//! ```text
//! 0    magic "cmkp11-audit-lk2" (16 bytes)
//! 16   ABI tag (32 bytes, NUL padded): C library, architecture, size of pthread_mutex_t
//! 48   the segment's id (i32, little endian), 4 bytes of padding
//! 56   a random nonce (u64) that the segment holds too (a reused id is never taken)
//! ```
//!
//! The segment is 4096 bytes:
//!
//! ```text
//! 0    magic "cmkp11-audit-seg" (16 bytes), 16 ABI tag (32 bytes), 48 nonce (u64)
//! 56   retired flag (u32): set by a writer that took the lock over (see [`LockFile::retire`])
//! 64   pthread_mutex_t (PTHREAD_PROCESS_SHARED, PTHREAD_MUTEX_ROBUST)
//! 192  hint, only read or written with the mutex held: valid flag, the log's device and
//!      inode, its length after the last append, seq and line hash of its last record
//! ```
//!
//! The segment is marked for removal as soon as it is made (Linux lets processes attach a
//! marked segment by id): it disappears when the last process detaches, and the next
//! writer finds its id gone and makes a new one. A lock file is always complete when it
//! appears under its name: it is built under a temporary name and renamed into place. It
//! holds no secret and nothing a verifier needs: the log alone verifies.
//!
//! The mutex is taken with a time limit ([`LOCK_TIMEOUT`]): a process that holds it
//! forever (stopped, or hostile) delays the others by that much once, then they replace
//! the lock (see `crate::audit::sink`).

use std::cell::UnsafeCell;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

/// Size of the lock file.
pub const LOCK_FILE_LEN: usize = 64;
const MAGIC: &[u8; 16] = b"cmkp11-audit-lk2";
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
    nonce: u64,
    retired: u32,
    _pad: u32,
    mutex: UnsafeCell<libc::pthread_mutex_t>,
    _pad2: [u8; 128 - std::mem::size_of::<libc::pthread_mutex_t>()],
    hint: UnsafeCell<RawHint>,
}

const _: () = assert!(std::mem::size_of::<Shared>() <= SEGMENT_LEN);
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

/// How long a writer waits for the audit lock before it takes it over.
pub const LOCK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);
/// Size of the shared segment.
pub const SEGMENT_LEN: usize = 4096;
const SEG_MAGIC: &[u8; 16] = b"cmkp11-audit-seg";

/// An attached audit lock segment, found through its lock file.
pub struct LockFile {
    map: NonNull<Shared>,
    /// (device, inode) of the lock file it was found through.
    id: (u64, u64),
    /// The lock file, kept open so that its inode number is not reused by another file
    /// while we compare it ([`LockFile::still_current`]). Read once, never mapped.
    _file: Option<File>,
}

impl std::fmt::Debug for LockFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockFile").field("id", &self.id).finish()
    }
}

// SAFETY: the segment is process-wide memory; the mutex is process-shared and made for
// concurrent use, the retired flag is atomic, and the hint is only touched through a
// `Guard`, i.e. with the mutex held.
unsafe impl Send for LockFile {}
// SAFETY: as above.
unsafe impl Sync for LockFile {}

fn last_errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Attaches segment `shmid`, if it is an audit lock segment of `SEGMENT_LEN` bytes with
/// `nonce` (else `Missing`: the id is gone or belongs to something else now).
fn attach(shmid: i32, nonce: u64) -> Result<NonNull<Shared>, OpenError> {
    // SAFETY: `ds` is a plain C struct, zero is a valid value; IPC_STAT only writes it.
    let mut ds: libc::shmid_ds = unsafe { std::mem::zeroed() };
    // SAFETY: a valid out pointer to a shmid_ds.
    if unsafe { libc::shmctl(shmid, libc::IPC_STAT, &mut ds) } == -1 {
        return match last_errno() {
            libc::EACCES | libc::EPERM => Err(OpenError::Unusable(io::Error::other(
                "no permission on its shared memory segment (grant writers through the log's \
                 group: a segment carries no ACL)",
            ))),
            _ => Err(OpenError::Missing),
        };
    }
    if ds.shm_segsz != SEGMENT_LEN {
        return Err(OpenError::Missing);
    }
    // SAFETY: attaches an existing segment of SEGMENT_LEN bytes (checked above; a
    // segment's size never changes) at an address the kernel chooses.
    let p = unsafe { libc::shmat(shmid, std::ptr::null(), 0) };
    if p as isize == -1 {
        return match last_errno() {
            libc::EACCES | libc::EPERM => Err(OpenError::Unusable(io::Error::other(
                "no permission on its shared memory segment (grant writers through the log's \
                 group: a segment carries no ACL)",
            ))),
            _ => Err(OpenError::Missing),
        };
    }
    let map = NonNull::new(p.cast::<Shared>()).ok_or(OpenError::Missing)?;
    // SAFETY: the attached segment is SEGMENT_LEN bytes, larger than `Shared`; magic,
    // ABI tag and nonce are plain bytes written before the segment was named anywhere.
    let (magic, abi, n) = unsafe {
        let s = map.as_ptr();
        ((*s).magic, (*s).abi, (*s).nonce)
    };
    if &magic != SEG_MAGIC || abi != abi_tag() || n != nonce {
        // SAFETY: detaches what we attached just above; nothing refers to it.
        unsafe { libc::shmdt(p) };
        return Err(OpenError::Missing);
    }
    Ok(map)
}

/// A random 64-bit value (std's per-process random hash keys, mixed with the time).
fn random_nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish()
}

impl LockFile {
    /// Attaches the segment the lock file at `path` names.
    pub fn open(path: &Path) -> Result<LockFile, OpenError> {
        let file = match OpenOptions::new()
            .read(true)
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
        let mut b = [0u8; LOCK_FILE_LEN];
        use std::os::unix::fs::FileExt;
        file.read_exact_at(&mut b, 0)
            .map_err(|e| OpenError::Invalid(e.to_string()))?;
        if &b[..16] != MAGIC {
            return Err(OpenError::Invalid("bad magic".into()));
        }
        if b[16..48] != abi_tag() {
            let theirs = String::from_utf8_lossy(&b[16..48]);
            return Err(OpenError::Unusable(io::Error::other(format!(
                "made for {}, this process is {}",
                theirs.trim_end_matches('\0'),
                String::from_utf8_lossy(&abi_tag()).trim_end_matches('\0')
            ))));
        }
        let shmid = i32::from_le_bytes(b[48..52].try_into().expect("4 bytes"));
        let nonce = u64::from_le_bytes(b[56..64].try_into().expect("8 bytes"));
        let map = attach(shmid, nonce)?;
        Ok(LockFile {
            map,
            id: (m.dev(), m.ino()),
            _file: Some(file),
        })
    }

    /// Makes a fresh segment holding `hint` and a lock file naming it at `path` (replacing
    /// any file there), with the permission bits, and where possible the group and the
    /// access ACL, of the file `like` (the log); the segment gets the same bits and group.
    /// The caller serializes creation (it holds the log's `flock`).
    pub fn create(path: &Path, like: &File, hint: Option<Hint>) -> io::Result<LockFile> {
        let m = like.metadata()?;
        let (mode, gid) = (m.mode() & 0o666, m.gid());
        let nonce = random_nonce();
        // SAFETY: plain system call; a new private segment of SEGMENT_LEN bytes.
        let shmid = unsafe {
            libc::shmget(
                libc::IPC_PRIVATE,
                SEGMENT_LEN,
                libc::IPC_CREAT | libc::IPC_EXCL | (mode as i32 | 0o600),
            )
        };
        if shmid == -1 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: attaches the segment just made, of SEGMENT_LEN bytes (zero-filled).
        let p = unsafe { libc::shmat(shmid, std::ptr::null(), 0) };
        // SAFETY: `ds` is a plain C struct; IPC_STAT fills it, IPC_SET reads it; IPC_RMID
        // only marks the segment (it lives while attached, and Linux lets others attach).
        unsafe {
            let mut ds: libc::shmid_ds = std::mem::zeroed();
            if libc::shmctl(shmid, libc::IPC_STAT, &mut ds) == 0 {
                ds.shm_perm.gid = gid;
                ds.shm_perm.mode = mode as _;
                libc::shmctl(shmid, libc::IPC_SET, &mut ds);
            }
            libc::shmctl(shmid, libc::IPC_RMID, std::ptr::null_mut());
        }
        if p as isize == -1 {
            return Err(io::Error::last_os_error());
        }
        let map = NonNull::new(p.cast::<Shared>()).ok_or_else(|| io::Error::other("null"))?;
        let s = map.as_ptr();
        // SAFETY: nobody else can reach this segment yet (its id is not named anywhere);
        // it is large enough and zero-filled; the attribute object lives on this stack
        // frame and is destroyed after use.
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
                libc::shmdt(p);
                return Err(io::Error::from_raw_os_error(rc));
            }
            write_hint((*s).hint.get(), hint);
            (*s).nonce = nonce;
            (*s).abi = abi_tag();
            (*s).magic = *SEG_MAGIC;
        }
        let mut lf = LockFile {
            map,
            id: (0, 0),
            _file: None,
        };
        let mut acl = vec![0u8; 4096];
        let acl = match rustix::fs::fgetxattr(like, ACL_XATTR, &mut acl[..]) {
            Ok(n) => Some(acl[..n].to_vec()),
            Err(_) => None,
        };
        let mut content = [0u8; LOCK_FILE_LEN];
        content[..16].copy_from_slice(MAGIC);
        content[16..48].copy_from_slice(&abi_tag());
        content[48..52].copy_from_slice(&shmid.to_le_bytes());
        content[56..64].copy_from_slice(&nonce.to_le_bytes());
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".{}.tmp", std::process::id()));
        let tmp = std::path::PathBuf::from(tmp);
        let _ = std::fs::remove_file(&tmp);
        let res = (|| {
            let file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
                .open(&tmp)?;
            // the umask may have removed bits the log has: the lock file needs the same
            use std::os::unix::fs::PermissionsExt;
            file.set_permissions(std::fs::Permissions::from_mode(mode))?;
            let _ = rustix::fs::fchown(&file, None, Some(rustix::fs::Gid::from_raw(gid)));
            if let Some(acl) = &acl {
                rustix::fs::fsetxattr(&file, ACL_XATTR, acl, rustix::fs::XattrFlags::empty())?;
            }
            use std::io::Write;
            (&file).write_all(&content)?;
            let m = file.metadata()?;
            std::fs::rename(&tmp, path)?;
            Ok::<_, io::Error>(((m.dev(), m.ino()), file))
        })();
        match res {
            Ok((id, file)) => {
                lf.id = id;
                lf._file = Some(file);
                Ok(lf)
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    /// (device, inode) of the lock file.
    pub fn id(&self) -> (u64, u64) {
        self.id
    }

    /// Whether `path` still names the lock file this segment was found through, whole
    /// (false once it was replaced, removed or truncated), and nobody took the lock over.
    pub fn still_current(&self, path: &Path) -> bool {
        !self.retired()
            && std::fs::symlink_metadata(path)
                .map(|m| (m.dev(), m.ino()) == self.id && m.len() == LOCK_FILE_LEN as u64)
                .unwrap_or(false)
    }

    /// Marks the segment as replaced: a writer that waited [`LOCK_TIMEOUT`] for its
    /// mutex made a new lock. A holder checks it before it appends ([`Guard::retired`]).
    pub fn retire(&self) {
        self.retired_flag().store(1, Ordering::Release);
    }

    /// Whether [`LockFile::retire`] was called on this segment (by any process).
    pub fn is_retired(&self) -> bool {
        self.retired()
    }

    fn retired(&self) -> bool {
        self.retired_flag().load(Ordering::Acquire) != 0
    }

    fn retired_flag(&self) -> &AtomicU32 {
        // SAFETY: the flag lies inside the attached segment, which lives as long as self;
        // it is only ever accessed atomically.
        unsafe { &*(std::ptr::addr_of_mut!((*self.map.as_ptr()).retired).cast::<AtomicU32>()) }
    }

    /// Takes the mutex, waiting at most [`LOCK_TIMEOUT`] (`ETIMEDOUT` after that). No
    /// system call when it is free. If its holder died holding it, the mutex is made
    /// consistent again, the hint is cleared and [`Guard::owner_died`] says so: the log's
    /// end may be half-written. Fails also if the mutex is unusable (`ENOTRECOVERABLE`).
    pub fn lock(&self) -> io::Result<Guard<'_>> {
        let m = self.mutex();
        // SAFETY: `m` points into our attached segment at an initialized process-shared
        // robust mutex (checked magic); the segment outlives the guard, which unlocks it.
        let mut rc = unsafe { libc::pthread_mutex_trylock(m) };
        if rc == libc::EBUSY {
            let mut now = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: a valid out pointer.
            unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut now) };
            let until = libc::timespec {
                tv_sec: now.tv_sec + LOCK_TIMEOUT.as_secs() as libc::time_t,
                tv_nsec: now.tv_nsec,
            };
            // SAFETY: as above; `until` is a valid absolute time.
            rc = unsafe { libc::pthread_mutex_timedlock(m, &until) };
        }
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
        // SAFETY: field projection inside the attached segment, no read or write.
        unsafe { (*self.map.as_ptr()).mutex.get() }
    }
}

impl Drop for LockFile {
    fn drop(&mut self) {
        // SAFETY: the segment was attached by `attach`/`create`; no guard borrows it (a
        // guard borrows the LockFile), so nothing of this process uses it any more.
        unsafe {
            libc::shmdt(self.map.as_ptr().cast());
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

    /// Another writer took the lock over (we held it for longer than [`LOCK_TIMEOUT`], or
    /// waited for a holder that did): appending now could fork the chain.
    pub fn retired(&self) -> bool {
        self.lf.retired()
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
