//! CMKs as the user sees them: names, stable ids, versions and lifecycle states, all kept
//! in the token so that a token backup or an HSM cluster carries everything.
//!
//! # Layout in the token
//! - **Version objects.** Each version of a secret CMK is an ordinary secret token key.
//!   Its backend `CKA_ID` is the CMK's id, the tag [`VERSION_TAG`] and the version number
//!   (4 bytes, big endian); its `CKA_LABEL` is the CMK's name. Applications see the id
//!   without tag and number. Rotation creates one new object: that creation is the whole
//!   commit, so a process killed at any instant leaves the old or the new set of versions.
//! - **State records.** A CMK whose state ever changed has a private data object
//!   (`CKA_APPLICATION` "cmkp11", `CKA_LABEL` "cmkp11:state") holding a JSON
//!   [`StateRecord`] with a generation number. A change creates the record of the next
//!   generation and only then destroys the older ones; readers take the highest
//!   generation they can parse. A key with no record is enabled.
//! - Labels starting with [`RESERVED_PREFIX`] belong to cmkp11's internal objects and are
//!   never shown to applications nor accepted from them.
//!
//! Private keys are CMKs too (states, no versions: they get a new key instead); their
//! identity is their `CKA_ID` (or label when they have none), left exactly as the
//! application set it, since clients pair keys and certificates by it.

pub mod counter;
pub mod lifecycle;
pub mod meta;

use crate::error::Result;
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use cryptoki_sys::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

/// Marks a version number inside a backend `CKA_ID`.
pub const VERSION_TAG: &[u8] = b"#cmkp11v";
/// Labels reserved for cmkp11's internal objects.
pub const RESERVED_PREFIX: &str = "cmkp11:";
/// Label of state records.
pub const STATE_LABEL: &str = "cmkp11:state";
/// `CKA_APPLICATION` of cmkp11's data objects.
pub const APPLICATION: &str = "cmkp11";
/// Prefix of the identity of a key named by its label only (keys made by earlier builds);
/// never accepted as the start of a `CKA_ID`, so that the two kinds never collide.
pub const LABEL_IDENTITY: &[u8] = b"label:";
/// Prefix of the provisional id cmkp11 gives a private CMK generated without label and id
/// (see `Library::generate_key_pair`): the application may name such a key once, as NSS
/// does right after generating it (it sets `CKA_ID` to the hash of the public key).
pub const PROVISIONAL_ID: &[u8] = b"cmkp11-new:";
/// Longest `CKA_ID` an application may give a CMK.
pub const MAX_ID_LEN: usize = 64;

/// Seconds since the epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Splits a backend `CKA_ID` into the CMK id and the version number, if tagged.
pub fn split_id(raw: &[u8]) -> (&[u8], Option<u32>) {
    if raw.len() >= VERSION_TAG.len() + 4 {
        let (head, num) = raw.split_at(raw.len() - 4);
        if let Some(id) = head.strip_suffix(VERSION_TAG) {
            let v = u32::from_be_bytes(num.try_into().unwrap_or_default());
            return (id, Some(v));
        }
    }
    (raw, None)
}

/// The backend `CKA_ID` of version `v` of CMK `id`.
pub fn version_id(id: &[u8], v: u32) -> Vec<u8> {
    [id, VERSION_TAG, &v.to_be_bytes()].concat()
}

/// The identity of a CMK object and its version: the CMK id for tagged secret keys,
/// the raw `CKA_ID`, or the label for keys without an id.
/// A key with neither has no identity, hence no lifecycle (it was not made through
/// cmkp11, which gives every CMK an id or a unique name).
pub fn identity(raw_id: &[u8], label: &str) -> Option<(Vec<u8>, u32)> {
    let (id, v) = split_id(raw_id);
    match (id.is_empty(), label.is_empty()) {
        (true, true) => None,
        (true, false) => Some(([LABEL_IDENTITY, label.as_bytes()].concat(), v.unwrap_or(1))),
        _ => Some((id.to_vec(), v.unwrap_or(1))),
    }
}

