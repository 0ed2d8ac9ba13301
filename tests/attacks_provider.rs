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
                "\n[audit]\nfile = \"{}\"\n\n[[access]]\nkeys = \"ap-eo-*\"\noperations = [\"encrypt\"]\n",
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
        "plant" => plant_versions(),
        "sealed" => try_unseal(),
        "gcm-open" => gcm_open(),
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
    // The audit log MACs its head about once a second (the audit key is made on first
    // use) and keeps a checkpoint in the token.
    let mut internal = vec![];
    for _ in 0..10 {
        std::thread::sleep(std::time::Duration::from_millis(1100));
        ok(s.disable(k), "CMKP11_Disable");
        ok(s.enable(k), "CMKP11_Enable");
        internal = internal_objects();
        if internal.iter().any(|l| l == "cmkp11:audit-checkpoint") {
            break;
        }
    }
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
    let mut out = vec![("C_GetAttributeValue", code(label_of(s, h).map(drop)))];
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
        // (A handle found before a logout of another test may be stale: issue 13.2.)
        let Ok(l) = label_of(&s, h) else { continue };
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
                let Ok(l) = label_of(&s, h) else { continue };
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

// =======================================================================================
// 17.2 Versions and identities are cmkp11's to assign.
// =======================================================================================

/// `id` with cmkp11's version tag and number `v` (the layout of a version's `CKA_ID`).
fn version_id(id: &[u8], v: u32) -> Vec<u8> {
    [id, b"#cmkp11v", &v.to_be_bytes()].concat()
}

fn aes_data(token: bool) -> Template {
    aes(token)
        .boolean(CKA_ENCRYPT, true)
        .boolean(CKA_DECRYPT, true)
}

#[test]
#[serial]
fn no_template_may_carry_the_version_tag() {
    let s = session();
    let victim_id = format!("ap-tag-{}", std::process::id()).into_bytes();
    let victim_label = unique_label("ap-tag");
    let victim = new_cmk(&s, Role::Data, &victim_label, Some(&victim_id));
    let forged = version_id(&victim_id, 2);
    let data = ok(
        s.create(
            Template::default()
                .ulong(CKA_CLASS, CKO_DATA)
                .boolean(CKA_TOKEN, false)
                .bytes(CKA_VALUE, b"v"),
        ),
        "C_CreateObject(data)",
    );
    let wrap = new_cmk(&s, Role::Wrap, &unique_label("ap-tag-w"), None);
    let blob = ok(s.wrap(&mut Mech::kwp(), wrap, new_dek(&s)), "C_WrapKey");
    let bad = CKR_ATTRIBUTE_VALUE_INVALID;
    for token in [true, false] {
        expect_rv(
            s.generate_key(CKM_AES_KEY_GEN, aes_data(token).bytes(CKA_ID, &forged)),
            bad,
            &format!("C_GenerateKey(token={token}, tagged id)"),
        );
        expect_rv(
            ec_pair(&s, token, Template::default().bytes(CKA_ID, &forged)),
            bad,
            &format!("C_GenerateKeyPair(token={token}, tagged private id)"),
        );
    }
    expect_rv(
        s.create(
            Template::default()
                .ulong(CKA_CLASS, CKO_DATA)
                .bytes(CKA_ID, &forged)
                .bytes(CKA_VALUE, b"v"),
        ),
        bad,
        "C_CreateObject(tagged id)",
    );
    expect_rv(
        copy_object(&s, data, Template::default().bytes(CKA_ID, &forged)),
        bad,
        "C_CopyObject(tagged id)",
    );
    expect_rv(
        set_attrs(&s, data, Template::default().bytes(CKA_ID, &forged)),
        bad,
        "C_SetAttributeValue(tagged id)",
    );
    expect_rv(
        unwrap_with(
            &s,
            &mut Mech::kwp(),
            wrap,
            &blob,
            Template::default()
                .ulong(CKA_CLASS, CKO_SECRET_KEY)
                .ulong(CKA_KEY_TYPE, CKK_AES)
                .bytes(CKA_ID, &forged),
        ),
        bad,
        "C_UnwrapKey(tagged id)",
    );
    // The victim still has its one version.
    assert_eq!(s.ulong(victim, CKA_CMKP11_VERSION_COUNT), 1);
    // Legitimate: ids without the tag, on every kind of object.
    ok(
        s.generate_key(CKM_AES_KEY_GEN, aes_data(false).bytes(CKA_ID, b"my-dek")),
        "session key with an id",
    );
    let d = new_dek(&s);
    ok(
        set_attrs(&s, d, Template::default().bytes(CKA_ID, b"plain")),
        "a DEK's id",
    );
}

