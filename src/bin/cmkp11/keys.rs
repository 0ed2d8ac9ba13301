//! `cmkp11 key ...`: list, show, create, the lifecycle steps, purge, import.

use crate::ctx::{describe, lib_err, Ctx};
use crate::keyinfo::{check_new_name, key_info, print_key, role_or_default, KeyInfo, Role};
use crate::signing::{self, SigningType};
use crate::{export, fail, import, output, CliError, Global, R};
use clap::Subcommand;
use cmkp11::backend::mech::Mech;
use cmkp11::keystore::{self, Cmk, State};
use cmkp11::runtime::admin::Action;
use cryptoki::object::{Attribute, KeyType, ObjectClass};
use cryptoki_sys::*;
use serde::Serialize;

/// `cmkp11 key` subcommands.
#[derive(Subcommand, Debug)]
pub enum KeyCmd {
    /// List the token's keys (all of them, or those every given filter matches).
    List(ListFilter),
    /// Show one key: state, versions, role, origin, dates.
    Show {
        /// The key's name.
        name: String,
    },
    /// Create a CMK in the token: an AES key (`--role`), or a signing key pair (`--type`).
    Create {
        /// The key's name (unique on the token).
        name: String,
        /// What an AES key is for (default: `[keys] default_role` of the configuration).
        #[arg(long, value_enum, conflicts_with = "key_type")]
        role: Option<Role>,
        /// AES key length in bits.
        #[arg(long, default_value = "256", value_parser = ["128", "256"])]
        bits: String,
        /// Make a signing key pair of this type instead of an AES key (TLS, SSH, CSRs).
        #[arg(long = "type", value_enum, value_name = "TYPE")]
        key_type: Option<SigningType>,
        /// The key pair's CKA_ID, in hex (default: 16 random bytes).
        #[arg(long, value_name = "HEX", requires = "key_type", value_parser = signing::parse_id)]
        id: Option<signing::KeyId>,
        /// Make the AES key exportable: it may leave the token, wrapped under a trusted
        /// destination's key only (`key destination add`, `key export`). Default: never.
        #[arg(long, conflicts_with = "key_type")]
        exportable: bool,
    },
    /// Export an exportable key, wrapped under a trusted destination's import key, for
    /// `cmkp11 key import` on the destination.
    Export {
        /// The key's name.
        name: String,
        /// The trusted destination (`cmkp11 key destination list`).
        #[arg(long, value_name = "DEST")]
        to: String,
        /// Where to write the wrapped key (raw RSA-OAEP ciphertext).
        #[arg(long, short, value_name = "FILE")]
        out: std::path::PathBuf,
    },
    /// Trusted destinations of exports (registered by the token's SO).
    Destination {
        #[command(subcommand)]
        cmd: export::DestinationCmd,
    },
    /// Write a PKCS#10 certificate request signed in the token by a signing key.
    Csr {
        /// The signing key's name.
        name: String,
        /// The subject: `CN=web.example.com,O=Example` or `/O=Example/CN=web.example.com`.
        #[arg(long, value_parser = signing::parse_subject)]
        subject: x509_cert::name::Name,
        /// A subject alternative name, `DNS:NAME` or `IP:ADDRESS` (repeatable).
        #[arg(long, value_parser = signing::parse_san)]
        san: Vec<x509_cert::ext::pkix::name::GeneralName>,
        /// Where to write the request (PEM; default: standard output).
        #[arg(long, short, value_name = "FILE")]
        out: Option<std::path::PathBuf>,
    },
    /// Give a secret CMK a new primary version (older versions keep decrypting).
    Rotate {
        /// The key's name.
        #[arg(required_unless_present = "due", conflicts_with = "due")]
        name: Option<String>,
        /// Rotate every enabled secret key older than `[keys] rotation_period_days`.
        #[arg(long)]
        due: bool,
    },
    /// Disable a key: every use is refused until it is enabled again.
    Disable {
        /// The key's name.
        name: String,
    },
    /// Enable a disabled key.
    Enable {
        /// The key's name.
        name: String,
    },
    /// Schedule a key's destruction; it is disabled until then and can be recovered with
    /// `cancel-deletion`.
    ScheduleDeletion {
        /// The key's name.
        name: String,
        /// Days until destruction, 1..=365 (default: `[keys] deletion_window_days`).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=365))]
        days: Option<u32>,
    },
    /// Cancel a scheduled deletion; the key returns to disabled.
    CancelDeletion {
        /// The key's name.
        name: String,
    },
    /// Destroy the keys whose deletion date has passed.
    Purge,
    /// Once, on a token written by an earlier cmkp11: authenticate its lifecycle records
    /// (until then its keys with records are not used). Audited.
    Migrate,
    /// Import keys for bring-your-own-key (RSA-3072, RSA-OAEP SHA-256).
    ImportKey {
        #[command(subcommand)]
        cmd: import::ImportKeyCmd,
    },
    /// Import your own AES key, wrapped under an import key, as a new CMK.
    Import(import::ImportArgs),
}

