//! Attacks on what cmkp11 itself adds to the token (issue 17): its own objects, the
//! versions and identities it assigns, key promotion, the lifecycle metadata it keeps in
//! the token, labels, encrypt-only keys and the deletion window. Each attack is played
//! as an insider holding the user PIN would play it, through the built module over a real
//! SoftHSM2 token (and, where the attack goes around cmkp11, through SoftHSM2 directly in
//! a child process with the same PIN), with the exact refusal asserted, next to a test
//! that the legitimate flow still works.
//!
//! Every test is `#[serial]`: SoftHSM2 2.6.1 races token key generation against
//! `C_FindObjects` in another thread.

#[macro_use]
mod common;
mod lifecycle_support;

use common::{rv_name, Template};
use cryptoki_sys::*;
use lifecycle_support::*;
use serial_test::serial;
use std::ffi::c_void;
use std::ptr;
use std::sync::OnceLock;

/// cmkp11 with the audit log on (so that its audit key and checkpoint exist).
fn module() -> &'static Module {
    static AUDIT: OnceLock<()> = OnceLock::new();
    AUDIT.get_or_init(|| {
        if child_role().is_none() {
            let env = common::test_env();
            let mut text = std::fs::read_to_string(&env.cmkp11_conf).unwrap();
            text.push_str(&format!(
                "\n[audit]\nfile = \"{}\"\n",
                env.dir.join("audit.log").display()
            ));
            std::fs::write(&env.cmkp11_conf, text).unwrap();
        }
    });
    cmk()
}

fn session() -> S {
    S::user(module())
}

fn rv(r: CK_RV) -> Rv<()> {
    if r == CKR_OK {
        Ok(())
    } else {
        Err(r)
    }
}

/// Child-process entry point (see `lifecycle_support`); not a test of its own.
#[test]
#[ignore = "entry point of child processes spawned by the other tests"]
fn child_entry() {
    let Some(role) = child_role() else { return };
    if direct_child(&role) {
        return;
    }
    match role.as_str() {
        "internal-objects" => {
            // The internal objects as SoftHSM2 shows them to anybody with the PIN.
            let s = S::user(softhsm());
            for o in ok(s.find(Template::default()), "find all") {
                let label = s.get(o, CKA_LABEL).unwrap_or_default();
                if label.starts_with(b"cmkp11:") {
                    say(&format!("internal {}", String::from_utf8_lossy(&label)));
                }
            }
            say("done");
        }
        other => panic!("unknown child role {other}"),
    }
}

// ---------------------------------------------------------------------------------------
// Raw calls the lifecycle helpers do not have.
// ---------------------------------------------------------------------------------------

fn copy_object(s: &S, o: H, mut t: Template) -> Rv<H> {
    let mut attrs = t.raw();
    let mut h: H = 0;
    rv(call!(
        s.m.f,
        C_CopyObject,
        s.h,
        o,
        attrs.as_mut_ptr(),
        attrs.len() as CK_ULONG,
        &mut h
    ))?;
    Ok(h)
}

fn set_attrs(s: &S, o: H, mut t: Template) -> Rv<()> {
    let mut attrs = t.raw();
    rv(call!(
        s.m.f,
        C_SetAttributeValue,
        s.h,
        o,
        attrs.as_mut_ptr(),
        attrs.len() as CK_ULONG
    ))
}

fn generate_pair(
    s: &S,
    mech: CK_MECHANISM_TYPE,
    mut public: Template,
    mut private: Template,
) -> Rv<(H, H)> {
    let mut pu = public.raw();
    let mut pr = private.raw();
    let mut m = Mech::new(mech).raw();
    let (mut a, mut b): (H, H) = (0, 0);
    rv(call!(
        s.m.f,
        C_GenerateKeyPair,
        s.h,
        &mut m,
        pu.as_mut_ptr(),
        pu.len() as CK_ULONG,
        pr.as_mut_ptr(),
        pr.len() as CK_ULONG,
        &mut a,
        &mut b
    ))?;
    Ok((a, b))
}

fn ec_pair(s: &S, token: bool, private: Template) -> Rv<(H, H)> {
    generate_pair(
        s,
        CKM_EC_KEY_PAIR_GEN,
        Template::default()
            .bytes(CKA_EC_PARAMS, &common::P256_PARAMS)
            .boolean(CKA_TOKEN, false)
            .boolean(CKA_VERIFY, true),
        private
            .boolean(CKA_TOKEN, token)
            .boolean(CKA_PRIVATE, true)
            .boolean(CKA_SIGN, true),
    )
}