#[test]
#[serial]
fn no_new_cmk_may_take_an_existing_cmks_id_or_label() {
    let s = session();
    let id = format!("ap-clash-{}", std::process::id()).into_bytes();
    let label = unique_label("ap-clash");
    new_cmk(&s, Role::Wrap, &label, Some(&id));
    let pid = format!("ap-clash-priv-{}", std::process::id()).into_bytes();
    let plabel = unique_label("ap-clash-priv");
    ok(
        ec_pair(
            &s,
            true,
            Template::default()
                .bytes(CKA_ID, &pid)
                .bytes(CKA_LABEL, plabel.as_bytes()),
        ),
        "token EC pair",
    );
    let bad = CKR_ATTRIBUTE_VALUE_INVALID;
    for (what, other_id) in [("secret CMK's id", &id), ("private CMK's id", &pid)] {
        expect_rv(
            s.generate_key(
                CKM_AES_KEY_GEN,
                cmk_template(Role::Data, &unique_label("ap-x"), Some(other_id)),
            ),
            bad,
            &format!("C_GenerateKey with a {what}"),
        );
        expect_rv(
            ec_pair(&s, true, Template::default().bytes(CKA_ID, other_id)),
            bad,
            &format!("C_GenerateKeyPair with a {what}"),
        );
        // A session key carrying the id cannot be promoted under it.
        let (_, q) = ok(
            ec_pair(&s, false, Template::default().bytes(CKA_ID, other_id)),
            "session pair",
        );
        expect_rv(
            copy_object(&s, q, Template::default().boolean(CKA_TOKEN, true)),
            bad,
            &format!("C_CopyObject promoting a key with a {what}"),
        );
    }
    for l in [&label, &plabel] {
        expect_rv(
            ec_pair(&s, true, Template::default().bytes(CKA_LABEL, l.as_bytes())),
            bad,
            &format!("C_GenerateKeyPair with the label `{l}`"),
        );
    }
    // An id that looks like the identity of a key named by its label.
    expect_rv(
        s.generate_key(
            CKM_AES_KEY_GEN,
            cmk_template(
                Role::Data,
                &unique_label("ap-y"),
                Some(format!("label:{label}").as_bytes()),
            ),
        ),
        bad,
        "C_GenerateKey with a label identity as id",
    );
    // Legitimate: new ids and labels.
    new_cmk(
        &s,
        Role::Data,
        &unique_label("ap-new"),
        Some(b"ap-new-id-unique"),
    );
    ok(
        ec_pair(
            &s,
            true,
            Template::default().bytes(CKA_ID, b"ap-new-priv-unique"),
        ),
        "a new private CMK",
    );
}

#[test]
#[serial]
fn cmk_label_and_id_are_read_only_on_secret_and_private_keys() {
    let s = session();
    let k = new_cmk(&s, Role::Data, &unique_label("ap-ro"), None);
    let (_, q) = ok(
        ec_pair(
            &s,
            true,
            Template::default().bytes(CKA_LABEL, unique_label("ap-ro-priv").as_bytes()),
        ),
        "token EC pair",
    );
    for (what, h) in [("secret", k), ("private", q)] {
        for (a, v) in [
            (CKA_LABEL, b"renamed".as_slice()),
            (CKA_ID, b"new-id".as_slice()),
        ] {
            expect_rv(
                set_attrs(&s, h, Template::default().bytes(a, v)),
                CKR_ATTRIBUTE_READ_ONLY,
                &format!("C_SetAttributeValue(0x{a:x}) on a {what} CMK"),
            );
        }
    }
    // Legitimate: a session key's label still changes.
    let d = new_dek(&s);
    ok(
        set_attrs(&s, d, Template::default().bytes(CKA_LABEL, b"dek-2")),
        "rename a DEK",
    );
}

