//! `cmkp11 audit ...` argument parsing and exit codes, through the subcommand module the
//! binary mounts (compiled here directly so it is tested before and after mounting).

mod audit_support;

#[path = "../src/bin/cmkp11/audit.rs"]
mod audit_cmd;

use audit_cmd::{AuditArgs, AuditCmd};
use audit_support::*;
use clap::Parser;
use cmkp11::audit::TokenMac;
use cmkp11::config::Config;
use std::sync::Arc;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Top,
}

#[derive(clap::Subcommand)]
enum Top {
    Audit(AuditArgs),
}

fn parse(args: &[&str]) -> AuditArgs {
    let mut v = vec!["cmkp11", "audit"];
    v.extend_from_slice(args);
    match Cli::try_parse_from(v).unwrap().cmd {
        Top::Audit(a) => a,
    }
}

#[test]
fn arguments() {
    match parse(&["tail", "-f", "--key", "payments", "--json", "-n", "3"]).cmd {
        AuditCmd::Tail {
            follow,
            key,
            json,
            lines,
            file,
        } => {
            assert!(follow && json && file.is_none());
            assert_eq!((key.as_deref(), lines), (Some("payments"), 3));
        }
        c => panic!("{c:?}"),
    }
    match parse(&["report", "--since", "24h", "--until", "2026-12-01"]).cmd {
        AuditCmd::Report { since, until, .. } => {
            assert_eq!(
                (since.as_deref(), until.as_deref()),
                (Some("24h"), Some("2026-12-01"))
            );
        }
        c => panic!("{c:?}"),
    }
    assert!(matches!(
        parse(&["verify", "--file", "/x"]).cmd,
        AuditCmd::Verify {
            file: Some(_),
            json: false,
            ..
        }
    ));
    assert!(Cli::try_parse_from(["cmkp11", "audit", "frobnicate"]).is_err());
}

#[test]
fn verify_exit_codes_and_one_byte_edit() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.log");
    let mac = SoftMac::for_log(&log);
    let a = auditor(&log, &mac, 8);
    for i in 0..20 {
        a.record(use_record(i)).unwrap();
    }
    drop(a);
    let mut cfg = Config::default();
    cfg.audit.file = Some(log.clone());
    let token = || Some(mac.clone() as Arc<dyn TokenMac>);
    let run = |args: &[&str], cfg: &Config, mac: Option<Arc<dyn TokenMac>>| {
        let mut out = Vec::new();
        let r = audit_cmd::run_to(parse(args), cfg, mac, &mut out);
        (r, String::from_utf8(out).unwrap())
    };
    let (r, out) = run(&["verify"], &cfg, token());
    assert_eq!(r, Ok(0), "{out}");
    assert!(
        out.contains(": OK: 21 records, chain intact through seq 21"),
        "{out}"
    );
    assert!(out.contains("authenticated through seq 21"), "{out}");
    // without the token: the chain is intact, but that is not a verified log (13.11)
    let (r, out) = run(&["verify"], &cfg, None);
    assert_eq!(r, Ok(audit_cmd::NOT_AUTHENTICATED));
    assert!(out.contains("warning: no token"), "{out}");
    // one byte
    let mut data = std::fs::read(&log).unwrap();
    let at = data.windows(6).position(|w| w == b"\"slot\"").unwrap() + 7;
    assert_eq!(data[at], b'0');
    assert_eq!(data[at], b'0');
    data[at] = b'7';
    std::fs::write(&log, &data).unwrap();
    let (r, out) = run(&["verify"], &cfg, token());
    assert_eq!(r, Ok(1), "{out}");
    assert!(out.contains("BAD: line 1 (seq 1): modified"), "{out}");
    let (r, out) = run(&["verify", "--json"], &cfg, token());
    assert_eq!(r, Ok(1), "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(v["problem"]["kind"], "modified");
    assert_eq!(v["problem"]["line"], 1);
    // no log configured, missing file: usage errors
    let none = Config::default();
    assert!(audit_cmd::run(parse(&["verify"]), &none, None)
        .unwrap_err()
        .contains("--file"));
    let missing = dir.path().join("nope.log");
    let args = parse(&["verify", "--file", missing.to_str().unwrap()]);
    assert!(audit_cmd::run(args, &none, None).is_err());
    let args = parse(&["report", "--since", "yesterday"]);
    assert!(audit_cmd::run(args, &cfg, None)
        .unwrap_err()
        .contains("yesterday"));
    let (r, out) = run(&["report", "--since", "1h"], &cfg, None);
    assert_eq!(r, Ok(0));
    let rows: Vec<&str> = out.lines().collect();
    assert!(
        rows[1].starts_with("KEY") && rows.last().unwrap().starts_with("all"),
        "{out}"
    );
    assert!(rows.last().unwrap().trim_end().ends_with("20"), "{out}");
    let (r, out) = run(&["report", "--json"], &cfg, None);
    assert_eq!(r, Ok(0));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let total: u64 = v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["ok"].as_u64().unwrap() + r["failed"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 20);
    let (r, out) = run(&["tail", "-n", "2", "--key", "payments-1"], &cfg, None);
    assert_eq!(r, Ok(0));
    assert_eq!(out.lines().count(), 2, "{out}");
    assert!(out.lines().all(|l| l.contains("key=payments-1")), "{out}");
}
