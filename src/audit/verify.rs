//! Verification of a log: the chain, the MACs, the token checkpoint, torn regions; the
//! first bad record and why.

use super::chain::{self, Checkpoint};
use super::record::{self, hex, unhex, GENESIS};
use super::TokenMac;
use crate::sys::shm::OpenError;
use rustix::fs::{flock, FlockOperation};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::fmt;
use std::io::{Read, Seek};
use std::path::Path;

/// What is wrong with a log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tamper {
    /// A record's content differs from what was written (hash, MAC or checkpoint mismatch,
    /// or a line that is not a record).
    Modified,
    /// A line that was never part of the chain.
    Inserted,
    /// Records are missing from the middle (or the start) of the chain.
    Deleted,
    /// Records are present but out of order.
    Reordered,
    /// Records are missing from the end: the token's checkpoint is ahead of the file.
    Truncated,
    /// An incomplete record at the end (a writer interrupted mid-write, not yet marked).
    Torn,
    /// The token's checkpoint is missing or unreadable while the log holds MACed records.
    Checkpoint,
    /// A writer found records missing or replaced when it opened the log (an `audit-gap`
    /// record, or the gap the token checkpoint keeps): the log was cut, replaced by an
    /// older copy, or the checkpoint destroyed, and records were appended after that.
    Gap,
    /// The file cannot be read.
    Unreadable,
}

impl fmt::Display for Tamper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tamper::Modified => "modified",
            Tamper::Inserted => "inserted",
            Tamper::Deleted => "deleted",
            Tamper::Reordered => "reordered",
            Tamper::Truncated => "truncated",
            Tamper::Torn => "torn",
            Tamper::Checkpoint => "checkpoint",
            Tamper::Gap => "gap",
            Tamper::Unreadable => "unreadable",
        })
    }
}

/// The first bad record of a log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// What kind of damage.
    pub kind: Tamper,
    /// 1-based line number of the bad record (one past the last line for truncation).
    pub line: u64,
    /// Its `seq`, when it has one.
    pub seq: Option<u64>,
    /// Why, in words.
    pub detail: String,
    /// The file it is in.
    pub file: Option<std::path::PathBuf>,
}

/// One file of a verified series.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileSummary {
    /// The file.
    pub path: std::path::PathBuf,
    /// `seq` of its first record.
    pub first_seq: Option<u64>,
    /// `seq` of its last record.
    pub last_seq: u64,
    /// Records in it.
    pub records: u64,
    /// Whether it ends with the `log-close` record of a rotation.
    pub closed: bool,
}

/// The outcome of [`verify`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Lines read.
    pub lines: u64,
    /// Records that chain correctly (before the first problem).
    pub records: u64,
    /// `seq` of the last good record.
    pub last_seq: u64,
    /// Records carrying a MAC.
    pub macs: u64,
    /// Whether MACs were checked against the token.
    pub macs_checked: bool,
    /// `seq` up to which the log is authenticated by a verified token MAC.
    pub authenticated_through: Option<u64>,
    /// The token checkpoint's `seq`, when one was read.
    pub token_checkpoint: Option<u64>,
    /// Whether the log was checked against the token's checkpoint (cut tail, destroyed
    /// checkpoint, recorded gaps): false without a token or when it could not be read.
    pub checkpoint_checked: bool,
    /// Remarks that do not make the log bad (repaired torn records, unauthenticated tail).
    pub notes: Vec<String>,
    /// The first problem, `None` if the log is good.
    pub problem: Option<Problem>,
    /// The files checked, in order (those before the first problem).
    pub files: Vec<FileSummary>,
    /// The file being checked (where a problem is).
    file: Option<std::path::PathBuf>,
    /// Whether several files were checked as a series.
    pub series: bool,
}

