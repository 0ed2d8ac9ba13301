//! What the token behind cmkp11 can do, asked once per slot: the capabilities record.
//!
//! A real HSM differs from SoftHSM2: some lack data objects or private session objects,
//! some refuse `CKA_MODIFIABLE=FALSE`, some cap sessions, and a token reached through
//! `p11-kit`'s RPC cannot carry every mechanism parameter. [`probe`] finds out, in a
//! backend session of its own (opened and closed by the probe, never an application's),
//! with session objects only (nothing is written to the token unless
//! [`Depth::TokenObjects`] is asked for, as `cmkp11 doctor` does):
//!
//! - the mechanism list with each mechanism's flags and key sizes;
//! - session objects, `CKA_MODIFIABLE=FALSE` and `CKA_COPYABLE=FALSE` (enforced or not),
//!   private objects (when a user is logged in), token data objects (when asked);
//! - AES-GCM, AES-KWP and AES-KW by doing them (a token may list a mechanism whose
//!   parameters its transport cannot carry), HMAC-SHA256 (the audit log's MAC), ECDSA P-256;
//! - the session limits from the token information.
//!
//! Token quirks live here too, one [`Quirk`] per behaviour, named per backend.
//!
//! The runtime probes lazily, once per slot, when a feature that needs a capability is
//! first used ([`Cache`]): a full probe of SoftHSM2 takes a few milliseconds and a dozen
//! backend calls (a round trip each for a network token), which `C_Initialize` need not
//! pay for applications that never use those features.

use cryptoki::context::Pkcs11;
use cryptoki::mechanism::{aead::GcmParams, Mechanism};
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use cryptoki::slot::{Limit, Slot};
use cryptoki_sys::*;
use serde::Serialize;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// A capability cmkp11 features may need of the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Capability {
    /// Session objects (`CKA_TOKEN=FALSE`).
    SessionObjects,
    /// Private objects (`CKA_PRIVATE=TRUE`, readable only after a login).
    PrivateObjects,
    /// Data objects (`CKO_DATA`) stored in the token.
    DataObjects,
    /// `CKA_MODIFIABLE=FALSE` accepted and enforced.
    ModifiableFalse,
    /// `CKA_COPYABLE=FALSE` accepted and enforced.
    CopyableFalse,
    /// `CKM_AES_GCM` with a 12-byte IV and a 128-bit tag.
    AesGcm,
    /// `CKM_AES_KEY_WRAP_PAD` (RFC 5649).
    AesKwp,
    /// `CKM_AES_KEY_WRAP` (RFC 3394).
    AesKw,
    /// `CKM_SHA256_HMAC` with a generated generic secret key.
    HmacSha256,
    /// `CKM_ECDSA` with a generated P-256 key pair.
    EcdsaP256,
    /// `CKM_RSA_PKCS_KEY_PAIR_GEN` and RSA signing mechanisms in the list (not
    /// exercised: an RSA key pair costs a tenth of a second).
    RsaSign,
}

impl Capability {
    /// Every capability, in report order.
    pub const ALL: [Capability; 11] = [
        Capability::SessionObjects,
        Capability::PrivateObjects,
        Capability::DataObjects,
        Capability::ModifiableFalse,
        Capability::CopyableFalse,
        Capability::AesGcm,
        Capability::AesKwp,
        Capability::AesKw,
        Capability::HmacSha256,
        Capability::EcdsaP256,
        Capability::RsaSign,
    ];

    /// Its name in logs, errors and `cmkp11 doctor`.
    pub fn name(self) -> &'static str {
        match self {
            Capability::SessionObjects => "session-objects",
            Capability::PrivateObjects => "private-objects",
            Capability::DataObjects => "data-objects",
            Capability::ModifiableFalse => "modifiable-false",
            Capability::CopyableFalse => "copyable-false",
            Capability::AesGcm => "aes-gcm",
            Capability::AesKwp => "aes-kwp",
            Capability::AesKw => "aes-kw",
            Capability::HmacSha256 => "hmac-sha256",
            Capability::EcdsaP256 => "ecdsa-p256",
            Capability::RsaSign => "rsa-sign",
        }
    }

    /// The cmkp11 features that need it (what its absence disables).
    pub fn needed_by(self) -> &'static str {
        match self {
            Capability::SessionObjects => {
                "DEKs (session keys generated or unwrapped in the token), envelope encryption"
            }
            Capability::PrivateObjects => {
                "lifecycle state records and the audit MAC key (metadata readable only after login)"
            }
            Capability::DataObjects => {
                "lifecycle states (disable, scheduled deletion) and the audit checkpoint"
            }
            Capability::ModifiableFalse => {
                "state records and audit checkpoints the token itself keeps from being edited"
            }
            Capability::CopyableFalse => {
                "copy refusal by the token itself (cmkp11 refuses copies of token keys anyway)"
            }
            Capability::AesGcm => "data CMKs with AES-GCM, `cmkp11 encrypt`/`decrypt`",
            Capability::AesKwp => {
                "wrap CMKs with AES-KWP (C_WrapKey/C_UnwrapKey of DEKs), `cmkp11 encrypt`/`decrypt`"
            }
            Capability::AesKw => "wrap CMKs with AES-KW (RFC 3394)",
            Capability::HmacSha256 => "the audit log's MAC ([audit] file)",
            Capability::EcdsaP256 => "EC signing CMKs",
            Capability::RsaSign => "RSA signing CMKs",
        }
    }

    /// The capability a mechanism's use through cmkp11 depends on beyond its presence in
    /// the token's list (its parameters must reach the token intact), if any.
    pub fn of_mechanism(ty: CK_MECHANISM_TYPE) -> Option<Capability> {
        match ty {
            CKM_AES_GCM => Some(Capability::AesGcm),
            CKM_AES_KEY_WRAP_PAD => Some(Capability::AesKwp),
            CKM_AES_KEY_WRAP => Some(Capability::AesKw),
            _ => None,
        }
    }
}

