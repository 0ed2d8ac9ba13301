//! `cmkp11 key purge` and `cmkp11 key rotate --due` need time to pass: this test moves
//! keys' recorded dates into the past through the keystore API (the records the CLI
//! reads), then drives the binary. One test in this file: it sets `SOFTHSM2_CONF` for
//! its own process.

mod cli_support;

use cli_support::{contains, Env, PIN};
use cmkp11::config::Config;
use cmkp11::keystore::{self, lifecycle, State};
use cmkp11::runtime::Library;
use cryptoki::session::UserType;
use cryptoki::types::RawAuthPin;

/// Rewrites the state record of key `name` with `change`, as if time had passed.
fn backdate(env: &Env, name: &str, change: impl FnOnce(&mut keystore::StateRecord)) {
    std::env::set_var("SOFTHSM2_CONF", &env.softhsm_conf);
    let lib = Library::new(Config::from_file(&env.config).unwrap(), false).unwrap();
    let h = lib.open_session(0, true).unwrap();
    {
        let s = lib.session(h).unwrap();
        let mut s = s.lock();
        let pin = RawAuthPin::new(Box::new(PIN.as_bytes().to_vec()));
        lib.login(&mut s, UserType::User, Some(&pin)).unwrap();
        let view = lib.keys(&s);
        let cmk = view.by_name(name).expect("key exists");
        lifecycle::write_record(s.backend(), cmk, change).unwrap();
    }
    lib.close_session(h).unwrap();
    lib.close();
}

#[test]
fn purge_and_rotate_due_after_time_passes() {
    let env = Env::with_config("[keys]\nrotation_period_days = 30");
    let day = 86_400;
    let now = keystore::now();
    for k in ["old", "fresh", "off", "gone", "kept"] {
        env.ok(&["key", "create", k]);
    }
    // `old` was created 40 days ago, `fresh` rotated 10 days ago; `off` is old but
    // disabled (not rotated); `gone` is past its deletion date; `kept` is pending deletion
    // with a date to come.
    backdate(&env, "old", |r| r.created = now - 40 * day);
    backdate(&env, "fresh", |r| {
        r.created = now - 100 * day;
        r.rotated = now - 10 * day;
    });
    backdate(&env, "off", |r| {
        r.created = now - 40 * day;
        r.state = State::Disabled;
    });
    backdate(&env, "gone", |r| {
        r.state = State::PendingDeletion;
        r.deletion_date = now - 60;
    });
    env.ok(&["key", "schedule-deletion", "kept", "--days", "5"]);

    // rotate --due: only `old`.
    let out = env.ok(&["key", "rotate", "--due"]);
    contains(&out, "rotated `old`: version 2 is primary");
    contains(&out, "1 key(s) rotated");
    assert!(!out.contains("`fresh`"), "{out}");
    assert!(!out.contains("`off`"), "{out}");
    assert_eq!(env.show("old")["versions"], serde_json::json!([1, 2]));
    assert_eq!(env.show("fresh")["versions"], serde_json::json!([1]));
    assert_eq!(env.show("off")["versions"], serde_json::json!([1]));
    // Just rotated: no longer due.
    let j = env.json(&["key", "rotate", "--due"]);
    assert_eq!(j["rotated"], serde_json::json!([]));

    // The destroyed key is listed as such until purged, and refused by name.
    let list = env.json(&["key", "list"]);
    let gone = list
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "gone")
        .unwrap();
    assert_eq!(gone["state"], "destroyed");
    let err = env.fails(&["key", "enable", "gone"]);
    contains(&err, "is destroyed");
    contains(&err, "cmkp11 key purge");

    // purge: `gone` only.
    let j = env.json(&["key", "purge"]);
    assert_eq!(j["purged"], serde_json::json!(["gone"]));
    let names: Vec<String> = env
        .json(&["key", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["fresh", "kept", "off", "old"]);
    assert_eq!(env.show("kept")["state"], "pending-deletion");
    let out = env.ok(&["key", "purge"]);
    contains(&out, "nothing purged");
    // The name is free again.
    env.ok(&["key", "create", "gone"]);
}
