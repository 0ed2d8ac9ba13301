//! Lifecycle steps as the operator asks for them (the CLI and the "cmkp11 admin" vendor
//! interface), applied through a logged-in read-write session.

use super::session::Session;
use super::Library;
use crate::error::{err, Error, Result};
use crate::keystore::{self, lifecycle, Cmk, State, StateRecord, View};
use cryptoki_sys::*;
use std::sync::Arc;

/// A lifecycle step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// New primary version (secret CMKs).
    Rotate,
    /// Disabled -> enabled.
    Enable,
    /// Enabled -> disabled.
    Disable,
    /// -> pending deletion in this many days (`None`: the configured window).
    ScheduleDeletion(Option<u32>),
    /// Pending deletion -> disabled.
    CancelDeletion,
}

impl Action {
    /// The step's name (CLI, audit log).
    pub fn name(self) -> &'static str {
        match self {
            Action::Rotate => "rotate",
            Action::Enable => "enable",
            Action::Disable => "disable",
            Action::ScheduleDeletion(_) => "schedule-deletion",
            Action::CancelDeletion => "cancel-deletion",
        }
    }
}

impl Library {
    /// The token's CMKs, read now.
    pub fn keys(&self, s: &Session) -> Arc<View> {
        self.reload_view(s)
    }

    /// The CMK behind an application handle.
    pub fn cmk_by_handle(&self, s: &Session, h: CK_OBJECT_HANDLE) -> Result<Cmk> {
        let (_, info) = s.key_info(self, h, CKR_OBJECT_HANDLE_INVALID)?;
        let view = self.reload_view(s);
        let id = match self.objects.logical_id(h) {
            Some(id) => id,
            None => {
                keystore::identity(&info.raw_id, &info.label)
                    .ok_or(Error::Rv(CKR_KEY_HANDLE_INVALID))?
                    .0
            }
        };
        match view.cmks.get(&id) {
            Some(c) if info.token && c.state(keystore::now()) != State::Destroyed => Ok(c.clone()),
            _ => err(CKR_KEY_HANDLE_INVALID),
        }
    }

    /// Applies `action` to `cmk`. Returns the new record (rotation: the new version in
    /// `StateRecord::rotated`'s companion, see [`keystore::lifecycle::rotate`]).
    pub fn apply(&self, s: &Session, cmk: &Cmk, action: Action) -> Result<StateRecord> {
        self.operator_gate(s, action.name(), Some(&cmk.name()), Some(&cmk.id), None)?;
        if !s.rw {
            return err(CKR_SESSION_READ_ONLY);
        }
        self.audit_intent(s, action.name(), Some(&cmk.name()), Some(&cmk.id), None)?;
        let result = self.apply_step(s, cmk, action);
        let mut rec = crate::audit::Record::new(
            action.name(),
            result.as_ref().map_or_else(Error::rv, |_| CKR_OK),
        );
        rec.key = Some(cmk.name());
        rec.key_id = Some(cmk.id.clone());
        rec.version = cmk
            .primary()
            .map(|(v, _)| v + u32::from(action == Action::Rotate && result.is_ok()));
        let _ = self.audit_record(s, rec);
        result
    }

    fn apply_step(&self, s: &Session, cmk: &Cmk, action: Action) -> Result<StateRecord> {
        let b = s.backend();
        let r = match action {
            Action::Rotate => {
                let v = lifecycle::rotate(b, cmk)?;
                log::warn!("CMK `{}` rotated: version {v} is primary", cmk.name());
                // Done: the version exists. A view that cannot be read now (another
                // process rewriting the token) does not make it a failure.
                let view = self.reload_view(s);
                view.cmks
                    .get(&cmk.id)
                    .map_or_else(|| cmk.record(), Cmk::record)
            }
            Action::Enable => lifecycle::enable(b, cmk)?,
            Action::Disable => lifecycle::disable(b, cmk)?,
            Action::ScheduleDeletion(days) => {
                let days = days.unwrap_or(self.cfg.keys.deletion_window_days);
                if !(1..=365).contains(&days) {
                    return err(CKR_ARGUMENTS_BAD);
                }
                lifecycle::schedule_deletion(b, cmk, days)?
            }
            Action::CancelDeletion => lifecycle::cancel_deletion(b, cmk)?,
        };
        self.stores[s.slot_id as usize].invalidate();
        Ok(r)
    }