/// What the probe found of one capability.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", content = "detail", rename_all = "kebab-case")]
pub enum Status {
    /// It works.
    Works,
    /// It does not: why (the backend's code, or what it did instead).
    Missing(String),
    /// Not tried: why.
    Untested(String),
}

/// One mechanism of the token's list.
#[derive(Debug, Clone, Serialize)]
pub struct MechInfo {
    /// `CKM_*` value.
    pub ty: CK_MECHANISM_TYPE,
    /// Its name (`CKM_...`, or the value in hex).
    pub name: String,
    /// `ulMinKeySize` (0 when not asked: [`Depth::Runtime`]).
    pub min_key: CK_ULONG,
    /// `ulMaxKeySize`.
    pub max_key: CK_ULONG,
    /// `CKF_*` flags.
    pub flags: CK_FLAGS,
}

/// A known difference of a backend from what cmkp11 otherwise assumes, and what cmkp11
/// does about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Quirk {
    /// Its name, `backend:behaviour`.
    pub name: &'static str,
    /// What the token does.
    pub what: &'static str,
    /// How cmkp11 deals with it.
    pub handling: &'static str,
}

/// The module families cmkp11 knows quirks of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Family {
    /// SoftHSM2.
    Softhsm2,
    /// p11-kit's RPC client (`p11-kit-client.so`): a token behind `p11-kit server`.
    P11KitClient,
    /// openCryptoki.
    Opencryptoki,
    /// kryoptic.
    Kryoptic,
    /// Anything else.
    Other,
}

impl Family {
    /// The family of `module` (its file name), or of the token's manufacturer.
    pub fn of(module: &std::path::Path, manufacturer: &str) -> Family {
        let file = module
            .file_name()
            .map(|f| f.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        let m = manufacturer.to_lowercase();
        if file.contains("p11-kit-client") {
            Family::P11KitClient
        } else if file.contains("softhsm") || m.starts_with("softhsm") {
            Family::Softhsm2
        } else if file.contains("opencryptoki") || m.contains("ibm") {
            Family::Opencryptoki
        } else if file.contains("kryoptic") || m.contains("kryoptic") {
            Family::Kryoptic
        } else {
            Family::Other
        }
    }
}

/// How far the probe goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    /// What the runtime needs: the mechanism list (without each mechanism's information),
    /// session, `CKA_MODIFIABLE`/`CKA_COPYABLE` and private objects, AES-GCM, AES-KWP,
    /// AES-KW and HMAC-SHA256 (no EC key pair).
    Runtime,
    /// Session objects only; nothing stays in or is written to the token.
    Session,
    /// Also a token data object (created and destroyed again): `cmkp11 doctor`.
    TokenObjects,
}

/// The capabilities record of one slot.
#[derive(Debug, Clone, Serialize)]
pub struct Capabilities {
    /// The backend module.
    pub module: String,
    /// Its family.
    pub family: Family,
    /// The token's label, manufacturer and model.
    pub token: String,
    /// Token manufacturer.
    pub manufacturer: String,
    /// Token model.
    pub model: String,
    /// The token's mechanisms.
    pub mechanisms: Vec<MechInfo>,
    /// Each capability's status, in [`Capability::ALL`] order.
    pub checks: Vec<(Capability, Status)>,
    /// `ulMaxSessionCount` (`None`: no limit or not told).
    pub max_sessions: Option<u64>,
    /// `ulMaxRwSessionCount` (`None`: no limit or not told).
    pub max_rw_sessions: Option<u64>,
    /// Whether a user was logged in when probed (private objects are tried only then).
    pub logged_in: bool,
    /// The token's known quirks.
    pub quirks: Vec<Quirk>,
    /// Backend calls the probe made.
    pub calls: u64,
    /// How long the probe took.
    #[serde(serialize_with = "micros")]
    pub elapsed: Duration,
}

fn micros<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_micros() as u64)
}

impl Capabilities {
    /// The status of `cap`.
    pub fn status(&self, cap: Capability) -> &Status {
        const UNKNOWN: &Status = &Status::Untested(String::new());
        self.checks
            .iter()
            .find(|(c, _)| *c == cap)
            .map_or(UNKNOWN, |(_, s)| s)
    }

    /// Whether the probe found `cap` missing (untested counts as present: a feature is
    /// only refused on evidence).
    pub fn lacks(&self, cap: Capability) -> bool {
        matches!(self.status(cap), Status::Missing(_))
    }

    /// Whether the token lists `ty`.
    pub fn has_mechanism(&self, ty: CK_MECHANISM_TYPE) -> bool {
        self.mechanisms.iter().any(|m| m.ty == ty)
    }

