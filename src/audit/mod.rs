//! The tamper-evident audit log: one JSON line per decision about a CMK.
//!
//! # Records
//!
//! Fields, in this order: `time` (RFC 3339 UTC, microseconds), `seq`, `pid`, `uid`, `exe`,
//! `slot`, `token`, `session`, `op`, `mechanism` (`CKM_*` name, else hex), `key` (label),
//! `key_id` (hex), `version`, `result` (`CKR_*` name), `reason`, (`bulk`), `prev`, `mac`.
//! Absent values are `null`. `bulk` appears only in `session-close` records and holds the
//! per-operation counts of DEK bulk operations in that session. A [`Record`] has no field
//! that could carry a PIN, key bytes or data; `reason` is free text and callers must keep
//! secrets out of it.
//!
//! # Tamper evidence: hash chain + token checkpoints
//!
//! * **Chain.** `seq` counts records in the file (1, 2, ...). `prev` is the SHA-256 of the
//!   previous line's bytes (without its newline); the first record's `prev` is 64 zeros.
//!   So every record commits to the whole log before it, and a deleted, inserted,
//!   reordered or edited line breaks the chain at a precise place ([`verify()`] names it).
//!
//! * **MAC on checkpoint records.** A hash chain alone can be recomputed by anyone who
//!   can write the file, so the chain head is authenticated with an HMAC key that never
//!   leaves the token ([`TokenMac`]). A token call per record would cost more than the
//!   performance goal allows, and it is not needed: since `prev` commits to all earlier
//!   lines, a MAC over one record's bytes authenticates every record before it. A writer
//!   therefore puts a MAC (`mac` = HMAC over a domain tag and the SHA-256 of the line up to
//!   `,"mac":`) on its first record, then on the record that ends a batch when
//!   [`Tuning::checkpoint_records`] records or [`Tuning::checkpoint_interval`] have
//!   passed since its last MAC, and on a `checkpoint` record written by
//!   [`Auditor::checkpoint`] (called on drop, and by the runtime at `C_Finalize`) or by
//!   [`Auditor::tick`] (an idle process whose interval has passed). Other records have
//!   `"mac":null`.
//!
//! * **Token checkpoint.** After writing a MACed record (still under the file lock, after
//!   `fdatasync` of the log), the writer stores `seq`, line hash and MAC of that record in
//!   the token's checkpoint object. Cutting records off the end of the file is then
//!   detected: the token names a record the file no longer has.
//!
//! **Guarantee.** Without the token, nobody can modify, insert, delete, reorder or cut
//! records up to the latest token checkpoint without [`verify()`] (run with the token)
//! naming the first bad record. Records written after the latest checkpoint are
//! hash-chained but not yet authenticated, and verify reports how many: per process at
//! most `checkpoint_records` records or `checkpoint_interval` (1 s) of its activity,
//! plus, when it goes idle, its records since its last MAC until its next record,
//! [`Auditor::tick`] or close; a process killed with `SIGKILL` leaves them so. A clean
//! close (`C_Finalize`, [`Auditor::checkpoint`]) leaves no such window. Without a token
//! configured, the log is a plain hash chain: it detects accidental damage and naive
//! edits, not an attacker who recomputes the chain.
//!
//! # Many writers, one file
//!
//! The file is opened `O_APPEND`. Appends are serialized across processes by the *audit
//! lock*: a System V shared memory segment (one page, its size fixed at creation, so no
//! process can shrink it under the others), named by the *audit lock file*
//! `.<log name>.lock` next to the log ([`sink::lock_path`], read once, never mapped), and
//! attached by every writer. It holds a process-shared **robust** pthread mutex and a *hint*
//! (the log's device and inode, its length after the last append, and the `seq` and line
//! hash of the record there). A writer takes the mutex (an atomic operation, no system call
//! unless another writer holds it), and finds the chain head:
//!
//! * the hint's length is where its own last append ended: nobody appended since, the head
//!   is the hint's (no system call);
//! * else it reads the file's length (`lseek`): if that is the hint's length, the head is
//!   the hint's (another writer appended last); otherwise, or without a usable hint, it
//!   reads the end of the file ([`chain::read_tail`]).
//!
//! It then appends its lines with one `write`, stores the new hint, and unlocks. An
//! uncontended record therefore costs one system call, the `write`; the process id is
//! cached too ([`crate::sys::shm::pid`], refreshed in a forked child by a `pthread_atfork`
//! handler). Threads of one process combine: while one thread writes, the others queue
//! their records and the next writer appends them all in one `write` (group commit), so
//! the lock is taken per batch, not per record.
//!
//! **A writer killed holding the lock.** The kernel releases a robust mutex whose owner
//! died; the next holder gets `EOWNERDEAD`, makes the mutex consistent and clears the hint
//! (it may be half-written), so the next append reads the end of the file. A writer killed mid-`write`
//! leaves a torn line; the next writer finds it there, terminates it with a newline and
//! writes a `torn` record (`reason` = offset, length and SHA-256 of the torn bytes) chained
//! to the last complete record; verify reports it as a note with its exact place. No
//! writer ever waits for a dead one.
//!
//! **The lock file is a hint and a lock, never evidence.** [`verify()`] reads only the
//! log (verify takes the mutex too, so it never reads half an append); deleting the lock
//! file loses nothing. It is created (complete, under a temporary name, then renamed into
//! place) under an exclusive `flock` on the log, with the log's permission bits, group and
//! access ACL, so whoever may append to the log may use it. If it cannot be created
//! (read-only directory, full file system) the writer uses `flock` on the log for every
//! append, as before lock files existed, and looks for a lock file under every `flock`
//! (one `stat` more per append in that mode): the first writer that manages
//! to create one does so under the `flock`, so from then on everybody uses the mutex and
//! the two kinds of lock never run side by side. A lock file that is not one (wrong size
//! or magic, a symbolic link, a mutex left unrecoverable) is replaced the same way. One
//! that exists but cannot be used (no permission, made by a build with another C
//! library's mutex layout) fails the records (refused under `deny`) rather than
//! guessing. Every [`RECHECK`] (100 ms) a writer checks that the log's and the lock
//! file's paths still name the files it holds, and checks the file's length once instead
//! of trusting the hint: a lock file deleted or replaced while writers run (never do
//! that) can let two writers append at the same time only within that window, and verify
//! would report the fork. All writers of one log must run a build with the lock file (an
//! older build serializes with `flock` only). A lock file truncated or overwritten makes
//! writers build a new segment (no writer maps the file, so none gets `SIGBUS`); its
//! hidden name keeps it out
//! of `*` globs of log tools.
//!
//! **Failed writes.** A failed `write` (disk full, I/O error) is cut back with `ftruncate`
//! so no partial line stays, the hint is cleared, and the next successful write starts
//! with an `audit-lost` record that counts the records lost (also those lost because the
//! log or its lock file could not be opened).
//!
//! # Failing closed
//!
//! [`Auditor::record`] returns `Ok` only once the record is in the file (in the page
//! cache; `fdatasync` happens at checkpoints). If it cannot be written and `on_failure` is
//! `deny` it returns `Err(CKR_FUNCTION_FAILED)` and the caller must refuse the key use;
//! with `allow` it logs an error and returns `Ok`.
//!
//! **A lock held forever.** The mutex (and the `flock` of the fallback) is taken with a
//! time limit ([`crate::sys::shm::LOCK_TIMEOUT`], 3 s). A writer that waited that long
//! marks the segment *retired* and makes a new lock file and segment under the log's
//! `flock`; the others follow (a writer that finds the named lock retired or replaced
//! reopens). A holder that comes back checks the retired flag before it appends and, if
//! set, appends on the new lock instead: a stopped or hostile process delays the others by
//! the time limit once, and never makes them wait for ever.
//!
//! # Truncation, replay, re-anchoring
//!
//! Before a MAC moves the token checkpoint, the writer checks (under the lock) that the
//! record the checkpoint names is in the file: the checkpoint (v2) holds its `seq`, line
//! hash, MAC and end offset. If it is not (the log was cut, or replaced by an older copy,
//! or the checkpoint object was destroyed while the audit key existed), the writer first
//! appends an `audit-gap` record saying what it found, and every later checkpoint keeps
//! the gap's `seq`: [`verify()`] reports the gap (`Tamper::Gap`) from then on, also when
//! the `audit-gap` record itself is cut away later.
//!
//! # Lifecycle steps
//!
//! Under `on_failure = "deny"`, a lifecycle step writes an `intent` record first
//! ([`Auditor::intent`]); if that fails the step is not made. Its outcome is the step's own
//! record after it.
//!
//! # Rotation
//!
//! `cmkp11 audit rotate` ([`rotate::rotate`]) closes the file with a MACed `log-close`
//! record and puts a new file in its place whose first record (`log-open`) continues the
//! chain (`seq` goes on, `prev` is the hash of the `log-close` line). Under the lock, a
//! writer whose file ends with `log-close`, or whose lock file's hint names another file
//! than the one it holds while the path names another one too, reopens the path before it
//! appends, so no record is lost or written twice across the switch. A writer that finds
//! the log's file empty while the hint (or, with no process attached to the lock, the
//! token checkpoint) knows its last record, starts it with a `log-continue` record chained
//! to that record (truncated in place by `copytruncate`, or renamed away and replaced):
//! the files verify as a series ([`verify::verify_series`]), and alone the file names the
//! truncation instead of reporting records as modified or missing. While the path names no
//! file, a writer keeps its open file for [`RENAME_GRACE`] (logrotate's `nocreate`, then
//! `cmkp11 audit rotate --renamed`).

