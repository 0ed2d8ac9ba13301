//! Races on the application's own memory (issue 17.5, no double fetch): a second thread of
//! the application rewrites the template (`CKA_TOKEN`, `CKA_SENSITIVE`, `CKA_EXTRACTABLE`)
//! or the AES-GCM parameter (the IV pointer and length) while `C_GenerateKey`,
//! `C_UnwrapKey` or `C_EncryptInit` runs. cmkp11 copies what it decides on before
//! deciding and gives the backend that copy, so whatever the timing, the result is one of
//! the outcomes of an unchanging template: never a token object the policy did not
//! allow, never an extractable or non-sensitive CMK, never an encryption under an IV that
//! the application chose for an encrypt-only key. The token's real state is read through
//! SoftHSM2 directly, in a child process holding the user PIN, next to the legitimate
//! flows.
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
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};

/// Label prefix of the keys an access rule lets this process encrypt with, not decrypt.
const ENCRYPT_ONLY: &str = "race-eo";

/// cmkp11 with an encrypt-only access rule for `race-eo-*` keys.
fn module() -> &'static Module {
    static CONF: OnceLock<()> = OnceLock::new();
    CONF.get_or_init(|| {
        if child_role().is_none() {
            let env = common::test_env();
            let mut text = std::fs::read_to_string(&env.cmkp11_conf).unwrap();
            text.push_str(&format!(
                "\n[[access]]\nkeys = \"{ENCRYPT_ONLY}-*\"\noperations = [\"encrypt\"]\n"
            ));
            std::fs::write(&env.cmkp11_conf, text).unwrap();
        }
    });
    cmk()
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
        "token-keys" => token_keys(),
        "gcm-open" => gcm_open(),
        other => panic!("unknown child role {other}"),
    }
}

/// Child: the token's secret keys (less cmkp11's own) as SoftHSM2 shows them to anybody
/// with the PIN: `total N`, `weak W` (sensitive FALSE or extractable TRUE) and `labelled L` (labelled
/// `LC_LABEL`, when given).
fn token_keys() {
    let s = S::user(softhsm());
    let keys = ok(
        s.find(
            Template::default()
                .ulong(CKA_CLASS, CKO_SECRET_KEY)
                .boolean(CKA_TOKEN, true),
        ),
        "find the token's secret keys",
    );
    let label = std::env::var("LC_LABEL").unwrap_or_default();
    // cmkp11's own keys (audit and metadata MAC keys) are not counted.
    let keys: Vec<H> = keys
        .into_iter()
        .filter(|&k| {
            !s.get(k, CKA_LABEL)
                .unwrap_or_default()
                .starts_with(b"cmkp11:")
        })
        .collect();
    let (mut weak, mut labelled) = (0, 0);
    for &k in &keys {
        let sensitive = ok(s.get(k, CKA_SENSITIVE), "CKA_SENSITIVE");
        let extractable = ok(s.get(k, CKA_EXTRACTABLE), "CKA_EXTRACTABLE");
        if sensitive != [CK_TRUE] || extractable != [CK_FALSE] {
            weak += 1;
        }
        if !label.is_empty() && s.get(k, CKA_LABEL).unwrap_or_default() == label.as_bytes() {
            labelled += 1;
        }
    }
    say(&format!("total {}", keys.len()));
    say(&format!("weak {weak}"));
    say(&format!("labelled {labelled}"));
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
    let mut m = Mech::gcm(&iv, b"");
    let ct = unhex(arg("LC_CT"));
    let mut raw = m.raw();
    ok(
        rv(call!(s.m.f, C_DecryptInit, s.h, &mut raw, key)),
        "C_DecryptInit",
    );
    let mut out = vec![0u8; ct.len()];
    let mut n = out.len() as CK_ULONG;
    ok(
        rv(call!(
            s.m.f,
            C_Decrypt,
            s.h,
            ct.as_ptr() as *mut u8,
            ct.len() as CK_ULONG,
            out.as_mut_ptr(),
            &mut n
        )),
        "C_Decrypt with SoftHSM2",
    );
    out.truncate(n as usize);
    say(&format!("opened {}", String::from_utf8_lossy(&out)));
}