    /// The sentence naming a missing capability, for errors and logs.
    pub fn missing_message(&self, cap: Capability) -> String {
        let why = match self.status(cap) {
            Status::Missing(w) => w.as_str(),
            _ => "",
        };
        format!(
            "token `{}` over {} lacks capability `{}` ({why}): unavailable: {}",
            self.token,
            self.module,
            cap.name(),
            cap.needed_by()
        )
    }
}

/// The backend calls of one probe, counted.
struct Calls<'a> {
    s: &'a Session,
    n: u64,
}

impl Calls<'_> {
    fn count<T>(&mut self, n: u64, r: T) -> T {
        self.n += n;
        r
    }
}

type CkResult<T> = cryptoki::error::Result<T>;

fn code(e: &cryptoki::error::Error) -> String {
    crate::error::rv::name(crate::backend::rv::from_cryptoki(e)).to_string()
}

fn missing(e: cryptoki::error::Error) -> Status {
    Status::Missing(code(&e))
}

/// A session data object template (public, so that no login is needed).
fn data_template(label: &str, extra: &[Attribute]) -> Vec<Attribute> {
    let mut t = vec![
        Attribute::Class(ObjectClass::DATA),
        Attribute::Token(false),
        Attribute::Private(false),
        Attribute::Application(b"cmkp11".to_vec()),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Value(b"probe".to_vec()),
    ];
    t.extend_from_slice(extra);
    t
}

/// A session AES key of `len` bytes (public session object).
fn aes_key(c: &mut Calls, len: u64, extractable: bool) -> CkResult<ObjectHandle> {
    let r = c.s.generate_key(
        &Mechanism::AesKeyGen,
        &[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(len.into()),
            Attribute::Token(false),
            Attribute::Private(false),
            Attribute::Sensitive(true),
            Attribute::Extractable(extractable),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Wrap(!extractable),
            Attribute::Unwrap(!extractable),
        ],
    );
    c.count(1, r)
}

fn check_session_objects(c: &mut Calls) -> Status {
    let r = c.s.create_object(&data_template("cmkp11:probe", &[]));
    match c.count(1, r) {
        Ok(o) => {
            let _ = c.count(1, c.s.destroy_object(o));
            Status::Works
        }
        Err(e) => missing(e),
    }
}

fn check_private(c: &mut Calls, logged_in: bool) -> Status {
    if !logged_in {
        return Status::Untested("needs a login".into());
    }
    let mut t = data_template("cmkp11:probe", &[]);
    t[2] = Attribute::Private(true);
    let r = c.s.create_object(&t);
    match c.count(1, r) {
        Ok(o) => {
            let _ = c.count(1, c.s.destroy_object(o));
            Status::Works
        }
        Err(e) => missing(e),
    }
}

fn check_token_data(c: &mut Calls, logged_in: bool, depth: Depth) -> Status {
    if depth != Depth::TokenObjects {
        return Status::Untested("not probed at this depth (cmkp11 doctor does)".into());
    }
    let mut t = data_template("cmkp11:probe", &[]);
    t[1] = Attribute::Token(true);
    t[2] = Attribute::Private(logged_in);
    let r = c.s.create_object(&t);
    match c.count(1, r) {
        Ok(o) => match c.count(1, c.s.destroy_object(o)) {
            Ok(()) => Status::Works,
            Err(e) => Status::Missing(format!("created, then not destroyed: {}", code(&e))),
        },
        Err(e) => missing(e),
    }
}

/// A session object made with `attr` = FALSE, then `attempt` on it: the capability works
/// when the token accepts the attribute and `attempt` fails.
fn check_refusal(
    c: &mut Calls,
    attr: Attribute,
    attempt: impl FnOnce(&mut Calls, ObjectHandle) -> CkResult<Option<ObjectHandle>>,
    what: &str,
) -> Status {
    let r = c.s.create_object(&data_template("cmkp11:probe", &[attr]));
    let o = match c.count(1, r) {
        Ok(o) => o,
        Err(e) => return Status::Missing(format!("attribute refused: {}", code(&e))),
    };
    let status = match attempt(c, o) {
        Ok(copy) => {
            if let Some(copy) = copy {
                let _ = c.count(1, c.s.destroy_object(copy));
            }
            Status::Missing(format!("accepted, not enforced: {what} succeeded"))
        }
        Err(_) => Status::Works,
    };
    let _ = c.count(1, c.s.destroy_object(o));
    status
}

fn check_gcm(c: &mut Calls, key: ObjectHandle) -> Status {
    let mut iv = [7u8; 12];
    let params = match GcmParams::new(&mut iv, b"aad", 128.into()) {
        Ok(p) => p,
        Err(e) => return Status::Missing(e.to_string()),
    };
    let r = c.s.encrypt(&Mechanism::AesGcm(params), key, &[0u8; 32]);
    let ct = match c.count(2, r) {
        Ok(ct) if ct.len() == 48 => ct,
        Ok(ct) => return Status::Missing(format!("{} bytes out of 32 in, not 48", ct.len())),
        Err(e) => return missing(e),
    };
    let mut iv = [7u8; 12];
    let params = match GcmParams::new(&mut iv, b"aad", 128.into()) {
        Ok(p) => p,
        Err(e) => return Status::Missing(e.to_string()),
    };
    let r = c.s.decrypt(&Mechanism::AesGcm(params), key, &ct);
    match c.count(2, r) {
        Ok(pt) if pt == [0u8; 32] => Status::Works,
        Ok(_) => Status::Missing("decryption gave other data".into()),
        Err(e) => Status::Missing(format!("decryption: {}", code(&e))),
    }
}

