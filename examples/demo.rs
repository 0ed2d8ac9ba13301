//! A short tour of cmkp11 as an application sees it, through the `cryptoki` crate.
//!
//! It loads a PKCS#11 module (normally `libcmkp11.so`), lists its slots, and runs the
//! envelope-encryption flow: a wrap key (a CMK) kept in the token, a session data key
//! (a DEK) wrapped with AES-KWP and unwrapped again, and an AES-GCM round trip that
//! encrypts with the original DEK and decrypts with the unwrapped one.
//!
//! ```text
//! cargo run --release --example demo -- --module target/release/libcmkp11.so \
//!     --token cmkp11-demo --pin 1234
//! ```
//!
//! Each option can also come from the environment: `CMKP11_DEMO_MODULE`,
//! `CMKP11_DEMO_TOKEN`, `CMKP11_DEMO_PIN`. `scripts/demo.sh` sets everything up.

use std::error::Error;
use std::process::ExitCode;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;

/// Label of the wrap key the demo keeps in the token (reused on later runs).
const WRAP_KEY_LABEL: &str = "cmkp11-demo-wrap-key";
/// Additional authenticated data bound to the demo ciphertext.
const AAD: &[u8] = b"cmkp11 demo";
/// The message the demo encrypts.
const MESSAGE: &[u8] = b"Customer data, encrypted under a key that never left the token.";

/// Command-line options.
struct Options {
    module: String,
    token: String,
    pin: String,
}

fn usage() -> String {
    "usage: demo [--module PATH] [--token LABEL] [--pin PIN]\n\
     (defaults: $CMKP11_DEMO_MODULE or target/release/libcmkp11.so, \
     $CMKP11_DEMO_TOKEN or cmkp11-demo, $CMKP11_DEMO_PIN)"
        .to_string()
}

fn parse_args() -> Result<Options, String> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let mut module =
        env("CMKP11_DEMO_MODULE").unwrap_or_else(|| "target/release/libcmkp11.so".into());
    let mut token = env("CMKP11_DEMO_TOKEN").unwrap_or_else(|| "cmkp11-demo".into());
    let mut pin = env("CMKP11_DEMO_PIN");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--module" => module = value("--module")?,
            "--token" => token = value("--token")?,
            "--pin" => pin = Some(value("--pin")?),
            "-h" | "--help" => return Err(usage()),
            other => return Err(format!("unknown argument '{other}'\n{}", usage())),
        }
    }
    let pin = pin.ok_or(format!("no PIN given\n{}", usage()))?;
    Ok(Options { module, token, pin })
}

/// "C_Login returned PinIncorrect" for a PKCS#11 error; cryptoki's own text otherwise.
fn short(e: &cryptoki::error::Error) -> String {
    match e {
        cryptoki::error::Error::Pkcs11(rv, func) => format!("C_{func:?} returned {rv:?}"),
        other => other.to_string(),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn step(n: u32, text: &str) {
    println!("\n[{n}/7] {text}");
}

fn main() -> ExitCode {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match run(&opts) {
        Ok(()) => {
            println!("\nDemo finished: every step worked.");
            ExitCode::SUCCESS
        }
        Err(e) => {
            match e.downcast_ref::<cryptoki::error::Error>() {
                Some(ck) => eprintln!("\ndemo failed: {}\n  ({e})", short(ck)),
                None => eprintln!("\ndemo failed: {e}"),
            }
            ExitCode::FAILURE
        }
    }
}

fn run(opts: &Options) -> Result<(), Box<dyn Error>> {
    step(1, &format!("Loading the PKCS#11 module {}", opts.module));
    let pkcs11 =
        Pkcs11::new(&opts.module).map_err(|e| format!("cannot load {}: {e}", opts.module))?;
    pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))?;
    let info = pkcs11.get_library_info()?;
    println!(
        "      library: {} / {} {}.{} (Cryptoki {}.{})",
        info.manufacturer_id().trim(),
        info.library_description().trim(),
        info.library_version().major(),
        info.library_version().minor(),
        info.cryptoki_version().major(),
        info.cryptoki_version().minor(),
    );

    step(2, "Listing the slots that hold a token");
    let slot = list_slots(&pkcs11, &opts.token)?;

    step(3, &format!("Logging in to token '{}'", opts.token));
    let session = pkcs11.open_rw_session(slot)?;
    session.login(UserType::User, Some(&AuthPin::from(opts.pin.clone())))?;
    println!("      logged in (read/write session)");

    step(4, "Finding or generating the AES-256 wrap key in the token");
    let wrap_key = wrap_key(&session)?;

    step(
        5,
        "Generating a session data key (AES-256, sensitive, extractable)",
    );
    let dek = session.generate_key(
        &Mechanism::AesKeyGen,
        &[
            Attribute::Token(false),
            Attribute::Sensitive(true),
            Attribute::Extractable(true),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::ValueLen(32.into()),
            Attribute::Label(b"cmkp11-demo-dek".to_vec()),
        ],
    )?;
    println!(
        "      data key handle {}: a session object, gone when the session ends",
        dek
    );

    step(
        6,
        "Wrapping the data key with AES-KWP (RFC 5649), then unwrapping it",
    );
    let blob = session.wrap_key(&Mechanism::AesKeyWrapPad, wrap_key, dek)?;
    println!("      wrapped blob ({} bytes): {}", blob.len(), hex(&blob));
    println!("      this blob is what an application stores next to its data");
    let unwrapped = session.unwrap_key(
        &Mechanism::AesKeyWrapPad,
        wrap_key,
        &blob,
        &[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Token(false),
            Attribute::Sensitive(true),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Label(b"cmkp11-demo-dek-unwrapped".to_vec()),
        ],
    )?;
    println!("      unwrapped into a new session key, handle {unwrapped}");

    step(
        7,
        "AES-GCM: encrypt with the original key, decrypt with the unwrapped one",
    );
    gcm_round_trip(&session, dek, unwrapped)?;

    session.logout()?;
    drop(session);
    pkcs11.finalize()?;
    Ok(())
}

