//! Lifecycle steps: rotate, disable, enable, schedule and cancel deletion, purge. Each is
//! crash-safe: its commit is the creation of one token object (a version or a state
//! record); clean-up of what it supersedes comes after and may be redone by any purge.

use super::{
    hex, now, version_id, Cmk, Origin, State, StateRecord, View, APPLICATION, STATE_LABEL,
};
use crate::error::{err, Result};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass};
use cryptoki::session::Session;
use cryptoki_sys::*;

/// A lifecycle step that the key's state does not allow (e.g. enabling a key pending
/// deletion: cancel first).
pub const NOT_ALLOWED: CK_RV = CKR_ACTION_PROHIBITED;

fn random_u64(s: &Session) -> Result<u64> {
    let mut b = [0u8; 8];
    s.generate_random_slice(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// Writes the next state record of `cmk` (made by `change` from the one in force), then
/// removes the records it supersedes.
pub fn write_record(
    s: &Session,
    cmk: &Cmk,
    change: impl FnOnce(&mut StateRecord),
) -> Result<StateRecord> {
    let mut r = cmk.record();
    change(&mut r);
    r.generation += 1;
    r.nonce = random_u64(s)?;
    r.updated = now();
    let json = serde_json::to_vec(&r).map_err(|_| crate::error::Error::Rv(CKR_GENERAL_ERROR))?;
    s.create_object(&[
        Attribute::Class(ObjectClass::DATA),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Modifiable(false),
        Attribute::Application(APPLICATION.as_bytes().to_vec()),
        Attribute::Label(STATE_LABEL.as_bytes().to_vec()),
        Attribute::Value(json),
    ])?;
    for old in &cmk.record_objects {
        // A failure here leaves an older generation behind: harmless, readers take the
        // newest, and the next write or purge removes it.
        let _ = s.destroy_object(*old);
    }
    Ok(r)
}

/// Records the origin of a freshly created CMK (imported keys only; generated is the
/// default).
pub fn set_origin(s: &Session, cmk: &Cmk, origin: Origin) -> Result<StateRecord> {
    write_record(s, cmk, |r| r.origin = origin)
}

/// `disable`: enabled -> disabled.
pub fn disable(s: &Session, cmk: &Cmk) -> Result<StateRecord> {
    match cmk.state(now()) {
        State::Enabled | State::Disabled => write_record(s, cmk, |r| r.state = State::Disabled),
        State::PendingDeletion | State::Destroyed => err(NOT_ALLOWED),
    }
}

/// `enable`: disabled -> enabled.
pub fn enable(s: &Session, cmk: &Cmk) -> Result<StateRecord> {
    match cmk.state(now()) {
        State::Enabled | State::Disabled => write_record(s, cmk, |r| r.state = State::Enabled),
        State::PendingDeletion | State::Destroyed => err(NOT_ALLOWED),
    }
}

/// `schedule-deletion`: enabled or disabled -> pending deletion in `days` days.
pub fn schedule_deletion(s: &Session, cmk: &Cmk, days: u32) -> Result<StateRecord> {
    match cmk.state(now()) {
        State::Enabled | State::Disabled => write_record(s, cmk, |r| {
            r.state = State::PendingDeletion;
            r.deletion_date = now() + u64::from(days) * 86_400;
        }),
        State::PendingDeletion | State::Destroyed => err(NOT_ALLOWED),
    }
}

/// `cancel-deletion`: pending deletion -> disabled.
pub fn cancel_deletion(s: &Session, cmk: &Cmk) -> Result<StateRecord> {
    match cmk.state(now()) {
        State::PendingDeletion => write_record(s, cmk, |r| {
            r.state = State::Disabled;
            r.deletion_date = 0;
        }),
        State::Enabled | State::Disabled | State::Destroyed => err(NOT_ALLOWED),
    }
}

/// `rotate`: a new version of a secret CMK, generated in the token like the primary and
/// made primary by its creation. Private keys are not rotated (make a new key).
pub fn rotate(s: &Session, cmk: &Cmk) -> Result<u32> {
    if cmk.class != CKO_SECRET_KEY {
        return err(CKR_KEY_TYPE_INCONSISTENT);
    }
    if cmk.state(now()) != State::Enabled {
        return err(NOT_ALLOWED);
    }
    let Some((v, primary)) = cmk.primary() else {
        return err(CKR_OBJECT_HANDLE_INVALID);
    };
    use AttributeType as T;
    let attrs = s.get_attributes(
        primary,
        &[
            T::KeyType,
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
    )?;
    let key_type = attrs
        .iter()
        .find_map(|a| match a {
            Attribute::KeyType(k) => Some(*k),
            _ => None,
        })
        .unwrap_or(KeyType::AES);
    let mech = if key_type == KeyType::AES {
        Mechanism::AesKeyGen
    } else {
        Mechanism::GenericSecretKeyGen
    };
    let known_len = cmk.record().value_len;
    let mut t: Vec<Attribute> = attrs
        .into_iter()
        .filter(|a| !matches!(a, Attribute::KeyType(_)))
        .map(|a| match a {
            Attribute::ValueLen(l) if u64::from(l) == 0 && known_len > 0 => {
                Attribute::ValueLen(known_len.into())
            }
            a => a,
        })
        .collect();
    let next = v + 1;
    t.extend([
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(key_type),
        Attribute::Token(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Derive(false),
        Attribute::Id(version_id(&cmk.id, next)),
    ]);
    s.generate_key(&mech, &t)?;
    write_record(s, cmk, |r| r.rotated = now())?;
    Ok(next)
}

/// `purge`: destroys every key whose deletion date has passed (and clears what an
/// interrupted purge left). The record is first set to destroyed, so a purge killed
/// half-way leaves a key that is already gone for everybody, and the next purge finishes.
/// It also destroys the torn key objects a killed creation left (see [`super::torn`]),
/// each logged at warn level; any other unusable key object is left alone. Returns the
/// names of the keys destroyed (torn objects are no key and are not listed).
pub fn purge(s: &Session, view: &View) -> Result<Vec<String>> {
    let t = now();
    let mut purged = Vec::new();
    for cmk in view.cmks.values() {
        if cmk.state(t) != State::Destroyed {
            continue;
        }
        let mut marked = cmk.clone();
        if cmk.record().state != State::Destroyed {
            let r = write_record(s, cmk, |r| r.state = State::Destroyed)?;
            marked.record = Some(r);
        }
        for (_, obj) in &cmk.versions {
            s.destroy_object(*obj)?;
        }
        // The destroyed record goes last: until then a crash leaves a destroyed key.
        let records = s.find_objects(&[
            Attribute::Token(true),
            Attribute::Class(ObjectClass::DATA),
            Attribute::Application(APPLICATION.as_bytes().to_vec()),
            Attribute::Label(STATE_LABEL.as_bytes().to_vec()),
        ])?;
        for obj in records {
            let mine = s
                .get_attributes(obj, &[AttributeType::Value])?
                .into_iter()
                .any(|a| matches!(a, Attribute::Value(v) if serde_json::from_slice::<StateRecord>(&v).is_ok_and(|r| r.key == hex(&cmk.id))));
            if mine {
                s.destroy_object(obj)?;
            }
        }
        purged.push(cmk.name());
    }
    for obj in &view.orphan_records {
        let _ = s.destroy_object(*obj);
    }
    destroy_torn(s, view);
    Ok(purged)
}

/// Destroys the unusable key objects of `view` that are torn.
fn destroy_torn(s: &Session, view: &View) {
    for u in &view.unusable {
        let version = u
            .version
            .map_or_else(|| "untagged".into(), |v| v.to_string());
        if !super::torn(s, u.obj) {
            log::warn!(
                "keystore: key `{}` version {version}: left alone a key object the token cannot use but that is not torn (its value is not known to be empty)",
                u.name
            );
            continue;
        }
        match s.destroy_object(u.obj) {
            Ok(()) => {
                log::warn!(
                    "keystore: key `{}` version {version}: destroyed a torn key object (its creation was cut short: the token holds no value for it); the key's other versions are untouched",
                    u.name
                );
            }
            Err(e) => log::warn!(
                "keystore: key `{}` version {version}: cannot destroy a torn key object: {e}",
                u.name
            ),
        }
    }
}
