//! The one error type of cmkp11 and its mapping to `CK_RV`.

pub mod rv;

use cryptoki_sys::*;

/// Everything that can go wrong inside cmkp11. Each variant maps to exactly one `CK_RV`
/// through [`Error::rv`]; no variant carries key material or a PIN.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A PKCS#11 return code decided by cmkp11 itself (argument checks, session state...).
    #[error("{}", rv::name(*.0))]
    Rv(CK_RV),
    /// An error returned by the backend token, with the backend function that failed.
    #[error("backend: {0}")]
    Backend(#[from] cryptoki::error::Error),
    /// The audit log cannot be written and `on_failure = "deny"` refuses the step (a
    /// lifecycle change or a key use); the text says why (the write error). Nothing was
    /// changed.
    #[error("the audit log cannot be written ({0}); on_failure = \"deny\" refuses the step: nothing was changed")]
    Audit(String),
    /// The configuration is unusable. `file` and `key` name where, `problem` says what.
    #[error("config {file}: {key}: {problem}")]
    Config {
        /// The configuration file (or "defaults").
        file: String,
        /// The offending key, dotted (`backend.module`).
        key: String,
        /// What is wrong with it.
        problem: String,
    },
}

impl Error {
    /// The PKCS#11 return code an application sees for this error.
    pub fn rv(&self) -> CK_RV {
        match self {
            Error::Rv(rv) => *rv,
            Error::Backend(e) => rv::from_cryptoki(e),
            Error::Config { .. } => CKR_GENERAL_ERROR,
            Error::Audit(_) => CKR_FUNCTION_FAILED,
        }
    }
}

impl From<CK_RV> for Error {
    fn from(rv: CK_RV) -> Self {
        Error::Rv(rv)
    }
}

/// The result type used throughout cmkp11.
pub type Result<T> = std::result::Result<T, Error>;

/// Shorthand for an early return with a PKCS#11 code: `return err(CKR_ARGUMENTS_BAD)`.
pub fn err<T>(rv: CK_RV) -> Result<T> {
    Err(Error::Rv(rv))
}
