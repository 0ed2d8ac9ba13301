//! cmkp11: a PKCS#11 provider for customer-managed keys.
//!
//! Applications load `libcmkp11.so` as their PKCS#11 module. cmkp11 loads the real
//! token's module (SoftHSM2, or an HSM vendor's library) through `cryptoki` and forwards
//! every operation to it. Layers, top to bottom; a module imports only from layers below
//! it (checked by `tests/layers.rs`):
//!
//! - [`daemon`]: `cmkp11d`'s server and its in-process calls through [`ffi`]'s tables.
//! - [`ffi`]: the application's C ABI: exported getters, function tables, pointer and
//!   length conversion, the two-call size convention, `catch_unwind`, fork detection.
//! - [`service`]: service mode's client side (protocol, connection to `cmkp11d`).
//! - [`runtime`]: `C_Initialize` state, slots, sessions, handle tables, operations.
//! - [`keystore`], [`audit`]: CMKs, versions and states in the token; the audit log.
//! - [`backend`], [`logging`]: the token through cryptoki and its own function table
//!   ([`backend::raw`]); log lines.
//! - [`config`]: the TOML configuration.
//! - [`policy`]: pure decisions: key classes and roles, templates, mechanisms, access.
//! - [`error`], [`vendor`]: the error type and its `CK_RV` map; vendor constants.
//! - [`sys`]: OS primitives: pid/uid, clocks, the audit lock file, the backend's mutexes.
//!
//! `unsafe` code is denied at the crate root and allowed only in [`ffi`], [`sys`],
//! [`backend::raw`] and [`daemon::host`].
#![deny(missing_docs)]
#![deny(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod audit;
pub mod backend;
pub mod config;
pub mod daemon;
pub mod error;
#[allow(unsafe_code)]
pub mod ffi;
pub mod keystore;
pub mod logging;
pub mod policy;
pub mod runtime;
pub mod service;
#[allow(unsafe_code)]
pub mod sys;
pub mod vendor;