/// The `token-keys` child's figures: (total, weak, labelled `label`).
fn token_keys_now(label: &str) -> (usize, usize, usize) {
    let lines = run_child("token-keys", &[("LC_LABEL", label.to_string())]);
    let num = |w: &str| -> usize {
        lines
            .iter()
            .find_map(|l| l.strip_prefix(w))
            .unwrap_or_else(|| panic!("token-keys: no `{w}` line in {lines:?}"))
            .trim()
            .parse()
            .unwrap()
    };
    (num("total "), num("weak "), num("labelled "))
}

// ---------------------------------------------------------------------------------------
// A template whose booleans another thread flips.
// ---------------------------------------------------------------------------------------

/// The boolean attributes a racing thread flips, shared with it.
struct Flags {
    token: AtomicU8,
    sensitive: AtomicU8,
    extractable: AtomicU8,
    stop: AtomicBool,
}

impl Flags {
    fn new(token: bool, sensitive: bool, extractable: bool) -> Arc<Flags> {
        Arc::new(Flags {
            token: AtomicU8::new(token as u8),
            sensitive: AtomicU8::new(sensitive as u8),
            extractable: AtomicU8::new(extractable as u8),
            stop: AtomicBool::new(false),
        })
    }
}

/// Starts a thread that flips the flags named in `which` (token, sensitive, extractable)
/// as fast as it can until `stop`.
fn flipper(f: &Arc<Flags>, which: [bool; 3]) -> std::thread::JoinHandle<u64> {
    let f = f.clone();
    std::thread::spawn(move || {
        let mut flips = 0u64;
        while !f.stop.load(Ordering::Relaxed) {
            for (on, flag) in which.iter().zip([&f.token, &f.sensitive, &f.extractable]) {
                if *on {
                    flag.fetch_xor(1, Ordering::Relaxed);
                }
            }
            flips += 1;
            if flips % 64 == 0 {
                std::thread::yield_now();
            }
        }
        flips
    })
}

/// A template of an AES-256 key whose TOKEN, SENSITIVE and EXTRACTABLE values are the
/// shared flags (read by the module wherever it reads them), plus `extra` attributes.
struct RacyTemplate {
    attrs: Vec<CK_ATTRIBUTE>,
    _values: Vec<Box<[u8]>>,
}

impl RacyTemplate {
    fn new(f: &Flags, value_len: bool, extra: &[(CK_ATTRIBUTE_TYPE, &[u8])]) -> RacyTemplate {
        let mut values: Vec<Box<[u8]>> = Vec::new();
        let mut attrs = Vec::new();
        let mut fixed = |ty: CK_ATTRIBUTE_TYPE, v: &[u8], attrs: &mut Vec<CK_ATTRIBUTE>| {
            let mut b: Box<[u8]> = v.into();
            attrs.push(CK_ATTRIBUTE {
                type_: ty,
                pValue: b.as_mut_ptr() as *mut c_void,
                ulValueLen: b.len() as CK_ULONG,
            });
            values.push(b);
        };
        fixed(CKA_CLASS, &CKO_SECRET_KEY.to_ne_bytes(), &mut attrs);
        fixed(CKA_KEY_TYPE, &CKK_AES.to_ne_bytes(), &mut attrs);
        if value_len {
            fixed(CKA_VALUE_LEN, &(32 as CK_ULONG).to_ne_bytes(), &mut attrs);
        }
        for (ty, v) in extra {
            fixed(*ty, v, &mut attrs);
        }
        for (ty, flag) in [
            (CKA_TOKEN, &f.token),
            (CKA_SENSITIVE, &f.sensitive),
            (CKA_EXTRACTABLE, &f.extractable),
        ] {
            attrs.push(CK_ATTRIBUTE {
                type_: ty,
                pValue: flag.as_ptr() as *mut c_void,
                ulValueLen: 1,
            });
        }
        RacyTemplate {
            attrs,
            _values: values,
        }
    }
}

fn generate(s: &S, t: &mut RacyTemplate) -> Rv<H> {
    let mut m = Mech::new(CKM_AES_KEY_GEN).raw();
    let mut h: H = 0;
    rv(call!(
        s.m.f,
        C_GenerateKey,
        s.h,
        &mut m,
        t.attrs.as_mut_ptr(),
        t.attrs.len() as CK_ULONG,
        &mut h
    ))?;
    Ok(h)
}

