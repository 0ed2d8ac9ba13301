//! The capability probe inside the module: a SoftHSM2 token whose `slots.mechanisms`
//! setting takes AES-GCM and AES-KWP away. Through the built `.so`, `C_EncryptInit` with
//! AES-GCM and `C_UnwrapKey` with AES-KWP are refused with `CKR_MECHANISM_INVALID`, the log
//! names the missing capability and what it disables exactly once each, the probe ran
//! once for the slot, and the rest (AES-CBC-PAD, ECDSA) works. Its own test binary: the
//! module's logger and the token's mechanism setting are per process.

#[macro_use]
mod common;

use std::os::unix::fs::PermissionsExt;
use std::ptr;

use common::{
    gcm_params, mech, mech_with, raw, raw_aes_key, raw_login, raw_open_session, raw_token_slot,
    test_env, SOFTHSM_MODULE,
};
use cryptoki_sys::*;

#[test]
fn missing_capabilities_are_refused_naming_them_once_and_the_rest_works() {
    if !common::testing_cmkp11() {
        return;
    }
    let f = raw().f;
    let env = test_env();
    // SoftHSM2 2.6 ignores the first name of a `-` list, hence the leading CKM_MD5.
    let mut conf = std::fs::read_to_string(&env.softhsm_conf).unwrap();
    conf.push_str("slots.mechanisms = -CKM_MD5,CKM_AES_GCM,CKM_AES_KEY_WRAP_PAD\n");
    std::fs::write(&env.softhsm_conf, conf).unwrap();
    let log = env.dir.join("caps.log");
    let config = env.dir.join("caps.toml");
    std::fs::write(
        &config,
        format!(
            "[backend]\nmodule = \"{SOFTHSM_MODULE}\"\n[log]\nlevel = \"info\"\nfile = \"{}\"\n",
            log.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::env::set_var("CMKP11_CONFIG", &config);

    assert_rv!(ck!(f, C_Initialize, ptr::null_mut()), CKR_OK);
    let s = raw_open_session(raw_token_slot());
    raw_login(s);
    let key = raw_aes_key(s, "caps-dek");
    for _ in 0..2 {
        let mut iv = [1u8; 12];
        let mut p = gcm_params(&mut iv, 128);
        let mut m = mech_with(CKM_AES_GCM, &mut p, std::mem::size_of::<CK_GCM_PARAMS>());
        assert_rv!(ck!(f, C_EncryptInit, s, &mut m, key), CKR_MECHANISM_INVALID);
    }
    let mut blob = [0u8; 40];
    let mut m = mech(CKM_AES_KEY_WRAP_PAD);
    let mut h: CK_OBJECT_HANDLE = 0;
    assert_rv!(
        ck!(
            f,
            C_UnwrapKey,
            s,
            &mut m,
            key,
            blob.as_mut_ptr(),
            blob.len() as CK_ULONG,
            ptr::null_mut(),
            0,
            &mut h
        ),
        CKR_MECHANISM_INVALID
    );
    // AES-CBC-PAD still works.
    let mut iv = [2u8; 16];
    let mut m = mech_with(CKM_AES_CBC_PAD, &mut iv, 16);
    assert_rv!(ck!(f, C_EncryptInit, s, &mut m, key), CKR_OK);
    let mut data = [7u8; 20];
    let mut out = [0u8; 64];
    let mut out_len = out.len() as CK_ULONG;
    assert_rv!(
        ck!(
            f,
            C_Encrypt,
            s,
            data.as_mut_ptr(),
            data.len() as CK_ULONG,
            out.as_mut_ptr(),
            &mut out_len
        ),
        CKR_OK
    );
    assert_eq!(out_len, 32);
    assert_rv!(ck!(f, C_Finalize, ptr::null_mut()), CKR_OK);

    let text = std::fs::read_to_string(&log).unwrap();
    let lines = |needle: &str| text.lines().filter(|l| l.contains(needle)).count();
    assert_eq!(lines("probed token `cmkp11-test`"), 1, "{text}");
    assert_eq!(lines("lacks capability `aes-gcm`"), 1, "{text}");
    assert_eq!(lines("lacks capability `aes-kwp`"), 1, "{text}");
    assert!(
        text.contains("CKM_AES_GCM not listed): unavailable: data CMKs with AES-GCM"),
        "{text}"
    );
    assert!(
        text.contains("aes-gcm=no aes-kwp=no aes-kw=yes hmac-sha256=yes"),
        "{text}"
    );
}
