//! Sinks: the log file (append-only, serialized across processes by the audit lock file or
//! `flock`) and syslog.

use super::chain;
use crate::sys::shm::{self, Hint, LockFile, OpenError};
use rustix::fs::{flock, FlockOperation};
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

/// The audit lock file of the log at `log`: `.<file name>.lock` in the same directory (a
/// hidden name, so that log tools globbing `*` leave it alone).
pub fn lock_path(log: &Path) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(log.file_name().unwrap_or_default());
    name.push(".lock");
    log.with_file_name(name)
}

/// How this process serializes appends with the other writers of the log.
#[derive(Debug)]
enum Mode {
    /// The robust mutex in the audit lock file (no system call when free).
    Shared(LockFile),
    /// `flock` on the log: the lock file could not be created. Checked again under every
    /// `flock`: once a valid lock file exists, every writer must use it. `invalid` is the
    /// (device, inode) of an invalid lock file that could not be replaced (a valid one
    /// always appears under a new inode, by rename).
    Flock { invalid: Option<(u64, u64)> },
}

/// The log file of one process. Opened `O_APPEND`, so every `write` lands at the end even
/// if another process appended meanwhile; the lock makes "find the chain head, append the
/// next records" atomic across processes and threads.
#[derive(Debug)]
pub struct LogFile {
    path: PathBuf,
    lock_path: PathBuf,
    file: File,
    /// (device, inode) at open: a rotated or deleted log is reopened.
    id: (u64, u64),
    mode: Mode,
    /// The lock file's mutex was found unrecoverable: rebuild it at the next lock.
    rebuild: std::cell::Cell<bool>,
}

/// Holds the lock on the log (the lock file's mutex, or the `flock`); released on drop.
pub struct Locked<'a> {
    log: &'a LogFile,
    guard: Option<shm::Guard<'a>>,
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        if self.guard.is_none() {
            let _ = flock(&self.log.file, FlockOperation::Unlock);
        }
    }
}

/// `flock(LOCK_EX)` on the log, waiting at most [`shm::LOCK_TIMEOUT`]: a process holding
/// it forever must not stop the others' key uses (they fail the record instead).
fn flock_ex(f: &File) -> std::io::Result<()> {
    let start = std::time::Instant::now();
    let mut pause = std::time::Duration::from_micros(200);
    loop {
        match flock(f, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(()),
            Err(rustix::io::Errno::INTR) => continue,
            Err(rustix::io::Errno::WOULDBLOCK) if start.elapsed() < shm::LOCK_TIMEOUT => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_millis(20));
            }
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(std::io::Error::other(format!(
                    "another process has held the log's flock for more than {} s",
                    shm::LOCK_TIMEOUT.as_secs()
                )))
            }
            Err(e) => return Err(e.into()),
        }
    }
}

impl LogFile {
    /// Opens (creating, mode 0660 before umask) the log at `path` for appending, and its
    /// lock file (creating it if there is none; without one, `flock` is used).
    pub fn open(path: &Path) -> std::io::Result<LogFile> {
        Self::open_inner(path, lock_path(path), true)
    }

    /// Opens the existing file `path` for appending, serialized by the audit lock of the
    /// log at `log` (a file of the log renamed away, e.g. by logrotate, that writers may
    /// still hold open).
    pub fn open_existing(path: &Path, log: &Path) -> std::io::Result<LogFile> {
        Self::open_inner(path, lock_path(log), false)
    }

