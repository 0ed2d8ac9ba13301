//! `cmkp11 init`: a private SoftHSM2 token and a cmkp11 configuration for a quick start.
//!
//! Writes `DIR/softhsm2.conf` (token directory `DIR/tokens`), initializes a token with the
//! requested label in SoftHSM2's free slot unless one with that label exists already,
//! writes `DIR/cmkp11.toml` (mode 600) naming the SoftHSM2 module and that token, and
//! prints the `export` line to use them. Running it again changes nothing.
//!
//! The token is initialized through SoftHSM2's own PKCS#11 interface (`C_InitToken`,
//! `C_InitPIN`) rather than by running `softhsm2-util --init-token --free`: the tool only
//! takes PINs on its command line (visible to every local user in `ps`) or from a
//! terminal, and a quick start should not teach PINs on command lines.

use crate::{fail, output, CliError, Global, R};
use clap::Args;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use std::io::IsTerminal;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// `cmkp11 init`.
#[derive(Args, Debug)]
pub struct InitArgs {
    /// Directory for the token and the configuration (default:
    /// `$XDG_DATA_HOME/cmkp11`, else `~/.local/share/cmkp11`).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// The token's label.
    #[arg(long, value_name = "L", default_value = "cmkp11")]
    label: String,
    /// Read the security officer PIN for a new token from this file (else a prompt).
    #[arg(long, value_name = "F")]
    so_pin_file: Option<PathBuf>,
    /// The SoftHSM2 module.
    #[arg(long, value_name = "PATH", default_value = cmkp11::config::DEFAULT_MODULE)]
    module: PathBuf,
}

fn default_dir() -> R<PathBuf> {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(d) = env("XDG_DATA_HOME") {
        return Ok(d.join("cmkp11"));
    }
    match env("HOME") {
        Some(h) => Ok(h.join(".local/share/cmkp11")),
        None => fail("neither --dir, XDG_DATA_HOME nor HOME is set: pass --dir DIR"),
    }
}

fn read_pin_file(f: &Path, what: &str) -> R<String> {
    let text = std::fs::read_to_string(f)
        .map_err(|e| CliError::new(format!("cannot read the {what} file {}: {e}", f.display())))?;
    let pin = text.trim_end_matches(['\n', '\r']).to_string();
    if pin.is_empty() {
        return fail(format!("the {what} file {} is empty", f.display()));
    }
    Ok(pin)
}

/// A new PIN: the file, else (user PIN only) `CMKP11_PIN`, else a prompt typed twice.
fn new_pin(file: Option<&Path>, env: Option<&str>, what: &str, flag: &str) -> R<String> {
    if let Some(f) = file {
        return read_pin_file(f, what);
    }
    if let Some(p) = env.and_then(std::env::var_os).filter(|p| !p.is_empty()) {
        return p
            .into_string()
            .map_err(|_| CliError::new(format!("the {what} in the environment is not UTF-8")));
    }
    if !std::io::stdin().is_terminal() {
        return fail(format!(
            "a new token needs a {what}: pass {flag} FILE{} (never on the command line)",
            if env.is_some() {
                " or set CMKP11_PIN"
            } else {
                ""
            }
        ));
    }
    let a = rpassword::prompt_password(format!("New {what} (4 to 255 characters): "))
        .map_err(|e| CliError::new(format!("cannot read the {what}: {e}")))?;
    let b = rpassword::prompt_password(format!("Repeat the {what}: "))
        .map_err(|e| CliError::new(format!("cannot read the {what}: {e}")))?;
    if a != b {
        return fail(format!("the two {what}s differ; nothing was changed"));
    }
    Ok(a)
}

fn check_pin(pin: &str, what: &str) -> R<()> {
    if !(4..=255).contains(&pin.len()) {
        return fail(format!("the {what} must have 4 to 255 characters"));
    }
    Ok(())
}

