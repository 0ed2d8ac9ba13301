//! Creating templates: what the application asked, checked and completed so that no key
//! is born weaker than its class allows, and no role comes from a backend default
//! (SoftHSM2 turns on ENCRYPT, DECRYPT, WRAP, UNWRAP, VERIFY when a template is silent).

use super::{Class, KeyInfo, SecretRole, Settings, Usage};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass};
use cryptoki_sys::*;

/// A refusal of a template: the code the application gets and the rule it broke, in
/// words an operator understands ("a token secret key is a CMK and is always sensitive;
/// the template asks CKA_SENSITIVE=FALSE"), for the warn line and the audit record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// The PKCS#11 code.
    pub rv: CK_RV,
    /// The rule, as one sentence without the function's name.
    pub rule: std::borrow::Cow<'static, str>,
}

impl Refused {
    /// A refusal with a fixed rule.
    pub const fn new(rv: CK_RV, rule: &'static str) -> Refused {
        Refused {
            rv,
            rule: std::borrow::Cow::Borrowed(rule),
        }
    }

    /// A refusal with a rule naming values.
    pub fn text(rv: CK_RV, rule: String) -> Refused {
        Refused {
            rv,
            rule: std::borrow::Cow::Owned(rule),
        }
    }
}

type R<T> = Result<T, Refused>;

fn refuse<T>(rv: CK_RV, rule: &'static str) -> R<T> {
    Err(Refused::new(rv, rule))
}

/// The boolean attributes policy looks at, in the order of [`Flags`].
#[cfg_attr(not(test), allow(dead_code))]
const FLAG_TYPES: [AttributeType; 13] = [
    AttributeType::Encrypt,
    AttributeType::Decrypt,
    AttributeType::Sign,
    AttributeType::Verify,
    AttributeType::Wrap,
    AttributeType::Unwrap,
    AttributeType::Derive,
    AttributeType::SignRecover,
    AttributeType::VerifyRecover,
    AttributeType::Sensitive,
    AttributeType::Extractable,
    AttributeType::Token,
    AttributeType::WrapWithTrusted,
];

/// The usage flags, in the order of the first seven [`FLAG_TYPES`].
#[cfg(test)]
const USAGES: [Usage; 7] = [
    Usage::ENCRYPT,
    Usage::DECRYPT,
    Usage::SIGN,
    Usage::VERIFY,
    Usage::WRAP,
    Usage::UNWRAP,
    Usage::DERIVE,
];

/// A template's boolean attributes, read in one pass (the last occurrence wins): bit `i`
/// of `on` (of `off`) says that flag `i` of [`FLAG_TYPES`] is given as TRUE (as FALSE).
/// The first seven bits are those of [`Usage`].
#[derive(Default, Clone, Copy)]
struct Flags {
    on: u16,
    off: u16,
}

impl Flags {
    fn of(t: &[Attribute]) -> Flags {
        let mut f = Flags::default();
        for a in t {
            let (i, b) = match a {
                Attribute::Encrypt(b) => (0, b),
                Attribute::Decrypt(b) => (1, b),
                Attribute::Sign(b) => (2, b),
                Attribute::Verify(b) => (3, b),
                Attribute::Wrap(b) => (4, b),
                Attribute::Unwrap(b) => (5, b),
                Attribute::Derive(b) => (6, b),
                Attribute::SignRecover(b) => (7, b),
                Attribute::VerifyRecover(b) => (8, b),
                Attribute::Sensitive(b) => (9, b),
                Attribute::Extractable(b) => (10, b),
                Attribute::Token(b) => (11, b),
                Attribute::WrapWithTrusted(b) => (12, b),
                _ => continue,
            };
            f.set(i, *b);
        }
        f
    }

    /// Flag `i` given as `b`.
    #[inline]
    fn set(&mut self, i: usize, b: bool) {
        let bit = 1u16 << i;
        self.on &= !bit;
        self.off &= !bit;
        if b {
            self.on |= bit;
        } else {
            self.off |= bit;
        }
    }

    /// The flag of `ty` (inlined: with a constant `ty`, two bit tests).
    #[inline(always)]
    fn get(&self, ty: AttributeType) -> Option<bool> {
        let i = match ty {
            AttributeType::Encrypt => 0,
            AttributeType::Decrypt => 1,
            AttributeType::Sign => 2,
            AttributeType::Verify => 3,
            AttributeType::Wrap => 4,
            AttributeType::Unwrap => 5,
            AttributeType::Derive => 6,
            AttributeType::SignRecover => 7,
            AttributeType::VerifyRecover => 8,
            AttributeType::Sensitive => 9,
            AttributeType::Extractable => 10,
            AttributeType::Token => 11,
            AttributeType::WrapWithTrusted => 12,
            _ => return None,
        };
        let bit = 1u16 << i;
        if self.on & bit != 0 {
            Some(true)
        } else if self.off & bit != 0 {
            Some(false)
        } else {
            None
        }
    }

    /// The usage flags the template turns on.
    fn requested(&self) -> Usage {
        Usage((self.on & 0x7f) as u8)
    }