fn unwrap(s: &S, unwrapping: H, blob: &[u8], t: &mut RacyTemplate) -> Rv<H> {
    let mut m = Mech::kwp().raw();
    let mut h: H = 0;
    rv(call!(
        s.m.f,
        C_UnwrapKey,
        s.h,
        &mut m,
        unwrapping,
        blob.as_ptr() as *mut u8,
        blob.len() as CK_ULONG,
        t.attrs.as_mut_ptr(),
        t.attrs.len() as CK_ULONG,
        &mut h
    ))?;
    Ok(h)
}

/// What cmkp11 reports of a key it made: (CKA_TOKEN, CKA_SENSITIVE, CKA_EXTRACTABLE), and
/// whether reading CKA_VALUE is refused as sensitive.
fn facts(s: &S, k: H) -> (Vec<u8>, Vec<u8>, Vec<u8>, bool) {
    let value_refused = s.get(k, CKA_VALUE) == Err(CKR_ATTRIBUTE_SENSITIVE);
    (
        ok(s.get(k, CKA_TOKEN), "CKA_TOKEN"),
        ok(s.get(k, CKA_SENSITIVE), "CKA_SENSITIVE"),
        ok(s.get(k, CKA_EXTRACTABLE), "CKA_EXTRACTABLE"),
        value_refused,
    )
}

/// Counts outcomes and checks that each is one an unchanging template could give.
#[derive(Default, Debug)]
struct Outcomes {
    made: usize,
    refused: usize,
}

impl Outcomes {
    #[track_caller]
    fn add<T>(&mut self, r: &Rv<T>, allowed_refusal: CK_RV, what: &str) {
        match r {
            Ok(_) => self.made += 1,
            Err(e) if *e == allowed_refusal => self.refused += 1,
            Err(e) => panic!(
                "{what}: {} is no outcome of an unchanging template",
                rv_name(*e)
            ),
        }
    }
}

const RACE_ROUNDS: usize = 400;

#[test]
#[serial]
fn flipping_token_during_generate_key_never_makes_a_token_object() {
    let s = S::user(module());
    let label = unique_label("race-gen");
    let (before, weak_before, _) = token_keys_now(&label);
    assert_eq!(weak_before, 0, "a weak token key before the race");
    // EXTRACTABLE=TRUE throughout: TOKEN=FALSE makes an extractable session key (a DEK),
    // TOKEN=TRUE is refused (a CMK is never extractable). No outcome is a token object.
    let f = Flags::new(false, true, true);
    let mut t = RacyTemplate::new(&f, true, &[(CKA_LABEL, label.as_bytes())]);
    let th = flipper(&f, [true, false, false]);
    let mut out = Outcomes::default();
    for _ in 0..RACE_ROUNDS {
        let r = generate(&s, &mut t);
        out.add(&r, CKR_TEMPLATE_INCONSISTENT, "C_GenerateKey");
        if let Ok(k) = r {
            let (token, sensitive, extractable, value_refused) = facts(&s, k);
            assert_eq!(token, [CK_FALSE], "a racing C_GenerateKey made a token key");
            assert_eq!(sensitive, [CK_TRUE], "a DEK that is not sensitive");
            assert_eq!(extractable, [CK_TRUE], "the DEK's extractability changed");
            assert!(value_refused, "a DEK's CKA_VALUE was readable");
            ok(s.destroy(k), "C_DestroyObject(DEK)");
        }
    }
    f.stop.store(true, Ordering::Relaxed);
    let flips = th.join().unwrap();
    assert!(flips > 0, "the racing thread never ran");
    let (after, weak, labelled) = token_keys_now(&label);
    assert_eq!(labelled, 0, "token keys from a racing template ({out:?})");
    assert_eq!(
        after, before,
        "token keys appeared during the race ({out:?})"
    );
    assert_eq!(weak, 0, "a weak token key ({out:?})");
    assert!(out.made > 0, "no C_GenerateKey succeeded: {out:?}");
}

