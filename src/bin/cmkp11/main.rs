//! `cmkp11`: the operator's command for cmkp11 tokens and their customer-managed keys.
//!
//! Built on the cmkp11 library's Rust API ([`cmkp11::runtime::Library`]), never through raw
//! PKCS#11 pointers: every rule the module enforces (policy, keystore, lifecycle states,
//! access rules) applies to this command too.
//!
//! Conventions shared by every subcommand:
//! - the configuration is the module's: `CMKP11_CONFIG`, else `/etc/cmkp11/cmkp11.toml`,
//!   else the defaults;
//! - `--token LABEL` picks the token (default: the only one);
//! - the user PIN comes from `--pin-file FILE`, else `CMKP11_PIN`, else a prompt without
//!   echo; it is never taken on the command line;
//! - exit status 0 on success, 1 with a message naming the token, the key and what to do,
//!   2 for a usage error; human tables by default, `--json` for scripts.

/// `println!` for a command whose output may be piped into `head`: a closed pipe ends the
/// command quietly (exit 0) instead of panicking. Shadows the prelude's `println!` in
/// every module of this binary.
macro_rules! println {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
        }
    }};
}

mod ctx;
mod doctor;
mod envelope;
mod export;
mod import;
mod init;
mod keyinfo;
mod keys;
mod output;
mod progress;
mod remote;
mod signing;

// The `audit` subcommand (audit issue): its own module, parsed and dispatched here.
mod audit;
#[path = "../common/man.rs"]
mod man;

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// Manage cmkp11 tokens and customer-managed keys (CMKs); encrypt files under a CMK.
#[derive(Parser, Debug)]
#[command(name = "cmkp11", version)]
pub struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    cmd: Cmd,
}

