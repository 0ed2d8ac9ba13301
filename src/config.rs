//! Configuration: `CMKP11_CONFIG`, else `/etc/cmkp11/cmkp11.toml`, else built-in defaults.
//!
//! Unknown keys, bad values, a missing backend module or a file writable by group or
//! others are errors that name the file, the key and the problem.

use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Where the system-wide configuration lives when `CMKP11_CONFIG` is not set.
pub const SYSTEM_CONFIG: &str = "/etc/cmkp11/cmkp11.toml";
/// The backend module used when the configuration names none (Debian's SoftHSM2).
pub const DEFAULT_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The token behind cmkp11.
    #[serde(default)]
    pub backend: Backend,
    /// Where log lines go.
    #[serde(default)]
    pub log: Log,
    /// Key lifecycle settings (used by the keystore).
    #[serde(default)]
    pub keys: Keys,
    /// The audit log (used by the audit module).
    #[serde(default)]
    pub audit: Audit,
    /// Policy switches.
    #[serde(default)]
    pub policy: Policy,
    /// Access rules, in order.
    #[serde(default)]
    pub access: Vec<Access>,
    /// Rate limits per key and client (`[[rate_limit]]`).
    #[serde(default)]
    pub rate_limit: Vec<crate::policy::rate::RateLimit>,
    /// Service mode (`cmkp11d` and the client mode of the module).
    #[serde(default)]
    pub service: Option<Service>,
    /// Applications allowed to log in to `cmkp11d` (service mode only).
    #[serde(default)]
    pub clients: Vec<Client>,
    /// Operators allowed on `cmkp11d`'s admin socket (service mode only).
    #[serde(default)]
    pub operators: Vec<Operator>,
    /// Actions that need the approval of several operators (service mode only).
    #[serde(default)]
    pub dual_control: Option<DualControl>,
    /// The file this configuration was read from, or `None` for the defaults.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// `[service]`: in an application's configuration, the daemon to forward every call to;
/// in `cmkp11d`'s, where it listens, the token PIN and the per-client limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// The daemon's Unix socket.
    pub socket: PathBuf,
    /// Daemon only: a file (root- or daemon-readable, mode 0600 or stricter) holding the
    /// backend token's user PIN. Applications never see it.
    #[serde(default)]
    pub token_pin_file: Option<PathBuf>,
    /// Daemon only: most sessions one client may hold open.
    #[serde(default = "default_max_sessions")]
    pub max_sessions: usize,
    /// Daemon only: most objects one client may create (session or token objects).
    #[serde(default = "default_max_objects")]
    pub max_objects: usize,
    /// Daemon only: most connections (requests in flight) one client may hold.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Daemon only: the socket's mode (octal string, default "0666": the application
    /// credentials and the access rules decide, not the file mode).
    #[serde(default)]
    pub socket_mode: Option<String>,
    /// Daemon only: seconds between two runs of the daemon's own purge of keys past their
    /// deletion date (0: no timer; `cmkp11 key purge` then stays the only way).
    #[serde(default = "default_purge_interval")]
    pub purge_interval: u64,
    /// Daemon only: serve metrics (Prometheus text format over HTTP) on this Unix socket
    /// (created mode 0660: the daemon's group may scrape).
    #[serde(default)]
    pub metrics_socket: Option<PathBuf>,
    /// Daemon only: serve metrics on this TCP address, which must be a loopback address
    /// (e.g. "127.0.0.1:9464"; a non-loopback address is refused at start).
    #[serde(default)]
    pub metrics_listen: Option<String>,
    /// Daemon only: the operators' Unix socket (`cmkp11 --admin-socket`); none: no
    /// operator plane (lifecycle changes are then refused to everyone but the daemon).
    #[serde(default)]
    pub admin_socket: Option<PathBuf>,
    /// Daemon only: the admin socket's mode (octal string, default "0666": the kernel's
    /// peer uid/gid and `[[operators]]` decide, not the file mode).
    #[serde(default)]
    pub admin_socket_mode: Option<String>,
    /// Daemon only: where the daemon keeps its state (pending dual-control requests).
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Daemon only: whether applications may create new CMKs (C_GenerateKey,
    /// C_GenerateKeyPair, C_CopyObject promotion, plaintext import) for applications that
    /// make their own keys. Off by default: operators create keys on the admin socket.
    /// Every other lifecycle change (rotate, enable, disable, deletion, purge, import) is
    /// refused to applications whatever this says.
    #[serde(default)]
    pub applications_create_keys: bool,
}

fn default_purge_interval() -> u64 {
    60
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/cmkp11")
}

