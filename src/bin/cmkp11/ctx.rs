//! What every subcommand needs: the configuration, the library, the token, the user PIN
//! and a logged-in read-write session; and the words for the library's errors.

use crate::{fail, output, CliError, Global, R};
use cmkp11::config::Config;
use cmkp11::error::Error;
use cmkp11::keystore::{self, Cmk, State, View};
use cmkp11::runtime::session::Session;
use cmkp11::runtime::Library;
use cryptoki::session::UserType;
use cryptoki::types::RawAuthPin;
use cryptoki_sys::*;
use parking_lot::{Mutex, MutexGuard};
use std::io::IsTerminal;
use std::sync::Arc;

/// Where the configuration came from, for messages.
pub fn config_name(cfg: &Config) -> String {
    match &cfg.source {
        Some(p) => p.display().to_string(),
        None => "the built-in defaults (no CMKP11_CONFIG, no /etc/cmkp11/cmkp11.toml)".into(),
    }
}

/// Loads the configuration exactly as the module does.
pub fn load_config() -> R<Config> {
    Config::load().map_err(|e| {
        CliError::new(format!(
            "{e}\nfix the configuration file (or point CMKP11_CONFIG at another one)"
        ))
    })
}

/// Routes the library's log lines: to the configured file if there is one; to stderr
/// only with `--verbose` (the command prints its own messages).
fn init_logging(cfg: &Config, verbose: bool) {
    let mut log = cfg.log.clone();
    if log.file.is_none() && !verbose {
        log.level = "error".into();
    }
    cmkp11::logging::init(&log);
}

/// Opens the library over the configured backend.
pub fn open_library(cfg: Config, verbose: bool) -> R<Library> {
    init_logging(&cfg, verbose);
    let name = config_name(&cfg);
    let module = cfg.backend.module.display().to_string();
    Library::new(cfg, false).map_err(|e| {
        CliError::new(format!(
            "cannot open the token module {module} (configuration: {name}): {}\n\
             check [backend] module, and SOFTHSM2_CONF for SoftHSM2",
            describe(&e)
        ))
    })
}

/// The label of every slot, in cmkp11 slot order.
pub fn token_labels(lib: &Library) -> R<Vec<String>> {
    lib.backend
        .slots
        .iter()
        .map(|s| {
            lib.backend
                .ctx
                .get_token_info(*s)
                .map(|t| t.label().trim_end().to_string())
                .map_err(|e| CliError::new(format!("cannot read token information: {e}")))
        })
        .collect()
}

/// The slot of the token the operator asked for (or the only one).
pub fn pick_token(lib: &Library, wanted: Option<&str>) -> R<(CK_SLOT_ID, String)> {
    let labels = token_labels(lib)?;
    let cfg = config_name(&lib.cfg);
    if labels.is_empty() {
        return fail(format!(
            "no initialized token is available through {} (configuration: {cfg})\n\
             run `cmkp11 init` for a private SoftHSM2 token, or check SOFTHSM2_CONF and the \
             [backend] tokens filter",
            lib.cfg.backend.module.display()
        ));
    }
    let list = labels.join(", ");
    match wanted {
        Some(w) => match labels.iter().position(|l| l == w) {
            Some(i) => Ok((i as CK_SLOT_ID, w.to_string())),
            None => fail(format!(
                "no token labelled `{w}` (configuration: {cfg}); available tokens: {list}"
            )),
        },
        None if labels.len() == 1 => Ok((0, labels[0].clone())),
        None => fail(format!(
            "several tokens are available ({list}): choose one with --token LABEL"
        )),
    }
}

/// The user PIN: `--pin-file`, else `CMKP11_PIN`, else a prompt without echo.
pub fn user_pin(g: &Global, token: &str) -> R<RawAuthPin> {
    if let Some(f) = &g.pin_file {
        let mut text = std::fs::read(f)
            .map_err(|e| CliError::new(format!("cannot read the PIN file {}: {e}", f.display())))?;
        while matches!(text.last(), Some(b'\n' | b'\r')) {
            text.pop();
        }
        if text.is_empty() {
            return fail(format!("the PIN file {} is empty", f.display()));
        }
        return Ok(RawAuthPin::new(Box::new(text)));
    }
    if let Some(p) = std::env::var_os("CMKP11_PIN").filter(|p| !p.is_empty()) {
        use std::os::unix::ffi::OsStringExt;
        return Ok(RawAuthPin::new(Box::new(p.into_vec())));
    }
    if std::io::stdin().is_terminal() {
        let p = rpassword::prompt_password(format!("User PIN of token `{token}`: "))
            .map_err(|e| CliError::new(format!("cannot read the PIN: {e}")))?;
        return Ok(RawAuthPin::new(Box::new(p.into_bytes())));
    }
    fail(format!(
        "no user PIN for token `{token}`: pass --pin-file FILE or set CMKP11_PIN \
         (the PIN is never taken on the command line)"
    ))
}