#[test]
#[serial]
fn every_cmk_gets_an_identity_and_stays_destroyable() {
    let s = session();
    let (_, q) = ok(
        ec_pair(&s, true, Template::default()),
        "token EC pair, no label, no id",
    );
    let id = ok(s.get(q, CKA_ID), "CKA_ID");
    assert!(
        !id.is_empty(),
        "a CMK made without id or label got no identity"
    );
    // Named once (NSS's flow), then fixed.
    let name = unique_label("ap-named");
    ok(
        set_attrs(&s, q, Template::default().bytes(CKA_ID, name.as_bytes())),
        "naming a key generated without a name",
    );
    expect_rv(
        set_attrs(&s, q, Template::default().bytes(CKA_ID, b"again")),
        CKR_ATTRIBUTE_READ_ONLY,
        "naming it a second time",
    );
    ok(
        s.destroy(q),
        "C_DestroyObject on a CMK made without label or id",
    );
    assert_eq!(s.ulong(q, CKA_CMKP11_STATE), STATE_PENDING_DELETION);
    let k = ok(
        s.generate_key(CKM_AES_KEY_GEN, aes_data(true)),
        "token AES key, no label, no id",
    );
    assert!(!ok(s.get(k, CKA_ID), "CKA_ID").is_empty());
    ok(s.destroy(k), "C_DestroyObject");
    assert_eq!(s.ulong(k, CKA_CMKP11_STATE), STATE_PENDING_DELETION);
}

/// Child: plants objects next to a victim CMK with SoftHSM2 directly (the PIN is all it
/// takes): a known-value key, and one generated in the token with another role, both
/// with the victim's label and the id of its version 2.
fn plant_versions() {
    let s = S::user(softhsm());
    let label = arg("LC_LABEL");
    let id = version_id(arg("LC_ID").as_bytes(), 2);
    let known = s.create(
        Template::default()
            .ulong(CKA_CLASS, CKO_SECRET_KEY)
            .ulong(CKA_KEY_TYPE, CKK_AES)
            .boolean(CKA_TOKEN, true)
            .boolean(CKA_SENSITIVE, true)
            .boolean(CKA_ENCRYPT, true)
            .boolean(CKA_DECRYPT, true)
            .bytes(CKA_VALUE, &[0x42; 32])
            .bytes(CKA_LABEL, label.as_bytes())
            .bytes(CKA_ID, &id),
    );
    say(&format!(
        "known {}",
        known.map_or_else(rv_name, |_| "ok".into())
    ));
    let wrap = s.generate_key(
        CKM_AES_KEY_GEN,
        aes(true)
            .boolean(CKA_WRAP, true)
            .boolean(CKA_UNWRAP, true)
            .boolean(CKA_ENCRYPT, true)
            .boolean(CKA_DECRYPT, true)
            .bytes(CKA_LABEL, label.as_bytes())
            .bytes(CKA_ID, &version_id(arg("LC_ID").as_bytes(), 3)),
    );
    say(&format!(
        "other-role {}",
        wrap.map_or_else(rv_name, |_| "ok".into())
    ));
}

