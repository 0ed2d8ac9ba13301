//! An export under dual control, through `cmkp11d`'s admin socket: token A (served by a
//! daemon with `[dual_control] actions = ["export"]`) holds an exportable CMK and a
//! trusted destination registered by its SO (token B's import key). Alice's export is a
//! request that writes nothing; her own approval is refused; Bob's approval (another
//! uid, run with `setpriv`) runs it; the wrapped key is kept with the request for
//! `request show --out`; B imports it with BYOK import and decrypts what A encrypted.
//! Needs root for the second uid, as tests/service_operators.rs.

mod cli_support;
mod common;

use cli_support::{contains, Env, SO_PIN};
use common::{module_path, spawn_daemon, write_daemon_config_full, DaemonGuard};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const APP_PIN: &str = "export-dc-app";
const PLAIN: &[u8] = b"record 7, encrypted on token A";
/// The second operator's uid.
const BOB: u32 = 64_211;

fn can_switch_uid() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 && Path::new("/usr/bin/setpriv").exists() {
        return true;
    }
    if std::env::var_os("CMKP11_TEST_NO_ROOT").is_some_and(|v| v == "1") {
        eprintln!("SKIPPED: two operators need two uids: run as root with setpriv");
        return false;
    }
    panic!(
        "this test tells operators apart by uid and runs the second one with `setpriv \
         --reuid`: run it as root (or set CMKP11_TEST_NO_ROOT=1 to skip it)"
    );
}

/// `cmkp11 --admin-socket SOCKET ARGS` as `uid` (`None`: this process's).
fn admin(socket: &Path, uid: Option<u32>, args: &[&str]) -> Output {
    let bin = module_path().with_file_name("cmkp11");
    let mut c = match uid {
        None => Command::new(&bin),
        Some(u) => {
            let mut c = Command::new("setpriv");
            c.arg(format!("--reuid={u}"))
                .arg(format!("--regid={u}"))
                .arg("--clear-groups")
                .arg(&bin);
            c
        }
    };
    c.arg("--admin-socket")
        .arg(socket)
        .args(args)
        .env_remove("CMKP11_ADMIN_SOCKET")
        .current_dir("/")
        .output()
        .expect("run cmkp11")
}

fn ok(o: Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn refused(o: Output, what: &str) -> String {
    assert!(
        !o.status.success(),
        "{what} should be refused: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn client(socket: &Path) -> (Pkcs11, Session) {
    std::env::set_var("CMKP11_SERVICE", format!("unix:{}", socket.display()));
    let ctx = Pkcs11::new(module_path()).unwrap();
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    let slot = ctx.get_slots_with_token().unwrap()[0];
    let s = ctx.open_rw_session(slot).unwrap();
    s.login(UserType::User, Some(&AuthPin::new(APP_PIN.into())))
        .unwrap();
    (ctx, s)
}

fn find(s: &Session, label: &str) -> ObjectHandle {
    let v = s
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(label.as_bytes().to_vec()),
        ])
        .unwrap();
    assert_eq!(v.len(), 1, "{label}: {v:?}");
    v[0]
}

fn gcm(iv: &mut [u8; 12]) -> Mechanism<'_> {
    Mechanism::AesGcm(GcmParams::new(iv, b"aad", 128.into()).unwrap())
}