/// Lifecycle states (see the README's state diagram).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// Usable.
    Enabled,
    /// Findable; every use refused.
    Disabled,
    /// Disabled, and destroyed after the deletion date.
    PendingDeletion,
    /// Gone (its objects are being removed).
    Destroyed,
}

impl State {
    /// The `CMKP11_STATE_*` value.
    pub fn vendor(self) -> CK_ULONG {
        use crate::vendor::*;
        match self {
            State::Enabled => CMKP11_STATE_ENABLED,
            State::Disabled => CMKP11_STATE_DISABLED,
            State::PendingDeletion => CMKP11_STATE_PENDING_DELETION,
            State::Destroyed => CMKP11_STATE_DESTROYED,
        }
    }

    /// The name used by the CLI and the audit log.
    pub fn name(self) -> &'static str {
        match self {
            State::Enabled => "enabled",
            State::Disabled => "disabled",
            State::PendingDeletion => "pending-deletion",
            State::Destroyed => "destroyed",
        }
    }
}

/// Where the key material came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Origin {
    /// Generated in the token.
    #[default]
    Generated,
    /// Imported (BYOK).
    Imported,
}

/// A CMK's lifecycle record, stored in the token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateRecord {
    /// Hex of the CMK's identity.
    pub key: String,
    /// Generation: the highest wins.
    pub generation: u64,
    /// Random tie-breaker between writers of the same generation.
    pub nonce: u64,
    /// The state.
    pub state: State,
    /// Unix seconds after which a key pending deletion is destroyed (0: none).
    pub deletion_date: u64,
    /// Where the key material came from.
    pub origin: Origin,
    /// Unix seconds of this record.
    pub updated: u64,
    /// Unix seconds of the last rotation (0: never rotated).
    #[serde(default)]
    pub rotated: u64,
    /// Unix seconds of the key's creation through cmkp11 (0: unknown).
    #[serde(default)]
    pub created: u64,
    /// Key length in bytes when the token does not report one (keys imported by RSA-OAEP
    /// unwrap on SoftHSM2 read `CKA_VALUE_LEN` 0); 0 otherwise.
    #[serde(default)]
    pub value_len: u64,
    /// Created exportable by an operator (`cmkp11 key create --exportable`): its versions
    /// are extractable, but only under a key the token's SO marked trusted
    /// (`CKA_WRAP_WITH_TRUSTED`; see `runtime::export`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub exportable: bool,
}

impl StateRecord {
    /// The record a key without one implicitly has.
    pub fn initial(key: &[u8]) -> StateRecord {
        StateRecord {
            key: hex(key),
            generation: 0,
            nonce: 0,
            state: State::Enabled,
            deletion_date: 0,
            origin: Origin::Generated,
            updated: 0,
            rotated: 0,
            created: 0,
            value_len: 0,
            exportable: false,
        }
    }
}

/// Lower-case hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// One CMK as found in the token.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Cmk {
    /// Identity (CMK id).
    pub id: Vec<u8>,
    /// `CKA_CLASS` (secret or private key).
    pub class: CK_OBJECT_CLASS,
    /// `CKA_LABEL`.
    pub label: String,
    /// Versions, ascending.
    pub versions: Vec<(u32, ObjectHandle)>,
    /// The newest state record, if any.
    pub record: Option<StateRecord>,
    /// Every state record object (the newest included), for clean-up.
    pub record_objects: Vec<ObjectHandle>,
    /// A state record of the key did not verify (see [`meta`]): the key fails closed
    /// (disabled) until an operator sets its state again, which removes that record.
    pub unverified: bool,
    /// On a token written by an earlier build (no metadata MAC key yet), the newest
    /// unauthenticated record: what `cmkp11 key migrate` authenticates.
    pub legacy: Option<StateRecord>,
}

