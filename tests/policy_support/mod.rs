//! Helpers for the CMK policy suites (`attacks.rs`, `legit_flows.rs`, `plaintext_import.rs`).
//!
//! Everything goes through the raw PKCS#11 function table of the module under test (the
//! table of [`crate::common::raw`]), exactly as a C application or an attacker would call
//! it, so that every refusal can be asserted with its exact `CK_RV`.
//!
//! The module is initialised once per test process by [`init`], which may first append
//! extra TOML (e.g. a `[policy]` table) to the cmkp11 config that `tests/common` wrote.
#![allow(dead_code)]

use std::ffi::c_void;
use std::ptr;
use std::sync::OnceLock;

use cryptoki_sys::*;

use crate::common::{
    raw, raw_login, raw_open_session, raw_token_slot, rv_name, test_env, Template,
};

/// Result of a PKCS#11 call: the value, or the `CK_RV` it failed with.
pub type Rv<T> = Result<T, CK_RV>;

static INIT: OnceLock<CK_SLOT_ID> = OnceLock::new();

/// Initialises the module under test once per process (after appending `extra_config` to
/// the cmkp11 config file, if not empty), logs the user in, and returns the test slot.
pub fn init(extra_config: &str) -> CK_SLOT_ID {
    *INIT.get_or_init(|| {
        let env = test_env();
        if !extra_config.is_empty() {
            let mut text = std::fs::read_to_string(&env.cmkp11_conf).expect("read cmkp11.toml");
            if !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str(extra_config);
            // Rewriting the existing file keeps its mode (600).
            std::fs::write(&env.cmkp11_conf, text).expect("write cmkp11.toml");
        }
        let mut args = CK_C_INITIALIZE_ARGS {
            CreateMutex: None,
            DestroyMutex: None,
            LockMutex: None,
            UnlockMutex: None,
            flags: CKF_OS_LOCKING_OK,
            pReserved: ptr::null_mut(),
        };
        let rv = ck!(
            raw().f,
            C_Initialize,
            &mut args as *mut CK_C_INITIALIZE_ARGS as *mut c_void
        );
        assert!(
            rv == CKR_OK || rv == CKR_CRYPTOKI_ALREADY_INITIALIZED,
            "C_Initialize: {}",
            rv_name(rv)
        );
        let slot = raw_token_slot();
        let s = raw_open_session(slot);
        raw_login(s);
        // Keep this session open: login state lives as long as one session does.
        slot
    })
}

/// Panics unless `r` failed with exactly `want`.
#[track_caller]
pub fn expect_rv<T: std::fmt::Debug>(r: Rv<T>, want: CK_RV, what: &str) {
    match r {
        Ok(v) => panic!(
            "{what}: expected {}, got CKR_OK ({v:?}) -- the attack succeeded",
            rv_name(want)
        ),
        Err(got) => assert!(
            got == want,
            "{what}: expected {}, got {}",
            rv_name(want),
            rv_name(got)
        ),
    }
}

/// Panics unless `r` failed with one of `wants` (used only where the policy contract
/// names two rules that both apply and does not say which one wins).
#[track_caller]
pub fn expect_rv_in<T: std::fmt::Debug>(r: Rv<T>, wants: &[CK_RV], what: &str) {
    let names: Vec<String> = wants.iter().map(|w| rv_name(*w)).collect();
    match r {
        Ok(v) => {
            panic!("{what}: expected one of {names:?}, got CKR_OK ({v:?}) -- the attack succeeded")
        }
        Err(got) => assert!(
            wants.contains(&got),
            "{what}: expected one of {names:?}, got {}",
            rv_name(got)
        ),
    }
}

/// Unwraps a successful call, with the failing code in the panic message.
#[track_caller]
pub fn ok<T>(r: Rv<T>, what: &str) -> T {
    match r {
        Ok(v) => v,
        Err(rv) => panic!("{what}: expected CKR_OK, got {}", rv_name(rv)),
    }
}

fn rv(rv: CK_RV) -> Rv<()> {
    if rv == CKR_OK {
        Ok(())
    } else {
        Err(rv)
    }
}

