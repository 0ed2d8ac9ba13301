//! Signing CMKs: `cmkp11 key create NAME --type ...` (an EC, RSA or Ed25519 key pair made
//! in the token) and `cmkp11 key csr NAME --subject ...` (a PKCS#10 certificate request
//! signed in the token), so that an operator can set up a TLS server key with this command
//! alone.
//!
//! The request is built by the RustCrypto `x509-cert` crate's `RequestBuilder`: its
//! `finalize` gives the bytes to sign and `assemble` takes the signature, so the private
//! key never has to be in this process. Only the digest for ECDSA is computed here
//! (SoftHSM2 offers `CKM_ECDSA` on a hash, not `CKM_ECDSA_SHA256`); the message is the
//! public request.

use crate::ctx::{describe, lib_err, Ctx};
use crate::import::rsa_spki;
use crate::keyinfo::{check_new_name, key_info};
use crate::{fail, output, CliError, R};
use clap::ValueEnum;
use cmkp11::backend::mech::Mech;
use cmkp11::keystore::{self, Cmk, State};
use cmkp11::runtime::session::{AttrValue, Delivery, Kind};
use const_oid::ObjectIdentifier;
use cryptoki::object::{Attribute, KeyType, ObjectClass};
use cryptoki_sys::*;
use der::asn1::{BitString, Ia5String, OctetString, UintRef};
use der::{Any, Decode, Encode, EncodePem};
use sha2::Digest;
use spki::{
    AlgorithmIdentifierOwned, DynSignatureAlgorithmIdentifier, EncodePublicKey,
    SubjectPublicKeyInfoOwned,
};
use std::path::PathBuf;
use std::str::FromStr;
use x509_cert::builder::{Builder, RequestBuilder};
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::SubjectAltName;
use x509_cert::name::Name;

/// `--type` of `cmkp11 key create`: a signing key pair.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum SigningType {
    /// ECDSA on NIST P-256 (secp256r1).
    EcP256,
    /// ECDSA on NIST P-384 (secp384r1).
    EcP384,
    /// RSA, 2048-bit modulus.
    #[value(name = "rsa-2048")]
    Rsa2048,
    /// RSA, 3072-bit modulus.
    #[value(name = "rsa-3072")]
    Rsa3072,
    /// Ed25519 (EdDSA).
    Ed25519,
}

/// DER of the named-curve OIDs (`CKA_EC_PARAMS`).
const P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const P384: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
const P521: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x23];
const ED25519_PARAMS: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];

const SHA256_WITH_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.11");
const EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const ECDSA_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");
const ECDSA_SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.3");
const ECDSA_SHA512: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.4");
const ED25519: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.112");

impl SigningType {
    fn name(self) -> &'static str {
        match self {
            SigningType::EcP256 => "EC P-256",
            SigningType::EcP384 => "EC P-384",
            SigningType::Rsa2048 => "RSA-2048",
            SigningType::Rsa3072 => "RSA-3072",
            SigningType::Ed25519 => "Ed25519",
        }
    }

    /// The generation mechanism and the type-specific public-key attributes.
    fn generation(self) -> (CK_MECHANISM_TYPE, Vec<Attribute>) {
        let rsa = |bits: u64| {
            (
                CKM_RSA_PKCS_KEY_PAIR_GEN,
                vec![
                    Attribute::ModulusBits(bits.into()),
                    Attribute::PublicExponent(vec![1, 0, 1]),
                ],
            )
        };
        let ec = |params: &[u8]| {
            (
                CKM_EC_KEY_PAIR_GEN,
                vec![Attribute::EcParams(params.to_vec())],
            )
        };
        match self {
            SigningType::EcP256 => ec(P256),
            SigningType::EcP384 => ec(P384),
            SigningType::Rsa2048 => rsa(2048),
            SigningType::Rsa3072 => rsa(3072),
            SigningType::Ed25519 => (
                CKM_EC_EDWARDS_KEY_PAIR_GEN,
                vec![Attribute::EcParams(ED25519_PARAMS.to_vec())],
            ),
        }
    }
}

/// A key pair's `CKA_ID` (`--id HEX`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyId(pub Vec<u8>);