fn check_wrap(
    c: &mut Calls,
    raw: Option<&super::raw::RawBackend>,
    wrapping: ObjectHandle,
    mech: Mechanism,
    out_len: usize,
) -> Status {
    let dek = match aes_key(c, 24, true) {
        Ok(k) => k,
        Err(e) => return Status::Untested(format!("no extractable session key: {}", code(&e))),
    };
    let r = c.s.wrap_key(&mech, wrapping, dek);
    let r = match (c.count(2, r), raw) {
        // Quirk `kryoptic:wrap-key-no-length-query`: the length query fails with
        // CKR_BUFFER_TOO_SMALL. cmkp11's C_WrapKey wraps into a buffer of its own, never
        // asking: so does the probe.
        (Err(e), Some(raw)) if crate::backend::rv::from_cryptoki(&e) == CKR_BUFFER_TOO_SMALL => {
            let mut buf = [0u8; 64];
            let mut m = super::mech::Mech::plain(mech.mechanism_type().into());
            let r = raw.wrap_key(
                c.s.handle(),
                &mut m,
                wrapping.handle(),
                dek.handle(),
                &mut buf,
            );
            c.count(1, r)
                .map(|n| buf[..n].to_vec())
                .map_err(|rv| crate::error::rv::name(rv).to_string())
        }
        (r, _) => r.map_err(|e| code(&e)),
    };
    let status = match r {
        Ok(blob) if blob.len() == out_len => {
            let r = c.s.unwrap_key(
                &mech,
                wrapping,
                &blob,
                &[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::AES),
                    Attribute::Token(false),
                    Attribute::Private(false),
                    Attribute::Sensitive(true),
                    Attribute::Encrypt(true),
                ],
            );
            match c.count(1, r) {
                Ok(k) => {
                    let _ = c.count(1, c.s.destroy_object(k));
                    Status::Works
                }
                Err(e) => Status::Missing(format!("unwrap: {}", code(&e))),
            }
        }
        Ok(blob) => Status::Missing(format!("a {}-byte blob, not {out_len}", blob.len())),
        Err(e) => Status::Missing(e),
    };
    let _ = c.count(1, c.s.destroy_object(dek));
    status
}

fn check_hmac(c: &mut Calls) -> Status {
    let r = c.s.generate_key(
        &Mechanism::GenericSecretKeyGen,
        &[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::GENERIC_SECRET),
            Attribute::ValueLen(32.into()),
            Attribute::Token(false),
            Attribute::Private(false),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
            Attribute::Verify(true),
        ],
    );
    let key = match c.count(1, r) {
        Ok(k) => k,
        Err(e) => return Status::Missing(format!("key generation: {}", code(&e))),
    };
    let r = c.s.sign(&Mechanism::Sha256Hmac, key, b"cmkp11 probe");
    let status = match c.count(2, r) {
        Ok(mac) if mac.len() == 32 => Status::Works,
        Ok(mac) => Status::Missing(format!("a {}-byte MAC", mac.len())),
        Err(e) => missing(e),
    };
    let _ = c.count(1, c.s.destroy_object(key));
    status
}

/// DER of the P-256 OID, as `CKA_EC_PARAMS`.
pub const P256: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// A session P-256 key pair.
fn ec_pair(c: &mut Calls) -> CkResult<(ObjectHandle, ObjectHandle)> {
    let r = c.s.generate_key_pair(
        &Mechanism::EccKeyPairGen,
        &[
            Attribute::Token(false),
            Attribute::Private(false),
            Attribute::EcParams(P256.to_vec()),
            Attribute::Verify(true),
        ],
        &[
            Attribute::Token(false),
            Attribute::Private(false),
            Attribute::Sensitive(true),
            Attribute::Sign(true),
        ],
    );
    c.count(1, r)
}

fn check_ecdsa(c: &mut Calls) -> Status {
    let (public, private) = match ec_pair(c) {
        Ok(p) => p,
        Err(e) => return Status::Missing(format!("key pair generation: {}", code(&e))),
    };
    let r = c.s.sign(&Mechanism::Ecdsa, private, &[1u8; 32]);
    let status = match c.count(2, r) {
        Ok(sig) if sig.len() == 64 => Status::Works,
        Ok(sig) => Status::Missing(format!("a {}-byte signature", sig.len())),
        Err(e) => missing(e),
    };
    for o in [public, private] {
        let _ = c.count(1, c.s.destroy_object(o));
    }
    status
}

fn check_rsa(caps_mechs: &[MechInfo]) -> Status {
    let has = |ty| {
        caps_mechs
            .iter()
            .any(|m| m.ty == ty && m.flags & CKF_SIGN != 0)
    };
    let gen = caps_mechs
        .iter()
        .any(|m| m.ty == CKM_RSA_PKCS_KEY_PAIR_GEN && m.max_key >= 2048);
    match (gen, has(CKM_SHA256_RSA_PKCS) || has(CKM_RSA_PKCS)) {
        (true, true) => Status::Works,
        (false, _) => Status::Missing("no RSA-2048 key pair generation listed".into()),
        (_, false) => Status::Missing("no RSA signing mechanism listed".into()),
    }
}

