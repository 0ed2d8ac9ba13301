//! Torn key objects (DESIGN.md §5, crash safety): SoftHSM2 2.6 writes a new key object's
//! file twice, first with the template's attributes (class, key type, id, label, usage
//! flags, `CKA_VALUE_LEN`), then with the value, `CKA_CHECK_VALUE`, `CKA_LOCAL` and
//! `CKA_KEY_GEN_MECHANISM` (`C_GenerateKey`; `C_UnwrapKey` likewise without the check
//! value). A process killed between the two leaves an object that is found with all its
//! attributes but has an empty value. Found with a kill -9 loop around `C_GenerateKey` and
//! `C_UnwrapKey`: the torn files are exactly the healthy ones minus that second write.
//!
//! This test makes the same object deterministically: a child generates the next version
//! of a CMK exactly as a rotation does, then the object file is rewritten as the first
//! write left it ([`tear`]: empty `CKA_VALUE` and `CKA_CHECK_VALUE`, `CKA_LOCAL` false,
//! `CKA_KEY_GEN_MECHANISM` unavailable, generation one lower). Then:
//! - the token reports what real torn objects showed (checked against every kind of
//!   healthy key, including look-alikes: unwrapped keys, created keys without a check
//!   value, a key whose usability probe fails for another reason);
//! - the purge of `CMKP11_Purge` (what `cmkp11 key purge` runs) and the purge at a
//!   read-write login each destroy the torn version, log it at warn level with the key
//!   name and version, leave every healthy key alone, and the next rotation takes the
//!   version number without a duplicate; every blob made so far still opens.
//!
//! Children do the token work (SoftHSM2 caches objects in memory: the file is edited while
//! no process has the token open).

#[macro_use]
mod common;
mod lifecycle_support;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::Error;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki_sys::*;
use lifecycle_support::*;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// SHA-256 of the empty string.
const SHA256_OF_NOTHING: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

// ----------------------------------------------------------------------------------------
// Children.
// ----------------------------------------------------------------------------------------

/// A logged-in read-write session on SoftHSM2 itself, through `cryptoki` (children only).
fn direct() -> Session {
    let ctx = Pkcs11::new(common::SOFTHSM_MODULE).expect("load SoftHSM2");
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .expect("C_Initialize");
    let slot = ctx.get_slots_with_token().expect("slots")[0];
    let s = ctx.open_rw_session(slot).expect("C_OpenSession");
    s.login(UserType::User, Some(&common::user_pin()))
        .expect("C_Login");
    s
}

/// The one token object with `CKA_ID` `id`.
fn by_id(s: &Session, id: &[u8]) -> ObjectHandle {
    let found = s
        .find_objects(&[Attribute::Token(true), Attribute::Id(id.to_vec())])
        .expect("find");
    assert_eq!(found.len(), 1, "objects with id {}: {found:?}", hex(id));
    found[0]
}

fn rv<T>(r: cryptoki::error::Result<T>) -> String {
    match r {
        Ok(_) => "CKR_OK".into(),
        Err(Error::Pkcs11(rv, _)) => format!("{rv:?}"),
        Err(e) => format!("{e}"),
    }
}

fn digest_of_value(s: &Session, k: ObjectHandle) -> String {
    s.digest_init(&Mechanism::Sha256).expect("C_DigestInit");
    let fed = s.digest_key(k);
    let d = s.digest_final();
    fed.expect("C_DigestKey");
    hex(&d.expect("C_DigestFinal"))
}

fn attr(s: &Session, k: ObjectHandle, t: AttributeType) -> Attribute {
    s.get_attributes(k, &[t])
        .expect("C_GetAttributeValue")
        .pop()
        .unwrap_or_else(|| panic!("{t:?} unavailable"))
}

/// The id of version `v` of the CMK whose id is `id`.
fn vid(id: &str, v: u32) -> Vec<u8> {
    cmkp11::keystore::version_id(id.as_bytes(), v)
}