impl Report {
    /// Whether the log verified.
    pub fn ok(&self) -> bool {
        self.problem.is_none()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.problem {
            None => writeln!(
                f,
                "OK: {} records{}, chain intact through seq {}",
                self.records,
                if self.series {
                    format!(" in {} files", self.files.len())
                } else {
                    String::new()
                },
                self.last_seq
            )?,
            Some(p) => {
                write!(f, "BAD: ")?;
                if let (Some(file), true) = (&p.file, self.series) {
                    write!(f, "{}: ", file.display())?;
                }
                write!(f, "line {}", p.line)?;
                if let Some(s) = p.seq {
                    write!(f, " (seq {s})")?;
                }
                writeln!(f, ": {}: {}", p.kind, p.detail)?;
            }
        }
        if self.macs_checked {
            match self.authenticated_through {
                Some(s) => writeln!(
                    f,
                    "  token MACs: {} checked, authenticated through seq {s}",
                    self.macs
                )?,
                None => writeln!(f, "  token MACs: none in the log")?,
            }
        } else {
            writeln!(
                f,
                "  token MACs: {} present, NOT checked (no token)",
                self.macs
            )?;
        }
        if let Some(s) = self.token_checkpoint {
            writeln!(f, "  token checkpoint: seq {s}")?;
        } else if self.macs_checked && !self.checkpoint_checked {
            writeln!(f, "  token checkpoint: NOT checked")?;
        }
        if self.series {
            for s in &self.files {
                writeln!(
                    f,
                    "  file {}: records {}..{} ({}){}",
                    s.path.display(),
                    s.first_seq.unwrap_or(0),
                    s.last_seq,
                    s.records,
                    if s.closed { ", closed by rotation" } else { "" }
                )?;
            }
        }
        for n in &self.notes {
            writeln!(f, "  note: {n}")?;
        }
        Ok(())
    }
}

#[derive(Deserialize)]
struct Fields {
    seq: u64,
    prev: String,
    op: String,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    mac: Option<String>,
}

/// One parsed line.
struct Rec {
    no: u64,
    seq: u64,
    prev: [u8; 32],
    hash: [u8; 32],
    op: String,
    reason: Option<String>,
    mac: Option<Vec<u8>>,
    prefix_end: usize,
}

struct Line {
    no: u64,
    offset: u64,
    start: usize,
    end: usize, // exclusive, without the newline
    terminated: bool,
}

fn parse(data: &[u8], l: &Line) -> Option<Rec> {
    let bytes = &data[l.start..l.end];
    let s = std::str::from_utf8(bytes).ok()?;
    if !record::is_complete(bytes) {
        return None;
    }
    let (prefix, _) = record::split_mac(s)?;
    let f: Fields = serde_json::from_str(s).ok()?;
    let mac = match f.mac {
        Some(m) => Some(unhex(&m)?),
        None => None,
    };
    Some(Rec {
        no: l.no,
        seq: f.seq,
        prev: unhex(&f.prev)?.try_into().ok()?,
        hash: chain::line_hash(bytes),
        op: f.op,
        reason: f.reason,
        mac,
        prefix_end: l.start + prefix.len(),
    })
}

fn bad(r: &mut Report, kind: Tamper, line: u64, seq: Option<u64>, detail: String) {
    r.problem = Some(Problem {
        kind,
        line,
        seq,
        detail,
        file: r.file.clone(),
    });
}

/// Verifies the log at `path`: the hash chain from the first record, each record's MAC
/// and the token checkpoint (when `mac` is given), torn regions and their markers.
/// Reports the first bad record and why. Holds a shared `flock` and the lock file's mutex
/// (when there is a lock file it can use) while reading, so writers pause and the snapshot
/// is consistent with the token checkpoint. Never needs the lock file.
///
/// A file that starts with the `log-open` record of a rotation (`cmkp11 audit rotate`)
/// verifies from there; one that ends with a `log-close` record verifies although the
/// token checkpoint has moved on to the next file. See [`verify_series`] for several
/// files.
pub fn verify(path: &Path, mac: Option<&dyn TokenMac>) -> Report {
    verify_series(&[path.to_path_buf()], mac)
}

type Loaded = (Vec<u8>, Option<Result<Option<Vec<u8>>, u64>>);