/// A mechanism's name, for reports.
pub fn mechanism_name(ty: CK_MECHANISM_TYPE) -> String {
    const NAMES: &[(CK_MECHANISM_TYPE, &str)] = &[
        (CKM_RSA_PKCS_KEY_PAIR_GEN, "CKM_RSA_PKCS_KEY_PAIR_GEN"),
        (CKM_RSA_PKCS, "CKM_RSA_PKCS"),
        (CKM_RSA_X_509, "CKM_RSA_X_509"),
        (CKM_RSA_PKCS_OAEP, "CKM_RSA_PKCS_OAEP"),
        (CKM_RSA_PKCS_PSS, "CKM_RSA_PKCS_PSS"),
        (CKM_SHA1_RSA_PKCS, "CKM_SHA1_RSA_PKCS"),
        (CKM_SHA224_RSA_PKCS, "CKM_SHA224_RSA_PKCS"),
        (CKM_SHA256_RSA_PKCS, "CKM_SHA256_RSA_PKCS"),
        (CKM_SHA384_RSA_PKCS, "CKM_SHA384_RSA_PKCS"),
        (CKM_SHA512_RSA_PKCS, "CKM_SHA512_RSA_PKCS"),
        (CKM_SHA1_RSA_PKCS_PSS, "CKM_SHA1_RSA_PKCS_PSS"),
        (CKM_SHA224_RSA_PKCS_PSS, "CKM_SHA224_RSA_PKCS_PSS"),
        (CKM_SHA256_RSA_PKCS_PSS, "CKM_SHA256_RSA_PKCS_PSS"),
        (CKM_SHA384_RSA_PKCS_PSS, "CKM_SHA384_RSA_PKCS_PSS"),
        (CKM_SHA512_RSA_PKCS_PSS, "CKM_SHA512_RSA_PKCS_PSS"),
        (CKM_SHA_1, "CKM_SHA_1"),
        (CKM_SHA224, "CKM_SHA224"),
        (CKM_SHA256, "CKM_SHA256"),
        (CKM_SHA384, "CKM_SHA384"),
        (CKM_SHA512, "CKM_SHA512"),
        (CKM_SHA_1_HMAC, "CKM_SHA_1_HMAC"),
        (CKM_SHA224_HMAC, "CKM_SHA224_HMAC"),
        (CKM_SHA256_HMAC, "CKM_SHA256_HMAC"),
        (CKM_SHA384_HMAC, "CKM_SHA384_HMAC"),
        (CKM_SHA512_HMAC, "CKM_SHA512_HMAC"),
        (CKM_GENERIC_SECRET_KEY_GEN, "CKM_GENERIC_SECRET_KEY_GEN"),
        (CKM_EC_KEY_PAIR_GEN, "CKM_EC_KEY_PAIR_GEN"),
        (CKM_ECDSA, "CKM_ECDSA"),
        (CKM_ECDSA_SHA1, "CKM_ECDSA_SHA1"),
        (CKM_ECDSA_SHA224, "CKM_ECDSA_SHA224"),
        (CKM_ECDSA_SHA256, "CKM_ECDSA_SHA256"),
        (CKM_ECDSA_SHA384, "CKM_ECDSA_SHA384"),
        (CKM_ECDSA_SHA512, "CKM_ECDSA_SHA512"),
        (CKM_ECDH1_DERIVE, "CKM_ECDH1_DERIVE"),
        (CKM_EC_EDWARDS_KEY_PAIR_GEN, "CKM_EC_EDWARDS_KEY_PAIR_GEN"),
        (CKM_EDDSA, "CKM_EDDSA"),
        (CKM_AES_KEY_GEN, "CKM_AES_KEY_GEN"),
        (CKM_AES_ECB, "CKM_AES_ECB"),
        (CKM_AES_CBC, "CKM_AES_CBC"),
        (CKM_AES_CBC_PAD, "CKM_AES_CBC_PAD"),
        (CKM_AES_CTR, "CKM_AES_CTR"),
        (CKM_AES_GCM, "CKM_AES_GCM"),
        (CKM_AES_CMAC, "CKM_AES_CMAC"),
        (CKM_AES_KEY_WRAP, "CKM_AES_KEY_WRAP"),
        (CKM_AES_KEY_WRAP_PAD, "CKM_AES_KEY_WRAP_PAD"),
        (CKM_MD5, "CKM_MD5"),
        (CKM_DES3_KEY_GEN, "CKM_DES3_KEY_GEN"),
    ];
    NAMES
        .iter()
        .find(|(t, _)| *t == ty)
        .map_or_else(|| format!("0x{ty:08x}"), |(_, n)| (*n).to_string())
}