#[test]
#[ignore = "entry point of child processes spawned by the other tests"]
fn child_entry() {
    let Some(role) = child_role() else { return };
    if direct_child(&role) {
        return;
    }
    match role.as_str() {
        // Through cmkp11: a CMK with three versions and a blob under each.
        "tk-setup" => {
            let s = S::user(cmk());
            let label = arg("LC_LABEL");
            let h = new_cmk(&s, Role::Wrap, &label, Some(label.as_bytes()));
            for v in 1..=3 {
                if v > 1 {
                    ok(s.rotate(h), "rotate");
                }
                let e = seal(&s, h, v);
                say(&format!(
                    "env {v} {} {} {}",
                    hex(&e.blob),
                    hex(&e.iv),
                    hex(&e.ct)
                ));
            }
        }
        // SoftHSM2 directly: version `LC_V` generated as `lifecycle::rotate` does it.
        "tk-gen" => {
            let s = direct();
            let label = arg("LC_LABEL");
            let v: u32 = arg("LC_V").parse().unwrap();
            let prev = by_id(&s, &vid(&label, v - 1));
            use AttributeType as T;
            let mut t = s
                .get_attributes(
                    prev,
                    &[
                        T::ValueLen,
                        T::Label,
                        T::Private,
                        T::Encrypt,
                        T::Decrypt,
                        T::Sign,
                        T::Verify,
                        T::Wrap,
                        T::Unwrap,
                    ],
                )
                .unwrap();
            t.extend([
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::Token(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Derive(false),
                Attribute::Id(vid(&label, v)),
            ]);
            s.generate_key(&Mechanism::AesKeyGen, &t)
                .expect("C_GenerateKey");
            say("made");
        }
        // SoftHSM2 directly: healthy keys that share some traits of a torn one.
        "tk-extra" => {
            let s = direct();
            let common = |label: &str| {
                vec![
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::Label(label.as_bytes().to_vec()),
                    Attribute::Id(label.as_bytes().to_vec()),
                ]
            };
            // A MAC key too short for HMAC-SHA256: its probe fails (CKR_KEY_SIZE_RANGE).
            let mut t = common(&arg("LC_HMAC"));
            t.extend([
                Attribute::KeyType(KeyType::GENERIC_SECRET),
                Attribute::ValueLen(16.into()),
                Attribute::Sign(true),
                Attribute::Verify(true),
            ]);
            s.generate_key(&Mechanism::GenericSecretKeyGen, &t)
                .expect("generate the short MAC key");
            // Imported (unwrapped): CKA_LOCAL false, no check value, CKA_VALUE_LEN 0.
            let kek = s
                .generate_key(
                    &Mechanism::AesKeyGen,
                    &[
                        Attribute::Token(false),
                        Attribute::ValueLen(32.into()),
                        Attribute::Wrap(true),
                        Attribute::Unwrap(true),
                    ],
                )
                .unwrap();
            let src = s
                .generate_key(
                    &Mechanism::AesKeyGen,
                    &[
                        Attribute::Token(false),
                        Attribute::ValueLen(32.into()),
                        Attribute::Extractable(true),
                    ],
                )
                .unwrap();
            let blob = s.wrap_key(&Mechanism::AesKeyWrap, kek, src).unwrap();
            let mut t = common(&arg("LC_IMP"));
            t.extend([
                Attribute::KeyType(KeyType::AES),
                Attribute::Wrap(true),
                Attribute::Unwrap(true),
            ]);
            s.unwrap_key(&Mechanism::AesKeyWrap, kek, &blob, &t)
                .expect("unwrap the imported key");
            // Created with an explicitly empty check value.
            let mut t = common(&arg("LC_CRE"));
            t.extend([
                Attribute::KeyType(KeyType::AES),
                Attribute::Wrap(true),
                Attribute::Unwrap(true),
                Attribute::Value((0u8..32).collect()),
                Attribute::CheckValue(Vec::new()),
            ]);
            s.create_object(&t).expect("create the key");
            say("made");
        }
        // SoftHSM2 directly: what the token says of the torn object and of healthy keys,
        // and `keystore::torn` on each.
        "tk-signature" => {
            let s = direct();
            let label = arg("LC_LABEL");
            let torn = by_id(&s, &vid(&label, 4));
            // What real torn objects showed.
            assert_eq!(digest_of_value(&s, torn), SHA256_OF_NOTHING);
            assert_eq!(
                attr(&s, torn, AttributeType::CheckValue),
                Attribute::CheckValue(vec![])
            );
            assert_eq!(
                attr(&s, torn, AttributeType::Local),
                Attribute::Local(false)
            );
            assert_eq!(
                attr(&s, torn, AttributeType::ValueLen),
                Attribute::ValueLen(32.into())
            );
            // CK_UNAVAILABLE_INFORMATION, which cryptoki cannot turn into a mechanism.
            assert!(
                matches!(
                    s.get_attributes(torn, &[AttributeType::KeyGenMechanism]),
                    Err(Error::NotSupported)
                ),
                "CKA_KEY_GEN_MECHANISM should be unavailable"
            );
            // cmkp11's probe of a wrapping key: wrap a session key.
            let tmp = s
                .generate_key(
                    &Mechanism::AesKeyGen,
                    &[
                        Attribute::Token(false),
                        Attribute::ValueLen(16.into()),
                        Attribute::Extractable(true),
                    ],
                )
                .unwrap();
            assert_eq!(
                rv(s.wrap_key(&Mechanism::AesKeyWrap, torn, tmp)),
                "GeneralError"
            );
            assert!(cmkp11::keystore::torn(&s, torn), "the torn version");
            // The session is left without an operation.
            s.digest_init(&Mechanism::Sha256)
                .expect("no operation left");
            // A session busy with an operation cannot tell: not torn.
            assert!(
                !cmkp11::keystore::torn(&s, torn),
                "asked with an operation active"
            );
            s.digest_final()
                .expect("the caller's operation is still there");
            // Healthy keys, every kind.
            for v in 1..=3 {
                let k = by_id(&s, &vid(&label, v));
                assert_ne!(digest_of_value(&s, k), SHA256_OF_NOTHING);
                assert_eq!(attr(&s, k, AttributeType::Local), Attribute::Local(true));
                assert!(!cmkp11::keystore::torn(&s, k), "version {v}");
            }
            let hmac = by_id(&s, arg("LC_HMAC").as_bytes());
            assert_eq!(
                rv(s.sign(&Mechanism::Sha256Hmac, hmac, &[0u8])),
                "KeySizeRange",
                "the short MAC key's probe fails for another reason"
            );
            assert!(!cmkp11::keystore::torn(&s, hmac), "short MAC key");
            let imp = by_id(&s, arg("LC_IMP").as_bytes());
            // An imported key looks like a torn one in every attribute but its value.
            assert_eq!(attr(&s, imp, AttributeType::Local), Attribute::Local(false));
            assert_eq!(
                attr(&s, imp, AttributeType::CheckValue),
                Attribute::CheckValue(vec![])
            );
            assert_eq!(
                attr(&s, imp, AttributeType::ValueLen),
                Attribute::ValueLen(0.into())
            );
            assert!(!cmkp11::keystore::torn(&s, imp), "imported key");
            let cre = by_id(&s, arg("LC_CRE").as_bytes());
            assert_eq!(
                attr(&s, cre, AttributeType::CheckValue),
                Attribute::CheckValue(vec![])
            );
            assert!(!cmkp11::keystore::torn(&s, cre), "created key");
            say("checked");
        }
        // Through cmkp11: a purge by `CMKP11_Purge`, after a read-only or a read-write
        // login (neither purges anything itself).
        "tk-purge" => {
            let label = arg("LC_LABEL");
            let s = if arg("LC_HOW") == "admin" {
                // A read-only login purges nothing: the torn object is there, no version.
                let ro = S::open_ro(cmk());
                ok(ro.login(), "C_Login");
                let s = S::open(cmk());
                let h = ok(s.find_label(&label), "find")[0];
                assert_eq!(s.ulong(h, CKA_CMKP11_VERSION_COUNT), 3);
                assert!(ok(s.find_version(&label, 4), "find v4").is_empty());
                ok(s.purge(), "CMKP11_Purge");
                std::mem::forget(ro);
                s
            } else {
                // A read-write login purges nothing either (the deletion window and the
                // clean-up are the operator's): the torn object is still there.
                let s = S::user(cmk());
                assert!(
                    std::path::Path::new(&arg("LC_FILE")).exists(),
                    "a read-write login destroyed the torn object"
                );
                ok(s.purge(), "CMKP11_Purge");
                s
            };
            let h = ok(s.find_label(&label), "find")[0];
            assert_eq!(s.ulong(h, CKA_CMKP11_VERSION_COUNT), 3);
            say("purged");
        }
        // Through cmkp11: every blob opens, and the next rotation is version 4.
        "tk-after" => {
            let s = S::user(cmk());
            let label = arg("LC_LABEL");
            let envs: Vec<Envelope> = arg("LC_ENVS")
                .split(';')
                .map(|e| {
                    let f: Vec<&str> = e.split(' ').collect();
                    Envelope {
                        version: f[0].parse().unwrap(),
                        blob: unhex(f[1]),
                        iv: unhex(f[2]).try_into().unwrap(),
                        ct: unhex(f[3]),
                    }
                })
                .collect();
            let h = ok(s.find_label(&label), "find")[0];
            ok(s.rotate(h), "rotate after the purge");
            assert_eq!(s.ulong(h, CKA_CMKP11_VERSION_COUNT), 4);
            assert_eq!(s.ulong(h, CKA_CMKP11_VERSION), 4);
            for e in &envs {
                ok(open(&s, h, e), &format!("blob of version {}", e.version));
                let vh = s.version_handle(&label, e.version);
                ok(open(&s, vh, e), "blob through its own version");
            }
            let e = seal(&s, h, 4);
            ok(
                open(&s, s.version_handle(&label, 4), &e),
                "blob of version 4",
            );
            say("done");
        }
        other => panic!("unknown child role {other}"),
    }
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

// ----------------------------------------------------------------------------------------
// The parent.
// ----------------------------------------------------------------------------------------

/// The token's directory (the only one under the test's token dir).
fn token_dir() -> PathBuf {
    let tokens = common::test_env().dir.join("tokens");
    let dirs: Vec<PathBuf> = std::fs::read_dir(&tokens)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    assert_eq!(dirs.len(), 1, "token dirs: {dirs:?}");
    dirs[0].clone()
}

fn object_files() -> BTreeSet<PathBuf> {
    std::fs::read_dir(token_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "object"))
        .collect()
}

/// Rewrites a SoftHSM2 object file of a generated secret key as the first of its two
/// writes left it, which is what a process killed between them leaves: `CKA_VALUE` and
/// `CKA_CHECK_VALUE` empty, `CKA_LOCAL` false, `CKA_KEY_GEN_MECHANISM`
/// `CK_UNAVAILABLE_INFORMATION`, and the generation before the last write. (Diffing the
/// dumps of real torn files and healthy ones of the same template, made by a kill -9 loop,
/// shows exactly these differences, attribute order and everything else unchanged.)
///
/// The file: a big-endian u64 generation, then per attribute its type and kind (u64 each)
/// and its value: kind 1 boolean (1 byte), 2 unsigned long (u64), 3 byte string (u64
/// length, bytes), 4 attribute map and 5 mechanism set (u64 length; empty here).
fn tear(path: &Path) {
    let b = std::fs::read(path).expect("read the object file");
    let u = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().unwrap());
    let mut out = (u(0) - 1).to_be_bytes().to_vec();
    let mut changed = BTreeSet::new();
    let mut i = 8;
    while i < b.len() {
        let (ty, kind) = (u(i), u(i + 8));
        out.extend_from_slice(&b[i..i + 16]);
        i += 16;
        match kind {
            1 => {
                if ty == CKA_LOCAL {
                    assert_eq!(b[i], 0xff, "a generated key is local");
                    out.push(0);
                    changed.insert(ty);
                } else {
                    out.push(b[i]);
                }
                i += 1;
            }
            2 => {
                if ty == CKA_KEY_GEN_MECHANISM {
                    assert_eq!(u(i), CKM_AES_KEY_GEN);
                    out.extend_from_slice(&u64::MAX.to_be_bytes());
                    changed.insert(ty);
                } else {
                    out.extend_from_slice(&b[i..i + 8]);
                }
                i += 8;
            }
            3 => {
                let n = u(i) as usize;
                if ty == CKA_VALUE || ty == CKA_CHECK_VALUE {
                    assert!(n > 0, "attribute {ty:#x} is empty already");
                    out.extend_from_slice(&0u64.to_be_bytes());
                    changed.insert(ty);
                } else {
                    out.extend_from_slice(&b[i..i + 8 + n]);
                }
                i += 8 + n;
            }
            4 | 5 => {
                assert_eq!(
                    u(i),
                    0,
                    "attribute {ty:#x}: only empty maps and sets expected"
                );
                out.extend_from_slice(&b[i..i + 8]);
                i += 8;
            }
            k => panic!("attribute {ty:#x}: unknown kind {k}"),
        }
    }
    assert_eq!(changed.len(), 4, "changed attributes: {changed:x?}");
    std::fs::write(path, out).expect("write the object file");
}

