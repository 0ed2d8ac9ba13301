//! The token behind cmkp11, reached through `cryptoki`: loading and initializing the
//! module, slot and token information, and the error map back to `CK_RV`.
//! Nothing here decides policy. [`raw`] is the backend's own function table for the zero-copy
//! data path: the only module of this layer with `unsafe` code.

pub mod mech;
pub mod probe;
#[allow(unsafe_code)]
pub mod raw;
pub mod token;

/// The error map, kept under its old name: it lives with the error type.
pub use crate::error::rv;
