//! Rotation as one atomic step (issue 13, items 6 and 7), through the `cmkp11` command
//! over a real SoftHSM2 token:
//! - two processes rotating one key at the same time, many rounds, never give two
//!   versions one number, and every rotation reported done is there;
//! - a token directory turning read-only at any point of a rotation leaves a rotation
//!   that is either done and reported done, or not done and reported not done (exit
//!   status, the audit record and the key's versions agree).

mod cli_support;

use cli_support::Env;
use std::path::PathBuf;
use std::process::Command;

fn versions(env: &Env, name: &str) -> Vec<u64> {
    env.show(name)["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect()
}

#[test]
fn concurrent_rotations_never_duplicate_a_version() {
    let env = Env::new();
    env.ok(&["key", "create", "race", "--role", "wrap"]);
    const ROUNDS: usize = 12;
    let rotators: Vec<_> = (0..2)
        .map(|_| {
            let mut c = env.command(&["key", "rotate", "race"]);
            let script = format!(
                "ok=0; for i in $(seq {ROUNDS}); do \"$0\" \"$@\" >/dev/null 2>>err.log && ok=$((ok+1)); done; echo $ok"
            );
            let program = c.get_program().to_owned();
            let args: Vec<_> = c.get_args().map(|a| a.to_owned()).collect();
            let mut sh = Command::new("sh");
            sh.arg("-c").arg(script).arg(program).args(args);
            for (k, v) in c.get_envs() {
                if let Some(v) = v {
                    sh.env(k, v);
                }
            }
            c = sh;
            c.current_dir(env.dir()).env_remove("CMKP11_TEST_RO_AFTER");
            c.stdout(std::process::Stdio::piped()).spawn().expect("spawn rotator")
        })
        .collect();
    let mut done = 0;
    for r in rotators {
        let out = r.wait_with_output().unwrap();
        assert!(out.status.success());
        done += String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<usize>()
            .unwrap();
    }
    // SoftHSM2 itself may make a process starting beside a login see no token for a
    // moment (it rewrites token.object at every C_Login): such a run rotates nothing and
    // says so. Every rotation reported done must be there, under its own number.
    let errors = std::fs::read_to_string(env.path("err.log")).unwrap_or_default();
    assert!(
        done >= ROUNDS,
        "only {done} rotations reported done:\n{errors}"
    );
    let got = versions(&env, "race");
    let want: Vec<u64> = (1..=(1 + done as u64)).collect();
    assert_eq!(got, want, "versions after {done} concurrent rotations");
    // The key still works with every version (an envelope made now opens).
    std::fs::write(env.path("plain"), b"after the race").unwrap();
    env.ok(&["encrypt", "--key", "race", "plain", "sealed"]);
    env.ok(&["decrypt", "sealed", "opened"]);
    assert_eq!(
        std::fs::read(env.path("opened")).unwrap(),
        b"after the race"
    );
}

/// Builds the read-only shim (tests/c/readonly_shim.c) into `dir`.
fn shim(dir: &std::path::Path) -> PathBuf {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/c/readonly_shim.c");
    let out = dir.join("readonly_shim.so");
    let st = Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(&out)
        .arg(&src)
        .arg("-ldl")
        .status()
        .expect("run cc");
    assert!(st.success(), "cc readonly_shim.c");
    out
}

#[test]
fn a_rotation_is_done_and_reported_done_or_neither() {
    let env = Env::new();
    let log = env.path("audit.log");
    env.set_config(&format!("[audit]\nfile = \"{}\"\n", log.display()));
    env.ok(&["key", "create", "ro", "--role", "wrap"]);
    let so = shim(env.dir());
    let mut outcomes = Vec::new();
    // The token turns read-only after 0, 1, 2 ... new objects of the rotation.
    for after in 0..6 {
        let before = versions(&env, "ro");
        let records_before = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .count();
        let out = env
            .command(&["key", "rotate", "ro"])
            .env("LD_PRELOAD", &so)
            .env("CMKP11_TEST_RO_AFTER", after.to_string())
            .output()
            .unwrap();
        let now = versions(&env, "ro");
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let rotate_records: Vec<&str> = text
            .lines()
            .skip(records_before)
            .filter(|l| l.contains("\"op\":\"rotate\""))
            .collect();
        let reported_done = out.status.success();
        let happened = now.len() == before.len() + 1;
        assert!(
            now.len() == before.len() || happened,
            "after {after}: versions {before:?} -> {now:?}"
        );
        assert_eq!(
            reported_done,
            happened,
            "after {after} new objects: exit {} but versions {before:?} -> {now:?}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            rotate_records.len(),
            1,
            "after {after}: rotate records {rotate_records:?}"
        );
        assert_eq!(
            rotate_records[0].contains("\"result\":\"CKR_OK\""),
            happened,
            "after {after}: audit record {} but rotation happened: {happened}",
            rotate_records[0]
        );
        outcomes.push(happened);
    }
    assert!(
        outcomes.contains(&false),
        "the read-only token never stopped a rotation"
    );
    assert!(
        outcomes.contains(&true),
        "no rotation got through: {outcomes:?}"
    );
}
