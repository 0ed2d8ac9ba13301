//! CMK lifecycle through the built module over a real SoftHSM2 token (DESIGN.md §5):
//! names and ids, versions and rotation, old data after rotations, disable/enable,
//! scheduled deletion and its cancellation, expiry, and the destruction of an expired
//! key by `CMKP11_Purge` (never by a login). Lifecycle steps go through the
//! "cmkp11 admin" vendor interface (`C_GetInterface`).
//!
//! Every test is `#[serial]`: one logs out and in again, and SoftHSM2 races token key
//! generation against `C_FindObjects` in another thread.

#[macro_use]
mod common;
mod lifecycle_support;

use common::Template;
use cryptoki_sys::*;
use lifecycle_support::*;
use serial_test::serial;
use std::time::Duration;

/// Longer than the module's view refresh interval (0.5 s).
const REFRESH_WAIT: Duration = Duration::from_millis(700);

fn session() -> S {
    S::user(cmk())
}

/// Child-process entry point (see `lifecycle_support`); not a test of its own.
#[test]
#[ignore = "entry point of child processes spawned by the other tests"]
fn child_entry() {
    let Some(role) = child_role() else { return };
    assert!(direct_child(&role), "unknown child role {role}");
}

#[test]
#[serial]
fn generate_returns_a_cmk_with_its_attributes() {
    let s = session();
    let label = unique_label("lc-gen");
    let id = b"lc-gen-id-1".to_vec();
    let k = new_cmk(&s, Role::Wrap, &label, Some(&id));
    assert_ne!(k, 0, "C_GenerateKey returned handle 0");
    assert_eq!(s.ulong(k, CKA_CMKP11_STATE), STATE_ENABLED, "STATE");
    assert_eq!(s.ulong(k, CKA_CMKP11_VERSION), 1, "VERSION");
    assert_eq!(s.ulong(k, CKA_CMKP11_VERSION_COUNT), 1, "VERSION_COUNT");
    assert_eq!(s.ulong(k, CKA_CMKP11_ORIGIN), ORIGIN_GENERATED, "ORIGIN");
    assert_eq!(s.ulong(k, CKA_CMKP11_DELETION_DATE), 0, "DELETION_DATE");
    assert_eq!(
        ok(s.get(k, CKA_ID), "CKA_ID"),
        id,
        "CKA_ID given is returned"
    );
    assert_eq!(
        ok(s.get(k, CKA_LABEL), "CKA_LABEL"),
        label.as_bytes(),
        "CKA_LABEL"
    );
    // The vendor attributes are read-only.
    let mut t = Template::default().ulong(CKA_CMKP11_STATE, STATE_DISABLED);
    let mut attrs = t.raw();
    let r = call!(
        s.m.f,
        C_SetAttributeValue,
        s.h,
        k,
        attrs.as_mut_ptr(),
        attrs.len() as CK_ULONG
    );
    assert_ne!(r, CKR_OK, "C_SetAttributeValue(CKA_CMKP11_STATE) accepted");
    assert_eq!(
        s.ulong(k, CKA_CMKP11_STATE),
        STATE_ENABLED,
        "STATE after set"
    );

    // A secret CMK's name and id are stable.
    for (attr, value) in [(CKA_LABEL, &b"renamed"[..]), (CKA_ID, &b"other-id"[..])] {
        let mut t = Template::default().bytes(attr, value);
        let mut attrs = t.raw();
        let r = call!(
            s.m.f,
            C_SetAttributeValue,
            s.h,
            k,
            attrs.as_mut_ptr(),
            attrs.len() as CK_ULONG
        );
        assert_rv!(
            r,
            CKR_ATTRIBUTE_READ_ONLY,
            "C_SetAttributeValue(0x{attr:x})"
        );
    }
    // cmkp11's state records are hidden from applications.
    let hidden = ok(
        s.find(
            Template::default()
                .ulong(CKA_CLASS, CKO_DATA)
                .bytes(CKA_APPLICATION, APPLICATION.as_bytes()),
        ),
        "find cmkp11's data objects",
    );
    assert!(hidden.is_empty(), "state records visible: {hidden:?}");
    let all = ok(s.find(Template::default()), "find everything");
    for o in all {
        if let Ok(l) = s.get(o, CKA_LABEL) {
            assert!(
                !l.starts_with(b"cmkp11:"),
                "internal object visible: {}",
                String::from_utf8_lossy(&l)
            );
        }
    }

    // Same label again (other id, other role): refused.
    expect_rv(
        s.generate_key(
            CKM_AES_KEY_GEN,
            cmk_template(Role::Data, &label, Some(b"lc-gen-id-2")),
        ),
        CKR_ATTRIBUTE_VALUE_INVALID,
        "second CMK with the same label",
    );
    // Same id again, other label: refused.
    expect_rv(
        s.generate_key(
            CKM_AES_KEY_GEN,
            cmk_template(Role::Wrap, &unique_label("lc-gen"), Some(&id)),
        ),
        CKR_ATTRIBUTE_VALUE_INVALID,
        "second CMK with the same CKA_ID",
    );
    assert_eq!(
        ok(s.find_label(&label), "find"),
        vec![k],
        "one CMK by label"
    );

    // Ids: 65 bytes refused, 64 accepted, none -> a generated one.
    expect_rv(
        s.generate_key(
            CKM_AES_KEY_GEN,
            cmk_template(Role::Wrap, &unique_label("lc-id65"), Some(&[0x41; 65])),
        ),
        CKR_ATTRIBUTE_VALUE_INVALID,
        "65-byte CKA_ID",
    );
    let long_id = [0x42u8; 64];
    let k64 = new_cmk(&s, Role::Wrap, &unique_label("lc-id64"), Some(&long_id));
    assert_eq!(ok(s.get(k64, CKA_ID), "CKA_ID"), long_id, "64-byte CKA_ID");
    let k0 = new_cmk(&s, Role::Wrap, &unique_label("lc-noid"), None);
    let gen_id = ok(s.get(k0, CKA_ID), "CKA_ID");
    assert!(
        !gen_id.is_empty() && gen_id.len() <= 64,
        "generated CKA_ID: {gen_id:?}"
    );
    // Finding by the id applications know returns the CMK.
    let by_id = ok(
        s.find(
            Template::default()
                .ulong(CKA_CLASS, CKO_SECRET_KEY)
                .bytes(CKA_ID, &gen_id),
        ),
        "find by CKA_ID",
    );
    assert_eq!(by_id, vec![k0], "find by generated CKA_ID");
}

