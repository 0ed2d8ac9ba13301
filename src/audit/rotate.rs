//! Rotation of the audit log (`cmkp11 audit rotate`): the current file is closed with a
//! MACed `log-close` record and kept under another name; a new file takes its place at
//! the log's path, starting with a MACed `log-open` record chained to the `log-close`
//! record (`seq` goes on, `prev` is the hash of the `log-close` line), so that the files
//! verify one by one and as a series.
//!
//! Everything happens under the audit lock, so no writer appends meanwhile. The new file
//! is complete (its first record written and synced) before it appears at the path, by
//! rename; the old file is given its new name by a hard link first, so the path never
//! names nothing. Writers that still hold the old file open find it closed at their next
//! append (its last record is `log-close`, or the lock file's hint names another file)
//! and reopen the path: no record is lost or written twice.
//!
//! A rotation killed after the `log-close` record is written and before the new file is
//! renamed into place leaves a closed file at the path: writers then refuse to append
//! (they say to run the rotation again), and `cmkp11 audit rotate` finishes it.

use super::chain::{self, Anchor, Checkpoint};
use super::record::{self, hex, Ident};
use super::{sink, Record, TokenMac};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// What a rotation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotated {
    /// Where the closed file is now.
    pub archive: PathBuf,
    /// `seq` of its `log-close` record.
    pub closed_at: u64,
    /// `seq` of the `log-open` record that starts the new file.
    pub opened_at: u64,
    /// Whether the records were MACed by the token.
    pub maced: bool,
}

