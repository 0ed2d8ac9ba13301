//! `cmkp11 --admin-socket PATH ...` (or `CMKP11_ADMIN_SOCKET`): the key, request and
//! audit commands as an operator of `cmkp11d`, over its admin socket. The daemon decides
//! who the operator is (from the kernel), runs the action with its own token login, and
//! answers with a text and a JSON document; this side only sends and prints. No
//! configuration, module or PIN is read here.

use crate::audit::{AuditArgs, AuditCmd};
use crate::import::{ImportArgs, ImportKeyCmd, OaepHashArg};
use crate::keyinfo::Role;
use crate::keys::{KeyCmd, ListFilter};
use crate::{fail, CliError, Global, R};
use cmkp11::service::admin_proto::{
    self as ap, Action, AdminReply, AdminRequest, OaepHash, Refusal, SecretRole,
};
use std::path::{Path, PathBuf};

/// `cmkp11 request` subcommands (dual control).
#[derive(clap::Subcommand, Debug)]
pub enum RequestCmd {
    /// The requests: pending ones first, then the decided ones.
    List,
    /// One request: its action, requester, approvals, expiry and result.
    Show {
        /// The request's id (`r-...`).
        id: String,
        /// An executed export: write the wrapped key to this file.
        #[arg(long, short, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Approve a request of another operator; the last approval needed runs it.
    Approve {
        /// The request's id.
        id: String,
        /// When this approval runs an export: write the wrapped key to this file.
        #[arg(long, short, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Reject a request of another operator: it never runs.
    Reject {
        /// The request's id.
        id: String,
    },
    /// Withdraw your own request: it never runs.
    Cancel {
        /// The request's id.
        id: String,
    },
}

/// The admin socket, from `--admin-socket`, else `CMKP11_ADMIN_SOCKET`, else
/// `[service] admin_socket` of the configuration (`CMKP11_CONFIG`, else
/// `/etc/cmkp11/cmkp11.toml`): on a host whose configuration names the service, operators
/// use the same commands as in library mode and they go to the daemon. A configuration
/// that does not load names none here (the command then reports it as before).
pub fn socket(g: &Global) -> Option<PathBuf> {
    g.admin_socket
        .clone()
        .or_else(|| {
            std::env::var_os("CMKP11_ADMIN_SOCKET")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        })
        .or_else(|| cmkp11::config::Config::load().ok()?.service?.admin_socket)
}

fn role(r: Option<Role>) -> Option<SecretRole> {
    r.map(|r| match r {
        Role::Wrap => SecretRole::Wrap,
        Role::Data => SecretRole::Data,
        Role::Mac => SecretRole::Mac,
    })
}

fn unsupported<T>(what: &str) -> R<T> {
    fail(format!(
        "{what} is not available through the admin socket; run it as the daemon's user on \
         the token, or use the actions `cmkp11 key --help` lists for operators"
    ))
}

/// Sends `action`; prints the outcome. Returns the exit status.
fn run_action(g: &Global, socket: &Path, action: Action) -> R<(u8, String)> {
    let req = AdminRequest {
        version: ap::ADMIN_VERSION,
        token: g.token.clone(),
        totp: g
            .totp
            .clone()
            .or_else(|| std::env::var("CMKP11_TOTP").ok().filter(|v| !v.is_empty())),
        action,
    };
    match ap::call(socket, &req).map_err(CliError::new)? {
        AdminReply::Done(o) => {
            if let Some(id) = &o.request {
                if req.action.controlled() && !matches!(req.action, Action::RequestApprove { .. }) {
                    eprintln!("cmkp11: request id: {id}");
                }
            }
            Ok((o.status, if g.json { o.json } else { o.text }))
        }
        AdminReply::Refused { why, message } => {
            let hint = match why {
                Refusal::NotOperator => {
                    "\nthe daemon's [[operators]] must name your uid or one of your groups"
                }
                Refusal::Totp => "\npass the current code of your authenticator with --totp CODE",
                _ => "",
            };
            fail(format!("{}: refused: {message}{hint}", socket.display()))
        }
    }
}

fn print(text: &str) {
    if text.ends_with('\n') {
        print!("{text}");
    } else if !text.is_empty() {
        println!("{text}");
    }
}

/// Runs and prints; exit status as the daemon said.
fn simple(g: &Global, socket: &Path, action: Action) -> R<u8> {
    let (status, text) = run_action(g, socket, action)?;
    print(&text);
    Ok(status)
}

/// `cmkp11 key ...` through the admin socket.
pub fn key(g: &Global, socket: &Path, cmd: KeyCmd) -> R<u8> {
    match cmd {
        KeyCmd::List(filter) => list(g, socket, &filter),
        KeyCmd::Show { name } => simple(g, socket, Action::KeyShow { name }),
        KeyCmd::Create {
            key_type: Some(_), ..
        } => unsupported("`key create --type` (signing key pairs)"),
        KeyCmd::Create {
            name,
            role: r,
            bits,
            exportable,
            ..
        } => simple(
            g,
            socket,
            Action::KeyCreate {
                name,
                role: role(r),
                bits: bits.parse().unwrap_or(256),
                exportable,
            },
        ),
        KeyCmd::Export { name, to, out } => export(g, socket, name, to, &out),
        KeyCmd::Destination { .. } => {
            unsupported("`key destination` (the token's SO registers destinations)")
        }
        KeyCmd::Csr { .. } => unsupported("`key csr`"),
        KeyCmd::Rotate {
            name: Some(name), ..
        } => simple(g, socket, Action::KeyRotate { name }),
        KeyCmd::Rotate { name: None, .. } => unsupported("`key rotate --due`"),
        KeyCmd::Disable { name } => simple(g, socket, Action::KeyDisable { name }),
        KeyCmd::Enable { name } => simple(g, socket, Action::KeyEnable { name }),
        KeyCmd::ScheduleDeletion { name, days } => {
            simple(g, socket, Action::KeyScheduleDeletion { name, days })
        }
        KeyCmd::CancelDeletion { name } => simple(g, socket, Action::KeyCancelDeletion { name }),
        KeyCmd::Purge => simple(g, socket, Action::KeyPurge),
        KeyCmd::Migrate => unsupported("`key migrate` (run it once on the token directly)"),
        KeyCmd::ImportKey { cmd } => import_key(g, socket, cmd),
        KeyCmd::Import(a) => import(g, socket, a),
    }
}

fn list(g: &Global, socket: &Path, filter: &ListFilter) -> R<u8> {
    if filter.is_empty() {
        return simple(g, socket, Action::KeyList);
    }
    // Filters apply here, over the daemon's JSON.
    let json = Global {
        json: true,
        ..g.clone()
    };
    let (status, text) = run_action(&json, socket, Action::KeyList)?;
    let keys: Vec<cmkp11::runtime::admin::KeyFacts> = serde_json::from_str(&text)
        .map_err(|e| CliError::new(format!("the daemon's key list does not parse: {e}")))?;
    let keys: Vec<_> = keys
        .into_iter()
        .filter(|k| filter.admits_facts(k))
        .collect();
    if g.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&keys).unwrap_or_default()
        );
    } else if keys.is_empty() {
        println!("no keys match the filters");
    } else {
        let rows: Vec<Vec<String>> = keys
            .iter()
            .map(|k| {
                vec![
                    k.name.clone(),
                    k.state.clone(),
                    k.key_type.clone(),
                    k.role.clone(),
                    format!("{}/{}", k.primary, k.versions.len()),
                    k.origin.clone(),
                    k.deletion_date.clone().unwrap_or_else(|| "-".into()),
                ]
            })
            .collect();
        crate::output::table(
            &[
                "NAME",
                "STATE",
                "TYPE",
                "ROLE",
                "PRIMARY/VERSIONS",
                "ORIGIN",
                "DELETION",
            ],
            &rows,
        );
    }
    Ok(status)
}

