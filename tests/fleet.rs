//! Two hosts, one token: two cmkp11 processes with their own configurations and audit
//! logs share one SoftHSM2 token through `p11-kit server` (each reaches it through
//! `p11-kit-client.so`, as hosts reach a network HSM). A rotation or a disable made on one
//! host is honoured by the other within one second; rotations, disables, enables and
//! scheduled deletions made concurrently from both leave one consistent state that both
//! hosts (and a third process) read alike, with every successful rotation's version
//! present. This process is host A; host B is a child process (see `lifecycle_support`).

#[macro_use]
mod common;
mod lifecycle_support;
mod p11kit_support;

use cryptoki_sys::*;
use lifecycle_support::*;
use serial_test::serial;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How often host A looks.
const POLL: Duration = Duration::from_millis(50);
/// The contract.
const LIMIT_MS: u128 = 1000;

struct Fleet {
    _server: p11kit_support::Server,
    config_b: PathBuf,
    audit: [PathBuf; 2],
}

/// Host A's setup (once per process): the token, the server, both configurations; then
/// cmkp11 loaded over the remote token. `None` when p11-kit is not installed.
fn fleet() -> Option<&'static Fleet> {
    static FLEET: OnceLock<Option<Fleet>> = OnceLock::new();
    FLEET
        .get_or_init(|| {
            let client = p11kit_support::client_module()?;
            let env = common::test_env();
            let server =
                p11kit_support::Server::start(&env.dir, &env.softhsm_conf, common::TOKEN_LABEL);
            let config = |name: &str| {
                let path = env.dir.join(format!("{name}.toml"));
                let audit = env.dir.join(format!("{name}-audit.log"));
                std::fs::write(
                    &path,
                    format!(
                        "[backend]\nmodule = \"{}\"\n[audit]\nfile = \"{}\"\n",
                        client.display(),
                        audit.display()
                    ),
                )
                .unwrap();
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
                (path, audit)
            };
            let (config_a, audit_a) = config("host-a");
            let (config_b, audit_b) = config("host-b");
            std::env::set_var("CMKP11_CONFIG", &config_a);
            std::env::set_var("P11_KIT_SERVER_ADDRESS", server.address());
            Some(Fleet {
                _server: server,
                config_b,
                audit: [audit_a, audit_b],
            })
        })
        .as_ref()
}

/// Host A's logged-in session.
fn host_a() -> Option<S> {
    fleet()?;
    Some(S::user(cmk()))
}

