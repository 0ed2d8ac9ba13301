//! `cmkp11d`'s server: accepts connections, learns each peer's identity from the kernel,
//! keeps each client's sessions, objects and login state, and runs its calls through the
//! in-process runtime ([`super::host`]).
//!
//! # Clients and contexts
//! A client is one application process: its first connection opens a *context* (its
//! sessions, the object handles it was given, its login state); more connections of the
//! same process (one per application thread in flight) attach to it with the context's
//! secret, and the kernel must report the same pid and uid for them. A context ends with
//! its last connection: its sessions are closed, which destroys its session objects.
//!
//! # What a client may name
//! Only the sessions it opened and the objects the daemon handed to it (created, found,
//! generated, unwrapped, derived). Any other handle gets the `*_HANDLE_INVALID` code of its
//! argument, so one client cannot reach another's session keys by guessing numbers.
//!
//! # Login
//! The daemon logs in to the token itself at start, with the PIN of its own
//! configuration. A client's `C_Login` PIN is an application credential (`[[clients]]`):
//! checked against an Argon2 hash, only for the uids listed; failures are counted per
//! uid, locked out for [`LOCKOUT`] after [`MAX_FAILS`] in a row, and audited. Until it logs
//! in, a client can use no key and sees only public objects (`CKA_PRIVATE=FALSE`), and
//! those only when its uid is one of a `[[clients]]` entry.
//!
//! # Limits
//! Per client: `service.max_sessions`, `service.max_objects` (objects it created) and
//! `service.max_connections` (each connection carries one call at a time, so this bounds
//! its calls in flight); per uid, [`MAX_CONTEXTS_PER_UID`] client processes; in all,
//! [`MAX_CONNECTIONS`]. Going over is refused with `CKR_SESSION_COUNT`, `CKR_DEVICE_MEMORY`
//! or a refused handshake, and logged.
//!
//! # Garbage
//! A frame over the size limit, a message that does not decode or a handshake that does
//! not come within [`HANDSHAKE_TIMEOUT`] drops that connection, with a log line naming the
//! peer. Each connection has its own thread; none holds a lock across a runtime call.

use crate::config::Config;
use crate::service::proto::{self, FrameError, Hello, Op, Reply, Request, Welcome};
use crate::sys::peer::{serve_as, Peer};
use cryptoki_sys::*;
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Failed application logins in a row (per uid) before a lockout.
pub const MAX_FAILS: u32 = 5;
/// How long a uid is locked out after [`MAX_FAILS`] failed logins.
pub const LOCKOUT: Duration = Duration::from_secs(30);
/// Time a new connection has to send its hello.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most connections the daemon serves at once.
pub const MAX_CONNECTIONS: usize = 4096;
/// Most client contexts (application processes) of one uid at once, so that one local
/// user cannot take every connection.
pub const MAX_CONTEXTS_PER_UID: usize = 32;

/// One client session's daemon-side facts.
struct Sess {
    slot: CK_SLOT_ID,
    /// A search begun while not logged in: it finds nothing.
    empty_find: bool,
    /// A search begun while not logged in by a client uid of `[[clients]]`: it finds only
    /// public objects (`CKA_PRIVATE=FALSE` added to its template).
    public_find: bool,
}

#[derive(Default)]
struct CtxState {
    sessions: HashMap<CK_SESSION_HANDLE, Sess>,
    objects: HashSet<CK_OBJECT_HANDLE>,
    created: usize,
    /// The `[[clients]]` name this context logged in as.
    login: Option<String>,
    /// Public objects found before login: their attributes may be read without login.
    public: HashSet<CK_OBJECT_HANDLE>,
}

/// A client context (one application process).
struct Context {
    id: u64,
    secret: [u8; 32],
    peer: Arc<Peer>,
    conns: AtomicUsize,
    state: Mutex<CtxState>,
}

#[derive(Default)]
struct Fails {
    count: u32,
    until: Option<Instant>,
}

