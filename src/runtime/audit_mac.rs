//! The token side of the audit log ([`crate::audit::TokenMac`]): an HMAC-SHA256 key that
//! never leaves the token (`cmkp11:audit-mac`, generated on first use) and the checkpoint
//! data object (`cmkp11:audit-checkpoint`), both private token objects of the first slot,
//! reached through a backend session of their own (never an application's).

use crate::audit::TokenMac;
use crate::keystore::APPLICATION;
use cryptoki::context::Pkcs11;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use cryptoki::slot::Slot;
use parking_lot::Mutex;

/// Label of the audit MAC key.
pub const MAC_LABEL: &str = "cmkp11:audit-mac";
/// Label of the checkpoint object.
pub const CHECKPOINT_LABEL: &str = "cmkp11:audit-checkpoint";

struct Open {
    s: Session,
    /// `None` only for a read-only verifier on a token without the key.
    key: Option<ObjectHandle>,
}

/// [`TokenMac`] over a dedicated backend session.
pub struct TokenAuditMac {
    ctx: Pkcs11,
    slot: Slot,
    open: Mutex<Option<Open>>,
    /// Never generate the key (a verifier must not change the token).
    read_only: bool,
    /// Whether the key was found at the first connection (not made by this object).
    existed: Mutex<Option<bool>>,
    /// The `CKA_OBJECT_ID` of this log's checkpoint objects ([`log_id`]), when set.
    log: Option<Vec<u8>>,
}

/// The identity of an audit log among those sharing a token (hosts of a fleet, each with
/// its own log; its key's `CKA_ID`, its checkpoint's `CKA_OBJECT_ID`): 16 bytes of SHA-256 over the host name and the log's absolute path, as
/// the DER of the UUID-form object identifier 2.25.N (X.667), since a data object's type
/// is named by `CKA_OBJECT_ID`. Each log keeps its own checkpoint object (with this
/// `CKA_OBJECT_ID`), so that one host's checkpoint never stands for another host's log.
pub fn log_id(file: &std::path::Path) -> Vec<u8> {
    let n = u128::from_be_bytes(log_hash(file));
    // Base-128 digits of N, most significant first, all but the last with bit 7 set.
    let mut digits = Vec::new();
    let mut rest = n;
    loop {
        digits.push((rest & 0x7f) as u8);
        rest >>= 7;
        if rest == 0 {
            break;
        }
    }
    digits.reverse();
    let last = digits.len() - 1;
    for d in &mut digits[..last] {
        *d |= 0x80;
    }
    // Tag 6 (OID), length, first octet 2 * 40 + 25.
    let mut der = vec![0x06, (digits.len() + 1) as u8, 2 * 40 + 25];
    der.extend(digits);
    der
}

fn log_hash(file: &std::path::Path) -> [u8; 16] {
    use sha2::Digest;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let path = std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf());
    let mut h = sha2::Sha256::new();
    h.update(b"cmkp11 audit log\0");
    h.update(host.trim().as_bytes());
    h.update(b"\0");
    h.update(path.as_os_str().as_encoded_bytes());
    let mut out = [0u8; 16];
    out.copy_from_slice(&h.finalize()[..16]);
    out
}

fn rv(e: cryptoki::error::Error) -> u64 {
    crate::backend::rv::from_cryptoki(&e)
}

impl TokenAuditMac {
    /// The audit key of `slot`'s token.
    pub fn new(ctx: Pkcs11, slot: Slot) -> TokenAuditMac {
        TokenAuditMac {
            ctx,
            slot,
            open: Mutex::new(None),
            read_only: false,
            existed: Mutex::new(None),
            log: None,
        }
    }

    /// The same, for the log in `file` (its own checkpoint: see [`log_id`]).
    pub fn for_log(self, file: &std::path::Path) -> TokenAuditMac {
        TokenAuditMac {
            log: Some(log_id(file)),
            ..self
        }
    }

    /// The audit key of `slot`'s token for a verifier: never made when missing (a MAC
    /// then fails with `CKR_KEY_HANDLE_INVALID`).
    pub fn read_only(ctx: Pkcs11, slot: Slot) -> TokenAuditMac {
        TokenAuditMac {
            read_only: true,
            ..TokenAuditMac::new(ctx, slot)
        }
    }

    /// Closes the session (reopened on the next use).
    pub fn disconnect(&self) {
        *self.open.lock() = None;
    }