    /// The usage flags the template turns off explicitly (DERIVE is always off for secret
    /// keys, so it is not counted).
    fn refused(&self) -> Usage {
        Usage((self.off & 0x3f) as u8)
    }
}

/// The position of `CKA_*` type `ty` in [`FLAG_TYPES`] (and so in [`Flags`]).
fn flag_index(ty: CK_ATTRIBUTE_TYPE) -> Option<usize> {
    Some(match ty {
        CKA_ENCRYPT => 0,
        CKA_DECRYPT => 1,
        CKA_SIGN => 2,
        CKA_VERIFY => 3,
        CKA_WRAP => 4,
        CKA_UNWRAP => 5,
        CKA_DERIVE => 6,
        CKA_SIGN_RECOVER => 7,
        CKA_VERIFY_RECOVER => 8,
        CKA_SENSITIVE => 9,
        CKA_EXTRACTABLE => 10,
        CKA_TOKEN => 11,
        CKA_WRAP_WITH_TRUSTED => 12,
        _ => return None,
    })
}

fn flag(t: &[Attribute], ty: AttributeType) -> Option<bool> {
    Flags::of(t).get(ty)
}

/// `CKA_TOKEN` of a template (default FALSE).
pub fn is_token(t: &[Attribute]) -> bool {
    flag(t, AttributeType::Token).unwrap_or(false)
}

/// `CKA_CLASS` of a template, if given.
pub fn class_of(t: &[Attribute]) -> Option<CK_OBJECT_CLASS> {
    t.iter().rev().find_map(|a| match a {
        Attribute::Class(c) => Some(CK_OBJECT_CLASS::from(*c)),
        _ => None,
    })
}

/// Attributes only the token sets: never accepted from an application.
fn refuse_token_only(t: &[Attribute]) -> R<()> {
    let token_only = t.iter().any(|a| {
        matches!(
            a.attribute_type(),
            AttributeType::AlwaysSensitive
                | AttributeType::NeverExtractable
                | AttributeType::Local
                | AttributeType::Trusted
        )
    });
    if token_only {
        refuse(
            CKR_ATTRIBUTE_READ_ONLY,
            "CKA_LOCAL, CKA_ALWAYS_SENSITIVE, CKA_NEVER_EXTRACTABLE and CKA_TRUSTED are the token's to set; the template sets one",
        )
    } else {
        Ok(())
    }
}

/// Replaces every usage, SENSITIVE and EXTRACTABLE attribute of `t` by explicit values.
fn finish(mut t: Vec<Attribute>, usage: Usage, extractable: bool, private: bool) -> Vec<Attribute> {
    // Room for what is added below, so the vector is not reallocated on the way.
    t.reserve(9);
    t.retain(|a| !is_replaced(CK_ATTRIBUTE_TYPE::from(a.attribute_type())));
    if private {
        t.push(Attribute::Sign(usage.any(Usage::SIGN)));
        t.push(Attribute::Decrypt(usage.any(Usage::DECRYPT)));
        t.push(Attribute::Unwrap(usage.any(Usage::UNWRAP)));
        t.push(Attribute::Derive(usage.any(Usage::DERIVE)));
        t.push(Attribute::SignRecover(false));
        t.push(Attribute::Sensitive(true));
        t.push(Attribute::Extractable(extractable));
    } else {
        t.extend(
            secret_completion(usage, extractable)
                .iter()
                .map(|&(ty, b)| bool_attribute(ty, b)),
        );
    }
    t
}

/// What a secret key's template gets in place of its usage, SENSITIVE and EXTRACTABLE
/// attributes (those [`is_replaced`] names): every one explicit.
pub type Completion = [(CK_ATTRIBUTE_TYPE, bool); 9];

/// The explicit attributes of a secret key with `usage` (DERIVE always off).
pub fn secret_completion(usage: Usage, extractable: bool) -> Completion {
    [
        (CKA_ENCRYPT, usage.any(Usage::ENCRYPT)),
        (CKA_DECRYPT, usage.any(Usage::DECRYPT)),
        (CKA_SIGN, usage.any(Usage::SIGN)),
        (CKA_VERIFY, usage.any(Usage::VERIFY)),
        (CKA_WRAP, usage.any(Usage::WRAP)),
        (CKA_UNWRAP, usage.any(Usage::UNWRAP)),
        (CKA_DERIVE, false),
        (CKA_SENSITIVE, true),
        (CKA_EXTRACTABLE, extractable),
    ]
}

/// The boolean attributes of a [`Completion`] as cryptoki attributes.
fn bool_attribute(ty: CK_ATTRIBUTE_TYPE, b: bool) -> Attribute {
    match ty {
        CKA_ENCRYPT => Attribute::Encrypt(b),
        CKA_DECRYPT => Attribute::Decrypt(b),
        CKA_SIGN => Attribute::Sign(b),
        CKA_VERIFY => Attribute::Verify(b),
        CKA_WRAP => Attribute::Wrap(b),
        CKA_UNWRAP => Attribute::Unwrap(b),
        CKA_DERIVE => Attribute::Derive(b),
        CKA_SENSITIVE => Attribute::Sensitive(b),
        _ => Attribute::Extractable(b),
    }
}

