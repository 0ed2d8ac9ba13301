//! cmkp11: a PKCS#11 provider for customer-managed keys.
//!
//! Applications load `libcmkp11.so` as their PKCS#11 module. cmkp11 loads the real
//! token's module (SoftHSM2, or an HSM vendor's library) through `cryptoki` and forwards
//! every operation to it. Layers, top to bottom; a module imports only from layers below
//! it (checked by `tests/layers.rs`):
//!
//! - [`ffi`]: the application's C ABI: exported getters, function tables, pointer and
//!   length conversion, the two-call size convention, `catch_unwind`, fork detection.
//! - [`runtime`]: `C_Initialize` state, slots, sessions, handle tables, operations.
//! - [`keystore`], [`audit`]: CMKs, versions and states in the token; the audit log.
//! - [`backend`], [`logging`]: the token through cryptoki and its own function table
//!   ([`backend::raw`]); log lines.
//! - [`config`]: the TOML configuration.
//! - [`policy`]: pure decisions: key classes and roles, templates, mechanisms, access.
//! - [`error`], [`vendor`]: the error type and its `CK_RV` map; vendor constants.
//! - [`sys`]: OS primitives: pid/uid, clocks, the audit lock file, the backend's mutexes.
//!
//! `unsafe` code is denied at the crate root and allowed only in [`ffi`], [`sys`] and
//! [`backend::raw`].
#![deny(missing_docs)]
#![deny(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod audit;
pub mod backend;
pub mod config;
pub mod error;
#[allow(unsafe_code)]
pub mod ffi;
pub mod keystore;
pub mod logging;
pub mod policy;
pub mod runtime;
#[allow(unsafe_code)]
pub mod sys;
pub mod vendor;