#[test]
#[serial]
fn flipping_sensitive_and_extractable_during_generate_key_never_makes_a_weak_cmk() {
    let s = S::user(module());
    let (before, weak_before, _) = token_keys_now("");
    assert_eq!(weak_before, 0, "a weak token key before the race");
    // TOKEN=TRUE throughout (a CMK; no label or id: cmkp11 assigns each its identity):
    // SENSITIVE=FALSE or EXTRACTABLE=TRUE is refused, the rest makes a sensitive,
    // non-extractable CMK.
    let f = Flags::new(true, true, false);
    let mut t = RacyTemplate::new(
        &f,
        true,
        &[(CKA_ENCRYPT, &[CK_TRUE]), (CKA_DECRYPT, &[CK_TRUE])],
    );
    let th = flipper(&f, [false, true, true]);
    let mut out = Outcomes::default();
    // Token keys are files: fewer rounds.
    for _ in 0..RACE_ROUNDS / 4 {
        let r = generate(&s, &mut t);
        out.add(&r, CKR_TEMPLATE_INCONSISTENT, "C_GenerateKey(CMK)");
        if let Ok(k) = r {
            let (token, sensitive, extractable, value_refused) = facts(&s, k);
            assert_eq!(token, [CK_TRUE], "a CMK that is not a token key");
            assert_eq!(sensitive, [CK_TRUE], "a CMK that is not sensitive");
            assert_eq!(extractable, [CK_FALSE], "an extractable CMK");
            assert!(value_refused, "a CMK's CKA_VALUE was readable");
        }
    }
    f.stop.store(true, Ordering::Relaxed);
    th.join().unwrap();
    let (after, weak, _) = token_keys_now("");
    assert_eq!(weak, 0, "a weak token key after the race ({out:?})");
    assert_eq!(
        after - before,
        out.made,
        "token keys other than the CMKs made ({out:?})"
    );
}

#[test]
#[serial]
fn flipping_token_and_sensitive_during_unwrap_key_never_makes_a_token_object() {
    let s = S::user(module());
    let label = unique_label("race-unwrap");
    let cmk = new_cmk(&s, Role::Wrap, &unique_label("race-kek"), None);
    let dek = new_dek(&s);
    let blob = ok(s.wrap(&mut Mech::kwp(), cmk, dek), "C_WrapKey");
    let (before, _, _) = token_keys_now(&label);
    // An unwrapped key is always a session DEK: TOKEN=TRUE or SENSITIVE=FALSE is refused.
    let f = Flags::new(false, true, true);
    let mut t = RacyTemplate::new(
        &f,
        false,
        &[
            (CKA_LABEL, label.as_bytes()),
            (CKA_ENCRYPT, &[CK_TRUE]),
            (CKA_DECRYPT, &[CK_TRUE]),
        ],
    );
    let th = flipper(&f, [true, true, false]);
    let mut out = Outcomes::default();
    for _ in 0..RACE_ROUNDS {
        let r = unwrap(&s, cmk, &blob, &mut t);
        out.add(&r, CKR_TEMPLATE_INCONSISTENT, "C_UnwrapKey");
        if let Ok(k) = r {
            let (token, sensitive, _, value_refused) = facts(&s, k);
            assert_eq!(token, [CK_FALSE], "a racing C_UnwrapKey made a token key");
            assert_eq!(
                sensitive,
                [CK_TRUE],
                "an unwrapped key that is not sensitive"
            );
            assert!(value_refused, "an unwrapped key's CKA_VALUE was readable");
            ok(s.destroy(k), "C_DestroyObject(DEK)");
        }
    }
    f.stop.store(true, Ordering::Relaxed);
    th.join().unwrap();
    let (after, weak, labelled) = token_keys_now(&label);
    assert_eq!(labelled, 0, "token keys from a racing template ({out:?})");
    assert_eq!(
        after, before,
        "token keys appeared during the race ({out:?})"
    );
    assert_eq!(weak, 0, "a weak token key ({out:?})");
    assert!(out.made > 0, "no C_UnwrapKey succeeded: {out:?}");
}