    fn connect(&self) -> cryptoki::error::Result<Open> {
        let s = self.ctx.open_rw_session(self.slot)?;
        let label = Attribute::Label(MAC_LABEL.as_bytes().to_vec());
        // A log of its own has a key of its own (`CKA_ID` = the log's identity), so that
        // "the key made MACs before" speaks of this log only.
        let mut find = vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Token(true),
            label.clone(),
        ];
        if let Some(id) = &self.log {
            find.push(Attribute::Id(id.clone()));
        }
        let found = s.find_objects(&find)?;
        self.existed.lock().get_or_insert(!found.is_empty());
        let key = match found.first() {
            Some(k) => *k,
            None if self.read_only => return Ok(Open { s, key: None }),
            // Needs a logged-in application (login state is shared by its sessions);
            // before that the auditor keeps records chained and asks again later.
            None => s.generate_key(
                &Mechanism::GenericSecretKeyGen,
                &[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(cryptoki::object::KeyType::GENERIC_SECRET),
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
                    // Nobody, not even an application opening the token directly with
                    // the PIN, may relabel it out of cmkp11's namespace or copy it.
                    Attribute::Modifiable(false),
                    Attribute::Copyable(false),
                    Attribute::Id(self.log.clone().unwrap_or_default()),
                    label,
                ],
            )?,
        };
        Ok(Open { s, key: Some(key) })
    }

    fn with<R>(&self, f: impl Fn(&Open) -> cryptoki::error::Result<R>) -> Result<R, u64> {
        let mut g = self.open.lock();
        let fresh = g.is_none();
        if fresh {
            *g = Some(self.connect().map_err(rv)?);
        }
        let mut r = f(g.as_ref().expect("connected above"));
        if r.is_err() && !fresh {
            // A logout and a new login invalidate the session's handle of the (private)
            // key, or a logout closed the session: connect again and retry once.
            *g = None;
            *g = Some(self.connect().map_err(rv)?);
            r = f(g.as_ref().expect("connected above"));
        }
        if r.is_err() {
            *g = None;
        }
        r.map_err(rv)
    }

    /// The checkpoint objects with their generation (the first 8 bytes of the value).
    /// A store creates the next generation and then destroys the older ones (a token may
    /// refuse to modify `CKA_VALUE` in place, as SoftHSM2 does), so a crash in between
    /// leaves two, and the newest counts.
    fn checkpoints(
        &self,
        s: &Session,
    ) -> cryptoki::error::Result<Vec<(u64, ObjectHandle, Vec<u8>)>> {
        let mut t = vec![
            Attribute::Class(ObjectClass::DATA),
            Attribute::Token(true),
            Attribute::Application(APPLICATION.as_bytes().to_vec()),
            Attribute::Label(CHECKPOINT_LABEL.as_bytes().to_vec()),
        ];
        if let Some(id) = &self.log {
            t.push(Attribute::ObjectId(id.clone()));
        }
        let objs = s.find_objects(&t)?;
        let mut out = Vec::new();
        for obj in objs {
            let value = s
                .get_attributes(obj, &[AttributeType::Value])?
                .into_iter()
                .find_map(|a| match a {
                    Attribute::Value(v) => Some(v),
                    _ => None,
                })
                .unwrap_or_default();
            let generation = value
                .get(..8)
                .map_or(0, |g| u64::from_be_bytes(g.try_into().unwrap_or_default()));
            out.push((generation, obj, value.get(8..).unwrap_or_default().to_vec()));
        }
        out.sort_by_key(|(g, _, _)| *g);
        Ok(out)
    }
}

impl TokenMac for TokenAuditMac {
    fn mac(&self, data: &[u8]) -> Result<Vec<u8>, u64> {
        self.with(|o| match o.key {
            Some(k) => o.s.sign(&Mechanism::Sha256Hmac, k, data),
            None => Err(cryptoki::error::Error::Pkcs11(
                cryptoki::error::RvError::KeyHandleInvalid,
                cryptoki::context::Function::Sign,
            )),
        })
    }

    fn load_checkpoint(&self) -> Result<Option<Vec<u8>>, u64> {
        self.with(|o| {
            // The checkpoint is a private object: a session that is not logged in (the
            // application's last session closed) sees none, which must not read as "the
            // checkpoint was destroyed".
            use cryptoki::session::SessionState as S;
            match o.s.get_session_info()?.session_state() {
                S::RoUser | S::RwUser => {}
                _ => {
                    return Err(cryptoki::error::Error::Pkcs11(
                        cryptoki::error::RvError::UserNotLoggedIn,
                        cryptoki::context::Function::FindObjects,
                    ))
                }
            }
            Ok(self.checkpoints(&o.s)?.pop().map(|(_, _, v)| v))
        })
    }

    fn key_existed(&self) -> Result<bool, u64> {
        if let Some(e) = *self.existed.lock() {
            return Ok(e);
        }
        self.with(|_| Ok(()))?;
        Ok(self.existed.lock().unwrap_or(false))
    }

    fn store_checkpoint(&self, data: &[u8]) -> Result<(), u64> {
        self.with(|o| {
            let old = self.checkpoints(&o.s)?;
            let next = old.last().map_or(1, |(g, _, _)| g + 1);
            let mut t = vec![
                Attribute::Class(ObjectClass::DATA),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Modifiable(false),
                Attribute::Application(APPLICATION.as_bytes().to_vec()),
                Attribute::Label(CHECKPOINT_LABEL.as_bytes().to_vec()),
                Attribute::Value([&next.to_be_bytes()[..], data].concat()),
            ];
            if let Some(id) = &self.log {
                t.push(Attribute::ObjectId(id.clone()));
            }
            o.s.create_object(&t)?;
            for (_, obj, _) in old {
                let _ = o.s.destroy_object(obj);
            }
            Ok(())
        })
    }
}
