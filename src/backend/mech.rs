//! Mechanisms as owned data: what an application passed, parsed and length-checked by the
//! FFI layer, kept in the session between `*Init` and the operation, and turned into a
//! cryptoki [`Mechanism`] when the backend is called.

use crate::error::{err, Result};
use cryptoki::mechanism::elliptic_curve::{EcKdf, Ecdh1DeriveParams};
use cryptoki::mechanism::{aead, eddsa, rsa, Mechanism, MechanismType};
use cryptoki_sys::*;

/// The parameter shape a mechanism takes. The FFI layer checks the length of the
/// application's parameter against this before reading a byte of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    /// No parameter (`pParameter` NULL, length 0).
    None,
    /// A 16-byte IV.
    Iv16,
    /// An 8-byte IV.
    Iv8,
    /// `CK_GCM_PARAMS` (v3.0 layout, 48 bytes on LP64).
    Gcm,
    /// `CK_RSA_PKCS_PSS_PARAMS`.
    Pss,
    /// `CK_RSA_PKCS_OAEP_PARAMS`.
    Oaep,
    /// `CK_ECDH1_DERIVE_PARAMS`.
    Ecdh1,
    /// `CK_EDDSA_PARAMS`, optional.
    Eddsa,
}

/// A short owned byte string (an IV, additional data) kept inline up to 32 bytes, so that
/// parsing the usual AES-GCM parameter allocates nothing on the data path.
pub type Bytes = smallvec::SmallVec<[u8; 32]>;

/// The parameter of a mechanism, owned.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Param {
    /// No parameter.
    None,
    /// A 16-byte IV (AES-CBC).
    Iv16([u8; 16]),
    /// An 8-byte IV (DES-CBC).
    Iv8([u8; 8]),
    /// AES-GCM: IV, additional data, tag length in bits.
    Gcm {
        /// The IV.
        iv: Bytes,
        /// Additional authenticated data.
        aad: Bytes,
        /// Tag length in bits.
        tag_bits: CK_ULONG,
    },
    /// RSA-PSS: hash, MGF, salt length.
    Pss {
        /// Hash mechanism.
        hash: CK_MECHANISM_TYPE,
        /// MGF type.
        mgf: CK_RSA_PKCS_MGF_TYPE,
        /// Salt length.
        salt: CK_ULONG,
    },
    /// RSA-OAEP: hash, MGF, optional label.
    Oaep {
        /// Hash mechanism.
        hash: CK_MECHANISM_TYPE,
        /// MGF type.
        mgf: CK_RSA_PKCS_MGF_TYPE,
        /// The label (`CKZ_DATA_SPECIFIED`), if any.
        label: Option<Vec<u8>>,
    },
    /// ECDH1: KDF, shared data, the peer's public value.
    Ecdh1 {
        /// `CKD_*`.
        kdf: CK_EC_KDF_TYPE,
        /// Shared info for the KDF.
        shared: Vec<u8>,
        /// The other party's public point.
        public: Vec<u8>,
    },
    /// EdDSA: pre-hash flag and context, if given.
    Eddsa {
        /// Ed25519ph / Ed448ph.
        prehash: bool,
        /// Context data, `None` when no parameter was given.
        context: Option<Vec<u8>>,
    },
}

/// A mechanism with its owned parameter.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Mech {
    /// `CKM_*`.
    pub ty: CK_MECHANISM_TYPE,
    /// Its parameter.
    pub param: Param,
}