/// Which keys `cmkp11 key list` shows: those that every given filter matches.
#[derive(clap::Args, Debug, Default)]
pub struct ListFilter {
    /// Only keys in this state.
    #[arg(long, value_enum)]
    state: Option<StateFilter>,
    /// Only keys with this role (a private key matches each of its roles).
    #[arg(long, value_enum)]
    role: Option<RoleFilter>,
    /// Only keys whose whole name matches this glob (`*` any run, `?` any one byte), the
    /// syntax of the `[[access]]` rules' `keys`.
    #[arg(long, value_name = "GLOB")]
    label: Option<String>,
}

/// A lifecycle state, as `--state` takes it.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateFilter {
    /// Usable.
    Enabled,
    /// Disabled (every use refused).
    Disabled,
    /// Scheduled for deletion (disabled until then).
    PendingDeletion,
    /// Past its deletion date, awaiting purge.
    Destroyed,
}

impl StateFilter {
    fn state(self) -> State {
        match self {
            StateFilter::Enabled => State::Enabled,
            StateFilter::Disabled => State::Disabled,
            StateFilter::PendingDeletion => State::PendingDeletion,
            StateFilter::Destroyed => State::Destroyed,
        }
    }
}

/// A role, as `--role` takes it (the names `key list` shows).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoleFilter {
    /// Secret keys that wrap data keys.
    Wrap,
    /// Secret keys that encrypt data.
    Data,
    /// Secret keys that compute MACs.
    Mac,
    /// Private keys that sign.
    Sign,
    /// Private keys that decrypt.
    Decrypt,
    /// Private keys that derive.
    Derive,
    /// Private keys that unwrap.
    Unwrap,
}

impl ListFilter {
    pub fn is_empty(&self) -> bool {
        self.state.is_none() && self.role.is_none() && self.label.is_none()
    }

    /// Whether `cmk` passes the filters that need no read of the token.
    fn admits(&self, cmk: &Cmk, now: u64) -> bool {
        self.state.is_none_or(|s| cmk.state(now) == s.state())
            && self
                .label
                .as_deref()
                .is_none_or(|g| cmkp11::policy::access::glob(g, &cmk.name()))
    }

    /// Whether a key the daemon described passes every filter (`--admin-socket`).
    pub fn admits_facts(&self, k: &cmkp11::runtime::admin::KeyFacts) -> bool {
        use clap::ValueEnum;
        self.state
            .is_none_or(|s| s.state().name() == k.state.as_str())
            && self
                .label
                .as_deref()
                .is_none_or(|g| cmkp11::policy::access::glob(g, &k.name))
            && self.role.is_none_or(|r| {
                let want = r.to_possible_value().map(|v| v.get_name().to_string());
                k.role.split('+').any(|x| Some(x) == want.as_deref())
            })
    }