/// A mechanism with an owned parameter (pointers inside point into owned buffers).
pub struct Mech {
    /// Mechanism type.
    pub ty: CK_MECHANISM_TYPE,
    param: Vec<u64>,
    len: usize,
    _aux: Vec<Vec<u8>>,
}

impl Mech {
    /// A mechanism without parameter.
    pub fn new(ty: CK_MECHANISM_TYPE) -> Self {
        Mech {
            ty,
            param: Vec::new(),
            len: 0,
            _aux: Vec::new(),
        }
    }

    /// AES-KWP (RFC 5649), the envelope wrap: AES-KW (RFC 3394) on a token without it
    /// (kryoptic 1.0, `common::token_has_kwp`), where cmkp11 refuses AES-KWP.
    pub fn kwp() -> Self {
        Mech::new(if crate::common::token_has_kwp() {
            CKM_AES_KEY_WRAP_PAD
        } else {
            CKM_AES_KEY_WRAP
        })
    }

    fn with<T: Copy>(ty: CK_MECHANISM_TYPE, v: T, aux: Vec<Vec<u8>>) -> Self {
        let len = std::mem::size_of::<T>();
        let mut param = vec![0u64; len.div_ceil(8)];
        // SAFETY: `param` holds at least `len` bytes and is 8-aligned; T is plain C data.
        unsafe { ptr::write(param.as_mut_ptr() as *mut T, v) };
        Mech {
            ty,
            param,
            len,
            _aux: aux,
        }
    }

    /// A mechanism whose parameter is the raw bytes `p` (e.g. an IV).
    pub fn bytes(ty: CK_MECHANISM_TYPE, p: &[u8]) -> Self {
        let mut param = vec![0u64; p.len().div_ceil(8)];
        // SAFETY: `param` holds at least `p.len()` bytes.
        unsafe { ptr::copy_nonoverlapping(p.as_ptr(), param.as_mut_ptr() as *mut u8, p.len()) };
        Mech {
            ty,
            param,
            len: p.len(),
            _aux: Vec::new(),
        }
    }

    /// A CK_ULONG parameter (e.g. `CKM_EXTRACT_KEY_FROM_KEY`'s bit index, or an object
    /// handle for `CKM_CONCATENATE_BASE_AND_KEY`).
    pub fn ulong(ty: CK_MECHANISM_TYPE, v: CK_ULONG) -> Self {
        Self::with(ty, v, Vec::new())
    }

    /// AES-GCM with a 96-bit IV, `aad` and a 128-bit tag.
    pub fn gcm(iv: &[u8], aad: &[u8]) -> Self {
        let mut iv = iv.to_vec();
        let mut aad = aad.to_vec();
        let p = CK_GCM_PARAMS {
            pIv: iv.as_mut_ptr(),
            ulIvLen: iv.len() as CK_ULONG,
            ulIvBits: (iv.len() * 8) as CK_ULONG,
            pAAD: if aad.is_empty() {
                ptr::null_mut()
            } else {
                aad.as_mut_ptr()
            },
            ulAADLen: aad.len() as CK_ULONG,
            ulTagBits: 128,
        };
        Self::with(CKM_AES_GCM, p, vec![iv, aad])
    }

    /// RSA-OAEP with SHA-1 / MGF1-SHA-1 and no label (the only OAEP parameters
    /// SoftHSM2 2.6 accepts).
    pub fn oaep() -> Self {
        let p = CK_RSA_PKCS_OAEP_PARAMS {
            hashAlg: CKM_SHA_1,
            mgf: CKG_MGF1_SHA1,
            source: CKZ_DATA_SPECIFIED,
            pSourceData: ptr::null_mut(),
            ulSourceDataLen: 0,
        };
        Self::with(CKM_RSA_PKCS_OAEP, p, Vec::new())
    }

    /// RSA-PSS (`ty` = `CKM_RSA_PKCS_PSS` or `CKM_SHA256_RSA_PKCS_PSS`), SHA-256, salt 32.
    pub fn pss(ty: CK_MECHANISM_TYPE) -> Self {
        let p = CK_RSA_PKCS_PSS_PARAMS {
            hashAlg: CKM_SHA256,
            mgf: CKG_MGF1_SHA256,
            sLen: 32,
        };
        Self::with(ty, p, Vec::new())
    }