impl Mech {
    /// Calls `f` with a `CK_MECHANISM` pointing into `self`, for the parameter shapes of
    /// the data path (none, a 16-byte IV, AES-GCM, RSA-PSS), without building a cryptoki
    /// [`Mechanism`] first; `None` for any other shape (use [`Mech::to_cryptoki`]).
    pub fn with_raw<R>(&mut self, f: impl FnOnce(&mut CK_MECHANISM) -> R) -> Option<R> {
        let ty = self.ty;
        let mech = |p: *mut std::ffi::c_void, len: usize| CK_MECHANISM {
            mechanism: ty,
            pParameter: p,
            ulParameterLen: len as CK_ULONG,
        };
        match &mut self.param {
            Param::None => Some(f(&mut mech(std::ptr::null_mut(), 0))),
            Param::Iv16(iv) => Some(f(&mut mech(iv.as_mut_ptr().cast(), iv.len()))),
            Param::Gcm { iv, aad, tag_bits } => {
                let mut g = CK_GCM_PARAMS {
                    pIv: iv.as_mut_ptr(),
                    ulIvLen: iv.len() as CK_ULONG,
                    ulIvBits: (iv.len() * 8) as CK_ULONG,
                    pAAD: aad.as_mut_ptr(),
                    ulAADLen: aad.len() as CK_ULONG,
                    ulTagBits: *tag_bits,
                };
                let p = (&mut g as *mut CK_GCM_PARAMS).cast();
                Some(f(&mut mech(p, std::mem::size_of::<CK_GCM_PARAMS>())))
            }
            // PSS goes to the token as the application gave it: cryptoki knows neither
            // CKM_SHA224_RSA_PKCS_PSS nor a SHA-224 hash in the parameter.
            Param::Pss { hash, mgf, salt } => {
                let mut p = CK_RSA_PKCS_PSS_PARAMS {
                    hashAlg: *hash,
                    mgf: *mgf,
                    sLen: *salt,
                };
                let ptr = (&mut p as *mut CK_RSA_PKCS_PSS_PARAMS).cast();
                Some(f(&mut mech(
                    ptr,
                    std::mem::size_of::<CK_RSA_PKCS_PSS_PARAMS>(),
                )))
            }
            _ => None,
        }
    }
}

/// Whether the backend may refuse this mechanism's parameter values that cmkp11 cannot
/// judge itself (which OAEP/PSS hashes, EdDSA variants it implements): such a mechanism
/// is probed at `*Init` (see `Session::probe`).
pub fn needs_probe(m: &Mech) -> bool {
    matches!(
        m.param,
        Param::Pss { .. }
            | Param::Oaep { .. }
            | Param::Eddsa {
                context: Some(_),
                ..
            }
    )
}

/// The parameter shape of a mechanism cmkp11 can forward, or `None` if it cannot.
pub fn param_kind(ty: CK_MECHANISM_TYPE) -> Option<ParamKind> {
    use ParamKind as K;
    Some(match ty {
        CKM_AES_KEY_GEN
        | CKM_AES_ECB
        | CKM_AES_KEY_WRAP
        | CKM_AES_KEY_WRAP_PAD
        | CKM_AES_CMAC
        | CKM_RSA_PKCS_KEY_PAIR_GEN
        | CKM_RSA_PKCS
        | CKM_RSA_X_509
        | CKM_DES_KEY_GEN
        | CKM_DES2_KEY_GEN
        | CKM_DES3_KEY_GEN
        | CKM_DES_ECB
        | CKM_DES3_ECB
        | CKM_EC_KEY_PAIR_GEN
        | CKM_EC_EDWARDS_KEY_PAIR_GEN
        | CKM_EC_MONTGOMERY_KEY_PAIR_GEN
        | CKM_ECDSA
        | CKM_ECDSA_SHA1
        | CKM_ECDSA_SHA224
        | CKM_ECDSA_SHA256
        | CKM_ECDSA_SHA384
        | CKM_ECDSA_SHA512
        | CKM_SHA_1
        | CKM_SHA224
        | CKM_SHA256
        | CKM_SHA384
        | CKM_SHA512
        | CKM_SHA1_RSA_PKCS
        | CKM_SHA224_RSA_PKCS
        | CKM_SHA256_RSA_PKCS
        | CKM_SHA384_RSA_PKCS
        | CKM_SHA512_RSA_PKCS
        | CKM_SHA_1_HMAC
        | CKM_SHA224_HMAC
        | CKM_SHA256_HMAC
        | CKM_SHA384_HMAC
        | CKM_SHA512_HMAC
        | CKM_SHA_1_KEY_GEN
        | CKM_SHA224_KEY_GEN
        | CKM_SHA256_KEY_GEN
        | CKM_SHA384_KEY_GEN
        | CKM_SHA512_KEY_GEN
        | CKM_GENERIC_SECRET_KEY_GEN => K::None,
        CKM_AES_CBC | CKM_AES_CBC_PAD => K::Iv16,
        CKM_DES_CBC | CKM_DES3_CBC | CKM_DES_CBC_PAD | CKM_DES3_CBC_PAD => K::Iv8,
        CKM_AES_GCM => K::Gcm,
        CKM_RSA_PKCS_PSS
        | CKM_SHA1_RSA_PKCS_PSS
        | CKM_SHA224_RSA_PKCS_PSS
        | CKM_SHA256_RSA_PKCS_PSS
        | CKM_SHA384_RSA_PKCS_PSS
        | CKM_SHA512_RSA_PKCS_PSS => K::Pss,
        CKM_RSA_PKCS_OAEP => K::Oaep,
        CKM_ECDH1_DERIVE => K::Ecdh1,
        CKM_EDDSA => K::Eddsa,
        _ => return None,
    })
}

