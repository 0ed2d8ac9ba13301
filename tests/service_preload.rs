//! Service mode against an application that lies about itself: a preloaded library makes
//! `getuid`/`geteuid` return the uid an access rule admits (4242), `readlink` of
//! `/proc/self/exe` return the admitted executable, and `clock_gettime`/`time` return a
//! time inside the rule's hours. None of it reaches `cmkp11d`, which asks the kernel: the
//! key stays refused, and the audit record names the real uid, pid and executable.
//!
//! The lying application is this test binary run again (`preloaded_application`, ignored
//! unless the parent starts it) with `LD_PRELOAD` set; the parent owns the daemon.

mod common;

use common::*;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::Attribute;
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use std::process::Command;

const APP_PIN: &str = "preload-credential";
const CHILD_ENV: &str = "CMKP11_TEST_PRELOAD_CHILD";
const FAKE_C: &str = r#"
#define _GNU_SOURCE
#include <string.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>
#include <dlfcn.h>
uid_t getuid(void) { return 4242; }
uid_t geteuid(void) { return 4242; }
ssize_t readlink(const char *p, char *buf, size_t n) {
    if (strcmp(p, "/proc/self/exe") == 0) {
        const char *e = "/usr/sbin/nginx";
        size_t l = strlen(e) < n ? strlen(e) : n;
        memcpy(buf, e, l);
        return (ssize_t)l;
    }
    ssize_t (*real)(const char *, char *, size_t) = dlsym(RTLD_NEXT, "readlink");
    return real(p, buf, n);
}
int clock_gettime(clockid_t c, struct timespec *t) {
    if (c == CLOCK_REALTIME) {
        t->tv_sec = 12 * 3600; /* 12:00 UTC, 1970-01-01 */
        t->tv_nsec = 0;
        return 0;
    }
    int (*real)(clockid_t, struct timespec *) = dlsym(RTLD_NEXT, "clock_gettime");
    return real(c, t);
}
time_t time(time_t *t) { if (t) *t = 12 * 3600; return 12 * 3600; }
"#;

#[test]
fn preloaded_lies_about_uid_exe_and_clock_gain_nothing() {
    let env = test_env();
    let audit = env.dir.join("audit.log");
    // The rule admits only uid 4242 running /usr/sbin/nginx, between 11:00 and 13:00 UTC
    // (a window chosen to be closed now, unless the test runs at midday: then the uid and
    // executable alone keep it closed).
    let extra = format!(
        "\n[audit]\nfile = \"{}\"\n\n[[access]]\nkeys = \"preload-*\"\nuids = [4242]\nexecutables = [\"/usr/sbin/nginx\"]\noperations = [\"encrypt\", \"decrypt\"]\nhours_utc = \"11:00-13:00\"\n",
        audit.display()
    );
    let (conf, socket) = write_daemon_config_as(&env.dir, "preload", APP_PIN, &extra);
    let daemon = DaemonGuard(spawn_daemon(&conf, &socket, &env.softhsm_conf));

    // The key, made by an honest client (this process).
    std::env::set_var("CMKP11_SERVICE", format!("unix:{}", socket.display()));
    let ctx = Pkcs11::new(module_path()).unwrap();
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    let slot = ctx.get_slots_with_token().unwrap()[0];
    let s = ctx.open_rw_session(slot).unwrap();
    s.login(UserType::User, Some(&AuthPin::new(APP_PIN.into())))
        .unwrap();
    s.generate_key(
        &Mechanism::AesKeyGen,
        &[
            Attribute::Token(true),
            Attribute::ValueLen(32.into()),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Label(b"preload-payments".to_vec()),
        ],
    )
    .unwrap();

    // The liar.
    let src = env.dir.join("fake.c");
    let lib = env.dir.join("fake.so");
    std::fs::write(&src, FAKE_C).unwrap();
    let cc = Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(&lib)
        .arg(&src)
        .arg("-ldl")
        .output()
        .expect("cc (scripts/setup.sh installs build-essential)");
    assert!(
        cc.status.success(),
        "cc: {}",
        String::from_utf8_lossy(&cc.stderr)
    );
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "preloaded_application",
            "--ignored",
            "--nocapture",
        ])
        .env(CHILD_ENV, "1")
        // The liar's own /proc/self/exe lies too: name the module for it.
        .env(MODULE_OVERRIDE_ENV, module_path())
        .env("LD_PRELOAD", &lib)
        .env("CMKP11_SERVICE", format!("unix:{}", socket.display()))
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the preloaded application: {said}");
    assert!(said.contains("refused as it should be"), "{said}");
    let child_pid: u32 = said
        .lines()
        .find_map(|l| l.strip_prefix("child pid "))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no child pid in: {said}"));

    // The audit record names the kernel's view of the liar.
    let text = std::fs::read_to_string(&audit).unwrap();
    let rec: serde_json::Value = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|r| r["key"] == "preload-payments" && r["pid"] == child_pid)
        .unwrap_or_else(|| panic!("no record of pid {child_pid}:\n{text}"));
    assert_eq!(rec["result"], "CKR_KEY_FUNCTION_NOT_PERMITTED", "{rec}");
    // SAFETY: getuid has no preconditions (this process is not preloaded).
    assert_eq!(rec["uid"], unsafe { libc::getuid() }, "{rec}");
    assert_eq!(
        rec["exe"],
        std::env::current_exe().unwrap().to_string_lossy().as_ref(),
        "{rec}"
    );
    assert_ne!(rec["exe"], "/usr/sbin/nginx");
    drop(s);
    drop(daemon);
    std::mem::forget(ctx);
}

/// The preloaded application (run by the test above).
#[test]
#[ignore = "run by preloaded_lies_about_uid_exe_and_clock_gain_nothing"]
fn preloaded_application() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    // The preload works in this process.
    // SAFETY: getuid has no preconditions.
    assert_eq!(unsafe { libc::getuid() }, 4242, "LD_PRELOAD did not apply");
    println!("child pid {}", std::process::id());
    let ctx = Pkcs11::new(module_path()).unwrap();
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    let slot = ctx.get_slots_with_token().unwrap()[0];
    let s = ctx.open_rw_session(slot).unwrap();
    s.login(UserType::User, Some(&AuthPin::new(APP_PIN.into())))
        .unwrap();
    let k = s
        .find_objects(&[Attribute::Label(b"preload-payments".to_vec())])
        .unwrap()[0];
    match s.encrypt(&Mechanism::AesCbcPad([1; 16]), k, b"steal") {
        Err(Error::Pkcs11(RvError::KeyFunctionNotPermitted, _)) => {
            println!("refused as it should be")
        }
        other => panic!("the liar got {other:?}"),
    }
    std::mem::forget(ctx);
}