impl Cmk {
    /// The name shown to people: the label, or the id in hex.
    pub fn name(&self) -> String {
        if self.label.is_empty() {
            hex(&self.id)
        } else {
            self.label.clone()
        }
    }

    /// The record in force (the implicit one when none was written).
    pub fn record(&self) -> StateRecord {
        self.record
            .clone()
            .unwrap_or_else(|| StateRecord::initial(&self.id))
    }

    /// The state in force at `now`: a key pending deletion past its date is destroyed.
    pub fn state(&self, now: u64) -> State {
        if self.unverified {
            // Never "no record = enabled" for a key whose records cannot be trusted.
            return State::Disabled;
        }
        match &self.record {
            None => State::Enabled,
            Some(r) if r.state == State::PendingDeletion && r.deletion_date <= now => {
                State::Destroyed
            }
            Some(r) => r.state,
        }
    }

    /// When the key was last given a new version (its creation if never rotated; 0 when
    /// unknown): what `cmkp11 key rotate --due` compares with `rotation_period_days`.
    pub fn last_rotation(&self) -> u64 {
        let r = self.record();
        r.rotated.max(r.created)
    }

    /// The primary (newest) version.
    pub fn primary(&self) -> Option<(u32, ObjectHandle)> {
        self.versions.last().copied()
    }
}

/// What makes a key object a version of a CMK, read from the token once per object and
/// process (a CMK's objects are created not modifiable, so they do not change).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Facts {
    /// `CKA_KEY_TYPE`.
    pub key_type: CK_ULONG,
    /// Usage flags as bits (ENCRYPT, DECRYPT, SIGN, VERIFY, WRAP, UNWRAP, DERIVE).
    pub usage: u8,
    /// `CKA_SENSITIVE` and not `CKA_EXTRACTABLE`.
    pub protected: bool,
    /// `CKA_SENSITIVE`, `CKA_EXTRACTABLE` and `CKA_WRAP_WITH_TRUSTED`: leaves the token
    /// only wrapped under a key the SO marked trusted (an exportable CMK's versions).
    pub trusted_export: bool,
    /// `CKA_LOCAL` and `CKA_ALWAYS_SENSITIVE`: generated in the token and never readable
    /// (an exportable CMK is not `CKA_NEVER_EXTRACTABLE`).
    pub local_sensitive: bool,
    /// `CKA_LOCAL`, `CKA_ALWAYS_SENSITIVE` and `CKA_NEVER_EXTRACTABLE`: generated in the
    /// token and never out of it in the clear.
    pub born_in_token: bool,
}

/// What the keystore accepts as a version besides keys born in the token.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Trust {
    /// BYOK import is on: keys whose record says imported may be `CKA_LOCAL` FALSE.
    pub allow_import: bool,
    /// The test-only plaintext import switch is on.
    pub allow_plaintext_import: bool,
}

/// Per-process knowledge about key objects, kept across loads.
#[derive(Debug, Default)]
pub struct Cache {
    /// State records that verified, with the value and tag they verified with: the same
    /// bytes read again need no second HMAC (a reload costs one token HMAC per new or
    /// changed record, not per record).
    pub verified: std::collections::HashMap<CK_OBJECT_HANDLE, (Vec<u8>, Vec<u8>)>,
    /// The metadata key those records verified under.
    pub verified_under: Option<CK_OBJECT_HANDLE>,
    /// Secret keys already known to be usable (see [`load`]).
    pub usable: std::collections::HashSet<CK_OBJECT_HANDLE>,
    /// Each key object's [`Facts`].
    pub facts: std::collections::HashMap<CK_OBJECT_HANDLE, Facts>,
    /// Objects already reported as refused (logged once).
    pub refused: std::collections::HashSet<CK_OBJECT_HANDLE>,
    /// Objects refused once already, possibly while another process wrote them: refused
    /// again, they are reported.
    pub doubted: std::collections::HashSet<CK_OBJECT_HANDLE>,
    /// What is trusted besides keys born in the token.
    pub trust: Trust,
}