#[test]
#[serial]
fn rotation_keeps_every_version_and_old_blobs() {
    let s = session();
    let label = unique_label("lc-rot");
    let k = new_cmk(&s, Role::Wrap, &label, Some(b"lc-rot-id"));
    let before_1 = seal(&s, k, 1);
    ok(open(&s, k, &before_1), "blob at v1 before rotation");

    ok(s.rotate(k), "CMKP11_Rotate #1");
    assert_eq!(
        s.ulong(k, CKA_CMKP11_VERSION),
        2,
        "VERSION after 1 rotation"
    );
    assert_eq!(
        s.ulong(k, CKA_CMKP11_VERSION_COUNT),
        2,
        "COUNT after 1 rotation"
    );
    assert_eq!(
        s.ulong(k, CKA_CMKP11_STATE),
        STATE_ENABLED,
        "STATE after rotation"
    );
    assert_eq!(
        ok(s.get(k, CKA_ID), "CKA_ID"),
        b"lc-rot-id",
        "CKA_ID stable across rotation"
    );
    assert_eq!(
        ok(s.find_label(&label), "find by label"),
        vec![k],
        "find by label after rotation: exactly the CMK's handle"
    );
    let v1 = s.version_handle(&label, 1);
    let v2 = s.version_handle(&label, 2);
    assert_ne!(v1, k, "the old version's handle is not the CMK's");
    assert_ne!(v1, v2);
    assert_eq!(
        s.ulong(v1, CKA_CMKP11_VERSION),
        1,
        "old version's own VERSION"
    );
    assert_eq!(
        s.ulong(v2, CKA_CMKP11_VERSION),
        2,
        "new version's own VERSION"
    );
    assert_eq!(
        ok(s.get(v1, CKA_LABEL), "label"),
        label.as_bytes(),
        "version label"
    );
    assert_eq!(ok(s.get(v1, CKA_ID), "id"), b"lc-rot-id", "version CKA_ID");
    assert!(
        ok(s.find_version(&label, 3), "find v3").is_empty(),
        "version 3 does not exist yet"
    );
    ok(open(&s, k, &before_1), "v1 blob after 1 rotation");
    ok(open(&s, v1, &before_1), "v1 blob through the v1 handle");

    // Wrap uses the newest version.
    let before_2 = seal(&s, k, 2);
    ok(open(&s, k, &before_2), "v2 blob through the CMK");
    ok(open(&s, v2, &before_2), "v2 blob through the v2 handle");
    expect_rv(
        open(&s, v1, &before_2),
        CKR_WRAPPED_KEY_INVALID,
        "a blob made after rotation, unwrapped by the old version",
    );
    // An old version only opens what it closed.
    let dek = new_dek(&s);
    expect_rv(
        s.wrap(&mut Mech::kwp(), v1, dek),
        CKR_KEY_FUNCTION_NOT_PERMITTED,
        "C_WrapKey with an old version",
    );

    ok(s.rotate(k), "CMKP11_Rotate #2");
    ok(open(&s, k, &before_1), "v1 blob after 2 rotations");
    ok(open(&s, k, &before_2), "v2 blob after 1 rotation");

    let mut envelopes = vec![before_1, before_2];
    for n in 3..=5 {
        envelopes.push(seal(&s, k, n));
        ok(s.rotate(k), &format!("CMKP11_Rotate #{n}"));
    }
    assert_eq!(
        s.ulong(k, CKA_CMKP11_VERSION),
        6,
        "VERSION after 5 rotations"
    );
    assert_eq!(
        s.ulong(k, CKA_CMKP11_VERSION_COUNT),
        6,
        "COUNT after 5 rotations"
    );
    assert_eq!(
        ok(s.find_label(&label), "find"),
        vec![k],
        "one handle by label"
    );
    for e in &envelopes {
        ok(
            open(&s, k, e),
            &format!(
                "blob made at v{} after {} rotations",
                e.version,
                6 - e.version
            ),
        );
        let vh = s.version_handle(&label, e.version);
        assert_eq!(s.ulong(vh, CKA_CMKP11_VERSION), e.version);
        ok(
            open(&s, vh, e),
            &format!("v{} blob through its version", e.version),
        );
    }
    let newest = seal(&s, k, 6);
    ok(
        open(&s, s.version_handle(&label, 6), &newest),
        "blob made now opens with v6",
    );
    expect_rv(
        open(&s, s.version_handle(&label, 5), &newest),
        CKR_WRAPPED_KEY_INVALID,
        "blob made at v6 unwrapped by v5",
    );
}

