//! What a slot offers: the backend's mechanisms, less what the policy refuses.

use super::Library;
use crate::error::{err, Result};
use cryptoki_sys::*;

impl Library {
    /// `C_GetMechanismList` of slot `id`: the backend's mechanisms that cmkp11 forwards and
    /// the policy offers.
    pub fn mechanism_list(&self, id: CK_SLOT_ID) -> Result<Vec<CK_MECHANISM_TYPE>> {
        let mut mechs = self.backend.mechanisms(self.slot(id)?)?;
        mechs.retain(|m| crate::policy::mechanisms::offered(*m));
        Ok(mechs)
    }

    /// `C_GetMechanismInfo`: the backend's answer, with the flags the policy refuses
    /// cleared; `CKR_MECHANISM_INVALID` for a mechanism the policy does not offer.
    pub fn mechanism_info(
        &self,
        id: CK_SLOT_ID,
        ty: CK_MECHANISM_TYPE,
    ) -> Result<CK_MECHANISM_INFO> {
        let slot = self.slot(id)?;
        if !crate::policy::mechanisms::offered(ty) {
            return err(CKR_MECHANISM_INVALID);
        }
        let mut i = self.backend.mechanism_info(slot, ty)?;
        i.flags = crate::policy::mechanisms::reported_flags(
            ty,
            i.flags,
            self.settings.allow_rsa_pkcs1_decrypt,
        );
        Ok(i)
    }
}

impl Library {
    /// `C_InitToken` of slot `id`: the PIN and the 32-byte label go to the token as the
    /// application gave them.
    pub fn init_token(&self, id: CK_SLOT_ID, pin: &[u8], label: &[u8; 32]) -> Result<()> {
        let slot = self.slot(id)?;
        let raw = crate::backend::raw::get()
            .ok_or(crate::error::Error::Rv(CKR_CRYPTOKI_NOT_INITIALIZED))?;
        match raw.init_token(slot.id(), pin, label) {
            CKR_OK => Ok(()),
            rv => err(rv),
        }
    }
}