#[test]
#[serial]
fn a_version_planted_in_the_token_is_never_used() {
    let s = session();
    let label = unique_label("ap-plant");
    let id = format!("ap-plant-{}", std::process::id()).into_bytes();
    let k = new_cmk(&s, Role::Data, &label, Some(&id));
    let lines = run_child(
        "plant",
        &[
            ("LC_LABEL", label.clone()),
            ("LC_ID", String::from_utf8(id.clone()).unwrap()),
        ],
    );
    assert!(lines.iter().any(|l| l == "known ok"), "{lines:?}");
    assert!(lines.iter().any(|l| l == "other-role ok"), "{lines:?}");
    std::thread::sleep(std::time::Duration::from_millis(700));
    // Still one version, and it is the primary: data encrypted now opens with version 1.
    assert_eq!(s.ulong(k, CKA_CMKP11_VERSION_COUNT), 1, "VERSION_COUNT");
    assert_eq!(s.ulong(k, CKA_CMKP11_VERSION), 1, "primary VERSION");
    for v in [2, 3] {
        for h in ok(s.find_version(&label, v), "find version") {
            // Found as objects, never usable.
            expect_rv(
                s.encrypt_init(&mut Mech::gcm(&[3; 12], b""), h),
                CKR_KEY_FUNCTION_NOT_PERMITTED,
                &format!("C_EncryptInit with planted version {v}"),
            );
        }
    }
    let ct = ok(
        s.encrypt(&mut Mech::cbc_pad(&[5; 16]), k, b"secret"),
        "encrypt with the CMK",
    );
    let v1 = s.version_handle(&label, 1);
    assert_eq!(
        ok(
            s.decrypt(&mut Mech::cbc_pad(&[5; 16]), v1, &ct),
            "decrypt with version 1"
        ),
        b"secret"
    );
}

// =======================================================================================
// 17.3 Only keys born in the token become CMKs.
// =======================================================================================

#[test]
#[serial]
fn only_session_keys_generated_in_the_token_are_promoted() {
    let s = session();
    let promote = |h: H, label: &str| {
        copy_object(
            &s,
            h,
            Template::default()
                .boolean(CKA_TOKEN, true)
                .bytes(CKA_LABEL, label.as_bytes()),
        )
    };
    // Unwrapped under a wrap CMK: someone may have made the blob from a known key.
    let wrap = new_cmk(&s, Role::Wrap, &unique_label("ap-promo-w"), None);
    let blob = ok(s.wrap(&mut Mech::kwp(), wrap, new_dek(&s)), "C_WrapKey");
    let unwrapped = ok(s.unwrap_dek(&mut Mech::kwp(), wrap, &blob), "C_UnwrapKey");
    expect_rv(
        promote(unwrapped, &unique_label("ap-promo-u")),
        CKR_ACTION_PROHIBITED,
        "C_CopyObject promoting an unwrapped key",
    );
    // Derived (ECDH1): the peer knows the shared secret.
    let (_, base) = ok(
        generate_pair(
            &s,
            CKM_EC_KEY_PAIR_GEN,
            Template::default()
                .bytes(CKA_EC_PARAMS, &common::P256_PARAMS)
                .boolean(CKA_TOKEN, false),
            Template::default()
                .boolean(CKA_TOKEN, false)
                .boolean(CKA_DERIVE, true),
        ),
        "session EC derive pair",
    );
    let (peer, _) = ok(ec_pair(&s, false, Template::default()), "peer pair");
    let point = ok(s.get(peer, CKA_EC_POINT), "peer CKA_EC_POINT");
    let mut p = CK_ECDH1_DERIVE_PARAMS {
        kdf: CKD_NULL,
        ulSharedDataLen: 0,
        pSharedData: ptr::null_mut(),
        ulPublicDataLen: point.len() as CK_ULONG,
        pPublicData: point.as_ptr() as *mut u8,
    };
    let mut m = CK_MECHANISM {
        mechanism: CKM_ECDH1_DERIVE,
        pParameter: &mut p as *mut _ as *mut c_void,
        ulParameterLen: std::mem::size_of::<CK_ECDH1_DERIVE_PARAMS>() as CK_ULONG,
    };
    let mut t = Template::default()
        .ulong(CKA_CLASS, CKO_SECRET_KEY)
        .ulong(CKA_KEY_TYPE, CKK_AES)
        .ulong(CKA_VALUE_LEN, 32)
        .boolean(CKA_ENCRYPT, true)
        .boolean(CKA_DECRYPT, true);
    let mut attrs = t.raw();
    let mut derived: H = 0;
    ok(
        rv(call!(
            s.m.f,
            C_DeriveKey,
            s.h,
            &mut m,
            base,
            attrs.as_mut_ptr(),
            attrs.len() as CK_ULONG,
            &mut derived
        )),
        "C_DeriveKey(ECDH1)",
    );
    expect_rv(
        promote(derived, &unique_label("ap-promo-d")),
        CKR_ACTION_PROHIBITED,
        "C_CopyObject promoting a derived key",
    );

    // Legitimate: Java keytool's flow (a session key pair, the private key copied into
    // the token with CKA_TOKEN, CKA_ID and CKA_LABEL) and a generated session AES key.
    let id = format!("ap-keytool-{}", std::process::id()).into_bytes();
    let label = unique_label("ap-keytool");
    let (_, q) = ok(ec_pair(&s, false, Template::default()), "session pair");
    let c = ok(
        copy_object(
            &s,
            q,
            Template::default()
                .boolean(CKA_TOKEN, true)
                .boolean(CKA_PRIVATE, true)
                .bytes(CKA_ID, &id)
                .bytes(CKA_LABEL, label.as_bytes()),
        ),
        "keytool's C_CopyObject",
    );
    assert_eq!(ok(s.get(c, CKA_ID), "CKA_ID"), id);
    assert_eq!(s.ulong(c, CKA_CMKP11_STATE), STATE_ENABLED);
    ok(
        s.sign(&mut Mech::new(CKM_ECDSA), c, &[1u8; 32]),
        "the promoted key signs",
    );
    let session_aes = ok(
        s.generate_key(
            CKM_AES_KEY_GEN,
            aes_data(false)
                .boolean(CKA_EXTRACTABLE, false)
                .bytes(CKA_ID, b"session-id"),
        ),
        "session AES key",
    );
    let label = unique_label("ap-promo-aes");
    let k = ok(
        promote(session_aes, &label),
        "promote a generated session AES key",
    );
    assert_eq!(s.ulong(k, CKA_CMKP11_VERSION), 1);
    assert_ne!(
        ok(s.get(k, CKA_ID), "CKA_ID"),
        b"session-id",
        "the promoted key keeps the session key's identity"
    );
    ok(
        s.encrypt(&mut Mech::cbc_pad(&[1; 16]), k, b"x"),
        "the promoted key encrypts",
    );
}

