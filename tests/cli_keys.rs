//! `cmkp11` command: init, token list, PIN sources, key create/list/show and every
//! lifecycle transition and refusal, driven through the built binary.

mod cli_support;

use cli_support::{bin, contains, init_token, Env, PIN, SO_PIN, TOKEN};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};

#[test]
fn init_creates_a_token_and_config_and_is_idempotent() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("quick");
    std::fs::write(tmp.path().join("so"), format!("{SO_PIN}\n")).unwrap();
    std::fs::write(tmp.path().join("pin"), format!("{PIN}\n")).unwrap();
    let init = || {
        let out = Command::new(bin())
            .env_clear()
            .args(["init", "--dir"])
            .arg(&dir)
            .args(["--label", "quick", "--so-pin-file"])
            .arg(tmp.path().join("so"))
            .arg("--pin-file")
            .arg(tmp.path().join("pin"))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    };
    let (first, note) = init();
    contains(&note, "token `quick` created");
    let conf = dir.canonicalize().unwrap();
    assert_eq!(
        first.trim(),
        format!(
            "export SOFTHSM2_CONF={0}/softhsm2.conf CMKP11_CONFIG={0}/cmkp11.toml",
            conf.display()
        )
    );
    let mode = std::fs::metadata(conf.join("cmkp11.toml"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let config_text = std::fs::read_to_string(conf.join("cmkp11.toml")).unwrap();
    contains(&config_text, "[backend]");
    contains(&config_text, "tokens = [\"quick\"]");

    // Again: nothing changes, the same export line.
    let (second, note) = init();
    assert_eq!(first, second);
    contains(&note, "exists already");
    contains(&note, "kept");
    assert_eq!(
        std::fs::read_to_string(conf.join("cmkp11.toml")).unwrap(),
        config_text
    );

    // The exported configuration works: one token, usable for keys.
    let run = |args: &[&str]| {
        Command::new(bin())
            .env_clear()
            .env("SOFTHSM2_CONF", conf.join("softhsm2.conf"))
            .env("CMKP11_CONFIG", conf.join("cmkp11.toml"))
            .env("CMKP11_PIN", PIN)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = run(&["--json", "token", "list"]);
    assert!(out.status.success());
    let tokens: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(tokens.as_array().unwrap().len(), 1);
    assert_eq!(tokens[0]["label"], "quick");
    assert_eq!(tokens[0]["user_pin_initialized"], true);
    assert!(run(&["key", "create", "first"]).status.success());

    // A second init after keys exist keeps them.
    init();
    let out = run(&["--json", "key", "list"]);
    let keys: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(keys[0]["name"], "first");
}

#[test]
fn init_without_pins_on_a_pipe_says_how_to_give_them() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(bin())
        .env_clear()
        .args(["init", "--dir"])
        .arg(tmp.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    contains(&err, "--so-pin-file");
    contains(&err, "never on the command line");
}

#[test]
fn token_list_and_selection() {
    let env = Env::new();
    let table = env.ok(&["token", "list"]);
    contains(&table, "LABEL");
    contains(&table, TOKEN);
    let json = env.json(&["token", "list"]);
    assert_eq!(json[0]["label"], TOKEN);
    assert_eq!(json[0]["slot"], 0);

    // Two tokens: the command must be told which one.
    init_token(&env.softhsm_conf, "second");
    let err = env.fails(&["key", "list"]);
    contains(&err, "several tokens");
    contains(&err, "--token");
    contains(&err, TOKEN);
    contains(&err, "second");
    env.ok(&["--token", "second", "key", "create", "only-on-second"]);
    let keys = env.json(&["--token", "second", "key", "list"]);
    assert_eq!(keys[0]["name"], "only-on-second");
    let keys = env.json(&["--token", TOKEN, "key", "list"]);
    assert_eq!(keys.as_array().unwrap().len(), 0);
    let err = env.fails(&["--token", "nope", "key", "list"]);
    contains(&err, "no token labelled `nope`");
    contains(&err, "second");

    // The [backend] tokens filter leaves one token: no --token needed.
    env.set_config("tokens = [\"second\"]");
    let keys = env.json(&["key", "list"]);
    assert_eq!(keys[0]["name"], "only-on-second");
}

#[test]
fn pin_sources_and_pin_errors() {
    let env = Env::new();
    // CMKP11_PIN instead of --pin-file.
    let out = Command::new(bin())
        .env_clear()
        .env("SOFTHSM2_CONF", &env.softhsm_conf)
        .env("CMKP11_CONFIG", &env.config)
        .env("CMKP11_PIN", PIN)
        .args(["key", "list"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success());
    // No PIN at all, stdin not a terminal: say where a PIN comes from.
    let out = Command::new(bin())
        .env_clear()
        .env("SOFTHSM2_CONF", &env.softhsm_conf)
        .env("CMKP11_CONFIG", &env.config)
        .args(["key", "list"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    contains(&err, "no user PIN for token `cli-test`");
    contains(&err, "--pin-file");
    contains(&err, "CMKP11_PIN");
    // A wrong PIN.
    std::fs::write(&env.pin_file, "9999\n").unwrap();
    let err = env.fails(&["key", "list"]);
    contains(&err, "incorrect for token `cli-test`");
    contains(&err, &env.pin_file.display().to_string());
    // A missing PIN file.
    std::fs::remove_file(&env.pin_file).unwrap();
    let err = env.fails(&["key", "list"]);
    contains(&err, "cannot read the PIN file");
}

#[test]
fn bad_configuration_is_reported_with_file_and_key() {
    let env = Env::new();
    std::fs::write(
        &env.config,
        format!(
            "[backend]\nmodule = \"{}\"\nbogus = 1\n",
            cli_support::SOFTHSM
        ),
    )
    .unwrap();
    let err = env.fails(&["key", "list"]);
    contains(&err, &env.config.display().to_string());
    contains(&err, "bogus");
    // Group-writable configuration.
    env.set_config("");
    std::fs::set_permissions(&env.config, std::fs::Permissions::from_mode(0o664)).unwrap();
    let err = env.fails(&["token", "list"]);
    contains(&err, "writable by group or others");
}

#[test]
fn create_list_show_with_roles_sizes_and_json() {
    let env = Env::new();
    let out = env.ok(&["key", "create", "wrapper"]);
    contains(
        &out,
        "created key `wrapper` on token `cli-test` (AES-256, role wrap)",
    );
    env.ok(&[
        "key", "create", "data128", "--role", "data", "--bits", "128",
    ]);
    env.ok(&["key", "create", "macker", "--role", "mac"]);
    let created = env.json(&["key", "create", "json-made", "--role", "wrap"]);
    assert_eq!(created["name"], "json-made");
    assert_eq!(created["state"], "enabled");

    let list = env.json(&["key", "list"]);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["data128", "json-made", "macker", "wrapper"]);
    let by = |n: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|k| k["name"] == n)
            .unwrap()
            .clone()
    };
    assert_eq!(by("wrapper")["role"], "wrap");
    assert_eq!(by("wrapper")["key_type"], "AES-256");
    assert_eq!(by("data128")["role"], "data");
    assert_eq!(by("data128")["key_type"], "AES-128");
    assert_eq!(by("macker")["role"], "mac");

    let show = env.show("wrapper");
    assert_eq!(show["state"], "enabled");
    assert_eq!(show["versions"], serde_json::json!([1]));
    assert_eq!(show["primary"], 1);
    assert_eq!(show["origin"], "generated");
    assert_eq!(show["class"], "secret");
    assert_eq!(show["id"].as_str().unwrap().len(), 32);
    assert!(show["created"].as_str().unwrap().ends_with('Z'));
    assert!(show["rotated"].is_null());
    assert!(show["deletion_date"].is_null());

    let human = env.ok(&["key", "show", "wrapper"]);
    for field in [
        "name:",
        "state:",
        "versions:",
        "primary:",
        "deletion date:",
        "origin:",
        "role:",
        "id:",
        "created:",
        "rotated:",
    ] {
        contains(&human, field);
    }
    let table = env.ok(&["key", "list"]);
    contains(&table, "NAME");
    contains(&table, "wrapper");

    // Refusals.
    let err = env.fails(&["key", "create", "wrapper"]);
    contains(
        &err,
        "a key named `wrapper` exists already on token `cli-test`",
    );
    let err = env.fails(&["key", "create", "cmkp11:mine"]);
    contains(&err, "reserved");
    let err = env.fails(&["key", "show", "nothing"]);
    contains(&err, "no key named `nothing` on token `cli-test`");
    let out = env.run(&["key", "create", "x", "--bits", "192"]);
    assert_eq!(out.status.code(), Some(2), "usage error");
}

#[test]
fn default_role_comes_from_the_configuration() {
    let env = Env::with_config("[keys]\ndefault_role = \"data\"");
    env.ok(&["key", "create", "plain"]);
    assert_eq!(env.show("plain")["role"], "data");
    env.ok(&["key", "create", "explicit", "--role", "wrap"]);
    assert_eq!(env.show("explicit")["role"], "wrap");
}

#[test]
fn every_lifecycle_transition_and_refusal() {
    let env = Env::new();
    env.ok(&["key", "create", "k"]);

    // enabled -> disabled -> enabled
    let out = env.ok(&["key", "disable", "k"]);
    contains(&out, "disabled key `k` on token `cli-test`");
    assert_eq!(env.show("k")["state"], "disabled");
    let out = env.ok(&["key", "disable", "k"]);
    contains(&out, "already disabled");
    let err = env.fails(&["key", "rotate", "k"]);
    contains(&err, "is disabled: enable it first");
    let out = env.ok(&["key", "enable", "k"]);
    contains(&out, "enabled key `k`");
    assert_eq!(env.show("k")["state"], "enabled");
    let out = env.ok(&["key", "enable", "k"]);
    contains(&out, "already enabled");

    // rotation: new primary versions
    let out = env.ok(&["key", "rotate", "k"]);
    contains(&out, "version 2 is primary");
    let r = env.json(&["key", "rotate", "k"]);
    assert_eq!(r["primary"], 3);
    assert_eq!(r["versions"], serde_json::json!([1, 2, 3]));
    assert!(r["rotated"].as_str().is_some());

    // enabled -> pending deletion (explicit days)
    let out = env.ok(&["key", "schedule-deletion", "k", "--days", "7"]);
    contains(&out, "scheduled for deletion on");
    let show = env.show("k");
    assert_eq!(show["state"], "pending-deletion");
    let date = show["deletion_date"].as_str().unwrap().to_string();
    contains(&out, &date);
    // Refusals while pending.
    let err = env.fails(&["key", "enable", "k"]);
    contains(&err, "pending deletion");
    contains(
        &err,
        "cancel the deletion first with `cmkp11 key cancel-deletion k`",
    );
    let err = env.fails(&["key", "disable", "k"]);
    contains(&err, "pending deletion");
    let err = env.fails(&["key", "rotate", "k"]);
    contains(&err, "pending deletion");
    let err = env.fails(&["key", "schedule-deletion", "k"]);
    contains(&err, "already scheduled for deletion");
    // pending -> disabled
    let out = env.ok(&["key", "cancel-deletion", "k"]);
    contains(&out, "it is disabled");
    let show = env.show("k");
    assert_eq!(show["state"], "disabled");
    assert!(show["deletion_date"].is_null());
    let err = env.fails(&["key", "cancel-deletion", "k"]);
    contains(&err, "not pending deletion");
    // disabled -> pending deletion (configured window: 30 days by default)
    let j = env.json(&["key", "schedule-deletion", "k"]);
    assert_eq!(j["state"], "pending-deletion");
    env.ok(&["key", "cancel-deletion", "k"]);
    env.ok(&["key", "enable", "k"]);
    assert_eq!(env.show("k")["state"], "enabled");
    assert_eq!(env.show("k")["versions"], serde_json::json!([1, 2, 3]));

    // Out-of-range days are a usage error.
    let out = env.run(&["key", "schedule-deletion", "k", "--days", "0"]);
    assert_eq!(out.status.code(), Some(2));
    let out = env.run(&["key", "schedule-deletion", "k", "--days", "366"]);
    assert_eq!(out.status.code(), Some(2));

    // Nothing to purge: pending keys stay.
    env.ok(&["key", "schedule-deletion", "k"]);
    let out = env.ok(&["key", "purge"]);
    contains(&out, "nothing purged");
    assert_eq!(env.json(&["key", "purge"])["purged"], serde_json::json!([]));
    assert_eq!(env.show("k")["state"], "pending-deletion");

    // Missing key names for every lifecycle command.
    for cmd in [
        "rotate",
        "disable",
        "enable",
        "schedule-deletion",
        "cancel-deletion",
    ] {
        let err = env.fails(&["key", cmd, "ghost"]);
        contains(&err, "no key named `ghost` on token `cli-test`");
    }
}

#[test]
fn rotate_due_with_rotation_off_does_nothing() {
    let env = Env::new();
    env.ok(&["key", "create", "k"]);
    let out = env.ok(&["key", "rotate", "--due"]);
    contains(&out, "rotation_period_days = 0");
    contains(&out, "nothing rotated");
    let j = env.json(&["key", "rotate", "--due"]);
    assert_eq!(j["rotated"], serde_json::json!([]));
    assert_eq!(env.show("k")["versions"], serde_json::json!([1]));

    // A fresh key is not due under a 30-day period.
    env.set_config("[keys]\nrotation_period_days = 30");
    let j = env.json(&["key", "rotate", "--due"]);
    assert_eq!(j["rotation_period_days"], 30);
    assert_eq!(j["rotated"], serde_json::json!([]));
    assert_eq!(j["not_due"], 1);
    let out = env.ok(&["key", "rotate", "--due"]);
    contains(&out, "0 key(s) rotated, 1 not due");
    // NAME and --due together are a usage error; so is neither.
    assert_eq!(
        env.run(&["key", "rotate", "k", "--due"]).status.code(),
        Some(2)
    );
    assert_eq!(env.run(&["key", "rotate"]).status.code(), Some(2));
}

#[test]
fn audit_subcommand_is_mounted() {
    let env = Env::new();
    let help = env.ok(&["audit", "--help"]);
    for cmd in ["verify", "tail", "report"] {
        contains(&help, cmd);
    }
    let err = env.fails(&["audit", "verify"]);
    contains(&err, "no audit log");
}