/// Parses `--id HEX`.
pub fn parse_id(s: &str) -> Result<KeyId, String> {
    let s = s.trim();
    if s.is_empty() || s.len() % 2 != 0 || s.len() > 2 * keystore::MAX_ID_LEN {
        return Err(format!(
            "an id is 1 to {} bytes written as an even number of hex digits",
            keystore::MAX_ID_LEN
        ));
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|_| format!("`{s}` is not hex")))
        .collect::<Result<Vec<u8>, String>>()
        .map(KeyId)
}

/// Percent-encoding of an id for a PKCS#11 URI (RFC 7512).
fn uri_id(id: &[u8]) -> String {
    id.iter().map(|b| format!("%{b:02x}")).collect()
}

/// A PKCS#11 URI (RFC 7512) of the private key, without a PIN.
pub fn key_uri(token: &str, name: &str, id: &[u8]) -> String {
    let esc = |s: &str| -> String {
        s.bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02x}"),
            })
            .collect()
    };
    format!(
        "pkcs11:token={};object={};id={};type=private",
        esc(token),
        esc(name),
        uri_id(id)
    )
}

/// `cmkp11 key create NAME --type TYPE [--id HEX]`: a signing key pair in the token. The
/// private key is a CMK whose only role is `sign`; the public key carries the same label
/// and id (what OpenSSH, libp11 and certificate tools pair them by).
pub fn create(ctx: &Ctx, name: &str, ty: SigningType, id: Option<KeyId>) -> R<()> {
    check_new_name(ctx, name)?;
    let id = match id {
        Some(KeyId(i)) => i,
        None => {
            let mut i = vec![0u8; 16];
            let (_, s) = ctx.parts();
            s.backend()
                .generate_random_slice(&mut i)
                .map_err(|e| CliError::new(format!("token `{}`: random id: {e}", ctx.token)))?;
            i
        }
    };
    if ctx.view().cmks.contains_key(&id) || public_key(ctx, name, &id)?.is_some() {
        return fail(format!(
            "a key with id {} exists already on token `{}`; choose another --id",
            keystore::hex(&id),
            ctx.token
        ));
    }
    let (mech, mut public) = ty.generation();
    public.extend([
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Label(name.as_bytes().to_vec()),
        Attribute::Id(id.clone()),
        Attribute::Verify(true),
        Attribute::Encrypt(false),
        Attribute::Wrap(false),
    ]);
    let private = vec![
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Label(name.as_bytes().to_vec()),
        Attribute::Id(id.clone()),
        Attribute::Sign(true),
    ];
    {
        let (lib, mut s) = ctx.parts();
        lib.generate_key_pair(&mut s, Mech::plain(mech), public, private)
            .map_err(lib_err(
                &ctx.token,
                &format!("create {} key `{name}`", ty.name()),
            ))?;
    }
    let cmk = ctx.cmk(name)?;
    let mut info = key_info(ctx, &cmk)?;
    if info.key_type == "EC" || info.key_type == "EdDSA" {
        info.key_type = ty.name().into();
    }
    let uri = key_uri(&ctx.token, name, &id);
    if ctx.g.json {
        return output::json(&serde_json::json!({ "key": info, "uri": uri }));
    }
    println!(
        "created signing key `{name}` on token `{}` ({}, role {}, id {})\n\
         PKCS#11 URI: {uri}\n\
         next: `cmkp11 key csr {name} --subject CN=... --out {name}.csr` for a certificate request",
        ctx.token,
        ty.name(),
        info.role,
        info.id
    );
    Ok(())
}

/// The public key object paired with a private CMK (same id, else same label).
fn public_key(ctx: &Ctx, name: &str, id: &[u8]) -> R<Option<CK_OBJECT_HANDLE>> {
    let (lib, mut s) = ctx.parts();
    let e = |e: cmkp11::error::Error| {
        CliError::new(format!(
            "token `{}`: find the public key of `{name}`: {}",
            ctx.token,
            describe(&e)
        ))
    };
    for t in [
        Attribute::Id(id.to_vec()),
        Attribute::Label(name.as_bytes().to_vec()),
    ] {
        lib.find_init(&mut s, vec![Attribute::Class(ObjectClass::PUBLIC_KEY), t])
            .map_err(e)?;
        let found = s.find_next(2).map(<[_]>::to_vec);
        let _ = s.find_final();
        if let Some(h) = found.map_err(e)?.first() {
            return Ok(Some(*h));
        }
    }
    Ok(None)
}

