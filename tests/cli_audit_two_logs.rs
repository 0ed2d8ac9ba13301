//! Two hosts, one token, two audit logs (the fleet of DESIGN.md §1, each host with its own
//! configuration and log): every log has its own audit key and checkpoint in the token,
//! so that lifecycle steps made alternately through either configuration leave both logs
//! whole (`cmkp11 audit verify` exit 0, no `audit-gap` record), where one shared
//! checkpoint made each writer take the other's for its own. Driven through the `cmkp11`
//! command over one SoftHSM2 token (the same runs over p11-kit's server: tests/fleet.rs).

mod cli_support;

use cli_support::{contains, Env};
use std::os::unix::fs::PermissionsExt;

#[test]
fn alternating_writers_with_their_own_logs_leave_both_whole() {
    let env = Env::with_config("[audit]\nfile = \"host-a.log\"\n");
    // Host B: the same token, its own configuration and log.
    let b = env.path("host-b.toml");
    std::fs::write(
        &b,
        format!(
            "[backend]\nmodule = \"{}\"\n\n[audit]\nfile = \"host-b.log\"\n",
            cli_support::SOFTHSM
        ),
    )
    .unwrap();
    std::fs::set_permissions(&b, std::fs::Permissions::from_mode(0o600)).unwrap();
    let on_b = |args: &[&str]| {
        let out = env.command(args).env("CMKP11_CONFIG", &b).output().unwrap();
        assert!(
            out.status.success(),
            "host B: {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    env.ok(&["key", "create", "shared"]);
    on_b(&["key", "disable", "shared"]);
    env.ok(&["key", "enable", "shared"]);
    on_b(&["key", "rotate", "shared"]);
    env.ok(&["key", "disable", "shared"]);
    on_b(&["key", "enable", "shared"]);
    for (log, config) in [("host-a.log", &env.config), ("host-b.log", &b)] {
        let text = std::fs::read_to_string(env.path(log)).unwrap();
        assert!(!text.contains("audit-gap"), "{log}:\n{text}");
        let out = env
            .command(&["audit", "verify"])
            .env("CMKP11_CONFIG", config)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{log}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    contains(
        &std::fs::read_to_string(env.path("host-b.log")).unwrap(),
        "\"rotate\"",
    );
}
