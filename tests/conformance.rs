//! Conformance fixes found by external suites (google/pkcs11test, OpenSC p11test, PyKCS11's
//! and python-pkcs11's tests), played through the built module against SoftHSM2: the
//! mechanism list tells the truth about mechanism types cryptoki does not know, and
//! `C_InitToken` passes the 32-byte label through as PKCS#11 defines it.

#[macro_use]
mod common;

use common::{mech_with, raw, raw_login, raw_open_session, raw_token_slot, Template};
use cryptoki_sys::*;
use serial_test::serial;
use std::ptr;

fn init() {
    common::test_env();
    let r = ck!(raw().f, C_Initialize, ptr::null_mut());
    assert!(
        r == CKR_OK || r == CKR_CRYPTOKI_ALREADY_INITIALIZED,
        "C_Initialize: {r:#x}"
    );
}

fn mechanism_list(slot: CK_SLOT_ID) -> Vec<CK_MECHANISM_TYPE> {
    let mut n: CK_ULONG = 0;
    assert_rv!(
        ck!(raw().f, C_GetMechanismList, slot, ptr::null_mut(), &mut n),
        CKR_OK
    );
    let mut v = vec![0; n as usize];
    assert_rv!(
        ck!(raw().f, C_GetMechanismList, slot, v.as_mut_ptr(), &mut n),
        CKR_OK
    );
    v.truncate(n as usize);
    v
}