    /// Destroys every key whose deletion date has passed; returns their names.
    pub fn purge(&self, s: &Session) -> Result<Vec<String>> {
        self.purge_by(s, None)
    }

    /// [`Library::purge`], with `reason` in each audit record (who asked: the daemon's
    /// purge timer names itself).
    pub fn purge_by(&self, s: &Session, reason: Option<&str>) -> Result<Vec<String>> {
        // Before anything: a purge also removes orphan records and torn objects, with no
        // intent record of its own.
        self.operator_gate(s, "purge", None, None, None)?;
        if !s.rw {
            return err(CKR_SESSION_READ_ONLY);
        }
        let view = self.reload_view(s);
        let t = keystore::now();
        for c in view
            .cmks
            .values()
            .filter(|c| c.state(t) == State::Destroyed)
        {
            self.audit_intent(s, "purge", Some(&c.name()), Some(&c.id), None)?;
        }
        let names = lifecycle::purge(s.backend(), &view);
        self.stores[s.slot_id as usize].invalidate();
        if names.as_ref().is_ok_and(|n| !n.is_empty()) {
            // Key objects went: their backend handles may be given to new objects. Not
            // on every run (the daemon's timer): each forgets the rest of reserved blocks.
            self.gcm.forget();
        }
        let rv = names.as_ref().map_or_else(Error::rv, |_| CKR_OK);
        for name in names.as_deref().unwrap_or(&[]) {
            let mut rec = crate::audit::Record::new("purge", rv);
            rec.key = Some(name.clone());
            rec.reason = reason.map(str::to_string);
            let _ = self.audit_record(s, rec);
        }
        names
    }
}

/// A key as operators see it (`cmkp11 key show`, the daemon's admin socket).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct KeyFacts {
    /// Name (label, or hex id).
    pub name: String,
    /// Hex of the stable id.
    pub id: String,
    /// `secret` or `private`.
    pub class: String,
    /// `AES-256`, `RSA-3072`, `EC`...
    pub key_type: String,
    /// `wrap`, `data`, `mac`, or the private roles joined by `+`.
    pub role: String,
    /// `enabled`, `disabled`, `pending-deletion`, `destroyed`.
    pub state: String,
    /// Version numbers, ascending.
    pub versions: Vec<u32>,
    /// The primary version.
    pub primary: u32,
    /// `generated` or `imported`.
    pub origin: String,
    /// Creation time (RFC 3339), if recorded.
    pub created: Option<String>,
    /// Last rotation (RFC 3339), if any.
    pub rotated: Option<String>,
    /// Last state change (RFC 3339), if any.
    pub updated: Option<String>,
    /// When a key pending deletion is destroyed.
    pub deletion_date: Option<String>,
    /// Created exportable by an operator: it may leave the token, wrapped under a trusted
    /// destination's key only.
    pub exportable: bool,
}

/// RFC 3339 UTC of unix seconds (`None` for 0: unknown).
pub fn time_text(t: u64) -> Option<String> {
    (t != 0).then(|| {
        let full = crate::audit::record::rfc3339(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(t),
        );
        // Whole seconds: `2026-11-23T13:18:58Z`.
        format!("{}Z", full.get(..19).unwrap_or(&full))
    })
}

/// The `CMKP11_ROLE_*` bits of `CKA_CMKP11_ROLE` as names joined by `+` (`-` for none).
pub fn role_name(bits: CK_ULONG) -> String {
    use crate::vendor as v;
    let names = [
        (v::CMKP11_ROLE_WRAP, "wrap"),
        (v::CMKP11_ROLE_DATA, "data"),
        (v::CMKP11_ROLE_MAC, "mac"),
        (v::CMKP11_ROLE_SIGN, "sign"),
        (v::CMKP11_ROLE_DECRYPT, "decrypt"),
        (v::CMKP11_ROLE_DERIVE, "derive"),
        (v::CMKP11_ROLE_UNWRAP, "unwrap"),
    ];
    let v: Vec<&str> = names
        .iter()
        .filter(|(b, _)| bits & *b != 0)
        .map(|(_, n)| *n)
        .collect();
    if v.is_empty() {
        "-".into()
    } else {
        v.join("+")
    }
}

