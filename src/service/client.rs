//! The client mode of `libcmkp11.so`: the connection to `cmkp11d`, shared by every thread
//! of the application, and what the client keeps between calls (nothing secret: no key,
//! no token PIN, no policy).
//!
//! - **Threads.** Connections are pooled: a call takes an idle one (or opens one more,
//!   attached to the same daemon context, up to [`MAX_CONNECTIONS`]), so application
//!   threads run in parallel in the daemon.
//! - **fork().** A `pthread_atfork` child handler marks the inherited client stale: the
//!   child gets `CKR_CRYPTOKI_NOT_INITIALIZED` until its own `C_Initialize`, which opens
//!   its own context and never writes to the parent's connections.
//! - **Daemon restart.** A call whose connection breaks returns `CKR_DEVICE_REMOVED`;
//!   the next call connects again (a new context: sessions and login are gone, so old
//!   session handles get `CKR_SESSION_HANDLE_INVALID` and the application logs in again).
//! - **Two-call convention.** The daemon returns an operation's whole output in one
//!   round trip; a length query keeps it here ([`Client::keep`]) for the collecting call.

use super::proto::{self, DataCall, Hello, Reply, Request, Welcome};
use cryptoki_sys::*;
use parking_lot::{Condvar, Mutex};
use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Most connections (calls in flight) one application process opens.
pub const MAX_CONNECTIONS: usize = 8;

/// The daemon's socket when the module runs in client mode: `CMKP11_SERVICE=unix:PATH`,
/// else `[service] socket` of the configuration file (`CMKP11_CONFIG`, else
/// `/etc/cmkp11/cmkp11.toml`). Decided once per process, at the first getter call.
pub fn socket() -> Option<&'static Path> {
    static MODE: OnceLock<Option<PathBuf>> = OnceLock::new();
    MODE.get_or_init(|| {
        if let Some(v) = std::env::var_os("CMKP11_SERVICE").filter(|v| !v.is_empty()) {
            let v = v.to_string_lossy().into_owned();
            return match v.strip_prefix("unix:") {
                Some(p) => Some(PathBuf::from(p)),
                None => {
                    crate::logging::init_default();
                    log::error!("CMKP11_SERVICE=`{v}`: expected unix:PATH; library mode");
                    None
                }
            };
        }
        let file = match std::env::var_os("CMKP11_CONFIG").filter(|v| !v.is_empty()) {
            Some(p) => PathBuf::from(p),
            None => PathBuf::from(crate::config::SYSTEM_CONFIG),
        };
        let text = std::fs::read_to_string(file).ok()?;
        let v: toml::Value = toml::from_str(&text).ok()?;
        v.get("service")?.get("socket")?.as_str().map(PathBuf::from)
    })
    .as_deref()
}

/// Which call's output is kept for the collecting call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kept {
    /// A data call.
    Data(DataCall),
    /// `C_WrapKey` of (wrapping key, key).
    Wrap(CK_OBJECT_HANDLE, CK_OBJECT_HANDLE),
}

struct Pending {
    what: Kept,
    input: Vec<u8>,
    out: Vec<u8>,
}

struct Ctx {
    context: u64,
    secret: [u8; 32],
    /// Counts reconnections: a connection of an older generation is not pooled again.
    generation: u64,
    /// The last connection broke: the next call connects again.
    broken: bool,
}

struct Conn {
    stream: UnixStream,
    generation: u64,
    buf: Vec<u8>,
}

/// An initialized client.
pub struct Client {
    path: PathBuf,
    ctx: Mutex<Ctx>,
    pool: Mutex<Vec<Conn>>,
    returned: Condvar,
    open: AtomicUsize,
    pending: Mutex<HashMap<CK_SESSION_HANDLE, Pending>>,
}

static CURRENT: crate::sys::Published<Client> = crate::sys::Published::new();
static FORKED: AtomicBool = AtomicBool::new(false);

/// The initialized client, or `CKR_CRYPTOKI_NOT_INITIALIZED`.
pub fn current() -> Result<&'static Client, CK_RV> {
    if FORKED.load(Ordering::Acquire) {
        return Err(CKR_CRYPTOKI_NOT_INITIALIZED);
    }
    CURRENT.get().ok_or(CKR_CRYPTOKI_NOT_INITIALIZED)
}

/// `C_Initialize` in client mode: connects to the daemon.
pub fn initialize() -> Result<(), CK_RV> {
    crate::logging::init_default();
    if FORKED.swap(false, Ordering::AcqRel) {
        // The parent's client stays (leaked): its connections are the parent's.
        CURRENT.set(None);
    }
    if CURRENT.get().is_some() {
        return Err(CKR_CRYPTOKI_ALREADY_INITIALIZED);
    }
    let Some(path) = socket() else {
        return Err(CKR_GENERAL_ERROR);
    };
    install_atfork();
    let (conn, ctx) = open(path)?;
    let client = Box::leak(Box::new(Client {
        path: path.to_path_buf(),
        ctx: Mutex::new(ctx),
        pool: Mutex::new(vec![conn]),
        returned: Condvar::new(),
        open: AtomicUsize::new(1),
        pending: Mutex::new(HashMap::new()),
    }));
    CURRENT.set(Some(client));
    Ok(())
}

/// `C_Finalize` in client mode: closes the connections (the daemon then closes this
/// process's sessions).
pub fn finalize() -> Result<(), CK_RV> {
    let c = current()?;
    CURRENT.set(None);
    c.pool.lock().clear();
    c.pending.lock().clear();
    Ok(())
}

