//! Several processes and threads append to one log; it verifies, and no record is lost.
//!
//! The writer processes are this test binary itself, started with `AUDIT_CHILD_LOG` set and
//! filtered to [`child_writer`].

mod audit_support;

use audit_support::*;
use cmkp11::audit;
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

const PROCS: usize = 3;
const THREADS: usize = 3;
const PER_THREAD: u64 = 400;

fn write_from_threads(log: &Path, every: u32) {
    let mac = SoftMac::for_log(log);
    let a = auditor(log, &mac, every);
    std::thread::scope(|s| {
        for t in 0..THREADS as u64 {
            let a = &a;
            s.spawn(move || {
                for i in 0..PER_THREAD {
                    let mut r = use_record(i);
                    r.reason = Some(format!("t{t} i{i}"));
                    a.record(r).unwrap();
                    if i % 50 == 0 {
                        a.count_bulk(t, "encrypt");
                        a.session_closed(t);
                    }
                }
            });
        }
    });
}

/// Entry point of the writer processes (does nothing unless started by the tests below).
#[test]
fn child_writer() {
    let Ok(log) = std::env::var("AUDIT_CHILD_LOG") else {
        return;
    };
    let log = Path::new(&log);
    if std::env::var_os("AUDIT_CHILD_FOREVER").is_none() {
        write_from_threads(log, 37);
        return;
    }
    // until killed: two threads, long records (a wider window for a kill mid-write)
    let mac = SoftMac::for_log(log);
    let a = auditor(log, &mac, 64);
    std::thread::scope(|s| {
        for t in 0..2 {
            let a = &a;
            s.spawn(move || {
                for i in 0.. {
                    let mut r = use_record(i);
                    r.reason = Some(format!("t{t} i{i} {}", "x".repeat(3000)));
                    a.record(r).unwrap();
                }
            });
        }
    });
}

#[test]
fn writers_killed_at_random_leave_a_log_that_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.log");
    let exe = std::env::current_exe().unwrap();
    for round in 0..6u64 {
        let mut kids: Vec<_> = (0..2)
            .map(|_| {
                Command::new(&exe)
                    .args(["--exact", "child_writer", "--test-threads", "1", "--quiet"])
                    .env("AUDIT_CHILD_LOG", &log)
                    .env("AUDIT_CHILD_FOREVER", "1")
                    .stdout(std::process::Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(150 + 37 * round));
        for k in &mut kids {
            k.kill().unwrap(); // SIGKILL: no drop, no closing checkpoint, maybe mid-write
        }
        for mut k in kids {
            let _ = k.wait();
        }
        // between rounds the log may end torn; it must never be worse than that
        let r = audit::verify(&log, Some(&*SoftMac::for_log(&log)));
        if let Some(p) = &r.problem {
            assert_eq!(p.kind, cmkp11::audit::Tamper::Torn, "{r}");
        }
    }
    // a writer that comes later repairs whatever was left and closes cleanly
    let mac = SoftMac::for_log(&log);
    let a = auditor(&log, &mac, 64);
    a.record(use_record(0)).unwrap();
    drop(a);
    let r = audit::verify(&log, Some(&*mac));
    assert!(r.ok(), "{r}");
    assert!(r.records > 100, "{r}");
    assert_eq!(r.authenticated_through, Some(r.last_seq), "{r}");
    eprintln!(
        "{} records, torn records marked: {}",
        r.records,
        r.notes.iter().filter(|n| n.contains("torn")).count()
    );
}

#[test]
fn processes_and_threads_share_one_log() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.log");
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..PROCS)
        .map(|_| {
            Command::new(&exe)
                .args(["--exact", "child_writer", "--test-threads", "1", "--quiet"])
                .env("AUDIT_CHILD_LOG", &log)
                .spawn()
                .unwrap()
        })
        .collect();
    write_from_threads(&log, 53); // this process too, at the same time
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    let mac = SoftMac::for_log(&log);
    let r = audit::verify(&log, Some(&*mac));
    assert!(r.ok(), "{r}");
    assert!(r.notes.is_empty(), "{r}");
    let lines = lines(&log);
    assert_eq!(r.records as usize, lines.len());
    // every record of every thread of every process is there exactly once
    let mut seen: HashMap<(u64, String), u32> = HashMap::new();
    let mut pids = std::collections::HashSet::new();
    let mut closes = 0;
    for l in &lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        pids.insert(v["pid"].as_u64().unwrap());
        match v["op"].as_str().unwrap() {
            "checkpoint" => {}
            "session-close" => closes += 1,
            _ => {
                let k = (
                    v["pid"].as_u64().unwrap(),
                    v["reason"].as_str().unwrap().to_owned(),
                );
                *seen.entry(k).or_default() += 1;
            }
        }
    }
    let procs = PROCS + 1;
    assert_eq!(pids.len(), procs);
    assert_eq!(seen.len(), procs * THREADS * PER_THREAD as usize);
    assert!(seen.values().all(|&n| n == 1));
    assert_eq!(closes, procs * THREADS * (PER_THREAD as usize).div_ceil(50));
    // writes interleaved between processes (the lock was actually contended)
    let switches = lines
        .windows(2)
        .filter(|w| {
            let a: serde_json::Value = serde_json::from_str(&w[0]).unwrap();
            let b: serde_json::Value = serde_json::from_str(&w[1]).unwrap();
            a["pid"] != b["pid"]
        })
        .count();
    eprintln!(
        "{} lines, {switches} writer switches between processes",
        lines.len()
    );
    assert!(r.authenticated_through == Some(r.last_seq), "{r}");
}
