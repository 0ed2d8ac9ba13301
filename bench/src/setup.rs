//! Setup process: creates the token objects once, by label (idempotent).

use crate::cli::SetupOpts;
use crate::labels;
use crate::worker::{login, open_token};
use crate::BenchError;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass};
use cryptoki::session::Session;

/// DER of the P-256 curve OID (1.2.840.10045.3.1.7).
const P256_OID: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

fn count(s: &Session, label: &str) -> Result<usize, BenchError> {
    Ok(
        s.find_objects(&[Attribute::Label(label.as_bytes().to_vec())])?
            .len(),
    )
}

/// True when the object must be created; error when the label is ambiguous.
fn missing(s: &Session, label: &str) -> Result<bool, BenchError> {
    match count(s, label)? {
        0 => Ok(true),
        1 => Ok(false),
        n => Err(BenchError::msg(format!(
            "{n} objects labelled {label:?}, expected one"
        ))),
    }
}

fn lbl(l: &str) -> Attribute {
    Attribute::Label(l.as_bytes().to_vec())
}

fn aes_key(s: &Session, label: &str, wrap: bool) -> Result<(), BenchError> {
    if !missing(s, label)? {
        return Ok(());
    }
    let mut t = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::ValueLen(32.into()),
        lbl(label),
    ];
    if wrap {
        t.extend([Attribute::Wrap(true), Attribute::Unwrap(true)]);
    } else {
        t.extend([Attribute::Encrypt(true), Attribute::Decrypt(true)]);
    }
    s.generate_key(&Mechanism::AesKeyGen, &t)?;
    Ok(())
}

fn key_pair(
    s: &Session,
    mech: &Mechanism,
    mut public: Vec<Attribute>,
    priv_label: &str,
    pub_label: &str,
) -> Result<(), BenchError> {
    let (p, q) = (missing(s, priv_label)?, missing(s, pub_label)?);
    if !p && !q {
        return Ok(());
    }
    if p != q {
        return Err(BenchError::msg(format!(
            "half a key pair on the token ({priv_label:?}/{pub_label:?}); use a fresh token"
        )));
    }
    public.extend([
        Attribute::Token(true),
        Attribute::Verify(true),
        lbl(pub_label),
    ]);
    let private = [
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
        lbl(priv_label),
    ];
    s.generate_key_pair(mech, &public, &private)?;
    Ok(())
}

/// Entry point of `--setup`.
pub fn run_setup(o: &SetupOpts) -> Result<(), BenchError> {
    let (ctx, slot) = open_token(&o.module, &o.token)?;
    let s = login(&ctx, slot, &o.pin)?;
    aes_key(&s, labels::AES, false)?;
    aes_key(&s, labels::WRAP, true)?;
    key_pair(
        &s,
        &Mechanism::RsaPkcsKeyPairGen,
        vec![
            Attribute::ModulusBits(2048.into()),
            Attribute::PublicExponent(vec![0x01, 0x00, 0x01]),
        ],
        labels::RSA,
        labels::RSA_PUB,
    )?;
    key_pair(
        &s,
        &Mechanism::EccKeyPairGen,
        vec![Attribute::EcParams(P256_OID.to_vec())],
        labels::EC,
        labels::EC_PUB,
    )?;
    for i in 0..labels::FILLERS {
        let label = format!("{}{i:02}", labels::FILLER_PREFIX);
        if missing(&s, &label)? {
            s.create_object(&[
                Attribute::Class(ObjectClass::DATA),
                Attribute::Token(true),
                Attribute::Private(false),
                lbl(&label),
                Attribute::Application(b"cmkp11-bench".to_vec()),
                Attribute::Value(vec![i as u8; 16]),
            ])?;
        }
    }
    let total = s.find_objects(&[])?.len();
    eprintln!(
        "cmkp11-bench: setup done, {total} objects visible on token {:?}",
        o.token
    );
    s.logout()?;
    drop(s);
    ctx.finalize()?;
    Ok(())
}