#[test]
fn an_export_runs_only_under_dual_control_and_imports_on_the_destination() {
    if !can_switch_uid() {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let a = Env::new();
    let b = Env::with_config("[policy]\nallow_import = true\n");
    let so_pin = a.path("so.pin");
    std::fs::write(&so_pin, SO_PIN).unwrap();
    // A's exportable key and its trusted destination (B's import key, by A's SO).
    a.ok(&["key", "create", "dc-pay", "--role", "data", "--exportable"]);
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

    // A's daemon: alice (this uid) and bob are admins; exports need two operators.
    let public = tempfile::Builder::new()
        .prefix("cmkp11-ops-export-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(public.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let admin_sock: PathBuf = public.path().join("admin.sock");
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
            "\n[audit]\nfile = \"{}\"\n\n[[operators]]\nname = \"alice\"\nrole = \"admin\"\n\
             uids = [{me}]\n\n[[operators]]\nname = \"bob\"\nrole = \"admin\"\nuids = [{BOB}]\n\n\
             [dual_control]\nactions = [\"export\"]\napprovals = 2\n",
            audit.display()
        ),
    );
    let daemon_a = DaemonGuard(spawn_daemon(&conf, &sock, &a.softhsm_conf));

    // An application encrypts on A.
    let (ctx, s) = client(&sock);
    let mut iv = [5u8; 12];
    let ct = s.encrypt(&gcm(&mut iv), find(&s, "dc-pay"), PLAIN).unwrap();
    drop(s);
    ctx.finalize().unwrap();

    // Alice's export is a request: nothing is written.
    let blob = a.path("dc.blob");
    let out = ok(
        admin(
            &admin_sock,
            None,
            &[
                "key",
                "export",
                "dc-pay",
                "--to",
                "token-b",
                "--out",
                blob.to_str().unwrap(),
            ],
        ),
        "export request",
    );
    contains(&out, "request r-");
    assert!(!blob.exists(), "a request exports nothing");
    let list: serde_json::Value = serde_json::from_str(&ok(
        admin(&admin_sock, None, &["--json", "request", "list"]),
        "request list",
    ))
    .unwrap();
    let id = list["requests"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(list["requests"][0]["action"], "export");
    // Her own approval is refused; nothing is exported.
    let e = refused(
        admin(&admin_sock, None, &["request", "approve", &id]),
        "self-approval",
    );
    contains(&e, "never approves his own request");
    assert!(!std::fs::read_to_string(&audit)
        .unwrap()
        .lines()
        .any(|l| l.contains("\"op\":\"export\"") && l.contains("CKR_OK")));
    // Bob's approval runs it; the wrapped key stays with the request.
    let out = ok(
        admin(&admin_sock, Some(BOB), &["request", "approve", &id]),
        "bob approves",
    );
    contains(&out, "executed");
    let out = ok(
        admin(
            &admin_sock,
            None,
            &["request", "show", &id, "--out", blob.to_str().unwrap()],
        ),
        "request show --out",
    );
    contains(&out, "exported key `dc-pay` (version 1)");
    assert_eq!(std::fs::read(&blob).unwrap().len(), 384, "RSA-3072 OAEP");
    let shown: serde_json::Value = serde_json::from_str(&ok(
        admin(&admin_sock, None, &["--json", "request", "show", &id]),
        "show",
    ))
    .unwrap();
    let hash = shown["output"]["oaep_hash"].as_str().unwrap().to_string();
    let records: Vec<serde_json::Value> = std::fs::read_to_string(&audit)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(records
        .iter()
        .any(|r| r["op"] == "export" && r["result"] == "CKR_OK" && r["uid"] == BOB));
    assert!(records
        .iter()
        .any(|r| r["op"] == "request-execute" && r["result"] == "CKR_OK"));
    drop(daemon_a);

    // B imports it (BYOK) and decrypts what A encrypted.
    b.ok(&[
        "key",
        "import",
        "dc-pay",
        "--import-key",
        "from-a",
        "--wrapped",
        blob.to_str().unwrap(),
        "--oaep-hash",
        &hash,
        "--bits",
        "256",
        "--role",
        "data",
    ]);
    let (conf_b, sock_b) = write_daemon_config_full(
        b.dir(),
        "b",
        APP_PIN,
        "",
        "\n[policy]\nallow_import = true\n",
    );
    let _daemon_b = DaemonGuard(spawn_daemon(&conf_b, &sock_b, &b.softhsm_conf));
    let (ctx, s) = client(&sock_b);
    let mut iv = [5u8; 12];
    let back = s.decrypt(&gcm(&mut iv), find(&s, "dc-pay"), &ct).unwrap();
    assert_eq!(back, PLAIN, "B decrypts what A encrypted");
    drop(s);
    ctx.finalize().unwrap();
}
