//! The "cmkp11 admin" vendor interface from C: compiles tests/c/admin_test.c with `cc`
//! against include/cmkp11.h and a PKCS#11 header, and runs it against the built module
//! on its own SoftHSM2 token, through scripts/test-admin-c.sh (so `cargo test` covers
//! what the script checks). The script prints SKIP when no pkcs11.h is installed
//! (libp11-kit-dev); this test then says so and checks nothing else.

mod common;

use std::path::Path;
use std::process::Command;

#[test]
fn c_program_uses_the_admin_interface() {
    let module = common::module_path();
    assert!(
        common::testing_cmkp11(),
        "the admin interface is cmkp11's, not {}'s",
        module.display()
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/test-admin-c.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(&module)
        .env_remove("SOFTHSM2_CONF")
        .env_remove("CMKP11_CONFIG")
        .output()
        .expect("run scripts/test-admin-c.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    if stdout.starts_with("SKIP") {
        eprintln!("lifecycle_c: {}", stdout.trim());
        assert!(out.status.success(), "SKIP with a failure status");
        return;
    }
    let failed: Vec<&str> = stdout.lines().filter(|l| l.starts_with("FAIL")).collect();
    assert!(
        out.status.success() && failed.is_empty(),
        "admin_test.c failed ({}):\n{}\n{stderr}",
        out.status,
        failed.join("\n")
    );
    let passed = stdout.lines().filter(|l| l.starts_with("PASS: ")).count();
    assert!(
        passed >= 40,
        "only {passed} PASS lines from admin_test.c:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("PASS: after rotation: VERSION 2")
            && stdout.contains("PASS: CMKP11_Enable while pending deletion"),
        "expected checks missing:\n{stdout}"
    );
}
