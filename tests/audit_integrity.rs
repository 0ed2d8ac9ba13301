//! Audit integrity through the `cmkp11` command against a real SoftHSM2 token: quiet
//! success, `audit verify` that is read-only and says when it could not check the token
//! side, truncation and re-anchoring caught by writers and by verify, lifecycle steps that
//! fail closed, no leftovers of a killed `encrypt`.

mod cli_support;

use cli_support::*;
use std::path::{Path, PathBuf};

/// A token with the audit log on (`deny`), at `<dir>/audit.log`.
fn audited() -> (Env, PathBuf) {
    let env = Env::new();
    let log = env.path("audit.log");
    env.set_config(&format!(
        "[audit]\nfile = \"{}\"\non_failure = \"deny\"\n",
        log.display()
    ));
    (env, log)
}

/// Runs the command and asserts exit status 0 and an empty stderr.
fn quiet(env: &Env, args: &[&str]) -> String {
    let out = env.run(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "cmkp11 {args:?} failed ({}):\n{err}",
        out.status
    );
    assert!(
        err.is_empty(),
        "cmkp11 {args:?} succeeded but printed on stderr:\n{err}"
    );
    String::from_utf8(out.stdout).unwrap()
}

fn records(log: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn every_successful_command_is_quiet_and_leaves_the_log_authenticated() {
    let (env, log) = audited();
    std::fs::write(env.path("plain"), b"some data to protect").unwrap();
    let steps: &[&[&str]] = &[
        &["token", "list"],
        &["key", "create", "k1", "--role", "wrap"],
        &["key", "list"],
        &["key", "show", "k1"],
        &["encrypt", "--key", "k1", "plain", "plain.cmk"],
        &["decrypt", "plain.cmk", "plain.out"],
        &["key", "rotate", "k1"],
        &["key", "rotate", "--due"],
        &["key", "disable", "k1"],
        &["key", "enable", "k1"],
        &["key", "schedule-deletion", "k1", "--days", "7"],
        &["key", "cancel-deletion", "k1"],
        &["key", "purge"],
        &["--json", "key", "list"],
        &["audit", "tail", "-n", "3"],
        &["audit", "report"],
        &["audit", "verify"],
    ];
    for args in steps {
        quiet(&env, args);
    }
    assert_eq!(
        std::fs::read(env.path("plain.out")).unwrap(),
        b"some data to protect"
    );
    // every process left its records covered by a MAC: no unauthenticated tail, and no
    // checkpoint record that the token could not MAC
    let recs = records(&log);
    assert!(recs
        .iter()
        .all(|r| r["op"] != "checkpoint" || !r["mac"].is_null()));
    let v = env.json(&["audit", "verify"]);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["authenticated_through"], v["last_seq"], "{v}");
}

/// `audit verify --json` as (exit status, report).
fn verify(env: &Env) -> (i32, serde_json::Value) {
    let out = env.run(&["--json", "audit", "verify"]);
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "verify output: {e}\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap(), v)
}