fn import_key(g: &Global, socket: &Path, cmd: ImportKeyCmd) -> R<u8> {
    let (name, out, action) = match cmd {
        ImportKeyCmd::Create { name, out } => {
            (name.clone(), out, Action::ImportKeyCreate { label: name })
        }
        ImportKeyCmd::Public { name, out } => {
            (name.clone(), out, Action::ImportKeyPublic { label: name })
        }
    };
    let controlled_or_json = Global {
        json: true,
        ..g.clone()
    };
    let (status, text) = run_action(&controlled_or_json, socket, action)?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| CliError::new(format!("the daemon's answer does not parse: {e}")))?;
    let (Some(n), Some(e)) = (v["modulus"].as_str(), v["exponent"].as_str()) else {
        // A request under dual control: its id is the answer.
        print(&text);
        return Ok(status);
    };
    let unhex = |h: &str| -> Vec<u8> {
        (0..h.len() / 2)
            .filter_map(|i| u8::from_str_radix(&h[2 * i..2 * i + 2], 16).ok())
            .collect()
    };
    let out = out.unwrap_or_else(|| PathBuf::from(format!("{name}.pem")));
    std::fs::write(
        &out,
        crate::import::pem("PUBLIC KEY", &crate::import::rsa_spki(&unhex(n), &unhex(e))),
    )
    .map_err(|e| CliError::new(format!("cannot write {}: {e}", out.display())))?;
    if g.json {
        println!(
            "{}",
            serde_json::json!({ "label": name, "public_key": out })
        );
    } else {
        println!(
            "import key `{name}`: its public key is in {}; wrap your key with it \
             (docs/byok.md), then run `cmkp11 key import NEWNAME --import-key {name} \
             --wrapped FILE`",
            out.display()
        );
    }
    Ok(status)
}