/// The daemon's state.
pub struct Server {
    cfg: Config,
    svc: crate::config::Service,
    contexts: Mutex<HashMap<u64, Arc<Context>>>,
    next_context: AtomicU64,
    fails: Mutex<HashMap<u32, Fails>>,
    connections: AtomicUsize,
    /// Set when the configuration asks for metrics (`service.metrics_*`).
    metrics: Option<&'static crate::daemon::metrics::Metrics>,
}

/// The identity of a connection's peer, from the kernel.
///
/// The executable is read from `/proc/PID/exe` under a pidfd taken first; the pid is
/// trusted only if, after the read, that process is still alive and the connection is
/// still open (a pid reused by another process would mean the peer had exited, and with
/// it the connection, before the pidfd was taken).
pub fn peer_of(stream: &UnixStream) -> std::io::Result<Peer> {
    use rustix::event::{poll, PollFd, PollFlags};
    let cred = rustix::net::sockopt::socket_peercred(stream)?;
    let pid = cred.pid;
    let pidfd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())?;
    let exe = std::fs::read_link(format!("/proc/{}/exe", pid.as_raw_nonzero()))?;
    let mut fds = [
        PollFd::new(&pidfd, PollFlags::IN),
        PollFd::new(stream, PollFlags::RDHUP | PollFlags::HUP),
    ];
    poll(
        &mut fds,
        Some(&rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        }),
    )?;
    let exited = fds[0].revents().contains(PollFlags::IN);
    let gone = fds[1]
        .revents()
        .intersects(PollFlags::RDHUP | PollFlags::HUP | PollFlags::ERR);
    if exited || gone {
        return Err(std::io::Error::other(
            "the peer exited before its identity was read",
        ));
    }
    let exe_json = crate::audit::record::Ident::of(0, &exe.to_string_lossy()).exe_json;
    Ok(Peer {
        pid: pid.as_raw_nonzero().get() as u32,
        uid: cred.uid.as_raw(),
        gid: cred.gid.as_raw(),
        exe,
        exe_json,
        operator: false,
    })
}

fn random_secret() -> [u8; 32] {
    let mut s = [0u8; 32];
    getrandom::fill(&mut s).expect("the kernel's random source");
    s
}

