//! A remote token: SoftHSM2 behind `p11-kit server` on a unix socket in a temporary
//! directory, reached through `p11-kit-client.so` as cmkp11's backend (the way a network
//! HSM is reached). What p11-kit 0.24's RPC carries works through the built `.so` (EC and
//! RSA key generation and signing, find by label, data objects, session keys); what it
//! cannot carry (AES-GCM and AES-KWP parameters: the client drops those mechanisms from
//! the list) is reported by the probe and refused with `CKR_MECHANISM_INVALID` and a log
//! line naming the capability. The server runs with `P11_KIT_DEBUG=rpc`, which logs every
//! call it serves: the test counts the round trips of each operation through cmkp11
//! against the same operation made directly through `p11-kit-client.so` and prints them.
//!
//! Its own test binary (one `C_Initialize` per process); skipped, with a note, where
//! p11-kit or its client module is not installed.

mod common;
mod p11kit_support;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::{aead::GcmParams, Mechanism, MechanismType};
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use p11kit_support::{client_module, Server};
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

const TOKEN: &str = "remote";
const PIN: &str = "1234";
fn login(ctx: &Pkcs11) -> Session {
    let slot = ctx.get_slots_with_token().unwrap()[0];
    let s = ctx.open_rw_session(slot).unwrap();
    match s.login(UserType::User, Some(&AuthPin::new(PIN.into()))) {
        Ok(())
        | Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::UserAlreadyLoggedIn, _)) => {
        }
        Err(e) => panic!("login: {e}"),
    }
    s
}

fn ec_pair(s: &Session, label: &str, token: bool) -> (ObjectHandle, ObjectHandle) {
    s.generate_key_pair(
        &Mechanism::EccKeyPairGen,
        &[
            Attribute::Token(token),
            Attribute::EcParams(common::P256_PARAMS.to_vec()),
            Attribute::Verify(true),
            Attribute::Label(label.into()),
        ],
        &[
            Attribute::Token(token),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Sign(true),
            Attribute::Label(label.into()),
        ],
    )
    .unwrap()
}

fn session_aes(s: &Session) -> ObjectHandle {
    s.generate_key(
        &Mechanism::AesKeyGen,
        &[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(32.into()),
            Attribute::Token(false),
            Attribute::Sensitive(true),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
        ],
    )
    .unwrap()
}

