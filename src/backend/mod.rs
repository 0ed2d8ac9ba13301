//! The token behind cmkp11, reached through `cryptoki`: loading and initializing the
//! module, slot and token information, and the error map back to `CK_RV`.
//! Nothing here decides policy; nothing here touches application pointers.

pub mod mech;
pub mod rv;
pub mod token;