    fn open_inner(path: &Path, lock_path: PathBuf, create: bool) -> std::io::Result<LogFile> {
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(create)
            .mode(0o660)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)?;
        let m = file.metadata()?;
        if !m.is_file() {
            return Err(std::io::Error::other("not a regular file"));
        }
        let mut log = LogFile {
            path: path.to_owned(),
            lock_path,
            file,
            id: (m.dev(), m.ino()),
            mode: Mode::Flock { invalid: None },
            rebuild: std::cell::Cell::new(false),
        };
        log.mode = log.lock_mode(false)?;
        Ok(log)
    }

    /// Finds (or creates, or with `replace` rebuilds) the lock file. A missing one is
    /// created under the log's `flock`, so a writer in `Flock` mode (which looks for it
    /// under the same `flock`) never appends concurrently with one using it.
    fn lock_mode(&self, replace: bool) -> std::io::Result<Mode> {
        let unusable = |e: &dyn std::fmt::Display| {
            std::io::Error::other(format!("lock file {}: {e}", self.lock_path.display()))
        };
        if !replace {
            match LockFile::open(&self.lock_path) {
                Ok(lf) => return Ok(Mode::Shared(lf)),
                Err(OpenError::Unusable(e)) => return Err(unusable(&e)),
                Err(OpenError::Missing | OpenError::Invalid(_)) => {}
            }
        }
        flock_ex(&self.file)?;
        let _unlock = Locked {
            log: self,
            guard: None,
        };
        // again under the flock: another writer may have made or repaired it meanwhile
        let why = match LockFile::open(&self.lock_path) {
            // (a lock to replace is retired first: one that is not was made meanwhile by
            // another writer that replaced it, and serves us too)
            Ok(lf) if !replace || !lf.is_retired() => return Ok(Mode::Shared(lf)),
            Ok(_) => "its mutex is unrecoverable, or held for too long".to_string(),
            Err(OpenError::Unusable(e)) => return Err(unusable(&e)),
            Err(OpenError::Missing) => String::new(),
            Err(OpenError::Invalid(s)) => s,
        };
        if !why.is_empty() {
            log::warn!(
                "audit: replacing the lock file {}: {why}",
                self.lock_path.display()
            );
        }
        let len = (&self.file).seek(SeekFrom::End(0))?;
        let hint = chain::read_tail(&self.file, len)
            .ok()
            .filter(|t| t.torn.is_none())
            .map(|t| Hint {
                log_id: self.id,
                len,
                seq: t.seq,
                hash: t.hash,
            });
        match LockFile::create(&self.lock_path, &self.file, hint) {
            Ok(lf) => Ok(Mode::Shared(lf)),
            Err(e) => {
                log::warn!(
                    "audit: cannot create the lock file {}: {e}; serializing with flock \
                     on the log (slower)",
                    self.lock_path.display()
                );
                let invalid = std::fs::symlink_metadata(&self.lock_path)
                    .ok()
                    .map(|m| (m.dev(), m.ino()));
                Ok(Mode::Flock { invalid })
            }
        }
    }

    /// The path this log was opened at.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// (device, inode) of the open log.
    pub fn id(&self) -> (u64, u64) {
        self.id
    }

    /// Whether appends are serialized by the lock file (else by `flock`).
    pub fn uses_lock_file(&self) -> bool {
        matches!(self.mode, Mode::Shared(_))
    }

    /// Whether the path still names the file we hold open (false after rotation or
    /// deletion), and the lock file's path the lock file we use.
    pub fn still_current(&self) -> bool {
        let log = std::fs::metadata(&self.path)
            .map(|m| (m.dev(), m.ino()) == self.id)
            .unwrap_or(false);
        log && match &self.mode {
            Mode::Shared(lf) => lf.still_current(&self.lock_path),
            Mode::Flock { .. } => true,
        }
    }

    /// Replaces the lock before the next append (it was retired by another writer, or held
    /// for longer than [`shm::LOCK_TIMEOUT`]): the lock file everybody uses then, or a new
    /// one.
    pub fn replace_lock(&self) {
        self.rebuild.set(true);
    }

    /// Takes the lock (waits at most [`shm::LOCK_TIMEOUT`] for another writer).
    pub fn lock(&mut self) -> std::io::Result<Locked<'_>> {
        if self.rebuild.take() {
            if let Mode::Shared(lf) = &self.mode {
                lf.retire();
            }
            self.mode = self.lock_mode(true)?;
        }
        while let Mode::Flock { invalid } = self.mode {
            flock_ex(&self.file)?;
            match std::fs::symlink_metadata(&self.lock_path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Ok(Locked {
                        log: self,
                        guard: None,
                    })
                }
                Ok(m) if Some((m.dev(), m.ino())) == invalid => {
                    return Ok(Locked {
                        log: self,
                        guard: None,
                    })
                }
                _ => {}
            }
            // another writer made a lock file: from now on it serializes the appends
            let _ = flock(&self.file, FlockOperation::Unlock);
            self.mode = self.lock_mode(false)?;
        }
        match &self.mode {
            Mode::Shared(lf) => match lf.lock() {
                Ok(g) => Ok(Locked {
                    log: self,
                    guard: Some(g),
                }),
                Err(e) => {
                    if e.raw_os_error() == Some(libc::ETIMEDOUT) {
                        // A holder that keeps the lock this long is stopped or hostile:
                        // its lock is retired and replaced at the next call (the caller
                        // retries at once; a holder that comes back checks the flag
                        // before it appends, see `Locked::retired`).
                        log::warn!(
                            "audit: another process has held the audit lock of {} for more \
                             than {} s; replacing the lock",
                            self.path.display(),
                            shm::LOCK_TIMEOUT.as_secs()
                        );
                        self.rebuild.set(true);
                    }
                    if e.raw_os_error() == Some(libc::ENOTRECOVERABLE) {
                        // only a writer that ignores the robust protocol leaves this:
                        // rebuild the lock file before the next append
                        self.rebuild.set(true);
                    }
                    Err(e)
                }
            },
            Mode::Flock { .. } => Err(std::io::Error::other("no lock mode")),
        }
    }
}

