//! The key that authenticates cmkp11's lifecycle records in the token: an HMAC-SHA256 key
//! (`cmkp11:meta-mac`) generated in the token, private, sensitive, never extractable, able
//! to sign and verify only, neither modifiable nor copyable. Each state record carries
//! the HMAC of its value in `CKA_OBJECT_ID`; a record that does not verify is not
//! cmkp11's and is never used (see `keystore::load`).
//!
//! Separate from the audit log's MAC key: the two authenticate different things and are
//! found by different labels.

use crate::error::{err, Result};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use cryptoki_sys::*;

/// `CKA_LABEL` of the metadata MAC key (cmkp11's namespace: no application ever gets a
/// handle to it).
pub const LABEL: &str = "cmkp11:meta-mac";

/// The metadata MAC key, if the token has one (visible to a logged-in session only).
pub fn find_key(s: &Session) -> Result<Option<ObjectHandle>> {
    Ok(s.find_objects(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::Token(true),
        Attribute::Label(LABEL.as_bytes().to_vec()),
    ])?
    .first()
    .copied())
}

/// Generates the metadata MAC key.
pub fn create_key(s: &Session) -> Result<ObjectHandle> {
    Ok(s.generate_key(
        &Mechanism::GenericSecretKeyGen,
        &[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::GENERIC_SECRET),
            Attribute::ValueLen(32.into()),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
            Attribute::Verify(true),
            Attribute::Encrypt(false),
            Attribute::Decrypt(false),
            Attribute::Wrap(false),
            Attribute::Unwrap(false),
            Attribute::Derive(false),
            Attribute::Modifiable(false),
            Attribute::Copyable(false),
            Attribute::Label(LABEL.as_bytes().to_vec()),
        ],
    )?)
}

/// The key to authenticate a record being written: the token's, or a new one on a token
/// that has no state record yet. A token with records and no key was written by an
/// earlier build: its records are unauthenticated, and only `cmkp11 key migrate` (an
/// audited operator step) makes the key and authenticates them; until then nothing is
/// written (`CKR_FUNCTION_FAILED`, with a log line saying so).
pub fn key_for_write(s: &Session) -> Result<ObjectHandle> {
    if let Some(k) = find_key(s)? {
        return Ok(k);
    }
    let records = s.find_objects(&[
        Attribute::Token(true),
        Attribute::Class(ObjectClass::DATA),
        Attribute::Application(super::APPLICATION.as_bytes().to_vec()),
        Attribute::Label(super::STATE_LABEL.as_bytes().to_vec()),
    ])?;
    if !records.is_empty() {
        log::error!("keystore: this token's lifecycle records were written by an earlier cmkp11 without authentication; run `cmkp11 key migrate` once (an audited operator step) before changing any key's state");
        return err(CKR_FUNCTION_FAILED);
    }
    create_key(s)
}

/// The HMAC of `data` under `key`.
pub fn mac(s: &Session, key: ObjectHandle, data: &[u8]) -> Result<Vec<u8>> {
    Ok(s.sign(&Mechanism::Sha256Hmac, key, data)?)
}

/// Whether `tag` is the HMAC of `data` under `key` (compared in constant time).
pub fn verifies(s: &Session, key: ObjectHandle, data: &[u8], tag: &[u8]) -> bool {
    match mac(s, key, data) {
        Ok(m) if m.len() == tag.len() => {
            m.iter().zip(tag).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
        }
        _ => false,
    }
}