fn unwrap_with(s: &S, m: &mut Mech, unwrapping: H, blob: &[u8], mut t: Template) -> Rv<H> {
    let mut raw = m.raw();
    let mut attrs = t.raw();
    let mut h: H = 0;
    rv(call!(
        s.m.f,
        C_UnwrapKey,
        s.h,
        &mut raw,
        unwrapping,
        blob.as_ptr() as *mut u8,
        blob.len() as CK_ULONG,
        attrs.as_mut_ptr(),
        attrs.len() as CK_ULONG,
        &mut h
    ))?;
    Ok(h)
}

fn derive(s: &S, base: H, mut t: Template) -> Rv<H> {
    // ECDH1 (the one derivation offered) with a peer point of the right form.
    let mut point = vec![0x04, 0x41, 0x04];
    point.extend([1u8; 64]);
    let mut p = CK_ECDH1_DERIVE_PARAMS {
        kdf: CKD_NULL,
        ulSharedDataLen: 0,
        pSharedData: ptr::null_mut(),
        ulPublicDataLen: point.len() as CK_ULONG,
        pPublicData: point.as_mut_ptr(),
    };
    let mut m = CK_MECHANISM {
        mechanism: CKM_ECDH1_DERIVE,
        pParameter: &mut p as *mut _ as *mut c_void,
        ulParameterLen: std::mem::size_of::<CK_ECDH1_DERIVE_PARAMS>() as CK_ULONG,
    };
    let mut attrs = t.raw();
    let mut h: H = 0;
    rv(call!(
        s.m.f,
        C_DeriveKey,
        s.h,
        &mut m,
        base,
        attrs.as_mut_ptr(),
        attrs.len() as CK_ULONG,
        &mut h
    ))?;
    Ok(h)
}

fn digest_key(s: &S, key: H) -> Rv<()> {
    let mut m = Mech::new(CKM_SHA256).raw();
    rv(call!(s.m.f, C_DigestInit, s.h, &mut m))?;
    let r = rv(call!(s.m.f, C_DigestKey, s.h, key));
    let mut out = [0u8; 32];
    let mut n: CK_ULONG = 32;
    let _ = call!(s.m.f, C_DigestFinal, s.h, out.as_mut_ptr(), &mut n);
    r
}

fn verify_init(s: &S, m: &mut Mech, key: H) -> Rv<()> {
    let mut raw = m.raw();
    rv(call!(s.m.f, C_VerifyInit, s.h, &mut raw, key))
}

/// Ends whatever operation an `*Init` that should have failed started.
fn cancel_all(s: &S) {
    let mut buf = vec![0u8; 4096];
    let mut n: CK_ULONG = buf.len() as CK_ULONG;
    let _ = call!(s.m.f, C_EncryptFinal, s.h, buf.as_mut_ptr(), &mut n);
    n = buf.len() as CK_ULONG;
    let _ = call!(s.m.f, C_DecryptFinal, s.h, buf.as_mut_ptr(), &mut n);
    n = buf.len() as CK_ULONG;
    let _ = call!(s.m.f, C_SignFinal, s.h, buf.as_mut_ptr(), &mut n);
    let _ = call!(s.m.f, C_VerifyFinal, s.h, buf.as_mut_ptr(), 16);
}

fn label_of(s: &S, o: H) -> Rv<Vec<u8>> {
    s.get(o, CKA_LABEL)
}

fn is_internal(label: &[u8]) -> bool {
    label.starts_with(b"cmkp11:")
}

/// The internal objects in the token (read by a child with SoftHSM2 directly).
fn internal_objects() -> Vec<String> {
    run_child("internal-objects", &[])
        .into_iter()
        .filter_map(|l| l.strip_prefix("internal ").map(str::to_string))
        .collect()
}

// =======================================================================================
// 17.1 cmkp11's own objects never get an application handle.
// =======================================================================================

/// Makes a state record, the audit key and the audit checkpoint exist.
fn make_internal_objects(s: &S) -> H {
    let label = unique_label("ap-internal");
    let k = new_cmk(s, Role::Data, &label, None);
    ok(s.disable(k), "CMKP11_Disable");
    ok(s.enable(k), "CMKP11_Enable");
    // A logout writes a MACed checkpoint (the audit key is made on first use).
    ok(s.logout(), "C_Logout");
    ok(s.login(), "C_Login");
    let internal = internal_objects();
    for want in [
        "cmkp11:state",
        "cmkp11:audit-mac",
        "cmkp11:audit-checkpoint",
    ] {
        assert!(
            internal.iter().any(|l| l == want),
            "the token holds no `{want}` object: {internal:?}"
        );
    }
    k
}