/// Options every subcommand accepts.
#[derive(Args, Debug, Clone)]
pub struct Global {
    /// The token to use, by label (default: the only token the configuration exposes).
    #[arg(long, global = true, value_name = "LABEL")]
    pub token: Option<String>,
    /// Read the user PIN from this file (else `CMKP11_PIN`, else a prompt).
    #[arg(long, global = true, value_name = "FILE")]
    pub pin_file: Option<PathBuf>,
    /// Print machine-readable JSON on stdout instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// Show the library's log lines on stderr (the `[log]` level of the configuration).
    #[arg(short, long, global = true)]
    pub verbose: bool,
    /// Act as an operator of `cmkp11d` through its admin socket (else
    /// `CMKP11_ADMIN_SOCKET`): `key`, `request` and `audit` go to the daemon, which
    /// authorizes you by your uid and groups; no PIN or configuration is read here.
    #[arg(long, global = true, value_name = "PATH")]
    pub admin_socket: Option<PathBuf>,
    /// Your current TOTP code, when the daemon gives you a TOTP secret (else
    /// `CMKP11_TOTP`).
    #[arg(long, global = true, value_name = "CODE")]
    pub totp: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create a private SoftHSM2 token and a cmkp11 configuration for a quick start.
    Init(init::InitArgs),
    /// Tokens.
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// Customer-managed keys: create, inspect, rotate, disable, delete, import.
    Key {
        #[command(subcommand)]
        cmd: keys::KeyCmd,
    },
    /// Encrypt a file under a wrap CMK (envelope encryption: AES-GCM chunks in the token).
    Encrypt(envelope::EncryptArgs),
    /// Decrypt a file made by `cmkp11 encrypt` (any enabled version of its CMK).
    Decrypt(envelope::DecryptArgs),
    /// The audit log: verify its integrity, tail it, report on it.
    Audit(audit::AuditArgs),
    /// Dual-control requests of `cmkp11d` (through its admin socket): list, show,
    /// approve, reject, cancel.
    Request {
        #[command(subcommand)]
        cmd: remote::RequestCmd,
    },
    /// Probe the configured token: what works, what is missing and which cmkp11 features
    /// that disables, a quick throughput check (exit status 1 when something needed is
    /// missing).
    Doctor(doctor::DoctorArgs),
    /// Write the man pages of `cmkp11` and its subcommands into a directory (packaging).
    #[command(hide = true)]
    Man {
        /// The directory (created if missing).
        dir: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum TokenCmd {
    /// List the tokens the configuration exposes.
    List,
}

/// An error for the operator: what failed, and what to do about it.
#[derive(Debug)]
pub struct CliError {
    /// The message (may span lines; the first names the token/key and the problem).
    pub msg: String,
}

impl CliError {
    /// An error with this message.
    pub fn new(msg: impl Into<String>) -> CliError {
        CliError { msg: msg.into() }
    }
}

/// The result type of the subcommands.
pub type R<T> = Result<T, CliError>;

/// Shorthand for an early return: `return fail("...")`.
pub fn fail<T>(msg: impl Into<String>) -> R<T> {
    Err(CliError::new(msg))
}

fn run(cli: Cli) -> R<()> {
    let g = cli.global;
    match cli.cmd {
        Cmd::Init(a) => init::run(&g, a),
        Cmd::Token {
            cmd: TokenCmd::List,
        } => ctx::token_list(&g),
        Cmd::Key { cmd } => keys::run(&g, cmd),
        Cmd::Encrypt(a) => envelope::encrypt(&g, a),
        Cmd::Decrypt(a) => envelope::decrypt(&g, a),
        Cmd::Man { dir } => {
            use clap::CommandFactory;
            let n = man::write_all(Cli::command(), &dir)
                .map_err(|e| CliError::new(format!("{}: {e}", dir.display())))?;
            eprintln!("cmkp11: {n} man pages written to {}", dir.display());
            Ok(())
        }
        Cmd::Audit(_) | Cmd::Doctor(_) | Cmd::Request { .. } => {
            unreachable!("dispatched by main")
        }
    }
}

/// `cmkp11 audit ...`: its own exit status (verify: 1 when the log does not verify).
fn run_audit(g: &Global, a: audit::AuditArgs) -> R<u8> {
    let cfg = ctx::load_config()?;
    if g.verbose {
        cmkp11::logging::init(&cfg.log);
    }
    // Only verify needs the token: its audit key checks the MACs and its checkpoint the
    // end of the log; that needs a login. The library is opened with the audit log off,
    // so that verify appends nothing (no login record) to the log it checks. Without a
    // login (no PIN available), the hash chain alone is checked, the report says what was
    // not, and the exit status is 3.
    // Rotate needs the token too: it MACs the records that close and open the files.
    let rotating = matches!(a.cmd, audit::AuditCmd::Rotate { .. });
    let ctx = if matches!(a.cmd, audit::AuditCmd::Verify { .. }) {
        match ctx::Ctx::open_unaudited(g) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("cmkp11: {}; checking without the token", e.msg);
                None
            }
        }
    } else if rotating {
        Some(ctx::Ctx::open_unaudited(g).map_err(|e| {
            CliError::new(format!(
                "{}; `audit rotate` needs the token (its audit key MACs the records that \
                 close and open the files)",
                e.msg
            ))
        })?)
    } else {
        None
    };
    let mac = ctx.as_ref().and_then(|c| {
        let lib = c.lib();
        lib.backend.slots.first().map(|slot| {
            let m = if rotating {
                cmkp11::runtime::audit_mac::TokenAuditMac::new(lib.backend.ctx.clone(), *slot)
            } else {
                cmkp11::runtime::audit_mac::TokenAuditMac::read_only(lib.backend.ctx.clone(), *slot)
            };
            let m = match &cfg.audit.file {
                Some(file) => m.for_log(file),
                None => m,
            };
            std::sync::Arc::new(m) as std::sync::Arc<dyn cmkp11::audit::TokenMac>
        })
    });
    let code = audit::run(a, &cfg, mac).map_err(CliError::new)?;
    drop(ctx);
    Ok(u8::try_from(code).unwrap_or(1))
}

/// Ends the process with `r`'s status (errors: 1 and the message).
fn exit_with(r: R<u8>) -> ExitCode {
    match r {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("cmkp11: {}", e.msg);
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Cmd::Request { cmd } = cli.cmd {
        return exit_with(remote::request(&cli.global, cmd));
    }
    // With an admin socket, the key and audit commands are the daemon's; the others
    // (init, token, encrypt, decrypt, doctor, man) are unchanged.
    let cli = match (remote::socket(&cli.global), cli.cmd) {
        (Some(socket), Cmd::Key { cmd }) => {
            return exit_with(remote::key(&cli.global, &socket, cmd))
        }
        (Some(socket), Cmd::Audit(a)) => return exit_with(remote::audit(&cli.global, &socket, a)),
        (_, cmd) => Cli {
            global: cli.global,
            cmd,
        },
    };
    if let Cmd::Doctor(a) = cli.cmd {
        return match doctor::run(&cli.global, a) {
            Ok(code) => ExitCode::from(code),
            Err(e) => {
                eprintln!("cmkp11: {}", e.msg);
                ExitCode::FAILURE
            }
        };
    }
    if let Cmd::Audit(a) = cli.cmd {
        return match run_audit(&cli.global, a) {
            Ok(code) => ExitCode::from(code),
            Err(e) => {
                eprintln!("cmkp11: {}", e.msg);
                ExitCode::FAILURE
            }
        };
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cmkp11: {}", e.msg);
            ExitCode::FAILURE
        }
    }
}