/// Whether an application's attribute of type `ty` is dropped from a creating template
/// (the policy states it explicitly instead).
pub fn is_replaced(ty: CK_ATTRIBUTE_TYPE) -> bool {
    matches!(
        ty,
        CKA_ENCRYPT
            | CKA_DECRYPT
            | CKA_SIGN
            | CKA_VERIFY
            | CKA_WRAP
            | CKA_UNWRAP
            | CKA_DERIVE
            | CKA_SIGN_RECOVER
            | CKA_VERIFY_RECOVER
            | CKA_SENSITIVE
            | CKA_EXTRACTABLE
    )
}

/// A secret key's template (generated, unwrapped or derived). `cmk` says whether the
/// result is a CMK (token) or a DEK (session); `extractable_default` applies to DEKs
/// whose template is silent.
pub fn secret(
    t: Vec<Attribute>,
    cmk: bool,
    extractable_default: bool,
    s: &Settings,
) -> R<Vec<Attribute>> {
    refuse_token_only(&t)?;
    let (usage, extractable) = secret_decision(&Flags::of(&t), cmk, extractable_default, s)?;
    Ok(finish(t, usage, extractable, false))
}

/// The rules of [`secret`] on a template's flags: the key's usage and extractability.
fn secret_decision(
    f: &Flags,
    cmk: bool,
    extractable_default: bool,
    s: &Settings,
) -> R<(Usage, bool)> {
    const TI: CK_RV = CKR_TEMPLATE_INCONSISTENT;
    if f.get(AttributeType::Sensitive) == Some(false) {
        return refuse(
            TI,
            if cmk {
                "a token secret key is a CMK and is always sensitive; the template asks CKA_SENSITIVE=FALSE"
            } else {
                "a session secret key is a DEK and is always sensitive; the template asks CKA_SENSITIVE=FALSE"
            },
        );
    }
    if cmk && f.get(AttributeType::Extractable) == Some(true) {
        return refuse(
            TI,
            "a token secret key is a CMK and is never extractable; the template asks CKA_EXTRACTABLE=TRUE",
        );
    }
    if f.get(AttributeType::WrapWithTrusted) == Some(false) {
        return refuse(
            TI,
            "a secret key's CKA_WRAP_WITH_TRUSTED is the token's default, never turned off; the template asks CKA_WRAP_WITH_TRUSTED=FALSE",
        );
    }
    if f.get(AttributeType::SignRecover) == Some(true)
        || f.get(AttributeType::VerifyRecover) == Some(true)
    {
        return refuse(
            TI,
            "signature with recovery is not a role cmkp11 gives; the template asks CKA_SIGN_RECOVER or CKA_VERIFY_RECOVER=TRUE",
        );
    }
    let asked = f.requested();
    let role = if asked == Usage::default() {
        if cmk {
            s.default_role
        } else {
            SecretRole::Data
        }
    } else {
        match SecretRole::of(asked) {
            Some(r) => r,
            None => return refuse(
                TI,
                "a secret key has one role (ENCRYPT+DECRYPT, WRAP+UNWRAP or SIGN+VERIFY) and never DERIVE; the template asks usage flags of two roles or CKA_DERIVE=TRUE",
            ),
        }
    };
    if !cmk && role == SecretRole::Wrap {
        return refuse(
            TI,
            "a session secret key is a DEK and never wraps or unwraps (only a token CMK does); the template asks CKA_WRAP or CKA_UNWRAP=TRUE",
        );
    }
    let extractable = !cmk
        && f.get(AttributeType::Extractable)
            .unwrap_or(extractable_default);
    // The role's flags, less those the template turns off explicitly (narrowing is safe).
    let off = f.refused();
    Ok((Usage(role.usage().0 & !off.0), extractable))
}

/// One attribute of an application's template, borrowed as it came: its type and the
/// bytes of its value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawAttr<'a> {
    /// `CKA_*`
    pub ty: CK_ATTRIBUTE_TYPE,
    /// The value's bytes.
    pub value: &'a [u8],
}

/// The most attributes a template on the short way may have (a longer one takes the
/// general way): what a DEK's template states, with room to spare.
pub const SHORT_MAX: usize = 16;

/// An application's template on the short way: up to [`SHORT_MAX`] [`RawAttr`]s, kept in
/// place (no allocation, and no general collection code on the hot path).
#[derive(Clone, Copy, Debug)]
pub struct ShortTemplate<'a> {
    attrs: [RawAttr<'a>; SHORT_MAX],
    len: usize,
}