fn facts(s: &Session, obj: ObjectHandle) -> Result<Facts> {
    use AttributeType as T;
    let attrs = s.get_attributes(
        obj,
        &[
            T::KeyType,
            T::Sensitive,
            T::Extractable,
            T::Local,
            T::AlwaysSensitive,
            T::NeverExtractable,
            T::Encrypt,
            T::Decrypt,
            T::Sign,
            T::Verify,
            T::Wrap,
            T::Unwrap,
            T::Derive,
            T::WrapWithTrusted,
        ],
    )?;
    let on = |a: &Attribute| attrs.contains(a);
    let usage = [
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
        Attribute::Sign(true),
        Attribute::Verify(true),
        Attribute::Wrap(true),
        Attribute::Unwrap(true),
        Attribute::Derive(true),
    ]
    .iter()
    .enumerate()
    .filter(|(_, a)| on(a))
    .fold(0u8, |b, (i, _)| b | (1 << i));
    Ok(Facts {
        key_type: attrs
            .iter()
            .find_map(|a| match a {
                Attribute::KeyType(k) => Some(CK_ULONG::from(*k)),
                _ => None,
            })
            .unwrap_or(CK_UNAVAILABLE_INFORMATION),
        usage,
        protected: on(&Attribute::Sensitive(true)) && on(&Attribute::Extractable(false)),
        trusted_export: on(&Attribute::Sensitive(true))
            && on(&Attribute::Extractable(true))
            && on(&Attribute::WrapWithTrusted(true)),
        local_sensitive: on(&Attribute::Local(true)) && on(&Attribute::AlwaysSensitive(true)),
        born_in_token: on(&Attribute::Local(true))
            && on(&Attribute::AlwaysSensitive(true))
            && on(&Attribute::NeverExtractable(true)),
    })
}

/// The token's CMKs at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    /// The view was read by a logged-in session: private objects (every CMK and its
    /// records) were visible. Without it nothing can be said about any CMK's state.
    pub logged_in: bool,
    /// CMKs by identity.
    pub cmks: BTreeMap<Vec<u8>, Cmk>,
    /// State records whose key objects are gone (left by an interrupted purge).
    pub orphan_records: Vec<ObjectHandle>,
    /// Secret key objects the token could not use (see [`load`]): no version of any CMK.
    /// Purge destroys those that are [`torn`]; the others are left alone.
    pub unusable: Vec<Unusable>,
    /// State records that did not verify: (object, hex of the key they name).
    pub unverified: Vec<(ObjectHandle, String)>,
    /// The token has a metadata MAC key (it was made or migrated by this build).
    pub authenticated: bool,
}

/// A secret key object that failed the usability probe of [`load`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unusable {
    /// The object.
    pub obj: ObjectHandle,
    /// The CMK name it carries (label, or hex id).
    pub name: String,
    /// The version number in its `CKA_ID`, if tagged.
    pub version: Option<u32>,
}

impl View {
    /// The CMK a backend object belongs to, with the object's version.
    pub fn of_object(&self, obj: ObjectHandle) -> Option<(&Cmk, u32)> {
        self.cmks.values().find_map(|c| {
            c.versions
                .iter()
                .find(|(_, o)| *o == obj)
                .map(|(v, _)| (c, *v))
        })
    }

    /// A CMK by name (label, or hex id).
    pub fn by_name(&self, name: &str) -> Option<&Cmk> {
        self.cmks
            .values()
            .find(|c| c.label == name || (c.label.is_empty() && hex(&c.id) == name))
    }
}

fn text(a: &Attribute) -> Option<String> {
    match a {
        Attribute::Label(l) => Some(String::from_utf8_lossy(l).into_owned()),
        _ => None,
    }
}