#[test]
#[serial]
fn unchanging_templates_still_make_deks_cmks_and_unwrapped_keys() {
    let s = S::user(module());
    let (before, _, _) = token_keys_now("");
    // A session DEK (the short way), extractable as asked.
    let f = Flags::new(false, true, true);
    let k = ok(
        generate(&s, &mut RacyTemplate::new(&f, true, &[])),
        "C_GenerateKey(DEK)",
    );
    assert_eq!(
        facts(&s, k),
        (vec![CK_FALSE], vec![CK_TRUE], vec![CK_TRUE], true)
    );
    // A CMK.
    let f = Flags::new(true, true, false);
    let cmk = ok(
        generate(
            &s,
            &mut RacyTemplate::new(&f, true, &[(CKA_WRAP, &[1]), (CKA_UNWRAP, &[1])]),
        ),
        "C_GenerateKey(CMK)",
    );
    assert_eq!(
        facts(&s, cmk),
        (vec![CK_TRUE], vec![CK_TRUE], vec![CK_FALSE], true)
    );
    // A DEK unwrapped under it.
    let blob = ok(s.wrap(&mut Mech::kwp(), cmk, k), "C_WrapKey");
    let f = Flags::new(false, true, false);
    let u = ok(
        unwrap(&s, cmk, &blob, &mut RacyTemplate::new(&f, false, &[])),
        "C_UnwrapKey",
    );
    assert_eq!(
        facts(&s, u),
        (vec![CK_FALSE], vec![CK_TRUE], vec![CK_FALSE], true)
    );
    // The refusals of an unchanging template.
    let f = Flags::new(true, true, true);
    expect_rv(
        generate(&s, &mut RacyTemplate::new(&f, true, &[])),
        CKR_TEMPLATE_INCONSISTENT,
        "C_GenerateKey(extractable CMK)",
    );
    let f = Flags::new(true, true, false);
    expect_rv(
        unwrap(&s, cmk, &blob, &mut RacyTemplate::new(&f, false, &[])),
        CKR_TEMPLATE_INCONSISTENT,
        "C_UnwrapKey(token key)",
    );
    let (after, weak, _) = token_keys_now("");
    assert_eq!(after, before + 1, "one CMK made");
    assert_eq!(weak, 0);
}

// ---------------------------------------------------------------------------------------
// AES-GCM parameters another thread rewrites.
// ---------------------------------------------------------------------------------------

/// `CK_GCM_PARAMS` with fields another thread may change (the layout of LP64 Linux).
#[repr(C)]
struct RacyGcm {
    iv: AtomicPtr<u8>,
    iv_len: AtomicU64,
    iv_bits: AtomicU64,
    aad: AtomicPtr<u8>,
    aad_len: AtomicU64,
    tag_bits: AtomicU64,
}

const _: () = assert!(std::mem::size_of::<RacyGcm>() == std::mem::size_of::<CK_GCM_PARAMS>());

fn gcm_encrypt_raw(s: &S, p: &RacyGcm, key: H, data: &[u8]) -> Rv<Vec<u8>> {
    let mut m = CK_MECHANISM {
        mechanism: CKM_AES_GCM,
        pParameter: p as *const RacyGcm as *mut c_void,
        ulParameterLen: std::mem::size_of::<CK_GCM_PARAMS>() as CK_ULONG,
    };
    rv(call!(s.m.f, C_EncryptInit, s.h, &mut m, key))?;
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
    Ok(out)
}

/// An IV buffer of 16 bytes, written by the module (the IV it chose) and by the test.
struct IvBuf(Box<[u8; 16]>);

impl IvBuf {
    fn ptr(&mut self) -> *mut u8 {
        self.0.as_mut_ptr()
    }
}