    /// ECDH1 with the null KDF and the peer's public point `peer` (DER OCTET STRING or raw).
    pub fn ecdh(peer: &[u8]) -> Self {
        let mut peer = peer.to_vec();
        let p = CK_ECDH1_DERIVE_PARAMS {
            kdf: CKD_NULL,
            ulSharedDataLen: 0,
            pSharedData: ptr::null_mut(),
            ulPublicDataLen: peer.len() as CK_ULONG,
            pPublicData: peer.as_mut_ptr(),
        };
        Self::with(CKM_ECDH1_DERIVE, p, vec![peer])
    }

    /// A `CK_KEY_DERIVATION_STRING_DATA` parameter (`CKM_AES_ECB_ENCRYPT_DATA`,
    /// `CKM_XOR_BASE_AND_DATA`, `CKM_CONCATENATE_BASE_AND_DATA`...).
    pub fn string_data(ty: CK_MECHANISM_TYPE, data: &[u8]) -> Self {
        let mut data = data.to_vec();
        let p = CK_KEY_DERIVATION_STRING_DATA {
            pData: data.as_mut_ptr(),
            ulLen: data.len() as CK_ULONG,
        };
        Self::with(ty, p, vec![data])
    }

    /// `CKM_AES_CBC_ENCRYPT_DATA` parameter.
    pub fn aes_cbc_encrypt_data(iv: [u8; 16], data: &[u8]) -> Self {
        let mut data = data.to_vec();
        let p = CK_AES_CBC_ENCRYPT_DATA_PARAMS {
            iv,
            pData: data.as_mut_ptr(),
            length: data.len() as CK_ULONG,
        };
        Self::with(CKM_AES_CBC_ENCRYPT_DATA, p, vec![data])
    }

    /// The raw `CK_MECHANISM`; valid while `self` is alive.
    pub fn raw(&mut self) -> CK_MECHANISM {
        CK_MECHANISM {
            mechanism: self.ty,
            pParameter: if self.len == 0 {
                ptr::null_mut()
            } else {
                self.param.as_mut_ptr() as *mut c_void
            },
            ulParameterLen: self.len as CK_ULONG,
        }
    }
}

/// Object handle.
pub type H = CK_OBJECT_HANDLE;

/// A logged-in read-write session, closed on drop.
pub struct S {
    /// The session handle.
    pub h: CK_SESSION_HANDLE,
}

impl Drop for S {
    fn drop(&mut self) {
        let _ = ck!(raw().f, C_CloseSession, self.h);
    }
}

/// Opens a read-write session (the user is logged in by [`init`], which must have run).
pub fn session() -> S {
    let slot = *INIT.get().expect("policy_support::init not called");
    S {
        h: raw_open_session(slot),
    }
}

fn out_handle(r: CK_RV, h: H) -> Rv<H> {
    if r == CKR_OK {
        assert_ne!(h, CK_INVALID_HANDLE, "CKR_OK with handle 0");
        Ok(h)
    } else {
        Err(r)
    }
}

impl S {
    /// C_GenerateKey.
    pub fn generate_key(&self, m: CK_MECHANISM_TYPE, mut t: Template) -> Rv<H> {
        let mut mm = Mech::new(m);
        let mut cm = mm.raw();
        let mut a = t.raw();
        let mut h: H = 0;
        let r = ck!(
            raw().f,
            C_GenerateKey,
            self.h,
            &mut cm,
            a.as_mut_ptr(),
            a.len() as CK_ULONG,
            &mut h
        );
        out_handle(r, h)
    }

    /// C_GenerateKeyPair; returns (public, private).
    pub fn generate_key_pair(
        &self,
        m: CK_MECHANISM_TYPE,
        mut public: Template,
        mut private: Template,
    ) -> Rv<(H, H)> {
        let mut mm = Mech::new(m);
        let mut cm = mm.raw();
        let mut pa = public.raw();
        let mut va = private.raw();
        let (mut hp, mut hv): (H, H) = (0, 0);
        let r = ck!(
            raw().f,
            C_GenerateKeyPair,
            self.h,
            &mut cm,
            pa.as_mut_ptr(),
            pa.len() as CK_ULONG,
            va.as_mut_ptr(),
            va.len() as CK_ULONG,
            &mut hp,
            &mut hv
        );
        if r == CKR_OK {
            assert!(hp != 0 && hv != 0, "CKR_OK with handle 0");
            Ok((hp, hv))
        } else {
            Err(r)
        }
    }