#[test]
#[serial]
fn gcm_and_cbc_pad_data_across_versions() {
    let s = session();
    let label = unique_label("lc-data");
    let k = new_cmk(&s, Role::Data, &label, None);
    let gcm_iv = s.random::<12>();
    let cbc_iv = s.random::<16>();
    let msg = b"old data written under version 1 of a data CMK".to_vec();
    let gcm1 = ok(s.encrypt(&mut Mech::gcm(&gcm_iv, b""), k, &msg), "GCM v1");
    let cbc1 = ok(
        s.encrypt(&mut Mech::cbc_pad(&cbc_iv), k, &msg),
        "CBC-PAD v1",
    );

    ok(s.rotate(k), "CMKP11_Rotate");
    assert_eq!(s.ulong(k, CKA_CMKP11_VERSION), 2);
    let v1 = s.version_handle(&label, 1);

    // AES-GCM: old ciphertext decrypts through the CMK (every version is tried).
    assert_eq!(
        ok(
            s.decrypt(&mut Mech::gcm(&gcm_iv, b""), k, &gcm1),
            "GCM v1 data via CMK"
        ),
        msg
    );
    let gcm2 = ok(s.encrypt(&mut Mech::gcm(&gcm_iv, b""), k, &msg), "GCM v2");
    assert_ne!(
        gcm1, gcm2,
        "GCM encryption after rotation uses the new version"
    );
    assert_eq!(
        ok(
            s.decrypt(&mut Mech::gcm(&gcm_iv, b""), k, &gcm2),
            "GCM v2 via CMK"
        ),
        msg
    );
    assert!(
        s.decrypt(&mut Mech::gcm(&gcm_iv, b""), v1, &gcm2).is_err(),
        "v2 GCM data must not decrypt with the v1 handle"
    );
    assert_eq!(
        ok(
            s.decrypt(&mut Mech::gcm(&gcm_iv, b""), v1, &gcm1),
            "GCM v1 via v1"
        ),
        msg
    );
    // A tampered ciphertext decrypts with no version.
    let mut bad = gcm1.clone();
    bad[0] ^= 1;
    assert!(
        s.decrypt(&mut Mech::gcm(&gcm_iv, b""), k, &bad).is_err(),
        "tampered GCM data accepted"
    );

    // CBC-PAD: the primary encrypts and decrypts; old data through the old version.
    let cbc2 = ok(
        s.encrypt(&mut Mech::cbc_pad(&cbc_iv), k, &msg),
        "CBC-PAD v2",
    );
    assert_ne!(cbc1, cbc2, "CBC-PAD after rotation uses the new version");
    assert_eq!(
        ok(
            s.decrypt(&mut Mech::cbc_pad(&cbc_iv), k, &cbc2),
            "CBC-PAD v2 via CMK"
        ),
        msg
    );
    assert_eq!(
        ok(
            s.decrypt(&mut Mech::cbc_pad(&cbc_iv), v1, &cbc1),
            "CBC-PAD v1 data via v1"
        ),
        msg
    );
    assert_ne!(
        s.decrypt(&mut Mech::cbc_pad(&cbc_iv), k, &cbc1).ok(),
        Some(msg.clone()),
        "CBC-PAD decrypt through the CMK uses the primary only"
    );
    expect_rv(
        s.encrypt_init(&mut Mech::cbc_pad(&cbc_iv), v1),
        CKR_KEY_FUNCTION_NOT_PERMITTED,
        "C_EncryptInit with an old version",
    );
}