pub mod chain;
pub mod cli;
pub mod record;
pub mod rotate;
pub mod sink;
pub mod verify;

pub use verify::{verify, Problem, Report, Tamper};

use cryptoki_sys::CKR_FUNCTION_FAILED;
use parking_lot::{Condvar, Mutex};
use record::{Body, Ident};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// How often a writer checks that the log's path and the lock file's path still name the
/// files it holds open, and checks the log's length against the lock file's hint.
pub const RECHECK: Duration = Duration::from_millis(100);

/// The error of an append whose lock another writer took over meanwhile (retried).
const RETIRED: &str = "the audit lock was taken over by another writer";

/// The error of an append that found its file closed (rotated) or the log continued in
/// another file by another writer: reopened and retried.
const REOPEN: &str = "the audit log continues in another file";

/// How long a writer keeps appending to its open file while the log's path names no file
/// (a rename in progress, e.g. logrotate with `nocreate` before its `postrotate` runs
/// `cmkp11 audit rotate --renamed`): then it creates a new file at the path.
pub const RENAME_GRACE: Duration = Duration::from_secs(2);

/// Whether `path` names the file `id` (device, inode).
fn path_names(path: &std::path::Path, id: (u64, u64)) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == id)
}

/// How often a token that refused to MAC is asked again (a `checkpoint` always asks).
pub const MAC_RETRY: Duration = Duration::from_millis(100);