/// Deletes the token's audit checkpoint object with SoftHSM2 directly (an insider with the
/// PIN and the token's own module).
fn destroy_checkpoint(env: &Env) {
    let out = std::process::Command::new("pkcs11-tool")
        .env("SOFTHSM2_CONF", &env.softhsm_conf)
        .args(["--module", SOFTHSM, "--login", "--pin", PIN])
        .args(["--delete-object", "--type", "data", "--label"])
        .arg("cmkp11:audit-checkpoint")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pkcs11-tool: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A token with a key and some audited history.
fn with_history() -> (Env, PathBuf) {
    let (env, log) = audited();
    env.ok(&["key", "create", "k1", "--role", "wrap"]);
    std::fs::write(env.path("plain"), b"data").unwrap();
    for i in 0..3 {
        env.ok(&["encrypt", "--key", "k1", "plain", &format!("c{i}")]);
    }
    (env, log)
}

#[test]
fn verify_is_read_only_and_says_when_it_could_not_use_the_token() {
    let (env, log) = with_history();
    let before = std::fs::read(&log).unwrap();
    let (code, v) = verify(&env);
    assert_eq!((code, &v["ok"]), (0, &serde_json::json!(true)), "{v}");
    assert_eq!(v["authenticated_through"], v["last_seq"], "{v}");
    assert_eq!(
        std::fs::read(&log).unwrap(),
        before,
        "verify appended to the log it verifies"
    );
    // no PIN: the chain is checked, the token side is not, and the status says so
    std::fs::rename(&env.pin_file, env.path("pin.away")).unwrap();
    let out = env.run(&["audit", "verify"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    contains(&text, "NOT checked");
    contains(&text, "exit status 3");
    contains(
        &String::from_utf8_lossy(&out.stderr),
        "checking without the token",
    );
    std::fs::rename(env.path("pin.away"), &env.pin_file).unwrap();
    assert_eq!(std::fs::read(&log).unwrap(), before);
}

fn cut_last_lines(log: &Path, n: usize) {
    let text = std::fs::read_to_string(log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let keep = &lines[..lines.len() - n];
    std::fs::write(log, format!("{}\n", keep.join("\n"))).unwrap();
}

#[test]
fn a_cut_log_stays_bad_after_later_writers() {
    let (env, log) = with_history();
    cut_last_lines(&log, 4);
    let (code, v) = verify(&env);
    assert_eq!(
        (code, v["problem"]["kind"].as_str()),
        (1, Some("truncated")),
        "{v}"
    );
    // a later writer finds the checkpointed record gone: it records the gap and never
    // moves the checkpoint over it silently
    env.ok(&["key", "list"]);
    env.ok(&["encrypt", "--key", "k1", "plain", "later"]);
    let gaps: Vec<_> = records(&log)
        .into_iter()
        .filter(|r| r["op"] == "audit-gap")
        .collect();
    assert_eq!(gaps.len(), 1, "{gaps:?}");
    contains(gaps[0]["reason"].as_str().unwrap(), "records were cut");
    let (code, v) = verify(&env);
    assert_eq!(
        (code, v["problem"]["kind"].as_str()),
        (1, Some("gap")),
        "{v}"
    );
    // ... also when the gap record itself is cut away with everything after it: the
    // token checkpoint keeps the gap
    let text = std::fs::read_to_string(&log).unwrap();
    let at = text.find("\"op\":\"audit-gap\"").unwrap();
    let line_start = text[..at].rfind('\n').map_or(0, |p| p + 1);
    std::fs::write(&log, &text[..line_start]).unwrap();
    env.ok(&["key", "list"]);
    let (code, v) = verify(&env);
    assert_eq!(
        (code, v["problem"]["kind"].as_str()),
        (1, Some("gap")),
        "{v}"
    );
}

#[test]
fn a_replayed_older_log_is_caught() {
    let (env, log) = with_history();
    let old = std::fs::read(&log).unwrap();
    env.ok(&["key", "disable", "k1"]);
    env.ok(&["key", "enable", "k1"]);
    std::fs::write(&log, &old).unwrap();
    let (code, v) = verify(&env);
    assert_eq!(
        (code, v["problem"]["kind"].as_str()),
        (1, Some("truncated")),
        "{v}"
    );
    env.ok(&["key", "list"]);
    let (code, v) = verify(&env);
    assert_eq!(
        (code, v["problem"]["kind"].as_str()),
        (1, Some("gap")),
        "{v}"
    );
}

#[test]
fn a_destroyed_checkpoint_is_caught_also_with_macs_stripped() {
    let (env, log) = with_history();
    let original = std::fs::read_to_string(&log).unwrap();
    destroy_checkpoint(&env);
    let (code, v) = verify(&env);
    assert_eq!(
        (code, v["problem"]["kind"].as_str()),
        (1, Some("checkpoint")),
        "{v}"
    );
    // the attacker also rewrites the log without MACs (recomputing the chain)
    let mut prev = "0".repeat(64);
    let mut out = String::new();
    for l in original.lines() {
        let mut r: serde_json::Value = serde_json::from_str(l).unwrap();
        r["prev"] = serde_json::Value::String(prev.clone());
        r["mac"] = serde_json::Value::Null;
        // serde_json keeps the field order of the record (preserve_order is not needed:
        // re-serializing sorts keys, which is still a line the chain can hash)
        let line = serde_json::to_string(&r).unwrap();
        use sha2::Digest;
        prev = sha2::Sha256::digest(line.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        out.push_str(&line);
        out.push('\n');
    }
    std::fs::write(&log, out).unwrap();
    let (code, v) = verify(&env);
    assert_eq!(code, 1, "{v}");
    // a writer after the destruction records it
    std::fs::write(&log, &original).unwrap();
    env.ok(&["key", "list"]);
    let (code, v) = verify(&env);
    assert_eq!(
        (code, v["problem"]["kind"].as_str()),
        (1, Some("gap")),
        "{v}"
    );
    contains(v["problem"]["detail"].as_str().unwrap(), "was destroyed");
}

#[test]
fn a_checkpointed_record_cut_by_one_byte_is_a_gap_for_the_next_writer() {
    let (env, log) = with_history();
    let data = std::fs::read(&log).unwrap();
    std::fs::write(&log, &data[..data.len() - 1]).unwrap();
    env.ok(&["key", "list"]);
    let (code, v) = verify(&env);
    assert_eq!(
        (code, v["problem"]["kind"].as_str()),
        (1, Some("gap")),
        "{v}"
    );
}

/// Hidden files of the directory (temporary files of `encrypt`/`decrypt`).
fn hidden(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect()
}

#[test]
fn a_killed_encrypt_leaves_no_temporary_file() {
    let (env, _log) = audited();
    env.ok(&["key", "create", "k1", "--role", "wrap"]);
    let out_dir = env.path("out");
    std::fs::create_dir(&out_dir).unwrap();
    // big enough that the kill lands while chunks are written
    let big = env.path("big");
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(256 << 20).unwrap();
    let mut killed = 0;
    for round in 0..3 {
        let dest = out_dir.join(format!("big{round}.cmk"));
        let mut child = env
            .command(&["encrypt", "--key", "k1", "big"])
            .arg(&dest)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // wait until output is being written, then kill
        let t0 = std::time::Instant::now();
        while t0.elapsed() < std::time::Duration::from_secs(20) {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            if writes_into(child.id(), &out_dir) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        std::thread::sleep(std::time::Duration::from_millis(100 * (round + 1)));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            killed += 1;
        }
        child.wait().unwrap();
        assert!(!dest.exists(), "a killed encrypt left its output");
        assert_eq!(hidden(&out_dir), Vec::<String>::new());
    }
    assert!(killed > 0, "no encrypt was killed mid-way");
    // a hidden temporary file left by an older build (a process that is gone) is removed
    // by the next output to the same name; one of a live process is left alone
    let stale = out_dir.join(".x.cmk.cmkp11-999999999-0000abcd.tmp");
    let live = out_dir.join(format!(".x.cmk.cmkp11-{}-0000abcd.tmp", std::process::id()));
    std::fs::write(&stale, b"partial").unwrap();
    std::fs::write(&live, b"partial").unwrap();
    std::fs::write(env.path("small"), b"small").unwrap();
    env.ok(&["encrypt", "--key", "k1", "small", "out/x.cmk"]);
    assert!(!stale.exists() && live.exists());
    env.ok(&["decrypt", "--force", "out/x.cmk", "small"]);
    assert_eq!(std::fs::read(env.path("small")).unwrap(), b"small");
}

/// Whether process `pid` has a file of `dir` open (its output being written).
fn writes_into(pid: u32, dir: &Path) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten()
        .any(|e| std::fs::read_link(e.path()).is_ok_and(|t| t.starts_with(dir)))
}

/// A 64 KiB tmpfs, unmounted on drop.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

fn tiny_tmpfs(dir: &Path) -> Option<Mount> {
    std::fs::create_dir_all(dir).unwrap();
    let out = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
        .arg(dir)
        .output()
        .ok()?;
    if out.status.success() {
        Some(Mount(dir.to_owned()))
    } else {
        eprintln!(
            "SKIP: cannot mount a tmpfs (needs root): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        None
    }
}

/// Fills the file system of `dir` completely (the file `dir/filler`), then lets `env`'s
/// logins use up the room left in the last page of the log until no record fits.
fn fill(env: &Env, dir: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(dir.join("filler")).unwrap();
    let block = [0u8; 1024];
    while f.write_all(&block).is_ok() {}
    let _ = f.sync_all();
    let log = dir.join("audit.log");
    let len = || std::fs::metadata(&log).unwrap().len();
    for _ in 0..40 {
        let before = len();
        env.ok(&["key", "list"]);
        if len() == before {
            return;
        }
    }
    panic!("the audit log still grows on a full file system");
}

/// A token whose audit log is on a tiny file system; the key `k1` exists.
fn audited_on_tmpfs() -> Option<(Env, PathBuf, Mount)> {
    let env = Env::new();
    let fs = env.path("fs");
    let m = tiny_tmpfs(&fs)?;
    let log = fs.join("audit.log");
    env.set_config(&format!(
        "[audit]\nfile = \"{}\"\non_failure = \"deny\"\n",
        log.display()
    ));
    env.ok(&["key", "create", "k1", "--role", "wrap"]);
    Some((env, log, m))
}

#[test]
fn lifecycle_steps_fail_closed_when_the_audit_log_is_full() {
    let Some((env, log, _m)) = audited_on_tmpfs() else {
        return;
    };
    let fs = log.parent().unwrap().to_owned();
    fill(&env, &fs);
    let records_before = records(&log).len();
    let refused = |args: &[&str]| {
        let out = env.run(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
        let text = String::from_utf8(out.stderr).unwrap();
        // the library's log line says it too; the command's own message comes last
        let err = text.lines().last().unwrap_or_default();
        assert!(err.starts_with("cmkp11: token `cli-test`: "), "{text}");
        contains(err, "the audit log cannot be written");
        contains(err, "No space left on device");
        contains(err, "nothing was changed");
    };
    refused(&["key", "create", "k2", "--role", "data"]);
    refused(&["key", "create", "s1", "--type", "ec-p256"]);
    refused(&["key", "rotate", "k1"]);
    refused(&["key", "disable", "k1"]);
    refused(&["key", "schedule-deletion", "k1", "--days", "3"]);
    // nothing happened
    let list = env.json(&["key", "list"]);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["k1"], "{list}");
    let k1 = env.show("k1");
    assert_eq!(
        (&k1["state"], &k1["primary"]),
        (&"enabled".into(), &1.into()),
        "{k1}"
    );
    assert_eq!(records(&log).len(), records_before);

    // space is back: the same steps are made, each after its intent
    std::fs::remove_file(fs.join("filler")).unwrap();
    env.ok(&["key", "rotate", "k1"]);
    env.ok(&["key", "disable", "k1"]);
    let recs = records(&log);
    let ops: Vec<(&str, &str)> = recs
        .iter()
        .skip(records_before)
        .map(|r| {
            (
                r["op"].as_str().unwrap(),
                r["reason"].as_str().unwrap_or(""),
            )
        })
        .filter(|(op, _)| !matches!(*op, "login" | "checkpoint" | "audit-lost"))
        .collect();
    assert_eq!(
        ops,
        [
            ("intent", "rotate"),
            ("rotate", ""),
            ("intent", "disable"),
            ("disable", "")
        ]
    );
    let (code, v) = verify(&env);
    assert_eq!(code, 0, "{v}");
}

/// The PKCS#11 side of the same: a child process (this test binary again) loads the
/// module with the audit log on a full file system.
#[test]
fn pkcs11_lifecycle_calls_fail_closed_when_the_audit_log_is_full() {
    if std::env::var("CMKP11_TEST_CHILD").as_deref() == Ok("full") {
        return pkcs11_child();
    }
    let Some((env, log, _m)) = audited_on_tmpfs() else {
        return;
    };
    fill(&env, log.parent().unwrap());
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "pkcs11_lifecycle_calls_fail_closed_when_the_audit_log_is_full",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("CMKP11_TEST_CHILD", "full")
        .env("SOFTHSM2_CONF", &env.softhsm_conf)
        .env("CMKP11_CONFIG", &env.config)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    contains(&text, "child: all refused");
    // the log names why, one line per refusal
    contains(&text, "refused: the audit log cannot be written");
    let k1 = env.show("k1");
    assert_eq!(k1["state"], "enabled", "{k1}");
}

/// The module under test (`libcmkp11.so` beside the test binaries), initialized, with a
/// logged-in read-write session on the only token.
fn module_session() -> (cryptoki::context::Pkcs11, cryptoki::session::Session) {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::session::UserType;
    use cryptoki::types::AuthPin;
    let module = std::env::var("CMKP11_TEST_MODULE")
        .ok()
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| {
            let exe = std::env::current_exe().unwrap();
            let dir = exe.parent().unwrap().parent().unwrap();
            dir.join("libcmkp11.so").display().to_string()
        });
    let p = Pkcs11::new(module).unwrap();
    p.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    let slot = p.get_slots_with_token().unwrap()[0];
    let s = p.open_rw_session(slot).unwrap();
    s.login(UserType::User, Some(&AuthPin::new(PIN.into())))
        .unwrap();
    (p, s)
}

/// Runs this test binary again as a child doing `role` (see the tests that dispatch on
/// `CMKP11_TEST_CHILD`), with `env`'s token and configuration.
fn child(env: &Env, test: &str, role: &str, log: &Path) -> std::process::Command {
    let mut c = std::process::Command::new(std::env::current_exe().unwrap());
    c.args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env("CMKP11_TEST_CHILD", role)
        .env("CMKP11_TEST_LOG", log)
        .env("SOFTHSM2_CONF", &env.softhsm_conf)
        .env("CMKP11_CONFIG", &env.config);
    c
}

fn pkcs11_child() {
    use cryptoki::error::{Error, RvError};
    use cryptoki::mechanism::Mechanism;
    use cryptoki::object::{Attribute, ObjectClass};
    let (_p, s) = module_session();
    let failed = |r: Result<_, Error>, what: &str| match r {
        Err(Error::Pkcs11(RvError::FunctionFailed, _)) => {}
        other => panic!("{what}: {other:?}"),
    };
    let token_key = [
        Attribute::Token(true),
        Attribute::Label(b"k-new".to_vec()),
        Attribute::ValueLen(32.into()),
        Attribute::Wrap(true),
        Attribute::Unwrap(true),
    ];
    failed(
        s.generate_key(&Mechanism::AesKeyGen, &token_key).map(drop),
        "C_GenerateKey of a token key",
    );
    let find = |label: &[u8]| s.find_objects(&[Attribute::Label(label.to_vec())]).unwrap();
    assert!(find(b"k-new").is_empty(), "the key was made");
    let ec = cryptoki::mechanism::Mechanism::EccKeyPairGen;
    let p256 = vec![0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    failed(
        s.generate_key_pair(
            &ec,
            &[Attribute::EcParams(p256), Attribute::Token(false)],
            &[
                Attribute::Token(true),
                Attribute::Label(b"s-new".to_vec()),
                Attribute::Sign(true),
            ],
        )
        .map(drop),
        "C_GenerateKeyPair of a token private key",
    );
    assert!(find(b"s-new").is_empty(), "the key pair was made");
    let k1 = find(b"k1");
    assert_eq!(k1.len(), 1);
    assert!(s
        .find_objects(&[Attribute::Class(ObjectClass::SECRET_KEY)])
        .unwrap()
        .contains(&k1[0]));
    failed(s.destroy_object(k1[0]), "C_DestroyObject of a CMK");
    println!("child: all refused");
}

/// Runs `c` and returns its output, or fails if it has not ended within `secs` (killed).
fn output_within(mut c: std::process::Command, secs: u64) -> std::process::Output {
    let child = c
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(std::time::Duration::from_secs(secs)) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
            panic!("{c:?} blocked for more than {secs} s");
        }
    }
}

/// An attacker (or a stopped process) holds the audit lock forever: the others' logins
/// and key uses are delayed once by the lock's time limit, then go on, and the log stays
/// one chain.
#[test]
fn a_process_holding_the_audit_lock_forever_blocks_nobody() {
    if std::env::var("CMKP11_TEST_CHILD").as_deref() == Ok("hostage") {
        let log = PathBuf::from(std::env::var("CMKP11_TEST_LOG").unwrap());
        // as a writer would (making the lock if nobody uses one now), then never lets go
        let mut lf = cmkp11::audit::sink::LogFile::open(&log).expect("the log");
        assert!(lf.uses_lock_file());
        let _g = lf.lock().expect("lock");
        println!("locked");
        use std::io::Write;
        std::io::stdout().flush().unwrap();
        std::thread::sleep(std::time::Duration::from_secs(300));
        return;
    }
    let (env, log) = with_history();
    // a long-lived writer keeps the lock segment alive while the hostage takes it
    let mut hostage = child(
        &env,
        "a_process_holding_the_audit_lock_forever_blocks_nobody",
        "hostage",
        &log,
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::inherit())
    .spawn()
    .unwrap();
    let mut hostage_out = std::io::BufReader::new(hostage.stdout.take().unwrap());
    let hostage = Killed(hostage);
    wait_for_line(&mut hostage_out, "locked");
    let t = std::time::Instant::now();
    let out = output_within(env.command(&["key", "list"]), 30);
    assert!(out.status.success(), "{out:?}");
    let out = output_within(
        env.command(&["encrypt", "--key", "k1", "plain", "held"]),
        30,
    );
    assert!(out.status.success(), "{out:?}");
    let out = output_within(env.command(&["key", "rotate", "k1"]), 30);
    assert!(out.status.success(), "{out:?}");
    println!("3 commands beside a lock held forever: {:?}", t.elapsed());
    let (code, v) = verify(&env);
    drop(hostage);
    assert_eq!(code, 0, "{v}");
    let ops: Vec<String> = records(&log)
        .iter()
        .map(|r| r["op"].as_str().unwrap().to_owned())
        .collect();
    assert!(ops.iter().any(|o| o == "rotate"), "{ops:?}");
}

/// The lock file is truncated (and then overwritten) while a process logs in and out
/// through the module (each a record): that process is not killed (no `SIGBUS`), every
/// login is recorded, and the log stays one chain.
#[test]
fn a_truncated_lock_file_kills_no_writer() {
    if std::env::var("CMKP11_TEST_CHILD").as_deref() == Ok("user") {
        use cryptoki::session::UserType;
        use cryptoki::types::AuthPin;
        let (_p, s) = module_session();
        let start = std::time::Instant::now();
        let mut n = 0u64;
        // every login and logout is a record (and a logout a MACed checkpoint)
        while start.elapsed() < std::time::Duration::from_secs(4) {
            s.logout().unwrap();
            s.login(UserType::User, Some(&AuthPin::new(PIN.into())))
                .unwrap();
            n += 1;
            if n == 5 {
                println!("running");
                use std::io::Write;
                std::io::stdout().flush().unwrap();
            }
        }
        println!("logins {n}");
        return;
    }
    let (env, log) = audited();
    env.ok(&["key", "create", "d1", "--role", "data"]);
    let mut user = child(&env, "a_truncated_lock_file_kills_no_writer", "user", &log)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(user.stdout.take().unwrap());
    wait_for_line(&mut out, "running");
    let lp = cmkp11::audit::sink::lock_path(&log);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&lp)
        .unwrap()
        .set_len(0)
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    std::fs::write(&lp, b"garbage").unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    let status = user.wait().unwrap();
    assert!(status.success(), "the writer died: {status:?}\n{rest}");
    let logins: u64 = rest
        .lines()
        .find_map(|l| l.strip_prefix("logins "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("{rest}"));
    let (code, v) = verify(&env);
    assert_eq!(code, 0, "{v}");
    let recorded = records(&log)
        .iter()
        .filter(|r| r["op"] == "login" && r["session"].as_u64().is_some())
        .count() as u64;
    // the child's first login, its logins in the loop, and the command's own
    assert_eq!(recorded, logins + 2);
}

/// Reads lines of a child's output until one is `want` (the test harness prints its own).
fn wait_for_line(r: &mut impl std::io::BufRead, want: &str) {
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap() == 0 {
            panic!("the child ended without `{want}`:\n{seen}");
        }
        // (the harness's "test NAME ... " may precede it on the same line)
        if line.trim_end().ends_with(want) {
            return;
        }
        seen.push_str(&line);
    }
}

/// A child process killed when the test ends (also when it fails).
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