/// Quirks that depend on the family only (each shown by a test: see the test names).
fn family_quirks(family: Family) -> Vec<Quirk> {
    match family {
        Family::Softhsm2 => vec![
            // tests/fork.rs
            Quirk {
                name: "softhsm2:not-fork-aware",
                what: "a forked child's C_Initialize answers CKR_CRYPTOKI_ALREADY_INITIALIZED with the parent's state copied",
                handling: "cmkp11 finalizes and initializes it again in the child only",
            },
            // README compatibility table (libp11 OAEP-SHA256 row); tests/legit_flows.rs
            Quirk {
                name: "softhsm2:oaep-sha1-only",
                what: "RSA-OAEP only with SHA-1 and no label",
                handling: "passed through: C_DecryptInit with another hash or a label fails in the token",
            },
            // tests/robustness.rs (a bad data call does not poison its session)
            Quirk {
                name: "softhsm2:cbc-pad-final",
                what: "an AES-CBC-PAD decryption no data reached answers its final call with CKR_BUFFER_TOO_SMALL and a length of 2^64-1, without ending",
                handling: "cmkp11 ends such an operation with a block of zeros before reusing the session",
            },
        ],
        Family::P11KitClient => vec![
            // tests/fleet.rs (vendor attributes read over the remote token)
            Quirk {
                name: "p11-kit-client:empty-attribute-template",
                what: "C_GetAttributeValue with an empty template aborts the calling process (an assertion in p11-kit 0.24's rpc-client.c)",
                handling: "cmkp11 never sends one: a request for cmkp11's own attributes only is answered without the backend",
            },
            // tests/fleet.rs (wrap CMKs found on the remote token)
            Quirk {
                name: "p11-kit-client:no-aes-kw-cbc-cmac",
                what: "of the AES mechanisms only AES-ECB and key generation are carried",
                handling: "the keystore's check that a key object is usable does not hide a key whose test mechanism the token lacks",
            },
            Quirk {
            name: "p11-kit-client:rpc-parameters",
            what: "p11-kit 0.24's RPC carries no CK_GCM_PARAMS and no AES-KWP/KW use; such mechanisms are dropped from the list or refused",
            handling: "the probe reports aes-gcm/aes-kwp missing; cmkp11 refuses them with CKR_MECHANISM_INVALID and a log line naming the capability",
            },
        ],
        Family::Kryoptic => vec![
            // tests/abi.rs *_two_call_convention under CMKP11_TEST_BACKEND=kryoptic
            Quirk {
                name: "kryoptic:buffer-too-small-no-length",
                what: "a data call with a buffer too small answers CKR_BUFFER_TOO_SMALL and leaves *pulLen as it was (PKCS#11 5.2: the length needed)",
                handling: "cmkp11 asks the token again with a NULL buffer (a length query, the operation stays active) and returns that length",
            },
            // tests/abi.rs wrap_key_two_call_convention under CMKP11_TEST_BACKEND=kryoptic
            Quirk {
                name: "kryoptic:wrap-key-no-length-query",
                what: "C_WrapKey with a NULL buffer answers CKR_BUFFER_TOO_SMALL instead of the length",
                handling: "cmkp11 wraps into a buffer of its own and answers the application's length query itself; the probe does the same",
            },
            // tests/legit_flows.rs ecdsa_signing (a CMK pair made without a label)
            Quirk {
                name: "kryoptic:no-default-label",
                what: "an object made without CKA_LABEL has none: reading it answers CKR_ATTRIBUTE_TYPE_INVALID (PKCS#11 gives it an empty default)",
                handling: "the keystore reads a missing label as the empty label",
            },
            // README token differences; tests/abi.rs mechanism_list_two_call_convention
            Quirk {
                name: "kryoptic:kwp-is-0x210b",
                what: "RFC 5649 key wrap is offered as CKM_AES_KEY_WRAP_KWP (PKCS#11 3.0) only, not as CKM_AES_KEY_WRAP_PAD",
                handling: "the probe reports aes-kwp missing: envelope wrapping with AES-KWP is refused with CKR_MECHANISM_INVALID naming it; AES-KW works",
            },
        ],
        _ => Vec::new(),
    }
}