impl Library {
    /// cmkp11's handle of a CMK (the logical handle of a secret CMK: every version).
    pub fn handle_of_cmk(&self, s: &Session, cmk: &Cmk) -> Result<CK_OBJECT_HANDLE> {
        let Some((_, obj)) = cmk.primary() else {
            return err(CKR_KEY_HANDLE_INVALID);
        };
        Ok(if cmk.class == CKO_SECRET_KEY {
            self.objects.logical(s.slot_id, &cmk.id, obj)
        } else {
            self.objects.ours(s.slot_id, obj, None)
        })
    }

    /// What operators are shown of `cmk`.
    pub fn key_facts(&self, s: &mut Session, cmk: &Cmk) -> Result<KeyFacts> {
        use super::session::AttrValue;
        use crate::vendor;
        use cryptoki::object::{Attribute, KeyType};
        let ulong = |v: &AttrValue| -> Option<CK_ULONG> {
            match v {
                AttrValue::Value(Attribute::VendorDefined((_, b))) => {
                    Some(CK_ULONG::from_ne_bytes(b.as_slice().try_into().ok()?))
                }
                AttrValue::Value(Attribute::ValueLen(l)) => Some((*l).into()),
                _ => None,
            }
        };
        let h = self.handle_of_cmk(s, cmk)?;
        let secret = cmk.class == CKO_SECRET_KEY;
        let types = [
            CKA_KEY_TYPE,
            vendor::CKA_CMKP11_ROLE,
            vendor::CKA_CMKP11_ORIGIN,
            if secret { CKA_VALUE_LEN } else { CKA_MODULUS },
        ];
        let v = self.get_attributes(s, h, &types)?;
        let key_type = match (&v[0], &v[3]) {
            (AttrValue::Value(Attribute::KeyType(KeyType::AES)), len) => {
                format!("AES-{}", ulong(len).unwrap_or(0) * 8)
            }
            (AttrValue::Value(Attribute::KeyType(KeyType::RSA)), m) => match m {
                AttrValue::Value(Attribute::Modulus(m)) => format!("RSA-{}", m.len() * 8),
                _ => "RSA".into(),
            },
            (AttrValue::Value(Attribute::KeyType(KeyType::EC)), _) => "EC".into(),
            (AttrValue::Value(Attribute::KeyType(KeyType::EC_EDWARDS)), _) => "EdDSA".into(),
            (AttrValue::Value(Attribute::KeyType(k)), _) => k.to_string(),
            _ => "-".into(),
        };
        let r = cmk.record();
        let origin = match ulong(&v[2]) {
            Some(o) if o == vendor::CMKP11_ORIGIN_IMPORTED => "imported",
            _ if r.origin == keystore::Origin::Imported => "imported",
            _ => "generated",
        };
        let state = cmk.state(keystore::now());
        Ok(KeyFacts {
            name: cmk.name(),
            id: keystore::hex(&cmk.id),
            class: if secret { "secret" } else { "private" }.into(),
            key_type,
            role: role_name(ulong(&v[1]).unwrap_or(0)),
            state: state.name().into(),
            versions: cmk.versions.iter().map(|(v, _)| *v).collect(),
            primary: cmk.primary().map(|(v, _)| v).unwrap_or(0),
            origin: origin.into(),
            created: time_text(r.created),
            rotated: time_text(r.rotated),
            updated: time_text(r.updated),
            deletion_date: if matches!(state, State::PendingDeletion | State::Destroyed) {
                time_text(r.deletion_date)
            } else {
                None
            },
            exportable: r.exportable,
        })
    }
}