    /// C_CreateObject.
    pub fn create_object(&self, mut t: Template) -> Rv<H> {
        let mut a = t.raw();
        let mut h: H = 0;
        let r = ck!(
            raw().f,
            C_CreateObject,
            self.h,
            a.as_mut_ptr(),
            a.len() as CK_ULONG,
            &mut h
        );
        out_handle(r, h)
    }

    /// C_CopyObject.
    pub fn copy_object(&self, o: H, mut t: Template) -> Rv<H> {
        let mut a = t.raw();
        let mut h: H = 0;
        let r = ck!(
            raw().f,
            C_CopyObject,
            self.h,
            o,
            a.as_mut_ptr(),
            a.len() as CK_ULONG,
            &mut h
        );
        out_handle(r, h)
    }

    /// C_DestroyObject.
    pub fn destroy(&self, o: H) -> Rv<()> {
        rv(ck!(raw().f, C_DestroyObject, self.h, o))
    }

    /// C_SetAttributeValue.
    pub fn set_attrs(&self, o: H, mut t: Template) -> Rv<()> {
        let mut a = t.raw();
        rv(ck!(
            raw().f,
            C_SetAttributeValue,
            self.h,
            o,
            a.as_mut_ptr(),
            a.len() as CK_ULONG
        ))
    }

    /// C_GetAttributeValue of one attribute (two-call). On failure, the `CK_RV` and the
    /// length the module reported.
    pub fn get_attr(&self, o: H, t: CK_ATTRIBUTE_TYPE) -> Result<Vec<u8>, (CK_RV, CK_ULONG)> {
        let mut a = [CK_ATTRIBUTE {
            type_: t,
            pValue: ptr::null_mut(),
            ulValueLen: 0,
        }];
        let r = ck!(raw().f, C_GetAttributeValue, self.h, o, a.as_mut_ptr(), 1);
        if r != CKR_OK {
            return Err((r, a[0].ulValueLen));
        }
        let mut buf = vec![0u8; a[0].ulValueLen as usize];
        a[0].pValue = buf.as_mut_ptr() as *mut c_void;
        let r = ck!(raw().f, C_GetAttributeValue, self.h, o, a.as_mut_ptr(), 1);
        if r != CKR_OK {
            return Err((r, a[0].ulValueLen));
        }
        buf.truncate(a[0].ulValueLen as usize);
        Ok(buf)
    }

    /// A CK_BBOOL attribute (asserts the read succeeds).
    #[track_caller]
    pub fn get_bool(&self, o: H, t: CK_ATTRIBUTE_TYPE) -> bool {
        match self.get_attr(o, t) {
            Ok(v) => {
                assert_eq!(v.len(), 1, "attribute 0x{t:x} is not a CK_BBOOL");
                v[0] != 0
            }
            Err((r, _)) => panic!("C_GetAttributeValue(0x{t:x}): {}", rv_name(r)),
        }
    }

    /// A CK_ULONG attribute (asserts the read succeeds).
    #[track_caller]
    pub fn get_ulong(&self, o: H, t: CK_ATTRIBUTE_TYPE) -> CK_ULONG {
        match self.get_attr(o, t) {
            Ok(v) => {
                assert_eq!(v.len(), std::mem::size_of::<CK_ULONG>());
                CK_ULONG::from_ne_bytes(v.try_into().unwrap())
            }
            Err((r, _)) => panic!("C_GetAttributeValue(0x{t:x}): {}", rv_name(r)),
        }
    }

