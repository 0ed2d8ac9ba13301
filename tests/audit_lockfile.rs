//! The audit lock file (`.<log>.lock`): its robust mutex survives a holder that dies (a
//! thread, or a process killed with SIGKILL mid-append), and a lock file that is missing,
//! cannot be created, is corrupt, or belongs to another C library never costs a record
//! silently nor breaks the chain. The log never needs the lock file to verify.
//!
//! The holder process is this test binary, started with `AUDIT_LOCK_HOLDER` set and
//! filtered to [`child_holds_the_lock`].

mod audit_support;

use audit_support::*;
use cmkp11::audit::{self, sink::lock_path, Auditor};
use cmkp11::sys::shm::{LockFile, LOCK_FILE_LEN};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const CKR_FUNCTION_FAILED: u64 = 6;

fn plain(log: &Path) -> Auditor {
    Auditor::open_with(&cfg(log, "deny"), None, Default::default()).unwrap()
}

/// Runs `f` in a thread; fails the test if it has not returned within 20 s (a deadlock).
fn within_20s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(20))
        .expect("deadlock: no return within 20 s")
}

/// Entry point of the holder process (does nothing unless started by the test below):
/// takes the lock file's mutex, appends half a record to the log, says so, and sleeps.
#[test]
fn child_holds_the_lock() {
    let Ok(log) = std::env::var("AUDIT_LOCK_HOLDER") else {
        return;
    };
    let lf = LockFile::open(&lock_path(Path::new(&log))).expect("lock file");
    let g = lf.lock().expect("lock");
    let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    f.write_all(br#"{"time":"2026-11-23T13:18:58.123456Z","seq":"#)
        .unwrap();
    println!("locked");
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_secs(60));
    drop(g);
}

#[test]
fn a_process_killed_holding_the_lock_blocks_nobody_afterwards() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.log");
    let a = std::sync::Arc::new(plain(&log));
    a.record(use_record(0)).unwrap();
    assert!(lock_path(&log).exists());

    let mut kid = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_holds_the_lock", "--nocapture", "--quiet"])
        .env("AUDIT_LOCK_HOLDER", &log)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    let mut out = BufReader::new(kid.stdout.take().unwrap());
    while !line.starts_with("locked") {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "the holder ended");
    }

    // the lock excludes: our record waits for the holder
    let (tx, rx) = mpsc::channel();
    let a2 = a.clone();
    std::thread::spawn(move || {
        let _ = tx.send(a2.record(use_record(1)));
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "a record went in while another process held the lock"
    );
    kid.kill().unwrap(); // SIGKILL while holding the mutex, with a torn line in the file
    kid.wait().unwrap();
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(20)).expect("deadlock"),
        Ok(())
    );
    // another writer (a fresh mapping) goes on too
    let b = plain(&log);
    within_20s(move || b.record(use_record(2))).unwrap();
    a.record(use_record(3)).unwrap();

    let r = audit::verify(&log, None);
    assert!(r.ok(), "{r}");
    assert_eq!(r.records, 5, "{r}"); // 4 uses and the torn marker
    assert_eq!(
        r.notes.iter().filter(|n| n.contains("torn")).count(),
        1,
        "{r}"
    );
}

#[test]
fn a_thread_that_ends_holding_the_lock_leaves_it_to_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.log");
    let a = plain(&log);
    a.record(use_record(0)).unwrap();
    let lf = std::sync::Arc::new(LockFile::open(&lock_path(&log)).unwrap());
    {
        let g = lf.lock().unwrap();
        assert!(!g.owner_died());
        assert!(g.hint().is_some_and(|h| h.seq == 1));
    }
    let lf2 = lf.clone();
    std::thread::spawn(move || std::mem::forget(lf2.lock().unwrap()))
        .join()
        .unwrap();
    let lf3 = lf.clone();
    let died = within_20s(move || lf3.lock().map(|g| g.owner_died()).unwrap());
    assert!(died, "the next holder must learn that the owner died");
    assert!(!lf.lock().unwrap().owner_died(), "consistent again");
    // the writer distrusts the hint after a death and reads the file's end instead
    let lf4 = lf.clone();
    std::thread::spawn(move || std::mem::forget(lf4.lock().unwrap()))
        .join()
        .unwrap();
    within_20s(move || a.record(use_record(1))).unwrap();
    let r = audit::verify(&log, None);
    assert!(r.ok() && r.records == 2, "{r}");
}