    /// Whether the key's role matches `--role`.
    fn admits_role(&self, k: &KeyInfo) -> bool {
        use clap::ValueEnum;
        self.role.is_none_or(|r| {
            let want = r.to_possible_value().map(|v| v.get_name().to_string());
            k.role.split('+').any(|x| Some(x) == want.as_deref())
        })
    }
}

/// Why a key past its deletion date cannot be acted on.
fn destroyed_text(cmk: &Cmk, token: &str) -> String {
    format!(
        "key `{}` on token `{token}` was destroyed (its deletion date {} has passed): it can \
         no longer be used or restored; `cmkp11 key purge` removes its objects from the token",
        cmk.name(),
        pending_text(cmk)
    )
}

/// Runs a `cmkp11 key` subcommand.
pub fn run(g: &Global, cmd: KeyCmd) -> R<()> {
    // `destination add` logs in as the SO, not as the user.
    let cmd = match cmd {
        KeyCmd::Destination { cmd } => return export::destination(g, cmd),
        cmd => cmd,
    };
    let ctx = Ctx::open(g)?;
    match cmd {
        KeyCmd::List(filter) => list(&ctx, &filter),
        KeyCmd::Show { name } => {
            let cmk = ctx.cmk(&name)?;
            print_key(&ctx, &key_info(&ctx, &cmk)?)
        }
        KeyCmd::Create {
            name,
            key_type: Some(ty),
            id,
            ..
        } => signing::create(&ctx, &name, ty, id),
        KeyCmd::Create {
            name,
            role,
            bits,
            exportable: true,
            ..
        } => export::create_exportable(&ctx, &name, role, bits.parse().unwrap_or(256)),
        KeyCmd::Create {
            name, role, bits, ..
        } => create(&ctx, &name, role, bits.parse().unwrap_or(256)),
        KeyCmd::Export { name, to, out } => export::export(&ctx, &name, &to, &out),
        KeyCmd::Destination { .. } => unreachable!("dispatched above"),
        KeyCmd::Csr {
            name,
            subject,
            san,
            out,
        } => signing::csr(&ctx, &name, subject, san, out),
        KeyCmd::Rotate { name: Some(n), .. } => rotate(&ctx, &n),
        KeyCmd::Rotate { name: None, .. } => rotate_due(&ctx),
        KeyCmd::Disable { name } => disable(&ctx, &name),
        KeyCmd::Enable { name } => enable(&ctx, &name),
        KeyCmd::ScheduleDeletion { name, days } => schedule_deletion(&ctx, &name, days),
        KeyCmd::CancelDeletion { name } => cancel_deletion(&ctx, &name),
        KeyCmd::Purge => purge(&ctx),
        KeyCmd::Migrate => migrate(&ctx),
        KeyCmd::ImportKey { cmd } => import::import_key_cmd(&ctx, cmd),
        KeyCmd::Import(a) => import::import(&ctx, a),
    }
}

