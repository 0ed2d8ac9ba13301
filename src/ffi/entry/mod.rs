//! The `C_*` entry points, one file per chapter of the PKCS#11 base specification.
//! Each is a thin `extern "C"` shim: raw arguments -> safe values -> runtime call, inside
//! [`guard`](super::guard). The SAFETY comments rely on the PKCS#11 calling contract: an
//! application passes pointers that are valid for the lengths it gives (or NULL where the
//! specification allows it); every NULL is checked before use.

#![allow(non_snake_case)]

mod crypto;
mod general;
mod keys;
mod object;
mod session;
mod slot;
mod unsupported;

pub use crypto::*;
pub use general::*;
pub use keys::*;
pub use object::*;
pub use session::*;
pub use slot::*;
pub use unsupported::*;

use crate::error::Result;
use crate::runtime::{self, session::Session, Library};
use cryptoki_sys::CK_SESSION_HANDLE;

/// Runs `f` on a session, holding only that session's lock.
pub(crate) fn with_session<R>(
    h: CK_SESSION_HANDLE,
    f: impl FnOnce(&Library, &mut Session) -> Result<R>,
) -> Result<R> {
    let lib = runtime::library()?;
    let s = lib.session(h)?;
    let mut s = s.lock();
    f(lib, &mut s)
}
