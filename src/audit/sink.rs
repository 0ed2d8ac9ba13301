//! Sinks: the log file (append-only, `flock`-serialized across processes) and syslog.

use rustix::fs::{flock, FlockOperation};
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

/// The log file of one process. Opened `O_APPEND`, so every `write` lands at the end even
/// if another process appended meanwhile; the exclusive `flock` makes "read the chain
/// head, append the next records" atomic across processes and threads.
#[derive(Debug)]
pub struct LogFile {
    path: PathBuf,
    file: File,
    /// (device, inode) at open: a rotated or deleted log is reopened.
    id: (u64, u64),
}

/// Holds the exclusive lock on the log; released on drop.
pub struct Locked<'a> {
    /// The locked log.
    pub log: &'a mut LogFile,
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        let _ = flock(&self.log.file, FlockOperation::Unlock);
    }
}

impl LogFile {
    /// Opens (creating, mode 0660 before umask) the log at `path` for appending.
    pub fn open(path: &Path) -> std::io::Result<LogFile> {
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o660)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)?;
        let m = file.metadata()?;
        if !m.is_file() {
            return Err(std::io::Error::other("not a regular file"));
        }
        Ok(LogFile {
            path: path.to_owned(),
            file,
            id: (m.dev(), m.ino()),
        })
    }

    /// The path this log was opened at.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the path still names the file we hold open (false after rotation/deletion).
    pub fn still_current(&self) -> bool {
        std::fs::metadata(&self.path)
            .map(|m| (m.dev(), m.ino()) == self.id)
            .unwrap_or(false)
    }

    /// Takes the exclusive lock (blocks while another writer holds it).
    pub fn lock(&mut self) -> std::io::Result<Locked<'_>> {
        loop {
            match flock(&self.file, FlockOperation::LockExclusive) {
                Ok(()) => return Ok(Locked { log: self }),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
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
        let pid = std::process::id();
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