/// Whether the token can use a secret key: one operation of its role, inside the token
/// (wrap a throwaway session key, encrypt a zero block, or MAC a byte; nothing is kept).
/// A key object whose write was cut short can keep its attributes but lose its value.
fn usable_key(s: &Session, obj: ObjectHandle) -> bool {
    use cryptoki::mechanism::Mechanism as M;
    use cryptoki::object::KeyType;
    let Ok(attrs) = s.get_attributes(
        obj,
        &[
            AttributeType::KeyType,
            AttributeType::Wrap,
            AttributeType::Encrypt,
            AttributeType::Sign,
        ],
    ) else {
        return false;
    };
    let has = |want: &Attribute| attrs.iter().any(|a| a == want);
    let aes = has(&Attribute::KeyType(KeyType::AES));
    if has(&Attribute::Wrap(true)) && aes {
        let Ok(tmp) = s.generate_key(
            &M::AesKeyGen,
            &[
                Attribute::Token(false),
                Attribute::ValueLen(16.into()),
                Attribute::Extractable(true),
                Attribute::Sensitive(true),
            ],
        ) else {
            return true; // cannot test here: do not hide the key
        };
        let r = s.wrap_key(&M::AesKeyWrap, obj, tmp);
        let _ = s.destroy_object(tmp);
        answered(r)
    } else if has(&Attribute::Encrypt(true)) && aes {
        answered(s.encrypt(&M::AesEcb, obj, &[0u8; 16]))
    } else if has(&Attribute::Sign(true)) {
        let m = if aes { M::AesCMac } else { M::Sha256Hmac };
        answered(s.sign(&m, obj, &[0u8]))
    } else {
        true
    }
}

/// Whether a test use of a key object says it is usable. A token that lacks the test's
/// mechanism (a token behind p11-kit 0.24's RPC has no AES-KW, AES-CMAC or AES-CBC:
/// `CKR_MECHANISM_INVALID`) cannot tell: the key is not hidden on that account. Nor can
/// one that refuses the length query cryptoki makes first (`CKR_BUFFER_TOO_SMALL`: quirk
/// `kryoptic:wrap-key-no-length-query`).
fn answered<T>(r: cryptoki::error::Result<T>) -> bool {
    use cryptoki::error::{Error as E, RvError as R};
    match r {
        Ok(_) => true,
        Err(E::Pkcs11(
            R::MechanismInvalid
            | R::MechanismParamInvalid
            | R::FunctionNotSupported
            | R::BufferTooSmall,
            _,
        )) => true,
        Err(_) => false,
    }
}

/// SHA-256 of the empty string: what `C_DigestKey` gives for a key whose value is empty.
const SHA256_OF_NOTHING: [u8; 32] = [
    0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f, 0xb9, 0x24,
    0x27, 0xae, 0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52, 0xb8, 0x55,
];

/// Whether a secret key object is a torn one: left by a process killed while the token
/// created it, with its attributes written but no value. Only such an object may be
/// destroyed on the keystore's initiative, so every condition is a positive statement of
/// the token, never an error that a healthy key could also get:
/// - `C_DigestKey` (SHA-256) succeeds and gives the digest of zero bytes: the token says
///   the key's value is empty (no key of any type has an empty value);
/// - `CKA_CHECK_VALUE` reads as empty (a token computes it from the value);
/// - `CKA_LOCAL` reads as false (generated keys get it with their value).
///
/// That is exactly what SoftHSM2 2.6 leaves when a `C_GenerateKey` or `C_UnwrapKey` is
/// killed between its two writes of the object file (the template's attributes, then the
/// value with `CKA_LOCAL`, `CKA_KEY_GEN_MECHANISM` and `CKA_CHECK_VALUE`). A token that
/// cannot digest keys, refuses to, or fails for any reason makes the answer `false`.
/// `s` must have no operation in progress of its own: the digest is started and finished
/// here (a session with one refuses `C_DigestInit`, and the answer is `false`).
pub fn torn(s: &Session, obj: ObjectHandle) -> bool {
    use cryptoki::mechanism::Mechanism as M;
    let Ok(attrs) = s.get_attributes(obj, &[AttributeType::CheckValue, AttributeType::Local])
    else {
        return false;
    };
    let empty_kcv = attrs
        .iter()
        .any(|a| matches!(a, Attribute::CheckValue(v) if v.is_empty()));
    let not_local = attrs.contains(&Attribute::Local(false));
    if !(empty_kcv && not_local) || s.digest_init(&M::Sha256).is_err() {
        return false;
    }
    let fed = s.digest_key(obj).is_ok();
    // Always finished, so that the session is left without an operation.
    let digest = s.digest_final();
    fed && digest.is_ok_and(|d| d == SHA256_OF_NOTHING)
}