    /// C_WrapKey (two-call).
    pub fn wrap(&self, m: &mut Mech, wrapping: H, key: H) -> Rv<Vec<u8>> {
        let mut cm = m.raw();
        let mut n: CK_ULONG = 0;
        let r = ck!(
            raw().f,
            C_WrapKey,
            self.h,
            &mut cm,
            wrapping,
            key,
            ptr::null_mut(),
            &mut n
        );
        if r != CKR_OK {
            return Err(r);
        }
        let mut out = vec![0u8; n as usize];
        let r = ck!(
            raw().f,
            C_WrapKey,
            self.h,
            &mut cm,
            wrapping,
            key,
            out.as_mut_ptr(),
            &mut n
        );
        if r != CKR_OK {
            return Err(r);
        }
        out.truncate(n as usize);
        Ok(out)
    }

    /// C_UnwrapKey.
    pub fn unwrap(&self, m: &mut Mech, unwrapping: H, blob: &[u8], mut t: Template) -> Rv<H> {
        let mut cm = m.raw();
        let mut blob = blob.to_vec();
        let mut a = t.raw();
        let mut h: H = 0;
        let r = ck!(
            raw().f,
            C_UnwrapKey,
            self.h,
            &mut cm,
            unwrapping,
            blob.as_mut_ptr(),
            blob.len() as CK_ULONG,
            a.as_mut_ptr(),
            a.len() as CK_ULONG,
            &mut h
        );
        out_handle(r, h)
    }

    /// C_DeriveKey.
    pub fn derive(&self, m: &mut Mech, base: H, mut t: Template) -> Rv<H> {
        let mut cm = m.raw();
        let mut a = t.raw();
        let mut h: H = 0;
        let r = ck!(
            raw().f,
            C_DeriveKey,
            self.h,
            &mut cm,
            base,
            a.as_mut_ptr(),
            a.len() as CK_ULONG,
            &mut h
        );
        out_handle(r, h)
    }

    /// C_EncryptInit alone (a successful init is finished with a throw-away C_Encrypt
    /// so that the session is free again).
    pub fn encrypt_init(&self, m: &mut Mech, key: H) -> Rv<()> {
        let mut cm = m.raw();
        let r = rv(ck!(raw().f, C_EncryptInit, self.h, &mut cm, key));
        if r.is_ok() {
            self.abort_encrypt();
        }
        r
    }

    fn abort_encrypt(&self) {
        // C_Encrypt with a NULL output only asks for the length and keeps the operation;
        // an over-long input or a real call ends it. Use a real call into a big buffer.
        let mut data = [0u8; 16];
        let mut out = vec![0u8; 4096];
        let mut n: CK_ULONG = out.len() as CK_ULONG;
        let _ = ck!(
            raw().f,
            C_Encrypt,
            self.h,
            data.as_mut_ptr(),
            data.len() as CK_ULONG,
            out.as_mut_ptr(),
            &mut n
        );
    }

    /// C_DecryptInit alone (a successful init is ended with a throw-away C_Decrypt).
    pub fn decrypt_init(&self, m: &mut Mech, key: H) -> Rv<()> {
        let mut cm = m.raw();
        let r = rv(ck!(raw().f, C_DecryptInit, self.h, &mut cm, key));
        if r.is_ok() {
            let mut data = [0u8; 16];
            let mut out = vec![0u8; 4096];
            let mut n: CK_ULONG = out.len() as CK_ULONG;
            let _ = ck!(
                raw().f,
                C_Decrypt,
                self.h,
                data.as_mut_ptr(),
                data.len() as CK_ULONG,
                out.as_mut_ptr(),
                &mut n
            );
        }
        r
    }

    /// C_SignInit alone (a successful init is ended with a throw-away C_Sign).
    pub fn sign_init(&self, m: &mut Mech, key: H) -> Rv<()> {
        let mut cm = m.raw();
        let r = rv(ck!(raw().f, C_SignInit, self.h, &mut cm, key));
        if r.is_ok() {
            let mut data = [0u8; 32];
            let mut out = vec![0u8; 4096];
            let mut n: CK_ULONG = out.len() as CK_ULONG;
            let _ = ck!(
                raw().f,
                C_Sign,
                self.h,
                data.as_mut_ptr(),
                data.len() as CK_ULONG,
                out.as_mut_ptr(),
                &mut n
            );
        }
        r
    }