/// The uses of each role: (wrap CMK, data CMK, mac CMK) and what each use returns.
struct Trio {
    wrap: H,
    data: H,
    mac: H,
    wrap_label: String,
    env: Envelope,
    /// AES-GCM ciphertext of `b"x"` under `data` (IV `[7; 12]`).
    data_ct: Vec<u8>,
}

fn trio(s: &S, tag: &str) -> Trio {
    let wrap_label = unique_label(&format!("{tag}-w"));
    let wrap = new_cmk(s, Role::Wrap, &wrap_label, None);
    let data = new_cmk(s, Role::Data, &unique_label(&format!("{tag}-d")), None);
    let mac = new_cmk(s, Role::Mac, &unique_label(&format!("{tag}-m")), None);
    let env = seal(s, wrap, 1);
    let data_ct = ok(
        s.encrypt(&mut Mech::gcm(&[7u8; 12], b""), data, b"x"),
        "GCM encrypt with the data CMK",
    );
    Trio {
        wrap,
        data,
        mac,
        wrap_label,
        env,
        data_ct,
    }
}

/// Every use of the three keys, in a fixed order: the code of `C_EncryptInit`,
/// `C_DecryptInit`, `C_WrapKey`, `C_UnwrapKey`, `C_SignInit`. An accepted `*Init` is
/// completed and must then succeed.
fn uses(s: &S, t: &Trio) -> Vec<(&'static str, Rv<()>)> {
    let iv = [7u8; 12];
    let dek = new_dek(s);
    let r = vec![
        (
            "C_EncryptInit",
            s.encrypt_init(&mut Mech::gcm(&iv, b""), t.data).map(|()| {
                ok(s.finish_encrypt(b"x"), "C_Encrypt after C_EncryptInit");
            }),
        ),
        (
            "C_DecryptInit",
            s.decrypt_init(&mut Mech::gcm(&iv, b""), t.data).map(|()| {
                let p = ok(
                    s.finish_decrypt(&t.data_ct),
                    "C_Decrypt after C_DecryptInit",
                );
                assert_eq!(p, b"x", "C_Decrypt");
            }),
        ),
        ("C_WrapKey", s.wrap(&mut Mech::kwp(), t.wrap, dek).map(drop)),
        (
            "C_UnwrapKey",
            s.unwrap_dek(&mut Mech::kwp(), t.wrap, &t.env.blob)
                .map(|h| {
                    let _ = s.destroy(h);
                }),
        ),
        (
            "C_SignInit",
            s.sign_init(&mut Mech::new(CKM_AES_CMAC), t.mac).map(|()| {
                ok(s.finish_sign(b"x"), "C_Sign after C_SignInit");
            }),
        ),
    ];
    let _ = s.destroy(dek);
    r
}

