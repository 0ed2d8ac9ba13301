//! Trusted time, deletion side (issue 15 item 3): in service mode the daemon destroys keys
//! past their deletion date itself, on its own timer (`service.purge_interval`), as an
//! audited action whose record names each key, with the daemon's own pid; an
//! application's login or calls never destroy anything, and a key whose date has not come
//! stays.
//!
//! Time passing is played by moving the key's recorded deletion date into the past in
//! the token (the keystore API, as `tests/cli_clock.rs` does): the daemon compares it with
//! its own clock. One test in this file: it owns the daemons of its token.

mod cli_support;
mod common;

use cli_support::{Env, PIN};
use cmkp11::config::Config;
use cmkp11::keystore::{self, lifecycle, State};
use cmkp11::runtime::Library;
use common::{module_path, spawn_daemon, write_daemon_config_full, DaemonGuard};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::object::Attribute;
use cryptoki::session::UserType;
use cryptoki::types::{AuthPin, RawAuthPin};
use std::path::Path;
use std::time::{Duration, Instant};

const APP_PIN: &str = "purge-app-credential";

/// The token as the daemon's own library sees it (a second process on the token, logged
/// in with the token PIN): `f` gets the library and a logged-in session.
fn on_token<T>(env: &Env, f: impl FnOnce(&Library, &cmkp11::runtime::session::Session) -> T) -> T {
    std::env::set_var("SOFTHSM2_CONF", &env.softhsm_conf);
    let cfg = Config::from_file(&env.config).unwrap();
    let lib = Library::new(cfg, false).unwrap();
    let h = lib.open_session(0, true).unwrap();
    let out = {
        let s = lib.session(h).unwrap();
        let mut s = s.lock();
        let pin = RawAuthPin::new(Box::new(PIN.as_bytes().to_vec()));
        lib.login(&mut s, UserType::User, Some(&pin)).unwrap();
        f(&lib, &s)
    };
    lib.close_session(h).unwrap();
    lib.close();
    out
}

/// Moves key `name`'s deletion date `secs` seconds into the past.
fn backdate(env: &Env, name: &str, secs: u64) {
    on_token(env, |lib, s| {
        let view = lib.keys(s);
        let cmk = view.by_name(name).expect("key exists");
        assert_eq!(cmk.state(keystore::now()), State::PendingDeletion);
        lifecycle::write_record(s.backend(), cmk, |r| {
            r.deletion_date = keystore::now() - secs;
        })
        .unwrap();
    });
}

/// Whether the token still holds key objects labelled `name`.
fn objects_in_token(env: &Env, name: &str) -> usize {
    on_token(env, |_, s| {
        s.backend()
            .find_objects(&[Attribute::Label(name.as_bytes().to_vec())])
            .unwrap()
            .len()
    })
}

fn records(audit: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(audit)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[test]
fn the_daemon_purges_on_its_timer_and_audits_each_key() {
    // The operator's keys (the CLI on the token); two are scheduled for deletion in 30
    // days.
    let env = Env::new();
    for name in ["purge-doomed", "purge-later", "purge-live"] {
        env.ok(&["key", "create", name, "--role", "wrap"]);
    }
    env.ok(&["key", "schedule-deletion", "purge-doomed"]);
    env.ok(&["key", "schedule-deletion", "purge-later"]);
    let audit = env.path("audit.log");
    let extra = format!("\n[audit]\nfile = \"{}\"\n", audit.display());

    // First daemon: timer off. An application logs in.
    let (conf, socket) =
        write_daemon_config_full(env.dir(), "purge", APP_PIN, "purge_interval = 0", &extra);
    let daemon = DaemonGuard(spawn_daemon(&conf, &socket, &env.softhsm_conf));
    std::env::set_var("CMKP11_SERVICE", format!("unix:{}", socket.display()));
    let ctx = Pkcs11::new(module_path()).unwrap();
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    let slot = ctx.get_slots_with_token().unwrap()[0];
    let s = ctx.open_rw_session(slot).unwrap();
    s.login(UserType::User, Some(&AuthPin::new(APP_PIN.into())))
        .unwrap();

    // The deletion date of `purge-doomed` passes (`purge-later` keeps its 30 days).
    backdate(&env, "purge-doomed", 5);

    // An application's logins and calls destroy nothing: log out, log in again, list.
    s.logout().unwrap();
    s.login(UserType::User, Some(&AuthPin::new(APP_PIN.into())))
        .unwrap();
    let found = s
        .find_objects(&[Attribute::Label(b"purge-doomed".to_vec())])
        .unwrap();
    assert!(
        found.is_empty(),
        "a key past its date is invisible: {found:?}"
    );
    assert_eq!(
        objects_in_token(&env, "purge-doomed"),
        1,
        "no purge without the timer: the key's object is still in the token"
    );
    assert!(
        !records(&audit).iter().any(|r| r["op"] == "purge"),
        "no purge record yet"
    );
    drop(s);
    drop(daemon);

    // Second daemon, same token: timer every second.
    let (conf, socket) =
        write_daemon_config_full(env.dir(), "purge", APP_PIN, "purge_interval = 1", &extra);
    let daemon = DaemonGuard(spawn_daemon(&conf, &socket, &env.softhsm_conf));
    let daemon_pid = daemon.0.id();
    let start = Instant::now();
    let rec = loop {
        let found = records(&audit)
            .into_iter()
            .find(|r| r["op"] == "purge" && r["key"] == "purge-doomed" && r["result"] == "CKR_OK");
        if let Some(r) = found {
            break r;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no purge record within 30 s:\n{}",
            std::fs::read_to_string(&audit).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // The daemon did it, in its own name, by its timer.
    assert_eq!(rec["pid"], daemon_pid, "{rec}");
    assert!(
        rec["reason"]
            .as_str()
            .is_some_and(|r| r.contains("purge timer")),
        "{rec}"
    );
    assert!(
        records(&audit)
            .iter()
            .any(|r| r["op"] == "intent" && r["reason"] == "purge" && r["key"] == "purge-doomed"),
        "the intent record precedes the purge"
    );
    assert_eq!(
        objects_in_token(&env, "purge-doomed"),
        0,
        "destroyed in the token"
    );
    // A date to come, and a live key, are untouched; nothing else was purged.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(objects_in_token(&env, "purge-later"), 1);
    assert_eq!(objects_in_token(&env, "purge-live"), 1);
    let purged: Vec<_> = records(&audit)
        .into_iter()
        .filter(|r| r["op"] == "purge" && r["result"] == "CKR_OK")
        .map(|r| r["key"].clone())
        .collect();
    assert_eq!(purged, vec![serde_json::json!("purge-doomed")]);
    drop(daemon);
    std::mem::forget(ctx);
}