    /// C_EncryptInit + C_Encrypt (single call into a large buffer).
    pub fn encrypt(&self, m: &mut Mech, key: H, data: &[u8]) -> Rv<Vec<u8>> {
        let mut cm = m.raw();
        rv(ck!(raw().f, C_EncryptInit, self.h, &mut cm, key))?;
        let mut data = data.to_vec();
        let mut out = vec![0u8; data.len() + 1024];
        let mut n: CK_ULONG = out.len() as CK_ULONG;
        rv(ck!(
            raw().f,
            C_Encrypt,
            self.h,
            data.as_mut_ptr(),
            data.len() as CK_ULONG,
            out.as_mut_ptr(),
            &mut n
        ))?;
        out.truncate(n as usize);
        Ok(out)
    }

    /// C_DecryptInit + C_Decrypt (single call into a large buffer).
    pub fn decrypt(&self, m: &mut Mech, key: H, data: &[u8]) -> Rv<Vec<u8>> {
        let mut cm = m.raw();
        rv(ck!(raw().f, C_DecryptInit, self.h, &mut cm, key))?;
        let mut data = data.to_vec();
        let mut out = vec![0u8; data.len() + 1024];
        let mut n: CK_ULONG = out.len() as CK_ULONG;
        rv(ck!(
            raw().f,
            C_Decrypt,
            self.h,
            data.as_mut_ptr(),
            data.len() as CK_ULONG,
            out.as_mut_ptr(),
            &mut n
        ))?;
        out.truncate(n as usize);
        Ok(out)
    }

    /// C_SignInit + C_Sign.
    pub fn sign(&self, m: &mut Mech, key: H, data: &[u8]) -> Rv<Vec<u8>> {
        let mut cm = m.raw();
        rv(ck!(raw().f, C_SignInit, self.h, &mut cm, key))?;
        let mut data = data.to_vec();
        let mut out = vec![0u8; 1024];
        let mut n: CK_ULONG = out.len() as CK_ULONG;
        rv(ck!(
            raw().f,
            C_Sign,
            self.h,
            data.as_mut_ptr(),
            data.len() as CK_ULONG,
            out.as_mut_ptr(),
            &mut n
        ))?;
        out.truncate(n as usize);
        Ok(out)
    }

    /// C_VerifyInit + C_Verify.
    pub fn verify(&self, m: &mut Mech, key: H, data: &[u8], sig: &[u8]) -> Rv<()> {
        let mut cm = m.raw();
        rv(ck!(raw().f, C_VerifyInit, self.h, &mut cm, key))?;
        let mut data = data.to_vec();
        let mut sig = sig.to_vec();
        rv(ck!(
            raw().f,
            C_Verify,
            self.h,
            data.as_mut_ptr(),
            data.len() as CK_ULONG,
            sig.as_mut_ptr(),
            sig.len() as CK_ULONG
        ))
    }

    /// C_FindObjects over `t` (all matches).
    pub fn find(&self, mut t: Template) -> Rv<Vec<H>> {
        let mut a = t.raw();
        rv(ck!(
            raw().f,
            C_FindObjectsInit,
            self.h,
            a.as_mut_ptr(),
            a.len() as CK_ULONG
        ))?;
        let mut all = Vec::new();
        loop {
            let mut hs = [0 as H; 16];
            let mut n: CK_ULONG = 0;
            let r = ck!(raw().f, C_FindObjects, self.h, hs.as_mut_ptr(), 16, &mut n);
            if r != CKR_OK {
                let _ = ck!(raw().f, C_FindObjectsFinal, self.h);
                return Err(r);
            }
            if n == 0 {
                break;
            }
            all.extend_from_slice(&hs[..n as usize]);
        }
        rv(ck!(raw().f, C_FindObjectsFinal, self.h))?;
        Ok(all)
    }
}

// ---------------------------------------------------------------------------------------
// Templates and keys used across the suites.
// ---------------------------------------------------------------------------------------

/// A label no other CMK of this test process has (CMK names are unique per token).
pub fn unique_label(prefix: &str) -> Vec<u8> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    format!("{prefix}-{}", N.fetch_add(1, Ordering::Relaxed)).into_bytes()
}