/// One decision about a CMK, as the runtime reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    /// `login`, `logout`, `encrypt`, `decrypt`, `sign`, `verify`, `wrap`, `unwrap`,
    /// `derive`, `generate`, `rotate`, `disable`, `enable`, `schedule-deletion`,
    /// `cancel-deletion`, `purge`, `import`, `denied`, ...
    pub op: String,
    /// `CKM_*` of the operation.
    pub mechanism: Option<u64>,
    /// The CMK's name (label).
    pub key: Option<String>,
    /// The CMK's `CKA_ID`.
    pub key_id: Option<Vec<u8>>,
    /// The CMK version used.
    pub version: Option<u32>,
    /// The `CK_RV` returned to the application.
    pub result: u64,
    /// Why (denials, failures). Never a secret.
    pub reason: Option<String>,
    /// Slot id as the application sees it.
    pub slot: Option<u64>,
    /// Token label.
    pub token: Option<String>,
    /// Session handle as the application sees it.
    pub session: Option<u64>,
}

impl Record {
    /// A record of `op` with result `rv` and nothing else set.
    pub fn new(op: &str, rv: u64) -> Record {
        Record {
            op: op.into(),
            result: rv,
            ..Record::default()
        }
    }

    /// The record by reference.
    pub fn view(&self) -> RecordRef<'_> {
        RecordRef {
            op: &self.op,
            mechanism: self.mechanism,
            key: self.key.as_deref(),
            key_id: self.key_id.as_deref(),
            version: self.version,
            result: self.result,
            reason: self.reason.as_deref(),
            slot: self.slot,
            token: self.token.as_deref(),
            session: self.session,
        }
    }
}

/// A [`Record`] made of borrowed values, for [`Auditor::record_ref`]: a caller on the hot
/// path (a CMK use) then needs no allocation to describe it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecordRef<'a> {
    /// See [`Record::op`].
    pub op: &'a str,
    /// See [`Record::mechanism`].
    pub mechanism: Option<u64>,
    /// See [`Record::key`].
    pub key: Option<&'a str>,
    /// See [`Record::key_id`].
    pub key_id: Option<&'a [u8]>,
    /// See [`Record::version`].
    pub version: Option<u32>,
    /// See [`Record::result`].
    pub result: u64,
    /// See [`Record::reason`].
    pub reason: Option<&'a str>,
    /// See [`Record::slot`].
    pub slot: Option<u64>,
    /// See [`Record::token`].
    pub token: Option<&'a str>,
    /// See [`Record::session`].
    pub session: Option<u64>,
}

/// The token side of the audit log: an HMAC key that never leaves the token (label
/// `cmkp11:audit-mac`) and a data object holding the latest checkpoint (label
/// `cmkp11:audit-checkpoint`). Errors are `CK_RV`s.
///
/// `mac` and `store_checkpoint` are called from [`Auditor::record`] while the audit file
/// lock is held: they must not call back into the [`Auditor`].
pub trait TokenMac: Send + Sync {
    /// HMAC (or CMAC) of `data` with the token's audit key. Must be deterministic.
    fn mac(&self, data: &[u8]) -> Result<Vec<u8>, u64>;
    /// The checkpoint object's value, `None` if there is none yet.
    fn load_checkpoint(&self) -> Result<Option<Vec<u8>>, u64>;
    /// Replaces the checkpoint object's value (creating the object if needed).
    fn store_checkpoint(&self, data: &[u8]) -> Result<(), u64>;
    /// Whether the audit key was in the token before this object first reached it (it did
    /// not make it): MACs were made with it, so a token without a checkpoint lost one.
    fn key_existed(&self) -> Result<bool, u64> {
        Ok(false)
    }
}

/// Sees every record before it is written, and whether it was (`cmkp11d`'s metrics).
/// Called on the caller's thread: it must be quick and must not call back into the log.
pub type Observer = fn(&RecordRef<'_>, bool);

static OBSERVER: std::sync::OnceLock<Observer> = std::sync::OnceLock::new();

/// Installs the process's record observer (once; later calls are ignored).
pub fn set_observer(f: Observer) {
    let _ = OBSERVER.set(f);
}

fn observe(r: &RecordRef<'_>, written: bool) {
    if let Some(f) = OBSERVER.get() {
        f(r, written);
    }
}

/// Knobs of the writer; [`Tuning::default`] is what production uses.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// A MAC at least every this many records of one process.
    pub checkpoint_records: u32,
    /// ... or when this much time has passed since the process's last MAC (checked when a
    /// record is written; no background thread).
    pub checkpoint_interval: Duration,
    /// The syslog socket.
    pub syslog_socket: PathBuf,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            checkpoint_records: 100_000,
            checkpoint_interval: Duration::from_secs(1),
            syslog_socket: PathBuf::from("/dev/log"),
        }
    }
}

/// Appends records to the audit log. Shared by all threads of a process (`Sync`).
pub struct Auditor {
    path: Option<PathBuf>,
    deny: bool,
    tuning: Tuning,
    ident: Ident,
    q: Mutex<Queue>,
    cv: Condvar,
    w: Mutex<Writer>,
    bulk: Mutex<HashMap<u64, BTreeMap<String, u64>>>,
    failures: AtomicU64,
    failing: AtomicBool,
    last_failure: Mutex<String>,
}

impl std::fmt::Debug for Auditor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auditor")
            .field("path", &self.path)
            .field("deny", &self.deny)
            .finish_non_exhaustive()
    }
}

/// A record waiting for the group commit.
struct Pending {
    ticket: u64,
    body: Body,
    ok: bool,
    force_mac: bool,
}

#[derive(Default)]
struct Queue {
    pid: u32,
    pending: Vec<Pending>,
    /// An empty vector with capacity, for `pending` after a leader took it.
    spare: Vec<Pending>,
    writing: bool,
    next: u64,
    done: u64,
    failed: HashMap<u64, String>,
}

