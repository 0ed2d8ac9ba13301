//! The benchmark cases: what one timed call is, and what is prepared around it.
//!
//! Every case is written once, against `cryptoki`, and both modules run exactly this code.

use crate::timing::{drive, Phases, ThreadSamples};
use crate::{labels, BenchError};
use cryptoki::context::Pkcs11;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use cryptoki::slot::Slot;

/// One benchmark case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Case {
    AesGcm4kEncrypt,
    AesGcm4kDecrypt,
    AesKwpWrap,
    AesKwpUnwrap,
    AesKeygen,
    Rsa2048Sign,
    EcdsaP256Sign,
    FindByLabel,
    OpenCloseSession,
    /// `aes-kwp-unwrap` with a template silent on the usages the key must not have (SIGN,
    /// VERIFY, WRAP, UNWRAP, DERIVE): not in the default run. SoftHSM2 then makes a key
    /// that also wraps, unwraps, signs and verifies, while cmkp11's policy completes the
    /// template so that it does not; the ratio includes the token's cost of those
    /// attributes (see [`Case::AesKeygenPartial`]).
    AesKwpUnwrapPartial,
    /// `aes-keygen` with the template of [`Case::AesKwpUnwrapPartial`]: not in the default
    /// run.
    AesKeygenPartial,
}

impl Case {
    /// All cases, in report order.
    pub const ALL: [Case; 9] = [
        Case::AesGcm4kEncrypt,
        Case::AesGcm4kDecrypt,
        Case::AesKwpWrap,
        Case::AesKwpUnwrap,
        Case::AesKeygen,
        Case::Rsa2048Sign,
        Case::EcdsaP256Sign,
        Case::FindByLabel,
        Case::OpenCloseSession,
    ];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Case::AesGcm4kEncrypt => "aes-gcm-4k-encrypt",
            Case::AesGcm4kDecrypt => "aes-gcm-4k-decrypt",
            Case::AesKwpWrap => "aes-kwp-wrap",
            Case::AesKwpUnwrap => "aes-kwp-unwrap",
            Case::AesKeygen => "aes-keygen",
            Case::Rsa2048Sign => "rsa2048-sign",
            Case::EcdsaP256Sign => "ecdsa-p256-sign",
            Case::FindByLabel => "find-by-label",
            Case::OpenCloseSession => "open-close-session",
            Case::AesKwpUnwrapPartial => "aes-kwp-unwrap-partial",
            Case::AesKeygenPartial => "aes-keygen-partial",
        }
    }

    /// Parses a command-line name (the default cases and the extra ones).
    pub fn from_name(s: &str) -> Option<Case> {
        Case::ALL
            .iter()
            .chain([Case::AesKwpUnwrapPartial, Case::AesKeygenPartial].iter())
            .copied()
            .find(|c| c.name() == s)
    }
}

/// Finds exactly one object by label (setup/preparation, never timed).
pub fn find_one(session: &Session, label: &str) -> Result<ObjectHandle, BenchError> {
    let found = session.find_objects(&[Attribute::Label(label.as_bytes().to_vec())])?;
    match found.as_slice() {
        [h] => Ok(*h),
        [] => Err(BenchError::msg(format!(
            "token object {label:?} not found (did the setup step run?)"
        ))),
        _ => Err(BenchError::msg(format!(
            "{} token objects labelled {label:?}, expected one",
            found.len()
        ))),
    }
}

/// Template of an AES session key for data (a DEK in cmkp11's terms: sensitive,
/// extractable only if it is to be wrapped; accepted by cmkp11's policy and by SoftHSM2
/// alike).
///
/// `complete`: every usage flag is stated, so that both modules make the same key (an
/// encrypt/decrypt key that cannot sign, verify, wrap, unwrap or derive). Without them,
/// SoftHSM2 used directly turns on SIGN, VERIFY, WRAP and UNWRAP by default, while
/// cmkp11's policy sends the token the complete template: the two would then not make the
/// same key, and the ratio would also measure the token's cost of the five attributes
/// (the `-partial` extra cases measure exactly that).
fn session_aes_template(extractable: bool, complete: bool) -> Vec<Attribute> {
    let mut t = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(extractable),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
    ];
    if complete {
        t.extend([
            Attribute::Sign(false),
            Attribute::Verify(false),
            Attribute::Wrap(false),
            Attribute::Unwrap(false),
            Attribute::Derive(false),
        ]);
    }
    t
}