#[test]
fn softhsm2_behind_p11_kit_server_as_the_backend() {
    if !common::testing_cmkp11() {
        return;
    }
    let Some(client) = client_module() else {
        return;
    };
    let tmp = tempfile::Builder::new()
        .prefix("cmkp11-remote-")
        .tempdir()
        .unwrap();
    let dir = tmp.path();
    std::fs::create_dir(dir.join("tokens")).unwrap();
    let softhsm_conf = dir.join("softhsm2.conf");
    std::fs::write(
        &softhsm_conf,
        format!(
            "directories.tokendir = {}/tokens\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
            dir.display()
        ),
    )
    .unwrap();
    let out = Command::new("softhsm2-util")
        .env("SOFTHSM2_CONF", &softhsm_conf)
        .args(["--init-token", "--free", "--label", TOKEN])
        .args(["--so-pin", common::SO_PIN, "--pin", PIN])
        .output()
        .expect("run softhsm2-util");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let server = Server::start(dir, &softhsm_conf, TOKEN);
    let log = dir.join("cmkp11.log");
    let config = dir.join("cmkp11.toml");
    std::fs::write(
        &config,
        format!(
            "[backend]\nmodule = \"{}\"\n[log]\nlevel = \"info\"\nfile = \"{}\"\n",
            client.display(),
            log.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
    // Read at C_Initialize by cmkp11 and by p11-kit's client module inside it; the token
    // directory is only the server's.
    std::env::set_var("CMKP11_CONFIG", &config);
    std::env::set_var("P11_KIT_SERVER_ADDRESS", server.address());
    std::env::remove_var("SOFTHSM2_CONF");

    let ctx = Pkcs11::new(common::module_path()).unwrap();
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    let slots = ctx.get_slots_with_token().unwrap();
    assert_eq!(slots.len(), 1);
    assert_eq!(ctx.get_token_info(slots[0]).unwrap().label(), TOKEN);
    let s = login(&ctx);

    // What the RPC carries: EC and RSA CMKs generated in the token, signatures that
    // verify, find by label, a data object.
    let (ec_pub, ec_priv) = ec_pair(&s, "remote-ec", true);
    let digest = [5u8; 32];
    let sig = s.sign(&Mechanism::Ecdsa, ec_priv, &digest).unwrap();
    s.verify(&Mechanism::Ecdsa, ec_pub, &digest, &sig).unwrap();
    let (rsa_pub, rsa_priv) = s
        .generate_key_pair(
            &Mechanism::RsaPkcsKeyPairGen,
            &[
                Attribute::Token(true),
                Attribute::ModulusBits(2048.into()),
                Attribute::PublicExponent(vec![1, 0, 1]),
                Attribute::Verify(true),
                Attribute::Label(b"remote-rsa".to_vec()),
            ],
            &[
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Sign(true),
                Attribute::Label(b"remote-rsa".to_vec()),
            ],
        )
        .unwrap();
    let sig = s
        .sign(&Mechanism::Sha256RsaPkcs, rsa_priv, b"remote data")
        .unwrap();
    s.verify(&Mechanism::Sha256RsaPkcs, rsa_pub, b"remote data", &sig)
        .unwrap();
    let found = s
        .find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Label(b"remote-ec".to_vec()),
        ])
        .unwrap();
    assert_eq!(found, vec![ec_priv]);
    let data = s
        .create_object(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Token(true),
            Attribute::Label(b"remote-data".to_vec()),
            Attribute::Value(b"hello".to_vec()),
        ])
        .unwrap();
    assert_eq!(
        s.find_objects(&[Attribute::Label(b"remote-data".to_vec())])
            .unwrap(),
        vec![data]
    );

    // What it cannot carry: not listed, and refused naming the capability.
    let mechs = ctx.get_mechanism_list(slots[0]).unwrap();
    assert!(!mechs.contains(&MechanismType::AES_GCM), "{mechs:?}");
    assert!(
        !mechs.contains(&MechanismType::AES_KEY_WRAP_PAD),
        "{mechs:?}"
    );
    assert!(mechs.contains(&MechanismType::ECDSA));
    let dek = session_aes(&s);
    for _ in 0..2 {
        let mut iv = [1u8; 12];
        let gcm = GcmParams::new(&mut iv, b"", 128.into()).unwrap();
        let e = s
            .encrypt(&Mechanism::AesGcm(gcm), dek, b"secret")
            .unwrap_err();
        assert_eq!(
            common::rv_of(&e),
            cryptoki::error::RvError::MechanismInvalid
        );
    }
    let e = s.wrap_key(&Mechanism::AesKeyWrapPad, dek, dek).unwrap_err();
    assert_eq!(
        common::rv_of(&e),
        cryptoki::error::RvError::MechanismInvalid
    );

    // Round trips per operation, through cmkp11 and directly through the client module.
    let through = round_trips(&server, &ctx, &s, ec_priv);
    drop(s);
    ctx.finalize().unwrap();
    let direct_ctx = Pkcs11::new(&client).unwrap();
    direct_ctx
        .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    let ds = login(&direct_ctx);
    let key = ds
        .find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Label(b"remote-ec".to_vec()),
        ])
        .unwrap()[0];
    let direct = round_trips(&server, &direct_ctx, &ds, key);
    drop(ds);
    direct_ctx.finalize().unwrap();
    println!("round trips to the p11-kit server per operation (warm; cmkp11 / direct):");
    for ((name, a), (_, b)) in through.iter().zip(&direct) {
        println!("  {name}: {a} / {b}");
    }
    for ((name, a), (_, b)) in through.iter().zip(&direct) {
        assert!(
            a <= &(b + 1),
            "{name}: {a} round trips through cmkp11, {b} directly"
        );
    }

    let text = std::fs::read_to_string(&log).unwrap();
    let lines = |needle: &str| text.lines().filter(|l| l.contains(needle)).count();
    assert_eq!(lines("lacks capability `aes-gcm`"), 1, "{text}");
    assert_eq!(lines("lacks capability `aes-kwp`"), 1, "{text}");
    assert!(text.contains("CKM_AES_GCM not listed"), "{text}");
}

/// Round trips of the warm operations (each done once before it is counted).
fn round_trips(
    server: &Server,
    ctx: &Pkcs11,
    s: &Session,
    ec_priv: ObjectHandle,
) -> Vec<(&'static str, usize)> {
    let sign = || s.sign(&Mechanism::Ecdsa, ec_priv, &[9u8; 32]).unwrap();
    let find = || {
        s.find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Label(b"remote-ec".to_vec()),
        ])
        .unwrap()
    };
    let keygen = || {
        let k = session_aes(s);
        s.destroy_object(k).unwrap();
    };
    let slot = s.get_session_info().unwrap().slot_id();
    let open_close = || drop(ctx.open_ro_session(slot).unwrap());
    sign();
    find();
    keygen();
    open_close();
    vec![
        ("ecdsa-sign (SignInit+Sign)", server.count(sign).1),
        ("find-by-label (Init+Find+Final)", server.count(find).1),
        ("aes-keygen+destroy (session key)", server.count(keygen).1),
        ("open+close session", server.count(open_close).1),
    ]
}
