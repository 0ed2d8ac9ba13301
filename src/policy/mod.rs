//! The CMK policy: pure decisions, no I/O and no pointers.
//!
//! The threat: an attacker who has the user PIN and may call any PKCS#11 function with any
//! template. Every rule here exists to stop a published key-extraction attack (see the
//! README's "Security model"). The inputs are facts cmkp11 knows about objects
//! ([`KeyInfo`], read from immutable attributes of objects it created under these rules)
//! and the application's request; the output is the template to send to the backend or
//! the `CK_RV` of the refusal.

pub mod access;
pub mod mechanisms;
pub mod rate;
pub mod templates;

use cryptoki_sys::*;

/// What cmkp11 makes of an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// A customer master key: a secret token key, or any private key.
    Cmk,
    /// A data encryption key: a secret session key.
    Dek,
    /// Public keys, certificates, data objects: passed through.
    Public,
}

/// Usage flags of a key, as a bit set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage(pub u8);

impl Usage {
    /// `CKA_ENCRYPT`
    pub const ENCRYPT: Usage = Usage(1);
    /// `CKA_DECRYPT`
    pub const DECRYPT: Usage = Usage(2);
    /// `CKA_SIGN`
    pub const SIGN: Usage = Usage(4);
    /// `CKA_VERIFY`
    pub const VERIFY: Usage = Usage(8);
    /// `CKA_WRAP`
    pub const WRAP: Usage = Usage(16);
    /// `CKA_UNWRAP`
    pub const UNWRAP: Usage = Usage(32);
    /// `CKA_DERIVE`
    pub const DERIVE: Usage = Usage(64);

    /// Whether any flag of `other` is set.
    pub fn any(self, other: Usage) -> bool {
        self.0 & other.0 != 0
    }

    /// The union.
    pub fn with(self, other: Usage) -> Usage {
        Usage(self.0 | other.0)
    }
}

/// The role of a secret key (fixed at creation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretRole {
    /// WRAP + UNWRAP: AES key wrap only.
    Wrap,
    /// ENCRYPT + DECRYPT.
    Data,
    /// SIGN + VERIFY (HMAC, CMAC).
    Mac,
}

impl SecretRole {
    /// The usage flags of the role.
    pub fn usage(self) -> Usage {
        match self {
            SecretRole::Wrap => Usage::WRAP.with(Usage::UNWRAP),
            SecretRole::Data => Usage::ENCRYPT.with(Usage::DECRYPT),
            SecretRole::Mac => Usage::SIGN.with(Usage::VERIFY),
        }
    }

    /// Parses the config's `keys.default_role`.
    pub fn parse(s: &str) -> Option<SecretRole> {
        match s {
            "wrap" => Some(SecretRole::Wrap),
            "data" => Some(SecretRole::Data),
            "mac" => Some(SecretRole::Mac),
            _ => None,
        }
    }

    /// The role a set of usage flags amounts to: `None` when it is empty, or mixes roles,
    /// or holds DERIVE (a secret key is never a derivation base).
    pub fn of(u: Usage) -> Option<SecretRole> {
        let any = |r: SecretRole| u.any(r.usage());
        match (
            u.any(Usage::DERIVE),
            any(Self::Wrap),
            any(Self::Data),
            any(Self::Mac),
        ) {
            (false, true, false, false) => Some(SecretRole::Wrap),
            (false, false, true, false) => Some(SecretRole::Data),
            (false, false, false, true) => Some(SecretRole::Mac),
            _ => None,
        }
    }
}

/// Facts about a key that decisions rest on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyInfo {
    /// `CKA_CLASS`.
    pub class: CK_OBJECT_CLASS,
    /// `CKA_KEY_TYPE` (`CK_UNAVAILABLE_INFORMATION` for non-keys).
    pub key_type: CK_KEY_TYPE,
    /// `CKA_TOKEN`.
    pub token: bool,
    /// `CKA_SENSITIVE`.
    pub sensitive: bool,
    /// `CKA_EXTRACTABLE`.
    pub extractable: bool,
    /// `CKA_LOCAL`: generated in the token.
    pub local: bool,
    /// Usage flags.
    pub usage: Usage,
    /// `CKA_VALUE_LEN` in bytes for secret keys (0 if unknown).
    pub value_len: u64,
    /// `CKA_LABEL`.
    pub label: String,
    /// Imported in plaintext under the test switch (treated as generated then).
    pub imported_plaintext: bool,
    /// `CKA_ID` as stored in the token.
    pub raw_id: Vec<u8>,
    /// `CKA_ALWAYS_SENSITIVE` (kept by the token: never readable since creation).
    pub always_sensitive: bool,
    /// `CKA_NEVER_EXTRACTABLE` (kept by the token: never extractable since creation).
    pub never_extractable: bool,
    /// `CKA_LABEL` is valid UTF-8 (so [`KeyInfo::label`] is exact, not a lossy copy).
    pub label_exact: bool,
}