fn default_max_sessions() -> usize {
    256
}
fn default_max_objects() -> usize {
    10_000
}
fn default_max_connections() -> usize {
    16
}

/// An operator's role on the admin socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OperatorRole {
    /// Every key-management and lifecycle action, and approving dual-control requests.
    Admin,
    /// Reads only: `key list/show` and `audit verify/tail/report`.
    Auditor,
}

impl OperatorRole {
    /// The role's name in the configuration.
    pub fn name(self) -> &'static str {
        match self {
            OperatorRole::Admin => "admin",
            OperatorRole::Auditor => "auditor",
        }
    }
}

/// A group of `[[operators]] groups`: a name (resolved when the daemon starts) or a gid.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum GroupRef {
    /// A numeric group id.
    Gid(u32),
    /// A group name from the group database.
    Name(String),
}

/// `[[operators]]`: who may use `cmkp11d`'s admin socket, by kernel-attested uid or group.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Operator {
    /// A name for logs, audit records and dual-control requests.
    pub name: String,
    /// `admin` or `auditor`.
    pub role: OperatorRole,
    /// User ids of this operator.
    #[serde(default)]
    pub uids: Vec<u32>,
    /// Groups (names or gids) whose members are this operator: the peer's primary group
    /// or one of its supplementary groups, as the kernel reports them.
    #[serde(default)]
    pub groups: Vec<GroupRef>,
    /// A file (mode 0600) holding this operator's TOTP secret (RFC 6238, base32): when
    /// set, every action of this operator needs the current code (`--totp CODE`).
    #[serde(default)]
    pub totp_secret_file: Option<PathBuf>,
}

/// `[dual_control]`: actions that become requests, run once `approvals` different
/// operators took part: the requester and `approvals - 1` others who approved (the
/// requester is never his own approver).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DualControl {
    /// Action names: create, rotate, enable, disable, schedule-deletion,
    /// cancel-deletion, purge, import, create-import-key, export.
    pub actions: Vec<String>,
    /// Operators needed, 2..=16: the requester and `approvals - 1` others, each a
    /// different uid, who approve (the requester never approves his own request).
    #[serde(default = "default_approvals")]
    pub approvals: u32,
    /// How long a request waits for its approvals: `30m`, `24h`, `7d` (default 24h).
    #[serde(default = "default_expiry")]
    pub expiry: String,
}

fn default_approvals() -> u32 {
    2
}
fn default_expiry() -> String {
    "24h".into()
}

/// The actions `[dual_control] actions` may name.
pub const DUAL_CONTROL_ACTIONS: &[&str] = &[
    "create",
    "rotate",
    "enable",
    "disable",
    "schedule-deletion",
    "cancel-deletion",
    "purge",
    "import",
    "create-import-key",
    "export",
];

/// Parses a duration such as `90s`, `30m`, `24h` or `7d` into seconds.
pub fn parse_duration(text: &str) -> Option<u64> {
    let t = text.trim();
    let (n, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = n.parse().ok()?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return None,
    };
    n.checked_mul(mult).filter(|s| *s > 0)
}

/// `[[clients]]`: an application credential of `cmkp11d`. The application's `C_Login`
/// PIN is checked against `pin_hash`; only processes of `uids` may use it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Client {
    /// A name for logs and audit records.
    pub name: String,
    /// Kernel-attested user ids allowed to log in with this credential.
    pub uids: Vec<u32>,
    /// Argon2 PHC string of the application PIN (`cmkp11d hash-pin`).
    pub pin_hash: String,
}

/// `[backend]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    /// Path of the token's PKCS#11 module.
    #[serde(default = "default_module")]
    pub module: PathBuf,
    /// If set, only tokens with these labels become slots.
    #[serde(default)]
    pub tokens: Option<Vec<String>>,
}

fn default_module() -> PathBuf {
    PathBuf::from(DEFAULT_MODULE)
}

impl Default for Backend {
    fn default() -> Self {
        Backend {
            module: default_module(),
            tokens: None,
        }
    }
}

/// `[log]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Log {
    /// `error`, `warn` (default), `info`, `debug` or `trace`.
    #[serde(default = "default_level")]
    pub level: String,
    /// Append log lines to this file instead of stderr.
    #[serde(default)]
    pub file: Option<PathBuf>,
}

fn default_level() -> String {
    "warn".into()
}

impl Default for Log {
    fn default() -> Self {
        Log {
            level: default_level(),
            file: None,
        }
    }
}