// =======================================================================================
// 17.4 What the token can enforce, the token enforces.
// =======================================================================================

/// Child: with SoftHSM2 directly and the PIN, tries to flip the roles of the CMKs labelled
/// `LC_LABELS` and to copy them with new attributes.
fn try_unseal() {
    let s = S::user(softhsm());
    for label in arg("LC_LABELS").split(',') {
        let found = ok(
            s.find(Template::default().bytes(CKA_LABEL, label.as_bytes())),
            "find",
        );
        for h in found {
            let class = s.ulong(h, CKA_CLASS);
            if class == CKO_PUBLIC_KEY {
                continue;
            }
            let flip = if class == CKO_SECRET_KEY {
                CKA_DECRYPT
            } else {
                CKA_DERIVE
            };
            let set = set_attrs(&s, h, Template::default().boolean(flip, true));
            say(&format!(
                "set {label} {}",
                set.map_or_else(rv_name, |_| "ok".into())
            ));
            let rename = set_attrs(&s, h, Template::default().bytes(CKA_LABEL, b"renamed"));
            say(&format!(
                "rename {label} {}",
                rename.map_or_else(rv_name, |_| "ok".into())
            ));
            let copy = copy_object(&s, h, Template::default().boolean(flip, true));
            say(&format!(
                "copy {label} {}",
                copy.map_or_else(rv_name, |_| "ok".into())
            ));
        }
    }
}

