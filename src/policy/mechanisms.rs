//! Mechanism allow-lists per role, and what `C_GetMechanismList`/`Info` report.

use cryptoki_sys::*;

/// AES key wrap (RFC 3394) and with padding (RFC 5649): the only wrapping mechanisms.
pub fn is_key_wrap(m: CK_MECHANISM_TYPE) -> bool {
    matches!(m, CKM_AES_KEY_WRAP | CKM_AES_KEY_WRAP_PAD)
}

/// Ciphers a data CMK may use.
pub fn is_cmk_cipher(m: CK_MECHANISM_TYPE) -> bool {
    matches!(m, CKM_AES_GCM | CKM_AES_CBC_PAD)
}

/// Ciphers a data DEK may use (a DEK can never wrap, so raw modes forge nothing).
pub fn is_dek_cipher(m: CK_MECHANISM_TYPE) -> bool {
    matches!(m, CKM_AES_GCM | CKM_AES_CBC_PAD | CKM_AES_CBC | CKM_AES_ECB)
}

/// MACs for mac keys.
pub fn is_mac(m: CK_MECHANISM_TYPE) -> bool {
    matches!(
        m,
        CKM_SHA_1_HMAC
            | CKM_SHA224_HMAC
            | CKM_SHA256_HMAC
            | CKM_SHA384_HMAC
            | CKM_SHA512_HMAC
            | CKM_AES_CMAC
    )
}

/// RSA signature mechanisms.
pub fn is_rsa_signature(m: CK_MECHANISM_TYPE) -> bool {
    matches!(
        m,
        CKM_RSA_PKCS
            | CKM_SHA1_RSA_PKCS
            | CKM_SHA224_RSA_PKCS
            | CKM_SHA256_RSA_PKCS
            | CKM_SHA384_RSA_PKCS
            | CKM_SHA512_RSA_PKCS
            | CKM_RSA_PKCS_PSS
            | CKM_SHA1_RSA_PKCS_PSS
            | CKM_SHA224_RSA_PKCS_PSS
            | CKM_SHA256_RSA_PKCS_PSS
            | CKM_SHA384_RSA_PKCS_PSS
            | CKM_SHA512_RSA_PKCS_PSS
    )
}

/// ECDSA mechanisms.
pub fn is_ecdsa(m: CK_MECHANISM_TYPE) -> bool {
    matches!(
        m,
        CKM_ECDSA
            | CKM_ECDSA_SHA1
            | CKM_ECDSA_SHA224
            | CKM_ECDSA_SHA256
            | CKM_ECDSA_SHA384
            | CKM_ECDSA_SHA512
    )
}

/// A signature mechanism that fits a private key of type `kt`.
pub fn is_signature(m: CK_MECHANISM_TYPE, kt: CK_KEY_TYPE) -> bool {
    match kt {
        CKK_RSA => is_rsa_signature(m),
        CKK_EC => is_ecdsa(m),
        CKK_EC_EDWARDS => m == CKM_EDDSA,
        _ => false,
    }
}

/// Key and key-pair generation mechanisms.
pub fn is_generation(m: CK_MECHANISM_TYPE) -> bool {
    matches!(
        m,
        CKM_AES_KEY_GEN
            | CKM_GENERIC_SECRET_KEY_GEN
            | CKM_SHA_1_KEY_GEN
            | CKM_SHA224_KEY_GEN
            | CKM_SHA256_KEY_GEN
            | CKM_SHA384_KEY_GEN
            | CKM_SHA512_KEY_GEN
            | CKM_RSA_PKCS_KEY_PAIR_GEN
            | CKM_EC_KEY_PAIR_GEN
            | CKM_EC_EDWARDS_KEY_PAIR_GEN
    )
}

/// Digest mechanisms (`C_DigestInit`).
pub fn is_digest(m: CK_MECHANISM_TYPE) -> bool {
    matches!(
        m,
        CKM_SHA_1 | CKM_SHA224 | CKM_SHA256 | CKM_SHA384 | CKM_SHA512
    )
}

/// Whether mechanism `m` can serve a `C_*Init` of kind `op` (`None`: digest) at all, by
/// its type alone: checked before its parameter is read, so that a mechanism given to
/// the wrong function is `CKR_MECHANISM_INVALID` whatever its parameter (never a
/// backend's answer to a call it was not made for).
#[inline]
pub fn fits_init(op: Option<super::Op>, m: CK_MECHANISM_TYPE) -> bool {
    match op {
        None => is_digest(m),
        Some(op) => fits_op(op, m),
    }
}

/// Whether mechanism `m` can do `op` at all under the policy (AES key wrap never
/// encrypts; a MAC never wraps; CBC/ECB/GCM never unwrap...).
pub fn fits_op(op: super::Op, m: CK_MECHANISM_TYPE) -> bool {
    use super::Op;
    match op {
        Op::Encrypt | Op::Decrypt => {
            is_dek_cipher(m) || matches!(m, CKM_RSA_PKCS_OAEP | CKM_RSA_PKCS)
        }
        Op::Sign | Op::Verify => is_mac(m) || is_rsa_signature(m) || is_ecdsa(m) || m == CKM_EDDSA,
        Op::Wrap => is_key_wrap(m) || m == CKM_RSA_PKCS_OAEP,
        Op::Unwrap => is_key_wrap(m) || m == CKM_RSA_PKCS_OAEP,
        Op::Derive => m == CKM_ECDH1_DERIVE,
    }
}