/// What the request needs to know about a key: its SPKI, the signature algorithm, how
/// the token signs.
struct TokenKey {
    spki: Vec<u8>,
    algorithm: AlgorithmIdentifierOwned,
    how: How,
}

#[derive(Clone, Copy)]
enum How {
    /// `CKM_SHA256_RSA_PKCS` over the message.
    RsaSha256,
    /// `CKM_ECDSA` over this process's hash; the token's r||s made DER.
    Ecdsa(usize),
    /// `CKM_EDDSA` over the message.
    EdDsa,
}

/// The SubjectPublicKeyInfo, as `x509-cert`'s builder asks for it.
#[derive(Clone)]
struct SpkiDer(Vec<u8>);

impl EncodePublicKey for SpkiDer {
    fn to_public_key_der(&self) -> spki::Result<der::Document> {
        Ok(der::Document::try_from(self.0.as_slice())?)
    }
}

impl signature::Keypair for TokenKey {
    type VerifyingKey = SpkiDer;
    fn verifying_key(&self) -> SpkiDer {
        SpkiDer(self.spki.clone())
    }
}

impl DynSignatureAlgorithmIdentifier for TokenKey {
    fn signature_algorithm_identifier(&self) -> spki::Result<AlgorithmIdentifierOwned> {
        Ok(self.algorithm.clone())
    }
}

fn der_err(what: &str) -> impl Fn(der::Error) -> CliError + '_ {
    move |e| CliError::new(format!("{what}: {e}"))
}

fn attr_bytes(v: &AttrValue) -> Option<Vec<u8>> {
    match v {
        AttrValue::Value(
            Attribute::EcParams(b)
            | Attribute::EcPoint(b)
            | Attribute::Modulus(b)
            | Attribute::PublicExponent(b),
        ) => Some(b.clone()),
        _ => None,
    }
}

/// Reads the public half of `cmk` and decides the signature algorithm.
fn token_key(ctx: &Ctx, cmk: &Cmk) -> R<TokenKey> {
    let name = cmk.name();
    let t = &ctx.token;
    let Some(public) = public_key(ctx, &name, &cmk.id)? else {
        return fail(format!(
            "key `{name}` on token `{t}` has no public key object (same id or label): a \
             certificate request needs it; create the key with `cmkp11 key create {name} --type ...`"
        ));
    };
    let (lib, mut s) = ctx.parts();
    let mut read = |h, types: &[CK_ATTRIBUTE_TYPE]| {
        lib.get_attributes(&mut s, h, types)
            .map_err(lib_err(t, &format!("read the public key of `{name}`")))
    };
    let v = read(
        public,
        &[
            CKA_KEY_TYPE,
            CKA_MODULUS,
            CKA_PUBLIC_EXPONENT,
            CKA_EC_PARAMS,
            CKA_EC_POINT,
        ],
    )?;
    let alg = |oid, parameters| AlgorithmIdentifierOwned { oid, parameters };
    let null = || Some(Any::null());
    let (spki, algorithm, how) = match &v[0] {
        AttrValue::Value(Attribute::KeyType(KeyType::RSA)) => {
            let (Some(n), Some(e)) = (attr_bytes(&v[1]), attr_bytes(&v[2])) else {
                return fail(format!(
                    "token `{t}`: the RSA public key of `{name}` is unreadable"
                ));
            };
            (
                rsa_spki(&n, &e),
                alg(SHA256_WITH_RSA, null()),
                How::RsaSha256,
            )
        }
        AttrValue::Value(Attribute::KeyType(k @ (KeyType::EC | KeyType::EC_EDWARDS))) => {
            let (Some(params), Some(point)) = (attr_bytes(&v[3]), attr_bytes(&v[4])) else {
                return fail(format!(
                    "token `{t}`: the EC public key of `{name}` is unreadable"
                ));
            };
            // CKA_EC_POINT is a DER OCTET STRING (PKCS#11 v2.40); take a bare point too.
            let point = OctetString::from_der(&point)
                .map(|o| o.as_bytes().to_vec())
                .unwrap_or(point);
            let key_bits = BitString::from_bytes(&point).map_err(der_err("EC point"))?;
            if *k == KeyType::EC_EDWARDS {
                if params != ED25519_PARAMS && params != b"\x13\x0cedwards25519" {
                    return fail(format!(
                        "token `{t}`: key `{name}` is on an Edwards curve other than Ed25519"
                    ));
                }
                let spki = SubjectPublicKeyInfoOwned {
                    algorithm: alg(ED25519, None),
                    subject_public_key: key_bits,
                };
                (
                    spki.to_der().map_err(der_err("SubjectPublicKeyInfo"))?,
                    alg(ED25519, None),
                    How::EdDsa,
                )
            } else {
                let (sig_oid, hash) = match params.as_slice() {
                    p if p == P256 => (ECDSA_SHA256, 256),
                    p if p == P384 => (ECDSA_SHA384, 384),
                    p if p == P521 => (ECDSA_SHA512, 512),
                    _ => {
                        return fail(format!(
                            "token `{t}`: key `{name}` is on a curve other than P-256, P-384, P-521"
                        ))
                    }
                };
                let curve = Any::from_der(&params).map_err(der_err("EC parameters"))?;
                let spki = SubjectPublicKeyInfoOwned {
                    algorithm: alg(EC_PUBLIC_KEY, Some(curve)),
                    subject_public_key: key_bits,
                };
                (
                    spki.to_der().map_err(der_err("SubjectPublicKeyInfo"))?,
                    alg(sig_oid, None),
                    How::Ecdsa(hash),
                )
            }
        }
        _ => {
            return fail(format!(
                "key `{name}` on token `{t}` is not an RSA, EC or Ed25519 key pair"
            ))
        }
    };
    Ok(TokenKey {
        spki,
        algorithm,
        how,
    })
}

