//! cmkp11: a PKCS#11 provider for customer-managed keys.
//!
//! Applications load `libcmkp11.so` as their PKCS#11 module. cmkp11 loads the real
//! token's module (SoftHSM2, or an HSM vendor's library) through `cryptoki` and forwards
//! every operation to it. Layers, top to bottom (data flows one way):
//!
//! - [`ffi`]: the only `unsafe` code: exported getters, function tables, pointer and
//!   length conversion, the two-call size convention, `catch_unwind`, fork detection.
//! - [`runtime`]: `C_Initialize` state, slots, sessions, handle tables.
//! - [`policy`]: pure decisions: key classes and roles, templates, mechanisms, access.
//! - [`backend`]: the token through cryptoki, and its errors as `CK_RV`.
//! - [`config`], [`error`], [`logging`]: configuration, the error type, log lines.
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod audit;
pub mod backend;
pub mod config;
pub mod error;
pub mod ffi;
pub mod keystore;
pub mod logging;
pub mod policy;
pub mod runtime;
pub mod vendor;
