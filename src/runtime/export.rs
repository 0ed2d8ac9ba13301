//! Exportable CMKs (issue 15 item 5): a CMK leaves its token only when an operator made
//! it exportable at creation, and then only wrapped under the public key of a *trusted
//! destination* that the token's Security Officer registered. The token itself enforces
//! both, so that no path around cmkp11 (the token's own module with the user PIN) can
//! do more:
//!
//! - A CMK is created non-exportable (`CKA_EXTRACTABLE` FALSE): the token refuses to wrap
//!   it under anything (`CKR_KEY_UNEXTRACTABLE`), whoever asks.
//! - An exportable CMK (`cmkp11 key create --exportable`) is `CKA_SENSITIVE` TRUE,
//!   `CKA_EXTRACTABLE` TRUE and `CKA_WRAP_WITH_TRUSTED` TRUE (sticky: it can never be
//!   cleared; the object is not modifiable either): the token wraps it only under a key
//!   whose `CKA_TRUSTED` is TRUE (`CKR_KEY_NOT_WRAPPABLE` otherwise), and only the SO can
//!   set `CKA_TRUSTED` (`CKR_ATTRIBUTE_READ_ONLY` for the user). Its state record says
//!   `exportable` (shown by `cmkp11 key show`), written before the key exists.
//! - A destination is the RSA public key of another token's import key (`cmkp11 key
//!   import-key create` there), imported here by the SO as a token public key with
//!   `CKA_TRUSTED` TRUE, `CKA_WRAP` TRUE, not modifiable, labelled [`DEST_PREFIX`]`NAME`
//!   (a reserved label: applications never see it).
//! - Export wraps the CMK's primary version with RSA-OAEP (SHA-256, or SHA-1 on tokens
//!   whose OAEP knows no other, like SoftHSM2 2.6, which also lacks
//!   `CKM_RSA_AES_KEY_WRAP`): the blob is what BYOK import takes (`cmkp11 key import`
//!   on the destination). Audited (`intent`, then `export` naming the destination).
//!
//! Applications can never export: `C_WrapKey` wraps DEKs only (a CMK is
//! `CKR_KEY_UNEXTRACTABLE`), and a destination key has no application handle.

use super::session::Session;
use super::Library;
use crate::error::{err, Error, Result};
use crate::keystore::{self, lifecycle, Cmk, Origin, State};
use crate::policy::{templates, SecretRole, Usage};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki_sys::*;

/// Label prefix of trusted destinations (reserved: under `cmkp11:`).
pub const DEST_PREFIX: &str = "cmkp11:dest:";

/// A trusted destination as the token holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// Its name.
    pub name: String,
    /// `CKA_TRUSTED` as the token reports it.
    pub trusted: bool,
    /// RSA modulus length in bits.
    pub bits: usize,
}

/// An exported key.
#[derive(Debug, Clone)]
pub struct Exported {
    /// The RSA-OAEP ciphertext of the key (what `cmkp11 key import --wrapped` reads).
    pub blob: Vec<u8>,
    /// The OAEP hash used (and its MGF1's).
    pub hash: super::admin::OaepHash,
    /// The key's length in bytes.
    pub key_bytes: u64,
    /// The version exported (the primary).
    pub version: u32,
}