/// An open library with a logged-in read-write session on one token.
pub struct Ctx {
    /// The library (dropped last: closing it finalizes the backend).
    lib: Option<Library>,
    session: Option<Arc<Mutex<Session>>>,
    /// The login session and the working session.
    handles: [CK_SESSION_HANDLE; 2],
    /// The token's label.
    pub token: String,
    /// Global options.
    pub g: Global,
}

impl Ctx {
    /// Loads the configuration, opens the library, picks the token, logs in.
    pub fn open(g: &Global) -> R<Ctx> {
        Ctx::open_with(g, load_config()?)
    }

    /// [`Ctx::open`] with the audit log off: for `audit verify`, which must not append
    /// to the log it checks (its login would be a record).
    pub fn open_unaudited(g: &Global) -> R<Ctx> {
        let mut cfg = load_config()?;
        cfg.audit.file = None;
        Ctx::open_with(g, cfg)
    }

    fn open_with(g: &Global, cfg: Config) -> R<Ctx> {
        let lib = open_library(cfg, g.verbose)?;
        let (slot, token) = pick_token(&lib, g.token.as_deref())?;
        let pin = user_pin(g, &token)?;
        let open = |rw: bool| {
            lib.open_session(slot, rw).map_err(|e| {
                CliError::new(format!("token `{token}`: open a session: {}", describe(&e)))
            })
        };
        // Log in through a read-only session: the library purges expired keys when a
        // read-write session logs in, and the CLI leaves that to `cmkp11 key purge`,
        // which reports what it destroys. The login holds for every session of the
        // process, so the read-write session opened next is logged in too.
        let login_handle = open(false)?;
        {
            let s = lib
                .session(login_handle)
                .map_err(|e| CliError::new(format!("token `{token}`: {}", describe(&e))))?;
            let mut s = s.lock();
            if let Err(e) = lib.login(&mut s, UserType::User, Some(&pin)) {
                drop(s);
                lib.close();
                let how = match (&g.pin_file, std::env::var_os("CMKP11_PIN")) {
                    (Some(f), _) => format!("from {}", f.display()),
                    (None, Some(_)) => "from CMKP11_PIN".into(),
                    _ => "typed".into(),
                };
                return fail(match e.rv() {
                    CKR_PIN_INCORRECT => format!(
                        "the user PIN ({how}) is incorrect for token `{token}`; \
                         each failure counts towards locking the PIN"
                    ),
                    CKR_PIN_LOCKED => format!(
                        "the user PIN of token `{token}` is locked: the security officer must \
                         reset it with the token's tools"
                    ),
                    _ => format!("token `{token}`: login failed: {}", describe(&e)),
                });
            }
        }
        let handle = open(true)?;
        let session = lib
            .session(handle)
            .map_err(|e| CliError::new(format!("token `{token}`: {}", describe(&e))))?;
        let ctx = Ctx {
            lib: Some(lib),
            session: Some(session),
            handles: [login_handle, handle],
            token,
            g: g.clone(),
        };
        Ok(ctx)
    }

    /// The library and the locked session.
    pub fn parts(&self) -> (&Library, MutexGuard<'_, Session>) {
        let lib = self.lib.as_ref().expect("library open until drop");
        let s = self
            .session
            .as_ref()
            .expect("session open until drop")
            .lock();
        (lib, s)
    }

    /// The library.
    pub fn lib(&self) -> &Library {
        self.lib.as_ref().expect("library open until drop")
    }

    /// Fails, naming what is missing and what it disables, when the token lacks one of
    /// `caps` (as the capability probe found; a capability it could not try passes).
    pub fn require(&self, caps: &[cmkp11::backend::probe::Capability]) -> R<()> {
        let (lib, s) = self.parts();
        let slot = s.slot_id;
        drop(s);
        for cap in caps {
            if let Err(e) = lib.require(slot, *cap) {
                let detail = lib
                    .capabilities(slot)
                    .map(|c| c.missing_message(*cap))
                    .unwrap_or_else(|| describe(&e));
                return fail(format!(
                    "{detail}
`cmkp11 doctor` shows what this token can do"
                ));
            }
        }
        Ok(())
    }

    /// The configuration file's name, for messages.
    pub fn config_name(&self) -> String {
        config_name(&self.lib().cfg)
    }

    /// The token's CMKs, read now.
    pub fn view(&self) -> Arc<View> {
        let (lib, s) = self.parts();
        lib.keys(&s)
    }

