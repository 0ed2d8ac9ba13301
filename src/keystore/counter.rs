//! AES-GCM invocation counters per CMK version, kept in the token.
//!
//! NIST SP 800-38D §8.3: with random (or otherwise non-deterministic) 96-bit IVs, one key
//! may be used for at most 2^32 invocations of the authenticated encryption function.
//! cmkp11 counts the AES-GCM encryptions of each version of a secret CMK and rotates the
//! key before its limit (see `runtime::gcm_limit`).
//!
//! # Never under-count
//! A process *reserves* a block of invocations before it uses any of them: it writes a
//! record saying "reserved up to N" into the token, and only then counts up to N in
//! memory. A process killed at any moment has used at most what the token records, so
//! after a crash or restart the count starts at the recorded reservation: it may
//! over-count (the unused rest of a block), never under-count. Reservations of several
//! processes (library mode, several hosts on one HSM) are serialized by the key's token
//! lock ([`super::lifecycle::RotationLock`] on a derived identity), so two never get the
//! same block.
//!
//! # Records
//! A private, non-modifiable data object (`CKA_APPLICATION` "cmkp11", `CKA_LABEL`
//! [`COUNTER_LABEL`]) holding a JSON [`CounterRecord`]. A reservation creates the new
//! record first and then destroys the older ones of the same key and version, so a crash
//! between the two leaves both, and readers take the highest. The records are as safe as
//! the state records: private objects, which only the token PIN's holder can read, write
//! or delete (in service mode: only `cmkp11d`); an application never gets a handle to
//! them (reserved label).

use super::{hex, lifecycle::RotationLock, APPLICATION};
use crate::error::{Error, Result};
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use cryptoki_sys::*;
use serde::{Deserialize, Serialize};

/// Label of the counter records.
pub const COUNTER_LABEL: &str = "cmkp11:gcm-count";

/// One counter record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterRecord {
    /// Hex of the CMK's identity.
    pub key: String,
    /// The version counted.
    pub version: u32,
    /// Invocations reserved so far (used, or given to a process that may use them).
    pub reserved: u64,
}

/// The identity the reservation lock is taken on (not the key's own rotation lock: a
/// rotation may start while a reservation is held).
fn lock_id(id: &[u8]) -> Vec<u8> {
    [id, b"#gcm-count"].concat()
}

fn template(r: &CounterRecord) -> Result<Vec<Attribute>> {
    let json = serde_json::to_vec(r).map_err(|_| Error::Rv(CKR_GENERAL_ERROR))?;
    Ok(vec![
        Attribute::Class(ObjectClass::DATA),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Modifiable(false),
        Attribute::Application(APPLICATION.as_bytes().to_vec()),
        Attribute::Label(COUNTER_LABEL.as_bytes().to_vec()),
        Attribute::Value(json),
    ])
}

/// Every readable counter record of the token with its object.
fn records(s: &Session) -> Result<Vec<(ObjectHandle, CounterRecord)>> {
    let objs = s.find_objects(&[
        Attribute::Token(true),
        Attribute::Class(ObjectClass::DATA),
        Attribute::Application(APPLICATION.as_bytes().to_vec()),
        Attribute::Label(COUNTER_LABEL.as_bytes().to_vec()),
    ])?;
    let mut out = Vec::new();
    for obj in objs {
        let Ok(attrs) = s.get_attributes(obj, &[AttributeType::Value]) else {
            continue;
        };
        if let Some(r) = attrs.into_iter().find_map(|a| match a {
            Attribute::Value(v) => serde_json::from_slice::<CounterRecord>(&v).ok(),
            _ => None,
        }) {
            out.push((obj, r));
        }
    }
    Ok(out)
}

/// The invocations reserved so far for version `version` of CMK `id` (0: none).
pub fn reserved(s: &Session, id: &[u8], version: u32) -> Result<u64> {
    let key = hex(id);
    Ok(records(s)?
        .into_iter()
        .filter(|(_, r)| r.key == key && r.version == version)
        .map(|(_, r)| r.reserved)
        .max()
        .unwrap_or(0))
}

/// Reserves up to `block` more invocations of version `version` of CMK `id`, never past
/// `limit`: returns the range `start..end` now this process's (empty when the limit is
/// reached). `s` must be a read-write session of a logged-in user.
pub fn reserve(s: &Session, id: &[u8], version: u32, block: u64, limit: u64) -> Result<(u64, u64)> {
    let lock = RotationLock::acquire(s, &lock_id(id))?;
    let done = (|| {
        let key = hex(id);
        let mine: Vec<_> = records(s)?
            .into_iter()
            .filter(|(_, r)| r.key == key && r.version == version)
            .collect();
        let start = mine.iter().map(|(_, r)| r.reserved).max().unwrap_or(0);
        let end = start.saturating_add(block).min(limit.max(start));
        if end == start {
            return Ok((start, end));
        }
        s.create_object(&template(&CounterRecord {
            key,
            version,
            reserved: end,
        })?)?;
        for (obj, _) in mine {
            // A failure leaves an older, lower record: harmless (readers take the highest).
            let _ = s.destroy_object(obj);
        }
        Ok((start, end))
    })();
    lock.release(s);
    done
}

/// Destroys the counter records of CMK `id` (its key objects are gone: purge).
pub fn forget(s: &Session, id: &[u8]) {
    let key = hex(id);
    if let Ok(recs) = records(s) {
        for (obj, r) in recs {
            if r.key == key {
                let _ = s.destroy_object(obj);
            }
        }
    }
}