/// Runs `case` in the calling thread with its own session; returns the timed samples.
///
/// All threads of the worker meet at the barriers in `phases` (after preparation and after
/// the warm-up), so the measured windows overlap.
pub fn run_thread(
    ctx: &Pkcs11,
    slot: Slot,
    case: Case,
    phases: &Phases,
) -> Result<ThreadSamples, BenchError> {
    let session = ctx.open_rw_session(slot)?;
    let s = &session;
    match case {
        Case::AesGcm4kEncrypt | Case::AesGcm4kDecrypt => {
            let key = find_one(s, labels::AES)?;
            let mut iv = [0x24u8; 12];
            let aad = [0u8; 0];
            let mech = Mechanism::AesGcm(GcmParams::new(&mut iv, &aad, 128.into())?);
            let plain = vec![0x5au8; 4096];
            if case == Case::AesGcm4kEncrypt {
                drive(
                    phases,
                    || s.encrypt(&mech, key, &plain),
                    |ct| {
                        if ct.len() != plain.len() + 16 {
                            return Err(BenchError::msg("unexpected GCM ciphertext length"));
                        }
                        Ok(())
                    },
                )
            } else {
                let ct = s.encrypt(&mech, key, &plain)?;
                drive(
                    phases,
                    || s.decrypt(&mech, key, &ct),
                    |pt| {
                        if pt.len() != plain.len() {
                            return Err(BenchError::msg("unexpected GCM plaintext length"));
                        }
                        Ok(())
                    },
                )
            }
        }
        Case::AesKwpWrap | Case::AesKwpUnwrap | Case::AesKwpUnwrapPartial => {
            let wrap_key = find_one(s, labels::WRAP)?;
            let mut gen_template = session_aes_template(true, true);
            gen_template.push(Attribute::ValueLen(32.into()));
            let target = s.generate_key(&Mechanism::AesKeyGen, &gen_template)?;
            let mech = Mechanism::AesKeyWrapPad;
            if case == Case::AesKwpWrap {
                drive(
                    phases,
                    || s.wrap_key(&mech, wrap_key, target),
                    |w| {
                        if w.len() != 40 {
                            return Err(BenchError::msg("unexpected KWP output length"));
                        }
                        Ok(())
                    },
                )
            } else {
                let wrapped = s.wrap_key(&mech, wrap_key, target)?;
                let template = session_aes_template(false, case == Case::AesKwpUnwrap);
                drive(
                    phases,
                    || s.unwrap_key(&mech, wrap_key, &wrapped, &template),
                    |h| Ok(s.destroy_object(h)?),
                )
            }
        }
        Case::AesKeygen | Case::AesKeygenPartial => {
            let mut template = session_aes_template(false, case == Case::AesKeygen);
            template.push(Attribute::ValueLen(32.into()));
            drive(
                phases,
                || s.generate_key(&Mechanism::AesKeyGen, &template),
                |h| Ok(s.destroy_object(h)?),
            )
        }
        Case::Rsa2048Sign => {
            let key = find_one(s, labels::RSA)?;
            let msg = [0x42u8; 64];
            drive(
                phases,
                || s.sign(&Mechanism::Sha256RsaPkcs, key, &msg),
                |sig| {
                    if sig.len() != 256 {
                        return Err(BenchError::msg("unexpected RSA signature length"));
                    }
                    Ok(())
                },
            )
        }
        Case::EcdsaP256Sign => {
            let key = find_one(s, labels::EC)?;
            let digest = [0x17u8; 32];
            drive(
                phases,
                || s.sign(&Mechanism::Ecdsa, key, &digest),
                |sig| {
                    if sig.len() != 64 {
                        return Err(BenchError::msg("unexpected ECDSA signature length"));
                    }
                    Ok(())
                },
            )
        }
        Case::FindByLabel => {
            let expected = find_one(s, labels::FIND_TARGET)?;
            let template = [Attribute::Label(labels::FIND_TARGET.as_bytes().to_vec())];
            drive(
                phases,
                || s.find_objects(&template),
                |found| {
                    if found.len() != 1 || found[0] != expected {
                        return Err(BenchError::msg("find-by-label: unexpected result"));
                    }
                    Ok(())
                },
            )
        }
        Case::OpenCloseSession => drive(phases, || ctx.open_ro_session(slot)?.close(), |()| Ok(())),
    }
}