impl KeyInfo {
    /// The class cmkp11 gives this object.
    pub fn class(&self) -> Class {
        match (self.class, self.token) {
            (CKO_SECRET_KEY, true) | (CKO_PRIVATE_KEY, _) => Class::Cmk,
            (CKO_SECRET_KEY, false) => Class::Dek,
            _ => Class::Public,
        }
    }

    /// Whether the token vouches that the key was made inside it and never left it in
    /// the clear: generated there (`CKA_LOCAL`), sensitive and non-extractable since.
    pub fn born_in_token(&self) -> bool {
        self.local && self.always_sensitive && self.never_extractable
    }

    /// Whether this is a secret or private key (a CMK or a DEK).
    pub fn is_protected(&self) -> bool {
        self.class() != Class::Public
    }
}

/// A use of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `C_EncryptInit`
    Encrypt,
    /// `C_DecryptInit`
    Decrypt,
    /// `C_SignInit`
    Sign,
    /// `C_VerifyInit`
    Verify,
    /// `C_WrapKey` (the wrapping key)
    Wrap,
    /// `C_UnwrapKey` (the unwrapping key)
    Unwrap,
    /// `C_DeriveKey` (the base key)
    Derive,
}

impl Op {
    /// The operation's name in access rules and the audit log.
    pub fn name(self) -> &'static str {
        match self {
            Op::Encrypt => "encrypt",
            Op::Decrypt => "decrypt",
            Op::Sign => "sign",
            Op::Verify => "verify",
            Op::Wrap => "wrap",
            Op::Unwrap => "unwrap",
            Op::Derive => "derive",
        }
    }
}

/// Policy switches from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Test only: plaintext import of secret/private keys.
    pub allow_plaintext_import: bool,
    /// `CKM_RSA_PKCS` in `C_Decrypt`.
    pub allow_rsa_pkcs1_decrypt: bool,
    /// Role of a secret CMK whose template names none.
    pub default_role: SecretRole,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            allow_plaintext_import: false,
            allow_rsa_pkcs1_decrypt: false,
            default_role: SecretRole::Wrap,
        }
    }
}

/// May `key` be used for `op` with mechanism `mech`?
pub fn check_use(
    op: Op,
    mech: CK_MECHANISM_TYPE,
    key: &KeyInfo,
    s: &Settings,
) -> Result<(), CK_RV> {
    use mechanisms as m;
    if !m::offered(mech) {
        return Err(CKR_MECHANISM_INVALID);
    }
    let denied = Err(CKR_KEY_FUNCTION_NOT_PERMITTED);
    if !m::fits_op(op, mech) {
        return Err(CKR_MECHANISM_INVALID);
    }
    if !m::key_type_fits(mech, key.key_type) {
        return Err(CKR_KEY_TYPE_INCONSISTENT);
    }
    let needed = match op {
        Op::Encrypt => Usage::ENCRYPT,
        Op::Decrypt => Usage::DECRYPT,
        Op::Sign => Usage::SIGN,
        Op::Verify => Usage::VERIFY,
        Op::Wrap => Usage::WRAP,
        Op::Unwrap => Usage::UNWRAP,
        Op::Derive => Usage::DERIVE,
    };
    if !key.usage.any(needed) {
        return denied;
    }
    match key.class {
        CKO_SECRET_KEY => {
            let Some(role) = SecretRole::of(key.usage) else {
                return denied;
            };
            let dek = key.class() == Class::Dek;
            match (role, op) {
                (SecretRole::Wrap, Op::Wrap | Op::Unwrap) if dek => denied,
                (SecretRole::Wrap, Op::Wrap | Op::Unwrap) => m::is_key_wrap(mech)
                    .then_some(())
                    .ok_or(CKR_MECHANISM_INVALID),
                (SecretRole::Data, Op::Encrypt | Op::Decrypt) => {
                    let ok = if dek {
                        m::is_dek_cipher(mech)
                    } else {
                        m::is_cmk_cipher(mech)
                    };
                    ok.then_some(()).ok_or(CKR_MECHANISM_INVALID)
                }
                (SecretRole::Mac, Op::Sign | Op::Verify) => {
                    m::is_mac(mech).then_some(()).ok_or(CKR_MECHANISM_INVALID)
                }
                _ => denied,
            }
        }
        CKO_PRIVATE_KEY => {
            let (flag, ok) = match op {
                Op::Sign => (Usage::SIGN, m::is_signature(mech, key.key_type)),
                Op::Decrypt => (
                    Usage::DECRYPT,
                    key.key_type == CKK_RSA
                        && (mech == CKM_RSA_PKCS_OAEP
                            || (mech == CKM_RSA_PKCS && s.allow_rsa_pkcs1_decrypt)),
                ),
                Op::Unwrap => (
                    Usage::UNWRAP,
                    key.key_type == CKK_RSA && mech == CKM_RSA_PKCS_OAEP,
                ),
                Op::Derive => (
                    Usage::DERIVE,
                    key.key_type == CKK_EC && mech == CKM_ECDH1_DERIVE,
                ),
                _ => return denied,
            };
            if !key.usage.any(flag) {
                return denied;
            }
            ok.then_some(()).ok_or(CKR_MECHANISM_INVALID)
        }
        // Public keys: verification and encryption pass through; a public key never wraps
        // (a DEK wrapped under an attacker's RSA key would leave the token in the clear
        // for the attacker) and never derives.
        _ => match op {
            Op::Wrap | Op::Unwrap | Op::Derive => denied,
            _ => Ok(()),
        },
    }
}