/// An AES key template: class, key type, length and CKA_TOKEN, no usage attributes.
pub fn aes(token: bool, len: CK_ULONG) -> Template {
    Template::default()
        .ulong(CKA_CLASS, CKO_SECRET_KEY)
        .ulong(CKA_KEY_TYPE, CKK_AES)
        .ulong(CKA_VALUE_LEN, len)
        .boolean(CKA_TOKEN, token)
}

/// A wrap CMK: token AES key with WRAP+UNWRAP, `len` bytes.
pub fn wrap_cmk(s: &S, len: CK_ULONG) -> H {
    ok(
        s.generate_key(
            CKM_AES_KEY_GEN,
            aes(true, len)
                .boolean(CKA_WRAP, true)
                .boolean(CKA_UNWRAP, true)
                .bytes(CKA_LABEL, &unique_label("policy-wrap-cmk")),
        ),
        "C_GenerateKey(wrap CMK)",
    )
}

/// A data CMK: token AES-256 key with ENCRYPT+DECRYPT.
pub fn data_cmk(s: &S) -> H {
    ok(
        s.generate_key(
            CKM_AES_KEY_GEN,
            aes(true, 32)
                .boolean(CKA_ENCRYPT, true)
                .boolean(CKA_DECRYPT, true)
                .bytes(CKA_LABEL, &unique_label("policy-data-cmk")),
        ),
        "C_GenerateKey(data CMK)",
    )
}

/// A mac CMK: token generic secret (32 bytes) with SIGN+VERIFY.
pub fn mac_cmk(s: &S) -> H {
    ok(
        s.generate_key(
            CKM_GENERIC_SECRET_KEY_GEN,
            Template::default()
                .ulong(CKA_CLASS, CKO_SECRET_KEY)
                .ulong(CKA_KEY_TYPE, CKK_GENERIC_SECRET)
                .ulong(CKA_VALUE_LEN, 32)
                .boolean(CKA_TOKEN, true)
                .boolean(CKA_SIGN, true)
                .boolean(CKA_VERIFY, true)
                .bytes(CKA_LABEL, &unique_label("policy-mac-cmk")),
        ),
        "C_GenerateKey(mac CMK)",
    )
}

/// A data DEK: session AES key with ENCRYPT+DECRYPT, `len` bytes, extractable as asked.
pub fn dek(s: &S, len: CK_ULONG, extractable: bool) -> H {
    ok(
        s.generate_key(
            CKM_AES_KEY_GEN,
            aes(false, len)
                .boolean(CKA_ENCRYPT, true)
                .boolean(CKA_DECRYPT, true)
                .boolean(CKA_EXTRACTABLE, extractable),
        ),
        "C_GenerateKey(DEK)",
    )
}

/// An RSA-2048 key pair; `private_usage` lists the usage attributes set TRUE on the
/// private key (the public key gets VERIFY and ENCRYPT).
pub fn rsa_pair(s: &S, token: bool, private_usage: &[CK_ATTRIBUTE_TYPE]) -> (H, H) {
    let public = Template::default()
        .ulong(CKA_CLASS, CKO_PUBLIC_KEY)
        .ulong(CKA_KEY_TYPE, CKK_RSA)
        .ulong(CKA_MODULUS_BITS, 2048)
        .bytes(CKA_PUBLIC_EXPONENT, &[1, 0, 1])
        .boolean(CKA_TOKEN, token)
        .boolean(CKA_VERIFY, true)
        .boolean(CKA_ENCRYPT, true);
    let mut private = Template::default()
        .ulong(CKA_CLASS, CKO_PRIVATE_KEY)
        .ulong(CKA_KEY_TYPE, CKK_RSA)
        .boolean(CKA_TOKEN, token)
        .boolean(CKA_PRIVATE, true);
    for u in private_usage {
        private = private.boolean(*u, true);
    }
    ok(
        s.generate_key_pair(CKM_RSA_PKCS_KEY_PAIR_GEN, public, private),
        "C_GenerateKeyPair(RSA)",
    )
}