impl Library {
    /// Creates an exportable AES CMK named `name` with `role`, `key_bytes` long (16 or 32).
    /// Operator only (the CLI, the daemon's admin side): no PKCS#11 call makes one.
    pub fn generate_exportable_key(
        &self,
        s: &mut Session,
        name: &str,
        role: SecretRole,
        key_bytes: u64,
    ) -> Result<CK_OBJECT_HANDLE> {
        if !matches!(key_bytes, 16 | 32) {
            return err(CKR_ATTRIBUTE_VALUE_INVALID);
        }
        if !s.rw {
            return err(CKR_SESSION_READ_ONLY);
        }
        let usage = role.usage();
        let asked = vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Label(name.as_bytes().to_vec()),
            Attribute::ValueLen(key_bytes.into()),
            Attribute::Encrypt(usage.any(Usage::ENCRYPT)),
            Attribute::Decrypt(usage.any(Usage::DECRYPT)),
            Attribute::Sign(usage.any(Usage::SIGN)),
            Attribute::Verify(usage.any(Usage::VERIFY)),
            Attribute::Wrap(usage.any(Usage::WRAP)),
            Attribute::Unwrap(usage.any(Usage::UNWRAP)),
        ];
        let c = super::ops::Creating {
            func: "cmkp11 key create --exportable",
            op: "generate",
            cmk: true,
            label: Some(name.as_bytes()),
            id: None,
            mech: Some(CKM_AES_KEY_GEN),
        };
        let mut t = templates::secret(asked, true, false, &self.settings)
            .map_err(|r| self.refused(s, &c, r))?;
        // The only difference from any other CMK: extractable, but only under a key the
        // token's SO marked trusted.
        t.retain(|a| !matches!(a, Attribute::Extractable(_) | Attribute::WrapWithTrusted(_)));
        t.push(Attribute::Extractable(true));
        t.push(Attribute::WrapWithTrusted(true));
        self.check_identity_for(s, &c, None, Some(name.as_bytes()))?;
        let mut id = vec![0u8; 16];
        s.backend().generate_random_slice(&mut id)?;
        t.push(Attribute::Id(keystore::version_id(&id, 1)));
        self.audit_intent(s, "generate", Some(name), Some(&id), Some(CKM_AES_KEY_GEN))?;
        // The record first: a key of this kind is a version only with it (a crash in
        // between leaves an orphan record, which purge removes).
        let shell = Cmk {
            id: id.clone(),
            class: CKO_SECRET_KEY,
            label: String::new(),
            ..Cmk::default()
        };
        let now = keystore::now();
        lifecycle::write_record(s.backend(), &shell, |r| {
            r.created = now;
            r.origin = Origin::Generated;
            r.exportable = true;
        })?;
        let obj = s
            .backend()
            .generate_key(&cryptoki::mechanism::Mechanism::AesKeyGen, &t)?;
        self.stores[s.slot_id as usize].invalidate();
        let mut rec = crate::audit::Record::new("generate", CKR_OK);
        rec.mechanism = Some(CKM_AES_KEY_GEN);
        rec.key = Some(name.to_string());
        rec.key_id = Some(id.clone());
        rec.version = Some(1);
        rec.reason = Some("exportable (CKA_WRAP_WITH_TRUSTED)".into());
        let _ = self.audit_record(s, rec);
        log::warn!("CMK `{name}` created exportable (to trusted destinations only)");
        Ok(self.objects.logical(s.slot_id, &id, obj))
    }

    /// Registers destination `name`: an RSA public key (`modulus`, `exponent`) marked
    /// trusted. `s` must be logged in as the token's SO (only the SO can set
    /// `CKA_TRUSTED`; the token refuses anyone else).
    pub fn add_destination(
        &self,
        s: &Session,
        name: &str,
        modulus: &[u8],
        exponent: &[u8],
    ) -> Result<()> {
        if name.is_empty() || name.len() > 64 || name.contains(':') {
            return err(CKR_ARGUMENTS_BAD);
        }
        if self.destination(s, name)?.is_some() {
            return err(CKR_ATTRIBUTE_VALUE_INVALID);
        }
        if modulus.len() < 256 {
            // Below RSA-2048: not a destination for a 256-bit key.
            return err(CKR_KEY_SIZE_RANGE);
        }
        self.audit_intent(s, "add-destination", Some(name), None, None)?;
        let r = s
            .backend()
            .create_object(&[
                Attribute::Class(ObjectClass::PUBLIC_KEY),
                Attribute::KeyType(KeyType::RSA),
                Attribute::Token(true),
                Attribute::Private(false),
                Attribute::Modifiable(false),
                Attribute::Label(format!("{DEST_PREFIX}{name}").into_bytes()),
                Attribute::Modulus(modulus.to_vec()),
                Attribute::PublicExponent(exponent.to_vec()),
                Attribute::Wrap(true),
                Attribute::Encrypt(false),
                Attribute::Verify(false),
                Attribute::Trusted(true),
            ])
            .map_err(Error::from);
        let rv = r.as_ref().map_or_else(Error::rv, |_| CKR_OK);
        let mut rec = crate::audit::Record::new("add-destination", rv);
        rec.key = Some(name.to_string());
        rec.reason = Some(format!("RSA-{} public key, CKA_TRUSTED", modulus.len() * 8));
        let _ = self.audit_record(s, rec);
        r?;
        Ok(())
    }

    /// The trusted destinations of the token of `s`.
    pub fn destinations(&self, s: &Session) -> Result<Vec<Destination>> {
        let b = s.backend();
        let mut out = Vec::new();
        for obj in b.find_objects(&[
            Attribute::Token(true),
            Attribute::Class(ObjectClass::PUBLIC_KEY),
        ])? {
            if let Some(d) = describe(b, obj) {
                out.push(d);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Destination `name`'s object, if registered.
    fn destination(&self, s: &Session, name: &str) -> Result<Option<(ObjectHandle, Destination)>> {
        let b = s.backend();
        for obj in b.find_objects(&[
            Attribute::Token(true),
            Attribute::Class(ObjectClass::PUBLIC_KEY),
            Attribute::Label(format!("{DEST_PREFIX}{name}").into_bytes()),
        ])? {
            if let Some(d) = describe(b, obj) {
                return Ok(Some((obj, d)));
            }
        }
        Ok(None)
    }

    /// Exports the primary version of `cmk` under destination `dest`. Refused (and
    /// audited) for a key that is not exportable (`CKR_KEY_UNEXTRACTABLE`), destroyed or
    /// pending deletion (`CKR_KEY_FUNCTION_NOT_PERMITTED`), or a destination that is not
    /// registered or not trusted (`CKR_WRAPPING_KEY_HANDLE_INVALID`); the token refuses
    /// on its own what cmkp11 would let through.
    pub fn export_key(&self, s: &Session, cmk: &Cmk, dest: &str) -> Result<Exported> {
        let name = cmk.name();
        let refuse = |rv: CK_RV, why: &str| -> Result<Exported> {
            log::warn!("export of key `{name}` to `{dest}` refused: {why}");
            let mut rec = crate::audit::Record::new("export", rv);
            rec.key = Some(name.clone());
            rec.key_id = Some(cmk.id.clone());
            rec.reason = Some(format!("to destination {dest}: {why}"));
            let _ = self.audit_record(s, rec);
            err(rv)
        };
        if cmk.class != CKO_SECRET_KEY || !cmk.record().exportable {
            return refuse(
                CKR_KEY_UNEXTRACTABLE,
                "the key is not exportable (only a key created with --exportable is)",
            );
        }
        let state = cmk.state(keystore::now());
        if !matches!(state, State::Enabled | State::Disabled) {
            return refuse(
                CKR_KEY_FUNCTION_NOT_PERMITTED,
                &format!("the key is {}", state.name()),
            );
        }
        let Some((wrapping, d)) = self.destination(s, dest)? else {
            return refuse(CKR_WRAPPING_KEY_HANDLE_INVALID, "no such destination");
        };
        if !d.trusted {
            return refuse(
                CKR_WRAPPING_KEY_HANDLE_INVALID,
                "the destination is not marked trusted by the SO",
            );
        }
        let Some((version, obj)) = cmk.primary() else {
            return refuse(CKR_KEY_HANDLE_INVALID, "the key has no usable version");
        };
        self.audit_intent(
            s,
            "export",
            Some(&name),
            Some(&cmk.id),
            Some(CKM_RSA_PKCS_OAEP),
        )?;
        let mut result = Err(Error::Rv(CKR_MECHANISM_INVALID));
        let mut hash = super::admin::OaepHash::Sha256;
        for h in [super::admin::OaepHash::Sha256, super::admin::OaepHash::Sha1] {
            hash = h;
            let mut mech = super::admin::import_mechanism(h);
            let m = mech.to_cryptoki()?;
            result = s.backend().wrap_key(&m, wrapping, obj).map_err(Error::from);
            match result.as_ref().map_err(Error::rv) {
                // The token's OAEP lacks SHA-256 (SoftHSM2 2.6): SHA-1.
                Err(CKR_ARGUMENTS_BAD | CKR_MECHANISM_PARAM_INVALID) => continue,
                _ => break,
            }
        }
        let rv = result.as_ref().map_or_else(Error::rv, |_| CKR_OK);
        let hash_name = match hash {
            super::admin::OaepHash::Sha256 => "SHA-256",
            super::admin::OaepHash::Sha1 => "SHA-1",
        };
        let mut rec = crate::audit::Record::new("export", rv);
        rec.mechanism = Some(CKM_RSA_PKCS_OAEP);
        rec.key = Some(name.clone());
        rec.key_id = Some(cmk.id.clone());
        rec.version = Some(version);
        rec.reason = Some(format!("to destination {dest} (RSA-OAEP {hash_name})"));
        let _ = self.audit_record(s, rec);
        let blob = result?;
        log::warn!("CMK `{name}` version {version} exported to destination `{dest}`");
        let key_bytes = match cmk.record().value_len {
            0 => s
                .backend()
                .get_attributes(obj, &[AttributeType::ValueLen])?
                .into_iter()
                .find_map(|a| match a {
                    Attribute::ValueLen(l) => Some(u64::from(l)),
                    _ => None,
                })
                .unwrap_or(32),
            n => n,
        };
        Ok(Exported {
            blob,
            hash,
            key_bytes,
            version,
        })
    }
}

/// A destination object as a [`Destination`] (`None`: not one).
fn describe(b: &cryptoki::session::Session, obj: ObjectHandle) -> Option<Destination> {
    let attrs = b
        .get_attributes(
            obj,
            &[
                AttributeType::Label,
                AttributeType::Trusted,
                AttributeType::Modulus,
            ],
        )
        .ok()?;
    let mut name = None;
    let mut trusted = false;
    let mut bits = 0;
    for a in attrs {
        match a {
            Attribute::Label(l) => {
                name = String::from_utf8(l)
                    .ok()
                    .and_then(|l| l.strip_prefix(DEST_PREFIX).map(str::to_string));
            }
            Attribute::Trusted(t) => trusted = t,
            Attribute::Modulus(m) => bits = m.len() * 8,
            _ => {}
        }
    }
    Some(Destination {
        name: name?,
        trusted,
        bits,
    })
}