/// `[keys]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Keys {
    /// Days between `C_DestroyObject` on a CMK and its destruction (1..=365).
    #[serde(default = "default_window")]
    pub deletion_window_days: u32,
    /// Role of a secret CMK whose template names no usage: `wrap`, `data` or `mac`.
    #[serde(default = "default_role")]
    pub default_role: String,
    /// Rotation period used by `cmkp11 key rotate --due` (0: never).
    #[serde(default)]
    pub rotation_period_days: u32,
    /// AES-GCM encryptions one version of a CMK may make before cmkp11 rotates the key
    /// (NIST SP 800-38D: at most 2^32 with random IVs).
    #[serde(default = "default_gcm_limit")]
    pub gcm_invocation_limit: u64,
}

/// The default of `keys.gcm_invocation_limit`: 4e9, below 2^32 with a margin for the
/// blocks that processes reserve and may leave unused.
pub const DEFAULT_GCM_LIMIT: u64 = 4_000_000_000;

fn default_gcm_limit() -> u64 {
    DEFAULT_GCM_LIMIT
}

fn default_window() -> u32 {
    30
}
fn default_role() -> String {
    "wrap".into()
}

impl Default for Keys {
    fn default() -> Self {
        Keys {
            deletion_window_days: default_window(),
            default_role: default_role(),
            rotation_period_days: 0,
            gcm_invocation_limit: DEFAULT_GCM_LIMIT,
        }
    }
}

/// `[audit]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Audit {
    /// The audit log file.
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// Also send records to syslog.
    #[serde(default)]
    pub syslog: bool,
    /// The syslog socket records go to (default `/dev/log`, which journald and rsyslog
    /// read).
    #[serde(default)]
    pub syslog_socket: Option<PathBuf>,
    /// `deny` (default): a key use that cannot be recorded is refused; `allow`: logged.
    #[serde(default = "default_on_failure")]
    pub on_failure: String,
}

fn default_on_failure() -> String {
    "deny".into()
}

impl Default for Audit {
    fn default() -> Self {
        Audit {
            file: None,
            syslog: false,
            syslog_socket: None,
            on_failure: default_on_failure(),
        }
    }
}

/// `[policy]`
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Test-only: allow `C_CreateObject` of secret/private keys carrying key material.
    #[serde(default)]
    pub allow_plaintext_import: bool,
    /// Allow RSA PKCS#1 v1.5 decryption (legacy TLS key exchange).
    #[serde(default)]
    pub allow_rsa_pkcs1_decrypt: bool,
    /// Allow BYOK import of wrapped keys.
    #[serde(default)]
    pub allow_import: bool,
}

pub use crate::policy::access::Access;

impl Config {
    /// The policy's settings from this configuration.
    pub fn policy_settings(&self) -> crate::policy::Settings {
        crate::policy::Settings {
            allow_plaintext_import: self.policy.allow_plaintext_import,
            allow_rsa_pkcs1_decrypt: self.policy.allow_rsa_pkcs1_decrypt,
            default_role: crate::policy::SecretRole::parse(&self.keys.default_role)
                .unwrap_or(crate::policy::SecretRole::Wrap),
        }
    }

    /// Loads the configuration the way the module does: `CMKP11_CONFIG`, else the system
    /// file if it exists, else the defaults.
    pub fn load() -> Result<Config> {
        match std::env::var_os("CMKP11_CONFIG") {
            Some(p) if !p.is_empty() => Config::from_file(Path::new(&p)),
            _ if Path::new(SYSTEM_CONFIG).exists() => Config::from_file(Path::new(SYSTEM_CONFIG)),
            _ => {
                let c = Config::default();
                c.validate()?;
                Ok(c)
            }
        }
    }