#[test]
#[serial]
fn cmks_are_sealed_in_the_token_against_direct_role_flips_and_copies() {
    let s = session();
    let wrap_label = unique_label("ap-seal-w");
    let wrap = new_cmk(&s, Role::Wrap, &wrap_label, None);
    let priv_label = unique_label("ap-seal-p");
    let (_, q) = ok(
        ec_pair(
            &s,
            true,
            Template::default()
                .bytes(CKA_LABEL, priv_label.as_bytes())
                .boolean(CKA_PRIVATE, false)
                .boolean(CKA_MODIFIABLE, true),
        ),
        "token EC pair asking PRIVATE=FALSE, MODIFIABLE=TRUE",
    );
    for (what, h) in [("secret", wrap), ("private", q)] {
        let b = |a| ok(s.get(h, a), "attribute")[0];
        assert_eq!(b(CKA_MODIFIABLE), CK_FALSE, "{what} CMK CKA_MODIFIABLE");
        assert_eq!(b(CKA_COPYABLE), CK_FALSE, "{what} CMK CKA_COPYABLE");
        assert_eq!(b(CKA_PRIVATE), CK_TRUE, "{what} CMK CKA_PRIVATE");
    }
    let lines = run_child(
        "sealed",
        &[("LC_LABELS", format!("{wrap_label},{priv_label}"))],
    );
    for l in [&wrap_label, &priv_label] {
        for op in ["set", "rename", "copy"] {
            let want = format!("{op} {l} {}", rv_name(CKR_ACTION_PROHIBITED));
            assert!(
                lines.contains(&want),
                "SoftHSM2 directly: expected `{want}` in {lines:?}"
            );
        }
    }
    // Legitimate: the keys work through cmkp11.
    let d = new_dek(&s);
    ok(
        s.wrap(&mut Mech::kwp(), wrap, d),
        "wrap with the sealed CMK",
    );
    ok(
        s.sign(&mut Mech::new(CKM_ECDSA), q, &[2u8; 32]),
        "sign with the sealed CMK",
    );
}

#[test]
#[serial]
fn a_logged_out_session_never_sees_a_disabled_cmk_as_enabled() {
    let s = session();
    let label = unique_label("ap-public");
    let k = ok(
        s.generate_key(
            CKM_AES_KEY_GEN,
            cmk_template(Role::Data, &label, None).boolean(CKA_PRIVATE, false),
        ),
        "data CMK asking PRIVATE=FALSE",
    );
    ok(s.disable(k), "CMKP11_Disable");
    ok(s.logout(), "C_Logout");
    let public = S::open_ro(module());
    for h in ok(public.find_label(&label), "find in a public session") {
        assert_ne!(
            public.get_ulong(h, CKA_CMKP11_STATE).ok(),
            Some(STATE_ENABLED),
            "a disabled CMK reads as enabled in a public session"
        );
        let r = public.encrypt(&mut Mech::cbc_pad(&[1; 16]), h, b"x");
        assert!(r.is_err(), "a disabled CMK encrypts in a public session");
    }
    drop(public);
    ok(s.login(), "C_Login");
    // Legitimate: logged in, the state is read and the key works once enabled.
    assert_eq!(s.ulong(k, CKA_CMKP11_STATE), STATE_DISABLED);
    ok(s.enable(k), "CMKP11_Enable");
    ok(
        s.encrypt(&mut Mech::cbc_pad(&[1; 16]), k, b"x"),
        "encrypt when enabled",
    );
}

// =======================================================================================
// 17.6 Labels are exact.
// =======================================================================================

#[test]
#[serial]
fn cmk_labels_are_valid_utf8_and_exact() {
    let s = session();
    let bad = CKR_ATTRIBUTE_VALUE_INVALID;
    for label in [b"ap-\xff\xfe".as_slice(), b"ap-\xfe\xff", b"\xc3"] {
        expect_rv(
            s.generate_key(CKM_AES_KEY_GEN, aes_data(true).bytes(CKA_LABEL, label)),
            bad,
            &format!("C_GenerateKey(label {label:?})"),
        );
        expect_rv(
            ec_pair(&s, true, Template::default().bytes(CKA_LABEL, label)),
            bad,
            &format!("C_GenerateKeyPair(label {label:?})"),
        );
        let (_, q) = ok(
            ec_pair(&s, false, Template::default().bytes(CKA_LABEL, label)),
            "session pair (no CMK: any label)",
        );
        expect_rv(
            copy_object(&s, q, Template::default().boolean(CKA_TOKEN, true)),
            bad,
            &format!("C_CopyObject promoting label {label:?}"),
        );
    }
    // Legitimate: any UTF-8 text, read back byte for byte.
    let label = format!("clé-ü-{}", std::process::id());
    let k = new_cmk(&s, Role::Data, &label, None);
    assert_eq!(ok(s.get(k, CKA_LABEL), "CKA_LABEL"), label.as_bytes());
    assert_eq!(ok(s.find_label(&label), "find"), vec![k]);
}