/// Reads every CMK and state record from the token (through a logged-in session; before
/// login, private objects are invisible and the view is empty).
pub fn load(s: &Session, cache: &mut Cache) -> Result<View> {
    use cryptoki::session::SessionState as St;
    let mut pending = std::collections::HashMap::new();
    let mut view = View {
        logged_in: matches!(
            s.get_session_info()?.session_state(),
            St::RoUser | St::RwUser
        ),
        ..View::default()
    };
    for class in [ObjectClass::SECRET_KEY, ObjectClass::PRIVATE_KEY] {
        for obj in s.find_objects(&[Attribute::Token(true), Attribute::Class(class)])? {
            // An object another process is creating or destroying right now may not be
            // readable: it is no version for this view (the next one looks again).
            let Ok(attrs) = s.get_attributes(obj, &[AttributeType::Id, AttributeType::Label])
            else {
                continue;
            };
            let raw_id = attrs
                .iter()
                .find_map(|a| match a {
                    Attribute::Id(i) => Some(i.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            let label = attrs.iter().find_map(text).unwrap_or_default();
            if label.starts_with(RESERVED_PREFIX) {
                continue;
            }
            // A token may leave out a label never set (kryoptic 1.0 answers
            // CKR_ATTRIBUTE_TYPE_INVALID where PKCS#11 gives it an empty default, quirk
            // `kryoptic:no-default-label`): no label is the empty label.
            let exact = attrs.iter().all(|a| match a {
                Attribute::Label(l) => std::str::from_utf8(l).is_ok(),
                _ => true,
            });
            if !exact {
                if cache.refused.insert(obj.handle()) {
                    log::error!("keystore: ignoring a key object whose CKA_LABEL is not UTF-8 (not made through cmkp11): it is no CMK and cannot be used");
                }
                continue;
            }
            // A key whose creation was cut short (a process killed while the token wrote
            // its file: SoftHSM2 can leave an object whose value cannot be read back) is
            // no version: using it would fail. Each secret key is checked once per
            // process by one operation inside the token (see `usable_key`); purge
            // destroys the failures that are `torn`.
            if class == ObjectClass::SECRET_KEY && !cache.usable.contains(&obj.handle()) {
                if !usable_key(s, obj) {
                    log::error!("keystore: ignoring the key object `{label}` whose value the token cannot read (left by an interrupted write?)");
                    let (id, version) = split_id(&raw_id);
                    view.unusable.push(Unusable {
                        obj,
                        name: if label.is_empty() { hex(id) } else { label },
                        version,
                    });
                    continue;
                }
                cache.usable.insert(obj.handle());
            }
            if let std::collections::hash_map::Entry::Vacant(e) = cache.facts.entry(obj.handle()) {
                match facts(s, obj) {
                    // Only an object that passes is remembered: one read while another
                    // process was still writing it is read again next time.
                    Ok(f)
                        if (f.protected && f.born_in_token)
                            || (f.trusted_export && f.local_sensitive) =>
                    {
                        e.insert(f);
                    }
                    Ok(f) => {
                        pending.insert(obj.handle(), f);
                    }
                    Err(_) => continue,
                }
            }
            let Some((id, v)) = identity(&raw_id, &label) else {
                continue;
            };
            let cmk = view.cmks.entry(id.clone()).or_insert_with(|| Cmk {
                id,
                class: class.into(),
                label: label.clone(),
                ..Cmk::default()
            });
            cmk.versions.push((v, obj));
        }
    }
    for c in view.cmks.values_mut() {
        c.versions.sort_by_key(|(v, _)| *v);
    }
    let records = s.find_objects(&[
        Attribute::Token(true),
        Attribute::Class(ObjectClass::DATA),
        Attribute::Application(APPLICATION.as_bytes().to_vec()),
        Attribute::Label(STATE_LABEL.as_bytes().to_vec()),
    ])?;
    // Each record is verified at every (re)load, never at a key's use.
    let meta_key = if view.logged_in {
        meta::find_key(s)?
    } else {
        None
    };
    view.authenticated = meta_key.is_some();
    let under = meta_key.map(|k| k.handle());
    if cache.verified_under != under {
        cache.verified.clear();
        cache.verified_under = under;
    }
    type Found = (ObjectHandle, StateRecord, bool);
    let mut by_key: BTreeMap<String, Vec<Found>> = BTreeMap::new();
    let hex_to_id: BTreeMap<String, Vec<u8>> =
        view.cmks.keys().map(|k| (hex(k), k.clone())).collect();
    let mut seen = std::collections::HashSet::new();
    for obj in records {
        seen.insert(obj.handle());
        let (mut value, mut tag) = (None, None);
        for a in s.get_attributes(obj, &[AttributeType::Value, AttributeType::ObjectId])? {
            match a {
                Attribute::Value(v) => value = Some(v),
                Attribute::ObjectId(t) => tag = Some(t),
                _ => {}
            }
        }
        let rec = value
            .as_deref()
            .and_then(|v| serde_json::from_slice::<StateRecord>(v).ok());
        match rec {
            Some(r) => {
                let ok = match (meta_key, value, tag) {
                    (Some(k), Some(v), Some(t)) if !t.is_empty() => {
                        let known = cache
                            .verified
                            .get(&obj.handle())
                            .is_some_and(|(cv, ct)| *cv == v && *ct == t);
                        let ok = known || meta::verifies(s, k, &v, &t);
                        if ok && !known {
                            cache.verified.insert(obj.handle(), (v, t));
                        }
                        ok
                    }
                    _ => false,
                };
                by_key.entry(r.key.clone()).or_default().push((obj, r, ok));
            }
            // Unreadable (torn) records are ignored; the clean-up of the next write of a
            // key cannot name them, so they are kept as orphans for purge.
            None => view.orphan_records.push(obj),
        }
    }
    cache.verified.retain(|h, _| seen.contains(h));
    for (key, recs) in by_key {
        match hex_to_id.get(&key).and_then(|id| view.cmks.get_mut(id)) {
            Some(c) => {
                c.record = recs
                    .iter()
                    .filter(|(_, _, ok)| *ok)
                    .map(|(_, r, _)| r.clone())
                    .max_by_key(|r| (r.generation, r.nonce));
                for (obj, _, ok) in &recs {
                    if *ok {
                        continue;
                    }
                    c.unverified = true;
                    view.unverified.push((*obj, key.clone()));
                    if cache.refused.insert(obj.handle()) {
                        if meta_key.is_some() {
                            log::error!("keystore: key `{}`: a state record does not verify (not written by cmkp11): it is ignored and the key is not used until an operator sets its state again", c.name());
                        } else {
                            log::error!("keystore: key `{}`: its state record is not authenticated (written by an earlier cmkp11): the key is not used until an operator runs `cmkp11 key migrate` once", c.name());
                        }
                    }
                }
                if c.unverified && meta_key.is_none() {
                    c.legacy = recs
                        .iter()
                        .map(|(_, r, _)| r.clone())
                        .max_by_key(|r| (r.generation, r.nonce));
                }
                c.record_objects = recs.into_iter().map(|(o, _, _)| o).collect();
            }
            None => view
                .orphan_records
                .extend(recs.into_iter().map(|(o, _, _)| o)),
        }
    }
    vet(&mut view, cache, &pending);
    Ok(view)
}

/// Keeps, of each CMK's objects, only those that are versions: each checked on its own
/// (sensitive, not extractable, born in the token unless its import is trusted, the role
/// and key type of the key's first version). A refused object is logged at error, once.
fn vet(
    view: &mut View,
    cache: &mut Cache,
    pending: &std::collections::HashMap<CK_OBJECT_HANDLE, Facts>,
) {
    let trust = cache.trust;
    for c in view.cmks.values_mut() {
        let imported = c
            .record
            .as_ref()
            .is_some_and(|r| r.origin == Origin::Imported);
        // An operator made it exportable: its versions are extractable under a trusted
        // key only, and generated in the token (never readable).
        let exportable = c.record.as_ref().is_some_and(|r| r.exportable);
        let mut reference: Option<Facts> = None;
        let name = c.name();
        c.versions.retain(|(v, obj)| {
            let Some(f) = cache
                .facts
                .get(&obj.handle())
                .or_else(|| pending.get(&obj.handle()))
                .copied()
            else {
                return false;
            };
            let export_ok = exportable && f.trusted_export && f.local_sensitive;
            let why = if !f.protected && !export_ok {
                Some("it is not sensitive or is extractable")
            } else if !(f.born_in_token
                || export_ok
                || (imported && trust.allow_import)
                || trust.allow_plaintext_import)
            {
                Some("the token does not vouch that it was generated inside it and never left it in the clear (CKA_LOCAL, CKA_ALWAYS_SENSITIVE, CKA_NEVER_EXTRACTABLE)")
            } else if reference.is_some_and(|r| r.usage != f.usage || r.key_type != f.key_type) {
                Some("its role or key type differs from the key's first version")
            } else {
                None
            };
            match why {
                Some(why) => {
                    if pending.contains_key(&obj.handle()) && cache.doubted.insert(obj.handle()) {
                        // Possibly still being written by another process: quiet.
                        log::debug!("keystore: key `{name}` version {v}: not (yet) usable: {why}");
                    } else if cache.refused.insert(obj.handle()) {
                        log::error!("keystore: key `{name}` version {v}: object refused, {why}; it is not used");
                    }
                    false
                }
                None => {
                    reference.get_or_insert(f);
                    true
                }
            }
        });
    }
    view.cmks.retain(|_, c| !c.versions.is_empty());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_ids_round_trip() {
        let raw = version_id(b"abc", 7);
        assert_eq!(split_id(&raw), (&b"abc"[..], Some(7)));
        assert_eq!(split_id(b"plain"), (&b"plain"[..], None));
        assert_eq!(identity(&raw, "x"), Some((b"abc".to_vec(), 7)));
        assert_eq!(identity(b"", "name"), Some((b"label:name".to_vec(), 1)));
        assert_eq!(identity(b"", ""), None);
    }

    #[test]
    fn records_round_trip_and_states() {
        let mut r = StateRecord::initial(b"k");
        r.state = State::PendingDeletion;
        r.deletion_date = 100;
        let json = serde_json::to_vec(&r).unwrap();
        assert_eq!(serde_json::from_slice::<StateRecord>(&json).unwrap(), r);
        let c = Cmk {
            id: b"k".to_vec(),
            class: CKO_SECRET_KEY,
            label: String::new(),
            versions: vec![],
            record: Some(r),
            record_objects: vec![],
            ..Cmk::default()
        };
        assert_eq!(c.state(99), State::PendingDeletion);
        // A key with a record that did not verify fails closed.
        let closed = Cmk {
            unverified: true,
            ..c.clone()
        };
        assert_eq!(closed.state(99), State::Disabled);
        assert_eq!(c.state(100), State::Destroyed);
        assert_eq!(c.name(), "6b");
    }
}