    /// Reads and validates one file.
    pub fn from_file(path: &Path) -> Result<Config> {
        let file = path.display().to_string();
        let bad = |key: &str, problem: String| Error::Config {
            file: file.clone(),
            key: key.into(),
            problem,
        };
        let meta = std::fs::metadata(path).map_err(|e| bad("-", format!("cannot read: {e}")))?;
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode();
            if mode & 0o022 != 0 {
                return Err(bad(
                    "-",
                    format!(
                        "file mode {:o} is writable by group or others; chmod go-w it",
                        mode & 0o777
                    ),
                ));
            }
        }
        let text =
            std::fs::read_to_string(path).map_err(|e| bad("-", format!("cannot read: {e}")))?;
        let mut c = Config::parse(&text).map_err(|(key, problem)| bad(&key, problem))?;
        c.source = Some(path.to_path_buf());
        c.validate()?;
        Ok(c)
    }

    /// Parses TOML text; on error returns (dotted key, problem).
    pub fn parse(text: &str) -> std::result::Result<Config, (String, String)> {
        toml::from_str::<Config>(text).map_err(|e| {
            let msg = e.message().to_string();
            // serde names an unknown field as "unknown field `x`": report that key.
            let key = msg
                .split('`')
                .nth(1)
                .filter(|_| msg.starts_with("unknown field") || msg.starts_with("missing field"))
                .map(str::to_string)
                .or_else(|| e.span().map(|s| key_at(text, s.start)))
                .unwrap_or_else(|| "-".into());
            (key, msg.lines().next().unwrap_or("invalid").to_string())
        })
    }

    /// Checks values that the types alone do not constrain.
    pub fn validate(&self) -> Result<()> {
        let file = self
            .source
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "defaults".into());
        let bad = |key: &str, problem: String| {
            Err(Error::Config {
                file: file.clone(),
                key: key.into(),
                problem,
            })
        };
        if !self.backend.module.is_file() {
            return bad(
                "backend.module",
                format!(
                    "{} does not exist or is not a file",
                    self.backend.module.display()
                ),
            );
        }
        if !["error", "warn", "info", "debug", "trace", "off"].contains(&self.log.level.as_str()) {
            return bad(
                "log.level",
                format!(
                    "`{}` is not one of error, warn, info, debug, trace, off",
                    self.log.level
                ),
            );
        }
        if !(1..=365).contains(&self.keys.deletion_window_days) {
            return bad(
                "keys.deletion_window_days",
                format!("{} is outside 1..=365", self.keys.deletion_window_days),
            );
        }
        if !(1..=1u64 << 32).contains(&self.keys.gcm_invocation_limit) {
            return bad(
                "keys.gcm_invocation_limit",
                format!(
                    "{} is outside 1..=4294967296 (NIST SP 800-38D: 2^32 with random IVs)",
                    self.keys.gcm_invocation_limit
                ),
            );
        }
        if !["wrap", "data", "mac"].contains(&self.keys.default_role.as_str()) {
            return bad(
                "keys.default_role",
                format!("`{}` is not one of wrap, data, mac", self.keys.default_role),
            );
        }
        if let Err((i, problem)) = crate::policy::access::validate(&self.access) {
            return bad(&format!("access[{i}]"), problem);
        }
        if let Err((i, problem)) = crate::policy::rate::validate(&self.rate_limit) {
            return bad(&format!("rate_limit[{i}]"), problem);
        }
        for (i, c) in self.clients.iter().enumerate() {
            if !c.pin_hash.starts_with("$argon2") {
                return bad(
                    &format!("clients[{i}].pin_hash"),
                    "is not an Argon2 PHC string (make one with `cmkp11d hash-pin`)".into(),
                );
            }
            if c.uids.is_empty() {
                return bad(&format!("clients[{i}].uids"), "is empty".into());
            }
        }
        if let Some(svc) = &self.service {
            if svc.max_sessions == 0 || svc.max_objects == 0 || svc.max_connections == 0 {
                return bad("service", "limits must be at least 1".into());
            }
            if svc.purge_interval > 86_400 {
                return bad(
                    "service.purge_interval",
                    format!(
                        "{} s is more than a day (86400); 0 turns the timer off",
                        svc.purge_interval
                    ),
                );
            }
            if let Some(m) = &svc.socket_mode {
                if u32::from_str_radix(m, 8).map_or(true, |m| m > 0o777) {
                    return bad("service.socket_mode", format!("`{m}` is not an octal mode"));
                }
            }
            if let Some(m) = &svc.admin_socket_mode {
                if u32::from_str_radix(m, 8).map_or(true, |m| m > 0o777) {
                    return bad(
                        "service.admin_socket_mode",
                        format!("`{m}` is not an octal mode"),
                    );
                }
            }
            if svc.admin_socket.as_ref() == Some(&svc.socket) {
                return bad(
                    "service.admin_socket",
                    "must not be the applications' socket".into(),
                );
            }
        }
        for (i, o) in self.operators.iter().enumerate() {
            if o.name.is_empty() {
                return bad(&format!("operators[{i}].name"), "is empty".into());
            }
            if o.uids.is_empty() && o.groups.is_empty() {
                return bad(
                    &format!("operators[{i}]"),
                    "names neither uids nor groups".into(),
                );
            }
            if self.operators[..i].iter().any(|p| p.name == o.name) {
                return bad(
                    &format!("operators[{i}].name"),
                    format!("`{}` is used twice", o.name),
                );
            }
        }
        let admin_socket = self
            .service
            .as_ref()
            .is_some_and(|svc| svc.admin_socket.is_some());
        if (!self.operators.is_empty() || self.dual_control.is_some()) && !admin_socket {
            return bad(
                "service.admin_socket",
                "is missing: [[operators]] and [dual_control] act through the daemon's admin \
                 socket"
                    .into(),
            );
        }
        if let Some(d) = &self.dual_control {
            for a in &d.actions {
                if !DUAL_CONTROL_ACTIONS.contains(&a.as_str()) {
                    return bad(
                        "dual_control.actions",
                        format!("`{a}` is not one of {}", DUAL_CONTROL_ACTIONS.join(", ")),
                    );
                }
            }
            if !(2..=16).contains(&d.approvals) {
                return bad(
                    "dual_control.approvals",
                    format!("{} is outside 2..=16", d.approvals),
                );
            }
            if parse_duration(&d.expiry).is_none() {
                return bad(
                    "dual_control.expiry",
                    format!("`{}` is not a duration such as 30m, 24h or 7d", d.expiry),
                );
            }
        }
        if !["deny", "allow"].contains(&self.audit.on_failure.as_str()) {
            return bad(
                "audit.on_failure",
                format!("`{}` is not one of deny, allow", self.audit.on_failure),
            );
        }
        Ok(())
    }
}

