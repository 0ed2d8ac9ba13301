//! Helpers for the `cmkp11` command tests (tests/cli_*.rs).
//!
//! Each [`Env`] is a private SoftHSM2 token directory with its own `softhsm2.conf`, one
//! token (label [`TOKEN`], test-only PINs), a cmkp11 configuration (mode 600) and a PIN
//! file. The binary under test is the one cargo built for these tests
//! (`CARGO_BIN_EXE_cmkp11`), run with only this environment's variables, so tests in one
//! file run in parallel without sharing anything.
#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Label of the token every environment initializes.
pub const TOKEN: &str = "cli-test";
/// Test-only user PIN.
pub const PIN: &str = "1234";
/// Test-only SO PIN.
pub const SO_PIN: &str = "12345678";
/// SoftHSM2's module.
pub const SOFTHSM: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// The `cmkp11` binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_cmkp11")
}

/// One private token + configuration.
pub struct Env {
    /// Keeps the directory alive.
    pub tmp: tempfile::TempDir,
    /// `softhsm2.conf`.
    pub softhsm_conf: PathBuf,
    /// `cmkp11.toml`.
    pub config: PathBuf,
    /// A file holding the user PIN.
    pub pin_file: PathBuf,
}

/// `softhsm2-util --init-token --free` in the directory of `conf`.
pub fn init_token(conf: &Path, label: &str) {
    let out = Command::new("softhsm2-util")
        .env("SOFTHSM2_CONF", conf)
        .args([
            "--init-token",
            "--free",
            "--label",
            label,
            "--so-pin",
            SO_PIN,
            "--pin",
            PIN,
        ])
        .output()
        .expect("run softhsm2-util");
    assert!(
        out.status.success(),
        "softhsm2-util: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Env {
    /// A token and a configuration with the default settings.
    pub fn new() -> Env {
        Env::with_config("")
    }

    /// A token and a configuration with `extra` TOML after the `[backend]` table.
    pub fn with_config(extra: &str) -> Env {
        let tmp = tempfile::Builder::new()
            .prefix("cmkp11-cli-")
            .tempdir()
            .expect("tempdir");
        let dir = tmp.path();
        std::fs::create_dir(dir.join("tokens")).unwrap();
        let softhsm_conf = dir.join("softhsm2.conf");
        std::fs::write(
            &softhsm_conf,
            format!(
                "directories.tokendir = {}/tokens\nobjectstore.backend = file\n\
                 log.level = ERROR\nslots.removable = false\n",
                dir.display()
            ),
        )
        .unwrap();
        init_token(&softhsm_conf, TOKEN);
        let config = dir.join("cmkp11.toml");
        std::fs::write(
            &config,
            format!("[backend]\nmodule = \"{SOFTHSM}\"\n\n{extra}\n"),
        )
        .unwrap();
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
        let pin_file = dir.join("pin");
        std::fs::write(&pin_file, format!("{PIN}\n")).unwrap();
        Env {
            tmp,
            softhsm_conf,
            config,
            pin_file,
        }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        self.tmp.path()
    }

    /// A path inside the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir().join(name)
    }

    /// Replaces the configuration's extra TOML.
    pub fn set_config(&self, extra: &str) {
        std::fs::write(
            &self.config,
            format!("[backend]\nmodule = \"{SOFTHSM}\"\n\n{extra}\n"),
        )
        .unwrap();
    }

    /// The command with this environment only (PIN from the PIN file, stdin closed).
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin());
        c.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("SOFTHSM2_CONF", &self.softhsm_conf)
            .env("CMKP11_CONFIG", &self.config)
            .arg("--pin-file")
            .arg(&self.pin_file)
            .args(args)
            .current_dir(self.dir())
            .stdin(Stdio::null());
        c
    }

    /// Runs the command.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run cmkp11")
    }

    /// Runs the command, asserts success, returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "cmkp11 {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs the command, asserts exit status 1, returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert_eq!(
            out.status.code(),
            Some(1),
            "cmkp11 {args:?} should fail:\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(err.starts_with("cmkp11: "), "message: {err}");
        err
    }

    /// Runs the command with `--json`, asserts success, parses stdout.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let out = self.ok(&a);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("JSON of {args:?}: {e}\n{out}"))
    }

    /// `key show NAME --json`.
    pub fn show(&self, name: &str) -> serde_json::Value {
        self.json(&["key", "show", name])
    }

    /// Asserts that `needle` occurs in `hay`.
    pub fn contains(hay: &str, needle: &str) {
        assert!(hay.contains(needle), "expected `{needle}` in:\n{hay}");
    }
}

/// Asserts that `needle` occurs in `hay`.
pub fn contains(hay: &str, needle: &str) {
    Env::contains(hay, needle)
}

/// Whether a program is on PATH.
pub fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}
