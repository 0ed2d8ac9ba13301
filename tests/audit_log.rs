//! The audit log through the library: record format, chain and MACs, every tamper kind
//! named by verify, torn-record repair, bulk counts, syslog, failure modes, tail/report.

mod audit_support;

use audit_support::*;
use cmkp11::audit::{self, cli, Auditor, Record, Tamper, TokenMac, Tuning};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

const CKR_OK: u64 = 0;
const CKR_FUNCTION_FAILED: u64 = 6;

/// A closed log of `n` use records (MAC every 8), its double, its temp dir.
fn fresh(n: u64) -> (tempfile::TempDir, PathBuf, Arc<SoftMac>) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.log");
    let mac = SoftMac::for_log(&log);
    let a = auditor(&log, &mac, 8);
    for i in 0..n {
        a.record(use_record(i)).unwrap();
    }
    drop(a); // writes the closing checkpoint
    (dir, log, mac)
}

fn check(log: &Path, mac: &SoftMac, kind: Tamper, line: u64) -> String {
    let r = audit::verify(log, Some(mac));
    let p = r
        .problem
        .clone()
        .unwrap_or_else(|| panic!("tampering not detected:\n{r}"));
    assert_eq!((p.kind, p.line), (kind, line), "{r}");
    r.to_string()
}

#[test]
fn records_have_every_field_and_verify() {
    let (_d, log, mac) = fresh(50);
    let r = audit::verify(&log, Some(&*mac));
    assert!(r.ok(), "{r}");
    let lines = lines(&log);
    // 50 records and the closing checkpoint
    assert_eq!(lines.len(), 51);
    assert_eq!(r.records, 51);
    assert_eq!(r.authenticated_through, Some(51));
    assert_eq!(r.token_checkpoint, Some(51));
    // A MAC per checkpoint, not per record.
    let macs = lines
        .iter()
        .filter(|l| !l.ends_with("\"mac\":null}"))
        .count();
    assert!((6..=9).contains(&macs), "{macs} MACed records");
    assert_eq!(r.macs as usize, macs);
    let fields = [
        "time",
        "seq",
        "pid",
        "uid",
        "exe",
        "slot",
        "token",
        "session",
        "op",
        "mechanism",
        "key",
        "key_id",
        "version",
        "result",
        "reason",
        "prev",
        "mac",
    ];
    for (i, l) in lines.iter().enumerate() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert_eq!(v.as_object().unwrap().len(), fields.len(), "{l}");
        let at: Vec<usize> = fields
            .iter()
            .map(|f| l.find(&format!("\"{f}\":")).unwrap())
            .collect();
        assert!(
            at.windows(2).all(|w| w[0] < w[1]),
            "field order of line {}",
            i + 1
        );
        assert_eq!(v["seq"], i as u64 + 1);
        let t = v["time"].as_str().unwrap();
        assert_eq!(t.len(), 27, "{t}");
        assert!(
            t.starts_with("20") && t.ends_with('Z') && &t[10..11] == "T",
            "{t}"
        );
        assert_eq!(v["pid"], std::process::id());
        assert_eq!(v["uid"], rustix_uid());
        assert!(v["exe"].as_str().unwrap().contains("audit_log"));
    }
    let v: serde_json::Value = serde_json::from_str(&lines[2]).unwrap();
    assert_eq!(v["op"], "sign");
    assert_eq!(v["mechanism"], "CKM_AES_GCM");
    assert_eq!(v["key"], "payments-2");
    assert_eq!(v["key_id"], "abcd02");
    assert_eq!(v["version"], 1);
    assert_eq!(v["result"], "CKR_OK");
    assert_eq!(v["reason"], serde_json::Value::Null);
    assert_eq!(v["session"], 3);
    assert_eq!(v["token"], "cmkp11-test");
    let first: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(first["prev"], "0".repeat(64));
    assert!(
        first["mac"].is_string(),
        "first record of a process is MACed"
    );
    let last: serde_json::Value = serde_json::from_str(&lines[50]).unwrap();
    assert_eq!(last["op"], "checkpoint");
    assert!(last["mac"].is_string());
}

fn rustix_uid() -> u32 {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .unwrap()
}