    /// A CMK by name (label, or hex id for keys without one). Destroyed keys awaiting
    /// purge are reported as such.
    pub fn cmk(&self, name: &str) -> R<Cmk> {
        let view = self.view();
        match view.by_name(name) {
            Some(c) if c.state(keystore::now()) == State::Destroyed => fail(format!(
                "key `{name}` on token `{}` is destroyed (its deletion date passed); \
                 `cmkp11 key purge` removes what is left of it",
                self.token
            )),
            Some(c) => Ok(c.clone()),
            None => fail(format!(
                "no key named `{name}` on token `{}`; `cmkp11 key list` shows the keys",
                self.token
            )),
        }
    }

    /// cmkp11's handle of a CMK (the logical handle of a secret CMK: every version).
    pub fn handle_of(&self, cmk: &Cmk) -> R<CK_OBJECT_HANDLE> {
        let (lib, s) = self.parts();
        let Some((_, obj)) = cmk.primary() else {
            return fail(format!(
                "key `{}` on token `{}` has no key object",
                cmk.name(),
                self.token
            ));
        };
        Ok(if cmk.class == CKO_SECRET_KEY {
            lib.objects.logical(s.slot_id, &cmk.id, obj)
        } else {
            lib.objects.ours(s.slot_id, obj, None)
        })
    }
}

impl Drop for Ctx {
    fn drop(&mut self) {
        self.session.take();
        if let Some(lib) = self.lib.take() {
            for h in self.handles {
                let _ = lib.close_session(h);
            }
            lib.close();
        }
    }
}

/// Words for a library error: the PKCS#11 code and what it means here.
pub fn describe(e: &Error) -> String {
    let rv = e.rv();
    let name = cmkp11::backend::rv::name(rv);
    let meaning = match rv {
        CKR_KEY_FUNCTION_NOT_PERMITTED => {
            "the key's state, role or the access rules do not allow this use"
        }
        CKR_ACTION_PROHIBITED => "the key's state or the configuration does not allow this",
        CKR_ATTRIBUTE_VALUE_INVALID => {
            "a key with this name or id exists already, or the name is reserved"
        }
        CKR_WRAPPED_KEY_INVALID => "the wrapped key does not open under this key",
        CKR_ENCRYPTED_DATA_INVALID => "the data does not authenticate",
        CKR_TEMPLATE_INCONSISTENT => "the policy refuses these key attributes",
        CKR_WRAPPING_KEY_SIZE_RANGE => "the key to wrap is longer than the wrapping key",
        CKR_USER_NOT_LOGGED_IN => "not logged in",
        CKR_DEVICE_MEMORY => "the token is full",
        _ => "",
    };
    match e {
        Error::Config { .. } | Error::Audit(_) => e.to_string(),
        _ if meaning.is_empty() => name.to_string(),
        _ => format!("{name} ({meaning})"),
    }
}

/// Maps a library error to an operator message about `what` (e.g. "rotate key `k`").
pub fn lib_err(token: &str, what: &str) -> impl Fn(Error) -> CliError {
    let what = what.to_string();
    let token = token.to_string();
    move |e| CliError::new(format!("token `{token}`: {what}: {}", describe(&e)))
}

#[derive(serde::Serialize)]
struct TokenRow {
    slot: CK_SLOT_ID,
    label: String,
    manufacturer: String,
    model: String,
    serial: String,
    initialized: bool,
    user_pin_initialized: bool,
    login_required: bool,
}

/// `cmkp11 token list`.
pub fn token_list(g: &Global) -> R<()> {
    let cfg = load_config()?;
    let lib = open_library(cfg, g.verbose)?;
    let mut rows = Vec::new();
    for (i, slot) in lib.backend.slots.iter().enumerate() {
        let t = lib
            .backend
            .ctx
            .get_token_info(*slot)
            .map_err(|e| CliError::new(format!("cannot read token information: {e}")))?;
        rows.push(TokenRow {
            slot: i as CK_SLOT_ID,
            label: t.label().trim_end().into(),
            manufacturer: t.manufacturer_id().trim_end().into(),
            model: t.model().trim_end().into(),
            serial: t.serial_number().trim_end().into(),
            initialized: t.token_initialized(),
            user_pin_initialized: t.user_pin_initialized(),
            login_required: t.login_required(),
        });
    }
    lib.close();
    if g.json {
        return output::json(&rows);
    }
    if rows.is_empty() {
        println!("no token (run `cmkp11 init` for a private SoftHSM2 token)");
        return Ok(());
    }
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.slot.to_string(),
                r.label.clone(),
                r.manufacturer.clone(),
                r.model.clone(),
                r.serial.clone(),
                if r.user_pin_initialized { "yes" } else { "no" }.into(),
            ]
        })
        .collect();
    output::table(
        &[
            "SLOT",
            "LABEL",
            "MANUFACTURER",
            "MODEL",
            "SERIAL",
            "USER PIN SET",
        ],
        &table,
    );
    Ok(())
}