/// `ECDSA-Sig-Value` (RFC 3279).
#[derive(der::Sequence)]
struct EcdsaSig<'a> {
    r: UintRef<'a>,
    s: UintRef<'a>,
}

/// Signs `msg` with the private CMK `cmk` in the token, in the request's encoding.
fn sign(ctx: &Ctx, cmk: &Cmk, how: How, msg: &[u8]) -> R<Vec<u8>> {
    let h = ctx.handle_of(cmk)?;
    let (mech, data) = match how {
        How::RsaSha256 => (CKM_SHA256_RSA_PKCS, msg.to_vec()),
        How::EdDsa => (CKM_EDDSA, msg.to_vec()),
        How::Ecdsa(256) => (CKM_ECDSA, sha2::Sha256::digest(msg).to_vec()),
        How::Ecdsa(384) => (CKM_ECDSA, sha2::Sha384::digest(msg).to_vec()),
        How::Ecdsa(_) => (CKM_ECDSA, sha2::Sha512::digest(msg).to_vec()),
    };
    let mut sig = Vec::new();
    {
        let (lib, mut s) = ctx.parts();
        lib.crypto_init(&mut s, Kind::Sign, Mech::plain(mech), h)
            .and_then(|()| {
                s.single(Kind::Sign, &data, |o| {
                    sig.extend_from_slice(o);
                    Delivery::Delivered
                })
            })
            .map_err(lib_err(
                &ctx.token,
                &format!("sign the request with key `{}`", cmk.name()),
            ))?;
    }
    if let How::Ecdsa(_) = how {
        if sig.is_empty() || sig.len() % 2 != 0 {
            return fail(format!(
                "token `{}` returned an ECDSA signature of {} bytes",
                ctx.token,
                sig.len()
            ));
        }
        let (r, s) = sig.split_at(sig.len() / 2);
        let strip = |x: &[u8]| -> Vec<u8> {
            let i = x.iter().position(|b| *b != 0).unwrap_or(x.len() - 1);
            x[i..].to_vec()
        };
        let (r, s) = (strip(r), strip(s));
        let v = EcdsaSig {
            r: UintRef::new(&r).map_err(der_err("ECDSA r"))?,
            s: UintRef::new(&s).map_err(der_err("ECDSA s"))?,
        };
        return v.to_der().map_err(der_err("ECDSA signature"));
    }
    Ok(sig)
}

