//! The runtime's use of the capabilities record ([`crate::backend::probe`]): each slot is
//! probed once, the first time a feature that depends on a capability is used, and a
//! feature whose capability the probe found missing is refused with
//! `CKR_MECHANISM_INVALID` and one log line (per slot and capability) naming what is
//! missing and what it disables.

use super::Library;
use crate::backend::probe::{self, Capabilities, Capability, Depth};
use crate::error::{err, Result};
use cryptoki_sys::*;
use std::sync::Arc;

impl Library {
    /// Slot `slot_id`'s capabilities record, probed now if this is the first question.
    /// `None` if the slot does not exist or the probe could not run (then nothing is
    /// refused on its account).
    pub fn capabilities(&self, slot_id: CK_SLOT_ID) -> Option<Arc<Capabilities>> {
        let slot = self.slot(slot_id).ok()?;
        self.caps.get(slot_id as usize, || {
            let raw = Some(self.backend.raw);
            match probe::probe(
                &self.backend.ctx,
                &self.cfg.backend.module,
                slot,
                raw,
                Depth::Runtime,
            ) {
                Ok(c) => {
                    log::info!(
                        "slot {slot_id}: probed token `{}` in {} µs ({} backend calls): {}",
                        c.token,
                        c.elapsed.as_micros(),
                        c.calls,
                        c.checks
                            .iter()
                            .map(|(cap, st)| format!(
                                "{}={}",
                                cap.name(),
                                match st {
                                    probe::Status::Works => "yes",
                                    probe::Status::Missing(_) => "no",
                                    probe::Status::Untested(_) => "untested",
                                }
                            ))
                            .collect::<Vec<_>>()
                            .join(" ")
                    );
                    Some(c)
                }
                Err(e) => {
                    log::warn!("slot {slot_id}: the capability probe failed: {e}");
                    None
                }
            }
        })
    }

    /// Refuses `cap`'s features on `slot_id` when the probe found it missing (the log line
    /// naming it is written once).
    pub fn require(&self, slot_id: CK_SLOT_ID, cap: Capability) -> Result<()> {
        match self.capabilities(slot_id) {
            Some(c) if c.lacks(cap) => {
                self.caps.log_missing(slot_id as usize, &c, cap);
                err(CKR_MECHANISM_INVALID)
            }
            _ => Ok(()),
        }
    }

    /// [`Library::require`] for the capability mechanism `ty` depends on, if any: the
    /// check at `*Init`, `C_WrapKey` and `C_UnwrapKey`.
    #[inline]
    pub fn require_mechanism(&self, slot_id: CK_SLOT_ID, ty: CK_MECHANISM_TYPE) -> Result<()> {
        match Capability::of_mechanism(ty) {
            None => Ok(()),
            Some(cap) => self.require(slot_id, cap),
        }
    }
}