/// The default name of the closed file: `<log>.<UTC time>` (`audit.log.20261207T231500Z`),
/// with `-N` added if that name exists.
pub fn default_archive(log: &Path, now: SystemTime) -> PathBuf {
    let t = record::rfc3339(now); // 2026-12-07T23:15:00.123456Z
    let stamp: String = t[..19].chars().filter(|c| *c != '-' && *c != ':').collect();
    let mut name = log.as_os_str().to_owned();
    name.push(format!(".{stamp}Z"));
    let base = PathBuf::from(name);
    let mut p = base.clone();
    let mut n = 1;
    while p.symlink_metadata().is_ok() {
        let mut s = base.as_os_str().to_owned();
        s.push(format!("-{n}"));
        p = PathBuf::from(s);
        n += 1;
    }
    p
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

/// Rotates the log at `log`.
///
/// * `renamed = None`: the file at `log` is closed and linked to `archive` (see
///   [`default_archive`]).
/// * `renamed = Some(old)`: the log was renamed to `old` already (logrotate with
///   `nocreate`, from its `postrotate` script); `old` is closed where it is, provided no
///   writer started a new file at `log` meanwhile (else nothing is done and the error says
///   so: the series still verifies, the old file just has no `log-close` record).
///
/// With `mac` (the token's audit key and checkpoint) both records are MACed and the token
/// checkpoint moves to the new file's first record; a token that cannot MAC refuses the
/// rotation.
pub fn rotate(
    log: &Path,
    renamed: Option<&Path>,
    archive: Option<&Path>,
    mac: Option<&dyn TokenMac>,
) -> Result<Rotated, String> {
    let disp = log.display();
    let (file_path, link_to) = match renamed {
        Some(old) => (old.to_path_buf(), None),
        None => (
            log.to_path_buf(),
            Some(
                archive
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| default_archive(log, SystemTime::now())),
            ),
        ),
    };
    let fdisp = file_path.display().to_string();
    let mut lf = sink::LogFile::open_existing(&file_path, log).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            format!("{fdisp}: no such file")
        } else {
            format!("open {fdisp}: {e}")
        }
    })?;
    let file_id = lf.id();
    let meta = std::fs::metadata(&file_path).map_err(|e| format!("{fdisp}: {e}"))?;
    let mut locked = lf.lock().map_err(|e| format!("lock {fdisp}: {e}"))?;
    if locked.retired() {
        return Err("the audit lock was taken over meanwhile; run the rotation again".into());
    }
    match renamed {
        Some(_) => {
            if let Some(h) = locked.raw_hint().filter(|h| h.log_id != file_id) {
                if h.seq > 0 {
                    return Err(format!(
                        "the audit lock says the log was last written in another file than \
                         {fdisp} (a writer started a new file at {disp} already, or this is \
                         not the renamed log): nothing rotated; {fdisp} stays without a \
                         log-close record and verifies with the files after it \
                         (`cmkp11 audit verify --series`)"
                    ));
                }
            }
            match std::fs::metadata(log) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Ok(m) if m.len() == 0 => {}
                Ok(m) if (m.dev(), m.ino()) == file_id => {
                    return Err(format!("{fdisp} is the log itself, not a renamed copy"))
                }
                Ok(_) => {
                    return Err(format!(
                        "a writer started a new file at {disp} already: {fdisp} stays without \
                         a log-close record and verifies with the files after it \
                         (`cmkp11 audit verify --series`)"
                    ))
                }
                Err(e) => return Err(format!("{disp}: {e}")),
            }
        }
        None => {
            let to = link_to.as_ref().expect("set without renamed");
            if to.symlink_metadata().is_ok() {
                return Err(format!("{}: exists already", to.display()));
            }
        }
    }
    let len = locked.end().map_err(|e| format!("{fdisp}: {e}"))?;
    let tail = chain::read_tail(locked.file(), len)
        .map_err(|e| format!("read the end of {fdisp}: {e}"))?;
    if let Some(t) = &tail.torn {
        return Err(format!(
            "{fdisp} ends with a torn record ({} bytes at offset {}); the next writer marks \
             it: rotate after that",
            t.len, t.offset
        ));
    }
    if tail.seq == 0 {
        return Err(format!("{fdisp} holds no record: nothing to rotate"));
    }
    // An interrupted rotation left the file closed: finish it (no second log-close).
    let resume = tail.sealed;
    // The token checkpoint must name a record of this file (or of an earlier one): a log
    // with a gap is not closed as if it were whole.
    let mut sticky_gap = 0;
    if let Some(tm) = mac {
        match tm.load_checkpoint() {
            Ok(None) => {}
            Ok(Some(b)) => {
                let c = Checkpoint::decode(&b)
                    .ok_or("the token's audit checkpoint object is not a cmkp11 checkpoint")?;
                sticky_gap = c.gap;
                let f = locked.file();
                let found = chain::first_seq(f, len)
                    .and_then(|base| chain::find_checkpointed(f, len, base, &c))
                    .map_err(|e| format!("read {fdisp}: {e}"))?;
                if let Anchor::Missing(why) = found {
                    return Err(format!(
                        "{why}; not rotated: check the log with `cmkp11 audit verify`"
                    ));
                }
            }
            Err(rv) => {
                return Err(format!(
                    "cannot read the token's audit checkpoint ({}); not rotated",
                    crate::backend::rv::name(rv as cryptoki_sys::CK_RV)
                ))
            }
        }
    }
    let do_mac = |prefix: &[u8]| -> Result<Option<Vec<u8>>, String> {
        match mac {
            None => Ok(None),
            Some(tm) => tm.mac(&chain::mac_input(prefix)).map(Some).map_err(|rv| {
                format!(
                    "the token cannot MAC ({}); not rotated",
                    crate::backend::rv::name(rv as cryptoki_sys::CK_RV)
                )
            }),
        }
    };
    let ident = Ident::current();
    let pid = crate::sys::shm::pid();
    let archive_name = link_to.as_deref().unwrap_or(&file_path);
    let (close_seq, close_hash, close_line) = if resume {
        (tail.seq, tail.hash, None)
    } else {
        let r = Record {
            reason: Some(format!(
                "rotated: this file is closed; the log goes on in a new {} from record {}",
                file_name(log),
                tail.seq + 2
            )),
            ..Record::new(record::OP_CLOSE, 0)
        };
        let body = record::body(&ident, pid, &r.view(), None, SystemTime::now());
        let seq = tail.seq + 1;
        let mut line = record::prefix(&body, seq, &tail.hash);
        let m = do_mac(&line)?;
        record::finish(&mut line, m.as_deref());
        (seq, chain::line_hash(&line), Some(line))
    };
    let open_seq = close_seq + 1;
    let r = Record {
        reason: Some(format!(
            "rotated: continues {} after record {close_seq} (hash {})",
            file_name(archive_name),
            &hex(&close_hash)[..16]
        )),
        ..Record::new(record::OP_OPEN, 0)
    };
    let body = record::body(&ident, pid, &r.view(), None, SystemTime::now());
    let mut open_line = record::prefix(&body, open_seq, &close_hash);
    let open_mac = do_mac(&open_line)?;
    record::finish(&mut open_line, open_mac.as_deref());
    let open_hash = chain::line_hash(&open_line);
    open_line.push(b'\n');

    // The new file, complete before it appears at the path.
    let dir = log.parent().filter(|d| !d.as_os_str().is_empty());
    let tmp = log.with_file_name(format!(
        ".{}.rotate-{}.tmp",
        file_name(log),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&tmp);
    let mode = meta.mode() & 0o7777;
    let new = std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(|e| format!("create {}: {e}", tmp.display()))?;
    let cleanup = |e: String| {
        let _ = std::fs::remove_file(&tmp);
        e
    };
    let prepared = (|| -> std::io::Result<(u64, u64)> {
        new.set_permissions(std::fs::Permissions::from_mode(mode))?;
        let _ = rustix::fs::fchown(&new, None, Some(rustix::fs::Gid::from_raw(meta.gid())));
        let mut acl = vec![0u8; 4096];
        if let Ok(n) = rustix::fs::fgetxattr(locked.file(), "system.posix_acl_access", &mut acl) {
            let _ = rustix::fs::fsetxattr(
                &new,
                "system.posix_acl_access",
                &acl[..n],
                rustix::fs::XattrFlags::empty(),
            );
        }
        (&new).write_all(&open_line)?;
        new.sync_all()?;
        let m = new.metadata()?;
        Ok((m.dev(), m.ino()))
    })();
    let new_id = prepared.map_err(|e| cleanup(format!("write {}: {e}", tmp.display())))?;
    if let Some(to) = &link_to {
        if !(resume && to.symlink_metadata().is_ok()) {
            std::fs::hard_link(&file_path, to)
                .map_err(|e| cleanup(format!("link {fdisp} to {}: {e}", to.display())))?;
        }
    }
    let unlink = |e: String| {
        if let Some(to) = &link_to {
            let _ = std::fs::remove_file(to);
        }
        cleanup(e)
    };
    if let Some(line) = &close_line {
        let mut buf = line.clone();
        buf.push(b'\n');
        locked
            .append(&buf, len)
            .and_then(|()| locked.sync())
            .map_err(|e| unlink(format!("write {fdisp}: {e}")))?;
    }
    if let Err(e) = std::fs::rename(&tmp, log) {
        if close_line.is_some() {
            // take the log-close record back: the token checkpoint does not name it yet
            let _ = locked.file().set_len(len);
        }
        return Err(unlink(format!("rename {} to {disp}: {e}", tmp.display())));
    }
    if let Some(d) = dir {
        if let Ok(d) = std::fs::File::open(d) {
            let _ = d.sync_all();
        }
    }
    locked.set_hint(Some(crate::sys::shm::Hint {
        log_id: new_id,
        len: open_line.len() as u64,
        seq: open_seq,
        hash: open_hash,
    }));
    if let (Some(tm), Some(m)) = (mac, open_mac) {
        let c = Checkpoint {
            seq: open_seq,
            hash: open_hash,
            mac: m,
            end: Some(open_line.len() as u64),
            gap: sticky_gap,
        };
        if let Err(rv) = tm.store_checkpoint(&c.encode()) {
            // the new file is in place and its first record MACed; the next writer's MAC
            // moves the checkpoint
            log::error!(
                "audit: cannot store the token checkpoint ({})",
                crate::backend::rv::name(rv as cryptoki_sys::CK_RV)
            );
        }
    }
    drop(locked);
    Ok(Rotated {
        archive: archive_name.to_path_buf(),
        closed_at: close_seq,
        opened_at: open_seq,
        maced: mac.is_some(),
    })
}