impl<'a> ShortTemplate<'a> {
    /// The template of `n` attributes, the `i`-th given by `at(i)`; `None` when `n` is
    /// over [`SHORT_MAX`] or `at` gives `None`.
    pub fn build(n: usize, mut at: impl FnMut(usize) -> Option<RawAttr<'a>>) -> Option<Self> {
        if n > SHORT_MAX {
            return None;
        }
        let mut t = ShortTemplate {
            attrs: [RawAttr { ty: 0, value: &[] }; SHORT_MAX],
            len: n,
        };
        for (i, slot) in t.attrs[..n].iter_mut().enumerate() {
            *slot = at(i)?;
        }
        Some(t)
    }
}

impl<'a> std::ops::Deref for ShortTemplate<'a> {
    type Target = [RawAttr<'a>];

    fn deref(&self) -> &[RawAttr<'a>] {
        &self.attrs[..self.len]
    }
}

/// The short way for the most common creating template, a session DEK's
/// (`C_GenerateKey` of a session key, `C_UnwrapKey`), read from the application's
/// attributes without converting them: `None` unless every attribute is one of CLASS
/// (secret key), KEY_TYPE (AES), VALUE_LEN, LABEL, ID, TOKEN (false) or a boolean usage,
/// SENSITIVE, EXTRACTABLE, PRIVATE, MODIFIABLE, COPYABLE or DESTROYABLE, each well formed;
/// the caller then takes the general way ([`generate_key`], [`unwrapped`]), which also
/// gives the exact error of anything else. `Some` holds the decision of exactly those
/// functions (`secret` of a DEK; tested against them): the application's attributes less
/// those [`is_replaced`] names, followed by the [`Completion`].
pub fn dek_raw(t: &[RawAttr], s: &Settings) -> Option<R<Completion>> {
    let mut f = Flags::default();
    for a in t {
        match a.ty {
            CKA_CLASS | CKA_KEY_TYPE | CKA_VALUE_LEN => {
                let v = CK_ULONG::from_ne_bytes(a.value.try_into().ok()?);
                let ok = match a.ty {
                    CKA_CLASS => v == CKO_SECRET_KEY,
                    CKA_KEY_TYPE => v == CKK_AES,
                    _ => true,
                };
                if !ok {
                    return None;
                }
            }
            CKA_LABEL | CKA_ID => {}
            // Attributes the general way refuses or checks further.
            CKA_SIGN_RECOVER | CKA_VERIFY_RECOVER | CKA_WRAP_WITH_TRUSTED => return None,
            ty => {
                let [b] = a.value else {
                    return None;
                };
                match ty {
                    CKA_PRIVATE | CKA_MODIFIABLE | CKA_COPYABLE | CKA_DESTROYABLE => {}
                    _ => f.set(flag_index(ty)?, *b != 0),
                }
            }
        }
    }
    if f.get(AttributeType::Token) == Some(true) {
        return None;
    }
    Some(
        secret_decision(&f, false, true, s)
            .map(|(usage, extractable)| secret_completion(usage, extractable)),
    )
}

/// `C_GenerateKey`.
pub fn generate_key(t: Vec<Attribute>, s: &Settings) -> R<Vec<Attribute>> {
    let cmk = is_token(&t);
    secret(t, cmk, true, s)
}

/// The key type a key-pair mechanism makes.
pub fn pair_key_type(m: CK_MECHANISM_TYPE) -> R<CK_KEY_TYPE> {
    match m {
        CKM_RSA_PKCS_KEY_PAIR_GEN => Ok(CKK_RSA),
        CKM_EC_KEY_PAIR_GEN => Ok(CKK_EC),
        CKM_EC_EDWARDS_KEY_PAIR_GEN => Ok(CKK_EC_EDWARDS),
        _ => refuse(CKR_MECHANISM_INVALID, "not a key-pair generation mechanism"),
    }
}

/// `C_GenerateKeyPair`'s private template: always sensitive and non-extractable; roles
/// sign (default), decrypt and unwrap (RSA), derive (EC), several when asked.
pub fn private_key(t: Vec<Attribute>, key_type: CK_KEY_TYPE) -> R<Vec<Attribute>> {
    refuse_token_only(&t)?;
    let f = Flags::of(&t);
    const TI: CK_RV = CKR_TEMPLATE_INCONSISTENT;
    if f.get(AttributeType::Sensitive) == Some(false) {
        return refuse(
            TI,
            "a private key is a CMK and is always sensitive; the template asks CKA_SENSITIVE=FALSE",
        );
    }
    if f.get(AttributeType::Extractable) == Some(true) {
        return refuse(
            TI,
            "a private key is a CMK and is never extractable; the template asks CKA_EXTRACTABLE=TRUE",
        );
    }
    if f.get(AttributeType::SignRecover) == Some(true) {
        return refuse(
            TI,
            "signature with recovery is not a role cmkp11 gives; the template asks CKA_SIGN_RECOVER=TRUE",
        );
    }
    if f.get(AttributeType::WrapWithTrusted) == Some(false) {
        return refuse(
            TI,
            "a private key's CKA_WRAP_WITH_TRUSTED is the token's default, never turned off; the template asks CKA_WRAP_WITH_TRUSTED=FALSE",
        );
    }
    let asked = f.requested();
    let allowed = match key_type {
        CKK_RSA => Usage::SIGN.with(Usage::DECRYPT).with(Usage::UNWRAP),
        CKK_EC => Usage::SIGN.with(Usage::DERIVE),
        _ => Usage::SIGN,
    };
    if asked.0 & !allowed.0 != 0 {
        return refuse(
            TI,
            "an RSA private key may sign, decrypt and unwrap, an EC key sign and derive, an EdDSA key only sign; the template asks a usage its key type cannot hold",
        );
    }
    let usage = if asked == Usage::default() {
        Usage::SIGN
    } else {
        asked
    };
    Ok(finish(t, usage, false, true))
}

/// `C_UnwrapKey`'s template: the result is always a DEK (a session secret key).
pub fn unwrapped(t: Vec<Attribute>, s: &Settings) -> R<Vec<Attribute>> {
    if is_token(&t) {
        return refuse(
            CKR_TEMPLATE_INCONSISTENT,
            "an unwrapped key is always a session key (a DEK): its value was outside the token, so it can never be a CMK; the template asks CKA_TOKEN=TRUE",
        );
    }
    if class_of(&t).is_some_and(|c| c != CKO_SECRET_KEY) {
        return refuse(
            CKR_TEMPLATE_INCONSISTENT,
            "an unwrapped key is always a secret key (a DEK); the template asks another CKA_CLASS",
        );
    }
    secret(t, false, true, s)
}

/// `C_DeriveKey`'s template (ECDH1): a sensitive, non-extractable session DEK.
pub fn derived(t: Vec<Attribute>, s: &Settings) -> R<Vec<Attribute>> {
    if is_token(&t) {
        return refuse(
            CKR_TEMPLATE_INCONSISTENT,
            "a derived key is always a session key (a DEK): the peer of the derivation knows its value, so it can never be a CMK; the template asks CKA_TOKEN=TRUE",
        );
    }
    if class_of(&t).is_some_and(|c| c != CKO_SECRET_KEY)
        || flag(&t, AttributeType::Extractable) == Some(true)
    {
        return refuse(
            CKR_TEMPLATE_INCONSISTENT,
            "a derived key is a sensitive, non-extractable secret key; the template asks another CKA_CLASS or CKA_EXTRACTABLE=TRUE",
        );
    }
    secret(t, false, false, s)
}

/// `C_CreateObject`: secret and private keys carry key material (plaintext import), so
/// they are refused unless the test switch allows it.
/// With the switch, an imported key is still born under its class's rules (sensitive;
/// a CMK non-extractable; one role).
pub fn create(t: Vec<Attribute>, s: &Settings) -> R<Vec<Attribute>> {
    match class_of(&t) {
        Some(CKO_SECRET_KEY) | Some(CKO_PRIVATE_KEY) if !s.allow_plaintext_import => refuse(
            CKR_TEMPLATE_INCONSISTENT,
            "a key's value given in the clear is known outside the token, so C_CreateObject makes no secret or private key (import keys wrapped: cmkp11 key import)",
        ),
        Some(CKO_SECRET_KEY) => {
            let cmk = is_token(&t);
            secret(t, cmk, true, s)
        }
        Some(CKO_PRIVATE_KEY) => {
            let kt = t
                .iter()
                .rev()
                .find_map(|a| match a {
                    Attribute::KeyType(k) => Some(CK_KEY_TYPE::from(*k)),
                    _ => None,
                })
                .ok_or(Refused::new(
                    CKR_TEMPLATE_INCOMPLETE,
                    "a private key's template names its CKA_KEY_TYPE",
                ))?;
            private_key(t, kt)
        }
        _ => Ok(t),
    }
}

/// `C_CopyObject`: only promotion of a session key to a token object, without weakening;
/// the copy is a CMK, so EXTRACTABLE becomes FALSE. Public objects copy freely.
pub fn copy(source: &KeyInfo, t: Vec<Attribute>) -> R<Vec<Attribute>> {
    if !source.is_protected() {
        return Ok(t);
    }
    if source.token {
        return refuse(
            CKR_ACTION_PROHIBITED,
            "a CMK is never copied (a copy could carry new attributes)",
        );
    }
    let ok = t.iter().all(|a| match a {
        Attribute::Token(_) | Attribute::Id(_) | Attribute::Label(_) => true,
        Attribute::Sensitive(b) | Attribute::Private(b) => *b,
        Attribute::Extractable(b) => !*b,
        _ => false,
    });
    if !ok {
        return refuse(
            CKR_TEMPLATE_INCONSISTENT,
            "a copy of a secret or private key may only promote it into the token (CKA_TOKEN, CKA_ID, CKA_LABEL) and never weaken it; the template asks another attribute, CKA_SENSITIVE=FALSE, CKA_PRIVATE=FALSE or CKA_EXTRACTABLE=TRUE",
        );
    }
    if !is_token(&t) {
        return refuse(
            CKR_ACTION_PROHIBITED,
            "a secret or private key is copied only to promote it into the token; the template does not ask CKA_TOKEN=TRUE",
        );
    }
    if source.class == CKO_SECRET_KEY && SecretRole::of(source.usage).is_none() {
        return refuse(
            CKR_TEMPLATE_INCONSISTENT,
            "a CMK has one role, and the session key has usage flags of several",
        );
    }
    let mut t = t;
    t.retain(|a| !matches!(a, Attribute::Extractable(_)));
    if source.extractable {
        // TRUE -> FALSE is the one change of EXTRACTABLE a copy may make; restating
        // FALSE is refused as read-only by some tokens (SoftHSM2).
        t.push(Attribute::Extractable(false));
    }
    Ok(t)
}

/// `C_SetAttributeValue` on a CMK, DEK or private key: only names and dates change;
/// roles, SENSITIVE, EXTRACTABLE, TRUSTED, WRAP_WITH_TRUSTED and values are sticky.
pub fn set(target: &KeyInfo, t: &[Attribute]) -> R<()> {
    if target.class() == Class::Public {
        return Ok(());
    }
    let ok = t.iter().all(|a| {
        matches!(
            a.attribute_type(),
            AttributeType::Label
                | AttributeType::Id
                | AttributeType::Subject
                | AttributeType::StartDate
                | AttributeType::EndDate
        )
    });
    if ok {
        Ok(())
    } else {
        refuse(
            CKR_ATTRIBUTE_READ_ONLY,
            "a key's roles, SENSITIVE, EXTRACTABLE, TRUSTED, WRAP_WITH_TRUSTED and value never change; only names and dates do",
        )
    }
}

/// Attributes whose values are key material: never returned for a protected key,
/// whatever the backend says.
pub fn is_secret_value(ty: AttributeType) -> bool {
    matches!(
        ty,
        AttributeType::Value
            | AttributeType::PrivateExponent
            | AttributeType::Prime1
            | AttributeType::Prime2
            | AttributeType::Exponent1
            | AttributeType::Exponent2
            | AttributeType::Coefficient
    )
}

/// Helper for tests and callers: the class attribute value.
pub fn secret_key_class() -> Attribute {
    Attribute::Class(ObjectClass::SECRET_KEY)
}

/// Helper: an AES key-type attribute.
pub fn aes_key_type() -> Attribute {
    Attribute::KeyType(KeyType::AES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_positions_follow_flag_types() {
        for (i, ty) in FLAG_TYPES.iter().enumerate() {
            assert_eq!(flag_index(CK_ATTRIBUTE_TYPE::from(*ty)), Some(i), "{ty:?}");
            let mut f = Flags::default();
            f.set(i, true);
            assert_eq!(f.get(*ty), Some(true), "{ty:?}");
            f.set(i, false);
            assert_eq!(f.get(*ty), Some(false), "{ty:?}");
        }
        for (i, u) in USAGES.iter().enumerate() {
            let mut f = Flags::default();
            f.set(i, true);
            assert_eq!(f.requested(), *u);
            f.set(i, false);
            assert_eq!(f.requested(), Usage::default());
            assert_eq!(
                f.refused(),
                if *u == Usage::DERIVE {
                    Usage::default()
                } else {
                    *u
                }
            );
        }
        assert_eq!(flag_index(CKA_LABEL), None);
        let all = Flags { on: 0x1fff, off: 0 };
        assert_eq!(all.get(AttributeType::Label), None);
    }

    fn s() -> Settings {
        Settings::default()
    }

    /// The code of a result (the tests compare codes, not the rules' words).
    fn code<T>(r: R<T>) -> Result<T, CK_RV> {
        r.map_err(|e| e.rv)
    }

    fn usage_of(t: &[Attribute]) -> Usage {
        Flags::of(t).requested()
    }

    /// A template as an application gives it: each attribute's type and value bytes.
    fn raw_bytes(t: &[Attribute]) -> Vec<(CK_ATTRIBUTE_TYPE, Vec<u8>)> {
        t.iter()
            .map(|a| {
                let v = match a {
                    Attribute::Class(c) => CK_ULONG::from(*c).to_ne_bytes().to_vec(),
                    Attribute::KeyType(k) => CK_ULONG::from(*k).to_ne_bytes().to_vec(),
                    Attribute::ValueLen(l) => CK_ULONG::from(*l).to_ne_bytes().to_vec(),
                    Attribute::Label(b) | Attribute::Value(b) => b.clone(),
                    other => vec![u8::from(flag_value(other).expect("a boolean"))],
                };
                (CK_ATTRIBUTE_TYPE::from(a.attribute_type()), v)
            })
            .collect()
    }

    fn flag_value(a: &Attribute) -> Option<bool> {
        Some(match a {
            Attribute::Encrypt(b)
            | Attribute::Decrypt(b)
            | Attribute::Sign(b)
            | Attribute::Verify(b)
            | Attribute::Wrap(b)
            | Attribute::Unwrap(b)
            | Attribute::Derive(b)
            | Attribute::SignRecover(b)
            | Attribute::VerifyRecover(b)
            | Attribute::Sensitive(b)
            | Attribute::Extractable(b)
            | Attribute::Token(b)
            | Attribute::WrapWithTrusted(b)
            | Attribute::Local(b)
            | Attribute::AlwaysSensitive(b)
            | Attribute::Trusted(b) => *b,
            _ => return None,
        })
    }

    /// What the short way gives the token, as cryptoki attributes.
    fn dek_raw_template(t: &[Attribute]) -> Option<R<Vec<Attribute>>> {
        let bytes = raw_bytes(t);
        let raw: Vec<RawAttr> = bytes
            .iter()
            .map(|(ty, v)| RawAttr { ty: *ty, value: v })
            .collect();
        let decided = dek_raw(&raw, &s())?;
        Some(decided.map(|completion| {
            let mut out: Vec<Attribute> = t
                .iter()
                .filter(|a| !is_replaced(CK_ATTRIBUTE_TYPE::from(a.attribute_type())))
                .cloned()
                .collect();
            out.extend(completion.iter().map(|&(ty, b)| bool_attribute(ty, b)));
            out
        }))
    }

    #[test]
    fn dek_short_way_decides_as_the_general_way() {
        // Every combination of absent/false/true for the flags the rules read, on the
        // templates of C_GenerateKey and C_UnwrapKey of a session AES key.
        let flags: [fn(bool) -> Attribute; 8] = [
            Attribute::Encrypt,
            Attribute::Decrypt,
            Attribute::Sign,
            Attribute::Verify,
            Attribute::Wrap,
            Attribute::Unwrap,
            Attribute::Sensitive,
            Attribute::Extractable,
        ];
        let mut compared = 0;
        for combo in 0..3usize.pow(flags.len() as u32) {
            let mut t = vec![
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::Token(false),
                Attribute::Label(b"dek".to_vec()),
            ];
            let mut c = combo;
            for f in flags {
                match c % 3 {
                    1 => t.push(f(false)),
                    2 => t.push(f(true)),
                    _ => {}
                }
                c /= 3;
            }
            t.push(Attribute::Derive(combo % 2 == 0));
            let short = dek_raw_template(&t).expect("a simple template takes the short way");
            assert_eq!(short, unwrapped(t.clone(), &s()), "unwrap {t:?}");
            let mut g = t.clone();
            g.push(Attribute::ValueLen(32.into()));
            let short = dek_raw_template(&g).expect("a simple template takes the short way");
            assert_eq!(short, generate_key(g.clone(), &s()), "generate {g:?}");
            compared += 1;
        }
        assert_eq!(compared, 6561);
    }

    #[test]
    fn dek_short_way_leaves_everything_else_to_the_general_way() {
        let base = vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
        ];
        let others = [
            Attribute::Token(true),
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::KeyType(KeyType::GENERIC_SECRET),
            Attribute::SignRecover(false),
            Attribute::VerifyRecover(false),
            Attribute::WrapWithTrusted(true),
            Attribute::Local(true),
            Attribute::AlwaysSensitive(true),
            Attribute::Trusted(false),
            Attribute::Value(vec![0; 32]),
        ];
        for o in others {
            let mut t = base.clone();
            t.push(o.clone());
            assert_eq!(dek_raw_template(&t), None, "{o:?}");
        }
        // Malformed values: a boolean of 4 bytes, a class of 2.
        let odd = [
            RawAttr {
                ty: CKA_ENCRYPT,
                value: &[1, 0, 0, 0],
            },
            RawAttr {
                ty: CKA_CLASS,
                value: &[4, 0],
            },
        ];
        for a in odd {
            assert_eq!(dek_raw(&[a], &s()), None, "{a:?}");
        }
        // A refusal is the general way's: SENSITIVE=FALSE, mixed roles.
        let weak = [RawAttr {
            ty: CKA_SENSITIVE,
            value: &[0],
        }];
        assert_eq!(
            dek_raw(&weak, &s()).map(code),
            Some(Err(CKR_TEMPLATE_INCONSISTENT))
        );
        let mixed = [
            RawAttr {
                ty: CKA_ENCRYPT,
                value: &[1],
            },
            RawAttr {
                ty: CKA_SIGN,
                value: &[1],
            },
        ];
        assert_eq!(
            dek_raw(&mixed, &s()).map(code),
            Some(Err(CKR_TEMPLATE_INCONSISTENT))
        );
    }

    #[test]
    fn silent_cmk_template_gets_default_role_only() {
        let t = generate_key(
            vec![Attribute::Token(true), Attribute::ValueLen(32.into())],
            &s(),
        )
        .unwrap();
        assert_eq!(usage_of(&t), SecretRole::Wrap.usage());
        assert_eq!(flag(&t, AttributeType::Extractable), Some(false));
        assert_eq!(flag(&t, AttributeType::Sensitive), Some(true));
        assert_eq!(flag(&t, AttributeType::Encrypt), Some(false));
    }

    #[test]
    fn silent_dek_template_is_data() {
        let t = generate_key(vec![Attribute::ValueLen(16.into())], &s()).unwrap();
        assert_eq!(usage_of(&t), SecretRole::Data.usage());
        assert_eq!(flag(&t, AttributeType::Extractable), Some(true));
    }

    #[test]
    fn explicit_false_narrows_the_role() {
        let t = generate_key(
            vec![Attribute::Encrypt(true), Attribute::Decrypt(false)],
            &s(),
        )
        .unwrap();
        assert_eq!(usage_of(&t), Usage::ENCRYPT);
    }

    #[test]
    fn weakening_and_mixing_refused() {
        let bad = [
            vec![
                Attribute::Token(true),
                Attribute::Wrap(true),
                Attribute::Decrypt(true),
            ],
            vec![
                Attribute::Token(true),
                Attribute::Unwrap(true),
                Attribute::Encrypt(true),
            ],
            vec![Attribute::Token(true), Attribute::Extractable(true)],
            vec![Attribute::Sensitive(false)],
            vec![Attribute::Derive(true)],
            vec![Attribute::Wrap(true)],
        ];
        for t in bad {
            assert_eq!(
                code(generate_key(t.clone(), &s())),
                Err(CKR_TEMPLATE_INCONSISTENT),
                "{t:?}"
            );
        }
        assert_eq!(
            code(generate_key(vec![Attribute::Local(true)], &s())),
            Err(CKR_ATTRIBUTE_READ_ONLY)
        );
        assert_eq!(
            code(generate_key(vec![Attribute::Trusted(false)], &s())),
            Err(CKR_ATTRIBUTE_READ_ONLY)
        );
    }

    #[test]
    fn unwrap_results_are_deks() {
        assert_eq!(
            code(unwrapped(vec![Attribute::Token(true)], &s())),
            Err(CKR_TEMPLATE_INCONSISTENT)
        );
        assert_eq!(
            code(unwrapped(vec![Attribute::Unwrap(true)], &s())),
            Err(CKR_TEMPLATE_INCONSISTENT)
        );
        assert_eq!(
            code(unwrapped(vec![Attribute::Sensitive(false)], &s())),
            Err(CKR_TEMPLATE_INCONSISTENT)
        );
        let t = unwrapped(vec![secret_key_class(), aes_key_type()], &s()).unwrap();
        assert_eq!(usage_of(&t), SecretRole::Data.usage());
    }

    #[test]
    fn private_key_roles() {
        let t = private_key(vec![], CKK_RSA).unwrap();
        assert_eq!(usage_of(&t), Usage::SIGN);
        let t = private_key(vec![Attribute::Sign(true), Attribute::Derive(true)], CKK_EC).unwrap();
        assert_eq!(usage_of(&t), Usage::SIGN.with(Usage::DERIVE));
        assert_eq!(
            code(private_key(vec![Attribute::Derive(true)], CKK_RSA)),
            Err(CKR_TEMPLATE_INCONSISTENT)
        );
        assert_eq!(
            code(private_key(vec![Attribute::Extractable(true)], CKK_RSA)),
            Err(CKR_TEMPLATE_INCONSISTENT)
        );
    }

    #[test]
    fn copy_only_promotes() {
        let session_priv = KeyInfo {
            class: CKO_PRIVATE_KEY,
            usage: Usage::SIGN,
            ..KeyInfo::default()
        };
        let t = copy(
            &session_priv,
            vec![Attribute::Token(true), Attribute::Id(vec![1])],
        )
        .unwrap();
        assert_eq!(flag(&t, AttributeType::Extractable), None);
        let dek = KeyInfo {
            class: CKO_SECRET_KEY,
            usage: SecretRole::Data.usage(),
            extractable: true,
            ..KeyInfo::default()
        };
        let t = copy(&dek, vec![Attribute::Token(true)]).unwrap();
        assert_eq!(flag(&t, AttributeType::Extractable), Some(false));
        assert_eq!(
            code(copy(
                &session_priv,
                vec![Attribute::Token(true), Attribute::Sensitive(false)]
            )),
            Err(CKR_TEMPLATE_INCONSISTENT)
        );
        assert_eq!(
            code(copy(&session_priv, vec![Attribute::Label(vec![])])),
            Err(CKR_ACTION_PROHIBITED)
        );
        let token_priv = KeyInfo {
            token: true,
            ..session_priv
        };
        assert_eq!(
            code(copy(&token_priv, vec![Attribute::Token(true)])),
            Err(CKR_ACTION_PROHIBITED)
        );
    }

    #[test]
    fn sticky_attributes() {
        let k = KeyInfo {
            class: CKO_SECRET_KEY,
            token: true,
            ..KeyInfo::default()
        };
        assert_eq!(
            code(set(&k, &[Attribute::Decrypt(true)])),
            Err(CKR_ATTRIBUTE_READ_ONLY)
        );
        assert_eq!(
            code(set(&k, &[Attribute::Sensitive(false)])),
            Err(CKR_ATTRIBUTE_READ_ONLY)
        );
        assert_eq!(set(&k, &[Attribute::Label(b"x".to_vec())]), Ok(()));
    }
}
