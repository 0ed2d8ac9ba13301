//! Exportable CMKs (issue 15 item 5), between two SoftHSM2 tokens, A (served by a
//! `cmkp11d`) and B (served by another).
//!
//! - The legitimate flow: an operator creates `exp-pay` exportable on A (`key show` says
//!   so), an application encrypts with it through A's daemon, B's operator makes an import
//!   key, A's SO registers its public key as a trusted destination, A's operator exports,
//!   B's operator imports the blob with the BYOK import, and an application decrypts on B
//!   (through B's daemon) what was encrypted on A. Each step is audited.
//! - A non-exportable CMK cannot leave A by any path: the CLI (`key export`), an
//!   application's `C_WrapKey` through the daemon (under the key's own kind of wrap and
//!   with the CMK as the key to wrap), and the token's own module with the user PIN
//!   (`C_WrapKey` under the trusted destination key: `CKR_KEY_UNEXTRACTABLE`).
//! - The exportable one cannot leave to anything but a trusted destination, even through
//!   the token directly with the user PIN: under the user's own RSA key or AES key the
//!   token says `CKR_KEY_NOT_WRAPPABLE`; the user cannot mark a key trusted
//!   (`CKR_ATTRIBUTE_READ_ONLY`), nor clear the key's `CKA_WRAP_WITH_TRUSTED`.

mod cli_support;
mod common;

use cli_support::{contains, Env, PIN, SO_PIN};
use common::{module_path, spawn_daemon, write_daemon_config_full, DaemonGuard, SOFTHSM_MODULE};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use std::path::Path;

const APP_PIN: &str = "export-app-credential";
const PLAIN: &[u8] = b"customer record 42: encrypted on token A";

fn rv<T: std::fmt::Debug>(r: cryptoki::error::Result<T>) -> RvError {
    match r {
        Err(Error::Pkcs11(rv, _)) => rv,
        other => panic!("expected a PKCS#11 error, got {other:?}"),
    }
}

/// The module in client mode, connected to the daemon at `socket`, logged in.
fn client(socket: &Path) -> (Pkcs11, Session) {
    std::env::set_var("CMKP11_SERVICE", format!("unix:{}", socket.display()));
    let ctx = Pkcs11::new(module_path()).unwrap();
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    let slot = ctx.get_slots_with_token().unwrap()[0];
    let s = ctx.open_rw_session(slot).unwrap();
    s.login(UserType::User, Some(&AuthPin::new(APP_PIN.into())))
        .unwrap();
    (ctx, s)
}

fn find(s: &Session, label: &str) -> ObjectHandle {
    let v = s
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(label.as_bytes().to_vec()),
        ])
        .unwrap();
    assert_eq!(v.len(), 1, "{label}: {v:?}");
    v[0]
}

fn oaep_sha1() -> Mechanism<'static> {
    Mechanism::RsaPkcsOaep(PkcsOaepParams::new(
        MechanismType::SHA1,
        PkcsMgfType::MGF1_SHA1,
        PkcsOaepSource::empty(),
    ))
}