/// Where a DEK came from: the CMK that unwrapped it, or first wrapped it.
pub type Origin = Option<CK_OBJECT_HANDLE>;

/// `C_WrapKey`: may `wrapping` (cmkp11 handle `wrapping_id`; `byok`: imported through the
/// BYOK path) wrap `key` (origin `origin`)? A wrapping key must have been generated in the
/// token or imported by BYOK, never imported in plaintext (the test switch
/// `allow_plaintext_import` lifts that, for a throwaway token only).
pub fn check_wrap(
    mech: CK_MECHANISM_TYPE,
    wrapping: &KeyInfo,
    wrapping_id: CK_OBJECT_HANDLE,
    byok: bool,
    key: &KeyInfo,
    origin: Origin,
    s: &Settings,
) -> Result<(), CK_RV> {
    check_use(Op::Wrap, mech, wrapping, s)?;
    if wrapping.class() != Class::Cmk || !(wrapping.local || byok || s.allow_plaintext_import) {
        return Err(CKR_KEY_FUNCTION_NOT_PERMITTED);
    }
    if key.class() != Class::Dek || (key.imported_plaintext && !s.allow_plaintext_import) {
        return Err(CKR_KEY_UNEXTRACTABLE);
    }
    if origin.is_some_and(|x| x != wrapping_id) {
        return Err(CKR_KEY_NOT_WRAPPABLE);
    }
    if key.value_len == 0 || key.value_len > wrapping.value_len {
        return Err(CKR_WRAPPING_KEY_SIZE_RANGE);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn aes(token: bool, usage: Usage, len: u64) -> KeyInfo {
        KeyInfo {
            class: CKO_SECRET_KEY,
            key_type: CKK_AES,
            token,
            sensitive: true,
            extractable: !token,
            local: true,
            usage,
            value_len: len,
            ..KeyInfo::default()
        }
    }

    fn wrap_cmk() -> KeyInfo {
        aes(true, SecretRole::Wrap.usage(), 32)
    }

    #[test]
    fn classes() {
        assert_eq!(wrap_cmk().class(), Class::Cmk);
        assert_eq!(aes(false, Usage::ENCRYPT, 32).class(), Class::Dek);
        let private = KeyInfo {
            class: CKO_PRIVATE_KEY,
            ..KeyInfo::default()
        };
        assert_eq!(private.class(), Class::Cmk);
        let cert = KeyInfo {
            class: CKO_CERTIFICATE,
            token: true,
            ..KeyInfo::default()
        };
        assert_eq!(cert.class(), Class::Public);
    }

    #[test]
    fn roles_never_mix() {
        assert_eq!(SecretRole::of(Usage::WRAP.with(Usage::DECRYPT)), None);
        assert_eq!(SecretRole::of(Usage::UNWRAP.with(Usage::ENCRYPT)), None);
        assert_eq!(SecretRole::of(Usage::ENCRYPT.with(Usage::SIGN)), None);
        assert_eq!(SecretRole::of(Usage::ENCRYPT.with(Usage::DERIVE)), None);
        assert_eq!(SecretRole::of(Usage::UNWRAP), Some(SecretRole::Wrap));
        assert_eq!(SecretRole::of(Usage::default()), None);
    }

    #[test]
    fn wrap_key_only_wraps() {
        let s = Settings::default();
        let k = wrap_cmk();
        assert_eq!(check_use(Op::Wrap, CKM_AES_KEY_WRAP_PAD, &k, &s), Ok(()));
        assert_eq!(check_use(Op::Unwrap, CKM_AES_KEY_WRAP, &k, &s), Ok(()));
        assert_eq!(
            check_use(Op::Decrypt, CKM_AES_CBC_PAD, &k, &s),
            Err(CKR_KEY_FUNCTION_NOT_PERMITTED)
        );
        assert_eq!(
            check_use(Op::Encrypt, CKM_AES_ECB, &k, &s),
            Err(CKR_KEY_FUNCTION_NOT_PERMITTED)
        );
        assert_eq!(
            check_use(Op::Unwrap, CKM_AES_CBC_PAD, &k, &s),
            Err(CKR_MECHANISM_INVALID)
        );
        assert_eq!(
            check_use(Op::Derive, CKM_AES_ECB_ENCRYPT_DATA, &k, &s),
            Err(CKR_MECHANISM_INVALID)
        );
    }

    #[test]
    fn data_keys_encrypt_with_their_mechanisms() {
        let s = Settings::default();
        let cmk = aes(true, SecretRole::Data.usage(), 32);
        let dek = aes(false, SecretRole::Data.usage(), 32);
        assert_eq!(check_use(Op::Encrypt, CKM_AES_GCM, &cmk, &s), Ok(()));
        assert_eq!(
            check_use(Op::Encrypt, CKM_AES_ECB, &cmk, &s),
            Err(CKR_MECHANISM_INVALID)
        );
        assert_eq!(check_use(Op::Encrypt, CKM_AES_ECB, &dek, &s), Ok(()));
        assert_eq!(
            check_use(Op::Encrypt, CKM_AES_KEY_WRAP, &dek, &s),
            Err(CKR_MECHANISM_INVALID)
        );
        assert_eq!(
            check_use(Op::Wrap, CKM_AES_KEY_WRAP, &dek, &s),
            Err(CKR_KEY_FUNCTION_NOT_PERMITTED)
        );
    }

    #[test]
    fn private_keys() {
        let s = Settings::default();
        let rsa = KeyInfo {
            class: CKO_PRIVATE_KEY,
            key_type: CKK_RSA,
            usage: Usage::SIGN.with(Usage::DECRYPT),
            ..KeyInfo::default()
        };
        assert_eq!(
            check_use(Op::Sign, CKM_SHA256_RSA_PKCS_PSS, &rsa, &s),
            Ok(())
        );
        assert_eq!(check_use(Op::Decrypt, CKM_RSA_PKCS_OAEP, &rsa, &s), Ok(()));
        assert_eq!(
            check_use(Op::Decrypt, CKM_RSA_PKCS, &rsa, &s),
            Err(CKR_MECHANISM_INVALID)
        );
        let legacy = Settings {
            allow_rsa_pkcs1_decrypt: true,
            ..s
        };
        assert_eq!(check_use(Op::Decrypt, CKM_RSA_PKCS, &rsa, &legacy), Ok(()));
        assert_eq!(
            check_use(Op::Decrypt, CKM_RSA_X_509, &rsa, &legacy),
            Err(CKR_MECHANISM_INVALID)
        );
        assert_eq!(
            check_use(Op::Unwrap, CKM_RSA_PKCS_OAEP, &rsa, &s),
            Err(CKR_KEY_FUNCTION_NOT_PERMITTED)
        );
        assert_eq!(
            check_use(Op::Wrap, CKM_RSA_PKCS_OAEP, &rsa, &s),
            Err(CKR_KEY_FUNCTION_NOT_PERMITTED)
        );
    }

    #[test]
    fn wrap_rules() {
        let s = Settings::default();
        let kek = wrap_cmk();
        let dek = aes(false, SecretRole::Data.usage(), 32);
        assert_eq!(
            check_wrap(CKM_AES_KEY_WRAP_PAD, &kek, 7, false, &dek, None, &s),
            Ok(())
        );
        assert_eq!(
            check_wrap(CKM_AES_KEY_WRAP_PAD, &kek, 7, false, &dek, Some(7), &s),
            Ok(())
        );
        assert_eq!(
            check_wrap(CKM_AES_KEY_WRAP_PAD, &kek, 7, false, &dek, Some(8), &s),
            Err(CKR_KEY_NOT_WRAPPABLE)
        );
        let weak = aes(true, SecretRole::Wrap.usage(), 16);
        assert_eq!(
            check_wrap(CKM_AES_KEY_WRAP_PAD, &weak, 7, false, &dek, None, &s),
            Err(CKR_WRAPPING_KEY_SIZE_RANGE)
        );
        assert_eq!(
            check_wrap(CKM_AES_KEY_WRAP_PAD, &kek, 7, false, &kek, None, &s),
            Err(CKR_KEY_UNEXTRACTABLE)
        );
        let imported = KeyInfo {
            local: false,
            ..wrap_cmk()
        };
        assert_eq!(
            check_wrap(CKM_AES_KEY_WRAP_PAD, &imported, 7, false, &dek, None, &s),
            Err(CKR_KEY_FUNCTION_NOT_PERMITTED)
        );
        assert_eq!(
            check_wrap(CKM_AES_CBC_PAD, &kek, 7, false, &dek, None, &s),
            Err(CKR_MECHANISM_INVALID)
        );
    }
}