#[test]
#[serial]
fn flipping_the_gcm_iv_during_encrypt_init_never_encrypts_under_a_chosen_iv() {
    let s = S::user(module());
    let label = unique_label(ENCRYPT_ONLY);
    let k = new_cmk(&s, Role::Data, &label, None);
    let secret = b"the victim's secret record, 40 bytes....";
    // The victim's record, encrypted under an IV cmkp11 chose and wrote back.
    let mut own = IvBuf(Box::new([0; 16]));
    let mut victim = IvBuf(Box::new([0; 16]));
    let p = Arc::new(RacyGcm {
        iv: AtomicPtr::new(victim.ptr()),
        iv_len: AtomicU64::new(12),
        iv_bits: AtomicU64::new(96),
        aad: AtomicPtr::new(std::ptr::null_mut()),
        aad_len: AtomicU64::new(0),
        tag_bits: AtomicU64::new(128),
    });
    let ct = ok(gcm_encrypt_raw(&s, &p, k, secret), "victim's C_Encrypt");
    let victim_iv: [u8; 12] = victim.0[..12].try_into().unwrap();
    assert_ne!(victim_iv, [0; 12], "no IV written back");
    // The attacker encrypts zeros while another thread points the IV at the victim's IV
    // and back, and changes its length, as fast as it can.
    let (own_p, victim_p) = (own.ptr() as usize, victim.ptr() as usize);
    let stop = Arc::new(AtomicBool::new(false));
    let th = {
        let (p, stop) = (p.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut flips = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let to_victim = flips % 2 == 0;
                p.iv.store(
                    (if to_victim { victim_p } else { own_p }) as *mut u8,
                    Ordering::Relaxed,
                );
                p.iv_len
                    .store(if flips % 7 == 0 { 16 } else { 12 }, Ordering::Relaxed);
                flips += 1;
            }
            flips
        })
    };
    let mut out = Outcomes::default();
    let mut ivs = std::collections::HashSet::new();
    for _ in 0..RACE_ROUNDS * 4 {
        // The victim's IV where the attacker's pointer may go.
        victim.0[..12].copy_from_slice(&victim_iv);
        own.0[..12].copy_from_slice(&victim_iv);
        let r = gcm_encrypt_raw(&s, &p, k, &[0u8; 40]);
        // A 16-byte IV is refused: cmkp11's IVs are 96 bits.
        out.add(&r, CKR_MECHANISM_PARAM_INVALID, "C_EncryptInit/C_Encrypt");
        if let Ok(stream) = r {
            let recovered: Vec<u8> = ct[..40].iter().zip(&stream).map(|(a, b)| a ^ b).collect();
            assert_ne!(
                recovered, secret,
                "an encryption under the victim's IV decrypted the record ({out:?})"
            );
            // The IV cmkp11 chose went to one of the application's buffers.
            let written: Vec<[u8; 12]> = [&own, &victim]
                .iter()
                .map(|b| b.0[..12].try_into().unwrap())
                .filter(|iv| *iv != victim_iv)
                .collect();
            assert_eq!(written.len(), 1, "the IV was not written back once");
            assert!(ivs.insert(written[0]), "an IV was used twice");
        }
    }
    stop.store(true, Ordering::Relaxed);
    let flips = th.join().unwrap();
    assert!(flips > 0, "the racing thread never ran");
    assert!(out.made > 0, "no encryption succeeded: {out:?}");
}

#[test]
#[serial]
fn gcm_under_an_encrypt_only_cmk_opens_with_the_iv_written_back() {
    let s = S::user(module());
    let label = unique_label(ENCRYPT_ONLY);
    let k = new_cmk(&s, Role::Data, &label, None);
    let mut iv = IvBuf(Box::new([0; 16]));
    let p = RacyGcm {
        iv: AtomicPtr::new(iv.ptr()),
        iv_len: AtomicU64::new(12),
        iv_bits: AtomicU64::new(96),
        aad: AtomicPtr::new(std::ptr::null_mut()),
        aad_len: AtomicU64::new(0),
        tag_bits: AtomicU64::new(128),
    };
    let ct = ok(gcm_encrypt_raw(&s, &p, k, b"table key"), "C_Encrypt");
    let used: [u8; 12] = iv.0[..12].try_into().unwrap();
    assert_ne!(used, [0; 12], "no IV written back");
    let lines = run_child(
        "gcm-open",
        &[
            ("LC_LABEL", label),
            ("LC_IV", hex(&used)),
            ("LC_CT", hex(&ct)),
        ],
    );
    assert!(lines.iter().any(|l| l == "opened table key"), "{lines:?}");
    // A key without the rule keeps the application's IV.
    let free = new_cmk(&s, Role::Data, &unique_label("race-gcm"), None);
    iv.0[..12].copy_from_slice(&[5; 12]);
    ok(gcm_encrypt_raw(&s, &p, free, b"row"), "C_Encrypt");
    assert_eq!(iv.0[..12], [5; 12], "the application's IV was changed");
}