fn records(audit: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(audit)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn an_exportable_cmk_moves_to_a_trusted_token_and_nothing_else_leaves() {
    let a = Env::new();
    let b = Env::with_config("[policy]\nallow_import = true\n");
    let audit = a.path("audit.log");
    a.set_config(&format!("[audit]\nfile = \"{}\"\n", audit.display()));
    let so_pin = a.path("so.pin");
    std::fs::write(&so_pin, SO_PIN).unwrap();

    // A: the operator's keys; A's daemon.
    a.ok(&["key", "create", "exp-pay", "--role", "data", "--exportable"]);
    a.ok(&["key", "create", "exp-plain", "--role", "data"]);
    a.ok(&["key", "create", "exp-wrap", "--role", "wrap"]);
    assert_eq!(a.show("exp-pay")["exportable"], true);
    assert_eq!(a.show("exp-plain")["exportable"], false);
    contains(&a.ok(&["key", "show", "exp-pay"]), "exportable:   yes");
    let (conf_a, sock_a) = write_daemon_config_full(
        a.dir(),
        "a",
        APP_PIN,
        "",
        &format!("\n[audit]\nfile = \"{}\"\n", audit.display()),
    );
    let daemon_a = DaemonGuard(spawn_daemon(&conf_a, &sock_a, &a.softhsm_conf));

    // An application encrypts with the exportable key through A's daemon.
    let (ctx, s) = client(&sock_a);
    let key = find(&s, "exp-pay");
    let mut iv = [9u8; 12];
    let ct = s
        .encrypt(
            &Mechanism::AesGcm(GcmParams::new(&mut iv, b"aad", 128.into()).unwrap()),
            key,
            PLAIN,
        )
        .unwrap();
    // It cannot wrap a CMK, exportable or not (only DEKs are ever wrapped).
    let wrap = find(&s, "exp-wrap");
    for k in ["exp-pay", "exp-plain"] {
        assert_eq!(
            rv(s.wrap_key(&Mechanism::AesKeyWrapPad, wrap, find(&s, k))),
            RvError::KeyUnextractable,
            "{k}"
        );
    }
    drop(s);
    ctx.finalize().unwrap();

    // B: an import key; A's SO registers its public key as a trusted destination.
    let dest_pem = b.path("dest.pem");
    b.ok(&[
        "key",
        "import-key",
        "create",
        "from-a",
        "--out",
        dest_pem.to_str().unwrap(),
    ]);
    // Without the SO PIN (the user's PIN is not enough) nothing is registered.
    let bad_so = a.path("bad.pin");
    std::fs::write(&bad_so, PIN).unwrap();
    let out = a.run(&[
        "key",
        "destination",
        "add",
        "token-b",
        "--public-key",
        dest_pem.to_str().unwrap(),
        "--so-pin-file",
        bad_so.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    contains(
        &String::from_utf8_lossy(&out.stderr),
        "the SO PIN is incorrect",
    );
    assert!(a
        .json(&["key", "destination", "list"])
        .as_array()
        .unwrap()
        .is_empty());
    a.ok(&[
        "key",
        "destination",
        "add",
        "token-b",
        "--public-key",
        dest_pem.to_str().unwrap(),
        "--so-pin-file",
        so_pin.to_str().unwrap(),
    ]);
    let dests = a.json(&["key", "destination", "list"]);
    assert_eq!(dests[0]["name"], "token-b");
    assert_eq!(dests[0]["trusted"], true);

    // The non-exportable key: refused by the CLI, audited.
    let blob = a.path("exp.blob");
    let e = a.fails(&[
        "key",
        "export",
        "exp-plain",
        "--to",
        "token-b",
        "--out",
        blob.to_str().unwrap(),
    ]);
    contains(&e, "not exportable");
    // An unknown destination.
    let e = a.fails(&[
        "key",
        "export",
        "exp-pay",
        "--to",
        "nowhere",
        "--out",
        blob.to_str().unwrap(),
    ]);
    contains(&e, "no trusted destination");
    assert!(!blob.exists());

    // The export.
    let out = a.json(&[
        "key",
        "export",
        "exp-pay",
        "--to",
        "token-b",
        "--out",
        blob.to_str().unwrap(),
    ]);
    assert_eq!(out["version"], 1);
    assert_eq!(out["bits"], 256);
    assert_eq!(out["role"], "data");
    let hash = out["oaep_hash"].as_str().unwrap().to_string();
    assert_eq!(std::fs::read(&blob).unwrap().len(), 384, "RSA-3072 OAEP");
    let recs = records(&audit);
    let export_ok = recs
        .iter()
        .find(|r| r["op"] == "export" && r["key"] == "exp-pay" && r["result"] == "CKR_OK")
        .expect("export record");
    assert!(
        export_ok["reason"]
            .as_str()
            .unwrap()
            .contains("to destination token-b"),
        "{export_ok}"
    );
    assert!(recs.iter().any(|r| r["op"] == "export"
        && r["key"] == "exp-plain"
        && r["result"] == "CKR_KEY_UNEXTRACTABLE"));
    assert!(recs
        .iter()
        .any(|r| r["op"] == "add-destination" && r["key"] == "token-b" && r["result"] == "CKR_OK"));

    // B imports it with the BYOK import; an application decrypts there.
    b.ok(&[
        "key",
        "import",
        "exp-pay",
        "--import-key",
        "from-a",
        "--wrapped",
        blob.to_str().unwrap(),
        "--oaep-hash",
        &hash,
        "--bits",
        "256",
        "--role",
        "data",
    ]);
    assert_eq!(b.show("exp-pay")["origin"], "imported");
    assert_eq!(b.show("exp-pay")["exportable"], false);
    // A rotation keeps the key exportable: its new version is made the same way, is used,
    // and is what the next export carries.
    a.ok(&["key", "rotate", "exp-pay"]);
    let shown = a.show("exp-pay");
    assert_eq!(shown["exportable"], true);
    assert_eq!(shown["versions"], serde_json::json!([1, 2]));
    let blob2 = a.path("exp2.blob");
    let out = a.json(&[
        "key",
        "export",
        "exp-pay",
        "--to",
        "token-b",
        "--out",
        blob2.to_str().unwrap(),
    ]);
    assert_eq!(out["version"], 2);
    let (conf_b, sock_b) = write_daemon_config_full(
        b.dir(),
        "b",
        APP_PIN,
        "",
        "\n[policy]\nallow_import = true\n",
    );
    let daemon_b = DaemonGuard(spawn_daemon(&conf_b, &sock_b, &b.softhsm_conf));
    let (ctx, s) = client(&sock_b);
    let mut iv = [9u8; 12];
    let back = s
        .decrypt(
            &Mechanism::AesGcm(GcmParams::new(&mut iv, b"aad", 128.into()).unwrap()),
            find(&s, "exp-pay"),
            &ct,
        )
        .unwrap();
    assert_eq!(back, PLAIN, "B decrypts what A encrypted");
    drop(s);
    ctx.finalize().unwrap();
    drop(daemon_b);

    // Token A through its own module with the user PIN: the token enforces the rest.
    std::env::set_var("SOFTHSM2_CONF", &a.softhsm_conf);
    let p = Pkcs11::new(SOFTHSM_MODULE).unwrap();
    p.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    let slot = p.get_slots_with_token().unwrap()[0];
    let t = p.open_rw_session(slot).unwrap();
    t.login(UserType::User, Some(&AuthPin::new(PIN.into())))
        .unwrap();
    let dest = t
        .find_objects(&[
            Attribute::Class(ObjectClass::PUBLIC_KEY),
            Attribute::Label(b"cmkp11:dest:token-b".to_vec()),
        ])
        .unwrap()[0];
    let raw = |label: &str| {
        t.find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(label.as_bytes().to_vec()),
        ])
        .unwrap()[0]
    };
    let (plain_key, exp_key) = (raw("exp-plain"), raw("exp-pay"));
    // Non-exportable: not even to the trusted destination.
    assert_eq!(
        rv(t.wrap_key(&oaep_sha1(), dest, plain_key)),
        RvError::KeyUnextractable
    );
    // Exportable: only to a trusted key.
    let (my_pub, _) = t
        .generate_key_pair(
            &Mechanism::RsaPkcsKeyPairGen,
            &[
                Attribute::Token(false),
                Attribute::ModulusBits(2048.into()),
                Attribute::PublicExponent(vec![1, 0, 1]),
                Attribute::Wrap(true),
            ],
            &[Attribute::Token(false), Attribute::Unwrap(true)],
        )
        .unwrap();
    assert_eq!(
        rv(t.wrap_key(&oaep_sha1(), my_pub, exp_key)),
        RvError::KeyNotWrappable
    );
    let my_aes = t
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Token(false),
                Attribute::ValueLen(32.into()),
                Attribute::Wrap(true),
            ],
        )
        .unwrap();
    assert_eq!(
        rv(t.wrap_key(&Mechanism::AesKeyWrapPad, my_aes, exp_key)),
        RvError::KeyNotWrappable
    );
    // The user cannot make his key trusted, nor the CMK wrappable by anything.
    assert_eq!(
        rv(t.update_attributes(my_pub, &[Attribute::Trusted(true)])),
        RvError::AttributeReadOnly
    );
    assert_eq!(
        rv(t.create_object(&[
            Attribute::Class(ObjectClass::PUBLIC_KEY),
            Attribute::KeyType(KeyType::RSA),
            Attribute::Token(false),
            Attribute::Modulus(vec![0xc1; 256]),
            Attribute::PublicExponent(vec![1, 0, 1]),
            Attribute::Wrap(true),
            Attribute::Trusted(true),
        ])),
        RvError::AttributeReadOnly
    );
    assert!(matches!(
        rv(t.update_attributes(exp_key, &[Attribute::WrapWithTrusted(false)])),
        RvError::AttributeReadOnly | RvError::ActionProhibited
    ));
    let facts = t
        .get_attributes(
            exp_key,
            &[
                AttributeType::Sensitive,
                AttributeType::WrapWithTrusted,
                AttributeType::Extractable,
            ],
        )
        .unwrap();
    assert!(facts.contains(&Attribute::Sensitive(true)));
    assert!(facts.contains(&Attribute::WrapWithTrusted(true)));
    drop(t);
    drop(daemon_a);
    std::mem::forget(p);
}