#[test]
fn denial_records_name_result_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("a.log");
    let mac = SoftMac::for_log(&log);
    let a = auditor(&log, &mac, 100);
    a.record(Record {
        op: "denied".into(),
        key: Some("payments-\"quoted\"\nkey".into()),
        mechanism: Some(0x8000_0001),
        result: 0x101, // CKR_USER_NOT_LOGGED_IN
        reason: Some("access rule 2: uid 1000 not allowed".into()),
        ..Record::default()
    })
    .unwrap();
    a.record(Record::new("login", 0xa0)).unwrap(); // CKR_PIN_INCORRECT
    drop(a);
    let l = lines(&log);
    let v: serde_json::Value = serde_json::from_str(&l[0]).unwrap();
    assert_eq!(v["result"], "CKR_USER_NOT_LOGGED_IN");
    assert_eq!(v["mechanism"], "0x80000001");
    assert_eq!(v["key"], "payments-\"quoted\"\nkey");
    assert_eq!(v["reason"], "access rule 2: uid 1000 not allowed");
    let v: serde_json::Value = serde_json::from_str(&l[1]).unwrap();
    assert_eq!(
        (v["op"].as_str(), v["result"].as_str()),
        (Some("login"), Some("CKR_PIN_INCORRECT"))
    );
    assert!(audit::verify(&log, Some(&*mac)).ok());
}

#[test]
fn edited_field_is_modified() {
    let (_d, log, mac) = fresh(40);
    let mut l = lines(&log);
    assert!(l[9].contains("\"op\":\"unwrap\""));
    l[9] = l[9].replace("\"op\":\"unwrap\"", "\"op\":\"sign\"");
    write_lines(&log, &l);
    let msg = check(&log, &mac, Tamper::Modified, 10);
    assert!(msg.contains("BAD: line 10 (seq 10): modified"), "{msg}");
    // a one-byte edit of the version as well
    let (_d, log, mac) = fresh(40);
    let mut l = lines(&log);
    let edited = l[21].replacen("\"version\":2", "\"version\":3", 1);
    assert_ne!(edited, l[21]);
    l[21] = edited;
    write_lines(&log, &l);
    check(&log, &mac, Tamper::Modified, 22);
}

#[test]
fn rewritten_chain_is_caught_by_the_token_mac_only() {
    let (_d, log, mac) = fresh(40);
    let mut l = lines(&log);
    // An attacker without the token edits line 10 and recomputes every prev after it.
    l[9] = l[9].replace("\"key\":\"payments-0\"", "\"key\":\"payments-9\"");
    for i in 10..l.len() {
        let h = hex(&sha256(l[i - 1].as_bytes()));
        let at = l[i].find("\"prev\":\"").unwrap() + 8;
        l[i].replace_range(at..at + 64, &h);
    }
    write_lines(&log, &l);
    // The chain alone looks fine...
    let r = audit::verify(&log, None);
    assert!(r.ok() && !r.macs_checked, "{r}");
    // ...the token MAC is not: the first MACed record at or after line 10.
    let first_mac = (10..=l.len())
        .find(|&n| !l[n - 1].ends_with("\"mac\":null}"))
        .unwrap() as u64;
    let msg = check(&log, &mac, Tamper::Modified, first_mac);
    assert!(msg.contains("token MAC does not match"), "{msg}");
}

#[test]
fn deleted_record_is_named() {
    let (_d, log, mac) = fresh(40);
    let mut l = lines(&log);
    l.remove(9);
    write_lines(&log, &l);
    let msg = check(&log, &mac, Tamper::Deleted, 10);
    assert!(msg.contains("record seq 10 is missing"), "{msg}");
    // the first record too
    let (_d, log, mac) = fresh(10);
    let mut l = lines(&log);
    l.remove(0);
    write_lines(&log, &l);
    check(&log, &mac, Tamper::Deleted, 1);
}