/// Probes `slot` of an initialized backend: `raw_list` lists its mechanisms (through
/// the module's own table, which keeps types cryptoki does not know), `logged_in` says
/// whether a user is logged in (the login is the application's, shared by the probe's
/// session).
pub fn probe(
    ctx: &Pkcs11,
    module: &std::path::Path,
    slot: Slot,
    raw: Option<&super::raw::RawBackend>,
    depth: Depth,
) -> cryptoki::error::Result<Capabilities> {
    let start = Instant::now();
    let mut calls = 0u64;
    let info = ctx.get_token_info(slot)?;
    calls += 1;
    let manufacturer = info.manufacturer_id().trim_end().to_string();
    let family = Family::of(module, &manufacturer);
    let limit = |l: Limit| match l {
        Limit::Max(n) => Some(n),
        _ => None,
    };
    // The module's own list (through the installed table, else the module's, which
    // dlopen shares with cryptoki's instance); cryptoki's when no table answers.
    let raw = match raw {
        Some(r) => Some(r),
        None => super::raw::RawBackend::open(module).ok(),
    };
    let list: Vec<CK_MECHANISM_TYPE> = match raw.map(|r| r.mechanism_list(slot.id())) {
        Some(Ok(l)) => l,
        _ => ctx
            .get_mechanism_list(slot)?
            .into_iter()
            .map(CK_MECHANISM_TYPE::from)
            .collect(),
    };
    calls += 2;
    let mut mechanisms = Vec::with_capacity(list.len());
    for ty in list {
        if depth == Depth::Runtime {
            mechanisms.push(MechInfo {
                ty,
                name: mechanism_name(ty),
                min_key: 0,
                max_key: 0,
                flags: 0,
            });
            continue;
        }
        let got = match raw {
            Some(r) => r.mechanism_info(slot.id(), ty).ok(),
            None => None,
        };
        calls += 1;
        let (min_key, max_key, flags) = match got {
            Some(i) => (i.ulMinKeySize, i.ulMaxKeySize, i.flags),
            None => match cryptoki::mechanism::MechanismType::try_from(ty)
                .ok()
                .and_then(|m| ctx.get_mechanism_info(slot, m).ok())
            {
                Some(i) => (
                    i.min_key_size() as CK_ULONG,
                    i.max_key_size() as CK_ULONG,
                    mech_flags(&i),
                ),
                None => (0, 0, 0),
            },
        };
        mechanisms.push(MechInfo {
            ty,
            name: mechanism_name(ty),
            min_key,
            max_key,
            flags,
        });
    }
    let s = match ctx.open_rw_session(slot) {
        Ok(s) => s,
        Err(_) => ctx.open_ro_session(slot)?,
    };
    calls += 2;
    let logged_in = matches!(
        s.get_session_info().map(|i| i.session_state()),
        Ok(cryptoki::session::SessionState::RwUser | cryptoki::session::SessionState::RoUser)
    );
    calls += 1;
    let mut c = Calls { s: &s, n: 0 };
    let mut checks = Vec::new();
    let session_objects = check_session_objects(&mut c);
    let have_session = session_objects == Status::Works;
    checks.push((Capability::SessionObjects, session_objects));
    checks.push((Capability::PrivateObjects, check_private(&mut c, logged_in)));
    checks.push((
        Capability::DataObjects,
        check_token_data(&mut c, logged_in, depth),
    ));
    let untested = || Status::Untested("no session objects".into());
    if have_session {
        checks.push((
            Capability::ModifiableFalse,
            check_refusal(
                &mut c,
                Attribute::Modifiable(false),
                |c, o| {
                    let r = c.s.update_attributes(o, &[Attribute::Label(b"x".to_vec())]);
                    c.count(1, r).map(|()| None)
                },
                "C_SetAttributeValue",
            ),
        ));
        checks.push((
            Capability::CopyableFalse,
            check_refusal(
                &mut c,
                Attribute::Copyable(false),
                |c, o| {
                    let r = c.s.copy_object(o, &[]);
                    c.count(1, r).map(Some)
                },
                "C_CopyObject",
            ),
        ));
    } else {
        checks.push((Capability::ModifiableFalse, untested()));
        checks.push((Capability::CopyableFalse, untested()));
    }
    let listed = |ty| mechanisms.iter().any(|m: &MechInfo| m.ty == ty);
    let not_listed = |ty| Status::Missing(format!("{} not listed", mechanism_name(ty)));
    match aes_key(&mut c, 32, false) {
        Ok(k) => {
            let gcm = if listed(CKM_AES_GCM) {
                check_gcm(&mut c, k)
            } else {
                not_listed(CKM_AES_GCM)
            };
            checks.push((Capability::AesGcm, gcm));
            let kwp = if listed(CKM_AES_KEY_WRAP_PAD) {
                check_wrap(&mut c, raw, k, Mechanism::AesKeyWrapPad, 32)
            } else {
                not_listed(CKM_AES_KEY_WRAP_PAD)
            };
            checks.push((Capability::AesKwp, kwp));
            let kw = if listed(CKM_AES_KEY_WRAP) {
                check_wrap(&mut c, raw, k, Mechanism::AesKeyWrap, 32)
            } else {
                not_listed(CKM_AES_KEY_WRAP)
            };
            checks.push((Capability::AesKw, kw));
            let _ = c.count(1, c.s.destroy_object(k));
        }
        Err(e) => {
            let why = format!("no AES session key: {}", code(&e));
            for cap in [Capability::AesGcm, Capability::AesKwp, Capability::AesKw] {
                checks.push((cap, Status::Missing(why.clone())));
            }
        }
    }
    let hmac = if listed(CKM_SHA256_HMAC) {
        check_hmac(&mut c)
    } else {
        not_listed(CKM_SHA256_HMAC)
    };
    checks.push((Capability::HmacSha256, hmac));
    let ec = if depth == Depth::Runtime {
        Status::Untested("not probed at this depth".into())
    } else if listed(CKM_ECDSA) {
        check_ecdsa(&mut c)
    } else {
        not_listed(CKM_ECDSA)
    };
    checks.push((Capability::EcdsaP256, ec));
    checks.push((
        Capability::RsaSign,
        if depth == Depth::Runtime {
            Status::Untested("not probed at this depth".into())
        } else {
            check_rsa(&mechanisms)
        },
    ));
    calls += c.n;
    drop(s);
    calls += 1;
    let mut quirks = family_quirks(family);
    quirks.extend(probed_quirks(family, &checks));
    Ok(Capabilities {
        module: module.display().to_string(),
        family,
        token: info.label().trim_end().to_string(),
        manufacturer,
        model: info.model().trim_end().to_string(),
        mechanisms,
        checks,
        max_sessions: limit(info.max_session_count()),
        max_rw_sessions: limit(info.max_rw_session_count()),
        logged_in,
        quirks,
        calls,
        elapsed: start.elapsed(),
    })
}

