//! `cmkp11d`'s library side (the binary is `src/bin/cmkp11d`): it owns the backend, its
//! PIN, the keystore, the policy, the audit log and the clock, and serves applications
//! whose `libcmkp11.so` runs in client mode (DESIGN.md §8).
//!
//! - [`admin`]: the operators' admin socket: `[[operators]]`, roles, TOTP, actions.
//! - [`requests`]: dual control: requests, approvals, expiry, authenticated storage.
//! - [`server`]: connections, clients, identity from the kernel, credentials, limits.
//! - [`host`]: runs each call through cmkp11's own function table in this process, so
//!   both modes share one runtime, one policy and one audit path. Its raw buffers are
//!   the only `unsafe` code here.
//! - [`purge`]: the daemon's own timer that destroys keys past their deletion date.

pub mod admin;
#[allow(unsafe_code)]
pub mod host;
pub mod metrics;
pub mod purge;
pub mod requests;
pub mod server;
