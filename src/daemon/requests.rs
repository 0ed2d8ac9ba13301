//! Dual control (M of N): an action that `[dual_control] actions` names becomes a
//! [`Request`], which runs once `approvals` different operators (by uid) took part: the
//! requester and `approvals - 1` others who approved it (the requester never approves his
//! own), before it expires.
//!
//! # Storage
//! One file per request in `<service.state_dir>/requests/<id>.req`: the request in
//! `postcard`, then an HMAC-SHA256 tag made in the token by a non-extractable key that
//! belongs to this directory (a `cmkp11:audit-mac` secret key whose `CKA_ID` is derived
//! from the directory's path, see [`crate::runtime::audit_mac::log_id`]). The tag covers
//! a domain string, the file's id and the content, so a file edited, forged, or copied
//! under another id does not authenticate: it is refused (logged at warn and audited as
//! `request-tampered`) and never runs. Files are written whole to a temporary file and
//! renamed, so a crash leaves the old or the new request.
//!
//! Every read goes to the file (no cached copy a file change could bypass), under one
//! lock that makes each read-modify-write of a request atomic among the daemon's threads.
//! Expiry uses the daemon's clock only.

use crate::audit::TokenMac;
use crate::service::admin_proto::Action;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Domain separation of the tag.
const DOMAIN: &[u8] = b"cmkp11d dual-control request v1\0";
/// Length of the tag (HMAC-SHA256).
const TAG: usize = 32;
/// Largest request file read.
const MAX_FILE: u64 = 8 * 1024 * 1024;

/// An operator in a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Who {
    /// The `[[operators]]` name.
    pub name: String,
    /// The kernel-attested uid.
    pub uid: u32,
}

/// Where a request stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    /// Waiting for approvals.
    Pending,
    /// Approved and run; the result in words, and whether it succeeded.
    Executed {
        /// Whether the action succeeded.
        ok: bool,
        /// What it did or why it failed.
        result: String,
    },
    /// Rejected by an operator.
    Rejected(Who),
    /// Withdrawn by its requester.
    Cancelled,
    /// Not approved in time.
    Expired,
}

impl Status {
    /// The status's name.
    pub fn name(&self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Executed { ok: true, .. } => "executed",
            Status::Executed { ok: false, .. } => "failed",
            Status::Rejected(_) => "rejected",
            Status::Cancelled => "cancelled",
            Status::Expired => "expired",
        }
    }
}

/// A dual-control request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    /// Its id (`r-` and 16 hex digits).
    pub id: String,
    /// The token (label) it acts on (`None`: the only one).
    pub token: Option<String>,
    /// What runs once approved.
    pub action: Action,
    /// Who asked.
    pub requester: Who,
    /// Unix seconds (daemon clock).
    pub created: u64,
    /// Unix seconds after which it can no longer be approved.
    pub expires: u64,
    /// Approvals needed from operators other than the requester.
    pub needed: u32,
    /// Approvals so far, with their time.
    pub approvals: Vec<(Who, u64)>,
    /// Where it stands.
    pub status: Status,
    /// Unix seconds of the last change.
    pub updated: u64,
    /// The executed action's JSON outcome (an export's wrapped key), for `request show`.
    pub output: Option<String>,
}

/// Why a stored request cannot be used.
#[derive(Debug)]
pub enum LoadError {
    /// No request with this id.
    NotFound,
    /// The file does not authenticate (edited, forged, renamed) or does not decode.
    Tampered(String),
    /// The token could not make the tag, or the file could not be read.
    Failed(String),
}

/// The request directory and its token key.
pub struct Store {
    dir: PathBuf,
    mac: Arc<dyn TokenMac>,
    lock: Mutex<()>,
}

