//! The operators' side of `cmkp11d`: the admin socket (`[service] admin_socket`).
//!
//! # Who is an operator
//! The kernel says who connected (`SO_PEERCRED`: uid, gid, pid; `SO_PEERGROUPS`: the
//! supplementary groups), and the first `[[operators]]` entry naming that uid, or one of
//! those groups, says which operator that is and with which role: `admin` (every
//! key-management and lifecycle action, approving requests) or `auditor` (`key list/show`
//! and `audit verify/tail/report` only). Nothing the client sends names the operator. An
//! operator with `totp_secret_file` must send the current TOTP code (RFC 6238) with every
//! action that changes something; a code is accepted once.
//!
//! # What runs
//! Each action runs through the same runtime as applications' calls, on a session of the
//! daemon's own login, with the operator as the caller: the runtime's lifecycle steps,
//! audit records (uid, pid, executable of the operator's process) and policy are those of
//! library mode. Actions named by `[dual_control]` become requests ([`super::requests`]).
//!
//! # Audit
//! Every refusal of a change, and every step of a request (request, approve, reject,
//! cancel, expire, execute and its result, a tampered request file), is an audit record of
//! the runtime's audit log, written as the operator.
//!
//! To add an action: see [`crate::service::admin_proto`].

use super::requests::{self, LoadError, Status, Store, Who};
use super::server::peer_of;
use crate::config::{Config, GroupRef, Operator, OperatorRole};
use crate::error::Error;
use crate::keystore::{self, Cmk, State};
use crate::runtime::admin::{Action as Step, KeyFacts};
use crate::runtime::session::Session;
use crate::runtime::Library;
use crate::service::admin_proto::{
    self as ap, Action, AdminReply, AdminRequest, Need, Outcome, Refusal,
};
use crate::service::proto::{self, FrameError};
use crate::sys::peer::{serve_as, Peer};
use cryptoki_sys::*;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::Duration;

/// How long an admin connection may stay idle between requests.
pub const IDLE: Duration = Duration::from_secs(300);
/// Most admin connections served at once (each has a thread): local users who are no
/// operators cannot take more.
pub const MAX_ADMIN_CONNECTIONS: usize = 64;
/// How often pending requests are checked for expiry (their expiry is also checked at
/// every use).
pub const SWEEP: Duration = Duration::from_secs(10);

/// A refusal: its class and the operator's message.
type Refused = (Refusal, String);

/// A connected operator.
pub struct Caller {
    /// The operator's process, as the kernel reports it (`operator` set).
    pub peer: Arc<Peer>,
    /// The `[[operators]]` entry.
    pub name: String,
    /// Its role.
    pub role: OperatorRole,
}

impl Caller {
    fn who(&self) -> Who {
        Who {
            name: self.name.clone(),
            uid: self.peer.uid,
        }
    }
}

struct DualControl {
    actions: Vec<String>,
    approvals: u32,
    expiry: u64,
}

/// The admin socket's state.
pub struct Admin {
    operators: Vec<(Operator, Vec<u32>)>,
    dual: Option<DualControl>,
    store: Option<Store>,
    /// TOTP: the last time step accepted per operator (a code counts once).
    totp_used: Mutex<HashMap<String, u64>>,
    /// Connections being served.
    connections: std::sync::atomic::AtomicUsize,
}

fn lib_text(e: &Error) -> String {
    match e {
        Error::Config { .. } | Error::Audit(_) => e.to_string(),
        _ => crate::backend::rv::name(e.rv()).to_string(),
    }
}

fn failed(what: &str) -> impl Fn(Error) -> Refused + '_ {
    move |e| (Refusal::Failed, format!("{what}: {}", lib_text(&e)))
}

fn invalid<T>(msg: impl Into<String>) -> Result<T, Refused> {
    Err((Refusal::Invalid, msg.into()))
}

/// A plain-text table.
fn table(head: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = head.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                l.push_str(&format!("{c:<w$}  "));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(head.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
    out
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| "null".into())
}

fn now() -> u64 {
    keystore::now()
}

