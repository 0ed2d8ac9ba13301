//! Exportable CMKs through the daemon's admin socket (issue 15 item 5, the operators'
//! path; `tests/export.rs` has the CLI on the token, applications and SoftHSM2 directly,
//! `tests/service_operators_export.rs` the dual-control round trip): an operator of the
//! admin socket cannot export a key that was not created exportable, nor export to a
//! destination the SO did not register; each refusal is audited and writes no file. The
//! same operator exports the exportable key (no dual control in this daemon).

mod cli_support;
mod common;

use cli_support::{contains, Env, SO_PIN};
use common::{module_path, spawn_daemon, write_daemon_config_full, DaemonGuard};
use std::path::Path;
use std::process::{Command, Output};

const APP_PIN: &str = "export-admin-credential";

/// `cmkp11 --admin-socket SOCKET ARGS` as this process's uid.
fn admin(socket: &Path, args: &[&str]) -> Output {
    Command::new(module_path().with_file_name("cmkp11"))
        .arg("--admin-socket")
        .arg(socket)
        .args(args)
        .env_remove("CMKP11_ADMIN_SOCKET")
        .current_dir("/")
        .output()
        .expect("run cmkp11")
}

fn records(audit: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(audit)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn the_admin_socket_exports_only_exportable_keys_to_trusted_destinations() {
    let a = Env::new();
    let b = Env::with_config("[policy]\nallow_import = true\n");
    let so_pin = a.path("so.pin");
    std::fs::write(&so_pin, SO_PIN).unwrap();
    a.ok(&["key", "create", "adm-exp", "--role", "data", "--exportable"]);
    a.ok(&["key", "create", "adm-plain", "--role", "data"]);
    let dest_pem = b.path("dest.pem");
    b.ok(&[
        "key",
        "import-key",
        "create",
        "from-a",
        "--out",
        dest_pem.to_str().unwrap(),
    ]);
    a.ok(&[
        "key",
        "destination",
        "add",
        "token-b",
        "--public-key",
        dest_pem.to_str().unwrap(),
        "--so-pin-file",
        so_pin.to_str().unwrap(),
    ]);
    let admin_sock = a.path("admin.sock");
    let audit = a.path("audit.log");
    // SAFETY: getuid has no preconditions.
    let me = unsafe { libc::getuid() };
    let (conf, sock) = write_daemon_config_full(
        a.dir(),
        "a",
        APP_PIN,
        &format!(
            "admin_socket = \"{}\"\nstate_dir = \"{}\"\n",
            admin_sock.display(),
            a.path("state").display()
        ),
        &format!(
            "\n[audit]\nfile = \"{}\"\n\n[[operators]]\nname = \"alice\"\nrole = \"admin\"\nuids = [{me}]\n",
            audit.display()
        ),
    );
    let daemon = DaemonGuard(spawn_daemon(&conf, &sock, &a.softhsm_conf));

    // Not exportable: refused, audited, nothing written.
    let blob = a.path("adm.blob");
    let out = admin(
        &admin_sock,
        &[
            "key",
            "export",
            "adm-plain",
            "--to",
            "token-b",
            "--out",
            blob.to_str().unwrap(),
        ],
    );
    assert!(!out.status.success(), "{out:?}");
    contains(&String::from_utf8_lossy(&out.stderr), "not exportable");
    assert!(!blob.exists());
    // Not a registered destination: refused, nothing written.
    let out = admin(
        &admin_sock,
        &[
            "key",
            "export",
            "adm-exp",
            "--to",
            "elsewhere",
            "--out",
            blob.to_str().unwrap(),
        ],
    );
    assert!(!out.status.success(), "{out:?}");
    assert!(!blob.exists());
    let recs = records(&audit);
    assert!(
        recs.iter().any(|r| r["op"] == "export"
            && r["key"] == "adm-plain"
            && r["result"] == "CKR_KEY_UNEXTRACTABLE"),
        "{recs:?}"
    );
    assert!(recs.iter().any(|r| r["op"] == "export"
        && r["key"] == "adm-exp"
        && r["result"] == "CKR_WRAPPING_KEY_HANDLE_INVALID"));
    // The exportable key to the trusted destination: written.
    let out = admin(
        &admin_sock,
        &[
            "key",
            "export",
            "adm-exp",
            "--to",
            "token-b",
            "--out",
            blob.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&blob).unwrap().len(), 384);
    assert!(records(&audit)
        .iter()
        .any(|r| r["op"] == "export" && r["key"] == "adm-exp" && r["result"] == "CKR_OK"));
    drop(daemon);
}