fn load(path: &Path, mac: Option<&dyn TokenMac>) -> std::io::Result<Loaded> {
    let mut f = std::fs::File::open(path)?;
    loop {
        match flock(&f, FlockOperation::LockShared) {
            Err(rustix::io::Errno::INTR) => continue,
            r => break r?,
        }
    }
    // Writers serialize with the lock file's mutex (or, without a lock file, with the
    // flock held now): hold it too, so no append is half done while we read.
    let lock_path = super::sink::lock_path(path);
    let lf = crate::sys::shm::LockFile::open(&lock_path);
    let guard = lf.as_ref().ok().and_then(|l| l.lock().ok());
    let exclusive = guard.is_some() || matches!(lf, Err(OpenError::Missing));
    // The checkpoint first: a writer stores it only after the lines it names are in
    // the file, so even without the lock the file we read next holds them.
    let ck = mac.map(|m| m.load_checkpoint());
    let mut data = Vec::new();
    f.read_to_end(&mut data)?;
    if !exclusive {
        // a lock file we cannot take (read-only access): an unterminated last line
        // may be an append in progress rather than a torn record; look again
        for _ in 0..5 {
            if data.last().is_none_or(|&b| b == b'\n') {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
            data.clear();
            f.seek(std::io::SeekFrom::Start(0))?;
            f.read_to_end(&mut data)?;
        }
    }
    drop(guard);
    Ok((data, ck))
}

/// One file of a series, split into lines and parsed.
struct FileData {
    path: std::path::PathBuf,
    data: Vec<u8>,
    lines: Vec<Line>,
    recs: Vec<Option<Rec>>,
}

fn split(path: &Path, data: Vec<u8>) -> FileData {
    let mut lines = Vec::new();
    let mut start = 0;
    while start < data.len() {
        let (end, terminated) = match data[start..].iter().position(|&b| b == b'\n') {
            Some(p) => (start + p, true),
            None => (data.len(), false),
        };
        lines.push(Line {
            no: lines.len() as u64 + 1,
            offset: start as u64,
            start,
            end,
            terminated,
        });
        start = end + 1;
    }
    let mut recs: Vec<Option<Rec>> = lines
        .iter()
        .map(|l| if l.terminated { parse(&data, l) } else { None })
        .collect();
    // Lines inside a region named by the torn marker right after it are torn bytes, even
    // when they parse (a complete record whose newline was never written). The region's
    // hash is checked against the marker below.
    for i in 1..recs.len() {
        let Some((off, len, _)) = recs[i]
            .as_ref()
            .filter(|r| r.op == "torn")
            .and_then(|r| r.reason.as_deref())
            .and_then(chain::parse_torn_reason)
        else {
            continue;
        };
        if off + len != lines[i].offset {
            continue;
        }
        for j in (0..i).rev() {
            if lines[j].offset < off {
                break;
            }
            recs[j] = None;
        }
    }
    FileData {
        path: path.to_path_buf(),
        data,
        lines,
        recs,
    }
}

/// The record a `log-continue` record says the chain goes on from, and whether the file
/// was truncated in place (else renamed or removed and replaced).
fn continued(p: &Rec) -> (u64, bool) {
    let r = p.reason.as_deref().unwrap_or("");
    let in_place = r.starts_with(super::TRUNCATED_IN_PLACE) || r.starts_with(super::EMPTIED);
    (p.seq - 1, in_place)
}

fn name(p: &Path) -> String {
    p.display().to_string()
}

/// Verifies several files of one log as a series, oldest first (as `cmkp11 audit rotate`
/// or a rename left them): each file's chain, and that each file starts where the one
/// before it ends (a missing, extra or misplaced file is named). The token checkpoint is
/// read with the last file's lock held (the live log is normally the last one).
pub fn verify_series(paths: &[std::path::PathBuf], mac: Option<&dyn TokenMac>) -> Report {
    let mut report = Report {
        macs_checked: mac.is_some(),
        ..Report::default()
    };
    let mut files = Vec::new();
    let mut ck = None;
    for (k, p) in paths.iter().enumerate() {
        let last_file = k + 1 == paths.len();
        match load(p, if last_file { mac } else { None }) {
            Ok((data, c)) => {
                if last_file {
                    ck = c;
                }
                files.push(split(p, data));
            }
            Err(e) => {
                bad(
                    &mut report,
                    Tamper::Unreadable,
                    0,
                    None,
                    format!("{}: {e}", p.display()),
                );
                return report;
            }
        }
    }
    let series = files.len() > 1;
    report.series = series;
    let mut last = (0u64, GENESIS, 0u64); // seq, hash, line
    let mut before_last = GENESIS; // hash of the record before `last`
    let mut last_op_close = false;
    let mut started: Option<u64> = None; // seq of the series' first record
    let mut deferred: Option<Problem> = None; // a start the series cannot vouch for
    let mut last_mac_ok: Option<(u64, u64)> = None; // seq, line
    let mut mac_failed_note = false;
    let mut first_gap: Option<(u64, u64, String, std::path::PathBuf)> = None;
    let mut prev_file: Option<std::path::PathBuf> = None;
    for fd in &files {
        report.lines += fd.lines.len() as u64;
        report.file = Some(fd.path.clone());
        let this = name(&fd.path);
        let mut summary = FileSummary {
            path: fd.path.clone(),
            ..FileSummary::default()
        };
        let data = &fd.data;
        let (lines, recs) = (&fd.lines, &fd.recs);
        let mut garbage: Option<usize> = None; // index of the first unparsable line pending
        let mut closed_at: Option<u64> = None; // line of a log-close record in this file
        let mut first_in_file = true;
        for (i, l) in lines.iter().enumerate() {
            if !l.terminated {
                let complete = record::is_complete(&data[l.start..l.end]);
                bad(
                    &mut report,
                    Tamper::Torn,
                    l.no,
                    record::quick_seq(&data[l.start..l.end]),
                    format!(
                        "the last line is an incomplete record ({} bytes{}, at offset {}): a \
                         writer was interrupted mid-write (or the file was cut); the next \
                         writer marks it",
                        l.end - l.start,
                        if complete { ", no newline" } else { "" },
                        l.offset
                    ),
                );
                return report;
            }
            let Some(p) = &recs[i] else {
                garbage.get_or_insert(i);
                continue;
            };
            if let Some(c) = closed_at {
                bad(
                    &mut report,
                    Tamper::Inserted,
                    p.no,
                    Some(p.seq),
                    format!(
                        "a record after the log-close record at line {c}: a file closed by \
                         `cmkp11 audit rotate` gets no more records"
                    ),
                );
                return report;
            }
            let expected = last.0 + 1;
            if let Some(g) = garbage.take() {
                let first = &lines[g];
                let region = &data[first.start..l.start];
                let marker_ok = p.op == "torn"
                    && p.seq == expected
                    && p.prev == last.1
                    && p.reason.as_deref().and_then(chain::parse_torn_reason)
                        == Some((
                            first.offset,
                            region.len() as u64,
                            Sha256::digest(region).into(),
                        ));
                if marker_ok {
                    report.notes.push(format!(
                        "{}line{} {}{}: torn record ({} bytes at offset {}) left by an \
                         interrupted writer, marked by seq {} (line {})",
                        if series {
                            format!("{this}: ")
                        } else {
                            String::new()
                        },
                        if i - g > 1 { "s" } else { "" },
                        first.no,
                        if i - g > 1 {
                            format!("-{}", l.no - 1)
                        } else {
                            String::new()
                        },
                        region.len(),
                        first.offset,
                        p.seq,
                        l.no
                    ));
                } else if p.op == "torn" && p.seq == expected && p.prev == last.1 {
                    bad(
                        &mut report,
                        Tamper::Modified,
                        first.no,
                        None,
                        format!(
                            "these bytes do not match the torn-record marker at line {} \
                             (offset, length or SHA-256 differ): they were changed after the \
                             writer marked them",
                            l.no
                        ),
                    );
                    return report;
                } else if p.seq == expected && p.prev == last.1 {
                    bad(
                        &mut report,
                        Tamper::Inserted,
                        first.no,
                        None,
                        format!(
                            "line {} is not an audit record and is not part of the chain (line \
                             {} continues from line {})",
                            first.no, l.no, last.2
                        ),
                    );
                    return report;
                } else {
                    bad(
                        &mut report,
                        Tamper::Modified,
                        first.no,
                        None,
                        "this line is not a valid audit record (damaged or edited)".into(),
                    );
                    return report;
                }
            } else if started.is_none() && !(p.seq == 1 && p.prev == GENESIS) && p.seq > 1 {
                // The first record of the series does not start the log.
                if p.op == record::OP_OPEN && (mac.is_none() || p.mac.is_some()) {
                    report.notes.push(format!(
                        "starts at record {}: continues the file closed by `cmkp11 audit \
                         rotate` after record {} ({}); verify the files before it with \
                         `--series`",
                        p.seq,
                        p.seq - 1,
                        p.reason.as_deref().unwrap_or("")
                    ));
                } else if p.op == record::OP_CONTINUE {
                    let (n, in_place) = continued(p);
                    let detail = if in_place {
                        format!(
                            "{} at record {n}; use `cmkp11 audit rotate`. Records up to {n} \
                             are not in this file: verify it together with the copy before \
                             it (`cmkp11 audit verify COPY {this}`)",
                            super::TRUNCATED_IN_PLACE
                        )
                    } else {
                        format!(
                            "this file continues a log file that was renamed or removed after \
                             record {n} without `cmkp11 audit rotate`: records up to {n} are \
                             not in this file; verify it with the files before it \
                             (`cmkp11 audit verify --series`)"
                        )
                    };
                    deferred = Some(Problem {
                        kind: if in_place {
                            Tamper::Truncated
                        } else {
                            Tamper::Deleted
                        },
                        line: p.no,
                        seq: Some(p.seq),
                        detail,
                        file: Some(fd.path.clone()),
                    });
                } else {
                    bad(
                        &mut report,
                        Tamper::Deleted,
                        p.no,
                        Some(p.seq),
                        format!(
                            "records 1..{} are not in this file: they were deleted, or {} at \
                             record {}; use `cmkp11 audit rotate`",
                            p.seq - 1,
                            super::TRUNCATED_IN_PLACE,
                            p.seq - 1
                        ),
                    );
                    return report;
                }
                last = (p.seq - 1, p.prev, 0);
            } else if first_in_file && prev_file.is_some() {
                // A later file of the series: it must start where the one before ends.
                let pf = name(prev_file.as_deref().expect("checked"));
                let fits = p.seq == expected && p.prev == last.1;
                if fits && p.op == record::OP_CONTINUE {
                    let (n, in_place) = continued(p);
                    report.notes.push(if in_place {
                        format!(
                            "{this}: {} at record {n}; {pf} holds the records up to it; use \
                             `cmkp11 audit rotate`",
                            super::TRUNCATED_IN_PLACE
                        )
                    } else {
                        format!(
                            "{this}: continues {pf}, renamed or removed after record {n} \
                             without `cmkp11 audit rotate` ({pf} has no log-close record)"
                        )
                    });
                } else if !fits {
                    let (kind, detail) = if p.seq > expected {
                        if p.op == record::OP_CONTINUE && continued(p).1 {
                            (
                                Tamper::Deleted,
                                format!(
                                    "{} at record {}, but {pf} ends at record {}: records \
                                     {}..{} were written between the copy and the truncation \
                                     and are lost; use `cmkp11 audit rotate`",
                                    super::TRUNCATED_IN_PLACE,
                                    p.seq - 1,
                                    last.0,
                                    expected,
                                    p.seq - 1
                                ),
                            )
                        } else {
                            (
                                Tamper::Deleted,
                                format!(
                                    "records {expected}..{} are missing between {pf} (ends at \
                                     record {}) and {this} (starts at record {}): a file of \
                                     the series is missing, or was cut",
                                    p.seq - 1,
                                    last.0,
                                    p.seq
                                ),
                            )
                        }
                    } else if p.seq < expected {
                        (
                            Tamper::Reordered,
                            format!(
                                "{this} starts at record {} but {pf} ends at record {}: the \
                                 files are out of order (or overlap); give them oldest first",
                                p.seq, last.0
                            ),
                        )
                    } else {
                        (
                            Tamper::Modified,
                            format!(
                                "{this} does not continue {pf}: its first record's prev is not \
                                 the hash of the last record of {pf} (a file of another log, \
                                 or modified)"
                            ),
                        )
                    };
                    bad(&mut report, kind, p.no, Some(p.seq), detail);
                    return report;
                }
            } else if p.seq != expected || p.prev != last.1 {
                classify(&mut report, recs, i, last, before_last);
                return report;
            }
            first_in_file = false;
            started.get_or_insert(p.seq);
            if let Some(m) = &p.mac {
                report.macs += 1;
                if let Some(tm) = mac {
                    let prefix = &data[l.start..p.prefix_end];
                    match tm.mac(&chain::mac_input(prefix)) {
                        Ok(want) if ct_eq(&want, m) => {
                            last_mac_ok = Some((p.seq, p.no));
                            report.authenticated_through = Some(p.seq);
                        }
                        Ok(_) => {
                            let since = match last_mac_ok {
                                Some((s, n)) => {
                                    format!("since the checkpoint at seq {s} (line {n})")
                                }
                                None => "since the start of the log".into(),
                            };
                            bad(
                                &mut report,
                                Tamper::Modified,
                                l.no,
                                Some(p.seq),
                                format!(
                                    "the token MAC does not match: this record or one {since} \
                                     was modified (and the hash chain rewritten to hide it)"
                                ),
                            );
                            return report;
                        }
                        Err(rv) => {
                            if !mac_failed_note {
                                mac_failed_note = true;
                                report.macs_checked = false;
                                report.notes.push(format!(
                                    "the token could not compute a MAC ({}): MACs not checked",
                                    crate::backend::rv::name(rv as cryptoki_sys::CK_RV)
                                ));
                            }
                        }
                    }
                }
            }
            if p.op == "audit-gap" && first_gap.is_none() {
                first_gap = Some((
                    p.no,
                    p.seq,
                    p.reason.clone().unwrap_or_default(),
                    fd.path.clone(),
                ));
            }
            if p.op == record::OP_CLOSE {
                closed_at = Some(p.no);
            }
            last_op_close = p.op == record::OP_CLOSE;
            report.records += 1;
            summary.records += 1;
            summary.first_seq.get_or_insert(p.seq);
            summary.last_seq = p.seq;
            before_last = last.1;
            last = (p.seq, p.hash, p.no);
            report.last_seq = last.0;
        }
        if let Some(g) = garbage {
            let first = &lines[g];
            bad(
                &mut report,
                Tamper::Torn,
                first.no,
                None,
                format!(
                    "the file ends with {} byte(s) at offset {} that are not a complete record \
                     and carry no torn marker: a writer was interrupted mid-write",
                    data.len() - first.start,
                    first.offset
                ),
            );
            return report;
        }
        summary.closed = closed_at.is_some();
        report.files.push(summary);
        prev_file = Some(fd.path.clone());
    }
    report.last_seq = last.0;
    let gap_problem = |report: &mut Report| {
        if let (None, Some((line, seq, why, file))) = (&report.problem, &first_gap) {
            bad(
                report,
                Tamper::Gap,
                *line,
                Some(*seq),
                format!("a writer found the log cut or replaced before appending: {why}"),
            );
            if let Some(p) = report.problem.as_mut() {
                p.file = Some(file.clone());
            }
        }
    };
    let deferred_problem = |report: &mut Report| {
        if report.problem.is_none() {
            report.problem = deferred.clone();
        }
    };
    if !report.macs_checked {
        report.authenticated_through = None;
        gap_problem(&mut report);
        deferred_problem(&mut report);
        return report;
    }

    // The token checkpoint: catches a cut tail.
    let end_line = files.last().map_or(0, |f| f.lines.len() as u64) + 1;
    let mut ck_gap = 0;
    match ck {
        Some(Ok(Some(bytes))) => match Checkpoint::decode(&bytes) {
            None => bad(
                &mut report,
                Tamper::Checkpoint,
                end_line,
                None,
                "the token's checkpoint object is not a cmkp11 checkpoint".into(),
            ),
            Some(c) => {
                report.token_checkpoint = Some(c.seq);
                report.checkpoint_checked = true;
                ck_gap = c.gap;
                let at = files
                    .iter()
                    .flat_map(|f| f.recs.iter().flatten())
                    .find(|r| r.seq == c.seq)
                    .map(|r| (r.no, r.hash, r.mac.clone()));
                match at {
                    Some((_, h, m)) if h == c.hash && m.as_deref() == Some(&c.mac[..]) => {
                        let after = last.0 - c.seq;
                        if after > 0 {
                            report.notes.push(format!(
                                "{after} record(s) after the token checkpoint (seq {}) are \
                                 chained but not yet covered by it (written since, or by a \
                                 process that has not checkpointed yet)",
                                c.seq
                            ));
                        }
                    }
                    Some((no, _, _)) => bad(
                        &mut report,
                        Tamper::Modified,
                        no,
                        Some(c.seq),
                        format!(
                            "this record does not match the token's checkpoint (hash {})",
                            hex(&c.hash)
                        ),
                    ),
                    None if c.seq > last.0
                        && last_op_close
                        && report.authenticated_through == Some(last.0) =>
                    {
                        report.notes.push(format!(
                            "closed by `cmkp11 audit rotate` after record {} (its log-close \
                             record is MACed by the token); the log goes on in the next file \
                             (token checkpoint at record {})",
                            last.0, c.seq
                        ));
                    }
                    None if c.seq > last.0 => bad(
                        &mut report,
                        Tamper::Truncated,
                        end_line,
                        Some(last.0 + 1),
                        format!(
                            "the token's checkpoint names seq {} but the log ends at seq {} \
                             (line {}): at least {} record(s) were cut from the end (if this \
                             file was renamed or copied away from the live log, verify it \
                             with the files after it: `cmkp11 audit verify --series`)",
                            c.seq,
                            last.0,
                            last.2,
                            c.seq - last.0
                        ),
                    ),
                    None if started.is_some_and(|s| c.seq < s) => {
                        report.notes.push(format!(
                            "the token checkpoint (record {}) is in an earlier file of the \
                             series",
                            c.seq
                        ));
                    }
                    None => bad(
                        &mut report,
                        Tamper::Deleted,
                        end_line,
                        Some(c.seq),
                        format!("the token's checkpoint names seq {}, not in the log", c.seq),
                    ),
                }
            }
        },
        Some(Ok(None)) => {
            let key_existed = mac.is_some_and(|m| m.key_existed().unwrap_or(false));
            report.checkpoint_checked = true;
            let macs = report.macs;
            if macs > 0 || key_existed {
                bad(
                    &mut report,
                    Tamper::Checkpoint,
                    end_line,
                    None,
                    if macs > 0 {
                        "the log holds token MACs but the token holds no checkpoint (wrong \
                         token, or the checkpoint object was destroyed)"
                    } else {
                        "the token's audit key made MACs but the token holds no checkpoint and \
                         the log no MAC: the checkpoint was destroyed and the log rewritten \
                         without MACs (or this is not the log of this token)"
                    }
                    .into(),
                );
            } else if report.records > 0 {
                report
                    .notes
                    .push("no token checkpoint yet: the log is not authenticated".into());
            }
        }
        Some(Err(rv)) => {
            report.notes.push(format!(
                "cannot read the token checkpoint ({}): truncation not checked",
                crate::backend::rv::name(rv as cryptoki_sys::CK_RV)
            ));
        }
        None => {}
    }
    gap_problem(&mut report);
    deferred_problem(&mut report);
    if report.problem.is_none() && ck_gap != 0 {
        bad(
            &mut report,
            Tamper::Gap,
            end_line,
            Some(ck_gap),
            format!(
                "the token checkpoint keeps a gap that a writer recorded at seq {ck_gap}, and \
                 that record is not in this log: the log was cut or replaced"
            ),
        );
    }
    report
}

/// Names the first break in the chain at record `i` (`last` = the last good record).
fn classify(
    report: &mut Report,
    recs: &[Option<Rec>],
    i: usize,
    last: (u64, [u8; 32], u64),
    before_last: [u8; 32],
) {
    let p = recs[i].as_ref().expect("classify on a record");
    let expected = last.0 + 1;
    let fits = |r: &Rec| r.seq == expected && r.prev == last.1;
    let next = recs[i + 1..].iter().flatten().next();
    let later_fit = recs[i + 1..].iter().flatten().find(|r| fits(r));
    if let (true, Some(k)) = (p.seq > expected, later_fit) {
        bad(
            report,
            Tamper::Reordered,
            p.no,
            Some(p.seq),
            format!(
                "record seq {expected} belongs at this line but is at line {}; records are \
                 out of order",
                k.no
            ),
        );
    } else if p.seq == last.0 && p.prev == before_last {
        // Two records claim the same place in the chain: the one the chain continues
        // from is genuine, the other was inserted.
        if next.is_some_and(|n| n.seq == p.seq + 1 && n.prev == p.hash) {
            bad(
                report,
                Tamper::Inserted,
                last.2,
                Some(last.0),
                format!(
                    "this record is not part of the chain: line {} has the same seq and \
                     place, and the chain continues from it",
                    p.no
                ),
            );
        } else {
            bad(
                report,
                Tamper::Inserted,
                p.no,
                Some(p.seq),
                format!(
                    "this record repeats seq {} (line {}) and is not part of the chain",
                    p.seq, last.2
                ),
            );
        }
    } else if next.is_some_and(fits) || (p.seq <= expected && later_fit.is_some()) {
        let n = later_fit.expect("a later record fits");
        let detail = if p.seq < expected {
            format!(
                "this line repeats seq {} and is not part of the chain (line {} continues from \
                 line {})",
                p.seq, n.no, last.2
            )
        } else {
            format!(
                "this record is not part of the chain (line {} continues from line {})",
                n.no, last.2
            )
        };
        bad(report, Tamper::Inserted, p.no, Some(p.seq), detail);
    } else if p.seq == expected {
        // prev does not match: the previous record changed, or this one did.
        if last.2 == 0 {
            bad(
                report,
                Tamper::Modified,
                p.no,
                Some(p.seq),
                "the first record's prev is not the genesis value".into(),
            );
        } else if next.is_some_and(|n| n.seq == p.seq + 1 && n.prev == p.hash) {
            bad(
                report,
                Tamper::Modified,
                last.2,
                Some(last.0),
                format!(
                    "this record was modified: its hash no longer matches prev of seq {} (line {})",
                    p.seq, p.no
                ),
            );
        } else if next.is_none() {
            bad(
                report,
                Tamper::Modified,
                last.2,
                Some(last.0),
                format!(
                    "this record or the next one (seq {}, line {}) was modified: the chain \
                     breaks between them",
                    p.seq, p.no
                ),
            );
        } else {
            bad(
                report,
                Tamper::Modified,
                p.no,
                Some(p.seq),
                format!(
                    "this record was modified: prev does not match the record before it (line {})",
                    last.2
                ),
            );
        }
    } else if p.prev == last.1 {
        bad(
            report,
            Tamper::Modified,
            p.no,
            Some(p.seq),
            format!("this record was modified: seq should be {expected}"),
        );
    } else if p.seq > expected {
        let n = p.seq - expected;
        let what = if n == 1 {
            format!("record seq {expected} is")
        } else {
            format!("{n} records (seq {expected}..{}) are", p.seq - 1)
        };
        bad(
            report,
            Tamper::Deleted,
            p.no,
            Some(p.seq),
            format!("{what} missing before this line"),
        );
    } else {
        bad(
            report,
            Tamper::Inserted,
            p.no,
            Some(p.seq),
            format!(
                "this line repeats seq {} and is not part of the chain",
                p.seq
            ),
        );
    }
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// The files of the log at `log` as a series, oldest first: the files rotated out of it
/// next to it (`LOG.*`, `LOG-*`: `cmkp11 audit rotate` and logrotate names; compressed
/// ones are left out), ordered by their first record, then the log itself. A file linked
/// under two names is taken once.
pub fn series_files(log: &Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    use std::os::unix::fs::MetadataExt;
    let dir = match log.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let name = log
        .file_name()
        .ok_or_else(|| std::io::Error::other(format!("{}: not a file name", log.display())))?
        .to_string_lossy()
        .into_owned();
    let mut seen = std::collections::HashSet::new();
    let current = std::fs::metadata(log).ok();
    if let Some(m) = &current {
        seen.insert((m.dev(), m.ino()));
    }
    let mut found: Vec<(u64, String, std::path::PathBuf)> = Vec::new();
    for e in std::fs::read_dir(&dir)? {
        let e = e?;
        let n = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = n
            .strip_prefix(&name)
            .filter(|r| r.starts_with('.') || r.starts_with('-'))
        else {
            continue;
        };
        if [".gz", ".xz", ".bz2", ".zst", ".lz4", ".Z"]
            .iter()
            .any(|x| rest.ends_with(x))
        {
            continue;
        }
        let p = e.path();
        let Ok(m) = std::fs::metadata(&p) else {
            continue;
        };
        if !m.is_file() || !seen.insert((m.dev(), m.ino())) {
            continue;
        }
        let f = std::fs::File::open(&p)?;
        let first = chain::first_seq(&f, m.len())?.unwrap_or(u64::MAX);
        found.push((first, n, p));
    }
    found.sort();
    let mut v: Vec<_> = found.into_iter().map(|(_, _, p)| p).collect();
    if current.is_some() || v.is_empty() {
        v.push(log.to_path_buf());
    }
    Ok(v)
}