#[test]
fn inserted_record_is_named() {
    // a replayed copy of an older record
    let (_d, log, mac) = fresh(40);
    let mut l = lines(&log);
    let copy = l[4].clone();
    l.insert(10, copy);
    write_lines(&log, &l);
    let msg = check(&log, &mac, Tamper::Inserted, 11);
    assert!(msg.contains("repeats seq 5"), "{msg}");
    // a forged record that takes the next seq and chains to its predecessor
    let (_d, log, mac) = fresh(40);
    let mut l = lines(&log);
    let prev = hex(&sha256(l[9].as_bytes()));
    let forged = format!(
        "{{\"time\":\"2026-01-01T00:00:00.000000Z\",\"seq\":11,\"pid\":1,\"uid\":0,\"exe\":\"x\",\
         \"slot\":0,\"token\":\"t\",\"session\":1,\"op\":\"sign\",\"mechanism\":null,\"key\":\"k\",\
         \"key_id\":null,\"version\":1,\"result\":\"CKR_OK\",\"reason\":null,\"prev\":\"{prev}\",\
         \"mac\":null}}"
    );
    l.insert(10, forged);
    write_lines(&log, &l);
    check(&log, &mac, Tamper::Inserted, 11);
    // a line that is no record at all
    let (_d, log, mac) = fresh(40);
    let mut l = lines(&log);
    l.insert(10, "hello".into());
    write_lines(&log, &l);
    check(&log, &mac, Tamper::Inserted, 11);
}

#[test]
fn swapped_records_are_reordered() {
    let (_d, log, mac) = fresh(40);
    let mut l = lines(&log);
    l.swap(9, 10);
    write_lines(&log, &l);
    let msg = check(&log, &mac, Tamper::Reordered, 10);
    assert!(
        msg.contains("record seq 10 belongs at this line but is at line 11"),
        "{msg}"
    );
    // far apart
    let (_d, log, mac) = fresh(40);
    let mut l = lines(&log);
    l.swap(5, 30);
    write_lines(&log, &l);
    check(&log, &mac, Tamper::Reordered, 6);
}

#[test]
fn cut_tail_is_truncated() {
    let (_d, log, mac) = fresh(40);
    let mut l = lines(&log);
    l.truncate(l.len() - 3);
    write_lines(&log, &l);
    let msg = check(&log, &mac, Tamper::Truncated, 39);
    assert!(msg.contains("at least 3 record(s) were cut"), "{msg}");
    // without the token, a cut at a line boundary cannot be seen: say so
    let r = audit::verify(&log, None);
    assert!(r.ok() && !r.macs_checked);
    // all records gone, checkpoint kept
    std::fs::write(&log, b"").unwrap();
    check(&log, &mac, Tamper::Truncated, 1);
}

#[test]
fn torn_last_line_is_named_and_the_next_writer_marks_it() {
    let (_d, log, mac) = fresh(20);
    let data = std::fs::read(&log).unwrap();
    // a writer killed mid-write: a record cut in the middle
    let torn = b"{\"time\":\"2026-11-23T13:18:58.123456Z\",\"seq\":22,\"pid\":77,\"uid\":0,\"ex";
    let mut d2 = data.clone();
    d2.extend_from_slice(torn);
    std::fs::write(&log, &d2).unwrap();
    let msg = check(&log, &mac, Tamper::Torn, 22);
    assert!(
        msg.contains(&format!(
            "incomplete record ({} bytes, at offset {})",
            torn.len(),
            data.len()
        )),
        "{msg}"
    );
    // a one-byte cut of the last record is torn as well
    std::fs::write(&log, &data[..data.len() - 2]).unwrap();
    check(&log, &mac, Tamper::Torn, 21);
    // the next writer repairs: terminates the torn bytes and writes a `torn` record
    std::fs::write(&log, &d2).unwrap();
    let a = auditor(&log, &mac, 8);
    a.record(use_record(1)).unwrap();
    drop(a);
    let r = audit::verify(&log, Some(&*mac));
    assert!(r.ok(), "{r}");
    let note = r
        .notes
        .iter()
        .find(|n| n.contains("torn"))
        .expect("torn note");
    assert!(
        note.starts_with(&format!(
            "line 22: torn record ({} bytes at offset {}) left by an interrupted writer, marked by seq 22 (line 23)",
            torn.len() + 1,
            data.len()
        )),
        "{note}"
    );
    let l = lines(&log);
    assert!(l[22].contains("\"op\":\"torn\""));
    assert!(l[23].contains("\"op\":\"encrypt\"") || l[23].contains("\"op\":\"decrypt\""));
    // editing the torn bytes afterwards is caught (they are hashed into the marker)
    let mut l2 = l.clone();
    l2[21] = l2[21].replace("pid\":77", "pid\":78");
    write_lines(&log, &l2);
    check(&log, &mac, Tamper::Modified, 22);
}