// =======================================================================================
// 17.7 Encrypt-only means encrypt-only.
// =======================================================================================

/// An AES-GCM mechanism whose IV buffer the test reads back after the call.
struct Gcm {
    iv: Box<[u8; 12]>,
    aad: Vec<u8>,
    p: Box<CK_GCM_PARAMS>,
}

impl Gcm {
    fn new(iv: [u8; 12]) -> Gcm {
        let mut iv = Box::new(iv);
        let mut aad = b"aad".to_vec();
        let p = Box::new(CK_GCM_PARAMS {
            pIv: iv.as_mut_ptr(),
            ulIvLen: 12,
            ulIvBits: 96,
            pAAD: aad.as_mut_ptr(),
            ulAADLen: aad.len() as CK_ULONG,
            ulTagBits: 128,
        });
        Gcm { iv, aad, p }
    }

    fn raw(&mut self) -> CK_MECHANISM {
        CK_MECHANISM {
            mechanism: CKM_AES_GCM,
            pParameter: self.p.as_mut() as *mut CK_GCM_PARAMS as *mut c_void,
            ulParameterLen: std::mem::size_of::<CK_GCM_PARAMS>() as CK_ULONG,
        }
    }
}

/// `C_EncryptInit` + `C_Encrypt` with `m`; the IV used is then in `m.iv`.
fn gcm_encrypt(s: &S, m: &mut Gcm, key: H, data: &[u8]) -> Rv<Vec<u8>> {
    let mut raw = m.raw();
    rv(call!(s.m.f, C_EncryptInit, s.h, &mut raw, key))?;
    let mut out = vec![0u8; data.len() + 16];
    let mut n = out.len() as CK_ULONG;
    rv(call!(
        s.m.f,
        C_Encrypt,
        s.h,
        data.as_ptr() as *mut u8,
        data.len() as CK_ULONG,
        out.as_mut_ptr(),
        &mut n
    ))?;
    out.truncate(n as usize);
    let _ = &m.aad;
    Ok(out)
}

fn gcm_decrypt(s: &S, m: &mut Gcm, key: H, data: &[u8]) -> Rv<Vec<u8>> {
    let mut raw = m.raw();
    rv(call!(s.m.f, C_DecryptInit, s.h, &mut raw, key))?;
    let mut out = vec![0u8; data.len()];
    let mut n = out.len() as CK_ULONG;
    rv(call!(
        s.m.f,
        C_Decrypt,
        s.h,
        data.as_ptr() as *mut u8,
        data.len() as CK_ULONG,
        out.as_mut_ptr(),
        &mut n
    ))?;
    out.truncate(n as usize);
    Ok(out)
}

