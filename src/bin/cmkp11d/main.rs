//! `cmkp11d`: cmkp11's service mode daemon.
//!
//! It owns the backend module and its token PIN, the keystore, the policy, the access
//! rules, the audit log and the clock, and serves applications that load `libcmkp11.so`
//! in client mode over a Unix socket. The same runtime as library mode runs inside it.
//!
//! ```text
//! cmkp11d [--config /etc/cmkp11/cmkp11d.toml]   serve
//! cmkp11d check [--config FILE]                  validate the configuration and exit
//! cmkp11d hash-pin                               read an application PIN on stdin, print its hash
//! ```

#[path = "../common/man.rs"]
mod man;

use clap::{CommandFactory, Parser, Subcommand};
use cmkp11::config::Config;
use cmkp11::daemon::{host, server::Server};
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

/// The daemon's configuration file when neither `--config` nor `CMKP11D_CONFIG` names one.
const DEFAULT_CONFIG: &str = "/etc/cmkp11/cmkp11d.toml";

#[derive(Parser)]
#[command(name = "cmkp11d", version, about = "cmkp11 service mode daemon")]
struct Cli {
    /// Configuration file (default: $CMKP11D_CONFIG, else /etc/cmkp11/cmkp11d.toml).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Validate the configuration (and the token PIN file) and exit.
    Check,
    /// Read an application PIN on standard input and print its Argon2 hash for
    /// `[[clients]] pin_hash`.
    HashPin,
    /// Write the man pages of `cmkp11d` into a directory (packaging).
    #[command(hide = true)]
    Man {
        /// The directory (created if missing).
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Some(Cmd::HashPin) => hash_pin(),
        Some(Cmd::Man { dir }) => match man::write_all(Cli::command(), &dir) {
            Ok(n) => {
                eprintln!("cmkp11d: {n} man pages written to {}", dir.display());
                ExitCode::SUCCESS
            }
            Err(e) => refuse(&format!("{}: {e}", dir.display())),
        },
        Some(Cmd::Check) => match prepare(&config_path(cli.config)) {
            Ok(_) => {
                println!("cmkp11d: configuration is valid");
                ExitCode::SUCCESS
            }
            Err(e) => refuse(&e),
        },
        None => match run(&config_path(cli.config)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => refuse(&e),
        },
    }
}

fn refuse(e: &str) -> ExitCode {
    eprintln!("cmkp11d: {e}");
    ExitCode::FAILURE
}

fn config_path(arg: Option<PathBuf>) -> PathBuf {
    arg.or_else(|| std::env::var_os("CMKP11D_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG))
}

fn hash_pin() -> ExitCode {
    use argon2::PasswordHasher;
    let mut pin = zeroize::Zeroizing::new(String::new());
    if std::io::stdin().read_to_string(&mut pin).is_err() {
        return refuse("cannot read the PIN on standard input");
    }
    let pin = pin.trim_end_matches(['\r', '\n']);
    if pin.is_empty() {
        return refuse("empty PIN");
    }
    match argon2::Argon2::default().hash_password(pin.as_bytes()) {
        Ok(h) => {
            println!("{h}");
            ExitCode::SUCCESS
        }
        Err(e) => refuse(&format!("hashing failed: {e}")),
    }
}

/// Reads and checks the configuration and the token PIN: the daemon's whole input.
fn prepare(path: &Path) -> Result<(Config, zeroize::Zeroizing<Vec<u8>>), String> {
    let cfg = Config::from_file(path).map_err(|e| e.to_string())?;
    let svc = cfg.service.as_ref().ok_or_else(|| {
        format!(
            "{}: [service] is missing (service.socket is required)",
            path.display()
        )
    })?;
    let pin_file = svc.token_pin_file.as_ref().ok_or_else(|| {
        format!(
            "{}: service.token_pin_file is required (the backend token's PIN, mode 0600)",
            path.display()
        )
    })?;
    let meta = std::fs::metadata(pin_file).map_err(|e| {
        format!(
            "{}: service.token_pin_file {}: {e}",
            path.display(),
            pin_file.display()
        )
    })?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(format!(
            "{}: service.token_pin_file {} is readable or writable by group or others (chmod 600 it)",
            path.display(),
            pin_file.display()
        ));
    }
    let mut pin = zeroize::Zeroizing::new(
        std::fs::read(pin_file)
            .map_err(|e| format!("service.token_pin_file {}: {e}", pin_file.display()))?,
    );
    while pin.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        pin.pop();
    }
    if pin.is_empty() {
        return Err(format!(
            "service.token_pin_file {} is empty",
            pin_file.display()
        ));
    }
    if cfg.clients.is_empty() {
        log::warn!("no [[clients]]: no application can log in");
    }
    Ok((cfg, pin))
}