#[test]
fn complete_record_without_newline_is_torn_and_redone() {
    let (_d, log, mac) = fresh(5);
    // a writer killed after its last record's bytes but before its newline: that record
    // was never acknowledged, and no token checkpoint names it (cutting the newline of a
    // checkpointed record is a truncation: see audit_integrity)
    let a = auditor(&log, &mac, 8);
    a.record(use_record(5)).unwrap(); // MACed (the process's first), checkpointed
    a.record(use_record(6)).unwrap(); // chained only
    std::mem::forget(a); // killed: no closing checkpoint
    let data = std::fs::read(&log).unwrap();
    std::fs::write(&log, &data[..data.len() - 1]).unwrap();
    check(&log, &mac, Tamper::Torn, 8);
    let a = auditor(&log, &mac, 8);
    a.record(use_record(0)).unwrap();
    drop(a);
    let r = audit::verify(&log, Some(&*mac));
    assert!(r.ok(), "{r}");
    assert!(
        r.notes.iter().any(|n| n.starts_with("line 8: torn record")),
        "{r}"
    );
}

#[test]
fn torn_first_record_is_marked() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("a.log");
    let mac = SoftMac::for_log(&log);
    std::fs::write(&log, b"{\"time\":\"2026-11-23T").unwrap();
    check(&log, &mac, Tamper::Torn, 1);
    let a = auditor(&log, &mac, 8);
    a.record(use_record(0)).unwrap();
    drop(a);
    let r = audit::verify(&log, Some(&*mac));
    assert!(r.ok(), "{r}");
    assert!(
        r.notes[0].starts_with("line 1: torn record (21 bytes at offset 0)"),
        "{r}"
    );
    let l = lines(&log);
    assert!(l[1].contains("\"seq\":1,") && l[1].contains("\"op\":\"torn\""));
    assert!(l[1].contains(&format!("\"prev\":\"{}\"", "0".repeat(64))));
}

#[test]
fn idle_process_checkpoints_on_tick() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("a.log");
    let mac = SoftMac::for_log(&log);
    let a = Auditor::open_with(
        &cfg(&log, "deny"),
        Some(mac.clone() as Arc<dyn TokenMac>),
        Tuning {
            checkpoint_interval: std::time::Duration::from_millis(50),
            ..Tuning::default()
        },
    )
    .unwrap();
    a.record(use_record(0)).unwrap();
    a.record(use_record(1)).unwrap();
    a.tick().unwrap(); // not due yet
    assert_eq!(lines(&log).len(), 2);
    std::thread::sleep(std::time::Duration::from_millis(70));
    a.tick().unwrap();
    let l = lines(&log);
    assert_eq!(l.len(), 3);
    assert!(l[2].contains("\"op\":\"checkpoint\""));
    a.tick().unwrap(); // nothing new
    assert_eq!(lines(&log).len(), 3);
    let r = audit::verify(&log, Some(&*mac));
    assert_eq!(r.authenticated_through, Some(3), "{r}");
}

/// A token that cannot MAC until told so (e.g. nobody logged in yet).
struct Flaky {
    inner: Arc<SoftMac>,
    ok: std::sync::atomic::AtomicBool,
    calls: std::sync::atomic::AtomicU64,
}

impl TokenMac for Flaky {
    fn mac(&self, data: &[u8]) -> Result<Vec<u8>, u64> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if self.ok.load(Ordering::Relaxed) {
            self.inner.mac(data)
        } else {
            Err(0x101) // CKR_USER_NOT_LOGGED_IN
        }
    }
    fn load_checkpoint(&self) -> Result<Option<Vec<u8>>, u64> {
        self.inner.load_checkpoint()
    }
    fn store_checkpoint(&self, data: &[u8]) -> Result<(), u64> {
        self.inner.store_checkpoint(data)
    }
}