/// A P-256 key pair; `private_usage` as for [`rsa_pair`] (public key gets VERIFY).
pub fn ec_pair(s: &S, token: bool, private_usage: &[CK_ATTRIBUTE_TYPE]) -> (H, H) {
    let public = Template::default()
        .ulong(CKA_CLASS, CKO_PUBLIC_KEY)
        .ulong(CKA_KEY_TYPE, CKK_EC)
        .bytes(CKA_EC_PARAMS, &crate::common::P256_PARAMS)
        .boolean(CKA_TOKEN, token)
        .boolean(CKA_VERIFY, true);
    let mut private = Template::default()
        .ulong(CKA_CLASS, CKO_PRIVATE_KEY)
        .ulong(CKA_KEY_TYPE, CKK_EC)
        .boolean(CKA_TOKEN, token)
        .boolean(CKA_PRIVATE, true);
    for u in private_usage {
        private = private.boolean(*u, true);
    }
    ok(
        s.generate_key_pair(CKM_EC_KEY_PAIR_GEN, public, private),
        "C_GenerateKeyPair(EC)",
    )
}

/// Random bytes from the module (C_GenerateRandom).
pub fn random(s: &S, n: usize) -> Vec<u8> {
    let mut out = vec![0u8; n];
    let r = ck!(
        raw().f,
        C_GenerateRandom,
        s.h,
        out.as_mut_ptr(),
        n as CK_ULONG
    );
    assert_eq!(r, CKR_OK, "C_GenerateRandom: {}", rv_name(r));
    out
}

/// The raw EC point of a public key (CKA_EC_POINT, DER OCTET STRING stripped).
pub fn ec_point(s: &S, public: H) -> Vec<u8> {
    let der = ok(
        s.get_attr(public, CKA_EC_POINT).map_err(|(r, _)| r),
        "CKA_EC_POINT",
    );
    // 0x04 <len> 0x04 X Y for P-256 (65 bytes of point).
    if der.len() == 67 && der[0] == 0x04 && der[1] == 65 {
        der[2..].to_vec()
    } else {
        der
    }
}

/// Asserts the exact set of usage flags of a key (reads every usage attribute back).
#[track_caller]
pub fn assert_usage(s: &S, key: H, want: &[CK_ATTRIBUTE_TYPE], what: &str) {
    let all = [
        (CKA_ENCRYPT, "ENCRYPT"),
        (CKA_DECRYPT, "DECRYPT"),
        (CKA_WRAP, "WRAP"),
        (CKA_UNWRAP, "UNWRAP"),
        (CKA_SIGN, "SIGN"),
        (CKA_VERIFY, "VERIFY"),
        (CKA_DERIVE, "DERIVE"),
    ];
    for (t, name) in all {
        let got = match s.get_attr(key, t) {
            Ok(v) => v.first().copied().unwrap_or(0) != 0,
            // Attributes a key type does not have (e.g. WRAP on an EC private key).
            Err((CKR_ATTRIBUTE_TYPE_INVALID, _)) => false,
            Err((r, _)) => panic!("{what}: C_GetAttributeValue({name}): {}", rv_name(r)),
        };
        assert_eq!(
            got,
            want.contains(&t),
            "{what}: CKA_{name} is {got}, expected {}",
            want.contains(&t)
        );
    }
}

/// Asserts that reading `t` of `key` is refused as sensitive: CKR_ATTRIBUTE_SENSITIVE
/// with the length set to CK_UNAVAILABLE_INFORMATION.
#[track_caller]
pub fn assert_unreadable(s: &S, key: H, t: CK_ATTRIBUTE_TYPE, what: &str) {
    match s.get_attr(key, t) {
        Ok(v) => panic!(
            "{what}: attribute 0x{t:x} read in clear ({} bytes) -- key leaked",
            v.len()
        ),
        Err((r, len)) => {
            assert!(
                r == CKR_ATTRIBUTE_SENSITIVE,
                "{what}: expected CKR_ATTRIBUTE_SENSITIVE, got {}",
                rv_name(r)
            );
            assert_eq!(
                len, CK_UNAVAILABLE_INFORMATION,
                "{what}: ulValueLen must be CK_UNAVAILABLE_INFORMATION"
            );
        }
    }
}