struct Writer {
    pid: u32,
    mac: Option<Arc<dyn TokenMac>>,
    log: Option<sink::LogFile>,
    /// File length after our last append, and the chain head we wrote there.
    end: u64,
    head: Option<(u64, [u8; 32])>,
    since_mac: u32,
    last_mac: Option<Instant>,
    /// This process wrote records no MAC of its own covers yet.
    unmac: bool,
    /// When the token last refused a MAC (not logged in, session lost): retried at most
    /// every [`MAC_RETRY`] so a token that cannot MAC does not cost a call per record.
    mac_failed_at: Option<Instant>,
    lost: u64,
    lost_why: String,
    last_path_check: Instant,
    /// Since when the log's path names no file (see [`RENAME_GRACE`]).
    missing_since: Option<Instant>,
    syslog: Option<sink::Syslog>,
    buf: Vec<u8>,
}

impl Writer {
    fn reset(&mut self, pid: u32) {
        self.pid = pid;
        self.log = None;
        self.end = 0;
        self.head = None;
        self.since_mac = 0;
        self.last_mac = None;
        self.unmac = false;
        self.lost = 0;
    }
}

/// If the group-commit leader unwinds (a panicking [`TokenMac`]), its batch is failed and
/// the next thread can lead: nobody waits forever.
struct LeaderGuard<'a> {
    a: &'a Auditor,
    tickets: std::ops::RangeInclusive<u64>,
    armed: bool,
}

impl Drop for LeaderGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            let mut q = self.a.q.lock();
            q.writing = false;
            q.done = q.done.max(*self.tickets.end());
            for t in self.tickets.clone() {
                q.failed.insert(t, "the audit writer panicked".into());
            }
            self.a.cv.notify_all();
        }
    }
}

impl Auditor {
    /// An auditor for `[audit]`. `file = None` gives a disabled auditor ([`record`] is a
    /// no-op). The file is opened lazily and reopened after errors, so a missing directory
    /// or a permission problem shows as failing records (refused under `deny`), each
    /// logged. Errors only for an invalid configuration.
    ///
    /// [`record`]: Auditor::record
    pub fn open(
        cfg: &crate::config::Audit,
        mac: Option<Arc<dyn TokenMac>>,
    ) -> Result<Auditor, String> {
        Self::open_with(cfg, mac, Tuning::default())
    }

    /// [`Auditor::open`] with explicit [`Tuning`] (tests, benchmarks).
    pub fn open_with(
        cfg: &crate::config::Audit,
        mac: Option<Arc<dyn TokenMac>>,
        tuning: Tuning,
    ) -> Result<Auditor, String> {
        let deny = match cfg.on_failure.as_str() {
            "deny" => true,
            "allow" => false,
            o => return Err(format!("audit.on_failure: `{o}` is not one of deny, allow")),
        };
        if cfg.file.is_none() && cfg.syslog {
            log::warn!("audit: syslog = true has no effect without audit.file");
        }
        let pid = crate::sys::shm::pid();
        let syslog = cfg.syslog.then(|| {
            sink::Syslog::new(
                cfg.syslog_socket
                    .as_deref()
                    .unwrap_or(&tuning.syslog_socket),
            )
        });
        let mut w = Writer {
            pid,
            mac,
            log: None,
            end: 0,
            head: None,
            since_mac: 0,
            last_mac: None,
            unmac: false,
            mac_failed_at: None,
            lost: 0,
            lost_why: String::new(),
            last_path_check: Instant::now(),
            missing_since: None,
            syslog,
            buf: Vec::new(),
        };
        if let Some(p) = &cfg.file {
            match sink::LogFile::open(p) {
                Ok(l) => w.log = Some(l),
                Err(e) => log::error!(
                    "audit: cannot open {}: {e}; CMK uses will {}",
                    p.display(),
                    if deny { "be refused" } else { "go unaudited" }
                ),
            }
        }
        Ok(Auditor {
            path: cfg.file.clone(),
            deny,
            tuning,
            ident: Ident::current(),
            q: Mutex::new(Queue {
                pid,
                next: 1,
                ..Queue::default()
            }),
            cv: Condvar::new(),
            w: Mutex::new(w),
            bulk: Mutex::new(HashMap::new()),
            failures: AtomicU64::new(0),
            failing: AtomicBool::new(false),
            last_failure: Mutex::new(String::new()),
        })
    }

    /// Stops using the token's MAC key: the library is closing and its backend is about
    /// to be finalized (a checkpoint after that, when the auditor is dropped, could only
    /// write an unauthenticated record).
    pub fn detach_mac(&self) {
        self.w.lock().mac = None;
    }

    /// Whether records go anywhere (`audit.file` is set).
    pub fn enabled(&self) -> bool {
        self.path.is_some()
    }

    /// Whether a record that cannot be written makes the caller refuse (`on_failure = deny`).
    pub fn denies_on_failure(&self) -> bool {
        self.deny
    }

    /// Why the latest record could not be written (empty if none failed).
    pub fn last_failure(&self) -> String {
        self.last_failure.lock().clone()
    }

    /// Records the intent of a lifecycle step before it is made, when a step whose record
    /// cannot be written must not happen (`on_failure = deny`): `Err` with the reason then,
    /// and the caller does not make the step. A no-op under `allow` or without a log (the
    /// step's outcome record follows it in every case).
    pub fn intent(&self, r: &RecordRef<'_>) -> Result<(), String> {
        if !self.deny || self.path.is_none() {
            return Ok(());
        }
        let r = RecordRef {
            op: "intent",
            reason: Some(r.op),
            ..*r
        };
        self.record_with(&r, None, false)
            .map_err(|_| self.last_failure())
    }