struct Panicky;

impl TokenMac for Panicky {
    fn mac(&self, _: &[u8]) -> Result<Vec<u8>, u64> {
        panic!("token double panics")
    }
    fn load_checkpoint(&self) -> Result<Option<Vec<u8>>, u64> {
        Ok(None)
    }
    fn store_checkpoint(&self, _: &[u8]) -> Result<(), u64> {
        Ok(())
    }
}

#[test]
fn panicking_token_fails_the_record_and_blocks_nobody() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("a.log");
    let a = Auditor::open(
        &cfg(&log, "deny"),
        Some(Arc::new(Panicky) as Arc<dyn TokenMac>),
    )
    .unwrap();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| a.record(use_record(0))));
    assert!(
        r.is_err(),
        "the panic reaches the caller (the FFI guard turns it into a CK_RV)"
    );
    // the queue is usable again; each new record panics in the MAC the same way
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| a.record(use_record(1))));
    assert!(r.is_err());
    assert!(lines(&log).is_empty());
}

#[test]
fn token_that_cannot_mac_yet() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("a.log");
    let flaky = Arc::new(Flaky {
        inner: SoftMac::for_log(&log),
        ok: false.into(),
        calls: 0.into(),
    });
    let a = Auditor::open_with(
        &cfg(&log, "deny"),
        Some(flaky.clone() as Arc<dyn TokenMac>),
        Tuning::default(),
    )
    .unwrap();
    // records are still written (unauthenticated); the token is asked at most every 100 ms
    for i in 0..50 {
        a.record(use_record(i)).unwrap();
    }
    assert!(flaky.calls.load(Ordering::Relaxed) <= 2);
    assert!(lines(&log).iter().all(|l| l.ends_with("\"mac\":null}")));
    flaky.ok.store(true, Ordering::Relaxed);
    std::thread::sleep(audit::MAC_RETRY);
    a.record(use_record(50)).unwrap();
    let l = lines(&log);
    assert!(
        !l[50].ends_with("\"mac\":null}"),
        "MACed once the token can"
    );
    let r = audit::verify(&log, Some(&*flaky));
    assert!(r.ok(), "{r}");
    assert_eq!(r.authenticated_through, Some(51));
}

#[test]
fn wrong_token_or_missing_checkpoint_fails() {
    let (_d, log, mac) = fresh(10);
    let other = SoftMac::with_key(&log, b"another token");
    let r = audit::verify(&log, Some(&*other));
    let p = r.problem.clone().expect("wrong key must fail");
    assert_eq!((p.kind, p.line), (Tamper::Modified, 1), "{r}");
    std::fs::remove_file(mac.checkpoint_path()).unwrap();
    check(&log, &mac, Tamper::Checkpoint, 12);
}

#[test]
fn unauthenticated_tail_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("a.log");
    let mac = SoftMac::for_log(&log);
    let a = auditor(&log, &mac, 1000);
    for i in 0..5 {
        a.record(use_record(i)).unwrap();
    }
    // not closed yet: 4 records after the first (MACed) one
    let r = audit::verify(&log, Some(&*mac));
    assert!(r.ok(), "{r}");
    assert_eq!(
        (r.authenticated_through, r.token_checkpoint),
        (Some(1), Some(1))
    );
    assert!(
        r.notes
            .iter()
            .any(|n| n.starts_with("4 record(s) after the token checkpoint")),
        "{r}"
    );
    a.checkpoint().unwrap();
    let r = audit::verify(&log, Some(&*mac));
    assert_eq!(
        (r.authenticated_through, r.token_checkpoint),
        (Some(6), Some(6))
    );
    // nothing new: no second checkpoint record
    a.checkpoint().unwrap();
    drop(a);
    assert_eq!(lines(&log).len(), 6);
    assert_eq!(mac.stores.load(Ordering::Relaxed), 2);
}

#[test]
fn time_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("a.log");
    let mac = SoftMac::for_log(&log);
    let a = Auditor::open_with(
        &cfg(&log, "deny"),
        Some(mac.clone() as Arc<dyn TokenMac>),
        Tuning {
            checkpoint_records: 1_000_000,
            checkpoint_interval: std::time::Duration::from_millis(50),
            ..Tuning::default()
        },
    )
    .unwrap();
    a.record(use_record(0)).unwrap();
    a.record(use_record(1)).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(80));
    a.record(use_record(2)).unwrap();
    let r = audit::verify(&log, Some(&*mac));
    assert_eq!((r.authenticated_through, r.macs), (Some(3), 2), "{r}");
}

