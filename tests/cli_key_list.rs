//! `cmkp11 key list` filters (`--state`, `--role`, `--label GLOB`), in the table and with
//! `--json`, driven through the built binary against SoftHSM2.

mod cli_support;

use cli_support::{contains, Env};

/// The names of a `key list --json` answer, in order.
fn names(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .expect("a JSON array")
        .iter()
        .map(|k| k["name"].as_str().expect("name").to_string())
        .collect()
}

fn list(env: &Env, filters: &[&str]) -> Vec<String> {
    let mut args = vec!["key", "list"];
    args.extend_from_slice(filters);
    names(&env.json(&args))
}

#[test]
fn key_list_filters_by_state_role_and_label() {
    let env = Env::new();
    env.ok(&["key", "create", "pay-eu", "--role", "wrap"]);
    env.ok(&["key", "create", "pay-us", "--role", "data"]);
    env.ok(&["key", "create", "mac-1", "--role", "mac"]);
    env.ok(&["key", "create", "signer", "--type", "ec-p256"]);
    env.ok(&["key", "disable", "pay-us"]);
    env.ok(&["key", "schedule-deletion", "mac-1", "--days", "7"]);

    // No filter: every key, sorted by name.
    assert_eq!(list(&env, &[]), ["mac-1", "pay-eu", "pay-us", "signer"]);

    // --state
    assert_eq!(list(&env, &["--state", "enabled"]), ["pay-eu", "signer"]);
    assert_eq!(list(&env, &["--state", "disabled"]), ["pay-us"]);
    assert_eq!(list(&env, &["--state", "pending-deletion"]), ["mac-1"]);
    assert!(list(&env, &["--state", "destroyed"]).is_empty());

    // --role: secret roles, and a private key's roles each on its own.
    assert_eq!(list(&env, &["--role", "wrap"]), ["pay-eu"]);
    assert_eq!(list(&env, &["--role", "data"]), ["pay-us"]);
    assert_eq!(list(&env, &["--role", "mac"]), ["mac-1"]);
    assert_eq!(list(&env, &["--role", "sign"]), ["signer"]);
    assert!(list(&env, &["--role", "unwrap"]).is_empty());

    // --label GLOB (the [[access]] rules' syntax): whole-name match.
    assert_eq!(list(&env, &["--label", "pay-*"]), ["pay-eu", "pay-us"]);
    assert_eq!(list(&env, &["--label", "pay-?s"]), ["pay-us"]);
    assert_eq!(list(&env, &["--label", "*"]).len(), 4);
    assert!(list(&env, &["--label", "pay"]).is_empty());

    // Filters combine: every one must match.
    assert_eq!(
        list(&env, &["--label", "pay-*", "--state", "enabled"]),
        ["pay-eu"]
    );
    assert!(list(&env, &["--label", "pay-*", "--role", "mac"]).is_empty());
    assert_eq!(
        list(
            &env,
            &["--state", "enabled", "--role", "sign", "--label", "s*"]
        ),
        ["signer"]
    );

    // The JSON of a filtered list is the same record as the full one.
    let full = env.json(&["key", "list"]);
    let one = env.json(&["key", "list", "--label", "pay-us"]);
    assert_eq!(one.as_array().unwrap()[0], full.as_array().unwrap()[2]);
    assert_eq!(one.as_array().unwrap()[0]["state"], "disabled");

    // The table: only the matching keys; no match says so and names the total.
    let table = env.ok(&["key", "list", "--label", "pay-*"]);
    contains(&table, "pay-eu");
    contains(&table, "pay-us");
    assert!(
        !table.contains("mac-1") && !table.contains("signer"),
        "{table}"
    );
    let none = env.ok(&["key", "list", "--label", "nothing-*"]);
    contains(&none, "match the filters (4 keys in all)");
}

#[test]
fn key_list_refuses_unknown_filter_values() {
    let env = Env::new();
    for (flag, value) in [("--state", "gone"), ("--role", "encrypt")] {
        let out = env.run(&["key", "list", flag, value]);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}");
        let err = String::from_utf8_lossy(&out.stderr);
        contains(&err, "invalid value");
        contains(&err, value);
    }
}
