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