/// Compares secrets in constant time.
fn same_secret(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Server {
    /// A server for `cfg`, whose `[service]` section must be present.
    pub fn new(cfg: Config) -> Result<Server, String> {
        let svc = cfg
            .service
            .clone()
            .ok_or_else(|| "no [service] section: cmkp11d needs service.socket".to_string())?;
        Ok(Server {
            cfg,
            svc,
            contexts: Mutex::new(HashMap::new()),
            next_context: AtomicU64::new(1),
            fails: Mutex::new(HashMap::new()),
            connections: AtomicUsize::new(0),
            metrics: None,
        })
    }

    /// Starts serving metrics where `service.metrics_socket` / `metrics_listen` say (no-op
    /// when neither is set). Call before [`Server::serve`].
    pub fn start_metrics(self: &mut Arc<Self>) -> Result<(), String> {
        use crate::daemon::metrics::{self, Endpoint};
        let mut at = Vec::new();
        if let Some(p) = &self.svc.metrics_socket {
            if *p == self.svc.socket {
                return Err(format!(
                    "service.metrics_socket {} is service.socket: give metrics a path of their own",
                    p.display()
                ));
            }
            at.push(Endpoint::Unix(p.clone()));
        }
        if let Some(a) = &self.svc.metrics_listen {
            at.push(Endpoint::Tcp(metrics::loopback(a)?));
        }
        if at.is_empty() {
            return Ok(());
        }
        Arc::get_mut(self)
            .ok_or("start_metrics: the server is already shared")?
            .metrics = Some(metrics::get());
        for e in at {
            let me = Arc::downgrade(self);
            metrics::serve(e, move || {
                me.upgrade()
                    .map(|s| s.client_sessions())
                    .unwrap_or_default()
            })?;
        }
        Ok(())
    }

    /// Per connected client process: uid, executable and open sessions.
    pub fn client_sessions(&self) -> Vec<(u32, String, usize)> {
        let contexts: Vec<Arc<Context>> = self.contexts.lock().values().cloned().collect();
        contexts
            .iter()
            .map(|c| {
                (
                    c.peer.uid,
                    c.peer.exe.display().to_string(),
                    c.state.lock().sessions.len(),
                )
            })
            .collect()
    }

    /// Logs the daemon in to every slot with the token PIN (at start).
    pub fn login_token(&self, pin: &[u8]) -> Result<Vec<CK_SESSION_HANDLE>, String> {
        let slots = match crate::daemon::host::execute(Request::GetSlotList { present: true }) {
            Reply::Ulongs(v) => v,
            Reply::Rv(rv) => {
                return Err(format!("C_GetSlotList: {}", crate::backend::rv::name(rv)))
            }
            _ => return Err("C_GetSlotList: unexpected reply".into()),
        };
        let mut keep = Vec::new();
        for slot in slots {
            let h = match crate::daemon::host::execute(Request::OpenSession {
                slot,
                flags: CKF_SERIAL_SESSION | CKF_RW_SESSION,
            }) {
                Reply::Handle(h) => h,
                Reply::Rv(rv) => {
                    return Err(format!(
                        "slot {slot}: C_OpenSession: {}",
                        crate::backend::rv::name(rv)
                    ))
                }
                _ => return Err("C_OpenSession: unexpected reply".into()),
            };
            match crate::daemon::host::execute(Request::Login {
                session: h,
                user: CKU_USER,
                pin: pin.to_vec(),
            }) {
                Reply::Rv(CKR_OK) | Reply::Rv(CKR_USER_ALREADY_LOGGED_IN) => {}
                Reply::Rv(rv) => {
                    return Err(format!(
                        "slot {slot}: token login with the PIN of service.token_pin_file: {}",
                        crate::backend::rv::name(rv)
                    ))
                }
                _ => return Err("C_Login: unexpected reply".into()),
            }
            keep.push(h);
        }
        Ok(keep)
    }

    /// Serves connections from `listener` forever.
    pub fn serve(self: &Arc<Self>, listener: UnixListener) {
        for conn in listener.incoming() {
            match conn {
                Ok(stream) => {
                    if self.connections.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
                        self.connections.fetch_sub(1, Ordering::AcqRel);
                        log::warn!("connection refused: {MAX_CONNECTIONS} connections in use");
                        continue;
                    }
                    let me = self.clone();
                    let spawned = std::thread::Builder::new()
                        .name("cmkp11d-conn".into())
                        .spawn(move || {
                            me.connection(stream);
                            me.connections.fetch_sub(1, Ordering::AcqRel);
                        });
                    if let Err(e) = spawned {
                        self.connections.fetch_sub(1, Ordering::AcqRel);
                        log::error!("cannot start a connection thread: {e}");
                    }
                }
                Err(e) => {
                    log::warn!("accept: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }

    fn connection(&self, mut stream: UnixStream) {
        let peer = match peer_of(&stream) {
            Ok(p) => Arc::new(p),
            Err(e) => {
                log::warn!("connection dropped: cannot identify the peer: {e}");
                return;
            }
        };
        let who = format!(
            "pid {} uid {} exe {}",
            peer.pid,
            peer.uid,
            peer.exe.display()
        );
        let mut buf = Vec::new();
        let _ = stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
        let hello: Hello = match proto::recv(&mut stream, &mut buf) {
            Ok(h) => h,
            Err(FrameError::Closed) => return,
            Err(e) => {
                log::warn!("client {who}: bad handshake ({e}); connection dropped");
                return;
            }
        };
        let _ = stream.set_read_timeout(None);
        let ctx = match self.welcome(hello, &peer) {
            Ok(ctx) => ctx,
            Err(why) => {
                log::warn!("client {who}: refused: {why}");
                let _ = proto::send(&mut stream, &Welcome::Refused(why));
                return;
            }
        };
        if proto::send(
            &mut stream,
            &Welcome::Ok {
                version: proto::VERSION,
                context: ctx.id,
                secret: ctx.secret,
            },
        )
        .is_err()
        {
            self.leave(&ctx);
            return;
        }
        log::debug!("client {who}: connected (context {})", ctx.id);
        loop {
            proto::spin_until_readable(&stream);
            let req: Request = match proto::recv(&mut stream, &mut buf) {
                Ok(r) => r,
                Err(FrameError::Closed) => break,
                Err(e) => {
                    log::warn!("client {who}: {e}; connection dropped");
                    break;
                }
            };
            let call = req.call_name();
            let started = std::time::Instant::now();
            let reply = serve_as(&ctx.peer, || self.handle(&ctx, req));
            if let Some(m) = self.metrics {
                m.call(call, started.elapsed(), reply.result_code());
            }
            if proto::send(&mut stream, &reply).is_err() {
                break;
            }
        }
        self.leave(&ctx);
    }

    /// Opens or joins a context for a hello.
    fn welcome(&self, hello: Hello, peer: &Arc<Peer>) -> Result<Arc<Context>, String> {
        match hello {
            Hello::Open { min, max } => {
                if !(min..=max).contains(&proto::VERSION) {
                    return Err(format!(
                        "protocol versions {min}..={max} offered, this daemon speaks {}",
                        proto::VERSION
                    ));
                }
                let mut contexts = self.contexts.lock();
                let same_uid = contexts.values().filter(|c| c.peer.uid == peer.uid).count();
                if same_uid >= MAX_CONTEXTS_PER_UID {
                    return Err(format!(
                        "uid {} already has {MAX_CONTEXTS_PER_UID} client processes connected",
                        peer.uid
                    ));
                }
                let id = self.next_context.fetch_add(1, Ordering::Relaxed);
                let ctx = Arc::new(Context {
                    id,
                    secret: random_secret(),
                    peer: peer.clone(),
                    conns: AtomicUsize::new(1),
                    state: Mutex::new(CtxState::default()),
                });
                contexts.insert(id, ctx.clone());
                Ok(ctx)
            }
            Hello::Attach {
                version,
                context,
                secret,
            } => {
                if version != proto::VERSION {
                    return Err(format!("protocol version {version} not spoken"));
                }
                let ctx = self
                    .contexts
                    .lock()
                    .get(&context)
                    .cloned()
                    .ok_or("unknown context")?;
                if !same_secret(&ctx.secret, &secret)
                    || ctx.peer.pid != peer.pid
                    || ctx.peer.uid != peer.uid
                {
                    return Err("attach to a context of another process".into());
                }
                if ctx.conns.fetch_add(1, Ordering::AcqRel) >= self.svc.max_connections {
                    ctx.conns.fetch_sub(1, Ordering::AcqRel);
                    return Err(format!(
                        "more than service.max_connections = {} connections",
                        self.svc.max_connections
                    ));
                }
                Ok(ctx)
            }
        }
    }

    /// A connection of `ctx` ended: the last one closes the context's sessions.
    fn leave(&self, ctx: &Arc<Context>) {
        if ctx.conns.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        self.contexts.lock().remove(&ctx.id);
        let sessions: Vec<_> = ctx.state.lock().sessions.drain().map(|(h, _)| h).collect();
        serve_as(&ctx.peer, || {
            for h in sessions {
                crate::daemon::host::execute(Request::CloseSession(h));
            }
        });
        log::debug!("context {} closed", ctx.id);
    }

    /// Runs one request of `ctx`.
    fn handle(&self, ctx: &Context, mut req: Request) -> Reply {
        match self.check(ctx, &mut req) {
            Err(rv) => Reply::Rv(rv),
            Ok(Some(reply)) => reply,
            Ok(None) => {
                let created = creates(&req);
                let session_info = matches!(req, Request::GetSessionInfo(_));
                let open = match &req {
                    Request::OpenSession { slot, .. } => Some(*slot),
                    _ => None,
                };
                let close = match &req {
                    Request::CloseSession(h) => Some(*h),
                    _ => None,
                };
                let public_find = match &req {
                    Request::FindObjects { session, .. } => ctx
                        .state
                        .lock()
                        .sessions
                        .get(session)
                        .is_some_and(|s| s.public_find),
                    _ => false,
                };
                let find_init = match &req {
                    Request::FindObjectsInit { session, .. } => Some(*session),
                    _ => None,
                };
                let reply = crate::daemon::host::execute(req);
                if let (true, Reply::Handles(found)) = (public_find, &reply) {
                    ctx.state.lock().public.extend(found.iter().copied());
                }
                if let (Some(h), true) = (find_init, reply.result_code() != CKR_OK) {
                    // A search the token refused is not active.
                    if let Some(s) = ctx.state.lock().sessions.get_mut(&h) {
                        s.public_find = false;
                    }
                }
                self.after(ctx, reply, created, session_info, open, close)
            }
        }
    }

    /// Checks a request against the client's state: `Ok(None)` to run it, `Ok(Some(r))`
    /// when the daemon answers it itself, `Err(rv)` to refuse it.
    fn check(&self, ctx: &Context, req: &mut Request) -> Result<Option<Reply>, CK_RV> {
        use Request as R;
        let st = &mut *ctx.state.lock();
        let own = |st: &CtxState, h: u64| {
            if st.sessions.contains_key(&h) {
                Ok(())
            } else {
                Err(CKR_SESSION_HANDLE_INVALID)
            }
        };
        let seen = |st: &CtxState, h: u64, rv: CK_RV| {
            if st.objects.contains(&h) {
                Ok(())
            } else {
                Err(rv)
            }
        };
        let logged = |st: &CtxState| {
            if st.login.is_some() {
                Ok(())
            } else {
                Err(CKR_USER_NOT_LOGGED_IN)
            }
        };
        let room = |st: &CtxState, n: usize| {
            if st.created + n <= self.svc.max_objects {
                Ok(())
            } else {
                log::warn!(
                    "client pid {}: over service.max_objects = {}",
                    ctx.peer.pid,
                    self.svc.max_objects
                );
                Err(CKR_DEVICE_MEMORY)
            }
        };
        match req {
            R::GetInfo
            | R::GetSlotList { .. }
            | R::GetSlotInfo(_)
            | R::GetTokenInfo(_)
            | R::GetMechanismList(_)
            | R::GetMechanismInfo { .. } => Ok(None),
            R::OpenSession { flags, .. } => {
                if *flags & CKF_SERIAL_SESSION == 0 {
                    return Err(CKR_SESSION_PARALLEL_NOT_SUPPORTED);
                }
                if st.sessions.len() >= self.svc.max_sessions {
                    log::warn!(
                        "client pid {}: over service.max_sessions = {}",
                        ctx.peer.pid,
                        self.svc.max_sessions
                    );
                    return Err(CKR_SESSION_COUNT);
                }
                Ok(None)
            }
            R::CloseSession(h) | R::GetSessionInfo(h) => own(st, *h).map(|_| None),
            R::CloseAllSessions(slot) => {
                let mine: Vec<_> = st
                    .sessions
                    .iter()
                    .filter(|(_, s)| s.slot == *slot)
                    .map(|(h, _)| *h)
                    .collect();
                if mine.is_empty() {
                    // Still checks the slot id.
                    return match crate::daemon::host::execute(R::GetSlotInfo(*slot)) {
                        Reply::Rv(rv) => Err(rv),
                        _ => Ok(Some(Reply::Rv(CKR_OK))),
                    };
                }
                for h in mine {
                    st.sessions.remove(&h);
                    crate::daemon::host::execute(R::CloseSession(h));
                }
                self.last_session_gone(ctx, st);
                Ok(Some(Reply::Rv(CKR_OK)))
            }
            R::Login { session, user, pin } => {
                own(st, *session)?;
                if *user != CKU_USER {
                    log::warn!(
                        "client pid {}: login as user type {user} refused (applications log in as CKU_USER)",
                        ctx.peer.pid
                    );
                    return Err(CKR_USER_TYPE_INVALID);
                }
                if st.login.is_some() {
                    return Err(CKR_USER_ALREADY_LOGGED_IN);
                }
                let slot = st.sessions[session].slot;
                let name = self.app_login(ctx, pin, slot, *session)?;
                st.login = Some(name);
                Ok(Some(Reply::Rv(CKR_OK)))
            }
            R::Logout(h) => {
                own(st, *h)?;
                let Some(name) = st.login.take() else {
                    return Err(CKR_USER_NOT_LOGGED_IN);
                };
                let slot = st.sessions[h].slot;
                self.audit_login(ctx, "logout", CKR_OK, &format!("client {name}"), slot, *h);
                Ok(Some(Reply::Rv(CKR_OK)))
            }
            R::FindObjectsInit { session, template } => {
                own(st, *session)?;
                if st.login.is_none() {
                    // Not logged in: private objects are invisible (cmkp11's own objects
                    // and CMKs are all private). A uid that some `[[clients]]` entry
                    // admits sees the public ones, as PKCS#11 promises before login
                    // (certificates and public keys: ssh-keygen -D, openvpn
                    // --show-pkcs11-ids); anyone else, nothing.
                    let s = st.sessions.get_mut(session).expect("owned");
                    if s.empty_find || s.public_find {
                        return Err(CKR_OPERATION_ACTIVE);
                    }
                    let client = self
                        .cfg
                        .clients
                        .iter()
                        .any(|c| c.uids.contains(&ctx.peer.uid));
                    match template.iter().find(|a| a.ty == CKA_PRIVATE) {
                        _ if !client => s.empty_find = true,
                        Some(a) if a.value.as_deref() != Some(&[CK_FALSE][..]) => {
                            s.empty_find = true
                        }
                        Some(_) => s.public_find = true,
                        None => {
                            template.push(proto::Attr {
                                ty: CKA_PRIVATE,
                                value: Some(vec![CK_FALSE]),
                            });
                            s.public_find = true;
                        }
                    }
                    if s.empty_find {
                        return Ok(Some(Reply::Rv(CKR_OK)));
                    }
                }
                Ok(None)
            }
            R::FindObjects { session, .. } => {
                own(st, *session)?;
                if st.sessions[session].empty_find {
                    return Ok(Some(Reply::Handles(Vec::new())));
                }
                Ok(None)
            }
            R::FindObjectsFinal(session) => {
                own(st, *session)?;
                let s = st.sessions.get_mut(session).expect("owned");
                s.public_find = false;
                if s.empty_find {
                    s.empty_find = false;
                    return Ok(Some(Reply::Rv(CKR_OK)));
                }
                Ok(None)
            }
            R::CreateObject { session, .. } => {
                own(st, *session)?;
                logged(st)?;
                room(st, 1).map(|_| None)
            }
            R::CopyObject {
                session, object, ..
            } => {
                own(st, *session)?;
                logged(st)?;
                seen(st, *object, CKR_OBJECT_HANDLE_INVALID)?;
                room(st, 1).map(|_| None)
            }
            R::GetObjectSize { session, object }
            | R::GetAttributeValue {
                session, object, ..
            } => {
                own(st, *session)?;
                if !st.public.contains(object) {
                    logged(st)?;
                }
                seen(st, *object, CKR_OBJECT_HANDLE_INVALID).map(|_| None)
            }
            R::DestroyObject { session, object }
            | R::SetAttributeValue {
                session, object, ..
            } => {
                own(st, *session)?;
                logged(st)?;
                seen(st, *object, CKR_OBJECT_HANDLE_INVALID).map(|_| None)
            }
            R::Init {
                op, session, key, ..
            } => {
                own(st, *session)?;
                if *op != Op::Digest {
                    logged(st)?;
                    seen(st, *key, CKR_KEY_HANDLE_INVALID)?;
                }
                Ok(None)
            }
            R::Data { session, .. }
            | R::SeedRandom { session, .. }
            | R::GenerateRandom { session, .. } => own(st, *session).map(|_| None),
            R::DigestKey { session, key } => {
                own(st, *session)?;
                logged(st)?;
                seen(st, *key, CKR_KEY_HANDLE_INVALID).map(|_| None)
            }
            R::GenerateKey { session, .. } => {
                own(st, *session)?;
                logged(st)?;
                room(st, 1).map(|_| None)
            }
            R::GenerateKeyPair { session, .. } => {
                own(st, *session)?;
                logged(st)?;
                room(st, 2).map(|_| None)
            }
            R::WrapKey {
                session,
                wrapping,
                key,
                ..
            } => {
                own(st, *session)?;
                logged(st)?;
                seen(st, *wrapping, CKR_WRAPPING_KEY_HANDLE_INVALID)?;
                seen(st, *key, CKR_KEY_HANDLE_INVALID).map(|_| None)
            }
            R::UnwrapKey {
                session,
                unwrapping,
                ..
            } => {
                own(st, *session)?;
                logged(st)?;
                seen(st, *unwrapping, CKR_UNWRAPPING_KEY_HANDLE_INVALID)?;
                room(st, 1).map(|_| None)
            }
            R::Admin { session, key, call } => {
                own(st, *session)?;
                logged(st)?;
                if *call != crate::service::proto::AdminCall::Purge {
                    seen(st, *key, CKR_OBJECT_HANDLE_INVALID)?;
                }
                // Runs through the runtime as the application: its lifecycle gate refuses
                // the step with CKR_USER_NOT_LOGGED_IN and records it (ops.rs
                // `operator_gate`).
                Ok(None)
            }
            R::DeriveKey { session, base, .. } => {
                own(st, *session)?;
                logged(st)?;
                seen(st, *base, CKR_KEY_HANDLE_INVALID)?;
                room(st, 1).map(|_| None)
            }
        }
    }

    /// Records what a reply gave the client.
    fn after(
        &self,
        ctx: &Context,
        reply: Reply,
        created: bool,
        session_info: bool,
        open: Option<CK_SLOT_ID>,
        close: Option<CK_SESSION_HANDLE>,
    ) -> Reply {
        let st = &mut *ctx.state.lock();
        match &reply {
            Reply::Handle(h) if open.is_some() => {
                st.sessions.insert(
                    *h,
                    Sess {
                        slot: open.unwrap_or_default(),
                        empty_find: false,
                        public_find: false,
                    },
                );
            }
            Reply::Handle(h) => {
                st.objects.insert(*h);
                st.created += usize::from(created);
            }
            Reply::Pair(a, b) => {
                st.objects.insert(*a);
                st.objects.insert(*b);
                st.created += 2;
            }
            Reply::Handles(v) => st.objects.extend(v.iter().copied()),
            Reply::Rv(CKR_OK) => {
                if let Some(h) = close {
                    st.sessions.remove(&h);
                    self.last_session_gone(ctx, st);
                }
            }
            Reply::SessionInfo {
                slot,
                state: _,
                flags,
                device_error,
            } if session_info => {
                // The login state is the client's, not the daemon's.
                let rw = flags & CKF_RW_SESSION != 0;
                let state = match (st.login.is_some(), rw) {
                    (true, true) => CKS_RW_USER_FUNCTIONS,
                    (true, false) => CKS_RO_USER_FUNCTIONS,
                    (false, true) => CKS_RW_PUBLIC_SESSION,
                    (false, false) => CKS_RO_PUBLIC_SESSION,
                };
                return Reply::SessionInfo {
                    slot: *slot,
                    state,
                    flags: *flags,
                    device_error: *device_error,
                };
            }
            _ => {}
        }
        reply
    }

    /// After a session closed: with the client's last one, the client is logged out
    /// (PKCS#11 §5.6: login state lasts while the application has a session open).
    fn last_session_gone(&self, ctx: &Context, st: &mut CtxState) {
        if st.sessions.is_empty() && st.login.is_some() {
            st.login = None;
            log::debug!(
                "client pid {}: last session closed, logged out",
                ctx.peer.pid
            );
        }
    }

    /// Checks an application PIN for `ctx`'s uid: the client's name, or the code.
    fn app_login(
        &self,
        ctx: &Context,
        pin: &[u8],
        slot: CK_SLOT_ID,
        session: CK_SESSION_HANDLE,
    ) -> Result<String, CK_RV> {
        use argon2::PasswordVerifier;
        let uid = ctx.peer.uid;
        {
            let mut fails = self.fails.lock();
            let f = fails.entry(uid).or_default();
            if let Some(until) = f.until {
                if Instant::now() < until {
                    drop(fails);
                    log::warn!("client pid {} uid {uid}: login refused: locked out after {MAX_FAILS} wrong PINs", ctx.peer.pid);
                    self.audit_login(
                        ctx,
                        "login",
                        CKR_PIN_LOCKED,
                        "locked out after repeated wrong application PINs",
                        slot,
                        session,
                    );
                    return Err(CKR_PIN_LOCKED);
                }
                f.until = None;
            }
        }
        let argon = argon2::Argon2::default();
        let found = self.cfg.clients.iter().find(|c| {
            c.uids.contains(&uid) && argon.verify_password(pin, c.pin_hash.as_str()).is_ok()
        });
        match found {
            Some(c) => {
                self.fails.lock().remove(&uid);
                self.audit_login(
                    ctx,
                    "login",
                    CKR_OK,
                    &format!("client {}", c.name),
                    slot,
                    session,
                );
                log::info!(
                    "client pid {} uid {uid}: logged in as {}",
                    ctx.peer.pid,
                    c.name
                );
                Ok(c.name.clone())
            }
            None => {
                let n = {
                    let mut fails = self.fails.lock();
                    let f = fails.entry(uid).or_default();
                    f.count += 1;
                    if f.count >= MAX_FAILS {
                        f.count = 0;
                        f.until = Some(Instant::now() + LOCKOUT);
                    }
                    f.count
                };
                let known = self.cfg.clients.iter().any(|c| c.uids.contains(&uid));
                let why = if known {
                    "wrong application PIN"
                } else {
                    "no [[clients]] entry for this uid"
                };
                log::warn!(
                    "client pid {} uid {uid}: login failed: {why} ({n} in a row)",
                    ctx.peer.pid
                );
                self.audit_login(ctx, "login", CKR_PIN_INCORRECT, why, slot, session);
                Err(CKR_PIN_INCORRECT)
            }
        }
    }

    fn audit_login(
        &self,
        ctx: &Context,
        op: &str,
        rv: CK_RV,
        reason: &str,
        slot: CK_SLOT_ID,
        session: CK_SESSION_HANDLE,
    ) {
        let Ok(lib) = crate::runtime::library() else {
            return;
        };
        let token = lib.token_labels.get(slot as usize).map(String::as_str);
        let r = crate::audit::RecordRef {
            op,
            mechanism: None,
            key: None,
            key_id: None,
            version: None,
            result: rv,
            reason: Some(reason),
            slot: Some(slot),
            token,
            session: Some(session),
        };
        serve_as(&ctx.peer, || {
            if let Err(n) = lib.audit.record_ref(&r) {
                log::error!("audit: login record not written ({n})");
            }
        });
    }
}

/// Whether a request makes a new object (counted against `max_objects`).
fn creates(req: &Request) -> bool {
    matches!(
        req,
        Request::CreateObject { .. }
            | Request::CopyObject { .. }
            | Request::GenerateKey { .. }
            | Request::GenerateKeyPair { .. }
            | Request::UnwrapKey { .. }
            | Request::DeriveKey { .. }
    )
}