#[test]
fn bulk_counts_go_into_the_session_close_record() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("a.log");
    let mac = SoftMac::for_log(&log);
    let a = auditor(&log, &mac, 100);
    for _ in 0..3 {
        a.count_bulk(7, "encrypt");
    }
    a.count_bulk(7, "decrypt");
    a.count_bulk(7, "decrypt");
    a.count_bulk(8, "sign");
    a.session_closed(9); // nothing counted: no record
    assert!(!log.exists() || lines(&log).is_empty());
    a.session_closed(7);
    a.session_closed(7); // counts were consumed
    drop(a);
    let l = lines(&log);
    // the first record of a process is MACed: no closing checkpoint needed
    assert_eq!(l.len(), 1, "{l:?}");
    let v: serde_json::Value = serde_json::from_str(&l[0]).unwrap();
    assert_eq!(v["op"], "session-close");
    assert_eq!(v["session"], 7);
    assert_eq!(v["bulk"], serde_json::json!({"decrypt": 2, "encrypt": 3}));
    assert!(audit::verify(&log, Some(&*mac)).ok());
    let rows = cli::report(&log, None, None).unwrap();
    assert!(rows
        .iter()
        .any(|r| r.key == "(DEK bulk)" && r.op == "encrypt" && r.ok == 3));
}

#[test]
fn syslog_sink_gets_each_record() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("a.log");
    let sock_path = dir.path().join("log.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut c = cfg(&log, "deny");
    c.syslog = true;
    let a = Auditor::open_with(
        &c,
        None,
        Tuning {
            syslog_socket: sock_path.clone(),
            ..Tuning::default()
        },
    )
    .unwrap();
    a.record(use_record(0)).unwrap();
    a.record(Record::new("login", 0xa0)).unwrap();
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).unwrap();
    let msg = std::str::from_utf8(&buf[..n]).unwrap();
    let l = lines(&log);
    assert_eq!(
        msg,
        format!("<86>cmkp11-audit[{}]: {}", std::process::id(), l[0])
    );
    let n = sock.recv(&mut buf).unwrap();
    let msg = std::str::from_utf8(&buf[..n]).unwrap();
    assert!(
        msg.starts_with("<84>cmkp11-audit["),
        "a failed login is a warning: {msg}"
    );
    // without a token: a plain chain, no MACs
    drop(a);
    let r = audit::verify(&log, None);
    assert!(r.ok() && r.macs == 0, "{r}");
}

#[test]
fn disabled_auditor_writes_nothing() {
    let a = Auditor::open(&cmkp11::config::Audit::default(), None).unwrap();
    assert!(!a.enabled() && a.denies_on_failure());
    a.record(use_record(0)).unwrap();
    a.count_bulk(1, "encrypt");
    a.session_closed(1);
    assert_eq!(a.failures(), 0);
    let bad = cmkp11::config::Audit {
        on_failure: "maybe".into(),
        ..Default::default()
    };
    assert!(Auditor::open(&bad, None)
        .unwrap_err()
        .contains("on_failure"));
}

#[test]
fn unwritable_log_denies_or_allows() {
    let dir = tempfile::tempdir().unwrap();
    // a path below a regular file: ENOTDIR even for root
    std::fs::write(dir.path().join("file"), b"x").unwrap();
    let log = dir.path().join("file").join("audit.log");
    let deny = Auditor::open(&cfg(&log, "deny"), None).unwrap();
    assert_eq!(deny.record(use_record(0)), Err(CKR_FUNCTION_FAILED));
    assert_eq!(deny.record(use_record(1)), Err(CKR_FUNCTION_FAILED));
    assert_eq!(deny.failures(), 2);
    let allow = Auditor::open(&cfg(&log, "allow"), None).unwrap();
    assert!(!allow.denies_on_failure());
    assert_eq!(allow.record(use_record(0)), Ok(()));
    assert_eq!(allow.failures(), 1);
    // a directory where the log should be
    let deny = Auditor::open(&cfg(dir.path(), "deny"), None).unwrap();
    assert_eq!(deny.record(use_record(0)), Err(CKR_FUNCTION_FAILED));
}

