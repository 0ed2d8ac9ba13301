//! A full file system: `on_failure = "deny"` refuses (record() fails) and leaves no partial
//! line; `"allow"` keeps going; once space is back an `audit-lost` record counts the loss
//! and the log verifies. Needs root to mount a 64 KiB tmpfs; prints SKIP otherwise.

mod audit_support;

use audit_support::*;
use cmkp11::audit::{self, Auditor, TokenMac, Tuning};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

const CKR_FUNCTION_FAILED: u64 = 6;

struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn mount_tiny_tmpfs(dir: &Path) -> Option<Mount> {
    let out = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
        .arg(dir)
        .output()
        .ok()?;
    if out.status.success() {
        Some(Mount(dir.to_owned()))
    } else {
        eprintln!(
            "SKIP audit_full_fs: cannot mount a tmpfs (needs root): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        None
    }
}

#[test]
fn full_filesystem_denies_then_allows() {
    let outer = tempfile::tempdir().unwrap();
    let fs = outer.path().join("fs");
    std::fs::create_dir(&fs).unwrap();
    let Some(_m) = mount_tiny_tmpfs(&fs) else {
        return;
    };
    let log = fs.join("audit.log");
    // the token double keeps its checkpoint outside the full file system
    let mac = SoftMac::for_log(&outer.path().join("token"));
    let open = |mode: &str| {
        Auditor::open_with(
            &cfg(&log, mode),
            Some(mac.clone() as Arc<dyn TokenMac>),
            Tuning {
                checkpoint_records: 16,
                ..Tuning::default()
            },
        )
        .unwrap()
    };
    // leave ~4 KiB free (the audit lock file takes one page of the 64)
    let deny = open("deny");
    assert!(audit::sink::lock_path(&log).exists());
    std::fs::write(fs.join("filler"), vec![0u8; 54 * 1024]).unwrap();
    let mut ok = 0;
    let mut refused = 0;
    for i in 0..200 {
        match deny.record(use_record(i)) {
            Ok(()) => ok += 1,
            Err(rv) => {
                assert_eq!(rv, CKR_FUNCTION_FAILED);
                refused += 1;
            }
        }
    }
    assert!(ok > 0 && refused > 0, "ok {ok}, refused {refused}");
    assert_eq!(deny.failures(), refused);
    // no partial line: the failed writes were cut back
    let r = audit::verify(&log, Some(&*mac));
    assert!(r.notes.iter().all(|n| !n.contains("torn")), "{r}");
    assert_eq!(r.problem, None, "{r}");
    let records = r.records;
    assert_eq!(records, ok);

    // allow: the operation goes on, the failure is counted
    let allow = open("allow");
    for i in 0..20 {
        assert_eq!(allow.record(use_record(i)), Ok(()));
    }
    assert_eq!(allow.failures(), 20);
    assert_eq!(lines(&log).len() as u64, records);

    // space is back: the next record is preceded by one that counts what was lost
    std::fs::remove_file(fs.join("filler")).unwrap();
    allow.record(use_record(0)).unwrap();
    deny.record(use_record(1)).unwrap();
    drop(allow);
    drop(deny);
    let l = lines(&log);
    let lost: Vec<serde_json::Value> = l
        .iter()
        .map(|x| serde_json::from_str::<serde_json::Value>(x).unwrap())
        .filter(|v| v["op"] == "audit-lost")
        .collect();
    assert_eq!(lost.len(), 2, "{l:#?}");
    let reasons: Vec<&str> = lost.iter().map(|v| v["reason"].as_str().unwrap()).collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.starts_with("20 record(s) lost: write ")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.starts_with(&format!("{refused} record(s) lost: write "))),
        "{reasons:?}"
    );
    assert!(lost.iter().all(|v| v["result"] == "CKR_FUNCTION_FAILED"));
    let r = audit::verify(&log, Some(&*mac));
    assert!(r.ok(), "{r}");
    assert_eq!(r.authenticated_through, Some(r.last_seq), "{r}");
}