#[test]
#[serial]
fn an_encrypt_only_cmk_is_no_decryption_oracle() {
    let s = session();
    // `ap-eo-*` keys: this process may encrypt, not decrypt (config below).
    let label = unique_label("ap-eo");
    let k = new_cmk(&s, Role::Data, &label, None);
    let secret = b"the victim's secret record, 40 bytes....";
    // The victim's ciphertext (made by a process allowed to encrypt) and the IV it used.
    let mut victim = Gcm::new([7; 12]);
    let ct = ok(
        gcm_encrypt(&s, &mut victim, k, secret),
        "victim's C_Encrypt",
    );
    let victim_iv = *victim.iv;
    // Decryption is refused by the access rule ...
    expect_rv(
        gcm_decrypt(&s, &mut Gcm::new(victim_iv), k, &ct),
        CKR_KEY_FUNCTION_NOT_PERMITTED,
        "C_DecryptInit under an encrypt-only rule",
    );
    // ... and encrypting zeros under the victim's IV must not give its keystream.
    let mut attack = Gcm::new(victim_iv);
    let stream = ok(
        gcm_encrypt(&s, &mut attack, k, &[0u8; 40]),
        "attacker's C_Encrypt of zeros",
    );
    let recovered: Vec<u8> = ct[..40].iter().zip(&stream).map(|(a, b)| a ^ b).collect();
    assert_ne!(
        recovered, secret,
        "encryption under a chosen IV decrypted the record"
    );
    assert_ne!(
        *attack.iv, victim_iv,
        "the application chose the IV of a CMK encryption"
    );
    // Every encryption gets its own IV, whatever the application asks.
    let mut again = Gcm::new(victim_iv);
    ok(gcm_encrypt(&s, &mut again, k, b"x"), "C_Encrypt");
    assert_ne!(*again.iv, *attack.iv, "two encryptions got one IV");
    // An IV of another length than cmkp11's 96 bits is refused.
    let mut short = Gcm::new([1; 12]);
    short.p.ulIvLen = 8;
    let mut raw = short.raw();
    expect_rv(
        rv(call!(s.m.f, C_EncryptInit, s.h, &mut raw, k)),
        CKR_MECHANISM_PARAM_INVALID,
        "C_EncryptInit with an 8-byte IV under a CMK",
    );
    // AES-CBC-PAD under the encrypt-only key: the IV is the module's too.
    let mut iv = [9u8; 16];
    let mut m = CK_MECHANISM {
        mechanism: CKM_AES_CBC_PAD,
        pParameter: iv.as_mut_ptr() as *mut c_void,
        ulParameterLen: 16,
    };
    ok(
        rv(call!(s.m.f, C_EncryptInit, s.h, &mut m, k)),
        "C_EncryptInit(CBC-PAD)",
    );
    cancel_all(&s);
    assert_ne!(
        iv, [9u8; 16],
        "the application chose the CBC IV of an encrypt-only key"
    );
}

#[test]
#[serial]
fn legit_gcm_under_an_encrypt_only_cmk_opens_with_the_iv_written_back() {
    let s = session();
    let label = unique_label("ap-eo-legit");
    let k = new_cmk(&s, Role::Data, &label, None);
    let mut enc = Gcm::new([0; 12]);
    let ct = ok(gcm_encrypt(&s, &mut enc, k, b"table key"), "C_Encrypt");
    let iv = *enc.iv;
    assert_ne!(iv, [0; 12], "no IV written back");
    // Whoever may decrypt (here the token itself, read by a child with the PIN) opens it
    // with the IV the application read back from its parameter.
    let lines = run_child(
        "gcm-open",
        &[
            ("LC_LABEL", label),
            ("LC_IV", hex(&iv)),
            ("LC_CT", hex(&ct)),
        ],
    );
    assert!(lines.iter().any(|l| l == "opened table key"), "{lines:?}");
    // A CMK without an encrypt-only rule keeps the application's IV (who may decrypt gains
    // nothing from choosing it), and so does a DEK.
    let free = new_cmk(&s, Role::Data, &unique_label("ap-gcm"), None);
    for key in [free, new_dek(&s)] {
        let mut m = Gcm::new([5; 12]);
        let ct = ok(gcm_encrypt(&s, &mut m, key, b"row"), "C_Encrypt");
        assert_eq!(*m.iv, [5; 12], "the application's IV was changed");
        assert_eq!(
            ok(
                gcm_decrypt(&s, &mut Gcm::new([5; 12]), key, &ct),
                "C_Decrypt"
            ),
            b"row"
        );
    }
}

/// Child: decrypts `LC_CT` (hex) with the secret key labelled `LC_LABEL` and IV `LC_IV`
/// through SoftHSM2 directly.
fn gcm_open() {
    let s = S::user(softhsm());
    let unhex = |h: String| -> Vec<u8> {
        (0..h.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
            .collect()
    };
    let key = ok(s.find_label(&arg("LC_LABEL")), "find")[0];
    let iv: [u8; 12] = unhex(arg("LC_IV")).try_into().unwrap();
    let pt = ok(
        gcm_decrypt(&s, &mut Gcm::new(iv), key, &unhex(arg("LC_CT"))),
        "decrypt with SoftHSM2",
    );
    say(&format!("opened {}", String::from_utf8_lossy(&pt)));
}