fn import(g: &Global, socket: &Path, a: ImportArgs) -> R<u8> {
    let blob = std::fs::read(&a.wrapped)
        .map_err(|e| CliError::new(format!("cannot read {}: {e}", a.wrapped.display())))?;
    if blob.is_empty() || blob.len() > 4096 {
        return fail(format!(
            "{} is not a wrapped key ({} bytes; an RSA-3072 OAEP ciphertext is 384 bytes)",
            a.wrapped.display(),
            blob.len()
        ));
    }
    if !matches!(a.bits, 128 | 256) {
        return fail("--bits must be 128 or 256");
    }
    simple(
        g,
        socket,
        Action::KeyImport {
            name: a.name,
            import_key: a.import_key,
            blob,
            role: role(a.role),
            hash: match a.oaep_hash {
                OaepHashArg::Sha256 => OaepHash::Sha256,
                OaepHashArg::Sha1 => OaepHash::Sha1,
            },
            bits: a.bits as u32,
        },
    )
}

/// Writes an export's wrapped key (from the daemon's JSON) to `out`; false when the JSON
/// holds none (a request was made instead).
fn write_export(v: &serde_json::Value, out: &Path) -> R<bool> {
    let Some(hex) = v["blob"].as_str() else {
        return Ok(false);
    };
    let blob: Vec<u8> = (0..hex.len() / 2)
        .filter_map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok())
        .collect();
    std::fs::write(out, &blob)
        .map_err(|e| CliError::new(format!("cannot write {}: {e}", out.display())))?;
    println!(
        "exported key `{}` (version {}) for destination `{}` to {}\non the destination: \
         cmkp11 key import {} --import-key IMPORTKEY --wrapped {} --oaep-hash {} --bits {} \
         --role {}",
        v["key"].as_str().unwrap_or("-"),
        v["version"],
        v["destination"].as_str().unwrap_or("-"),
        out.display(),
        v["key"].as_str().unwrap_or("-"),
        out.display(),
        v["oaep_hash"].as_str().unwrap_or("-"),
        v["bits"],
        v["role"].as_str().unwrap_or("-"),
    );
    Ok(true)
}