/// Generates version 4 of `label` as a rotation does, then tears it; returns its file.
fn make_torn(label: &str) -> PathBuf {
    let before = object_files();
    let lines = run_child(
        "tk-gen",
        &[("LC_LABEL", label.to_string()), ("LC_V", "4".into())],
    );
    assert!(lines.iter().any(|l| l == "made"), "tk-gen: {lines:?}");
    let new: Vec<PathBuf> = object_files().difference(&before).cloned().collect();
    assert_eq!(new.len(), 1, "new object files: {new:?}");
    tear(&new[0]);
    new[0].clone()
}

/// Runs a child; returns its stderr (where the module logs).
fn run_child_stderr(role: &str, env: &[(&str, String)]) -> String {
    let out = child_command(role)
        .envs(env.iter().cloned())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success() && protocol_lines(&stdout).iter().any(|l| l == "purged"),
        "child `{role}` failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    stderr
}

fn keys_labelled(label: &str) -> (usize, Vec<String>) {
    let lines = inspect_lines(label, label.as_bytes());
    let field = |w: &str| {
        lines
            .iter()
            .find_map(|l| l.strip_prefix(w))
            .unwrap_or_else(|| panic!("inspect: no `{w}` in {lines:?}"))
            .trim()
            .to_string()
    };
    let ids = field("ids ").split(',').map(str::to_string).collect();
    (field("keys ").parse().unwrap(), ids)
}