/// Quirks the probe itself showed, for families without a static entry.
fn probed_quirks(family: Family, checks: &[(Capability, Status)]) -> Vec<Quirk> {
    let mut out = Vec::new();
    let lacks = |cap| {
        checks
            .iter()
            .any(|(c, s)| *c == cap && matches!(s, Status::Missing(_)))
    };
    if family != Family::P11KitClient && (lacks(Capability::AesGcm) || lacks(Capability::AesKwp)) {
        out.push(Quirk {
            name: "token:no-gcm-or-kwp",
            what: "AES-GCM or AES-KWP missing or not working",
            handling: "the features that need them are refused with CKR_MECHANISM_INVALID and a log line naming the capability",
        });
    }
    out
}

fn mech_flags(i: &cryptoki::mechanism::MechanismInfo) -> CK_FLAGS {
    let bits = [
        (i.hardware(), CKF_HW),
        (i.encrypt(), CKF_ENCRYPT),
        (i.decrypt(), CKF_DECRYPT),
        (i.digest(), CKF_DIGEST),
        (i.sign(), CKF_SIGN),
        (i.sign_recover(), CKF_SIGN_RECOVER),
        (i.verify(), CKF_VERIFY),
        (i.verify_recover(), CKF_VERIFY_RECOVER),
        (i.generate(), CKF_GENERATE),
        (i.generate_key_pair(), CKF_GENERATE_KEY_PAIR),
        (i.wrap(), CKF_WRAP),
        (i.unwrap(), CKF_UNWRAP),
        (i.derive(), CKF_DERIVE),
    ];
    bits.iter().filter(|(on, _)| *on).fold(0, |f, (_, b)| f | b)
}

/// A quick throughput check for `cmkp11 doctor`: operations per second of each case
/// that works, over `per_case` each, in one backend session with session keys.
pub fn throughput(
    ctx: &Pkcs11,
    slot: Slot,
    caps: &Capabilities,
    per_case: Duration,
) -> Vec<(&'static str, f64)> {
    let Ok(s) = ctx
        .open_rw_session(slot)
        .or_else(|_| ctx.open_ro_session(slot))
    else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut run = |name: &'static str, f: &mut dyn FnMut() -> bool| {
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < per_case {
            if !f() {
                return;
            }
            n += 1;
        }
        out.push((name, n as f64 / start.elapsed().as_secs_f64()));
    };
    if !caps.lacks(Capability::AesGcm) {
        if let Ok(k) = aes_key(&mut Calls { s: &s, n: 0 }, 32, false) {
            let data = vec![0u8; 4096];
            let mut iv = [0u8; 12];
            run("aes-gcm-4k-encrypt", &mut || {
                iv[0] = iv[0].wrapping_add(1);
                let mut v = iv;
                GcmParams::new(&mut v, &[], 128.into())
                    .ok()
                    .and_then(|p| s.encrypt(&Mechanism::AesGcm(p), k, &data).ok())
                    .is_some()
            });
            let _ = s.destroy_object(k);
        }
    }
    if !caps.lacks(Capability::EcdsaP256) {
        if let Ok((public, private)) = ec_pair(&mut Calls { s: &s, n: 0 }) {
            run("ecdsa-p256-sign", &mut || {
                s.sign(&Mechanism::Ecdsa, private, &[1u8; 32]).is_ok()
            });
            let _ = s.destroy_object(public);
            let _ = s.destroy_object(private);
        }
    }
    run("open-close-session", &mut || {
        ctx.open_ro_session(slot).is_ok()
    });
    out
}

/// The runtime's capabilities of each slot: probed once, when first asked, and each
/// missing capability's refusal logged once.
#[derive(Default)]
pub struct Cache {
    slots: Vec<OnceLock<Option<Arc<Capabilities>>>>,
    logged: parking_lot::Mutex<std::collections::HashSet<(usize, Capability)>>,
}

impl Cache {
    /// A cache for `n` slots.
    pub fn new(n: usize) -> Cache {
        Cache {
            slots: (0..n).map(|_| OnceLock::new()).collect(),
            logged: Default::default(),
        }
    }

    /// The record of slot `i`, probing it now if this is the first question (`None`
    /// when the probe itself failed: then nothing is refused on its account).
    pub fn get(
        &self,
        i: usize,
        probe: impl FnOnce() -> Option<Capabilities>,
    ) -> Option<Arc<Capabilities>> {
        self.slots
            .get(i)?
            .get_or_init(|| probe().map(Arc::new))
            .clone()
    }

    /// The record of slot `i` if it was probed already.
    pub fn probed(&self, i: usize) -> Option<Arc<Capabilities>> {
        self.slots.get(i)?.get().cloned().flatten()
    }

    /// Logs, once per slot and capability, that a feature was refused for lack of `cap`.
    pub fn log_missing(&self, i: usize, caps: &Capabilities, cap: Capability) {
        if self.logged.lock().insert((i, cap)) {
            log::warn!("slot {i}: {}", caps.missing_message(cap));
        }
    }
}
