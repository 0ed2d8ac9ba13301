//! The operators' protocol: `cmkp11 --admin-socket PATH` and `cmkp11d`'s admin socket.
//!
//! Framing is the application protocol's ([`super::proto::send`], [`super::proto::recv`]:
//! a 4-byte length, then the message in `postcard`). A connection carries requests of one
//! operator, each an [`AdminRequest`] answered by one [`AdminReply`]. Who the operator is
//! comes from the kernel (`SO_PEERCRED`, `SO_PEERGROUPS`) and the daemon's `[[operators]]`,
//! never from the message.
//!
//! # Adding an action
//! 1. a variant of [`Action`], with its [`Action::name`], [`Action::needs`] (what role it
//!    needs) and, if `[dual_control]` may name it, [`Action::controlled`];
//! 2. its execution in `crate::daemon::admin` (`Admin::execute`), which returns an
//!    [`Outcome`] (a text for people, a JSON document for scripts, an exit status);
//! 3. the CLI side (`src/bin/cmkp11/remote.rs`), which sends it and prints the outcome.
//!
//! A controlled action never runs when asked: it becomes a request
//! (`crate::daemon::requests`) and runs, as recorded in the request, once approved.

use serde::{Deserialize, Serialize};

/// Protocol version of this build (an [`AdminRequest`] of another version is refused).
pub const ADMIN_VERSION: u32 = 1;

/// One request of an operator.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdminRequest {
    /// [`ADMIN_VERSION`].
    pub version: u32,
    /// The token, by label (`None`: the daemon's only token).
    pub token: Option<String>,
    /// The operator's current TOTP code, when the daemon's configuration gives the
    /// operator a TOTP secret.
    pub totp: Option<String>,
    /// What to do.
    pub action: Action,
}

/// What a new AES CMK is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub enum SecretRole {
    Wrap,
    Data,
    Mac,
}

/// The hash of a BYOK import's RSA-OAEP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub enum OaepHash {
    Sha256,
    Sha1,
}

/// An operator action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// Who the daemon thinks the caller is (operator name, role, uid).
    WhoAmI,
    /// The token's keys.
    KeyList,
    /// One key.
    KeyShow {
        /// The key's name.
        name: String,
    },
    /// A new AES CMK.
    KeyCreate {
        /// Its name.
        name: String,
        /// Its role (`None`: `[keys] default_role`).
        role: Option<SecretRole>,
        /// 128 or 256.
        bits: u32,
        /// Exportable to trusted destinations (`key export`); default never.
        exportable: bool,
    },
    /// A new primary version.
    KeyRotate {
        /// The key's name.
        name: String,
    },
    /// Enabled -> disabled.
    KeyDisable {
        /// The key's name.
        name: String,
    },
    /// Disabled -> enabled.
    KeyEnable {
        /// The key's name.
        name: String,
    },
    /// -> pending deletion.
    KeyScheduleDeletion {
        /// The key's name.
        name: String,
        /// Days (`None`: `[keys] deletion_window_days`).
        days: Option<u32>,
    },
    /// Pending deletion -> disabled.
    KeyCancelDeletion {
        /// The key's name.
        name: String,
    },
    /// Destroy the keys past their deletion date.
    KeyPurge,
    /// BYOK step 1: an RSA-3072 import key pair in the token.
    ImportKeyCreate {
        /// Its label.
        label: String,
    },
    /// BYOK: the public half of an import key (modulus and exponent, in the JSON).
    ImportKeyPublic {
        /// Its label.
        label: String,
    },
    /// BYOK step 2: a wrapped AES key becomes a CMK.
    KeyImport {
        /// The new CMK's name.
        name: String,
        /// The import key's label.
        import_key: String,
        /// The RSA-OAEP blob.
        blob: Vec<u8>,
        /// The CMK's role.
        role: Option<SecretRole>,
        /// The OAEP hash.
        hash: OaepHash,
        /// The AES key's length in bits (128 or 256).
        bits: u32,
    },
    /// Export an exportable key, wrapped under a trusted destination's import key (the
    /// blob, in hex, is in the outcome's JSON, and kept with the request under dual
    /// control).
    KeyExport {
        /// The key's name.
        name: String,
        /// The trusted destination's name.
        to: String,
    },
    /// Verify the audit log (chain, token MACs, token checkpoint).
    AuditVerify {
        /// The outcome as JSON.
        json: bool,
    },
    /// The last records of the audit log.
    AuditTail {
        /// How many.
        lines: usize,
        /// Only this key's.
        key: Option<String>,
        /// Raw JSON lines.
        json: bool,
    },
    /// Uses per key and operation.
    AuditReport {
        /// From (RFC 3339 date/time, or `24h`/`7d` ago).
        since: Option<String>,
        /// Before.
        until: Option<String>,
        /// As JSON.
        json: bool,
    },
    /// Dual-control requests (pending first).
    RequestList,
    /// One request.
    RequestShow {
        /// Its id.
        id: String,
    },
    /// Approve a request (never one's own); it runs at the last approval needed.
    RequestApprove {
        /// Its id.
        id: String,
    },
    /// Reject a request: it never runs.
    RequestReject {
        /// Its id.
        id: String,
    },
    /// Withdraw one's own request.
    RequestCancel {
        /// Its id.
        id: String,
    },
}