/// The SHA-224 mechanisms SoftHSM2 implements are listed, described and usable: cryptoki's
/// conversion does not know `CKM_SHA224`, `CKM_SHA224_RSA_PKCS` and
/// `CKM_SHA224_RSA_PKCS_PSS`, and cmkp11 used to drop them from the list.
#[test]
#[serial]
fn sha224_mechanisms_are_listed_described_and_usable() {
    init();
    let slot = raw_token_slot();
    let list = mechanism_list(slot);
    for (name, m) in [
        ("CKM_SHA224", CKM_SHA224),
        ("CKM_SHA224_RSA_PKCS", CKM_SHA224_RSA_PKCS),
        ("CKM_SHA224_RSA_PKCS_PSS", CKM_SHA224_RSA_PKCS_PSS),
        ("CKM_SHA224_HMAC", CKM_SHA224_HMAC),
    ] {
        assert!(list.contains(&m), "{name} missing from C_GetMechanismList");
        let mut info = CK_MECHANISM_INFO::default();
        assert_rv!(
            ck!(raw().f, C_GetMechanismInfo, slot, m, &mut info),
            CKR_OK,
            "{name}"
        );
    }
    let info_flags = |m| {
        let mut info = CK_MECHANISM_INFO::default();
        assert_rv!(ck!(raw().f, C_GetMechanismInfo, slot, m, &mut info), CKR_OK);
        info.flags
    };
    assert_ne!(info_flags(CKM_SHA224) & CKF_DIGEST, 0);
    assert_ne!(info_flags(CKM_SHA224_RSA_PKCS_PSS) & CKF_SIGN, 0);

    // A digest, and a PSS signature with SHA-224 that verifies.
    let s = raw_open_session(slot);
    raw_login(s);
    let mut m = common::mech(CKM_SHA224);
    assert_rv!(ck!(raw().f, C_DigestInit, s, &mut m), CKR_OK);
    let mut data = b"conformance".to_vec();
    let mut digest = [0u8; 28];
    let mut n = digest.len() as CK_ULONG;
    assert_rv!(
        ck!(
            raw().f,
            C_Digest,
            s,
            data.as_mut_ptr(),
            data.len() as CK_ULONG,
            digest.as_mut_ptr(),
            &mut n
        ),
        CKR_OK
    );
    assert_eq!(n, 28);

    let mut public = Template::default()
        .boolean(CKA_TOKEN, false)
        .boolean(CKA_VERIFY, true)
        .ulong(CKA_MODULUS_BITS, 2048)
        .bytes(CKA_PUBLIC_EXPONENT, &[1, 0, 1]);
    let mut private = Template::default()
        .boolean(CKA_TOKEN, false)
        .boolean(CKA_SIGN, true)
        .boolean(CKA_SENSITIVE, true);
    let (mut pa, mut pr) = (public.raw(), private.raw());
    let mut gen = common::mech(CKM_RSA_PKCS_KEY_PAIR_GEN);
    let (mut pubk, mut privk) = (0, 0);
    assert_rv!(
        ck!(
            raw().f,
            C_GenerateKeyPair,
            s,
            &mut gen,
            pa.as_mut_ptr(),
            pa.len() as CK_ULONG,
            pr.as_mut_ptr(),
            pr.len() as CK_ULONG,
            &mut pubk,
            &mut privk
        ),
        CKR_OK
    );
    let mut params = CK_RSA_PKCS_PSS_PARAMS {
        hashAlg: CKM_SHA224,
        mgf: CKG_MGF1_SHA224,
        sLen: 28,
    };
    let len = std::mem::size_of::<CK_RSA_PKCS_PSS_PARAMS>();
    let mut m = mech_with(CKM_SHA224_RSA_PKCS_PSS, &mut params, len);
    assert_rv!(ck!(raw().f, C_SignInit, s, &mut m, privk), CKR_OK);
    let mut sig = [0u8; 256];
    let mut n = sig.len() as CK_ULONG;
    assert_rv!(
        ck!(
            raw().f,
            C_Sign,
            s,
            data.as_mut_ptr(),
            data.len() as CK_ULONG,
            sig.as_mut_ptr(),
            &mut n
        ),
        CKR_OK
    );
    assert_eq!(n, 256);
    let mut m = mech_with(CKM_SHA224_RSA_PKCS_PSS, &mut params, len);
    assert_rv!(ck!(raw().f, C_VerifyInit, s, &mut m, pubk), CKR_OK);
    assert_rv!(
        ck!(
            raw().f,
            C_Verify,
            s,
            data.as_mut_ptr(),
            data.len() as CK_ULONG,
            sig.as_mut_ptr(),
            n
        ),
        CKR_OK
    );
    sig[0] ^= 1;
    let mut m = mech_with(CKM_SHA224_RSA_PKCS_PSS, &mut params, len);
    assert_rv!(ck!(raw().f, C_VerifyInit, s, &mut m, pubk), CKR_OK);
    assert_rv!(
        ck!(
            raw().f,
            C_Verify,
            s,
            data.as_mut_ptr(),
            data.len() as CK_ULONG,
            sig.as_mut_ptr(),
            n
        ),
        CKR_SIGNATURE_INVALID
    );
    assert_rv!(ck!(raw().f, C_CloseSession, s), CKR_OK);
}

/// Asking for the mechanism list writes no error line: cryptoki's conversion used to log
/// "Mechanism type N is not supported" for each type it does not know, on every call.
/// Played with pkcs11-tool, a real client, with the module's log on stderr at `warn`.
#[test]
#[serial]
fn mechanism_list_leaves_the_log_quiet() {
    let env = common::test_env();
    let out = std::process::Command::new("pkcs11-tool")
        .args(["--module"])
        .arg(common::module_path())
        .args(["--token-label", common::TOKEN_LABEL, "--list-mechanisms"])
        .env("SOFTHSM2_CONF", &env.softhsm_conf)
        .env("CMKP11_CONFIG", &env.cmkp11_conf)
        .output()
        .expect("run pkcs11-tool (is opensc installed?)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "pkcs11-tool -M: {stdout}{stderr}");
    assert!(stdout.contains("SHA224-RSA-PKCS-PSS"), "{stdout}");
    assert!(
        !stderr.contains("not supported"),
        "log lines on stderr: {stderr}"
    );
    assert!(stderr.trim().is_empty(), "unexpected stderr: {stderr}");
}