#[test]
fn corrupt_lock_files_are_replaced_and_the_log_never_needs_one() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.log");
    let lp = lock_path(&log);
    assert_eq!(lp, dir.path().join(".audit.log.lock"));
    // a log written before lock files existed: no lock file, the chain goes on
    plain(&log).record(use_record(0)).unwrap();
    std::fs::remove_file(&lp).unwrap();
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"not to be touched").unwrap();
    let corruptions: Vec<Box<dyn Fn()>> = vec![
        Box::new(|| std::fs::write(&lp, b"garbage").unwrap()),
        Box::new(|| std::fs::write(&lp, vec![0x5a; LOCK_FILE_LEN]).unwrap()),
        Box::new(|| std::os::unix::fs::symlink(&victim, &lp).unwrap()),
        Box::new(|| {}),
    ];
    for (i, corrupt) in corruptions.iter().enumerate() {
        let _ = std::fs::remove_file(&lp);
        corrupt();
        let a = plain(&log);
        a.record(use_record(i as u64 + 1)).unwrap();
        let m = std::fs::symlink_metadata(&lp).unwrap();
        assert!(m.is_file() && m.len() == LOCK_FILE_LEN as u64, "case {i}");
        assert!(LockFile::open(&lp).is_ok(), "case {i}");
    }
    assert_eq!(std::fs::read(&victim).unwrap(), b"not to be touched");
    std::fs::remove_file(&lp).unwrap();
    let r = audit::verify(&log, None);
    assert!(r.ok() && r.records == 5, "{r}");
    // no temporary files left behind
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(names.iter().all(|n| !n.contains("tmp")), "{names:?}");
}

#[test]
fn a_lock_file_of_another_c_library_refuses_records_instead_of_guessing() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.log");
    let lp = lock_path(&log);
    let a = plain(&log);
    a.record(use_record(0)).unwrap();
    drop(a);
    // same magic, another ABI tag: its writers' mutex layout is unknown to us
    let mut b = std::fs::read(&lp).unwrap();
    b[16..48].copy_from_slice(&[b'?'; 32]);
    std::fs::remove_file(&lp).unwrap();
    std::fs::write(&lp, &b).unwrap();
    let a = plain(&log);
    assert_eq!(a.record(use_record(1)), Err(CKR_FUNCTION_FAILED));
    assert_eq!(lines(&log).len(), 1);
    // once it is gone, the next record goes in (after an audit-lost record)
    std::fs::remove_file(&lp).unwrap();
    a.record(use_record(2)).unwrap();
    let r = audit::verify(&log, None);
    assert!(r.ok() && r.records == 3, "{r}");
    assert!(lines(&log)[1].contains("\"audit-lost\""));
}

#[test]
fn a_lock_file_removed_while_writers_run_is_noticed() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.log");
    let a = plain(&log);
    a.record(use_record(0)).unwrap();
    std::fs::remove_file(lock_path(&log)).unwrap();
    let b = plain(&log); // makes a new lock file
    b.record(use_record(1)).unwrap();
    std::thread::sleep(audit::RECHECK + Duration::from_millis(50));
    a.record(use_record(2)).unwrap();
    b.record(use_record(3)).unwrap();
    // both use the new one now: concurrent appends keep the chain
    std::thread::scope(|s| {
        for w in [&a, &b] {
            s.spawn(move || {
                for i in 0..300 {
                    w.record(use_record(i)).unwrap();
                }
            });
        }
    });
    let r = audit::verify(&log, None);
    assert!(r.ok() && r.records == 604, "{r}");
}

struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Without room for a lock file a writer falls back to `flock`; once another writer makes a
/// lock file, the first one switches to it (it looks under every `flock`), so the two
/// never append at the same time. Needs root for the tmpfs; prints SKIP otherwise.
#[test]
fn without_a_lock_file_flock_serves_until_one_appears() {
    let outer = tempfile::tempdir().unwrap();
    let fs = outer.path().join("fs");
    std::fs::create_dir(&fs).unwrap();
    let out = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
        .arg(&fs)
        .output()
        .unwrap();
    if !out.status.success() {
        eprintln!(
            "SKIP: cannot mount a tmpfs (needs root): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        return;
    }
    let _m = Mount(fs.clone());
    let log = fs.join("audit.log");
    std::fs::write(&log, b"").unwrap();
    let filler = fs.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    while f.write_all(&[0u8; 1024]).is_ok() {}
    drop(f);
    let a = plain(&log); // no room for the lock file: flock
    assert!(!lock_path(&log).exists());
    std::fs::remove_file(&filler).unwrap();
    for i in 0..10 {
        a.record(use_record(i)).unwrap();
    }
    assert!(!lock_path(&log).exists());
    let b = plain(&log); // room now: makes the lock file
    assert!(lock_path(&log).exists());
    std::thread::scope(|s| {
        for w in [&a, &b] {
            s.spawn(move || {
                for i in 0..30 {
                    w.record(use_record(i)).unwrap();
                }
            });
        }
    });
    let r = audit::verify(&log, None);
    assert!(r.ok() && r.records == 70, "{r}");
}

/// verify takes the writers' mutex: it waits for a holder, and a verify running while
/// writers append (with token checkpoints) never sees half an append or a checkpoint
/// ahead of the file.
#[test]
fn verify_takes_the_writers_lock() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.log");
    let mac = SoftMac::for_log(&log);
    let (a, b) = (auditor(&log, &mac, 16), auditor(&log, &mac, 16));
    a.record(use_record(0)).unwrap();
    let lf = LockFile::open(&lock_path(&log)).unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::scope(|s| {
        let g = lf.lock().unwrap();
        let (log, mac) = (&log, &mac);
        s.spawn(move || {
            let _ = tx.send(audit::verify(log, Some(&**mac)).ok());
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "verify read the log while a writer held the lock"
        );
        drop(g);
        assert_eq!(rx.recv_timeout(Duration::from_secs(20)), Ok(true));
    });
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        for w in [&a, &b] {
            let done = &done;
            s.spawn(move || {
                for i in 0..1500 {
                    let mut r = use_record(i);
                    r.reason = Some("x".repeat((i % 7 * 300) as usize));
                    w.record(r).unwrap();
                }
                done.store(true, std::sync::atomic::Ordering::Relaxed);
            });
        }
        let mut runs = 0;
        while !done.load(std::sync::atomic::Ordering::Relaxed) || runs < 3 {
            let r = audit::verify(&log, Some(&*mac));
            assert!(r.ok(), "verify during appends: {r}");
            runs += 1;
        }
    });
    drop((a, b));
    let r = audit::verify(&log, Some(&*mac));
    assert!(r.ok(), "{r}");
    assert_eq!(r.authenticated_through, Some(r.last_seq), "{r}");
}

/// Whoever may append to the log may use its lock file: it gets the log's permission bits,
/// group and access ACL (a user granted the log by an ACL entry is not locked out).
#[test]
fn the_lock_file_gets_the_logs_permissions_and_acl() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.log");
    std::fs::write(&log, b"").unwrap();
    std::fs::set_permissions(&log, std::fs::Permissions::from_mode(0o620)).unwrap();
    // user::rw-, user:4242:rw-, group::r--, mask::rw-, other::--- (xattr format version 2)
    let mut acl = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in [
        (0x01u16, 6u16, u32::MAX),
        (0x02, 6, 4242),
        (0x04, 4, u32::MAX),
        (0x10, 6, u32::MAX),
        (0x20, 0, u32::MAX),
    ] {
        acl.extend_from_slice(&tag.to_le_bytes());
        acl.extend_from_slice(&perm.to_le_bytes());
        acl.extend_from_slice(&id.to_le_bytes());
    }
    let with_acl = rustix::fs::setxattr(
        &log,
        "system.posix_acl_access",
        &acl,
        rustix::fs::XattrFlags::empty(),
    )
    .is_ok();
    if !with_acl {
        eprintln!("no ACL support here: checking the mode only");
    }
    plain(&log).record(use_record(0)).unwrap();
    let (lm, km) = (
        std::fs::metadata(&log).unwrap(),
        std::fs::metadata(lock_path(&log)).unwrap(),
    );
    assert_eq!(km.mode() & 0o777, lm.mode() & 0o777);
    assert_eq!(km.gid(), lm.gid());
    if with_acl {
        let mut got = vec![0u8; 256];
        let n = rustix::fs::getxattr(lock_path(&log), "system.posix_acl_access", &mut got[..])
            .expect("the lock file has the log's ACL");
        assert_eq!(&got[..n], &acl[..]);
    }
}