/// Whether `id` has the form of a request id (no path can be smuggled in).
pub fn valid_id(id: &str) -> bool {
    id.len() == 18
        && id.starts_with("r-")
        && id[2..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Store {
    /// The store in `dir` (created 0700 if missing), its files tagged by `mac`.
    pub fn open(dir: &Path, mac: Arc<dyn TokenMac>) -> Result<Store, String> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("request directory {}: {e}", dir.display()))?;
        let meta = std::fs::metadata(dir)
            .map_err(|e| format!("request directory {}: {e}", dir.display()))?;
        if meta.permissions().mode() & 0o022 != 0 {
            return Err(format!(
                "request directory {} is writable by group or others (chmod 700 it)",
                dir.display()
            ));
        }
        Ok(Store {
            dir: dir.to_path_buf(),
            mac,
            lock: Mutex::new(()),
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.req"))
    }

    fn tag(&self, id: &str, body: &[u8]) -> Result<Vec<u8>, String> {
        let mut m = Vec::with_capacity(DOMAIN.len() + id.len() + 1 + body.len());
        m.extend_from_slice(DOMAIN);
        m.extend_from_slice(id.as_bytes());
        m.push(0);
        m.extend_from_slice(body);
        let t = self.mac.mac(&m).map_err(|rv| {
            format!(
                "the token could not authenticate the request ({})",
                crate::backend::rv::name(rv)
            )
        })?;
        if t.len() != TAG {
            return Err("the token's MAC has an unexpected length".into());
        }
        Ok(t)
    }

    /// Makes (or finds) the token key and tags once: the store can authenticate.
    pub fn check(&self) -> Result<(), String> {
        self.tag("r-0000000000000000", b"").map(drop)
    }

    /// A new id.
    pub fn new_id() -> String {
        let mut b = [0u8; 8];
        getrandom::fill(&mut b).expect("the kernel's random source");
        format!("r-{}", crate::keystore::hex(&b))
    }

    /// Writes `r` (whole, then renamed into place).
    pub fn save(&self, r: &Request) -> Result<(), String> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let body = postcard::to_stdvec(r).map_err(|e| format!("encode request: {e}"))?;
        let tag = self.tag(&r.id, &body)?;
        let tmp = self.dir.join(format!(".{}.tmp", r.id));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| format!("{}: {e}", tmp.display()))?;
        f.write_all(&body)
            .and_then(|_| f.write_all(&tag))
            .and_then(|_| f.sync_all())
            .map_err(|e| format!("{}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, self.path(&r.id))
            .map_err(|e| format!("{}: {e}", self.path(&r.id).display()))?;
        if let Ok(d) = std::fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Reads and authenticates request `id`.
    pub fn load(&self, id: &str) -> Result<Request, LoadError> {
        use std::io::Read;
        if !valid_id(id) {
            return Err(LoadError::NotFound);
        }
        let path = self.path(id);
        let f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(LoadError::NotFound),
            Err(e) => return Err(LoadError::Failed(format!("{}: {e}", path.display()))),
        };
        let mut data = Vec::new();
        f.take(MAX_FILE)
            .read_to_end(&mut data)
            .map_err(|e| LoadError::Failed(format!("{}: {e}", path.display())))?;
        if data.len() < TAG {
            return Err(LoadError::Tampered(format!(
                "{} is too short to be a request",
                path.display()
            )));
        }
        let (body, tag) = data.split_at(data.len() - TAG);
        let want = self.tag(id, body).map_err(LoadError::Failed)?;
        if !same(&want, tag) {
            return Err(LoadError::Tampered(format!(
                "{} does not authenticate under the token's request key (edited, forged or \
                 renamed)",
                path.display()
            )));
        }
        let r: Request = postcard::from_bytes(body)
            .map_err(|e| LoadError::Tampered(format!("{} does not decode: {e}", path.display())))?;
        if r.id != id {
            return Err(LoadError::Tampered(format!(
                "{} holds request {}",
                path.display(),
                r.id
            )));
        }
        Ok(r)
    }

    /// The ids of every stored request, sorted.
    pub fn ids(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.dir)
            .map(|it| {
                it.filter_map(|e| e.ok())
                    .filter_map(|e| {
                        let name = e.file_name().to_string_lossy().into_owned();
                        let id = name.strip_suffix(".req")?.to_string();
                        valid_id(&id).then_some(id)
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Runs `f` while no other thread of the daemon reads or changes a request.
    pub fn locked<R>(&self, f: impl FnOnce() -> R) -> R {
        let _g = self.lock.lock();
        f()
    }
}