/// `cmkp11 key export NAME --to DEST --out FILE`: the wrapped key is written to FILE, or,
/// under dual control, a request is made (`request show ID --out FILE` once approved).
fn export(g: &Global, socket: &Path, name: String, to: String, out: &Path) -> R<u8> {
    let as_json = Global {
        json: true,
        ..g.clone()
    };
    let (status, text) = run_action(&as_json, socket, Action::KeyExport { name, to })?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| CliError::new(format!("the daemon's answer does not parse: {e}")))?;
    if !write_export(&v, out)? {
        if g.json {
            println!("{text}");
        } else {
            let id = v["id"].as_str().unwrap_or("-");
            println!(
                "request {id} made: {}; once approved, `cmkp11 request show {id} --out {}` \
                 writes the wrapped key",
                v["description"].as_str().unwrap_or("export"),
                out.display()
            );
        }
    }
    Ok(status)
}

/// `cmkp11 request ...` (only through the admin socket).
pub fn request(g: &Global, cmd: RequestCmd) -> R<u8> {
    let Some(socket) = socket(g) else {
        return fail(
            "requests are the daemon's (dual control): pass --admin-socket PATH or set \
             CMKP11_ADMIN_SOCKET",
        );
    };
    let (action, out) = match cmd {
        RequestCmd::List => (Action::RequestList, None),
        RequestCmd::Show { id, out } => (Action::RequestShow { id }, out),
        RequestCmd::Approve { id, out } => (Action::RequestApprove { id }, out),
        RequestCmd::Reject { id } => (Action::RequestReject { id }, None),
        RequestCmd::Cancel { id } => (Action::RequestCancel { id }, None),
    };
    let Some(out) = out else {
        return simple(g, &socket, action);
    };
    // An executed export's wrapped key, written to `out`.
    let approve = matches!(action, Action::RequestApprove { .. });
    let as_json = Global {
        json: true,
        ..g.clone()
    };
    let (status, text) = run_action(&as_json, &socket, action)?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| CliError::new(format!("the daemon's answer does not parse: {e}")))?;
    // `approve` answers with the action's outcome when it ran; `show` with the request.
    let output = if approve { &v } else { &v["output"] };
    if !write_export(output, &out)? {
        if g.json {
            println!("{text}");
        } else {
            println!(
                "request {}: {} ({}): no exported key to write to {}",
                v["id"].as_str().unwrap_or("-"),
                v["description"].as_str().unwrap_or("-"),
                v["status"].as_str().unwrap_or("-"),
                out.display()
            );
        }
    }
    Ok(status)
}

/// `cmkp11 audit ...` through the admin socket (the daemon's log).
pub fn audit(g: &Global, socket: &Path, a: AuditArgs) -> R<u8> {
    let (action, json) = match a.cmd {
        AuditCmd::Verify { file: Some(_), .. }
        | AuditCmd::Tail { file: Some(_), .. }
        | AuditCmd::Report { file: Some(_), .. } => {
            return unsupported("`--file` (the daemon reads its own [audit] file)")
        }
        AuditCmd::Tail { follow: true, .. } => return unsupported("`audit tail -f`"),
        AuditCmd::Rotate { .. } => {
            return unsupported("`audit rotate` (run it as the daemon's user, next to its log)")
        }
        AuditCmd::Verify { json, .. } => (Action::AuditVerify { json }, json),
        AuditCmd::Tail {
            key, json, lines, ..
        } => (Action::AuditTail { lines, key, json }, json),
        AuditCmd::Report {
            since, until, json, ..
        } => (Action::AuditReport { since, until, json }, json),
    };
    let g = Global {
        json: g.json || json,
        ..g.clone()
    };
    simple(&g, socket, action)
}