/// Prints every slot with a token and returns the one whose label is `wanted`.
fn list_slots(pkcs11: &Pkcs11, wanted: &str) -> Result<Slot, Box<dyn Error>> {
    let mut found = None;
    for slot in pkcs11.get_slots_with_token()? {
        let t = pkcs11.get_token_info(slot)?;
        println!(
            "      slot {:#x}: token '{}' (manufacturer '{}', model '{}')",
            slot.id(),
            t.label().trim(),
            t.manufacturer_id().trim(),
            t.model().trim()
        );
        if t.label().trim() == wanted && found.is_none() {
            found = Some(slot);
        }
    }
    found.ok_or_else(|| format!("no token labelled '{wanted}'").into())
}

/// Returns the demo wrap key, generating it on the first run.
fn wrap_key(session: &Session) -> Result<ObjectHandle, Box<dyn Error>> {
    let label = WRAP_KEY_LABEL.as_bytes().to_vec();
    let found = session.find_objects(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::Label(label.clone()),
    ])?;
    if let Some(&key) = found.first() {
        println!("      found '{WRAP_KEY_LABEL}' from an earlier run (handle {key}); reusing it");
        return Ok(key);
    }
    let key = session.generate_key(
        &Mechanism::AesKeyGen,
        &[
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Wrap(true),
            Attribute::Unwrap(true),
            Attribute::ValueLen(32.into()),
            Attribute::Label(label),
            Attribute::Id(b"cmkp11-demo-1".to_vec()),
        ],
    )?;
    println!("      generated '{WRAP_KEY_LABEL}' (handle {key}): a token object");
    let attrs =
        session.get_attributes(key, &[AttributeType::Sensitive, AttributeType::Extractable])?;
    for a in attrs {
        match a {
            Attribute::Sensitive(v) => println!("      CKA_SENSITIVE = {v}"),
            Attribute::Extractable(v) => println!("      CKA_EXTRACTABLE = {v}"),
            _ => {}
        }
    }
    Ok(key)
}

/// Encrypts [`MESSAGE`] under `enc_key` and decrypts it under `dec_key`; fails unless the
/// plaintext comes back unchanged, and unless a tampered ciphertext is refused.
fn gcm_round_trip(
    session: &Session,
    enc_key: ObjectHandle,
    dec_key: ObjectHandle,
) -> Result<(), Box<dyn Error>> {
    let mut iv = session.generate_random_vec(12)?;
    let ciphertext = session.encrypt(
        &Mechanism::AesGcm(GcmParams::new(&mut iv, AAD, 128.into())?),
        enc_key,
        MESSAGE,
    )?;
    println!("      plaintext : {}", String::from_utf8_lossy(MESSAGE));
    println!("      iv        : {}", hex(&iv));
    println!(
        "      ciphertext: {} bytes (message + 16-byte tag)",
        ciphertext.len()
    );
    let decrypted = session.decrypt(
        &Mechanism::AesGcm(GcmParams::new(&mut iv, AAD, 128.into())?),
        dec_key,
        &ciphertext,
    )?;
    if decrypted != MESSAGE {
        return Err("the unwrapped key decrypted something else: the keys differ".into());
    }
    println!("      decrypted : {}", String::from_utf8_lossy(&decrypted));
    println!("      same text: the unwrapped key equals the original key");

    let mut tampered = ciphertext.clone();
    tampered[0] ^= 1;
    match session.decrypt(
        &Mechanism::AesGcm(GcmParams::new(&mut iv, AAD, 128.into())?),
        dec_key,
        &tampered,
    ) {
        Ok(_) => Err("a tampered ciphertext was accepted".into()),
        Err(e) => {
            println!(
                "      a ciphertext with one flipped bit is refused ({})",
                short(&e)
            );
            Ok(())
        }
    }
}