impl Admin {
    /// The admin socket's state for the daemon's configuration. Group names are resolved
    /// now; with `[dual_control]`, the request store is opened (its token key made on
    /// first use: the daemon must be logged in to the token).
    pub fn new(cfg: &Config) -> Result<Admin, String> {
        let mut operators = Vec::new();
        for (i, o) in cfg.operators.iter().enumerate() {
            let mut gids = Vec::new();
            for g in &o.groups {
                gids.push(match g {
                    GroupRef::Gid(g) => *g,
                    GroupRef::Name(n) => crate::sys::peer::group_id(n).ok_or_else(|| {
                        format!("operators[{i}].groups: no group named `{n}` on this host")
                    })?,
                });
            }
            if let Some(f) = &o.totp_secret_file {
                totp_secret(f).map_err(|e| format!("operators[{i}].totp_secret_file: {e}"))?;
            }
            operators.push((o.clone(), gids));
        }
        let dual = cfg
            .dual_control
            .as_ref()
            .map(|d| DualControl {
                actions: d.actions.clone(),
                approvals: d.approvals,
                expiry: crate::config::parse_duration(&d.expiry).unwrap_or(86_400),
            })
            .filter(|d| !d.actions.is_empty());
        let store = match &dual {
            None => None,
            Some(_) => {
                let svc = cfg.service.as_ref().ok_or("no [service] section")?;
                let lib = crate::runtime::library()
                    .map_err(|e| format!("the runtime is not running: {}", lib_text(&e)))?;
                let slot = *lib
                    .backend
                    .slots
                    .first()
                    .ok_or("no token: dual-control requests need one for their key")?;
                let dir = svc.state_dir.join("requests");
                let mac =
                    crate::runtime::audit_mac::TokenAuditMac::new(lib.backend.ctx.clone(), slot)
                        .for_log(&dir);
                let store = Store::open(&dir, Arc::new(mac))?;
                // Make (or find) the token key now, while the daemon starts: a failure
                // here is a failure to start, not a surprise at the first request.
                store.check()?;
                Some(store)
            }
        };
        if operators.is_empty() {
            log::warn!(
                "no [[operators]]: nobody may use the admin socket (lifecycle changes are refused)"
            );
        }
        Ok(Admin {
            operators,
            dual,
            store,
            totp_used: Mutex::new(HashMap::new()),
            connections: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// Serves the admin socket forever (a thread per connection) and sweeps expired
    /// requests.
    pub fn serve(self: &Arc<Self>, listener: UnixListener) {
        if self.store.is_some() {
            let me = self.clone();
            let _ = std::thread::Builder::new()
                .name("cmkp11d-expiry".into())
                .spawn(move || loop {
                    std::thread::sleep(SWEEP);
                    me.sweep();
                });
        }
        for conn in listener.incoming() {
            match conn {
                Ok(stream) => {
                    use std::sync::atomic::Ordering;
                    if self.connections.fetch_add(1, Ordering::AcqRel) >= MAX_ADMIN_CONNECTIONS {
                        self.connections.fetch_sub(1, Ordering::AcqRel);
                        log::warn!(
                            "admin socket: connection refused: {MAX_ADMIN_CONNECTIONS} in use"
                        );
                        continue;
                    }
                    let me = self.clone();
                    if let Err(e) = std::thread::Builder::new()
                        .name("cmkp11d-admin".into())
                        .spawn(move || {
                            me.connection(stream);
                            me.connections.fetch_sub(1, Ordering::AcqRel);
                        })
                    {
                        self.connections.fetch_sub(1, Ordering::AcqRel);
                        log::error!("cannot start an admin connection thread: {e}");
                    }
                }
                Err(e) => {
                    log::warn!("admin socket: accept: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }

    /// The operator a peer is, if any: the first `[[operators]]` entry naming its uid or
    /// one of its groups (primary or supplementary, from the kernel).
    pub fn identify(&self, uid: u32, groups: &[u32]) -> Option<&Operator> {
        self.operators
            .iter()
            .find(|(o, gids)| o.uids.contains(&uid) || gids.iter().any(|g| groups.contains(g)))
            .map(|(o, _)| o)
    }

    fn connection(&self, mut stream: UnixStream) {
        let peer = match peer_of(&stream) {
            Ok(p) => p,
            Err(e) => {
                log::warn!("admin connection dropped: cannot identify the peer: {e}");
                return;
            }
        };
        let mut groups = crate::sys::peer::peer_groups(&stream).unwrap_or_default();
        groups.push(peer.gid);
        let peer = Arc::new(Peer {
            operator: true,
            ..peer
        });
        let op = self.identify(peer.uid, &groups).map(|o| Caller {
            peer: peer.clone(),
            name: o.name.clone(),
            role: o.role,
        });
        let _ = stream.set_read_timeout(Some(IDLE));
        let mut buf = Vec::new();
        loop {
            let req: AdminRequest = match proto::recv(&mut stream, &mut buf) {
                Ok(r) => r,
                Err(FrameError::Closed) => break,
                Err(e) => {
                    log::warn!(
                        "admin socket: pid {} uid {}: {e}; connection dropped",
                        peer.pid,
                        peer.uid
                    );
                    break;
                }
            };
            let reply = serve_as(&peer, || self.handle(&peer, op.as_ref(), req));
            if proto::send(&mut stream, &reply).is_err() {
                break;
            }
            if op.is_none() {
                // One refusal (and one audit record) per connection of a non-operator.
                break;
            }
        }
    }

    /// Writes an audit record as the current operator (the thread's peer).
    fn audit(&self, token: Option<&str>, op: &str, key: Option<&str>, rv: CK_RV, reason: &str) {
        let Ok(lib) = crate::runtime::library() else {
            return;
        };
        let slot = token
            .and_then(|t| lib.token_labels.iter().position(|l| l == t))
            .unwrap_or(0);
        let r = crate::audit::RecordRef {
            op,
            key,
            result: rv,
            reason: Some(reason),
            slot: Some(slot as u64),
            token: lib.token_labels.get(slot).map(String::as_str),
            ..crate::audit::RecordRef::default()
        };
        if let Err(n) = lib.audit.record_ref(&r) {
            log::error!("audit: `{op}` record not written ({n})");
        }
    }

    fn refuse(
        &self,
        peer: &Peer,
        req: &AdminRequest,
        why: Refusal,
        message: String,
        rv: CK_RV,
    ) -> AdminReply {
        log::warn!(
            "admin socket: pid {} uid {} exe {}: {} refused: {message}",
            peer.pid,
            peer.uid,
            peer.exe.display(),
            req.action.describe()
        );
        if req.action.needs() == Need::Admin || why == Refusal::NotOperator {
            // A request step names the request's key (from an authentic file only).
            let of_request = match &req.action {
                Action::RequestApprove { id }
                | Action::RequestReject { id }
                | Action::RequestCancel { id } => self
                    .store
                    .as_ref()
                    .and_then(|st| st.load(id).ok())
                    .and_then(|r| r.action.key().map(str::to_string)),
                _ => None,
            };
            self.audit(
                req.token.as_deref(),
                &format!("admin-{}", req.action.name()),
                req.action.key().or(of_request.as_deref()),
                rv,
                &message,
            );
        }
        AdminReply::Refused { why, message }
    }

    fn handle(&self, peer: &Peer, op: Option<&Caller>, req: AdminRequest) -> AdminReply {
        if req.version != ap::ADMIN_VERSION {
            return AdminReply::Refused {
                why: Refusal::Protocol,
                message: format!(
                    "admin protocol version {} asked, this daemon speaks {}",
                    req.version,
                    ap::ADMIN_VERSION
                ),
            };
        }
        let Some(op) = op else {
            let msg = format!(
                "uid {} is not an operator of this daemon (no [[operators]] entry names this \
                 uid or one of its groups)",
                peer.uid
            );
            return self.refuse(
                peer,
                &req,
                Refusal::NotOperator,
                msg,
                CKR_USER_NOT_LOGGED_IN,
            );
        };
        if req.action.needs() == Need::Admin && op.role != OperatorRole::Admin {
            let msg = format!(
                "operator `{}` has the role {}, which may only read (key list/show, audit \
                 verify/tail/report); {} needs the role admin",
                op.name,
                op.role.name(),
                req.action.name()
            );
            return self.refuse(peer, &req, Refusal::Role, msg, CKR_USER_NOT_LOGGED_IN);
        }
        if req.action.needs() == Need::Admin {
            if let Err(msg) = self.check_totp(&op.name, req.totp.as_deref()) {
                return self.refuse(peer, &req, Refusal::Totp, msg, CKR_PIN_INCORRECT);
            }
        }
        let r = match &req.action {
            Action::RequestList => self.request_list(op),
            Action::RequestShow { id } => self.request_show(op, id),
            Action::RequestApprove { id } => self.request_approve(op, id),
            Action::RequestReject { id } => self.request_reject(op, id),
            Action::RequestCancel { id } => self.request_cancel(op, id),
            a if a.controlled() && self.is_dual(a) => {
                self.request_new(op, req.token.clone(), a.clone())
            }
            a => self.execute(op, req.token.as_deref(), a),
        };
        match r {
            Ok(o) => AdminReply::Done(o),
            Err((why, message)) => {
                let rv = match why {
                    Refusal::Failed => CKR_FUNCTION_FAILED,
                    _ => CKR_ACTION_PROHIBITED,
                };
                self.refuse(peer, &req, why, message, rv)
            }
        }
    }

    fn is_dual(&self, a: &Action) -> bool {
        self.dual
            .as_ref()
            .is_some_and(|d| d.actions.iter().any(|n| n == a.name()))
    }

    fn check_totp(&self, name: &str, code: Option<&str>) -> Result<(), String> {
        let Some((o, _)) = self.operators.iter().find(|(o, _)| o.name == name) else {
            return Ok(());
        };
        let Some(file) = &o.totp_secret_file else {
            return Ok(());
        };
        let Some(code) = code.filter(|c| !c.is_empty()) else {
            return Err(format!(
                "operator `{name}` needs a TOTP code for this action (pass --totp CODE or set \
                 CMKP11_TOTP)"
            ));
        };
        let totp = totp_secret(file).map_err(|e| format!("operator `{name}`: {e}"))?;
        let t = now();
        // The current step and one on each side (RFC 6238 §5.2: clock drift).
        let step = t / 30;
        let ok = (step.saturating_sub(1)..=step + 1).find(|s| totp.generate(s * 30) == code.trim());
        let Some(s) = ok else {
            return Err(format!("operator `{name}`: the TOTP code is wrong"));
        };
        let mut used = self.totp_used.lock();
        if used.get(name).is_some_and(|last| *last >= s) {
            return Err(format!(
                "operator `{name}`: this TOTP code was used already; wait for the next one"
            ));
        }
        used.insert(name.to_string(), s);
        Ok(())
    }

    /// Runs an action now, as `op`, on `token`.
    pub fn execute(
        &self,
        op: &Caller,
        token: Option<&str>,
        action: &Action,
    ) -> Result<Outcome, Refused> {
        let lib = crate::runtime::library().map_err(failed("the runtime"))?;
        match action {
            Action::WhoAmI => {
                let v = serde_json::json!({
                    "operator": op.name, "role": op.role.name(), "uid": op.peer.uid,
                    "pid": op.peer.pid,
                });
                return Ok(Outcome {
                    text: format!(
                        "operator `{}` (role {}), uid {}\n",
                        op.name,
                        op.role.name(),
                        op.peer.uid
                    ),
                    json: v.to_string(),
                    ..Outcome::default()
                });
            }
            Action::AuditVerify { json } => return audit_verify(lib, *json),
            Action::AuditTail { lines, key, json } => {
                return audit_tail(lib, *lines, key.clone(), *json)
            }
            Action::AuditReport { since, until, json } => {
                return audit_report(lib, since.as_deref(), until.as_deref(), *json)
            }
            _ => {}
        }
        let (slot, label) = pick_token(lib, token)?;
        let h = lib
            .open_session(slot, true)
            .map_err(failed("open a session"))?;
        let r = (|| {
            let s = lib.session(h).map_err(failed("session"))?;
            let mut s = s.lock();
            key_action(lib, &mut s, &label, action)
        })();
        let _ = lib.close_session(h);
        r
    }

    // ---- dual control -----------------------------------------------------------------

    fn store(&self) -> Result<&Store, Refused> {
        self.store.as_ref().ok_or_else(|| {
            (
                Refusal::Invalid,
                "this daemon has no [dual_control]: there are no requests".to_string(),
            )
        })
    }

    fn request_new(
        &self,
        op: &Caller,
        token: Option<String>,
        action: Action,
    ) -> Result<Outcome, Refused> {
        let store = self.store()?;
        let d = self.dual.as_ref().expect("store implies dual control");
        // What can be checked now is: the token, and the key for an action on one.
        let lib = crate::runtime::library().map_err(failed("the runtime"))?;
        let (_, label) = pick_token(lib, token.as_deref())?;
        precheck(lib, &label, &action)?;
        let t = now();
        let r = requests::Request {
            id: Store::new_id(),
            token,
            action,
            requester: op.who(),
            created: t,
            expires: t + d.expiry,
            // The requester is the first of the `approvals` operators.
            needed: d.approvals.saturating_sub(1).max(1),
            approvals: Vec::new(),
            status: Status::Pending,
            updated: t,
            output: None,
        };
        store.locked(|| store.save(&r)).map_err(|e| {
            (
                Refusal::Failed,
                format!("the request could not be stored: {e}"),
            )
        })?;
        let text = format!(
            "request {} made: {} needs {} approval(s) by other operators before {} \
             (`cmkp11 request approve {}`)",
            r.id,
            r.action.describe(),
            r.needed,
            crate::runtime::admin::time_text(r.expires).unwrap_or_default(),
            r.id
        );
        log::info!("operator `{}`: {text}", op.name);
        self.audit(
            r.token.as_deref(),
            "request",
            r.action.key(),
            CKR_OK,
            &format!(
                "request {} by operator {} (uid {}): {}; needs {} approval(s); expires {}",
                r.id,
                op.name,
                op.peer.uid,
                r.action.describe(),
                r.needed,
                crate::runtime::admin::time_text(r.expires).unwrap_or_default()
            ),
        );
        Ok(Outcome {
            text: format!("{text}\n"),
            json: json(&request_json(&r)),
            status: 0,
            request: Some(r.id),
        })
    }

    /// Loads a request, recording a tampered file.
    fn load(&self, id: &str) -> Result<requests::Request, Refused> {
        let store = self.store()?;
        match store.load(id) {
            Ok(r) => Ok(r),
            Err(LoadError::NotFound) => invalid(format!(
                "no request `{id}` (`cmkp11 request list` shows them)"
            )),
            Err(LoadError::Failed(e)) => Err((Refusal::Failed, e)),
            Err(LoadError::Tampered(e)) => {
                log::warn!("dual control: request {id} refused: {e}");
                self.audit(
                    None,
                    "request-tampered",
                    None,
                    CKR_SIGNATURE_INVALID,
                    &format!("request {id} refused: {e}"),
                );
                invalid(format!("request {id} is refused: {e}"))
            }
        }
    }

    /// Marks a pending request past its expiry as expired (saved and audited): true if it
    /// was.
    fn expire(&self, r: &mut requests::Request) -> bool {
        if r.status != Status::Pending || now() <= r.expires {
            return false;
        }
        r.status = Status::Expired;
        r.updated = now();
        if let Some(store) = &self.store {
            if let Err(e) = store.save(r) {
                log::error!("dual control: request {}: {e}", r.id);
            }
        }
        log::info!("dual control: request {} expired unapproved", r.id);
        self.audit(
            r.token.as_deref(),
            "request-expire",
            r.action.key(),
            CKR_OK,
            &format!(
                "request {} ({}) by operator {} expired with {} of {} approval(s); it never runs",
                r.id,
                r.action.describe(),
                r.requester.name,
                r.approvals.len(),
                r.needed
            ),
        );
        true
    }

    fn sweep(&self) {
        let Some(store) = &self.store else {
            return;
        };
        store.locked(|| {
            for id in store.ids() {
                if let Ok(mut r) = store.load(&id) {
                    self.expire(&mut r);
                }
            }
        });
    }

    fn request_list(&self, _op: &Caller) -> Result<Outcome, Refused> {
        let store = self.store()?;
        let mut all = Vec::new();
        let mut bad = Vec::new();
        store.locked(|| {
            for id in store.ids() {
                match store.load(&id) {
                    Ok(mut r) => {
                        self.expire(&mut r);
                        all.push(r);
                    }
                    Err(LoadError::Tampered(e)) => {
                        log::warn!("dual control: request {id} refused: {e}");
                        bad.push(id);
                    }
                    Err(_) => bad.push(id),
                }
            }
        });
        all.sort_by_key(|r| (r.status != Status::Pending, std::cmp::Reverse(r.created)));
        let rows: Vec<Vec<String>> = all
            .iter()
            .map(|r| {
                vec![
                    r.id.clone(),
                    r.status.name().into(),
                    r.action.describe(),
                    r.requester.name.clone(),
                    format!("{}/{}", r.approvals.len(), r.needed),
                    crate::runtime::admin::time_text(r.expires).unwrap_or_default(),
                ]
            })
            .collect();
        let mut text = if rows.is_empty() {
            "no requests\n".to_string()
        } else {
            table(
                &[
                    "ID",
                    "STATUS",
                    "ACTION",
                    "REQUESTER",
                    "APPROVALS",
                    "EXPIRES",
                ],
                &rows,
            )
        };
        for id in &bad {
            text.push_str(&format!(
                "{id}: refused: its file does not authenticate (see the daemon's log)\n"
            ));
        }
        let v: Vec<_> = all.iter().map(request_json).collect();
        Ok(Outcome {
            text,
            json: json(&serde_json::json!({"requests": v, "refused": bad})),
            ..Outcome::default()
        })
    }

    fn request_show(&self, _op: &Caller, id: &str) -> Result<Outcome, Refused> {
        let store = self.store()?;
        let r = store.locked(|| {
            let mut r = self.load(id)?;
            self.expire(&mut r);
            Ok::<_, Refused>(r)
        })?;
        Ok(Outcome {
            text: request_text(&r),
            json: json(&request_json(&r)),
            ..Outcome::default()
        })
    }

    fn request_approve(&self, op: &Caller, id: &str) -> Result<Outcome, Refused> {
        let store = self.store()?;
        store.locked(|| {
            let mut r = self.load(id)?;
            if self.expire(&mut r) {
                return invalid(format!(
                    "request {id} expired at {}: it can no longer be approved and never runs",
                    crate::runtime::admin::time_text(r.expires).unwrap_or_default()
                ));
            }
            if r.status != Status::Pending {
                return invalid(format!(
                    "request {id} is {}, not pending: nothing to approve",
                    r.status.name()
                ));
            }
            if r.requester.uid == op.peer.uid {
                return invalid(format!(
                    "request {id} was made by you (operator `{}`, uid {}): a requester never \
                     approves his own request; another operator must",
                    r.requester.name, r.requester.uid
                ));
            }
            if r.approvals.iter().any(|(w, _)| w.uid == op.peer.uid) {
                return invalid(format!(
                    "you (uid {}) approved request {id} already; another operator must",
                    op.peer.uid
                ));
            }
            r.approvals.push((op.who(), now()));
            r.updated = now();
            let done = r.approvals.len() as u32 >= r.needed;
            store
                .save(&r)
                .map_err(|e| (Refusal::Failed, format!("request {id}: {e}")))?;
            self.audit(
                r.token.as_deref(),
                "request-approve",
                r.action.key(),
                CKR_OK,
                &format!(
                    "request {id} ({}) approved by operator {} (uid {}): {} of {}",
                    r.action.describe(),
                    op.name,
                    op.peer.uid,
                    r.approvals.len(),
                    r.needed
                ),
            );
            if !done {
                let text = format!(
                    "approved request {id} ({}): {} of {} approval(s); it runs at the last one\n",
                    r.action.describe(),
                    r.approvals.len(),
                    r.needed
                );
                return Ok(Outcome {
                    text,
                    json: json(&request_json(&r)),
                    request: Some(r.id.clone()),
                    ..Outcome::default()
                });
            }
            // The last approval: the action runs as recorded in the request.
            let result = self.execute(op, r.token.as_deref(), &r.action);
            let (ok, what) = match &result {
                Ok(o) => (true, o.text.trim_end().to_string()),
                Err((_, e)) => (false, e.clone()),
            };
            r.output = result.as_ref().ok().map(|o| o.json.clone());
            r.status = Status::Executed {
                ok,
                result: what.clone(),
            };
            r.updated = now();
            if let Err(e) = store.save(&r) {
                log::error!("dual control: request {id} ran but could not be saved: {e}");
            }
            let approvers: Vec<String> = r
                .approvals
                .iter()
                .map(|(w, _)| format!("{} (uid {})", w.name, w.uid))
                .collect();
            self.audit(
                r.token.as_deref(),
                "request-execute",
                r.action.key(),
                if ok { CKR_OK } else { CKR_FUNCTION_FAILED },
                &format!(
                    "request {id} ({}) by operator {} (uid {}), approved by {}: {}",
                    r.action.describe(),
                    r.requester.name,
                    r.requester.uid,
                    approvers.join(", "),
                    what
                ),
            );
            log::info!("dual control: request {id} executed: {what}");
            match result {
                Ok(o) => Ok(Outcome {
                    text: format!(
                        "approved request {id}: {} of {} approval(s); executed: {}",
                        r.approvals.len(),
                        r.needed,
                        o.text
                    ),
                    request: Some(r.id.clone()),
                    ..o
                }),
                Err((why, e)) => Err((why, format!("request {id} was approved and failed: {e}"))),
            }
        })
    }

    fn request_reject(&self, op: &Caller, id: &str) -> Result<Outcome, Refused> {
        let store = self.store()?;
        store.locked(|| {
            let mut r = self.load(id)?;
            if self.expire(&mut r) || r.status != Status::Pending {
                return invalid(format!(
                    "request {id} is {}, not pending: nothing to reject",
                    r.status.name()
                ));
            }
            if r.requester.uid == op.peer.uid {
                return invalid(format!(
                    "request {id} is yours: withdraw it with `cmkp11 request cancel {id}`"
                ));
            }
            r.status = Status::Rejected(op.who());
            r.updated = now();
            store
                .save(&r)
                .map_err(|e| (Refusal::Failed, format!("request {id}: {e}")))?;
            self.audit(
                r.token.as_deref(),
                "request-reject",
                r.action.key(),
                CKR_OK,
                &format!(
                    "request {id} ({}) by operator {} rejected by operator {} (uid {}); it never runs",
                    r.action.describe(),
                    r.requester.name,
                    op.name,
                    op.peer.uid
                ),
            );
            Ok(Outcome {
                text: format!("rejected request {id} ({}): it never runs\n", r.action.describe()),
                json: json(&request_json(&r)),
                request: Some(r.id.clone()),
                ..Outcome::default()
            })
        })
    }

    fn request_cancel(&self, op: &Caller, id: &str) -> Result<Outcome, Refused> {
        let store = self.store()?;
        store.locked(|| {
            let mut r = self.load(id)?;
            if self.expire(&mut r) || r.status != Status::Pending {
                return invalid(format!(
                    "request {id} is {}, not pending: nothing to cancel",
                    r.status.name()
                ));
            }
            if r.requester.uid != op.peer.uid {
                return invalid(format!(
                    "request {id} was made by operator `{}`: only the requester withdraws a \
                     request (others reject it: `cmkp11 request reject {id}`)",
                    r.requester.name
                ));
            }
            r.status = Status::Cancelled;
            r.updated = now();
            store
                .save(&r)
                .map_err(|e| (Refusal::Failed, format!("request {id}: {e}")))?;
            self.audit(
                r.token.as_deref(),
                "request-cancel",
                r.action.key(),
                CKR_OK,
                &format!(
                    "request {id} ({}) withdrawn by its requester, operator {} (uid {}); it never runs",
                    r.action.describe(),
                    op.name,
                    op.peer.uid
                ),
            );
            Ok(Outcome {
                text: format!("cancelled request {id} ({}): it never runs\n", r.action.describe()),
                json: json(&request_json(&r)),
                request: Some(r.id.clone()),
                ..Outcome::default()
            })
        })
    }
}

/// Reads an operator's TOTP secret file (base32, mode 0600 or stricter).
fn totp_secret(file: &std::path::Path) -> Result<totp_rs::TOTP, String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(file).map_err(|e| format!("{}: {e}", file.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(format!(
            "{} is readable or writable by group or others (chmod 600 it)",
            file.display()
        ));
    }
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?,
    );
    let encoded: String = text
        .chars()
        .filter(|c| !c.is_whitespace() && *c != '=')
        .collect::<String>()
        .to_ascii_uppercase();
    let bytes = totp_rs::Secret::Encoded(encoded)
        .to_bytes()
        .map_err(|_| format!("{} is not a base32 TOTP secret", file.display()))?;
    totp_rs::TOTP::new(totp_rs::Algorithm::SHA1, 6, 1, 30, bytes)
        .map_err(|e| format!("{}: {e}", file.display()))
}

fn request_json(r: &requests::Request) -> serde_json::Value {
    let time = |t| crate::runtime::admin::time_text(t);
    let (result, ok) = match &r.status {
        Status::Executed { ok, result } => (Some(result.clone()), Some(*ok)),
        _ => (None, None),
    };
    serde_json::json!({
        "id": r.id,
        "status": r.status.name(),
        "action": r.action.name(),
        "key": r.action.key(),
        "description": r.action.describe(),
        "token": r.token,
        "requester": {"name": r.requester.name, "uid": r.requester.uid},
        "created": time(r.created),
        "expires": time(r.expires),
        "needed": r.needed,
        "approvals": r.approvals.iter().map(|(w, t)| serde_json::json!({
            "name": w.name, "uid": w.uid, "time": time(*t)})).collect::<Vec<_>>(),
        "rejected_by": match &r.status { Status::Rejected(w) => Some(&w.name), _ => None },
        "ok": ok,
        "result": result,
        "output": r.output.as_deref().and_then(|o| serde_json::from_str::<serde_json::Value>(o).ok()),
    })
}

fn request_text(r: &requests::Request) -> String {
    let time = |t| crate::runtime::admin::time_text(t).unwrap_or_else(|| "-".into());
    let mut rows = vec![
        ("id", r.id.clone()),
        ("status", r.status.name().to_string()),
        ("action", r.action.describe()),
        (
            "requester",
            format!("{} (uid {})", r.requester.name, r.requester.uid),
        ),
        ("created", time(r.created)),
        ("expires", time(r.expires)),
        (
            "approvals",
            format!("{} of {}", r.approvals.len(), r.needed),
        ),
    ];
    for (w, t) in &r.approvals {
        rows.push((
            "approved by",
            format!("{} (uid {}) at {}", w.name, w.uid, time(*t)),
        ));
    }
    match &r.status {
        Status::Rejected(w) => rows.push(("rejected by", format!("{} (uid {})", w.name, w.uid))),
        Status::Executed { result, .. } => rows.push(("result", result.clone())),
        _ => {}
    }
    rows.iter()
        .map(|(f, v)| format!("{:<13}{v}\n", format!("{f}:")))
        .collect()
}

// ---- keys ----------------------------------------------------------------------------

fn pick_token(lib: &Library, token: Option<&str>) -> Result<(CK_SLOT_ID, String), Refused> {
    let labels = &lib.token_labels;
    match token {
        Some(t) => match labels.iter().position(|l| l == t) {
            Some(i) => Ok((i as CK_SLOT_ID, t.to_string())),
            None => invalid(format!(
                "no token labelled `{t}`; available: {}",
                labels.join(", ")
            )),
        },
        None if labels.len() == 1 => Ok((0, labels[0].clone())),
        None if labels.is_empty() => invalid("the daemon has no token"),
        None => invalid(format!(
            "several tokens ({}): choose one with --token LABEL",
            labels.join(", ")
        )),
    }
}

fn find(lib: &Library, s: &Session, token: &str, name: &str) -> Result<Cmk, Refused> {
    let view = lib.keys(s);
    match view.by_name(name) {
        Some(c) if c.state(now()) == State::Destroyed => invalid(format!(
            "key `{name}` on token `{token}` is destroyed (its deletion date passed); \
             `cmkp11 key purge` removes what is left of it"
        )),
        Some(c) => Ok(c.clone()),
        None => invalid(format!(
            "no key named `{name}` on token `{token}`; `cmkp11 key list` shows the keys"
        )),
    }
}

/// Checks, when a request is made, what can be checked before its approval: that the key
/// it names exists (or, for a new key, does not).
fn precheck(lib: &Library, token: &str, action: &Action) -> Result<(), Refused> {
    let Ok((slot, _)) = pick_token(lib, Some(token)) else {
        return Ok(());
    };
    let h = lib
        .open_session(slot, false)
        .map_err(failed("open a session"))?;
    let r = (|| {
        let s = lib.session(h).map_err(failed("session"))?;
        let s = s.lock();
        match action {
            Action::KeyCreate { name, .. }
            | Action::KeyImport { name, .. }
            | Action::ImportKeyCreate { label: name } => {
                if lib.keys(&s).by_name(name).is_some() {
                    return invalid(format!(
                        "a key named `{name}` exists already on token `{token}`"
                    ));
                }
                Ok(())
            }
            Action::KeyPurge => Ok(()),
            a => match a.key() {
                Some(name) => find(lib, &s, token, name).map(drop),
                None => Ok(()),
            },
        }
    })();
    let _ = lib.close_session(h);
    r
}

fn facts(lib: &Library, s: &mut Session, token: &str, cmk: &Cmk) -> Result<KeyFacts, Refused> {
    lib.key_facts(s, cmk).map_err(failed(&format!(
        "token `{token}`: read key `{}`",
        cmk.name()
    )))
}

fn key_outcome(text: String, k: &KeyFacts) -> Outcome {
    Outcome {
        text: format!("{text}\n"),
        json: json(k),
        ..Outcome::default()
    }
}

fn show_text(token: &str, k: &KeyFacts) -> String {
    let dash = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
    let versions: Vec<String> = k.versions.iter().map(u32::to_string).collect();
    let rows = [
        ("name", k.name.clone()),
        ("token", token.to_string()),
        ("id", k.id.clone()),
        ("state", k.state.clone()),
        ("class", k.class.clone()),
        ("type", k.key_type.clone()),
        ("role", k.role.clone()),
        ("origin", k.origin.clone()),
        ("versions", versions.join(", ")),
        ("primary", k.primary.to_string()),
        ("created", dash(&k.created)),
        ("rotated", dash(&k.rotated)),
        ("updated", dash(&k.updated)),
        ("deletion date", dash(&k.deletion_date)),
        ("exportable", if k.exportable { "yes" } else { "no" }.into()),
    ];
    rows.iter()
        .map(|(f, v)| format!("{:<14}{v}\n", format!("{f}:")))
        .collect()
}

/// A lifecycle step on `name`, then the key as it is afterwards.
fn step(
    lib: &Library,
    s: &mut Session,
    token: &str,
    name: &str,
    step: Step,
) -> Result<KeyFacts, Refused> {
    let cmk = find(lib, s, token, name)?;
    let st = cmk.state(now());
    let wrong = |what: &str| -> Result<KeyFacts, Refused> {
        invalid(format!(
            "key `{name}` on token `{token}` is {}: {what}",
            st.name()
        ))
    };
    match (step, st) {
        (Step::Rotate, State::Enabled) if cmk.class == CKO_SECRET_KEY => {}
        (Step::Rotate, State::Enabled) => {
            return invalid(format!(
                "key `{name}` on token `{token}` is a private key: private keys are not rotated"
            ))
        }
        (Step::Rotate, _) => return wrong("only an enabled key is rotated"),
        (Step::Disable, State::Enabled) => {}
        (Step::Disable, _) => return wrong("only an enabled key is disabled"),
        (Step::Enable, State::Disabled) => {}
        (Step::Enable, _) => return wrong("only a disabled key is enabled"),
        (Step::ScheduleDeletion(_), State::Enabled | State::Disabled) => {}
        (Step::ScheduleDeletion(_), _) => {
            return wrong("only an enabled or disabled key is scheduled for deletion")
        }
        (Step::CancelDeletion, State::PendingDeletion) => {}
        (Step::CancelDeletion, _) => return wrong("not pending deletion: nothing to cancel"),
    }
    lib.apply(s, &cmk, step).map_err(failed(&format!(
        "token `{token}`: {} key `{name}`",
        step.name()
    )))?;
    let after = find(lib, s, token, name).unwrap_or(cmk);
    facts(lib, s, token, &after)
}

fn key_action(
    lib: &Library,
    s: &mut Session,
    token: &str,
    action: &Action,
) -> Result<Outcome, Refused> {
    let t = token;
    match action {
        Action::KeyList => {
            let view = lib.keys(s);
            let mut keys = Vec::new();
            for cmk in view.cmks.values() {
                keys.push(facts(lib, s, t, cmk)?);
            }
            keys.sort_by(|a, b| a.name.cmp(&b.name));
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
            let text = if rows.is_empty() {
                format!("no keys on token `{t}`\n")
            } else {
                table(
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
                )
            };
            Ok(Outcome {
                text,
                json: json(&keys),
                ..Outcome::default()
            })
        }
        Action::KeyShow { name } => {
            let cmk = find(lib, s, t, name)?;
            let k = facts(lib, s, t, &cmk)?;
            Ok(Outcome {
                text: show_text(t, &k),
                json: json(&k),
                ..Outcome::default()
            })
        }
        Action::KeyCreate {
            name,
            role,
            bits,
            exportable,
        } => {
            use crate::policy::{SecretRole, Usage as U};
            use cryptoki::object::{Attribute as A, KeyType, ObjectClass};
            if name.is_empty() || name.starts_with(keystore::RESERVED_PREFIX) {
                return invalid(format!("`{name}` is not a key name cmkp11 gives"));
            }
            if !matches!(bits, 128 | 256) {
                return invalid("an AES key has 128 or 256 bits");
            }
            if lib.keys(s).by_name(name).is_some() {
                return invalid(format!(
                    "a key named `{name}` exists already on token `{t}`"
                ));
            }
            let role = match role {
                Some(ap::SecretRole::Wrap) => SecretRole::Wrap,
                Some(ap::SecretRole::Data) => SecretRole::Data,
                Some(ap::SecretRole::Mac) => SecretRole::Mac,
                None => SecretRole::parse(&lib.cfg.keys.default_role).unwrap_or(SecretRole::Wrap),
            };
            if *exportable {
                lib.generate_exportable_key(s, name, role, u64::from(bits / 8))
                    .map_err(failed(&format!(
                        "token `{t}`: create exportable key `{name}`"
                    )))?;
                let cmk = find(lib, s, t, name)?;
                let k = facts(lib, s, t, &cmk)?;
                return Ok(key_outcome(
                    format!(
                        "created key `{name}` on token `{t}` ({}, role {}), exportable to \
                         trusted destinations only",
                        k.key_type, k.role
                    ),
                    &k,
                ));
            }
            let u = role.usage();
            let tmpl = vec![
                A::Class(ObjectClass::SECRET_KEY),
                A::KeyType(KeyType::AES),
                A::Token(true),
                A::Private(true),
                A::Label(name.as_bytes().to_vec()),
                A::ValueLen(u64::from(bits / 8).into()),
                A::Encrypt(u.any(U::ENCRYPT)),
                A::Decrypt(u.any(U::DECRYPT)),
                A::Sign(u.any(U::SIGN)),
                A::Verify(u.any(U::VERIFY)),
                A::Wrap(u.any(U::WRAP)),
                A::Unwrap(u.any(U::UNWRAP)),
            ];
            lib.generate_key(s, crate::backend::mech::Mech::plain(CKM_AES_KEY_GEN), tmpl)
                .map_err(failed(&format!("token `{t}`: create key `{name}`")))?;
            let cmk = find(lib, s, t, name)?;
            let k = facts(lib, s, t, &cmk)?;
            Ok(key_outcome(
                format!(
                    "created key `{name}` on token `{t}` ({}, role {})",
                    k.key_type, k.role
                ),
                &k,
            ))
        }
        Action::KeyRotate { name } => {
            let k = step(lib, s, t, name, Step::Rotate)?;
            Ok(key_outcome(
                format!(
                    "rotated key `{name}` on token `{t}`: version {} is primary",
                    k.primary
                ),
                &k,
            ))
        }
        Action::KeyDisable { name } => {
            let k = step(lib, s, t, name, Step::Disable)?;
            Ok(key_outcome(
                format!("disabled key `{name}` on token `{t}`"),
                &k,
            ))
        }
        Action::KeyEnable { name } => {
            let k = step(lib, s, t, name, Step::Enable)?;
            Ok(key_outcome(
                format!("enabled key `{name}` on token `{t}`"),
                &k,
            ))
        }
        Action::KeyScheduleDeletion { name, days } => {
            if days.is_some_and(|d| !(1..=365).contains(&d)) {
                return invalid("--days must be within 1..=365");
            }
            let k = step(lib, s, t, name, Step::ScheduleDeletion(*days))?;
            Ok(key_outcome(
                format!(
                    "key `{name}` on token `{t}` is scheduled for deletion on {}",
                    k.deletion_date.as_deref().unwrap_or("-")
                ),
                &k,
            ))
        }
        Action::KeyCancelDeletion { name } => {
            let k = step(lib, s, t, name, Step::CancelDeletion)?;
            Ok(key_outcome(
                format!("cancelled the deletion of key `{name}` on token `{t}`: it is disabled"),
                &k,
            ))
        }
        Action::KeyPurge => {
            let names = lib
                .purge(s)
                .map_err(failed(&format!("token `{t}`: purge destroyed keys")))?;
            let text = if names.is_empty() {
                format!("token `{t}`: no key past its deletion date; nothing purged\n")
            } else {
                names
                    .iter()
                    .map(|n| format!("destroyed key `{n}` on token `{t}`\n"))
                    .collect()
            };
            Ok(Outcome {
                text,
                json: json(&serde_json::json!({ "purged": names })),
                ..Outcome::default()
            })
        }
        Action::ImportKeyCreate { label } => {
            if lib.keys(s).by_name(label).is_some() {
                return invalid(format!(
                    "a key named `{label}` exists already on token `{t}`"
                ));
            }
            lib.create_import_key(s, label)
                .map_err(failed(&format!("token `{t}`: create import key `{label}`")))?;
            let v = import_public(lib, s, t, label)?;
            Ok(Outcome {
                text: format!(
                    "created import key `{label}` (RSA-3072, unwrap only) on token `{t}`\n"
                ),
                json: v.to_string(),
                ..Outcome::default()
            })
        }
        Action::KeyExport { name, to } => {
            let cmk = find(lib, s, t, name)?;
            let role = facts(lib, s, t, &cmk)?.role;
            let done = lib.export_key(s, &cmk, to).map_err(|e| match e.rv() {
                CKR_KEY_UNEXTRACTABLE => (
                    Refusal::Invalid,
                    format!(
                        "token `{t}`: key `{name}` is not exportable: only a key created with \
                         `cmkp11 key create NAME --exportable` can leave the token"
                    ),
                ),
                CKR_WRAPPING_KEY_HANDLE_INVALID => (
                    Refusal::Invalid,
                    format!("token `{t}`: `{to}` is no trusted destination"),
                ),
                _ => failed(&format!("token `{t}`: export key `{name}`"))(e),
            })?;
            let hash = match done.hash {
                crate::runtime::admin::OaepHash::Sha256 => "sha256",
                crate::runtime::admin::OaepHash::Sha1 => "sha1",
            };
            let bits = done.key_bytes * 8;
            Ok(Outcome {
                text: format!(
                    "exported key `{name}` (version {}) for destination `{to}`; on the \
                     destination: cmkp11 key import {name} --import-key IMPORTKEY --wrapped FILE \
                     --oaep-hash {hash} --bits {bits} --role {role}\n",
                    done.version
                ),
                json: serde_json::json!({
                    "key": name, "version": done.version, "destination": to,
                    "blob": keystore::hex(&done.blob), "oaep_hash": hash, "bits": bits,
                    "role": role,
                })
                .to_string(),
                ..Outcome::default()
            })
        }
        Action::ImportKeyPublic { label } => {
            let v = import_public(lib, s, t, label)?;
            Ok(Outcome {
                text: format!("public key of import key `{label}` on token `{t}`\n"),
                json: v.to_string(),
                ..Outcome::default()
            })
        }
        Action::KeyImport {
            name,
            import_key,
            blob,
            role,
            hash,
            bits,
        } => {
            use crate::runtime::admin::{ImportSpec, OaepHash};
            let role = match role {
                Some(ap::SecretRole::Wrap) => crate::policy::SecretRole::Wrap,
                Some(ap::SecretRole::Data) => crate::policy::SecretRole::Data,
                Some(ap::SecretRole::Mac) => crate::policy::SecretRole::Mac,
                None => crate::policy::SecretRole::parse(&lib.cfg.keys.default_role)
                    .unwrap_or(crate::policy::SecretRole::Wrap),
            };
            let ik = find(lib, s, t, import_key)?;
            if ik.class != CKO_PRIVATE_KEY
                || !facts(lib, s, t, &ik)?
                    .role
                    .split('+')
                    .any(|r| r == "unwrap")
            {
                return invalid(format!(
                    "key `{import_key}` on token `{t}` is not an import key"
                ));
            }
            if ik.state(now()) != State::Enabled {
                return invalid(format!(
                    "import key `{import_key}` on token `{t}` is {}: it cannot unwrap",
                    ik.state(now()).name()
                ));
            }
            let ik = lib
                .handle_of_cmk(s, &ik)
                .map_err(failed("the import key's handle"))?;
            let spec = ImportSpec {
                name,
                role,
                hash: match hash {
                    ap::OaepHash::Sha256 => OaepHash::Sha256,
                    ap::OaepHash::Sha1 => OaepHash::Sha1,
                },
                key_bytes: u64::from(*bits / 8),
            };
            lib.import_key_with(s, ik, blob, &spec)
                .map_err(failed(&format!("token `{t}`: import key `{name}`")))?;
            let cmk = find(lib, s, t, name)?;
            let k = facts(lib, s, t, &cmk)?;
            Ok(key_outcome(
                format!(
                    "imported key `{name}` on token `{t}` ({}, role {})",
                    k.key_type, k.role
                ),
                &k,
            ))
        }
        _ => invalid(format!("{} is not a key action", action.name())),
    }
}

/// The modulus and public exponent of the import key `label` (its public half).
fn import_public(
    lib: &Library,
    s: &mut Session,
    token: &str,
    label: &str,
) -> Result<serde_json::Value, Refused> {
    use crate::runtime::session::AttrValue;
    use cryptoki::object::{Attribute as A, ObjectClass};
    let e = failed("find the import key's public key");
    lib.find_init(
        s,
        vec![
            A::Class(ObjectClass::PUBLIC_KEY),
            A::Label(label.as_bytes().to_vec()),
        ],
    )
    .map_err(&e)?;
    let found = s.find_next(2).map(<[_]>::to_vec);
    let _ = s.find_final();
    let h = match found.map_err(&e)?.as_slice() {
        [h] => *h,
        [] => return invalid(format!("no import key named `{label}` on token `{token}`")),
        _ => {
            return invalid(format!(
                "several public keys are named `{label}` on token `{token}`"
            ))
        }
    };
    let v = lib
        .get_attributes(s, h, &[CKA_MODULUS, CKA_PUBLIC_EXPONENT])
        .map_err(&e)?;
    match (&v[0], &v[1]) {
        (AttrValue::Value(A::Modulus(n)), AttrValue::Value(A::PublicExponent(x))) => {
            Ok(serde_json::json!({
                "label": label,
                "modulus": keystore::hex(n),
                "exponent": keystore::hex(x),
            }))
        }
        _ => invalid(format!(
            "`{label}` on token `{token}` is not an RSA public key"
        )),
    }
}

// ---- audit ---------------------------------------------------------------------------

fn log_file(lib: &Library) -> Result<std::path::PathBuf, Refused> {
    lib.cfg.audit.file.clone().ok_or_else(|| {
        (
            Refusal::Invalid,
            "the daemon has no [audit] file".to_string(),
        )
    })
}

fn audit_verify(lib: &Library, as_json: bool) -> Result<Outcome, Refused> {
    let path = log_file(lib)?;
    let mac = lib.backend.slots.first().map(|slot| {
        crate::runtime::audit_mac::TokenAuditMac::read_only(lib.backend.ctx.clone(), *slot)
            .for_log(&path)
    });
    let report = crate::audit::verify(
        &path,
        mac.as_ref().map(|m| m as &dyn crate::audit::TokenMac),
    );
    if matches!(
        report.problem.as_ref().map(|p| p.kind),
        Some(crate::audit::Tamper::Unreadable)
    ) {
        return Err((
            Refusal::Failed,
            report.problem.map(|p| p.detail).unwrap_or_default(),
        ));
    }
    let unchecked = !report.macs_checked || !report.checkpoint_checked;
    let status = match (report.ok(), unchecked) {
        (false, _) => 1,
        (true, true) => 3,
        (true, false) => 0,
    };
    let p = report.problem.as_ref().map(|p| {
        serde_json::json!({"kind": p.kind.to_string(), "line": p.line, "seq": p.seq,
            "detail": p.detail})
    });
    let v = serde_json::json!({
        "file": path, "ok": report.ok(), "lines": report.lines,
        "records": report.records, "last_seq": report.last_seq,
        "macs": report.macs, "macs_checked": report.macs_checked,
        "authenticated_through": report.authenticated_through,
        "token_checkpoint": report.token_checkpoint, "notes": report.notes,
        "checkpoint_checked": report.checkpoint_checked, "problem": p,
    });
    let mut text = format!("{}: {report}", path.display());
    if report.ok() && unchecked {
        text.push_str(
            "  warning: the token could not check the MACs and the checkpoint (exit status 3)\n",
        );
    }
    let _ = as_json;
    Ok(Outcome {
        text,
        json: v.to_string(),
        status,
        request: None,
    })
}

fn audit_tail(
    lib: &Library,
    lines: usize,
    key: Option<String>,
    as_json: bool,
) -> Result<Outcome, Refused> {
    let path = log_file(lib)?;
    let o = crate::audit::cli::TailOptions {
        lines,
        key,
        json: as_json,
        follow: false,
    };
    let mut out = Vec::new();
    crate::audit::cli::tail(&path, &o, &mut out, &mut || false)
        .map_err(|e| (Refusal::Failed, e))?;
    let text = String::from_utf8_lossy(&out).into_owned();
    Ok(Outcome {
        json: text.clone(),
        text,
        ..Outcome::default()
    })
}

fn audit_report(
    lib: &Library,
    since: Option<&str>,
    until: Option<&str>,
    _as_json: bool,
) -> Result<Outcome, Refused> {
    use crate::audit::cli;
    let path = log_file(lib)?;
    let t = std::time::SystemTime::now();
    let since = since
        .map(|s| cli::time_bound(s, t))
        .transpose()
        .map_err(|e| (Refusal::Invalid, e))?;
    let until = until
        .map(|s| cli::time_bound(s, t))
        .transpose()
        .map_err(|e| (Refusal::Invalid, e))?;
    let rows =
        cli::report(&path, since.as_deref(), until.as_deref()).map_err(|e| (Refusal::Failed, e))?;
    let v: Vec<_> = rows
        .iter()
        .map(|r| serde_json::json!({"key": r.key, "op": r.op, "ok": r.ok, "failed": r.failed}))
        .collect();
    Ok(Outcome {
        text: format!(
            "{}: {} to {}\n{}",
            path.display(),
            since.as_deref().unwrap_or("start"),
            until.as_deref().unwrap_or("now"),
            cli::render_report(&rows)
        ),
        json: serde_json::json!({"file": path, "since": since, "until": until, "rows": v})
            .to_string(),
        ..Outcome::default()
    })
}