/// Parses `--subject`: RFC 4514 (`CN=web,O=Example`) or OpenSSL's `/O=Example/CN=web`
/// (most significant first, as `openssl req -subj` takes it).
pub fn parse_subject(s: &str) -> Result<Name, String> {
    let rfc4514 = if let Some(rest) = s.strip_prefix('/') {
        let parts: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
        if parts.iter().any(|p| p.contains(',')) {
            return Err("in the /A=x/B=y form a value cannot contain `,`: use CN=x,O=y".into());
        }
        parts.into_iter().rev().collect::<Vec<_>>().join(",")
    } else {
        s.to_string()
    };
    if rfc4514.trim().is_empty() {
        return Err("the subject is empty".into());
    }
    Name::from_str(&rfc4514).map_err(|e| format!("`{s}` is not a distinguished name ({e})"))
}

/// Parses one `--san`: `DNS:name` or `IP:address`.
pub fn parse_san(s: &str) -> Result<GeneralName, String> {
    if let Some(d) = s.strip_prefix("DNS:") {
        Ia5String::new(d)
            .map(GeneralName::DnsName)
            .map_err(|e| format!("`{d}` is not an ASCII DNS name ({e})"))
    } else if let Some(ip) = s.strip_prefix("IP:") {
        ip.parse::<std::net::IpAddr>()
            .map(GeneralName::from)
            .map_err(|e| format!("`{ip}` is not an IP address ({e})"))
    } else {
        Err(format!(
            "`{s}`: a subject alternative name is DNS:NAME or IP:ADDRESS"
        ))
    }
}

/// `cmkp11 key csr NAME --subject DN [--san ...] [--out FILE]`.
pub fn csr(
    ctx: &Ctx,
    name: &str,
    subject: Name,
    sans: Vec<GeneralName>,
    out: Option<PathBuf>,
) -> R<()> {
    let cmk = ctx.cmk(name)?;
    let t = &ctx.token;
    if cmk.class != CKO_PRIVATE_KEY {
        return fail(format!(
            "key `{name}` on token `{t}` is a secret key: a certificate request needs a \
             signing key (`cmkp11 key create NAME --type ec-p256`)"
        ));
    }
    let state = cmk.state(keystore::now());
    if state != State::Enabled {
        return fail(format!(
            "key `{name}` on token `{t}` is {}: it cannot sign",
            state.name()
        ));
    }
    if !key_info(ctx, &cmk)?.role.split('+').any(|r| r == "sign") {
        return fail(format!(
            "key `{name}` on token `{t}` may not sign (role {}): create a signing key with \
             `cmkp11 key create NAME --type ...`",
            key_info(ctx, &cmk)?.role
        ));
    }
    let key = token_key(ctx, &cmk)?;
    let b_err = |e: x509_cert::builder::Error| CliError::new(format!("certificate request: {e}"));
    let mut builder = RequestBuilder::new(subject).map_err(b_err)?;
    if !sans.is_empty() {
        builder
            .add_extension(&SubjectAltName(sans))
            .map_err(|e| CliError::new(format!("subject alternative names: {e}")))?;
    }
    let tbs = builder.finalize(&key).map_err(b_err)?;
    let sig = sign(ctx, &cmk, key.how, &tbs)?;
    let req = builder
        .assemble(
            BitString::from_bytes(&sig).map_err(der_err("signature"))?,
            &key,
        )
        .map_err(b_err)?;
    let pem = req
        .to_pem(der::pem::LineEnding::LF)
        .map_err(der_err("PEM"))?;
    if let Some(f) = &out {
        std::fs::write(f, &pem)
            .map_err(|e| CliError::new(format!("cannot write {}: {e}", f.display())))?;
    }
    if ctx.g.json {
        return output::json(&serde_json::json!({
            "key": name,
            "csr": out,
            "pem": if out.is_none() { Some(&pem) } else { None },
            "uri": key_uri(t, name, &cmk.id),
        }));
    }
    if out.is_none() {
        println!("{}", pem.trim_end());
    }
    if let Some(f) = out {
        println!(
            "wrote a certificate request for key `{name}` (token `{t}`) to {}; send it to \
             your CA, then point the server at the certificate and at the key \
             {}",
            f.display(),
            key_uri(t, name, &cmk.id)
        );
    }
    Ok(())
}