impl Locked<'_> {
    /// The current length of the file.
    pub fn end(&self) -> std::io::Result<u64> {
        // lseek is the cheapest way to the length (no stat buffer to fill)
        (&self.log.file).seek(SeekFrom::End(0))
    }

    /// The open file (for tail reads).
    pub fn file(&self) -> &File {
        &self.log.file
    }

    /// Whether the lock file serializes appends (else `flock`).
    pub fn shared(&self) -> bool {
        self.guard.is_some()
    }

    /// Whether another writer took the lock over while we waited or held it: appending
    /// now could fork the chain (reopen and try again).
    pub fn retired(&self) -> bool {
        self.guard.as_ref().is_some_and(|g| g.retired())
    }

    /// The lock file's hint about this log: `None` under `flock`, when there is none, when
    /// it describes another file, or when its last writer died holding the lock.
    pub fn hint(&self) -> Option<Hint> {
        let g = self.guard.as_ref()?;
        if g.owner_died() {
            return None;
        }
        g.hint().filter(|h| h.log_id == self.log.id)
    }

    /// The lock file's hint whatever file it describes (`None` under `flock`, when there
    /// is none, or when its last writer died holding the lock).
    pub fn raw_hint(&self) -> Option<Hint> {
        let g = self.guard.as_ref()?;
        if g.owner_died() {
            return None;
        }
        g.hint()
    }

    /// Stores the hint for the next writer (a no-op under `flock`).
    pub fn set_hint(&mut self, h: Option<Hint>) {
        if let Some(g) = &mut self.guard {
            g.set_hint(h);
        }
    }

    /// Appends `buf` with one `write` (whole lines). On failure the file is cut back to
    /// `len` so that no partial line is left behind.
    pub fn append(&mut self, buf: &[u8], len: u64) -> std::io::Result<()> {
        let r = (&self.log.file).write_all(buf);
        if r.is_err() {
            if let Err(e) = self.log.file.set_len(len) {
                log::error!(
                    "audit: cannot cut {} back after a failed write: {e}",
                    self.log.path.display()
                );
            }
        }
        r
    }

    /// `fdatasync`: the lines are on disk before the token checkpoint names them.
    pub fn sync(&self) -> std::io::Result<()> {
        self.log.file.sync_data()
    }
}

/// Sends records to the local syslog daemon (`/dev/log`, facility authpriv) so that
/// rsyslog or journald can forward them. Best effort: a lost datagram never fails a record.
#[derive(Debug)]
pub struct Syslog {
    sock: Option<UnixDatagram>,
    path: PathBuf,
    pid: u32,
    warned: bool,
}

/// `LOG_AUTHPRIV` (10) << 3.
const AUTHPRIV: u8 = 10 << 3;

impl Syslog {
    /// A sink for the socket at `path` (normally `/dev/log`).
    pub fn new(path: &Path) -> Syslog {
        Syslog {
            sock: None,
            path: path.to_owned(),
            pid: 0,
            warned: false,
        }
    }

    /// Sends one record; `ok` chooses severity info (6) or warning (4).
    pub fn send(&mut self, line: &[u8], ok: bool) {
        let pid = shm::pid();
        if self.sock.is_none() || self.pid != pid {
            self.pid = pid;
            self.sock = UnixDatagram::unbound()
                .and_then(|s| s.connect(&self.path).map(|_| s))
                .map_err(|e| self.warn(&e))
                .ok();
        }
        let Some(sock) = &self.sock else { return };
        let pri = AUTHPRIV + if ok { 6 } else { 4 };
        let mut msg = format!("<{pri}>cmkp11-audit[{pid}]: ").into_bytes();
        msg.extend_from_slice(line);
        if let Err(e) = sock.send(&msg) {
            self.warn(&e);
            self.sock = None;
        }
    }

    fn warn(&mut self, e: &std::io::Error) {
        if !self.warned {
            self.warned = true;
            log::warn!("audit: syslog {}: {e}", self.path.display());
        }
    }
}
