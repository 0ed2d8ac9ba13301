//! `[log]` config: level and file are honoured. Its own test binary, because the module
//! installs its logger at the first `C_Initialize` of a process.

#[macro_use]
mod common;

use std::os::unix::fs::PermissionsExt;
use std::ptr;

use common::{raw, raw_login, raw_open_session, raw_token_slot, test_env, SOFTHSM_MODULE};
use cryptoki_sys::*;

#[test]
fn log_file_and_debug_level_are_honoured() {
    let f = raw().f;
    let log = test_env().dir.join("cmkp11-debug.log");
    let config = test_env().dir.join("log-debug.toml");
    std::fs::write(
        &config,
        format!(
            "[backend]\nmodule = \"{SOFTHSM_MODULE}\"\n[log]\nlevel = \"debug\"\nfile = \"{}\"\n",
            log.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::env::set_var("CMKP11_CONFIG", &config);

    assert_rv!(ck!(f, C_Initialize, ptr::null_mut()), CKR_OK);
    let mut info: CK_INFO = unsafe { std::mem::zeroed() };
    assert_rv!(ck!(f, C_GetInfo, &mut info), CKR_OK);
    let s = raw_open_session(raw_token_slot());
    raw_login(s);
    assert_rv!(ck!(f, C_Finalize, ptr::null_mut()), CKR_OK);

    let text = std::fs::read_to_string(&log)
        .unwrap_or_else(|e| panic!("log file {} not written: {e}", log.display()));
    // DESIGN.md §2: every entry point logs a debug line (without secrets).
    for call in ["C_GetInfo", "C_OpenSession", "C_Login"] {
        assert!(
            text.contains(call),
            "debug log does not mention {call}:\n{text}"
        );
    }
}
