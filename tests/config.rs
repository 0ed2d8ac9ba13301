//! Configuration handling at `C_Initialize` (DESIGN.md §6): a bad config makes
//! `C_Initialize` return `CKR_GENERAL_ERROR` with one log line naming the file, the key and
//! the problem; the module stays uninitialized; a good config then works. The token filter
//! (`tokens = [...]`) decides which slots exist.
//!
//! Each test points `CMKP11_CONFIG` at a file of its own before `C_Initialize`, so all of
//! them are `#[serial]` and finalize before returning.

#[macro_use]
mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::ptr;

use common::{padded, raw, test_env, SOFTHSM_MODULE, TOKEN_LABEL};
use cryptoki_sys::*;
use serial_test::serial;

fn f() -> &'static CK_FUNCTION_LIST {
    raw().f
}

/// Writes `content` as a config file named `name` with `mode`, and points
/// `CMKP11_CONFIG` at it.
fn use_config(name: &str, content: &str, mode: u32) -> PathBuf {
    let path = test_env().dir.join(name);
    std::fs::write(&path, content).expect("write config");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    std::env::set_var("CMKP11_CONFIG", &path);
    path
}

/// Puts the test process's own config back (and finalizes) when dropped.
struct Restore;

impl Drop for Restore {
    fn drop(&mut self) {
        let _ = ck!(f(), C_Finalize, ptr::null_mut());
        std::env::set_var("CMKP11_CONFIG", &test_env().cmkp11_conf);
    }
}

/// Runs `C_Initialize(NULL)` with fd 2 redirected to a file; returns (rv, stderr text).
fn initialize_capturing_stderr() -> (CK_RV, String) {
    let capture = test_env().dir.join("stderr.capture");
    let file = std::fs::File::create(&capture).expect("create capture file");
    use std::os::fd::AsRawFd;
    // SAFETY: plain descriptor juggling on fds this process owns; restored below.
    let saved = unsafe { libc::dup(2) };
    assert!(saved >= 0);
    unsafe { libc::dup2(file.as_raw_fd(), 2) };
    let rv = ck!(f(), C_Initialize, ptr::null_mut());
    unsafe {
        libc::dup2(saved, 2);
        libc::close(saved);
    }
    drop(file);
    let text = std::fs::read_to_string(&capture).unwrap_or_default();
    eprint!("{text}");
    (rv, text)
}

fn assert_not_initialized() {
    let mut info: CK_INFO = unsafe { std::mem::zeroed() };
    assert_rv!(
        ck!(f(), C_GetInfo, &mut info),
        CKR_CRYPTOKI_NOT_INITIALIZED,
        "after a refused C_Initialize"
    );
}

/// A bad config: CKR_GENERAL_ERROR, a log line naming the file and each of `words`,
/// still not initialized; then the good config initializes.
fn assert_refused(config: &Path, words: &[&str]) {
    let (rv, log) = initialize_capturing_stderr();
    assert_rv!(
        rv,
        CKR_GENERAL_ERROR,
        "C_Initialize with {}",
        config.display()
    );
    let file = config.to_string_lossy();
    let line = log
        .lines()
        .find(|l| l.contains(file.as_ref()))
        .unwrap_or_else(|| panic!("no log line names {file}; stderr was:\n{log}"));
    for w in words {
        assert!(line.contains(w), "log line does not mention {w:?}: {line}");
    }
    assert_not_initialized();
    std::env::set_var("CMKP11_CONFIG", &test_env().cmkp11_conf);
    assert_rv!(
        ck!(f(), C_Initialize, ptr::null_mut()),
        CKR_OK,
        "good config after the bad one"
    );
    assert_rv!(ck!(f(), C_Finalize, ptr::null_mut()), CKR_OK);
}

fn backend() -> String {
    format!("[backend]\nmodule = \"{SOFTHSM_MODULE}\"\n")
}