/// What an action needs of the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Any operator (auditors included): reading keys and the audit log.
    Read,
    /// An operator with the `admin` role.
    Admin,
}

impl Action {
    /// The action's name (CLI, audit records, `[dual_control] actions`).
    pub fn name(&self) -> &'static str {
        match self {
            Action::WhoAmI => "whoami",
            Action::KeyList => "list",
            Action::KeyShow { .. } => "show",
            Action::KeyCreate { .. } => "create",
            Action::KeyRotate { .. } => "rotate",
            Action::KeyDisable { .. } => "disable",
            Action::KeyEnable { .. } => "enable",
            Action::KeyScheduleDeletion { .. } => "schedule-deletion",
            Action::KeyCancelDeletion { .. } => "cancel-deletion",
            Action::KeyPurge => "purge",
            Action::ImportKeyCreate { .. } => "create-import-key",
            Action::ImportKeyPublic { .. } => "import-key-public",
            Action::KeyImport { .. } => "import",
            Action::KeyExport { .. } => "export",
            Action::AuditVerify { .. } => "audit-verify",
            Action::AuditTail { .. } => "audit-tail",
            Action::AuditReport { .. } => "audit-report",
            Action::RequestList => "request-list",
            Action::RequestShow { .. } => "request-show",
            Action::RequestApprove { .. } => "request-approve",
            Action::RequestReject { .. } => "request-reject",
            Action::RequestCancel { .. } => "request-cancel",
        }
    }

    /// The role the action needs.
    pub fn needs(&self) -> Need {
        match self {
            Action::WhoAmI
            | Action::KeyList
            | Action::KeyShow { .. }
            | Action::ImportKeyPublic { .. }
            | Action::AuditVerify { .. }
            | Action::AuditTail { .. }
            | Action::AuditReport { .. } => Need::Read,
            _ => Need::Admin,
        }
    }

    /// Whether `[dual_control] actions` may name this action (a change of a key or of
    /// the token); reads and the request steps themselves never are.
    pub fn controlled(&self) -> bool {
        crate::config::DUAL_CONTROL_ACTIONS.contains(&self.name())
    }

    /// The key the action is about, if any.
    pub fn key(&self) -> Option<&str> {
        match self {
            Action::KeyShow { name }
            | Action::KeyCreate { name, .. }
            | Action::KeyRotate { name }
            | Action::KeyDisable { name }
            | Action::KeyEnable { name }
            | Action::KeyScheduleDeletion { name, .. }
            | Action::KeyCancelDeletion { name }
            | Action::KeyImport { name, .. }
            | Action::KeyExport { name, .. } => Some(name),
            Action::ImportKeyCreate { label } | Action::ImportKeyPublic { label } => Some(label),
            _ => None,
        }
    }

    /// The action in words, for request listings (`schedule-deletion payments (7 days)`).
    pub fn describe(&self) -> String {
        let mut s = self.name().to_string();
        if let Some(k) = self.key() {
            s.push(' ');
            s.push_str(k);
        }
        match self {
            Action::KeyScheduleDeletion { days: Some(d), .. } => {
                s.push_str(&format!(" ({d} days)"));
            }
            Action::KeyImport {
                import_key, bits, ..
            } => s.push_str(&format!(" (AES-{bits} under import key {import_key})")),
            Action::KeyExport { to, .. } => s.push_str(&format!(" (to {to})")),
            _ => {}
        }
        s
    }
}

/// Why the daemon refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// The caller is no operator (`[[operators]]` names neither its uid nor its groups).
    NotOperator,
    /// The operator's role does not allow the action.
    Role,
    /// A TOTP code is needed and was missing or wrong.
    Totp,
    /// The action cannot be done as asked (no such key, wrong state, bad argument,
    /// own request approved...).
    Invalid,
    /// The token or the audit log failed.
    Failed,
    /// A message this daemon cannot read (version).
    Protocol,
}

/// The daemon's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum AdminReply {
    /// Done (or, for a controlled action, made a request: see [`Outcome::request`]).
    Done(Outcome),
    /// Refused, with the reason (also logged and, for changes, audited).
    Refused {
        /// The class of refusal.
        why: Refusal,
        /// What happened and what to do, for the operator.
        message: String,
    },
}

/// The result of an action.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Outcome {
    /// For people.
    pub text: String,
    /// For scripts: one JSON document (as text: `postcard` carries no free-form JSON).
    pub json: String,
    /// The CLI's exit status (0, or e.g. 1/3 of `audit verify`).
    pub status: u8,
    /// The id of the request made, when the action is under dual control.
    pub request: Option<String>,
}

/// Sends one request to an admin socket and reads the reply (the CLI's side).
pub fn call(socket: &std::path::Path, req: &AdminRequest) -> Result<AdminReply, String> {
    let mut s = std::os::unix::net::UnixStream::connect(socket).map_err(|e| {
        format!(
            "cannot connect to the admin socket {}: {e}",
            socket.display()
        )
    })?;
    super::proto::send(&mut s, req)
        .map_err(|e| format!("admin socket {}: {e}", socket.display()))?;
    let mut buf = Vec::new();
    super::proto::recv(&mut s, &mut buf).map_err(|e| match e {
        super::proto::FrameError::Closed => format!(
            "the daemon closed the admin socket {} without an answer (see its log)",
            socket.display()
        ),
        e => format!("admin socket {}: {e}", socket.display()),
    })
}