/// Installs the client's `pthread_atfork` child handler once per process.
fn install_atfork() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if let Err(rc) = crate::sys::atfork_child(forked) {
            log::warn!("pthread_atfork failed ({rc}): fork detection is off");
        }
    });
}

/// The atfork child handler's work.
extern "C" fn forked() {
    FORKED.store(true, Ordering::Release);
}

fn connect(path: &Path) -> Result<UnixStream, CK_RV> {
    UnixStream::connect(path).map_err(|e| {
        log::warn!("cmkp11d at {}: {e}", path.display());
        CKR_DEVICE_REMOVED
    })
}

fn handshake(stream: &mut UnixStream, hello: &Hello) -> Result<Welcome, CK_RV> {
    let mut buf = Vec::new();
    proto::send(stream, hello).map_err(|_| CKR_DEVICE_REMOVED)?;
    proto::recv(stream, &mut buf).map_err(|e| {
        log::warn!("cmkp11d handshake: {e}");
        CKR_DEVICE_REMOVED
    })
}

/// A new context on a new connection.
fn open(path: &Path) -> Result<(Conn, Ctx), CK_RV> {
    let mut stream = connect(path)?;
    let hello = Hello::Open {
        min: proto::VERSION,
        max: proto::VERSION,
    };
    match handshake(&mut stream, &hello)? {
        Welcome::Ok {
            context, secret, ..
        } => Ok((
            Conn {
                stream,
                generation: 0,
                buf: Vec::new(),
            },
            Ctx {
                context,
                secret,
                generation: 0,
                broken: false,
            },
        )),
        Welcome::Refused(why) => {
            log::error!("cmkp11d at {} refused this process: {why}", path.display());
            Err(CKR_DEVICE_ERROR)
        }
    }
}

impl Client {
    /// Takes a connection: an idle one, a new one attached to the context, or (at the
    /// limit) the next one returned.
    fn take(&self) -> Result<Conn, CK_RV> {
        let (context, secret, generation) = {
            let mut ctx = self.ctx.lock();
            if ctx.broken {
                // Connect again: a new context (the daemon restarted or dropped us).
                let (mut conn, new) = open(&self.path)?;
                let generation = ctx.generation + 1;
                conn.generation = generation;
                *ctx = Ctx { generation, ..new };
                self.pool.lock().clear();
                self.pending.lock().clear();
                self.open.store(1, Ordering::Release);
                return Ok(conn);
            }
            (ctx.context, ctx.secret, ctx.generation)
        };
        let mut pool = self.pool.lock();
        loop {
            if let Some(c) = pool.pop() {
                return Ok(c);
            }
            if self.open.load(Ordering::Acquire) < MAX_CONNECTIONS {
                self.open.fetch_add(1, Ordering::AcqRel);
                drop(pool);
                return self.attach(context, secret, generation).inspect_err(|_| {
                    self.open.fetch_sub(1, Ordering::AcqRel);
                });
            }
            self.returned.wait(&mut pool);
        }
    }

    fn attach(&self, context: u64, secret: [u8; 32], generation: u64) -> Result<Conn, CK_RV> {
        let mut stream = connect(&self.path)?;
        let hello = Hello::Attach {
            version: proto::VERSION,
            context,
            secret,
        };
        match handshake(&mut stream, &hello)? {
            Welcome::Ok { .. } => Ok(Conn {
                stream,
                generation,
                buf: Vec::new(),
            }),
            Welcome::Refused(why) => {
                log::warn!("cmkp11d refused another connection: {why}");
                Err(CKR_DEVICE_ERROR)
            }
        }
    }

    fn give_back(&self, conn: Conn) {
        let ctx = self.ctx.lock();
        if conn.generation == ctx.generation && !ctx.broken {
            self.pool.lock().push(conn);
            self.returned.notify_one();
        }
    }

    /// One round trip.
    pub fn call(&self, req: &Request) -> Result<Reply, CK_RV> {
        let mut conn = self.take()?;
        let r = proto::send(&mut conn.stream, req)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                proto::spin_until_readable(&conn.stream);
                proto::recv::<Reply>(&mut conn.stream, &mut conn.buf).map_err(|e| e.to_string())
            });
        match r {
            Ok(reply) => {
                self.give_back(conn);
                Ok(reply)
            }
            Err(e) => {
                log::warn!("cmkp11d connection lost: {e}");
                let mut ctx = self.ctx.lock();
                if ctx.generation == conn.generation {
                    ctx.broken = true;
                    self.open.store(0, Ordering::Release);
                }
                self.returned.notify_all();
                Err(CKR_DEVICE_REMOVED)
            }
        }
    }

    /// The output kept for this call on `s` with this input, if any (taken). A kept
    /// output of another call on the session is dropped.
    pub fn kept(&self, s: CK_SESSION_HANDLE, what: Kept, input: &[u8]) -> Option<Vec<u8>> {
        let mut p = self.pending.lock();
        let hit = p
            .get(&s)
            .is_some_and(|k| k.what == what && k.input == input);
        let k = p.remove(&s)?;
        hit.then_some(k.out)
    }

    /// Keeps `out` for the application's collecting call.
    pub fn keep(&self, s: CK_SESSION_HANDLE, what: Kept, input: &[u8], out: Vec<u8>) {
        self.pending.lock().insert(
            s,
            Pending {
                what,
                input: input.to_vec(),
                out,
            },
        );
    }

    /// Forgets what was kept for `s` (a new operation, a closed session).
    pub fn forget(&self, s: CK_SESSION_HANDLE) {
        let mut p = self.pending.lock();
        if !p.is_empty() {
            p.remove(&s);
        }
    }
}
