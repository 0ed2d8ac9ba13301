//! `cmkp11-bench`: A/B benchmark of libcmkp11.so against the backend module used directly.
//!
//! Run `cmkp11-bench --help` for usage and method. The parent process never loads a PKCS#11
//! module: every measurement runs in a child process (this binary with `--worker`), because
//! SoftHSM2 is a per-process singleton and cmkp11 loads it too.

mod affinity;
mod cases;
mod cli;
mod report;
mod setup;
mod timing;
mod worker;

use std::fmt;

/// Labels of the token objects the setup step creates and the workers use.
pub mod labels {
    /// AES-256 key for AES-GCM.
    pub const AES: &str = "cmkp11-bench-aes";
    /// AES-256 wrapping key for AES-KWP.
    pub const WRAP: &str = "cmkp11-bench-wrap";
    /// RSA-2048 private key.
    pub const RSA: &str = "cmkp11-bench-rsa";
    /// RSA-2048 public key.
    pub const RSA_PUB: &str = "cmkp11-bench-rsa-pub";
    /// EC P-256 private key.
    pub const EC: &str = "cmkp11-bench-ec";
    /// EC P-256 public key.
    pub const EC_PUB: &str = "cmkp11-bench-ec-pub";
    /// Prefix of the data objects that bring the token to ~20 objects.
    pub const FILLER_PREFIX: &str = "cmkp11-bench-filler-";
    /// Number of filler objects (6 keys + 14 fillers = 20 objects).
    pub const FILLERS: usize = 14;
    /// The object the find-by-label case looks for.
    pub const FIND_TARGET: &str = AES;
}

/// Any error of the benchmark (PKCS#11 errors included).
#[derive(Debug)]
pub enum BenchError {
    /// A PKCS#11 call failed.
    Pkcs11(cryptoki::error::Error),
    /// Anything else.
    Msg(String),
}

impl BenchError {
    /// An error with a message.
    pub fn msg(s: impl Into<String>) -> Self {
        BenchError::Msg(s.into())
    }
}

impl fmt::Display for BenchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BenchError::Pkcs11(e) => write!(f, "PKCS#11: {e}"),
            BenchError::Msg(m) => f.write_str(m),
        }
    }
}

impl From<cryptoki::error::Error> for BenchError {
    fn from(e: cryptoki::error::Error) -> Self {
        BenchError::Pkcs11(e)
    }
}

impl From<std::io::Error> for BenchError {
    fn from(e: std::io::Error) -> Self {
        BenchError::Msg(format!("I/O: {e}"))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = match cli::parse(&args) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("cmkp11-bench: {e}");
            std::process::exit(2);
        }
    };
    let result = match mode {
        cli::Mode::Help => {
            print!("{}", cli::HELP);
            Ok(())
        }
        cli::Mode::Parent(o) => report::run_parent(&o),
        cli::Mode::Worker(o) => worker::run_worker(&o),
        cli::Mode::Setup(o) => setup::run_setup(&o),
    };
    if let Err(e) = result {
        eprintln!("cmkp11-bench: error: {e}");
        std::process::exit(1);
    }
}
