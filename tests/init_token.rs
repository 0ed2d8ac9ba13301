//! `C_InitToken` through the built module against SoftHSM2 (a file of its own: it
//! initializes this test process's token again).

#[macro_use]
mod common;

use common::{raw, raw_token_slot};
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

/// `C_InitToken` passes the 32-byte label field through as PKCS#11 defines it (blank
/// padded bytes): a label that is not UTF-8 after a NUL is the token's to accept, as
/// SoftHSM2 does directly; cmkp11 used to answer `CKR_ARGUMENTS_BAD`.
#[test]
#[serial]
fn init_token_passes_the_label_field_through() {
    init();
    // cmkp11 exposes initialized tokens only: this process's own test token is
    // initialized again (with the SO PIN), which is why this test has a file of its own.
    let free = raw_token_slot();
    let mut label = [b' '; 32];
    label[..9].copy_from_slice(b"conform\0\xff");
    let mut so_pin = common::SO_PIN.as_bytes().to_vec();
    assert_rv!(
        ck!(
            raw().f,
            C_InitToken,
            free,
            so_pin.as_mut_ptr(),
            so_pin.len() as CK_ULONG,
            label.as_mut_ptr()
        ),
        CKR_OK
    );
    let mut info: CK_TOKEN_INFO = unsafe { std::mem::zeroed() };
    assert_rv!(ck!(raw().f, C_GetTokenInfo, free, &mut info), CKR_OK);
    assert_ne!(info.flags & CKF_TOKEN_INITIALIZED, 0);
    assert_eq!(&info.label[..7], b"conform");
    // A NULL label is still refused, before the token sees the call.
    assert_rv!(
        ck!(
            raw().f,
            C_InitToken,
            free,
            so_pin.as_mut_ptr(),
            so_pin.len() as CK_ULONG,
            ptr::null_mut()
        ),
        CKR_ARGUMENTS_BAD
    );
}
