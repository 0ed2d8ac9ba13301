//! Audit log rotation (`cmkp11 audit rotate`) and what logrotate may do to the log
//! (rename, `copytruncate`), through the `cmkp11` command and the built module over a
//! SoftHSM2 token: a process keeps using a CMK while the log is rotated under it; every
//! use is recorded exactly once in the series of files, which verifies as a whole and file
//! by file; a missing or misplaced file is named; a log truncated in place is explained.
//!
//! The writer processes are this test binary itself, started with `ROT_CHILD` set and
//! filtered to [`child_writer`].

mod cli_support;
mod common;

use cli_support::{contains, Env};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Entry point of the writer processes (does nothing unless started by the tests below).
/// Uses the CMK `k` for `ROT_OPS` AES-GCM encryptions, in phases separated by a line on
/// stdin when `ROT_PHASES` > 1 (it prints `phase N` and waits), then prints `done`.
#[test]
fn child_writer() {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::mechanism::aead::GcmParams;
    use cryptoki::mechanism::Mechanism;
    use cryptoki::object::{Attribute, ObjectClass};
    use cryptoki::session::UserType;
    use cryptoki::types::AuthPin;
    if std::env::var_os("ROT_CHILD").is_none() {
        return;
    }
    let ops: u64 = std::env::var("ROT_OPS").unwrap().parse().unwrap();
    let phases: u64 = std::env::var("ROT_PHASES")
        .map(|p| p.parse().unwrap())
        .unwrap_or(1);
    let p = Pkcs11::new(common::module_path()).unwrap();
    p.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    let slot = p.get_slots_with_token().unwrap()[0];
    let s = p.open_rw_session(slot).unwrap();
    s.login(UserType::User, Some(&AuthPin::new(cli_support::PIN.into())))
        .unwrap();
    let key = s
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(b"k".to_vec()),
        ])
        .unwrap()[0];
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    for i in 0..ops {
        if phases > 1 && i > 0 && i % (ops / phases) == 0 {
            writeln!(out, "phase {}", i / (ops / phases)).unwrap();
            out.flush().unwrap();
            let mut l = String::new();
            stdin.lock().read_line(&mut l).unwrap();
        }
        let mut iv = [0u8; 12];
        iv[..8].copy_from_slice(&i.to_be_bytes());
        let params = GcmParams::new(&mut iv, b"", 128.into()).unwrap();
        s.encrypt(&Mechanism::AesGcm(params), key, b"rotation")
            .unwrap_or_else(|e| panic!("encrypt {i}: {e}"));
    }
    drop(s);
    p.finalize().unwrap();
    writeln!(out, "done").unwrap();
}

/// A token with the CMK `k` and the audit log `audit.log` in the test directory.
fn setup() -> (Env, PathBuf) {
    let env = Env::new();
    let log = env.path("audit.log");
    env.set_config(&format!("[audit]\nfile = \"{}\"\n", log.display()));
    env.ok(&["key", "create", "k", "--role", "data"]);
    (env, log)
}

fn writer(env: &Env, ops: u64, phases: u64) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_writer", "--nocapture", "--test-threads=1"])
        .env("ROT_CHILD", "1")
        .env("ROT_OPS", ops.to_string())
        .env("ROT_PHASES", phases.to_string())
        .env("SOFTHSM2_CONF", &env.softhsm_conf)
        .env("CMKP11_CONFIG", &env.config)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// Reads the child's stdout up to a line starting with `want`.
fn expect_line(r: &mut impl BufRead, want: &str) {
    let mut l = String::new();
    loop {
        l.clear();
        assert!(
            r.read_line(&mut l).unwrap() > 0,
            "child ended before `{want}`"
        );
        if l.contains(want) {
            return;
        }
    }
}

/// The records of `files` (JSON lines).
fn records(files: &[&Path]) -> Vec<serde_json::Value> {
    files
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect::<Vec<serde_json::Value>>()
        })
        .collect()
}

fn encrypts(recs: &[serde_json::Value]) -> usize {
    recs.iter()
        .filter(|r| r["op"] == "encrypt" && r["key"] == "k" && r["result"] == "CKR_OK")
        .count()
}