    /// How many records could not be written since open.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Appends one record. `Err(CKR_FUNCTION_FAILED)` when it could not be written and
    /// `on_failure = deny`: the caller must then refuse the operation. Under `allow`, a
    /// failure is logged and `Ok` returned.
    pub fn record(&self, r: Record) -> Result<(), u64> {
        self.record_with(&r.view(), None, false)
    }

    /// [`Auditor::record`] of a record by reference (same result, no allocation needed by
    /// the caller).
    pub fn record_ref(&self, r: &RecordRef<'_>) -> Result<(), u64> {
        self.record_with(r, None, false)
    }

    /// Counts one DEK bulk operation (`encrypt`, `decrypt`, ...) of a session; the counts
    /// go into the session's `session-close` record.
    pub fn count_bulk(&self, session: u64, op: &str) {
        observe(
            &RecordRef {
                op,
                // A DEK has no name of its own.
                key: Some("(session key)"),
                session: Some(session),
                ..RecordRef::default()
            },
            true,
        );
        if self.path.is_none() {
            return;
        }
        let mut b = self.bulk.lock();
        let m = b.entry(session).or_default();
        match m.get_mut(op) {
            Some(n) => *n += 1,
            None => {
                m.insert(op.to_owned(), 1);
            }
        }
    }

    /// Writes the `session-close` record of a session that did DEK bulk operations (none
    /// if it did not). A failure is logged (closing a session cannot be refused).
    pub fn session_closed(&self, session: u64) {
        if self.path.is_none() {
            return;
        }
        let Some(counts) = self.bulk.lock().remove(&session) else {
            return;
        };
        let r = Record {
            session: Some(session),
            ..Record::new("session-close", 0)
        };
        let _ = self.record_with(&r.view(), Some(&counts), false);
    }

    /// Makes sure every record this process wrote is covered by a token MAC and the token
    /// checkpoint: writes a MACed `checkpoint` record if needed. Call it at `C_Finalize`;
    /// dropping the auditor does it too. A no-op without a token or without new records.
    pub fn checkpoint(&self) -> Result<(), u64> {
        {
            let w = self.w.lock();
            if w.mac.is_none() || !w.unmac || w.pid != crate::sys::shm::pid() {
                return Ok(());
            }
        }
        self.record_with(&Record::new("checkpoint", 0).view(), None, true)
    }

    /// [`Auditor::checkpoint`] if this process has records no MAC covers and the
    /// checkpoint interval has passed since its last MAC. Cheap when nothing is due: call
    /// it from entry points that see no CMK use (session close, `C_GetSessionInfo`...) so
    /// that an idle process does not leave its last records unauthenticated for long.
    pub fn tick(&self) -> Result<(), u64> {
        {
            let w = self.w.lock();
            let due = w.mac.is_some()
                && w.unmac
                && w.pid == crate::sys::shm::pid()
                && w.last_mac
                    .is_none_or(|t| t.elapsed() >= self.tuning.checkpoint_interval);
            if !due {
                return Ok(());
            }
        }
        self.checkpoint()
    }