fn list(ctx: &Ctx, filter: &ListFilter) -> R<()> {
    let view = ctx.view();
    let now = keystore::now();
    let mut keys = Vec::new();
    for cmk in view.cmks.values().filter(|c| filter.admits(c, now)) {
        let k = key_info(ctx, cmk)?;
        if filter.admits_role(&k) {
            keys.push(k);
        }
    }
    keys.sort_by(|a, b| a.name.cmp(&b.name));
    if ctx.g.json {
        return output::json(&keys);
    }
    if keys.is_empty() && filter.is_empty() {
        println!(
            "no keys on token `{}`; create one with `cmkp11 key create NAME`",
            ctx.token
        );
        return Ok(());
    }
    if keys.is_empty() {
        println!(
            "no keys on token `{}` match the filters ({} keys in all)",
            ctx.token,
            view.cmks.len()
        );
        return Ok(());
    }
    let rows: Vec<Vec<String>> = keys
        .iter()
        .map(|k| {
            vec![
                k.name.clone(),
                k.state.into(),
                k.key_type.clone(),
                k.role.clone(),
                format!("{}/{}", k.primary, k.versions.len()),
                k.origin.into(),
                k.created.clone().unwrap_or_else(|| "-".into()),
                k.rotated.clone().unwrap_or_else(|| "-".into()),
                k.deletion_date.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    output::table(
        &[
            "NAME",
            "STATE",
            "TYPE",
            "ROLE",
            "PRIMARY/VERSIONS",
            "ORIGIN",
            "CREATED",
            "ROTATED",
            "DELETION",
        ],
        &rows,
    );
    Ok(())
}

fn create(ctx: &Ctx, name: &str, role: Option<Role>, bits: u32) -> R<()> {
    check_new_name(ctx, name)?;
    let role = role_or_default(ctx, role);
    let usage = role.usage();
    use cmkp11::policy::Usage as U;
    let t = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Label(name.as_bytes().to_vec()),
        Attribute::ValueLen(u64::from(bits / 8).into()),
        Attribute::Encrypt(usage.any(U::ENCRYPT)),
        Attribute::Decrypt(usage.any(U::DECRYPT)),
        Attribute::Sign(usage.any(U::SIGN)),
        Attribute::Verify(usage.any(U::VERIFY)),
        Attribute::Wrap(usage.any(U::WRAP)),
        Attribute::Unwrap(usage.any(U::UNWRAP)),
    ];
    {
        let (lib, mut s) = ctx.parts();
        lib.generate_key(&mut s, Mech::plain(CKM_AES_KEY_GEN), t)
            .map_err(lib_err(&ctx.token, &format!("create key `{name}`")))?;
    }
    let cmk = ctx.cmk(name)?;
    let info = key_info(ctx, &cmk)?;
    if !ctx.g.json {
        println!(
            "created key `{name}` on token `{}` ({}, role {})",
            ctx.token, info.key_type, info.role
        );
    }
    if ctx.g.json {
        output::json(&info)?;
    }
    Ok(())
}

/// Applies a lifecycle step and returns the key as it is afterwards.
fn apply(ctx: &Ctx, cmk: &Cmk, action: Action) -> R<KeyInfo> {
    {
        let (lib, s) = ctx.parts();
        lib.apply(&s, cmk, action).map_err(|e| {
            CliError::new(format!(
                "token `{}`: {} key `{}`: {}",
                ctx.token,
                action.name(),
                cmk.name(),
                describe(&e)
            ))
        })?;
    }
    // The step is done: reading the key again may fail for a moment (another process
    // rewriting the token's files), which must not report the step as failed.
    let mut last = None;
    for _ in 0..5 {
        match ctx.cmk(&cmk.name()).and_then(|after| key_info(ctx, &after)) {
            Ok(info) => return Ok(info),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    key_info(ctx, cmk).map_err(|_| last.expect("tried above"))
}

fn done(ctx: &Ctx, info: &KeyInfo, text: String) -> R<()> {
    if ctx.g.json {
        output::json(info)
    } else {
        println!("{text}");
        Ok(())
    }
}

fn pending_text(c: &Cmk) -> String {
    output::time_cell(c.record().deletion_date)
}

fn rotate(ctx: &Ctx, name: &str) -> R<()> {
    let cmk = ctx.cmk(name)?;
    let t = &ctx.token;
    if cmk.class != CKO_SECRET_KEY {
        return fail(format!(
            "key `{name}` on token `{t}` is a private key: private keys are not rotated; \
             create a new key and move its users to it"
        ));
    }
    match cmk.state(keystore::now()) {
        State::Enabled => {}
        State::Disabled => {
            return fail(format!(
                "key `{name}` on token `{t}` is disabled: enable it first with \
                 `cmkp11 key enable {name}`, then rotate"
            ))
        }
        State::Destroyed => return fail(destroyed_text(&cmk, t)),
        State::PendingDeletion => {
            return fail(format!(
                "key `{name}` on token `{t}` is pending deletion (on {}): only an enabled key \
                 is rotated; `cmkp11 key cancel-deletion {name}` then `cmkp11 key enable {name}` \
                 to use it again",
                pending_text(&cmk)
            ))
        }
    }
    let info = apply(ctx, &cmk, Action::Rotate)?;
    done(
        ctx,
        &info,
        format!(
            "rotated key `{name}` on token `{t}`: version {} is primary ({} versions; older \
             versions still decrypt)",
            info.primary,
            info.versions.len()
        ),
    )
}

#[derive(Serialize)]
struct DueReport {
    rotation_period_days: u32,
    rotated: Vec<Rotated>,
    failed: Vec<Failed>,
    not_due: usize,
}

#[derive(Serialize)]
struct Rotated {
    name: String,
    last_rotation: Option<String>,
    primary: u32,
}

#[derive(Serialize)]
struct Failed {
    name: String,
    error: String,
}

fn rotate_due(ctx: &Ctx) -> R<()> {
    let period = ctx.lib().cfg.keys.rotation_period_days;
    let mut report = DueReport {
        rotation_period_days: period,
        rotated: Vec::new(),
        failed: Vec::new(),
        not_due: 0,
    };
    if period == 0 {
        if ctx.g.json {
            return output::json(&report);
        }
        println!(
            "automatic rotation is off on token `{}` ([keys] rotation_period_days = 0 in {}): \
             nothing rotated",
            ctx.token,
            ctx.config_name()
        );
        return Ok(());
    }
    let now = keystore::now();
    let period_s = u64::from(period) * 86_400;
    let view = ctx.view();
    for cmk in view.cmks.values() {
        if cmk.class != CKO_SECRET_KEY || cmk.state(now) != State::Enabled {
            continue;
        }
        let last = cmk.last_rotation();
        // A key whose creation was not recorded (made before cmkp11 kept dates) is due.
        if last != 0 && now.saturating_sub(last) < period_s {
            report.not_due += 1;
            continue;
        }
        match apply(ctx, cmk, Action::Rotate) {
            Ok(info) => {
                if !ctx.g.json {
                    println!(
                        "rotated `{}`: version {} is primary (last rotation: {})",
                        info.name,
                        info.primary,
                        output::time(last).unwrap_or_else(|| "unknown".into())
                    );
                }
                report.rotated.push(Rotated {
                    name: info.name,
                    last_rotation: output::time(last),
                    primary: info.primary,
                });
            }
            Err(e) => {
                eprintln!("cmkp11: {}", e.msg);
                report.failed.push(Failed {
                    name: cmk.name(),
                    error: e.msg,
                });
            }
        }
    }
    if ctx.g.json {
        output::json(&report)?;
    } else {
        println!(
            "token `{}`: {} key(s) rotated, {} not due (rotation period {period} days){}",
            ctx.token,
            report.rotated.len(),
            report.not_due,
            if report.failed.is_empty() {
                String::new()
            } else {
                format!(", {} failed", report.failed.len())
            }
        );
    }
    if !report.failed.is_empty() {
        return fail(format!(
            "{} key(s) due for rotation on token `{}` could not be rotated (see above)",
            report.failed.len(),
            ctx.token
        ));
    }
    Ok(())
}

fn disable(ctx: &Ctx, name: &str) -> R<()> {
    let cmk = ctx.cmk(name)?;
    let t = &ctx.token;
    match cmk.state(keystore::now()) {
        State::Enabled => {}
        State::Disabled => {
            let info = key_info(ctx, &cmk)?;
            return done(
                ctx,
                &info,
                format!("key `{name}` on token `{t}` is already disabled"),
            );
        }
        State::Destroyed => return fail(destroyed_text(&cmk, t)),
        State::PendingDeletion => {
            return fail(format!(
                "key `{name}` on token `{t}` is pending deletion (on {}), which already refuses \
                 every use; `cmkp11 key cancel-deletion {name}` keeps it (disabled)",
                pending_text(&cmk)
            ))
        }
    }
    let info = apply(ctx, &cmk, Action::Disable)?;
    done(
        ctx,
        &info,
        format!(
            "disabled key `{name}` on token `{t}`: every use is refused until \
             `cmkp11 key enable {name}`"
        ),
    )
}

fn enable(ctx: &Ctx, name: &str) -> R<()> {
    let cmk = ctx.cmk(name)?;
    let t = &ctx.token;
    match cmk.state(keystore::now()) {
        State::Disabled => {}
        State::Enabled => {
            let info = key_info(ctx, &cmk)?;
            return done(
                ctx,
                &info,
                format!("key `{name}` on token `{t}` is already enabled"),
            );
        }
        State::Destroyed => return fail(destroyed_text(&cmk, t)),
        State::PendingDeletion => {
            return fail(format!(
                "key `{name}` on token `{t}` is pending deletion (on {}): cancel the deletion \
                 first with `cmkp11 key cancel-deletion {name}`, then enable it",
                pending_text(&cmk)
            ))
        }
    }
    let info = apply(ctx, &cmk, Action::Enable)?;
    done(ctx, &info, format!("enabled key `{name}` on token `{t}`"))
}

fn schedule_deletion(ctx: &Ctx, name: &str, days: Option<u32>) -> R<()> {
    let cmk = ctx.cmk(name)?;
    let t = &ctx.token;
    if cmk.state(keystore::now()) == State::PendingDeletion {
        return fail(format!(
            "key `{name}` on token `{t}` is already scheduled for deletion on {}; to change \
             the date, `cmkp11 key cancel-deletion {name}` and schedule it again",
            pending_text(&cmk)
        ));
    }
    let info = apply(ctx, &cmk, Action::ScheduleDeletion(days))?;
    done(
        ctx,
        &info,
        format!(
            "key `{name}` on token `{t}` is scheduled for deletion on {} and refused for any use \
             until then; `cmkp11 key cancel-deletion {name}` recovers it",
            info.deletion_date.as_deref().unwrap_or("-")
        ),
    )
}

fn cancel_deletion(ctx: &Ctx, name: &str) -> R<()> {
    let cmk = ctx.cmk(name)?;
    let t = &ctx.token;
    let state = cmk.state(keystore::now());
    if state != State::PendingDeletion {
        return fail(format!(
            "key `{name}` on token `{t}` is {}, not pending deletion: nothing to cancel",
            state.name()
        ));
    }
    let info = apply(ctx, &cmk, Action::CancelDeletion)?;
    done(
        ctx,
        &info,
        format!(
            "cancelled the deletion of key `{name}` on token `{t}`: it is disabled; \
             `cmkp11 key enable {name}` to use it again"
        ),
    )
}

#[derive(Serialize)]
struct MigrateReport {
    migrated: Vec<String>,
}

fn migrate(ctx: &Ctx) -> R<()> {
    let migrated = {
        let (lib, s) = ctx.parts();
        lib.migrate(&s)
            .map_err(lib_err(&ctx.token, "authenticate the lifecycle records"))?
    };
    if ctx.g.json {
        return output::json(&MigrateReport { migrated });
    }
    for n in &migrated {
        println!(
            "authenticated the state record of key `{n}` on token `{}`",
            ctx.token
        );
    }
    println!(
        "token `{}`: lifecycle records are authenticated ({} key(s) migrated)",
        ctx.token,
        migrated.len()
    );
    Ok(())
}

#[derive(Serialize)]
struct PurgeReport {
    purged: Vec<String>,
}

fn purge(ctx: &Ctx) -> R<()> {
    let purged = {
        let (lib, s) = ctx.parts();
        lib.purge(&s)
            .map_err(lib_err(&ctx.token, "purge destroyed keys"))?
    };
    if ctx.g.json {
        return output::json(&PurgeReport { purged });
    }
    if purged.is_empty() {
        println!(
            "token `{}`: no key past its deletion date; nothing purged",
            ctx.token
        );
    } else {
        for n in &purged {
            println!("destroyed key `{n}` on token `{}`", ctx.token);
        }
    }
    Ok(())
}