/// Host B's environment for a child: its own configuration (and audit log).
fn host_b(extra: &[(&'static str, String)]) -> Vec<(&'static str, String)> {
    let f = fleet().expect("fleet");
    let mut env = vec![("CMKP11_CONFIG", f.config_b.display().to_string())];
    env.extend_from_slice(extra);
    env
}

/// Child-process entry point (host B); not a test of its own.
#[test]
#[ignore = "entry point of child processes spawned by the other tests"]
fn child_entry() {
    let Some(role) = child_role() else { return };
    let s = S::user(cmk());
    let label = arg("LC_LABEL");
    let mut found = ok(s.find_label(&label), "host B: find by label");
    if found.is_empty() {
        found = ok(
            s.find(
                common::Template::default()
                    .ulong(CKA_CLASS, CKO_PRIVATE_KEY)
                    .bytes(CKA_LABEL, label.as_bytes()),
            ),
            "host B: find a private key by label",
        );
    }
    assert!(!found.is_empty(), "host B: `{label}` not found");
    let k = *found.last().unwrap();
    match role.as_str() {
        "act" | "race" => {
            if role == "race" {
                let start: u128 = arg("LC_START").parse().unwrap();
                while unix_ms() < start {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            for action in arg("LC_ACTIONS").split(',') {
                let r = step(&s, k, action);
                say(&format!(
                    "result {action} {} {}",
                    r.map_or_else(|rv| rv, |()| CKR_OK),
                    unix_ms()
                ));
            }
        }
        "read" => say(&format!("state {}", read_state(&s, k))),
        other => panic!("host B: unknown role {other}"),
    }
}

fn step(s: &S, k: H, action: &str) -> Rv<()> {
    match action {
        "rotate" => s.rotate(k),
        "disable" => s.disable(k),
        "enable" => s.enable(k),
        "schedule" => s.schedule_deletion(k, 3),
        "cancel" => s.cancel_deletion(k),
        other => panic!("unknown action {other}"),
    }
}

/// State, primary version and version count of a CMK, as one string.
fn read_state(s: &S, k: H) -> String {
    format!(
        "{}/{}/{}",
        s.ulong(k, CKA_CMKP11_STATE),
        s.ulong(k, CKA_CMKP11_VERSION),
        s.ulong(k, CKA_CMKP11_VERSION_COUNT)
    )
}

/// Runs `actions` on host B; returns (action, rv, unix ms when it returned) per step.
fn on_host_b(label: &str, actions: &str) -> Vec<(String, CK_RV, u128)> {
    run_child(
        "act",
        &host_b(&[
            ("LC_LABEL", label.to_string()),
            ("LC_ACTIONS", actions.to_string()),
        ]),
    )
    .iter()
    .filter_map(|l| l.strip_prefix("result "))
    .map(|l| {
        let mut w = l.split(' ');
        (
            w.next().unwrap().to_string(),
            w.next().unwrap().parse().unwrap(),
            w.next().unwrap().parse().unwrap(),
        )
    })
    .collect()
}

/// Polls `effect` on host A until it holds; returns how long after `since` (unix ms).
fn seen_after(since: u128, what: &str, mut effect: impl FnMut() -> bool) -> u128 {
    let start = Instant::now();
    loop {
        if effect() {
            let latency = unix_ms().saturating_sub(since);
            println!("two hosts: {what} on host B honoured by host A {latency} ms after it returned (limit {LIMIT_MS} ms)");
            return latency;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{what} on host B not honoured by host A after 5 s"
        );
        std::thread::sleep(POLL);
    }
}

/// An EC P-256 signing CMK on host A: (public, private).
fn ec_cmk(s: &S, label: &str) -> (H, H) {
    let mut pubt = common::Template::default()
        .boolean(CKA_TOKEN, true)
        .bytes(CKA_EC_PARAMS, &common::P256_PARAMS)
        .boolean(CKA_VERIFY, true)
        .bytes(CKA_LABEL, label.as_bytes());
    let mut privt = common::Template::default()
        .boolean(CKA_TOKEN, true)
        .boolean(CKA_PRIVATE, true)
        .boolean(CKA_SENSITIVE, true)
        .boolean(CKA_SIGN, true)
        .bytes(CKA_LABEL, label.as_bytes());
    let (mut pa, mut qa) = (pubt.raw(), privt.raw());
    let mut m = common::mech(CKM_EC_KEY_PAIR_GEN);
    let (mut p, mut q) = (0, 0);
    let rv = call!(
        s.m.f,
        C_GenerateKeyPair,
        s.h,
        &mut m,
        pa.as_mut_ptr(),
        pa.len() as CK_ULONG,
        qa.as_mut_ptr(),
        qa.len() as CK_ULONG,
        &mut p,
        &mut q
    );
    assert_eq!(rv, CKR_OK, "C_GenerateKeyPair: {}", common::rv_name(rv));
    (p, q)
}

#[test]
#[serial]
fn rotation_and_disable_on_one_host_are_honoured_by_the_other_within_one_second() {
    let Some(s) = host_a() else { return };
    // Rotation of a secret CMK: host A sees the new primary version.
    let label = unique_label("fleet-rot");
    let k = new_cmk(&s, Role::Wrap, &label, None);
    assert_eq!(s.ulong(k, CKA_CMKP11_VERSION), 1);
    let done = on_host_b(&label, "rotate");
    assert_eq!(done[0].1, CKR_OK, "host B: rotate");
    let latency = seen_after(done[0].2, "rotate", || {
        s.ulong(k, CKA_CMKP11_VERSION) == 2 && s.ulong(k, CKA_CMKP11_VERSION_COUNT) == 2
    });
    assert!(latency < LIMIT_MS);

    // Disable of a signing CMK: host A's signatures are refused.
    let label = unique_label("fleet-ec");
    let (_, key) = ec_cmk(&s, &label);
    let digest = [3u8; 32];
    ok(
        s.sign(&mut Mech::new(CKM_ECDSA), key, &digest),
        "sign before",
    );
    let done = on_host_b(&label, "disable");
    assert_eq!(done[0].1, CKR_OK, "host B: disable");
    let latency = seen_after(done[0].2, "disable", || {
        s.sign(&mut Mech::new(CKM_ECDSA), key, &digest) == Err(CKR_KEY_FUNCTION_NOT_PERMITTED)
    });
    assert!(latency < LIMIT_MS);
    assert_eq!(s.ulong(key, CKA_CMKP11_STATE), STATE_DISABLED);
    // And back.
    let done = on_host_b(&label, "enable");
    assert_eq!(done[0].1, CKR_OK, "host B: enable");
    let latency = seen_after(done[0].2, "enable", || {
        s.sign(&mut Mech::new(CKM_ECDSA), key, &digest).is_ok()
    });
    assert!(latency < LIMIT_MS);

    // Each host wrote its own audit log.
    let f = fleet().unwrap();
    let a = std::fs::read_to_string(&f.audit[0]).unwrap_or_default();
    let b = std::fs::read_to_string(&f.audit[1]).unwrap_or_default();
    assert!(a.contains(&label), "host A's audit log names the key");
    assert!(b.contains("\"disable\""), "host B's audit log: {b}");
    // Each log has its own checkpoint in the token: neither host takes the other's for
    // its own and records a gap.
    for log in [&a, &b] {
        assert!(!log.contains("audit-gap"), "a gap recorded:\n{log}");
    }
}

#[test]
#[serial]
fn concurrent_steps_from_both_hosts_leave_one_consistent_state() {
    let Some(s) = host_a() else { return };
    let label = unique_label("fleet-race");
    let k = new_cmk(&s, Role::Wrap, &label, None);
    let a_actions = [
        "rotate", "disable", "rotate", "enable", "rotate", "schedule", "cancel",
    ];
    let b_actions = "rotate,rotate,disable,enable,rotate,schedule,cancel,enable,rotate";
    let start = unix_ms() + 1500;
    let (mut child, mut out) = spawn_child(
        "race",
        &host_b(&[
            ("LC_LABEL", label.clone()),
            ("LC_ACTIONS", b_actions.to_string()),
            ("LC_START", start.to_string()),
        ]),
    );
    let reader = std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut rest);
        rest
    });
    while unix_ms() < start {
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut a_ok_rotations = 0;
    for action in a_actions {
        let r = step(&s, k, action);
        if action == "rotate" && r.is_ok() {
            a_ok_rotations += 1;
        }
    }
    let status = child.wait().unwrap();
    let b_out = reader.join().unwrap();
    assert!(status.success(), "host B failed:\n{b_out}");
    let b_ok_rotations = b_out
        .lines()
        .filter(|l| l.starts_with(&format!("{LINE}result rotate {CKR_OK} ")))
        .count();
    // Both hosts (and a third process) read one state, once the one second has passed.
    std::thread::sleep(Duration::from_millis(1100));
    let a_state = read_state(&s, k);
    let b_state = run_child("read", &host_b(&[("LC_LABEL", label.clone())]))
        .iter()
        .find_map(|l| l.strip_prefix("state ").map(str::to_string))
        .unwrap();
    println!(
        "two hosts racing: A rotated {a_ok_rotations}, B rotated {b_ok_rotations}; state/version/count: A {a_state}, B {b_state}"
    );
    assert_eq!(a_state, b_state, "the hosts disagree");
    // Every successful rotation made exactly one version, and every version is there.
    let count = s.ulong(k, CKA_CMKP11_VERSION_COUNT);
    assert_eq!(
        count as usize,
        1 + a_ok_rotations + b_ok_rotations,
        "versions: {count}; successful rotations: A {a_ok_rotations}, B {b_ok_rotations}"
    );
    assert_eq!(
        s.ulong(k, CKA_CMKP11_VERSION),
        count,
        "the newest is primary"
    );
    for v in 1..=count {
        assert_eq!(
            ok(s.find_version(&label, v), "find a version").len(),
            1,
            "version {v} of {count}"
        );
    }
    let state = s.ulong(k, CKA_CMKP11_STATE);
    assert!(
        [STATE_ENABLED, STATE_DISABLED, STATE_PENDING_DELETION].contains(&state),
        "state {state}"
    );
}