/// Every entry point that takes an object handle, tried on `h`: the codes each returned
/// (`CKR_OK` included), by name.
fn every_entry_point(s: &S, h: H, wrap_cmk: H, dek: H) -> Vec<(&'static str, CK_RV)> {
    let code = |r: Rv<()>| r.err().unwrap_or(CKR_OK);
    let codeh = |r: Rv<H>| r.err().unwrap_or(CKR_OK);
    let mut out = vec![];
    out.push(("C_GetAttributeValue", code(label_of(s, h).map(drop))));
    out.push((
        "C_SetAttributeValue",
        code(set_attrs(
            s,
            h,
            Template::default().bytes(CKA_SUBJECT, b"x"),
        )),
    ));
    out.push((
        "C_CopyObject",
        codeh(copy_object(
            s,
            h,
            Template::default().boolean(CKA_TOKEN, false),
        )),
    ));
    out.push((
        "C_EncryptInit",
        code(s.encrypt_init(&mut Mech::gcm(&[1; 12], b""), h)),
    ));
    cancel_all(s);
    out.push((
        "C_DecryptInit",
        code(s.decrypt_init(&mut Mech::gcm(&[1; 12], b""), h)),
    ));
    cancel_all(s);
    out.push((
        "C_SignInit(HMAC)",
        code(s.sign_init(&mut Mech::new(CKM_SHA256_HMAC), h)),
    ));
    cancel_all(s);
    out.push((
        "C_VerifyInit(HMAC)",
        code(verify_init(s, &mut Mech::new(CKM_SHA256_HMAC), h)),
    ));
    cancel_all(s);
    out.push((
        "C_WrapKey(wrapping)",
        code(s.wrap(&mut Mech::kwp(), h, dek).map(drop)),
    ));
    out.push((
        "C_WrapKey(key)",
        code(s.wrap(&mut Mech::kwp(), wrap_cmk, h).map(drop)),
    ));
    out.push((
        "C_UnwrapKey",
        codeh(unwrap_with(
            s,
            &mut Mech::kwp(),
            h,
            &[0u8; 40],
            Template::default()
                .ulong(CKA_CLASS, CKO_SECRET_KEY)
                .ulong(CKA_KEY_TYPE, CKK_AES),
        )),
    ));
    out.push((
        "C_DeriveKey",
        codeh(derive(
            s,
            h,
            Template::default()
                .ulong(CKA_CLASS, CKO_SECRET_KEY)
                .ulong(CKA_KEY_TYPE, CKK_AES),
        )),
    ));
    out.push(("C_DigestKey", code(digest_key(s, h))));
    out.push(("C_DestroyObject", code(s.destroy(h))));
    out
}

#[test]
#[serial]
fn internal_objects_are_never_found_nor_reachable_by_handle_numbers() {
    let s = session();
    let mine = make_internal_objects(&s);
    let wrap_cmk = new_cmk(&s, Role::Wrap, &unique_label("ap-int-wrap"), None);
    let dek = new_dek(&s);
    // An empty template finds everything the application may see, and nothing of cmkp11's.
    let all = ok(s.find(Template::default()), "C_FindObjects(empty template)");
    assert!(all.contains(&mine), "the application's own CMK is found");
    for &h in &all {
        let l = ok(label_of(&s, h), "CKA_LABEL of a found object");
        assert!(
            !is_internal(&l),
            "C_FindObjects found `{}`",
            String::from_utf8_lossy(&l)
        );
    }
    // Every search that names them finds nothing.
    for label in [
        "cmkp11:state",
        "cmkp11:audit-mac",
        "cmkp11:audit-checkpoint",
    ] {
        for t in [
            Template::default().bytes(CKA_LABEL, label.as_bytes()),
            Template::default().bytes(CKA_APPLICATION, b"cmkp11"),
            Template::default().ulong(CKA_CLASS, CKO_DATA),
            Template::default()
                .ulong(CKA_CLASS, CKO_SECRET_KEY)
                .boolean(CKA_TOKEN, true),
        ] {
            for h in ok(s.find(t), "C_FindObjects") {
                let l = ok(label_of(&s, h), "CKA_LABEL");
                assert!(
                    !is_internal(&l),
                    "search for {label} found an internal object"
                );
            }
        }
    }
    // Probing every handle number up to well past the highest handed out: a handle that
    // works at all names an object of the application's, through every entry point.
    let top = all.iter().copied().max().unwrap_or(0) + 300;
    let mut valid = 0;
    for h in 1..=top {
        if [mine, wrap_cmk, dek].contains(&h) {
            continue;
        }
        let label = label_of(&s, h);
        if let Ok(l) = &label {
            valid += 1;
            assert!(
                !is_internal(l),
                "handle {h} reaches `{}`",
                String::from_utf8_lossy(l)
            );
            continue;
        }
        assert_eq!(
            label.unwrap_err(),
            CKR_OBJECT_HANDLE_INVALID,
            "C_GetAttributeValue on probed handle {h}"
        );
        for (what, code) in every_entry_point(&s, h, wrap_cmk, dek) {
            assert!(
                matches!(
                    code,
                    CKR_OBJECT_HANDLE_INVALID
                        | CKR_KEY_HANDLE_INVALID
                        | CKR_WRAPPING_KEY_HANDLE_INVALID
                        | CKR_UNWRAPPING_KEY_HANDLE_INVALID
                ),
                "{what} on probed handle {h} (no object of the application's): {}",
                rv_name(code)
            );
        }
    }
    assert!(valid > 0, "no valid handle was probed at all");
    // Nothing of cmkp11's was touched.
    let after = internal_objects();
    for want in [
        "cmkp11:state",
        "cmkp11:audit-mac",
        "cmkp11:audit-checkpoint",
    ] {
        assert!(after.iter().any(|l| l == want), "`{want}` gone: {after:?}");
    }
}