impl Library {
    /// `cmkp11 key migrate`: the one-time, audited step that moves a token written by an
    /// earlier build (state records without authentication) to authenticated records:
    /// makes the token's metadata MAC key and rewrites each key's newest record with its
    /// HMAC. Refused (`CKR_ACTION_PROHIBITED`) once the token has the key: records that do
    /// not verify then are not cmkp11's, and no command blesses them. Returns the keys
    /// whose records were authenticated.
    pub fn migrate(&self, s: &Session) -> Result<Vec<String>> {
        if !s.rw {
            return err(CKR_SESSION_READ_ONLY);
        }
        if keystore::meta::find_key(s.backend())?.is_some() {
            log::warn!("cmkp11 key migrate refused: this token's lifecycle records are authenticated already");
            return err(CKR_ACTION_PROHIBITED);
        }
        let view = self.reload_view(s);
        self.audit_intent(s, "migrate", None, None, None)?;
        keystore::meta::create_key(s.backend())?;
        let mut names = Vec::new();
        for c in view.cmks.values() {
            let Some(legacy) = &c.legacy else {
                continue;
            };
            let cmk = keystore::Cmk {
                record: Some(legacy.clone()),
                ..c.clone()
            };
            let r = keystore::lifecycle::write_record(s.backend(), &cmk, |_| {});
            let mut rec =
                crate::audit::Record::new("migrate", r.as_ref().map_or_else(Error::rv, |_| CKR_OK));
            rec.key = Some(c.name());
            rec.key_id = Some(c.id.clone());
            rec.reason = Some(format!(
                "state record authenticated as it was: {}",
                legacy.state.name()
            ));
            let _ = self.audit_record(s, rec);
            r?;
            names.push(c.name());
        }
        self.stores[s.slot_id as usize].invalidate();
        Ok(names)
    }
}

/// The hash of BYOK's RSA-OAEP (and of its MGF1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OaepHash {
    /// SHA-256: what cloud KMSs and `docs/byok.md` use.
    #[default]
    Sha256,
    /// SHA-1: for tokens whose OAEP knows no other hash (SoftHSM2 2.6).
    Sha1,
}

/// What a BYOK import makes.
#[derive(Debug, Clone, Copy)]
pub struct ImportSpec<'a> {
    /// The new CMK's name.
    pub name: &'a str,
    /// Its role.
    pub role: crate::policy::SecretRole,
    /// The hash of the RSA-OAEP wrapping.
    pub hash: OaepHash,
    /// The wrapped AES key's length in bytes (16 or 32).
    pub key_bytes: u64,
}

/// The OAEP parameters of BYOK import: `hash`, MGF1 with `hash`, no label (what
/// `openssl pkeyutl -pkeyopt rsa_padding_mode:oaep -pkeyopt rsa_oaep_md:sha256
/// -pkeyopt rsa_mgf1_md:sha256` makes, or the same with sha1).
pub fn import_mechanism(hash: OaepHash) -> crate::backend::mech::Mech {
    let (hash, mgf) = match hash {
        OaepHash::Sha256 => (CKM_SHA256, CKG_MGF1_SHA256),
        OaepHash::Sha1 => (CKM_SHA_1, CKG_MGF1_SHA1),
    };
    crate::backend::mech::Mech {
        ty: CKM_RSA_PKCS_OAEP,
        param: crate::backend::mech::Param::Oaep {
            hash,
            mgf,
            label: None,
        },
    }
}

impl Library {
    fn check_import_allowed(&self) -> Result<()> {
        if self.cfg.policy.allow_import {
            Ok(())
        } else {
            log::warn!(
                "import refused: set `allow_import = true` in [policy] to bring your own keys"
            );
            err(CKR_ACTION_PROHIBITED)
        }
    }

    /// BYOK step 1: an RSA-3072 import key pair in the token. The private key can only
    /// unwrap (RSA-OAEP); the public key (`CKA_MODULUS`, `CKA_PUBLIC_EXPONENT`) is what the
    /// customer wraps their key with. Returns (public, private) handles.
    pub fn create_import_key(
        &self,
        s: &mut Session,
        label: &str,
    ) -> Result<(CK_OBJECT_HANDLE, CK_OBJECT_HANDLE)> {
        use cryptoki::object::Attribute as A;
        self.operator_gate(s, "create-import-key", Some(label), None, None)?;
        self.check_import_allowed()?;
        let public = vec![
            A::Token(true),
            A::Label(label.as_bytes().to_vec()),
            A::ModulusBits(3072.into()),
            A::PublicExponent(vec![1, 0, 1]),
            A::Encrypt(true),
            A::Verify(false),
            A::Wrap(false),
        ];
        let private = vec![
            A::Token(true),
            A::Private(true),
            A::Label(label.as_bytes().to_vec()),
            A::Unwrap(true),
        ];
        self.generate_key_pair(
            s,
            crate::backend::mech::Mech::plain(CKM_RSA_PKCS_KEY_PAIR_GEN),
            public,
            private,
        )
    }