fn sh_quote(p: &Path) -> String {
    let s = p.display().to_string();
    if s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/._-+:,@".contains(&b))
    {
        s
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// Writes `path` with `text` unless it exists; returns whether it was written.
fn write_new(path: &Path, text: &str, mode: u32) -> R<bool> {
    use std::io::Write;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
    {
        Ok(mut f) => {
            f.write_all(text.as_bytes())
                .map_err(|e| CliError::new(format!("cannot write {}: {e}", path.display())))?;
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => fail(format!("cannot create {}: {e}", path.display())),
    }
}

#[derive(serde::Serialize)]
struct Report {
    dir: PathBuf,
    softhsm2_conf: PathBuf,
    config: PathBuf,
    token: String,
    token_created: bool,
    config_created: bool,
}

/// Finds the token labelled `label`, or initializes one in the free slot.
fn ensure_token(g: &Global, a: &InitArgs) -> R<bool> {
    let module = &a.module;
    let ctx = Pkcs11::new(module).map_err(|e| {
        CliError::new(format!(
            "cannot load the SoftHSM2 module {}: {e}; install softhsm2 or pass --module PATH",
            module.display()
        ))
    })?;
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .map_err(|e| CliError::new(format!("{}: C_Initialize: {e}", module.display())))?;
    let result = (|| {
        let slots = ctx
            .get_slots_with_token()
            .map_err(|e| CliError::new(format!("cannot list SoftHSM2 slots: {e}")))?;
        let mut free = None;
        for slot in slots {
            let info = ctx
                .get_token_info(slot)
                .map_err(|e| CliError::new(format!("cannot read SoftHSM2 token info: {e}")))?;
            if !info.token_initialized() {
                free.get_or_insert(slot);
            } else if info.label().trim_end() == a.label {
                return Ok(false);
            }
        }
        let Some(slot) = free else {
            return fail("SoftHSM2 offers no free slot for a new token");
        };
        let so = new_pin(
            a.so_pin_file.as_deref(),
            None,
            "security officer PIN",
            "--so-pin-file",
        )?;
        check_pin(&so, "security officer PIN")?;
        let user = new_pin(
            g.pin_file.as_deref(),
            Some("CMKP11_PIN"),
            "user PIN",
            "--pin-file",
        )?;
        check_pin(&user, "user PIN")?;
        let so = AuthPin::from(so);
        let user = AuthPin::from(user);
        let e = |what: &'static str| {
            move |e: cryptoki::error::Error| {
                CliError::new(format!("initialize token `{}`: {what}: {e}", a.label))
            }
        };
        ctx.init_token(slot, &so, &a.label)
            .map_err(e("C_InitToken"))?;
        let session = ctx.open_rw_session(slot).map_err(e("C_OpenSession"))?;
        session
            .login(UserType::So, Some(&so))
            .map_err(e("C_Login (SO)"))?;
        session.init_pin(&user).map_err(e("C_InitPIN"))?;
        let _ = session.logout();
        Ok(true)
    })();
    let _ = ctx.finalize();
    result
}

/// `cmkp11 init`.
pub fn run(g: &Global, a: InitArgs) -> R<()> {
    let dir = match &a.dir {
        Some(d) => d.clone(),
        None => default_dir()?,
    };
    if a.label.is_empty() || a.label.len() > 32 {
        return fail("the token label must have 1 to 32 characters");
    }
    let mkdir = |p: &Path| {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(p)
            .map_err(|e| CliError::new(format!("cannot create {}: {e}", p.display())))
    };
    mkdir(&dir)?;
    let dir = dir
        .canonicalize()
        .map_err(|e| CliError::new(format!("cannot resolve {}: {e}", dir.display())))?;
    let tokens = dir.join("tokens");
    mkdir(&tokens)?;
    let softhsm_conf = dir.join("softhsm2.conf");
    write_new(
        &softhsm_conf,
        &format!(
            "# SoftHSM2 configuration written by `cmkp11 init`\n\
             directories.tokendir = {}\n\
             objectstore.backend = file\n\
             log.level = ERROR\n\
             slots.removable = false\n",
            tokens.display()
        ),
        0o600,
    )?;
    // SoftHSM2 reads its configuration file named by SOFTHSM2_CONF when it initializes.
    std::env::set_var("SOFTHSM2_CONF", &softhsm_conf);
    let token_created = ensure_token(g, &a)?;
    let config = dir.join("cmkp11.toml");
    let config_created = write_new(
        &config,
        &format!(
            "# cmkp11 configuration written by `cmkp11 init` (the README lists every setting)\n\
             [backend]\n\
             module = {}\n\
             tokens = [{}]\n\
             \n\
             [keys]\n\
             deletion_window_days = 30\n\
             default_role = \"wrap\"\n\
             rotation_period_days = 0\n\
             \n\
             [policy]\n\
             allow_import = false\n",
            toml_str(&a.module.display().to_string()),
            toml_str(&a.label)
        ),
        0o600,
    )?;
    if !config_created {
        let cfg = cmkp11::config::Config::from_file(&config).map_err(|e| {
            CliError::new(format!(
                "{e}\n(fix it, or remove it and run `cmkp11 init` again)"
            ))
        })?;
        if let Some(t) = &cfg.backend.tokens {
            if !t.contains(&a.label) {
                eprintln!(
                    "cmkp11: note: {} exposes only the tokens {t:?}; add \"{}\" to \
                     [backend] tokens to use the new token",
                    config.display(),
                    a.label
                );
            }
        }
    }
    let report = Report {
        dir: dir.clone(),
        softhsm2_conf: softhsm_conf.clone(),
        config: config.clone(),
        token: a.label.clone(),
        token_created,
        config_created,
    };
    if g.json {
        return output::json(&report);
    }
    eprintln!(
        "cmkp11: token `{}` {} in {}; configuration {} {}",
        a.label,
        if token_created {
            "created"
        } else {
            "exists already"
        },
        tokens.display(),
        config.display(),
        if config_created { "written" } else { "kept" }
    );
    eprintln!("cmkp11: run this (or eval the output of this command) to use them:");
    println!(
        "export SOFTHSM2_CONF={} CMKP11_CONFIG={}",
        sh_quote(&softhsm_conf),
        sh_quote(&config)
    );
    Ok(())
}
