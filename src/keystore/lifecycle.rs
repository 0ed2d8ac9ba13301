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
    // Authenticated: the HMAC of the value under the token's metadata key.
    let key = super::meta::key_for_write(s)?;
    let tag = super::meta::mac(s, key, &json)?;
    s.create_object(&[
        Attribute::Class(ObjectClass::DATA),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Modifiable(false),
        Attribute::Application(APPLICATION.as_bytes().to_vec()),
        Attribute::Label(STATE_LABEL.as_bytes().to_vec()),
        Attribute::ObjectId(tag),
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

/// Label of the rotation lock's objects (see [`RotationLock`]).
pub const LOCK_LABEL: &str = "cmkp11:lock";

/// A lock object older than this is left by a process that died holding it.
const LOCK_STALE_SECS: u64 = 30;

/// How long a rotation waits for the lock before it gives up (not done, reported so).
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(45);

/// One lock object's content.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct LockEntry {
    /// Hex of the CMK's identity.
    key: String,
    /// `choosing` (taking a number) or `ticket` (holding a number).
    kind: String,
    /// The ticket's number (0 while choosing).
    number: u64,
    /// Random: tells the holders apart and breaks ties.
    nonce: u64,
    /// Unix seconds of its creation.
    time: u64,
    /// The creating process and its host's boot id: on the same host, a lock object of
    /// a process that no longer runs is stale at once.
    #[serde(default)]
    pid: u32,
    #[serde(default)]
    host: String,
}

/// This host's boot id (empty when unknown).
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

impl LockEntry {
    fn stale(&self, t: u64, host: &str) -> bool {
        let dead = !host.is_empty()
            && self.host == host
            && self.pid != std::process::id()
            && !std::path::Path::new(&format!("/proc/{}", self.pid)).exists();
        dead || self.time + LOCK_STALE_SECS < t
    }
}

/// The rotation lock of one CMK, kept in the token itself so that it holds across
/// processes and hosts sharing the token (Lamport's bakery: each waiter takes a number
/// above every number it sees, announced by a `choosing` object while it takes it, and
/// waits until nobody is choosing and no ticket is lower than its own; tickets are token
/// objects that only their creator destroys, or anybody once stale). Version numbers are
/// then assigned by one process at a time: no two versions share a number.
pub struct RotationLock {
    ticket: cryptoki::object::ObjectHandle,
}

fn lock_template(e: &LockEntry) -> Result<Vec<Attribute>> {
    let json = serde_json::to_vec(e).map_err(|_| crate::error::Error::Rv(CKR_GENERAL_ERROR))?;
    Ok(vec![
        Attribute::Class(ObjectClass::DATA),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Modifiable(false),
        Attribute::Application(APPLICATION.as_bytes().to_vec()),
        Attribute::Label(LOCK_LABEL.as_bytes().to_vec()),
        Attribute::Value(json),
    ])
}

/// What a lock object is, as one process sees it at one moment.
enum Seen {
    /// Another key's, or stale (destroyed on the way).
    Other,
    /// A live entry of the key.
    Entry(LockEntry),
    /// Not readable (yet): another process may be writing it. Counts as someone choosing.
    Unreadable,
}

/// The live lock objects of `key` (stale ones are destroyed on the way). An object that
/// cannot be read counts as a holder choosing its number (a process may be writing it);
/// one that stays unreadable for [`LOCK_STALE_SECS`] is removed.
fn lock_entries(
    s: &Session,
    key: &str,
    unreadable: &mut std::collections::HashMap<CK_OBJECT_HANDLE, std::time::Instant>,
) -> Result<Vec<(cryptoki::object::ObjectHandle, Option<LockEntry>)>> {
    let objs = s.find_objects(&[
        Attribute::Token(true),
        Attribute::Class(ObjectClass::DATA),
        Attribute::Application(APPLICATION.as_bytes().to_vec()),
        Attribute::Label(LOCK_LABEL.as_bytes().to_vec()),
    ])?;
    let t = now();
    let host = boot_id();
    let mut out = Vec::new();
    for obj in objs {
        let seen = match s.get_attributes(obj, &[AttributeType::Value]) {
            Ok(attrs) => match attrs.into_iter().find_map(|a| match a {
                Attribute::Value(v) => Some(serde_json::from_slice::<LockEntry>(&v).ok()),
                _ => None,
            }) {
                Some(Some(e)) if e.key != key => Seen::Other,
                Some(Some(e)) if e.stale(t, &host) => {
                    log::warn!(
                        "keystore: removing a stale rotation lock of key {key} (its holder died?)"
                    );
                    let _ = s.destroy_object(obj);
                    Seen::Other
                }
                Some(Some(e)) => Seen::Entry(e),
                _ => Seen::Unreadable,
            },
            // Destroyed meanwhile, or not written completely yet.
            Err(_) => Seen::Unreadable,
        };
        match seen {
            Seen::Other => {}
            Seen::Entry(e) => {
                unreadable.remove(&obj.handle());
                out.push((obj, Some(e)));
            }
            Seen::Unreadable => {
                let first = *unreadable
                    .entry(obj.handle())
                    .or_insert_with(std::time::Instant::now);
                if first.elapsed().as_secs() > LOCK_STALE_SECS {
                    let _ = s.destroy_object(obj);
                } else {
                    out.push((obj, None));
                }
            }
        }
    }
    Ok(out)
}

impl RotationLock {
    /// Takes the rotation lock of CMK `id`, waiting for other holders.
    pub fn acquire(s: &Session, id: &[u8]) -> Result<RotationLock> {
        let key = hex(id);
        let nonce = random_u64(s)?;
        let mut entry = LockEntry {
            key: key.clone(),
            kind: "choosing".into(),
            number: 0,
            nonce,
            time: now(),
            pid: std::process::id(),
            host: boot_id(),
        };
        let mut unreadable = std::collections::HashMap::new();
        let choosing = s.create_object(&lock_template(&entry)?)?;
        let taken = (|| {
            let highest = lock_entries(s, &key, &mut unreadable)?
                .iter()
                .filter_map(|(_, e)| e.as_ref().map(|e| e.number))
                .max()
                .unwrap_or(0);
            entry.kind = "ticket".into();
            entry.number = highest + 1;
            entry.time = now();
            Ok::<_, crate::error::Error>(s.create_object(&lock_template(&entry)?)?)
        })();
        let _ = s.destroy_object(choosing);
        let ticket = taken?;
        let lock = RotationLock { ticket };
        let start = std::time::Instant::now();
        let mine = (entry.number, nonce);
        loop {
            let others = lock_entries(s, &key, &mut unreadable)?;
            let blocked = others.iter().any(|(o, e)| {
                *o != ticket
                    && e.as_ref().is_none_or(|e| {
                        e.nonce != nonce && (e.kind == "choosing" || (e.number, e.nonce) < mine)
                    })
            });
            if !blocked {
                return Ok(lock);
            }
            if start.elapsed() > LOCK_WAIT {
                log::warn!("keystore: key {key}: another rotation holds the lock; giving up");
                lock.release(s);
                return err(CKR_FUNCTION_FAILED);
            }
            // A short, random pause: two waiters do not poll in step.
            let pause = 5 + random_u64(s).unwrap_or(0) % 20;
            std::thread::sleep(std::time::Duration::from_millis(pause));
        }
    }

    /// Releases the lock (a failure leaves a ticket that turns stale).
    pub fn release(self, s: &Session) {
        if let Err(e) = s.destroy_object(self.ticket) {
            log::warn!("keystore: cannot remove a rotation lock ticket ({e}); it expires in {LOCK_STALE_SECS} s");
        }
    }
}

/// The highest version number any secret key object of CMK `cmk` carries in the token
/// now (usable or not: a number is never given twice).
fn highest_version(s: &Session, cmk: &Cmk) -> Result<u32> {
    let mut t = vec![
        Attribute::Token(true),
        Attribute::Class(ObjectClass::SECRET_KEY),
    ];
    if !cmk.label.is_empty() {
        t.push(Attribute::Label(cmk.label.as_bytes().to_vec()));
    }
    let mut highest = 0;
    for obj in s.find_objects(&t)? {
        let Ok(attrs) = s.get_attributes(obj, &[AttributeType::Id]) else {
            continue;
        };
        for a in attrs {
            if let Attribute::Id(raw) = a {
                if let (id, Some(v)) = super::split_id(&raw) {
                    if id == cmk.id.as_slice() {
                        highest = highest.max(v);
                    }
                }
            }
        }
    }
    Ok(highest)
}

/// How many secret key objects of CMK `cmk` carry version number `v` in the token now.
fn versions_numbered(s: &Session, cmk: &Cmk, v: u32) -> Result<usize> {
    Ok(s.find_objects(&[
        Attribute::Token(true),
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::Id(version_id(&cmk.id, v)),
    ])?
    .len())
}

/// `rotate`: a new version of a secret CMK, generated in the token like the primary and
/// made primary by its creation. Private keys are not rotated (make a new key).
///
/// Version numbers are assigned under the key's [`RotationLock`], from the numbers in
/// the token at that moment, so concurrent rotations (other processes, other hosts) never
/// give two versions one number. The creation of the version object is the commit: once
/// it succeeded the rotation is done and reported done, whatever happens to the records
/// that follow (a failure there is logged; the lock ticket then expires on its own).
pub fn rotate(s: &Session, cmk: &Cmk) -> Result<u32> {
    if cmk.class != CKO_SECRET_KEY {
        return err(CKR_KEY_TYPE_INCONSISTENT);
    }
    if cmk.state(now()) != State::Enabled {
        return err(NOT_ALLOWED);
    }
    let Some((_, primary)) = cmk.primary() else {
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
        .filter(|a| !matches!(a, Attribute::KeyType(_) | Attribute::Private(_)))
        .map(|a| match a {
            Attribute::ValueLen(l) if u64::from(l) == 0 && known_len > 0 => {
                Attribute::ValueLen(known_len.into())
            }
            a => a,
        })
        .collect();
    // An exportable key's versions are exportable too, to trusted destinations only.
    let exportable = cmk.record().exportable;
    t.extend([
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(key_type),
        Attribute::Token(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(exportable),
        Attribute::Derive(false),
        Attribute::Private(true),
        Attribute::Copyable(false),
        Attribute::Modifiable(false),
    ]);
    if exportable {
        t.push(Attribute::WrapWithTrusted(true));
    }
    let mut tries = 0;
    let next = loop {
        tries += 1;
        let lock = RotationLock::acquire(s, &cmk.id)?;
        let made = (|| {
            let next = highest_version(s, cmk)? + 1;
            let mut t = t.clone();
            t.push(Attribute::Id(version_id(&cmk.id, next)));
            let obj = s.generate_key(&mech, &t)?;
            Ok::<_, crate::error::Error>((next, obj))
        })();
        // Verified before the lock is released: a token that shows another process's
        // objects late (SoftHSM2's file store) could have hidden a concurrent version of
        // the same number. Then this one is withdrawn (it was never reported nor used:
        // the rotation has not returned) and the rotation starts again.
        let duplicate = match &made {
            Ok((next, obj)) => {
                versions_numbered(s, cmk, *next).is_ok_and(|n| n > 1)
                    && s.destroy_object(*obj).is_ok()
            }
            Err(_) => false,
        };
        lock.release(s);
        match made {
            Ok((next, _)) if !duplicate => break next,
            Ok((next, _)) => {
                log::warn!("key `{}`: another process made version {next} at the same time; taking the next number", cmk.name());
                if tries >= 8 {
                    return err(CKR_FUNCTION_FAILED);
                }
            }
            Err(e) => return Err(e),
        }
    };
    // Done: the version exists. The rotation time is bookkeeping for `rotate --due`.
    if let Err(e) = write_record(s, cmk, |r| r.rotated = now()) {
        log::warn!(
            "key `{}`: version {next} made, but its rotation time could not be recorded ({e}); `rotate --due` may rotate it again early",
            cmk.name()
        );
    }
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
        super::counter::forget(s, &cmk.id);
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