    fn record_with(
        &self,
        r: &RecordRef<'_>,
        bulk: Option<&BTreeMap<String, u64>>,
        force_mac: bool,
    ) -> Result<(), u64> {
        if self.path.is_none() {
            observe(r, true);
            return Ok(());
        }
        let pid = crate::sys::shm::pid();
        // In the daemon, the application's kernel-attested identity; else this process's.
        let body = match crate::sys::peer::current() {
            Some(p) => {
                let id = Ident {
                    uid: p.uid,
                    exe_json: p.exe_json.clone(),
                };
                record::body(&id, p.pid, r, bulk, SystemTime::now())
            }
            None => record::body(&self.ident, pid, r, bulk, SystemTime::now()),
        };
        let res = self.submit(
            pid,
            Pending {
                ticket: 0,
                body,
                ok: r.result == 0,
                force_mac,
            },
        );
        observe(r, res.is_ok());
        match res {
            Ok(()) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    log::warn!("audit: records are written again");
                }
                Ok(())
            }
            Err(why) => {
                let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
                self.last_failure.lock().clone_from(&why);
                if !self.failing.swap(true, Ordering::Relaxed) || n % 1000 == 0 {
                    log::error!(
                        "audit: cannot write a record ({why}); {n} lost so far; {}",
                        if self.deny {
                            "refusing the operation (on_failure = deny)"
                        } else {
                            "allowing the operation (on_failure = allow)"
                        }
                    );
                }
                if self.deny {
                    Err(CKR_FUNCTION_FAILED)
                } else {
                    Ok(())
                }
            }
        }
    }

    /// Group commit: queue the record; the first thread to find no writer active writes
    /// everything queued, the others wait for their ticket to be done.
    fn submit(&self, pid: u32, mut p: Pending) -> Result<(), String> {
        let mut q = self.q.lock();
        if q.pid != pid {
            // forked: whatever the parent's threads were doing is not ours
            let next = q.next;
            *q = Queue {
                pid,
                next,
                done: next - 1,
                ..Queue::default()
            };
        }
        let ticket = q.next;
        q.next += 1;
        p.ticket = ticket;
        q.pending.push(p);
        loop {
            if q.done >= ticket {
                if q.failed.is_empty() {
                    return Ok(());
                }
                return match q.failed.remove(&ticket) {
                    Some(e) => Err(e),
                    None => Ok(()),
                };
            }
            if q.writing {
                self.cv.wait(&mut q);
                continue;
            }
            q.writing = true;
            // never empty: our own record is queued until its ticket is done
            let spare = std::mem::take(&mut q.spare);
            let mut batch = std::mem::replace(&mut q.pending, spare);
            drop(q);
            let last = batch.last().map_or(0, |p| p.ticket);
            let first = batch.first().map_or(0, |p| p.ticket);
            let mut guard = LeaderGuard {
                a: self,
                tickets: first..=last,
                armed: true,
            };
            let res = self.write_batch(pid, &batch);
            guard.armed = false;
            batch.clear();
            q = self.q.lock();
            if batch.capacity() <= 1024 {
                // the next leader's queue, without an allocation
                q.spare = batch;
            }
            q.writing = false;
            q.done = q.done.max(last);
            if let Err(e) = res {
                for t in first..=last {
                    q.failed.insert(t, e.clone());
                }
            }
            self.cv.notify_all();
        }
    }

    fn write_batch(&self, pid: u32, batch: &[Pending]) -> Result<(), String> {
        let mut w = self.w.lock();
        let w = &mut *w;
        if w.pid != pid {
            w.reset(pid);
        }
        let path = self.path.as_ref().expect("enabled");
        let now = Instant::now();
        // A log being replaced stays open until the new one is: its lock file's segment
        // (and the chain head it holds) must outlive the switch, also when this process
        // is its only user.
        let mut replaced: Option<sink::LogFile> = None;
        if w.log.is_some()
            && now.duration_since(w.last_path_check) >= RECHECK.min(self.tuning.checkpoint_interval)
        {
            w.last_path_check = now;
            // the next append checks the file's length instead of trusting the hint
            w.head = None;
            if w.log.as_ref().is_some_and(|l| l.still_current()) {
                w.missing_since = None;
            } else if !path.exists()
                && now.duration_since(*w.missing_since.get_or_insert(now)) < RENAME_GRACE
            {
                // renamed away, maybe by logrotate before `cmkp11 audit rotate --renamed`:
                // the records keep going to the renamed file for a moment
            } else {
                log::warn!(
                    "audit: {} or its lock file was replaced or removed; reopening",
                    path.display()
                );
                w.missing_since = None;
                replaced = w.log.take();
            }
        }
        let n = batch.len() as u64;
        // the line buffer is kept from batch to batch (unless a big batch grew it)
        let mut buf = std::mem::take(&mut w.buf);
        let mut res = Err(String::new());
        for _ in 0..3 {
            if w.log.is_none() {
                w.head = None;
                match sink::LogFile::open(path) {
                    Ok(l) => w.log = Some(l),
                    Err(e) => {
                        let e = format!("open {}: {e}", path.display());
                        w.lost += n;
                        w.lost_why = e.clone();
                        return Err(e);
                    }
                }
            }
            buf.clear();
            res = self.append_locked(w, pid, batch, &mut buf);
            if matches!(&res, Err(e) if e == REOPEN) {
                // rotated, or continued in a new file by another writer
                replaced = w.log.take().or(replaced);
                continue;
            }
            if !matches!(&res, Err(e) if e == RETIRED) {
                break;
            }
            // the lock was held too long by another process, or another writer replaced
            // it while we waited or held it: again, on the lock everybody uses now
            if let Some(l) = &w.log {
                l.replace_lock();
            }
        }
        drop(replaced);
        if buf.capacity() <= 64 * 1024 {
            w.buf = buf;
        }
        if let Err(e) = &res {
            w.head = None;
            w.lost += n;
            w.lost_why = e.clone();
            return res.map(|_| ());
        }
        let lines = res.expect("checked");
        if let Some(s) = &mut w.syslog {
            for (l, ok) in lines {
                s.send(&l, ok);
            }
        }
        Ok(())
    }

    /// Under the file lock: find the head, build the lines, append them, checkpoint.
    /// Returns the lines written with their ok flag (for syslog).
    fn append_locked(
        &self,
        w: &mut Writer,
        pid: u32,
        batch: &[Pending],
        buf: &mut Vec<u8>,
    ) -> Result<Vec<(Vec<u8>, bool)>, String> {
        let mac = w.mac.clone();
        let log = w.log.as_mut().expect("opened");
        let log_id = log.id();
        let disp = log.path().display().to_string();
        let mut locked = log.lock().map_err(|e| {
            if e.raw_os_error() == Some(libc::ETIMEDOUT) {
                RETIRED.to_string() // replaced at the retry
            } else {
                format!("lock {disp}: {e}")
            }
        })?;
        let path = self.path.as_deref().expect("enabled");
        let raw = locked.raw_hint();
        if raw.is_some_and(|h| h.log_id != log_id) && !path_names(path, log_id) {
            // another writer went on in the file now at the path (rotation, rename)
            return Err(REOPEN.into());
        }
        let hint = locked.hint();
        let (len, mut tail) = match hint {
            // the last append under the lock file's mutex was ours: nobody wrote since
            Some(h) if w.head.is_some() && h.len == w.end => (
                h.len,
                chain::Tail {
                    seq: h.seq,
                    hash: h.hash,
                    torn: None,
                    sealed: false,
                },
            ),
            _ => {
                let len = locked.end().map_err(|e| format!("stat {disp}: {e}"))?;
                let known = match (hint, w.head) {
                    // another writer appended, and left the head there
                    (Some(h), _) if h.len == len => Some((h.seq, h.hash)),
                    // flock: the file is as we left it
                    (None, Some(head)) if !locked.shared() && w.end == len => Some(head),
                    _ => None,
                };
                let tail = match known {
                    Some((seq, hash)) => chain::Tail {
                        seq,
                        hash,
                        torn: None,
                        sealed: false,
                    },
                    None => chain::read_tail(locked.file(), len)
                        .map_err(|e| format!("read the end of {disp}: {e}"))?,
                };
                (len, tail)
            }
        };
        if tail.sealed {
            if !path_names(path, log_id) {
                return Err(REOPEN.into());
            }
            return Err(format!(
                "{disp} ends with the log-close record of an interrupted `cmkp11 audit rotate` \
                 and no new file replaced it: run `cmkp11 audit rotate` again"
            ));
        }
        let want_lines = w.syslog.is_some();
        let mut out: Vec<(std::ops::Range<usize>, bool)> = Vec::new();
        let mut markers: Vec<Body> = Vec::new();
        // An empty file while the log had records: truncated in place (copytruncate), or
        // renamed or removed and replaced. The chain goes on from the last record known
        // (the lock file's hint), marked by a `log-continue` record, so that the file with
        // the records before it and this one verify as a series.
        let mut cont_base = None;
        if len == 0 && tail.torn.is_none() {
            let known = match raw {
                Some(h) if h.seq > 0 && h.log_id == log_id && h.len > 0 => {
                    Some((h.seq, h.hash, true))
                }
                Some(h) if h.seq > 0 && h.log_id != log_id => Some((h.seq, h.hash, false)),
                Some(_) => None,
                None => w
                    .head
                    .filter(|(s, _)| *s > 0 && w.end > 0)
                    .map(|(s, h)| (s, h, true)),
            };
            if let Some((seq, hash, in_place)) = known {
                let why = if in_place {
                    format!("{TRUNCATED_IN_PLACE} at record {seq}")
                } else {
                    format!("{RENAMED} after record {seq}")
                };
                log::warn!("audit: {disp}: {why}; the chain goes on from there");
                markers.push(continuation(&self.ident, pid, why));
                (tail.seq, tail.hash) = (seq, hash);
                cont_base = Some(seq + 1);
            }
        }
        if let Some(t) = &tail.torn {
            if !t.terminated {
                buf.push(b'\n');
            }
            log::warn!(
                "audit: {disp}: marking a torn record ({} bytes at offset {})",
                t.len,
                t.offset
            );
            let r = Record {
                reason: Some(t.reason()),
                ..Record::new("torn", 0)
            };
            markers.push(record::body(
                &self.ident,
                pid,
                &r.view(),
                None,
                SystemTime::now(),
            ));
        }
        if w.lost > 0 {
            let r = Record {
                reason: Some(format!("{} record(s) lost: {}", w.lost, w.lost_why)),
                ..Record::new("audit-lost", CKR_FUNCTION_FAILED)
            };
            markers.push(record::body(
                &self.ident,
                pid,
                &r.view(),
                None,
                SystemTime::now(),
            ));
        }
        let force = batch.iter().any(|p| p.force_mac) || cont_base.is_some();
        let may_retry = force || w.mac_failed_at.is_none_or(|t| t.elapsed() >= MAC_RETRY);
        let due = mac.is_some()
            && may_retry
            && (w.mac_failed_at.is_some()
                || w.last_mac.is_none()
                || force
                || w.since_mac + (markers.len() + batch.len()) as u32
                    >= self.tuning.checkpoint_records
                || w.last_mac
                    .is_some_and(|t| t.elapsed() >= self.tuning.checkpoint_interval));
        // Before a MAC moves the token checkpoint, the record the checkpoint names now
        // must be in this file as the token knows it; if not, the gap is recorded first
        // (and kept by every later checkpoint), never silently stepped over.
        let mut store_ok = false;
        let mut sticky_gap = 0;
        let mut gap_at = None;
        if due {
            let tm = mac.as_ref().expect("due implies mac");
            let mut gap = |why: String| {
                log::error!("audit: {disp}: {why}; recorded in the log (audit-gap)");
                gap_at = Some(markers.len());
                let r = Record {
                    reason: Some(why),
                    ..Record::new("audit-gap", cryptoki_sys::CKR_GENERAL_ERROR)
                };
                markers.push(record::body(
                    &self.ident,
                    pid,
                    &r.view(),
                    None,
                    SystemTime::now(),
                ));
            };
            match tm.load_checkpoint() {
                Ok(None) => {
                    store_ok = true;
                    if tm.key_existed().unwrap_or(false) {
                        gap(
                            "the token holds no audit checkpoint although its audit key made \
                             MACs before: the checkpoint object was destroyed"
                                .into(),
                        );
                    }
                }
                Ok(Some(b)) => match chain::Checkpoint::decode(&b) {
                    None => {
                        store_ok = true;
                        gap(
                            "the token's audit checkpoint object is not a cmkp11 checkpoint".into(),
                        );
                    }
                    Some(c) => {
                        sticky_gap = c.gap;
                        let f = locked.file();
                        let base = match cont_base {
                            Some(b) => Ok(Some(b)),
                            None => chain::first_seq(f, len),
                        };
                        let found =
                            base.and_then(|base| chain::find_checkpointed(f, len, base, &c));
                        match found {
                            Ok(chain::Anchor::Found | chain::Anchor::Earlier) => store_ok = true,
                            Ok(chain::Anchor::Missing(_))
                                if len == 0 && tail.seq == 0 && tail.torn.is_none() =>
                            {
                                // emptied while no writer ran (no hint): the token
                                // checkpoint names the last record known
                                store_ok = true;
                                let why = format!(
                                    "{EMPTIED} after record {} (the token checkpoint; records \
                                     after it, if any, are not known)",
                                    c.seq
                                );
                                log::warn!("audit: {disp}: {why}; the chain goes on from there");
                                markers.insert(0, continuation(&self.ident, pid, why));
                                (tail.seq, tail.hash) = (c.seq, c.hash);
                            }
                            Ok(chain::Anchor::Missing(why)) => {
                                store_ok = true;
                                gap(why);
                            }
                            Err(e) => log::error!(
                                "audit: cannot check the token checkpoint against {disp}: {e}; \
                                 it is not moved"
                            ),
                        }
                    }
                },
                Err(_) => {} // the MAC fails the same way; nothing is moved
            }
        }
        let count = (markers.len() + batch.len()) as u32;
        let bodies = markers
            .iter()
            .map(|b| (b, false))
            .chain(batch.iter().map(|p| (&p.body, p.ok)));
        let total = markers.len() + batch.len();
        let (mut seq, mut prev) = (tail.seq, tail.hash);
        let mut macd: Option<Vec<u8>> = None;
        for (i, (b, ok)) in bodies.enumerate() {
            seq += 1;
            let start = buf.len();
            buf.extend_from_slice(b.head().as_bytes());
            buf.extend_from_slice(b"\"seq\":");
            push_u64(buf, seq);
            buf.push(b',');
            buf.extend_from_slice(b.rest().as_bytes());
            buf.extend_from_slice(b"\"prev\":\"");
            record::push_hex(buf, &prev);
            buf.push(b'"');
            let mut m = None;
            if due && i + 1 == total {
                let tm = mac.as_ref().expect("due implies mac");
                match tm.mac(&chain::mac_input(&buf[start..])) {
                    Ok(v) => {
                        m = Some(v);
                        if w.mac_failed_at.take().is_some() {
                            log::warn!("audit: the token MACs again");
                        }
                    }
                    Err(rv) => {
                        if w.mac_failed_at.is_none() {
                            log::error!(
                                "audit: the token cannot MAC ({}); records stay unauthenticated \
                                 until it can",
                                crate::backend::rv::name(rv as cryptoki_sys::CK_RV)
                            );
                        }
                        w.mac_failed_at = Some(Instant::now());
                    }
                }
            }
            buf.extend_from_slice(record::MAC_SEP.as_bytes());
            match &m {
                Some(v) => {
                    buf.push(b'"');
                    record::push_hex(buf, v);
                    buf.extend_from_slice(b"\"}");
                }
                None => buf.extend_from_slice(b"null}"),
            }
            prev = chain::line_hash(&buf[start..]);
            buf.push(b'\n');
            if want_lines {
                out.push((start..buf.len() - 1, ok));
            }
            macd = m.or(macd);
        }
        if due && macd.is_none() && markers.is_empty() && batch.iter().all(|p| p.force_mac) {
            // Only `checkpoint` records, and the token cannot MAC (logged out already): an
            // unauthenticated checkpoint would say nothing; the records stay uncovered.
            buf.clear();
            return Ok(Vec::new());
        }
        if locked.retired() {
            return Err(RETIRED.into());
        }
        if let Err(e) = locked.append(buf, len) {
            locked.set_hint(None);
            return Err(format!("write {disp}: {e}"));
        }
        w.end = len + buf.len() as u64;
        locked.set_hint(Some(crate::sys::shm::Hint {
            log_id,
            len: w.end,
            seq,
            hash: prev,
        }));
        w.head = Some((seq, prev));
        w.lost = 0;
        if let (Some(m), Some(tm)) = (macd, &mac) {
            w.since_mac = 0;
            w.last_mac = Some(Instant::now());
            w.unmac = false;
            match locked.sync() {
                Ok(()) if !store_ok => {
                    log::error!("audit: token checkpoint not moved (not checked against {disp})")
                }
                Ok(()) => {
                    let gap = gap_at.map_or(0, |i| tail.seq + 1 + i as u64);
                    let c = chain::Checkpoint {
                        seq,
                        hash: prev,
                        mac: m,
                        end: Some(w.end),
                        gap: if sticky_gap != 0 { sticky_gap } else { gap },
                    };
                    if let Err(rv) = tm.store_checkpoint(&c.encode()) {
                        log::error!(
                            "audit: cannot store the token checkpoint ({})",
                            crate::backend::rv::name(rv as cryptoki_sys::CK_RV)
                        );
                    }
                }
                Err(e) => log::error!("audit: fdatasync {disp}: {e}; token checkpoint not moved"),
            }
        } else {
            w.since_mac += count;
            w.unmac = true;
        }
        drop(locked);
        if !want_lines {
            return Ok(Vec::new());
        }
        Ok(out
            .into_iter()
            .map(|(r, ok)| (buf[r].to_vec(), ok))
            .collect())
    }
}

/// How the reason of a `log-continue` record starts when the file was truncated in place.
pub const TRUNCATED_IN_PLACE: &str = "the log was truncated in place (copytruncate?)";
/// ... when the file was renamed or removed and another one took its place.
pub const RENAMED: &str = "the log file was renamed or removed and replaced by a new one";
/// ... when a writer found the file empty and only the token checkpoint named its end.
pub const EMPTIED: &str = "the log was emptied or replaced by an empty file";

fn continuation(ident: &Ident, pid: u32, why: String) -> Body {
    let r = Record {
        reason: Some(why),
        ..Record::new(record::OP_CONTINUE, 0)
    };
    record::body(ident, pid, &r.view(), None, SystemTime::now())
}

/// Decimal digits of `v` without the formatting machinery.
fn push_u64(out: &mut Vec<u8>, mut v: u64) {
    let mut d = [0u8; 20];
    let mut i = d.len();
    loop {
        i -= 1;
        d[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&d[i..]);
}

impl Drop for Auditor {
    fn drop(&mut self) {
        if self.enabled() {
            let _ = self.checkpoint();
        }
    }
}