/// The dotted key whose line contains byte offset `at` (best effort, for error messages).
fn key_at(text: &str, at: usize) -> String {
    let mut table = String::new();
    let mut key = String::new();
    let mut pos = 0;
    for line in text.split_inclusive('\n') {
        let t = line.trim();
        if t.starts_with('[') {
            table = t.trim_matches(|c| c == '[' || c == ']').trim().to_string();
        } else if let Some((k, _)) = t.split_once('=') {
            key = k.trim().to_string();
        }
        pos += line.len();
        if pos > at {
            break;
        }
    }
    match (table.is_empty(), key.is_empty()) {
        (true, _) => key,
        (false, true) => table,
        (false, false) => format!("{table}.{key}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_is_named() {
        let (key, problem) = Config::parse("[backend]\nmodul = \"x\"\n").unwrap_err();
        assert_eq!(key, "modul");
        assert!(problem.contains("unknown field"), "{problem}");
    }

    #[test]
    fn bad_type_names_the_key() {
        let (key, _) = Config::parse("[keys]\ndeletion_window_days = \"x\"\n").unwrap_err();
        assert_eq!(key, "keys.deletion_window_days");
    }

    #[test]
    fn defaults_apply() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.backend.module, PathBuf::from(DEFAULT_MODULE));
        assert_eq!(c.keys.deletion_window_days, 30);
        assert_eq!(c.log.level, "warn");
    }

    #[test]
    fn window_out_of_range_is_refused() {
        let mut c = Config::parse("[keys]\ndeletion_window_days = 0\n").unwrap();
        c.backend.module = PathBuf::from("/bin/sh");
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("keys.deletion_window_days"), "{e}");
    }

    #[test]
    fn operators_need_the_admin_socket() {
        let mut c = Config::parse(
            "[service]\nsocket = \"/tmp/x.sock\"\n\n[[operators]]\nname = \"a\"\n\
             role = \"admin\"\nuids = [1]\n",
        )
        .unwrap();
        c.backend.module = std::env::current_exe().unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("service.admin_socket"), "{e}");
        c.service.as_mut().unwrap().admin_socket = Some("/tmp/a.sock".into());
        c.validate().unwrap();
        c.dual_control = Some(DualControl {
            actions: vec!["shred".into()],
            approvals: 2,
            expiry: "24h".into(),
        });
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("dual_control.actions"), "{e}");
        c.dual_control = Some(DualControl {
            actions: vec!["purge".into()],
            approvals: 1,
            expiry: "24h".into(),
        });
        assert!(c.validate().is_err(), "one operator is no dual control");
        c.dual_control = Some(DualControl {
            actions: vec!["purge".into()],
            approvals: 2,
            expiry: "soon".into(),
        });
        assert!(c.validate().is_err());
        assert_eq!(parse_duration("90s"), Some(90));
        assert_eq!(parse_duration("24h"), Some(86_400));
        assert_eq!(parse_duration("7d"), Some(604_800));
        assert_eq!(parse_duration("0h"), None);
        assert_eq!(parse_duration("h"), None);
    }

    #[test]
    fn missing_module_is_refused() {
        let c = Config::parse("[backend]\nmodule = \"/nonexistent.so\"\n").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("backend.module") && e.contains("/nonexistent.so"),
            "{e}"
        );
    }
}