/// `cmkp11 audit verify ARGS`: exit status and stdout.
fn verify(env: &Env, args: &[&str]) -> (i32, String) {
    let mut a = vec!["audit", "verify"];
    a.extend_from_slice(args);
    let out = env.run(&a);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn rotate(env: &Env, to: &Path) -> serde_json::Value {
    let out = env.ok(&["audit", "rotate", "--json", "--to", to.to_str().unwrap()]);
    serde_json::from_str(&out).unwrap()
}

fn waits_for_records(log: &Path, n: usize, child: &mut Child) {
    let t = Instant::now();
    while std::fs::read_to_string(log).map_or(0, |s| s.lines().count()) < n {
        assert!(
            child.try_wait().unwrap().is_none(),
            "writer ended too early"
        );
        assert!(t.elapsed() < Duration::from_secs(120), "no records");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn rotating_under_a_busy_writer_loses_and_repeats_nothing() {
    const OPS: u64 = 3000;
    let (env, log) = setup();
    let mut child = writer(&env, OPS, 1);
    let (a, b) = (env.path("audit.log.1"), env.path("audit.log.2"));
    waits_for_records(&log, 300, &mut child);
    let r1 = rotate(&env, &a);
    assert_eq!(r1["maced"], true, "{r1}");
    waits_for_records(&log, 300, &mut child);
    let r2 = rotate(&env, &b);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "writer: {out:?}");
    assert!(
        std::fs::metadata(&b).unwrap().len() > 0
            && child_wrote_after(&log, r2["opened_at"].as_u64().unwrap()),
        "the writer went on in the new file"
    );

    // Every use exactly once in the series, which verifies end to end.
    let recs = records(&[&a, &b, &log]);
    assert_eq!(encrypts(&recs), OPS as usize);
    for (i, r) in recs.iter().enumerate() {
        assert_eq!(r["seq"].as_u64().unwrap(), i as u64 + 1, "seq of {r}");
    }
    let (code, text) = verify(&env, &["--series"]);
    assert_eq!(code, 0, "{text}");
    contains(&text, "in 3 files");
    contains(&text, "closed by rotation");
    let (code, text) = verify(
        &env,
        &[
            a.to_str().unwrap(),
            b.to_str().unwrap(),
            log.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{text}");
    // Each file verifies as itself, also under another name.
    for f in [&a, &b, &log] {
        let (code, text) = verify(&env, &["--file", f.to_str().unwrap()]);
        assert_eq!(code, 0, "{}: {text}", f.display());
    }
    let elsewhere = env.path("kept");
    std::fs::create_dir(&elsewhere).unwrap();
    let renamed = elsewhere.join("old-audit.log");
    std::fs::rename(&a, &renamed).unwrap();
    let (code, text) = verify(&env, &["--file", renamed.to_str().unwrap()]);
    assert_eq!(code, 0, "{text}");
    contains(&text, "closed by `cmkp11 audit rotate`");

    // A missing middle file, and files out of order, are named.
    let (code, text) = verify(&env, &[renamed.to_str().unwrap(), log.to_str().unwrap()]);
    assert_eq!(code, 1, "{text}");
    contains(&text, "deleted");
    contains(&text, "a file of the series is missing");
    let (code, text) = verify(
        &env,
        &[
            b.to_str().unwrap(),
            renamed.to_str().unwrap(),
            log.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 1, "{text}");
    contains(&text, "reordered");
    contains(&text, "out of order");
    // --series finds the files next to the log: without the first it starts at the
    // second (a rotated file verifies as itself); without the middle one it fails.
    let (code, text) = verify(&env, &["--series"]);
    assert_eq!(code, 0, "{text}");
    contains(&text, "in 2 files");
    std::fs::rename(&renamed, &a).unwrap();
    std::fs::rename(&b, elsewhere.join("b")).unwrap();
    let (code, text) = verify(&env, &["--series"]);
    assert_eq!(code, 1, "{text}");
    contains(&text, "a file of the series is missing");
}

/// Whether a record after `seq` in `log` was written by the writer (not by rotate).
fn child_wrote_after(log: &Path, seq: u64) -> bool {
    records(&[log])
        .iter()
        .any(|r| r["seq"].as_u64().unwrap() > seq && r["op"] == "encrypt")
}

#[test]
fn copytruncate_is_explained_and_the_copy_completes_the_series() {
    const OPS: u64 = 400;
    let (env, log) = setup();
    let mut child = writer(&env, OPS, 2);
    let mut lines = BufReader::new(child.stdout.take().unwrap());
    expect_line(&mut lines, "phase 1");
    // What logrotate's copytruncate does, while the writer waits.
    let copy = env.path("audit.log.1");
    std::fs::copy(&log, &copy).unwrap();
    let n = records(&[&copy]).len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&log)
        .unwrap()
        .set_len(0)
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    writeln!(child.stdin.as_mut().unwrap(), "go").unwrap();
    expect_line(&mut lines, "done");
    assert!(child.wait().unwrap().success());

    let recs = records(&[&copy, &log]);
    assert_eq!(encrypts(&recs), OPS as usize);
    assert_eq!(recs[n]["op"], "log-continue", "{}", recs[n]);
    // The live log alone: the truncation is named and explained, not "modified".
    let (code, text) = verify(&env, &[]);
    assert_eq!(code, 1, "{text}");
    contains(
        &text,
        &format!(
            "the log was truncated in place (copytruncate?) at record {n}; use `cmkp11 audit \
             rotate`"
        ),
    );
    assert!(!text.contains("modified"), "{text}");
    // With the copy: one series, a note.
    for args in [
        vec![copy.to_str().unwrap(), log.to_str().unwrap()],
        vec!["--series"],
    ] {
        let (code, text) = verify(&env, &args);
        assert_eq!(code, 0, "{args:?}: {text}");
        contains(&text, "truncated in place (copytruncate?)");
    }
    // Records written between the copy and the truncation are named as lost.
    let cut = env.path("cut.log");
    let text = std::fs::read_to_string(&copy).unwrap();
    let keep: Vec<&str> = text.lines().take(n - 3).collect();
    std::fs::write(&cut, keep.join("\n") + "\n").unwrap();
    let (code, text) = verify(&env, &[cut.to_str().unwrap(), log.to_str().unwrap()]);
    assert_eq!(code, 1, "{text}");
    contains(
        &text,
        "were written between the copy and the truncation and are lost",
    );
    // After a rotation the live log verifies alone again.
    rotate(&env, &env.path("audit.log.2"));
    let (code, text) = verify(&env, &[]);
    assert_eq!(code, 0, "{text}");
}

#[test]
fn logrotate_rename_then_rotate_renamed_closes_the_old_file() {
    const OPS: u64 = 400;
    let (env, log) = setup();
    let mut child = writer(&env, OPS, 2);
    let mut lines = BufReader::new(child.stdout.take().unwrap());
    expect_line(&mut lines, "phase 1");
    // logrotate with nocreate renames the log, then its postrotate script runs
    let old = env.path("audit.log.1");
    std::fs::rename(&log, &old).unwrap();
    let out = env.ok(&["audit", "rotate", "--renamed", old.to_str().unwrap()]);
    contains(&out, "rotated");
    writeln!(child.stdin.as_mut().unwrap(), "go").unwrap();
    expect_line(&mut lines, "done");
    assert!(child.wait().unwrap().success());
    let recs = records(&[&old, &log]);
    assert_eq!(encrypts(&recs), OPS as usize);
    let (code, text) = verify(&env, &["--series"]);
    assert_eq!(code, 0, "{text}");
    for f in [&old, &log] {
        let (code, text) = verify(&env, &["--file", f.to_str().unwrap()]);
        assert_eq!(code, 0, "{}: {text}", f.display());
    }
    // A plain rename with nobody closing the old file: the writer goes on in a new file
    // chained to it; the series verifies.
    let mut child = writer(&env, OPS, 2);
    let mut lines = BufReader::new(child.stdout.take().unwrap());
    expect_line(&mut lines, "phase 1");
    let older = env.path("audit.log.2");
    std::fs::rename(&log, &older).unwrap();
    std::fs::write(&log, b"").unwrap(); // logrotate's `create`
    std::thread::sleep(Duration::from_millis(300));
    writeln!(child.stdin.as_mut().unwrap(), "go").unwrap();
    expect_line(&mut lines, "done");
    assert!(child.wait().unwrap().success());
    let recs = records(&[&old, &older, &log]);
    assert_eq!(encrypts(&recs), 2 * OPS as usize);
    let (code, text) = verify(
        &env,
        &[
            old.to_str().unwrap(),
            older.to_str().unwrap(),
            log.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{text}");
    contains(&text, "renamed or removed after record");
}
