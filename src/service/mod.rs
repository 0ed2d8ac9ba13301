//! Service mode, the application's side: the wire protocol and the client that forwards
//! every PKCS#11 call to `cmkp11d` over a Unix socket (DESIGN.md §8). Its C ABI is
//! `ffi::client`; the daemon's side is `daemon`.
//!
//! - [`proto`]: the messages and their framing (serde + postcard, size limits, versions).
//! - [`admin_proto`]: the operators' messages on the daemon's admin socket.
//! - [`client`]: connection pool, fork, daemon restart, two-call outputs.

pub mod admin_proto;
pub mod client;
pub mod proto;