    /// BYOK step 2 with RSA-OAEP SHA-256: see [`Library::import_key_with`].
    pub fn import_key(
        &self,
        s: &mut Session,
        import_key: CK_OBJECT_HANDLE,
        blob: &[u8],
        name: &str,
        role: crate::policy::SecretRole,
    ) -> Result<CK_OBJECT_HANDLE> {
        let spec = ImportSpec {
            name,
            role,
            hash: OaepHash::Sha256,
            key_bytes: 32,
        };
        self.import_key_with(s, import_key, blob, &spec)
    }

    /// BYOK step 2: unwraps the customer's AES key of `key_bytes` bytes (16 or 32;
    /// RSA-OAEP with `hash` under the import key) into a new CMK named `name` with `role`;
    /// its origin is recorded as imported and the token marks it `CKA_LOCAL` = FALSE.
    /// The length is recorded with the key because a token may not report it for an
    /// unwrapped key (SoftHSM2 reads 0), and the policy compares key strengths.
    pub fn import_key_with(
        &self,
        s: &mut Session,
        import_key: CK_OBJECT_HANDLE,
        blob: &[u8],
        spec: &ImportSpec,
    ) -> Result<CK_OBJECT_HANDLE> {
        let ImportSpec {
            name,
            role,
            hash,
            key_bytes,
        } = *spec;
        self.operator_gate(s, "import", Some(name), None, None)?;
        if !matches!(key_bytes, 16 | 32) {
            return err(CKR_ATTRIBUTE_VALUE_INVALID);
        }
        use crate::policy::{templates, Op};
        use cryptoki::object::{Attribute as A, KeyType, ObjectClass};
        self.check_import_allowed()?;
        if !s.rw {
            return err(CKR_SESSION_READ_ONLY);
        }
        let mut mech = import_mechanism(hash);
        let k = self.use_key(
            s,
            import_key,
            CKR_UNWRAPPING_KEY_HANDLE_INVALID,
            Op::Unwrap,
            mech.ty,
        )?;
        let usage = role.usage();
        let asked = vec![
            A::Class(ObjectClass::SECRET_KEY),
            A::KeyType(KeyType::AES),
            A::Token(true),
            A::Private(true),
            A::Label(name.as_bytes().to_vec()),
            A::Encrypt(usage.any(crate::policy::Usage::ENCRYPT)),
            A::Decrypt(usage.any(crate::policy::Usage::DECRYPT)),
            A::Sign(usage.any(crate::policy::Usage::SIGN)),
            A::Verify(usage.any(crate::policy::Usage::VERIFY)),
            A::Wrap(usage.any(crate::policy::Usage::WRAP)),
            A::Unwrap(usage.any(crate::policy::Usage::UNWRAP)),
        ];
        let c = super::ops::Creating {
            func: "cmkp11 key import",
            op: "import",
            cmk: true,
            label: Some(name.as_bytes()),
            id: None,
            mech: Some(mech.ty),
        };
        let mut t = templates::secret(asked, true, false, &self.settings)
            .map_err(|r| self.refused(s, &c, r))?;
        self.check_identity_for(s, &c, None, Some(name.as_bytes()))?;
        let mut id = vec![0u8; 16];
        s.backend().generate_random_slice(&mut id)?;
        t.push(A::Id(keystore::version_id(&id, 1)));
        self.audit_intent(s, "import", Some(name), Some(&id), Some(mech.ty))?;
        // The record first (origin, length): a crash between the two steps leaves an
        // orphan record (removed by purge), never an imported key without its length.
        self.write_creation_record(s, &id, keystore::Origin::Imported, key_bytes)?;
        let obj = match s
            .backend()
            .unwrap_key(&mech.to_cryptoki()?, k.objects[0], blob, &t)
        {
            Ok(o) => o,
            Err(e) => {
                let view = self.reload_view(s);
                for orphan in &view.orphan_records {
                    let _ = s.backend().destroy_object(*orphan);
                }
                self.stores[s.slot_id as usize].invalidate();
                return Err(Error::Rv(crate::backend::rv::unwrap_failure(
                    Error::from(e).rv(),
                )));
            }
        };
        self.stores[s.slot_id as usize].invalidate();
        log::warn!("CMK `{name}` imported");
        let mut rec = crate::audit::Record::new("import", CKR_OK);
        rec.key = Some(name.to_string());
        rec.key_id = Some(id.clone());
        rec.version = Some(1);
        let _ = self.audit_record(s, rec);
        Ok(self.objects.logical(s.slot_id, &id, obj))
    }
}