#[track_caller]
fn assert_all_ok(s: &S, t: &Trio, when: &str) {
    for (what, r) in uses(s, t) {
        ok(r, &format!("{what} {when}"));
    }
}

#[track_caller]
fn assert_all_refused(s: &S, t: &Trio, when: &str) {
    for (what, r) in uses(s, t) {
        expect_rv(r, CKR_KEY_FUNCTION_NOT_PERMITTED, &format!("{what} {when}"));
    }
}

#[test]
#[serial]
fn disable_refuses_every_use_and_enable_restores() {
    let s = session();
    let t = trio(&s, "lc-dis");
    assert_all_ok(&s, &t, "while enabled");
    for k in [t.wrap, t.data, t.mac] {
        ok(s.disable(k), "CMKP11_Disable");
        assert_eq!(
            s.ulong(k, CKA_CMKP11_STATE),
            STATE_DISABLED,
            "STATE disabled"
        );
        assert_eq!(s.ulong(k, CKA_CMKP11_DELETION_DATE), 0);
    }
    assert_all_refused(&s, &t, "while disabled");
    // Still findable, one handle, state readable through the found handle.
    let found = ok(s.find_label(&t.wrap_label), "find disabled key");
    assert_eq!(found, vec![t.wrap], "disabled key findable by label");
    assert_eq!(s.ulong(found[0], CKA_CMKP11_STATE), STATE_DISABLED);
    let v1 = s.version_handle(&t.wrap_label, 1);
    assert_eq!(
        s.ulong(v1, CKA_CMKP11_STATE),
        STATE_DISABLED,
        "version's STATE"
    );
    expect_rv(
        open(&s, v1, &t.env),
        CKR_KEY_FUNCTION_NOT_PERMITTED,
        "C_UnwrapKey through a version of a disabled key",
    );

    for k in [t.wrap, t.data, t.mac] {
        ok(s.enable(k), "CMKP11_Enable");
        assert_eq!(s.ulong(k, CKA_CMKP11_STATE), STATE_ENABLED, "STATE enabled");
    }
    assert_all_ok(&s, &t, "after enable");
    ok(open(&s, t.wrap, &t.env), "old blob after disable/enable");
}

