//! The backend module: loading, initializing, and its slot/token/mechanism information
//! mirrored into the raw PKCS#11 structures cmkp11 hands to applications.

use crate::backend::raw::RawBackend;
use crate::config::Config;
use crate::error::Result;
use cryptoki::context::Pkcs11;
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::slot::{Limit, Slot};
use cryptoki_sys::*;

/// The manufacturer cmkp11 reports for its library, slots and tokens.
pub const MANUFACTURER: &str = "cmkp11";

/// A loaded and initialized backend module with the slots cmkp11 exposes.
pub struct Backend {
    /// The cryptoki context.
    pub ctx: Pkcs11,
    /// The backend's function table (the one `ctx` calls through when cmkp11 runs as a
    /// module).
    pub raw: &'static RawBackend,
    /// Backend slots with a token, in the order cmkp11 numbers them (slot id = index).
    pub slots: Vec<Slot>,
    /// Whether cmkp11's `C_Initialize` initialized the module (and so must finalize it).
    owns_init: bool,
}

impl Backend {
    /// Loads the configured module, initializes it (OS locking) and lists its tokens,
    /// keeping only those named in `backend.tokens` if that is set.
    ///
    /// `after_fork`: this is a forked child re-initializing. A module that is not
    /// fork-aware (SoftHSM2) still believes itself initialized with the parent's sessions
    /// and login state copied into this process; it is finalized and initialized again
    /// so the child starts clean. Only the child's copy is affected: the parent's
    /// sessions live in the parent's memory. A fork-aware module (as network HSM clients
    /// are) accepts the child's `C_Initialize` directly and is never finalized here.
    ///
    /// `via`: cmkp11's own library, when it runs as a module. The backend's function
    /// table is fetched once ([`RawBackend::open`]) and the cryptoki context is loaded
    /// from cmkp11's library while it lends that table, so that the context, the
    /// backend's initialization and the data path all use the one table. Without it (the
    /// `cmkp11` command) the context loads the module itself.
    pub fn open(cfg: &Config, after_fork: bool, via: Option<&std::path::Path>) -> Result<Backend> {
        let config_error = |problem: String| crate::error::Error::Config {
            file: cfg
                .source
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "defaults".into()),
            key: "backend.module".into(),
            problem,
        };
        let module = &cfg.backend.module;
        let raw = RawBackend::open(module)
            .map_err(|e| config_error(format!("cannot load {}: {e}", module.display())))?;
        let ctx = match via.and_then(|me| raw.lend(|| Pkcs11::new(me)).ok()) {
            Some(ctx) => Ok(ctx),
            None => Pkcs11::new(module),
        }
        .map_err(|e| config_error(format!("cannot load {}: {e}", module.display())))?;
        // With cmkp11's mutexes (`crate::sys::locks`) and CKF_OS_LOCKING_OK.
        let initialize = || {
            cryptoki::error::Rv::from(raw.initialize())
                .into_result(cryptoki::context::Function::Initialize)
        };
        let owns_init = match initialize() {
            Ok(()) => true,
            Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) if after_fork => {
                ctx.clone().finalize()?;
                initialize()?;
                true
            }
            // Another user of the same module in this process initialized it already.
            Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => false,
            Err(e) => return Err(e.into()),
        };
        let mut slots = Vec::new();
        for slot in ctx.get_slots_with_token()? {
            let info = ctx.get_token_info(slot)?;
            if !info.token_initialized() {
                continue;
            }
            if let Some(labels) = &cfg.backend.tokens {
                if !labels.iter().any(|l| l == info.label()) {
                    continue;
                }
            }
            slots.push(slot);
        }
        Ok(Backend {
            ctx,
            raw,
            slots,
            owns_init,
        })
    }

    /// Finalizes the module if cmkp11 initialized it.
    pub fn finalize(&self) -> Result<()> {
        if self.owns_init {
            self.ctx.clone().finalize()?;
        }
        Ok(())
    }

    /// `CK_SLOT_INFO` for one backend slot, with cmkp11 as manufacturer.
    pub fn slot_info(&self, slot: Slot) -> Result<CK_SLOT_INFO> {
        let i = self.ctx.get_slot_info(slot)?;
        let mut flags = CKF_TOKEN_PRESENT;
        if i.removable_device() {
            flags |= CKF_REMOVABLE_DEVICE;
        }
        if i.hardware_slot() {
            flags |= CKF_HW_SLOT;
        }
        Ok(CK_SLOT_INFO {
            slotDescription: padded(&format!("cmkp11 over {}", i.slot_description())),
            manufacturerID: padded(MANUFACTURER),
            flags,
            hardwareVersion: i.hardware_version().into(),
            firmwareVersion: i.firmware_version().into(),
        })
    }

    /// `CK_TOKEN_INFO` mirroring the backend token, with cmkp11 as manufacturer and model.
    pub fn token_info(&self, slot: Slot) -> Result<CK_TOKEN_INFO> {
        let t = self.ctx.get_token_info(slot)?;
        let bits = [
            (t.rng(), CKF_RNG),
            (t.write_protected(), CKF_WRITE_PROTECTED),
            (t.login_required(), CKF_LOGIN_REQUIRED),
            (t.user_pin_initialized(), CKF_USER_PIN_INITIALIZED),
            (t.restore_key_not_needed(), CKF_RESTORE_KEY_NOT_NEEDED),
            (t.clock_on_token(), CKF_CLOCK_ON_TOKEN),
            (
                t.protected_authentication_path(),
                CKF_PROTECTED_AUTHENTICATION_PATH,
            ),
            (t.dual_crypto_operations(), CKF_DUAL_CRYPTO_OPERATIONS),
            (t.token_initialized(), CKF_TOKEN_INITIALIZED),
            (t.secondary_authentication(), CKF_SECONDARY_AUTHENTICATION),
            (t.user_pin_count_low(), CKF_USER_PIN_COUNT_LOW),
            (t.user_pin_final_try(), CKF_USER_PIN_FINAL_TRY),
            (t.user_pin_locked(), CKF_USER_PIN_LOCKED),
            (t.user_pin_to_be_changed(), CKF_USER_PIN_TO_BE_CHANGED),
            (t.so_pin_count_low(), CKF_SO_PIN_COUNT_LOW),
            (t.so_pin_final_try(), CKF_SO_PIN_FINAL_TRY),
            (t.so_pin_locked(), CKF_SO_PIN_LOCKED),
            (t.so_pin_to_be_changed(), CKF_SO_PIN_TO_BE_CHANGED),
            (t.error_state(), CKF_ERROR_STATE),
        ];
        let flags = bits.iter().filter(|(on, _)| *on).fold(0, |f, (_, b)| f | b);
        let limit = |l: Limit| match l {
            Limit::Max(n) => n as CK_ULONG,
            Limit::Unavailable => CK_UNAVAILABLE_INFORMATION,
            Limit::Infinite => CK_EFFECTIVELY_INFINITE,
        };
        let opt = |o: Option<u64>| {
            o.map(|n| n as CK_ULONG)
                .unwrap_or(CK_UNAVAILABLE_INFORMATION)
        };
        let mem = |o: Option<usize>| {
            o.map(|n| n as CK_ULONG)
                .unwrap_or(CK_UNAVAILABLE_INFORMATION)
        };
        let utc = t
            .utc_time()
            .map(|u| {
                format!(
                    "{:04}{:02}{:02}{:02}{:02}{:02}00",
                    u.year, u.month, u.day, u.hour, u.minute, u.second
                )
            })
            .unwrap_or_default();
        Ok(CK_TOKEN_INFO {
            label: padded(t.label()),
            manufacturerID: padded(MANUFACTURER),
            model: padded(MANUFACTURER),
            serialNumber: padded(t.serial_number()),
            flags,
            ulMaxSessionCount: limit(t.max_session_count()),
            ulSessionCount: opt(t.session_count()),
            ulMaxRwSessionCount: limit(t.max_rw_session_count()),
            ulRwSessionCount: opt(t.rw_session_count()),
            ulMaxPinLen: t.max_pin_length() as CK_ULONG,
            ulMinPinLen: t.min_pin_length() as CK_ULONG,
            ulTotalPublicMemory: mem(t.total_public_memory()),
            ulFreePublicMemory: mem(t.free_public_memory()),
            ulTotalPrivateMemory: mem(t.total_private_memory()),
            ulFreePrivateMemory: mem(t.free_private_memory()),
            hardwareVersion: t.hardware_version().into(),
            firmwareVersion: t.firmware_version().into(),
            utcTime: padded(&utc),
        })
    }

    /// The backend's mechanisms that cmkp11 can forward, asked through the module's own
    /// table so that types cryptoki does not know (`CKM_SHA224_RSA_PKCS` ...) are kept.
    pub fn mechanisms(&self, slot: Slot) -> Result<Vec<CK_MECHANISM_TYPE>> {
        let raw = super::raw::get().ok_or(crate::error::Error::Rv(CKR_CRYPTOKI_NOT_INITIALIZED))?;
        let mut list = raw
            .mechanism_list(slot.id())
            .map_err(crate::error::Error::Rv)?;
        list.retain(|m| super::mech::param_kind(*m).is_some());
        Ok(list)
    }

    /// `CK_MECHANISM_INFO` of a forwardable mechanism.
    pub fn mechanism_info(&self, slot: Slot, ty: CK_MECHANISM_TYPE) -> Result<CK_MECHANISM_INFO> {
        if super::mech::param_kind(ty).is_none() {
            return Err(crate::error::Error::Rv(CKR_MECHANISM_INVALID));
        }
        let raw = super::raw::get().ok_or(crate::error::Error::Rv(CKR_CRYPTOKI_NOT_INITIALIZED))?;
        raw.mechanism_info(slot.id(), ty)
            .map_err(crate::error::Error::Rv)
    }
}

/// A blank-padded fixed-size PKCS#11 text field (truncated at a character boundary).
pub fn padded<const N: usize>(s: &str) -> [u8; N] {
    let mut out = [b' '; N];
    let mut end = s.len().min(N);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out[..end].copy_from_slice(&s.as_bytes()[..end]);
    out
}

#[cfg(test)]
mod tests {
    use super::padded;

    #[test]
    fn padding_and_truncation() {
        assert_eq!(&padded::<8>("ab"), b"ab      ");
        assert_eq!(&padded::<4>("abcdef"), b"abcd");
        // "é" is two bytes: never cut in the middle of a character.
        assert_eq!(&padded::<2>("aé"), b"a ");
    }
}