#[test]
fn tail_and_report() {
    let (_d, log, _mac) = fresh(30);
    let mut out = Vec::new();
    let o = cli::TailOptions {
        lines: 3,
        key: Some("payments-1".into()),
        json: false,
        follow: false,
    };
    cli::tail(&log, &o, &mut out, &mut || false).unwrap();
    let text = String::from_utf8(out).unwrap();
    let shown: Vec<&str> = text.lines().collect();
    assert_eq!(shown.len(), 3, "{text}");
    assert!(shown.iter().all(|l| l.contains("key=payments-1")));
    assert!(shown[2].contains("#29 "), "{text}"); // i = 28 is the last with i % 3 == 1
                                                  // --json prints the lines as they are
    let mut out = Vec::new();
    let o = cli::TailOptions {
        lines: 1,
        json: true,
        ..o
    };
    cli::tail(&log, &o, &mut out, &mut || false).unwrap();
    assert_eq!(String::from_utf8(out).unwrap().trim_end(), lines(&log)[28]);
    // -f picks up records appended later
    let mac = SoftMac::for_log(&log);
    let log2 = log.clone();
    let writer = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(300));
        let a = auditor(&log2, &mac, 8);
        a.record(use_record(4)).unwrap(); // key payments-1
    });
    let mut out = Vec::new();
    let o = cli::TailOptions {
        lines: 0,
        follow: true,
        ..o
    };
    let start = std::time::Instant::now();
    cli::tail(&log, &o, &mut out, &mut || {
        start.elapsed() < std::time::Duration::from_millis(1200)
    })
    .unwrap();
    writer.join().unwrap();
    let text = String::from_utf8(out).unwrap();
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.contains("\"seq\":32"), "{text}");
    // report: per key and op
    let rows = cli::report(&log, None, None).unwrap();
    let total: u64 = rows.iter().map(|r| r.ok + r.failed).sum();
    assert_eq!(total, 31); // checkpoints are not counted
    let r = rows
        .iter()
        .find(|r| r.key == "payments-0" && r.op == "encrypt")
        .unwrap();
    assert_eq!((r.ok, r.failed), (2, 0)); // i = 0, 15
    let table = cli::render_report(&rows);
    assert!(table.lines().next().unwrap().starts_with("KEY"));
    // time bounds: everything is from today, nothing from the future
    let now = std::time::SystemTime::now();
    let since = cli::time_bound("1h", now).unwrap();
    let until = cli::time_bound("2999-01-01", now).unwrap();
    assert_eq!(cli::report(&log, Some(&since), Some(&until)).unwrap(), rows);
    assert!(cli::report(&log, Some(&until), None).unwrap().is_empty());
    assert!(cli::report(&log, None, Some(&since)).unwrap().is_empty());
    let _ = CKR_OK;
}

fn sha256(b: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(b).into()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn record_ref_writes_the_same_record_as_record() {
    let dir = tempfile::tempdir().unwrap();
    let (l1, l2) = (dir.path().join("a.log"), dir.path().join("b.log"));
    let open =
        |l: &std::path::Path| Auditor::open_with(&cfg(l, "deny"), None, Tuning::default()).unwrap();
    let (a, b) = (open(&l1), open(&l2));
    for i in 0..5 {
        let mut r = use_record(i);
        r.reason = (i % 2 == 0).then(|| format!("why \"{i}\"\n"));
        a.record(r.clone()).unwrap();
        b.record_ref(&r.view()).unwrap();
    }
    let strip = |l: &str| {
        let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
        v.as_object_mut().unwrap().remove("time");
        v.as_object_mut().unwrap().remove("prev");
        v
    };
    let (x, y) = (lines(&l1), lines(&l2));
    assert_eq!(x.len(), 5);
    for (p, q) in x.iter().zip(&y) {
        assert_eq!(strip(p), strip(q));
    }
    assert!(audit::verify(&l2, None).ok());
}