/// The listening socket, and the path to remove at exit when the daemon bound it.
fn listen(cfg: &Config) -> Result<(std::os::unix::net::UnixListener, Option<PathBuf>), String> {
    if let Some(l) = host::systemd_listener() {
        return Ok((l, None));
    }
    let svc = cfg.service.as_ref().expect("checked in prepare");
    let path = &svc.socket;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(format!(
                "service.socket {} exists and is not a socket",
                path.display()
            ));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(format!(
                "service.socket {}: another daemon is listening there",
                path.display()
            ));
        }
        let _ = std::fs::remove_file(path);
    }
    let l = std::os::unix::net::UnixListener::bind(path)
        .map_err(|e| format!("service.socket {}: {e}", path.display()))?;
    let mode = svc
        .socket_mode
        .as_deref()
        .and_then(|m| u32::from_str_radix(m, 8).ok())
        .unwrap_or(0o666);
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("service.socket {}: chmod: {e}", path.display()))?;
    Ok((l, Some(path.clone())))
}

/// The admin socket (`[service] admin_socket`), when configured: bound like the
/// applications' socket (a stale socket file is replaced, a live daemon's is not).
fn listen_admin(
    cfg: &Config,
) -> Result<Option<(std::os::unix::net::UnixListener, PathBuf)>, String> {
    let svc = cfg.service.as_ref().expect("checked in prepare");
    let Some(path) = &svc.admin_socket else {
        return Ok(None);
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(format!(
                "service.admin_socket {} exists and is not a socket",
                path.display()
            ));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(format!(
                "service.admin_socket {}: another daemon is listening there",
                path.display()
            ));
        }
        let _ = std::fs::remove_file(path);
    }
    let l = std::os::unix::net::UnixListener::bind(path)
        .map_err(|e| format!("service.admin_socket {}: {e}", path.display()))?;
    let mode = svc
        .admin_socket_mode
        .as_deref()
        .and_then(|m| u32::from_str_radix(m, 8).ok())
        .unwrap_or(0o666);
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("service.admin_socket {}: chmod: {e}", path.display()))?;
    Ok(Some((l, path.clone())))
}

/// On SIGTERM or SIGINT: `C_Finalize` of the runtime (every session closed, the audit
/// log's last records authenticated by a token checkpoint), the socket removed, exit 0.
fn stop_on_signals(socket: Option<PathBuf>, admin: Option<PathBuf>) -> Result<(), String> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
        .map_err(|e| format!("cannot handle signals: {e}"))?;
    std::thread::Builder::new()
        .name("cmkp11d-signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                log::info!("cmkp11d: signal {sig}: stopping");
                host::finalize();
                for p in [socket, admin].into_iter().flatten() {
                    let _ = std::fs::remove_file(p);
                }
                std::process::exit(0);
            }
        })
        .map_err(|e| format!("cannot start the signal thread: {e}"))?;
    Ok(())
}

fn run(path: &Path) -> Result<(), String> {
    cmkp11::logging::init_default();
    let (cfg, pin) = prepare(path)?;
    // The in-process runtime reads its configuration where the module would: this file.
    // Set while the daemon is still one thread.
    std::env::set_var("CMKP11_CONFIG", path);
    std::env::remove_var("CMKP11_SERVICE");
    // The admin socket first: once the applications' socket answers, both exist.
    let admin_listener = listen_admin(&cfg)?;
    let (listener, bound) = listen(&cfg)?;
    let rv = host::initialize();
    if rv != cryptoki_sys::CKR_OK {
        return Err(format!(
            "{}: the runtime did not start ({}); the log line above says why",
            path.display(),
            cmkp11::backend::rv::name(rv)
        ));
    }
    let interval = cfg.service.as_ref().map_or(0, |s| s.purge_interval);
    let mut server = Arc::new(Server::new(cfg.clone())?);
    server.start_metrics()?;
    let _keep = server.login_token(&pin)?;
    drop(pin);
    let admin_path = admin_listener.as_ref().map(|(_, p)| p.clone());
    if let Some((l, p)) = admin_listener {
        let admin = Arc::new(
            cmkp11::daemon::admin::Admin::new(&cfg)
                .map_err(|e| format!("{}: {e}", path.display()))?,
        );
        std::thread::Builder::new()
            .name("cmkp11d-admin-accept".into())
            .spawn(move || admin.serve(l))
            .map_err(|e| format!("cannot start the admin socket's thread: {e}"))?;
        log::info!("cmkp11d: operators' admin socket on {}", p.display());
    }
    stop_on_signals(bound, admin_path)?;
    cmkp11::daemon::purge::start(std::time::Duration::from_secs(interval))
        .map_err(|e| format!("cannot start the purge timer: {e}"))?;
    log::info!("cmkp11d: serving on {}", path.display());
    eprintln!("cmkp11d: ready");
    server.serve(listener);
    host::finalize();
    Ok(())
}