#[test]
fn purge_destroys_torn_versions_and_keeps_healthy_keys() {
    common::test_env();
    let label = unique_label("torn");
    let hmac = unique_label("torn-short-mac");
    let imp = unique_label("torn-imported");
    let cre = unique_label("torn-created");
    let env_of = |extra: &[(&'static str, String)]| {
        let mut e = vec![
            ("LC_LABEL", label.clone()),
            ("LC_HMAC", hmac.clone()),
            ("LC_IMP", imp.clone()),
            ("LC_CRE", cre.clone()),
        ];
        e.extend_from_slice(extra);
        e
    };
    let envs: Vec<String> = run_child("tk-setup", &env_of(&[]))
        .iter()
        .filter_map(|l| l.strip_prefix("env ").map(str::to_string))
        .collect();
    assert_eq!(envs.len(), 3, "setup: {envs:?}");
    run_child("tk-extra", &env_of(&[]));

    let destroyed = format!("key `{label}` version 4: destroyed a torn key object");
    let left = format!("key `{hmac}` version untagged: left alone");
    // The torn object purged by CMKP11_Purge (what `cmkp11 key purge` runs), after a
    // read-only login, then another one after a read-write login (which purges nothing).
    for how in ["admin", "login"] {
        let file = make_torn(&label);
        if how == "admin" {
            let lines = run_child("tk-signature", &env_of(&[]));
            assert!(lines.iter().any(|l| l == "checked"), "{lines:?}");
        }
        let log = run_child_stderr(
            "tk-purge",
            &env_of(&[
                ("LC_HOW", how.into()),
                ("LC_FILE", file.display().to_string()),
            ]),
        );
        assert!(
            log.contains(&destroyed),
            "{how}: no `{destroyed}` in:\n{log}"
        );
        assert!(log.contains(&left), "{how}: no `{left}` in:\n{log}");
        assert_eq!(log.matches("destroyed a torn").count(), 1, "{how}:\n{log}");
        assert!(
            !file.exists(),
            "{how}: the torn object's file is still there"
        );
        assert_eq!(keys_labelled(&label).0, 3, "{how}: healthy versions");
        for k in [&hmac, &imp, &cre] {
            assert_eq!(keys_labelled(k).0, 1, "{how}: `{k}` kept");
        }
    }

    run_child("tk-after", &env_of(&[("LC_ENVS", envs.join(";"))]));
    let (n, ids) = keys_labelled(&label);
    assert_eq!(n, 4, "versions after the next rotation");
    assert_eq!(
        ids.iter().collect::<BTreeSet<_>>().len(),
        4,
        "duplicate CKA_IDs: {ids:?}"
    );
}