/// This process's own changes apply at its very next call, even when another of its
/// threads was reloading the keystore at that moment: a reload begun before the change
/// must not mark its older view fresh (a race the kill -9 suite once hit). Hundreds of
/// changes, each checked at once, while a second thread keeps using the key (and so
/// reloads the view every 0.5 s).
#[test]
#[serial]
fn own_changes_apply_at_once_beside_another_threads_reloads() {
    let s = session();
    let label = unique_label("lc-own");
    let k = new_cmk(&s, Role::Data, &label, None);
    let iv = [3u8; 12];
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let used = std::sync::Arc::new(AtomicU64::new(0));
    let user = {
        let (stop, used) = (stop.clone(), used.clone());
        std::thread::spawn(move || {
            let s = session();
            let iv = [4u8; 12];
            while !stop.load(Ordering::Relaxed) {
                // Refused while disabled, allowed while enabled: either is fine here.
                let _ = s.encrypt(&mut Mech::gcm(&iv, b""), k, b"other thread");
                used.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    // Counts, not a time budget: at least 25 cycles, and as many as it takes for the other
    // thread to use the key 100 times beside them, however loaded the machine is. Each
    // cycle checks that a change applies at the very next call.
    let started = std::time::Instant::now();
    let mut cycles = 0;
    while cycles < 25 || used.load(Ordering::Relaxed) < 100 {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "{cycles} cycles and {} uses beside them in 300 s",
            used.load(Ordering::Relaxed)
        );
        ok(s.disable(k), "CMKP11_Disable");
        expect_rv(
            s.encrypt(&mut Mech::gcm(&iv, b""), k, b"payload"),
            CKR_KEY_FUNCTION_NOT_PERMITTED,
            &format!("C_Encrypt right after disable (cycle {cycles})"),
        );
        ok(s.enable(k), "CMKP11_Enable");
        ok(
            s.encrypt(&mut Mech::gcm(&iv, b""), k, b"payload"),
            &format!("C_Encrypt right after enable (cycle {cycles})"),
        );
        cycles += 1;
    }
    stop.store(true, Ordering::Relaxed);
    user.join().expect("the other thread");
    let uses = used.load(Ordering::Relaxed);
    println!("{cycles} disable/enable cycles, each applied at the next call; {uses} uses beside");
}

#[test]
#[serial]
fn destroy_schedules_deletion_and_cancel_disables() {
    let s = session();
    let t = trio(&s, "lc-del");
    let before = unix_now();
    for k in [t.wrap, t.data, t.mac] {
        ok(s.destroy(k), "C_DestroyObject on a CMK");
    }
    let after = unix_now();
    for k in [t.wrap, t.data, t.mac] {
        assert_eq!(
            s.ulong(k, CKA_CMKP11_STATE),
            STATE_PENDING_DELETION,
            "STATE after C_DestroyObject"
        );
        let date = s.ulong(k, CKA_CMKP11_DELETION_DATE);
        let window = 30 * 86_400;
        assert!(
            (before + window..=after + window).contains(&date),
            "DELETION_DATE {date} not now + 30 days ({}..={})",
            before + window,
            after + window
        );
    }
    assert_eq!(
        ok(s.find_label(&t.wrap_label), "find"),
        vec![t.wrap],
        "a key pending deletion stays findable"
    );
    assert_all_refused(&s, &t, "while pending deletion");
    expect_rv(
        s.enable(t.wrap),
        CKR_ACTION_PROHIBITED,
        "CMKP11_Enable while pending deletion",
    );
    expect_rv(
        s.rotate(t.wrap),
        CKR_ACTION_PROHIBITED,
        "CMKP11_Rotate while pending deletion",
    );
    assert_eq!(s.ulong(t.wrap, CKA_CMKP11_VERSION_COUNT), 1);
    // Destroying again keeps the key pending (no error, nothing gone).
    ok(
        s.destroy(t.wrap),
        "C_DestroyObject on a key pending deletion",
    );
    assert_eq!(s.ulong(t.wrap, CKA_CMKP11_STATE), STATE_PENDING_DELETION);

    for k in [t.wrap, t.data, t.mac] {
        ok(s.cancel_deletion(k), "CMKP11_CancelDeletion");
        assert_eq!(
            s.ulong(k, CKA_CMKP11_STATE),
            STATE_DISABLED,
            "cancel -> disabled"
        );
        assert_eq!(s.ulong(k, CKA_CMKP11_DELETION_DATE), 0, "date cleared");
    }
    assert_all_refused(&s, &t, "after cancel (disabled)");
    expect_rv(
        s.cancel_deletion(t.wrap),
        CKR_ACTION_PROHIBITED,
        "CMKP11_CancelDeletion of a key not pending deletion",
    );
    for k in [t.wrap, t.data, t.mac] {
        ok(s.enable(k), "CMKP11_Enable after cancel");
    }
    assert_all_ok(&s, &t, "after cancel + enable");
    ok(
        open(&s, t.wrap, &t.env),
        "old blob after cancelled deletion",
    );

    // The admin interface: an explicit window, and 0 for the configured one.
    let now = unix_now();
    ok(s.schedule_deletion(t.data, 7), "CMKP11_ScheduleDeletion(7)");
    let date = s.ulong(t.data, CKA_CMKP11_DELETION_DATE);
    assert!(
        (now + 7 * 86_400..=unix_now() + 7 * 86_400).contains(&date),
        "7-day window: {date}"
    );
    ok(s.cancel_deletion(t.data), "cancel");
    ok(s.disable(t.mac), "disable");
    ok(
        s.schedule_deletion(t.mac, 0),
        "CMKP11_ScheduleDeletion(0) of a disabled key",
    );
    let date = s.ulong(t.mac, CKA_CMKP11_DELETION_DATE);
    assert!(
        (now + 30 * 86_400..=unix_now() + 30 * 86_400).contains(&date),
        "configured window: {date}"
    );
    assert_eq!(s.ulong(t.mac, CKA_CMKP11_STATE), STATE_PENDING_DELETION);
}

/// After the deletion date a key is invisible and unusable; `CMKP11_Purge` destroys its
/// objects (a login never does).
#[test]
#[serial]
fn expired_keys_vanish_and_are_purged() {
    let s = session();
    let a_label = unique_label("lc-exp-a");
    let a_id = format!("lc-exp-a-{}", std::process::id()).into_bytes();
    let a = new_cmk(&s, Role::Wrap, &a_label, Some(&a_id));
    ok(s.rotate(a), "rotate A");
    let b_label = unique_label("lc-exp-b");
    let b_id = format!("lc-exp-b-{}", std::process::id()).into_bytes();
    let b = new_cmk(&s, Role::Data, &b_label, Some(&b_id));
    let keep_label = unique_label("lc-exp-keep");
    let keep = new_cmk(&s, Role::Wrap, &keep_label, None);
    let keep_env = seal(&s, keep, 1);
    let a_env = seal(&s, a, 2);
    for k in [a, b] {
        ok(s.schedule_deletion(k, 1), "CMKP11_ScheduleDeletion(1)");
    }
    assert_eq!(ok(s.find_label(&a_label), "find A"), vec![a]);
    assert_eq!(
        inspect(&a_label, &a_id).0,
        2,
        "A's two versions in the token"
    );

    // A's date passes (its record rewritten in the token by another process).
    expire(&a_id);
    std::thread::sleep(REFRESH_WAIT);
    assert!(
        ok(s.find_label(&a_label), "find A").is_empty(),
        "a key past its deletion date is still found by label"
    );
    for v in [1, 2] {
        assert!(
            ok(s.find_version(&a_label, v), "find A version").is_empty(),
            "version {v} of an expired key is still found"
        );
    }
    let r = open(&s, a, &a_env);
    assert!(
        matches!(
            r,
            Err(CKR_KEY_FUNCTION_NOT_PERMITTED
                | CKR_KEY_HANDLE_INVALID
                | CKR_UNWRAPPING_KEY_HANDLE_INVALID
                | CKR_OBJECT_HANDLE_INVALID)
        ),
        "C_UnwrapKey with an expired key: {r:?}"
    );
    assert_eq!(
        ok(s.find_label(&b_label), "find B"),
        vec![b],
        "B (not yet expired) still findable"
    );
    // A login never destroys anything (the deletion window is not the application's to
    // shorten): A's objects stay until the operator's purge.
    ok(s.logout(), "C_Logout");
    ok(s.login(), "C_Login");
    assert_eq!(
        inspect(&a_label, &a_id).0,
        2,
        "A's key objects after C_Login"
    );
    ok(s.purge(), "CMKP11_Purge");
    let (keys, records) = inspect(&a_label, &a_id);
    assert_eq!(
        (keys, records),
        (0, 0),
        "A's key objects and state records after CMKP11_Purge (keys, records)"
    );
    let (keys, _) = inspect(&b_label, &b_id);
    assert_eq!(keys, 1, "B's key object must survive the purge");
    assert_eq!(s.ulong(b, CKA_CMKP11_STATE), STATE_PENDING_DELETION);

    // B's date passes; CMKP11_Purge destroys it.
    expire(&b_id);
    std::thread::sleep(REFRESH_WAIT);
    assert!(
        ok(s.find_label(&b_label), "find B").is_empty(),
        "expired B found"
    );
    assert_eq!(inspect(&b_label, &b_id).0, 1, "B's objects before purge");
    ok(s.purge(), "CMKP11_Purge");
    assert_eq!(
        inspect(&b_label, &b_id),
        (0, 0),
        "B's objects after CMKP11_Purge (keys, records)"
    );
    // Purge touched nothing else.
    assert_eq!(ok(s.find_label(&keep_label), "find keep"), vec![keep]);
    ok(open(&s, keep, &keep_env), "an unrelated key after purge");
    // The name of a destroyed key is free again.
    new_cmk(&s, Role::Wrap, &a_label, None);
}