#[test]
#[serial]
fn internal_namespace_cannot_be_entered_by_create_copy_or_rename() {
    let s = session();
    let data = ok(
        s.create(
            Template::default()
                .ulong(CKA_CLASS, CKO_DATA)
                .boolean(CKA_TOKEN, false)
                .bytes(CKA_LABEL, b"mine")
                .bytes(CKA_VALUE, b"v"),
        ),
        "C_CreateObject(data)",
    );
    let reserved = |what: &str, t: Template| match what {
        "label" => t.bytes(CKA_LABEL, b"cmkp11:state"),
        _ => t.bytes(CKA_APPLICATION, b"cmkp11"),
    };
    for what in ["label", "application"] {
        let full = Template::default()
            .ulong(CKA_CLASS, CKO_DATA)
            .boolean(CKA_TOKEN, true)
            .bytes(CKA_VALUE, b"{}");
        expect_rv(
            s.create(reserved(what, full)),
            CKR_ATTRIBUTE_VALUE_INVALID,
            &format!("C_CreateObject({what})"),
        );
        expect_rv(
            copy_object(&s, data, reserved(what, Template::default())),
            CKR_ATTRIBUTE_VALUE_INVALID,
            &format!("C_CopyObject({what})"),
        );
        expect_rv(
            set_attrs(&s, data, reserved(what, Template::default())),
            CKR_ATTRIBUTE_VALUE_INVALID,
            &format!("C_SetAttributeValue({what})"),
        );
    }
    // Legitimate: the application's own data object is renamed and copied.
    ok(
        set_attrs(&s, data, Template::default().bytes(CKA_LABEL, b"mine-2")),
        "rename",
    );
    let c = ok(
        copy_object(&s, data, Template::default()),
        "copy a data object",
    );
    assert_eq!(ok(label_of(&s, c), "label"), b"mine-2");
}

// =======================================================================================
// 17.8 The deletion window cannot be shortened from the application.
// =======================================================================================

#[test]
#[serial]
fn login_never_destroys_keys_past_their_date_only_purge_does() {
    let s = session();
    let label = unique_label("ap-purge");
    let id = format!("ap-purge-{}", std::process::id()).into_bytes();
    let k = new_cmk(&s, Role::Wrap, &label, Some(&id));
    ok(s.schedule_deletion(k, 1), "CMKP11_ScheduleDeletion(1)");
    expire(&id);
    // Logins of read-write sessions, as an application makes them, destroy nothing.
    for _ in 0..2 {
        ok(s.logout(), "C_Logout");
        ok(s.login(), "C_Login");
    }
    assert_eq!(inspect(&label, &id).0, 1, "the key's object after logins");
    // The operator's purge destroys it, and the audit log names it.
    ok(s.purge(), "CMKP11_Purge");
    assert_eq!(
        inspect(&label, &id),
        (0, 0),
        "after CMKP11_Purge (keys, records)"
    );
    let log = std::fs::read_to_string(common::test_env().dir.join("audit.log")).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("\"op\":\"purge\"") && l.contains(&format!("\"key\":\"{label}\""))),
        "no purge record names `{label}`"
    );
}