/// Whether a key of type `kt` fits mechanism `m` (else `CKR_KEY_TYPE_INCONSISTENT`).
pub fn key_type_fits(m: CK_MECHANISM_TYPE, kt: CK_KEY_TYPE) -> bool {
    if is_key_wrap(m) || is_dek_cipher(m) || m == CKM_AES_CMAC {
        kt == CKK_AES
    } else if is_mac(m) {
        matches!(
            kt,
            CKK_GENERIC_SECRET
                | CKK_SHA_1_HMAC
                | CKK_SHA224_HMAC
                | CKK_SHA256_HMAC
                | CKK_SHA384_HMAC
                | CKK_SHA512_HMAC
        )
    } else if is_rsa_signature(m) || m == CKM_RSA_PKCS_OAEP {
        kt == CKK_RSA
    } else if is_ecdsa(m) || m == CKM_ECDH1_DERIVE {
        kt == CKK_EC
    } else if m == CKM_EDDSA {
        kt == CKK_EC_EDWARDS
    } else {
        true
    }
}

/// Whether cmkp11 offers a mechanism at all. Not offered, whatever the backend has:
/// raw RSA (`CKM_RSA_X_509`), DES, key-derivation-by-encryption (`*_ENCRYPT_DATA`),
/// `CONCATENATE_*`, `XOR_BASE_AND_DATA`, `EXTRACT_KEY_FROM_KEY`.
pub fn offered(m: CK_MECHANISM_TYPE) -> bool {
    is_key_wrap(m)
        || is_dek_cipher(m)
        || is_mac(m)
        || is_rsa_signature(m)
        || is_ecdsa(m)
        || is_generation(m)
        || matches!(m, CKM_RSA_PKCS_OAEP | CKM_ECDH1_DERIVE | CKM_EDDSA)
        || is_digest(m)
}

/// The mechanism-info flags cmkp11 reports: the backend's, less what the policy refuses.
pub fn reported_flags(
    m: CK_MECHANISM_TYPE,
    flags: CK_FLAGS,
    allow_rsa_pkcs1_decrypt: bool,
) -> CK_FLAGS {
    let wrapping = CKF_WRAP | CKF_UNWRAP;
    let cipher = CKF_ENCRYPT | CKF_DECRYPT;
    let mut f = flags & !(CKF_SIGN_RECOVER | CKF_VERIFY_RECOVER);
    if is_key_wrap(m) {
        f &= !cipher & !CKF_DERIVE;
    } else if m == CKM_RSA_PKCS_OAEP {
        // OAEP unwraps into a session DEK; wrapping under a public key is refused.
        f &= !CKF_WRAP & !CKF_DERIVE;
    } else if m == CKM_ECDH1_DERIVE {
        f &= CKF_DERIVE
            | CKF_HW
            | CKF_EC_F_P
            | CKF_EC_F_2M
            | CKF_EC_ECPARAMETERS
            | CKF_EC_OID
            | CKF_EC_UNCOMPRESS
            | CKF_EC_COMPRESS;
    } else {
        f &= !wrapping & !CKF_DERIVE;
    }
    if m == CKM_RSA_PKCS && !allow_rsa_pkcs1_decrypt {
        f &= !CKF_DECRYPT;
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dangerous_mechanisms_are_not_offered() {
        for m in [
            CKM_RSA_X_509,
            CKM_DES3_ECB,
            CKM_DES3_CBC,
            CKM_AES_ECB_ENCRYPT_DATA,
            CKM_AES_CBC_ENCRYPT_DATA,
            CKM_CONCATENATE_BASE_AND_KEY,
            CKM_CONCATENATE_BASE_AND_DATA,
            CKM_XOR_BASE_AND_DATA,
            CKM_EXTRACT_KEY_FROM_KEY,
        ] {
            assert!(!offered(m), "{m:#x}");
        }
        assert!(offered(CKM_AES_KEY_WRAP_PAD) && offered(CKM_AES_GCM) && offered(CKM_ECDH1_DERIVE));
    }

    #[test]
    fn flags_drop_refused_uses() {
        let all = CKF_ENCRYPT | CKF_DECRYPT | CKF_WRAP | CKF_UNWRAP | CKF_SIGN | CKF_DERIVE;
        assert_eq!(
            reported_flags(CKM_AES_KEY_WRAP_PAD, all, false),
            CKF_WRAP | CKF_UNWRAP | CKF_SIGN
        );
        assert_eq!(
            reported_flags(CKM_AES_CBC, all, false) & (CKF_WRAP | CKF_UNWRAP),
            0
        );
        assert_eq!(reported_flags(CKM_RSA_PKCS, all, false) & CKF_DECRYPT, 0);
        assert_ne!(reported_flags(CKM_RSA_PKCS, all, true) & CKF_DECRYPT, 0);
    }
}