fn mech_type(ty: CK_MECHANISM_TYPE) -> Result<MechanismType> {
    MechanismType::try_from(ty).or(err(CKR_MECHANISM_PARAM_INVALID))
}

impl Mech {
    /// A mechanism without parameter.
    pub fn plain(ty: CK_MECHANISM_TYPE) -> Mech {
        Mech {
            ty,
            param: Param::None,
        }
    }

    /// The cryptoki form, borrowing this mechanism's parameter.
    pub fn to_cryptoki(&mut self) -> Result<Mechanism<'_>> {
        let ty = self.ty;
        let bad = || err(CKR_MECHANISM_PARAM_INVALID);
        Ok(match &mut self.param {
            Param::None => match ty {
                CKM_AES_KEY_GEN => Mechanism::AesKeyGen,
                CKM_AES_ECB => Mechanism::AesEcb,
                CKM_AES_KEY_WRAP => Mechanism::AesKeyWrap,
                CKM_AES_KEY_WRAP_PAD => Mechanism::AesKeyWrapPad,
                CKM_AES_CMAC => Mechanism::AesCMac,
                CKM_RSA_PKCS_KEY_PAIR_GEN => Mechanism::RsaPkcsKeyPairGen,
                CKM_RSA_PKCS => Mechanism::RsaPkcs,
                CKM_RSA_X_509 => Mechanism::RsaX509,
                CKM_DES_KEY_GEN => Mechanism::DesKeyGen,
                CKM_DES2_KEY_GEN => Mechanism::Des2KeyGen,
                CKM_DES3_KEY_GEN => Mechanism::Des3KeyGen,
                CKM_DES_ECB => Mechanism::DesEcb,
                CKM_DES3_ECB => Mechanism::Des3Ecb,
                CKM_EC_KEY_PAIR_GEN => Mechanism::EccKeyPairGen,
                CKM_EC_EDWARDS_KEY_PAIR_GEN => Mechanism::EccEdwardsKeyPairGen,
                CKM_EC_MONTGOMERY_KEY_PAIR_GEN => Mechanism::EccMontgomeryKeyPairGen,
                CKM_ECDSA => Mechanism::Ecdsa,
                CKM_ECDSA_SHA1 => Mechanism::EcdsaSha1,
                CKM_ECDSA_SHA224 => Mechanism::EcdsaSha224,
                CKM_ECDSA_SHA256 => Mechanism::EcdsaSha256,
                CKM_ECDSA_SHA384 => Mechanism::EcdsaSha384,
                CKM_ECDSA_SHA512 => Mechanism::EcdsaSha512,
                CKM_SHA_1 => Mechanism::Sha1,
                CKM_SHA224 => Mechanism::Sha224,
                CKM_SHA256 => Mechanism::Sha256,
                CKM_SHA384 => Mechanism::Sha384,
                CKM_SHA512 => Mechanism::Sha512,
                CKM_SHA1_RSA_PKCS => Mechanism::Sha1RsaPkcs,
                CKM_SHA224_RSA_PKCS => Mechanism::Sha224RsaPkcs,
                CKM_SHA256_RSA_PKCS => Mechanism::Sha256RsaPkcs,
                CKM_SHA384_RSA_PKCS => Mechanism::Sha384RsaPkcs,
                CKM_SHA512_RSA_PKCS => Mechanism::Sha512RsaPkcs,
                CKM_SHA_1_HMAC => Mechanism::Sha1Hmac,
                CKM_SHA224_HMAC => Mechanism::Sha224Hmac,
                CKM_SHA256_HMAC => Mechanism::Sha256Hmac,
                CKM_SHA384_HMAC => Mechanism::Sha384Hmac,
                CKM_SHA512_HMAC => Mechanism::Sha512Hmac,
                CKM_SHA_1_KEY_GEN => Mechanism::Sha1KeyGen,
                CKM_SHA224_KEY_GEN => Mechanism::Sha224KeyGen,
                CKM_SHA256_KEY_GEN => Mechanism::Sha256KeyGen,
                CKM_SHA384_KEY_GEN => Mechanism::Sha384KeyGen,
                CKM_SHA512_KEY_GEN => Mechanism::Sha512KeyGen,
                CKM_GENERIC_SECRET_KEY_GEN => Mechanism::GenericSecretKeyGen,
                CKM_EDDSA => {
                    Mechanism::Eddsa(eddsa::EddsaParams::new(eddsa::EddsaSignatureScheme::Pure))
                }
                _ => return bad(),
            },
            Param::Iv16(iv) => match ty {
                CKM_AES_CBC => Mechanism::AesCbc(*iv),
                CKM_AES_CBC_PAD => Mechanism::AesCbcPad(*iv),
                _ => return bad(),
            },
            Param::Iv8(iv) => match ty {
                CKM_DES_CBC => Mechanism::DesCbc(*iv),
                CKM_DES3_CBC => Mechanism::Des3Cbc(*iv),
                CKM_DES_CBC_PAD => Mechanism::DesCbcPad(*iv),
                CKM_DES3_CBC_PAD => Mechanism::Des3CbcPad(*iv),
                _ => return bad(),
            },
            Param::Gcm { iv, aad, tag_bits } => Mechanism::AesGcm(
                aead::GcmParams::new(iv, aad, (*tag_bits).into())
                    .or(err(CKR_MECHANISM_PARAM_INVALID))?,
            ),
            Param::Pss { hash, mgf, salt } => {
                let p = rsa::PkcsPssParams {
                    hash_alg: mech_type(*hash)?,
                    mgf: rsa::PkcsMgfType::try_from(*mgf).or(err(CKR_MECHANISM_PARAM_INVALID))?,
                    s_len: (*salt).into(),
                };
                match ty {
                    CKM_RSA_PKCS_PSS => Mechanism::RsaPkcsPss(p),
                    CKM_SHA1_RSA_PKCS_PSS => Mechanism::Sha1RsaPkcsPss(p),
                    CKM_SHA256_RSA_PKCS_PSS => Mechanism::Sha256RsaPkcsPss(p),
                    CKM_SHA384_RSA_PKCS_PSS => Mechanism::Sha384RsaPkcsPss(p),
                    CKM_SHA512_RSA_PKCS_PSS => Mechanism::Sha512RsaPkcsPss(p),
                    _ => return bad(),
                }
            }
            Param::Oaep { hash, mgf, label } => {
                let source = match label {
                    Some(l) => rsa::PkcsOaepSource::data_specified(l),
                    None => rsa::PkcsOaepSource::empty(),
                };
                Mechanism::RsaPkcsOaep(rsa::PkcsOaepParams::new(
                    mech_type(*hash)?,
                    rsa::PkcsMgfType::try_from(*mgf).or(err(CKR_MECHANISM_PARAM_INVALID))?,
                    source,
                ))
            }
            Param::Ecdh1 {
                kdf,
                shared,
                public,
            } => {
                let kdf = match *kdf {
                    CKD_NULL if shared.is_empty() => EcKdf::null(),
                    CKD_SHA1_KDF => EcKdf::sha1(shared),
                    CKD_SHA224_KDF => EcKdf::sha224(shared),
                    CKD_SHA256_KDF => EcKdf::sha256(shared),
                    CKD_SHA384_KDF => EcKdf::sha384(shared),
                    CKD_SHA512_KDF => EcKdf::sha512(shared),
                    _ => return bad(),
                };
                Mechanism::Ecdh1Derive(Ecdh1DeriveParams::new(kdf, public))
            }
            Param::Eddsa { prehash, context } => {
                use eddsa::EddsaSignatureScheme as S;
                let scheme = match (context.as_deref(), *prehash) {
                    (None, false) => S::Pure,
                    (Some(c), false) => S::Ed25519ctx(c),
                    (Some(c), true) => S::Ed25519ph(c),
                    (None, true) => S::Ed25519ph(&[]),
                };
                Mechanism::Eddsa(eddsa::EddsaParams::new(scheme))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_forwardable_plain_mechanism_converts() {
        for ty in 0..0x2000u64 {
            if param_kind(ty) == Some(ParamKind::None) {
                let mut m = Mech::plain(ty);
                let c = m.to_cryptoki().unwrap_or_else(|_| panic!("{ty:#x}"));
                assert_eq!(*c.mechanism_type(), ty);
            }
        }
    }

    #[test]
    fn raw_mechanisms_match_cryptokis_conversion() {
        let mut m = Mech {
            ty: CKM_AES_GCM,
            param: Param::Gcm {
                iv: Bytes::from_slice(&[1; 12]),
                aad: Bytes::from_slice(b"header"),
                tag_bits: 96,
            },
        };
        let mut copy = m.clone();
        let c = copy.to_cryptoki().unwrap();
        let want = CK_MECHANISM::from(&c);
        let got = m
            .with_raw(|ck| (ck.mechanism, ck.ulParameterLen, ck.pParameter.is_null()))
            .unwrap();
        assert_eq!(got, (want.mechanism, want.ulParameterLen, false));
        let mut none = Mech {
            ty: CKM_AES_KEY_WRAP_PAD,
            param: Param::None,
        };
        assert_eq!(
            none.with_raw(|ck| (ck.pParameter.is_null(), ck.ulParameterLen)),
            Some((true, 0))
        );
        let mut cbc = Mech {
            ty: CKM_AES_CBC_PAD,
            param: Param::Iv16([3; 16]),
        };
        assert_eq!(cbc.with_raw(|ck| ck.ulParameterLen), Some(16));
        let mut pss = Mech {
            ty: CKM_RSA_PKCS_PSS,
            param: Param::Pss {
                hash: CKM_SHA256,
                mgf: CKG_MGF1_SHA256,
                salt: 32,
            },
        };
        assert_eq!(
            pss.with_raw(|ck| (ck.mechanism, ck.ulParameterLen)),
            Some((
                CKM_RSA_PKCS_PSS,
                std::mem::size_of::<CK_RSA_PKCS_PSS_PARAMS>() as CK_ULONG
            ))
        );
        let mut oaep = Mech {
            ty: CKM_RSA_PKCS_OAEP,
            param: Param::Oaep {
                hash: CKM_SHA_1,
                mgf: CKG_MGF1_SHA1,
                label: None,
            },
        };
        assert_eq!(
            oaep.with_raw(|_| ()),
            None,
            "other shapes go through cryptoki"
        );
    }

    /// One list per concept: the policy's allow-list (`policy::mechanisms::offered`) names
    /// only mechanisms whose parameter this layer can check and forward.
    #[test]
    fn every_offered_mechanism_can_be_forwarded() {
        let mut offered = 0;
        for ty in (0..0x2000u64).chain(CKM_VENDOR_DEFINED..CKM_VENDOR_DEFINED + 0x100) {
            if crate::policy::mechanisms::offered(ty) {
                offered += 1;
                assert!(
                    param_kind(ty).is_some(),
                    "offered but not forwardable: {ty:#x}"
                );
            }
        }
        assert!(offered > 40, "{offered}");
    }

    #[test]
    fn gcm_converts_and_unknown_is_refused() {
        let mut m = Mech {
            ty: CKM_AES_GCM,
            param: Param::Gcm {
                iv: Bytes::from_elem(0, 12),
                aad: Bytes::new(),
                tag_bits: 128,
            },
        };
        assert_eq!(*m.to_cryptoki().unwrap().mechanism_type(), CKM_AES_GCM);
        assert!(param_kind(CKM_VENDOR_DEFINED).is_none());
        let mut bad = Mech::plain(CKM_AES_CBC);
        assert_eq!(
            bad.to_cryptoki().unwrap_err().rv(),
            CKR_MECHANISM_PARAM_INVALID
        );
    }
}