#[test]
#[serial]
fn unknown_key_is_refused() {
    let _restore = Restore;
    let path = use_config(
        "unknown-key.toml",
        &format!("{}colour = \"blue\"\n", backend()),
        0o600,
    );
    assert_refused(&path, &["colour"]);
}

#[test]
#[serial]
fn unknown_section_is_refused() {
    let _restore = Restore;
    let path = use_config(
        "unknown-section.toml",
        &format!("{}[nonsense]\nx = 1\n", backend()),
        0o600,
    );
    assert_refused(&path, &["nonsense"]);
}

#[test]
#[serial]
fn wrong_value_type_is_refused() {
    let _restore = Restore;
    let path = use_config("bad-type.toml", "[backend]\nmodule = 42\n", 0o600);
    assert_refused(&path, &["module"]);
}

#[test]
#[serial]
fn bad_log_level_is_refused() {
    let _restore = Restore;
    let path = use_config(
        "bad-level.toml",
        &format!("{}[log]\nlevel = \"loud\"\n", backend()),
        0o600,
    );
    assert_refused(&path, &["level"]);
}

#[test]
#[serial]
fn missing_backend_module_is_refused() {
    let _restore = Restore;
    let path = use_config(
        "missing-module.toml",
        "[backend]\nmodule = \"/nonexistent/libnothing.so\"\n",
        0o600,
    );
    assert_refused(&path, &["/nonexistent/libnothing.so"]);
}

#[test]
#[serial]
fn group_or_world_writable_config_is_refused() {
    let _restore = Restore;
    for (name, mode) in [
        ("group-writable.toml", 0o620),
        ("world-writable.toml", 0o602),
    ] {
        let path = use_config(name, &backend(), mode);
        let (rv, log) = initialize_capturing_stderr();
        assert_rv!(rv, CKR_GENERAL_ERROR, "config with mode {mode:o}");
        assert!(
            log.contains(path.to_string_lossy().as_ref()),
            "no log line names {}: {log}",
            path.display()
        );
        assert_not_initialized();
    }
    // Read-only for everybody is fine.
    use_config("read-only.toml", &backend(), 0o444);
    assert_rv!(ck!(f(), C_Initialize, ptr::null_mut()), CKR_OK, "mode 444");
}

/// The labels of the tokens the module reports.
fn token_labels() -> Vec<String> {
    let mut n: CK_ULONG = 0;
    assert_rv!(
        ck!(f(), C_GetSlotList, CK_TRUE, ptr::null_mut(), &mut n),
        CKR_OK
    );
    let mut ids = vec![0 as CK_SLOT_ID; n as usize];
    assert_rv!(
        ck!(f(), C_GetSlotList, CK_TRUE, ids.as_mut_ptr(), &mut n),
        CKR_OK
    );
    ids.truncate(n as usize);
    ids.into_iter()
        .map(|id| {
            let mut info: CK_TOKEN_INFO = unsafe { std::mem::zeroed() };
            assert_rv!(ck!(f(), C_GetTokenInfo, id, &mut info), CKR_OK);
            padded(&info.label)
        })
        .collect()
}

#[test]
#[serial]
fn token_filter_selects_slots() {
    let _restore = Restore;
    use_config(
        "filter-match.toml",
        &format!("[backend]\nmodule = \"{SOFTHSM_MODULE}\"\ntokens = [\"{TOKEN_LABEL}\"]\n"),
        0o600,
    );
    assert_rv!(ck!(f(), C_Initialize, ptr::null_mut()), CKR_OK);
    assert_eq!(token_labels(), vec![TOKEN_LABEL.to_string()]);
    assert_rv!(ck!(f(), C_Finalize, ptr::null_mut()), CKR_OK);

    use_config(
        "filter-none.toml",
        &format!("[backend]\nmodule = \"{SOFTHSM_MODULE}\"\ntokens = [\"no-such-token\"]\n"),
        0o600,
    );
    assert_rv!(ck!(f(), C_Initialize, ptr::null_mut()), CKR_OK);
    assert_eq!(token_labels(), Vec::<String>::new());
}
