//! `cmkp11d`'s metrics, in the Prometheus text format over HTTP (`GET /metrics`), on a
//! Unix socket (`service.metrics_socket`) and/or a loopback TCP address
//! (`service.metrics_listen`). Built with `prometheus-client` (the Prometheus project's
//! Rust client) and served by `tiny_http`.
//!
//! | metric | labels | what |
//! |---|---|---|
//! | `cmkp11_key_operations_total` | key, op, result, uid, exe | every audited decision (`key=""` when it names no key: a login), and every DEK bulk operation (`key="(session key)"`) |
//! | `cmkp11_refusals_total` | key, op, result, uid, exe | the same, only those with a result other than `CKR_OK` |
//! | `cmkp11_call_duration_seconds` | call | latency of each protocol call in the daemon (histogram) |
//! | `cmkp11_backend_errors_total` | call, result | calls answered with a device/token/general error |
//! | `cmkp11_audit_write_failures_total` | | records that could not be written |
//! | `cmkp11_sessions` | uid, exe | open sessions per client process (at scrape time) |
//! | `cmkp11_clients` | | connected client processes (at scrape time) |
//!
//! Labels never carry a secret: key names, operation names, `CKR_*` names, the client's
//! kernel-attested uid and executable.

use crate::audit::RecordRef;
use crate::backend::rv;
use cryptoki_sys::*;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::OnceLock;
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyOp {
    key: String,
    op: String,
    result: String,
    uid: String,
    exe: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Call {
    call: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallResult {
    call: &'static str,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClientLabels {
    uid: String,
    exe: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// The daemon's metrics (one per process).
pub struct Metrics {
    key_ops: Family<KeyOp, Counter>,
    refusals: Family<KeyOp, Counter>,
    latency: HistogramFamily<Call>,
    backend_errors: Family<CallResult, Counter>,
    audit_failures: Counter,
    sessions: Family<ClientLabels, Gauge>,
    clients: Gauge,
    registry: Registry,
}

fn latency_histogram() -> Histogram {
    // 5 µs .. ~84 ms in 15 buckets (x2 each).
    Histogram::new(exponential_buckets(5e-6, 2.0, 15))
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

/// The metrics, created (and hooked to the audit records) on first use.
pub fn get() -> &'static Metrics {
    METRICS.get_or_init(|| {
        let m = Metrics::new();
        crate::audit::set_observer(observe_record);
        m
    })
}

fn observe_record(r: &RecordRef<'_>, written: bool) {
    let m = get();
    if !written {
        m.audit_failures.inc();
    }
    // Bookkeeping records, not decisions: a lifecycle step's intent (its outcome is a
    // record of its own), a session's bulk counts (counted one by one), checkpoints.
    if matches!(r.op, "intent" | "session-close" | "checkpoint") {
        return;
    }
    let (uid, exe) = match crate::sys::peer::current() {
        Some(p) => (p.uid.to_string(), p.exe.display().to_string()),
        None => ("daemon".into(), String::new()),
    };
    let labels = KeyOp {
        key: r.key.unwrap_or_default().to_owned(),
        op: r.op.to_owned(),
        result: rv::name(r.result).to_owned(),
        uid,
        exe,
    };
    if r.result != CKR_OK {
        m.refusals.get_or_create(&labels).inc();
    }
    m.key_ops.get_or_create(&labels).inc();
}

/// Whether `rv` says the token (not the request) failed.
fn backend_error(rv: CK_RV) -> bool {
    matches!(
        rv,
        CKR_DEVICE_ERROR
            | CKR_DEVICE_MEMORY
            | CKR_DEVICE_REMOVED
            | CKR_TOKEN_NOT_PRESENT
            | CKR_TOKEN_NOT_RECOGNIZED
            | CKR_GENERAL_ERROR
            | CKR_HOST_MEMORY
    )
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("cmkp11");
        let key_ops = Family::<KeyOp, Counter>::default();
        let refusals = Family::<KeyOp, Counter>::default();
        let latency =
            HistogramFamily::<Call>::new_with_constructor(latency_histogram as fn() -> Histogram);
        let backend_errors = Family::<CallResult, Counter>::default();
        let audit_failures = Counter::default();
        let sessions = Family::<ClientLabels, Gauge>::default();
        let clients = Gauge::default();
        registry.register(
            "key_operations",
            "Audited decisions about keys, by key, operation, result and client",
            key_ops.clone(),
        );
        registry.register(
            "refusals",
            "Key operations answered with a result other than CKR_OK",
            refusals.clone(),
        );
        registry.register(
            "call_duration_seconds",
            "Time the daemon spent on each protocol call",
            latency.clone(),
        );
        registry.register(
            "backend_errors",
            "Calls answered with a device, token or general error",
            backend_errors.clone(),
        );
        registry.register(
            "audit_write_failures",
            "Audit records that could not be written",
            audit_failures.clone(),
        );
        registry.register(
            "sessions",
            "Open sessions per client process",
            sessions.clone(),
        );
        registry.register("clients", "Connected client processes", clients.clone());
        Metrics {
            key_ops,
            refusals,
            latency,
            backend_errors,
            audit_failures,
            sessions,
            clients,
            registry,
        }
    }

    /// One protocol call of `elapsed` answered with `rv`.
    pub fn call(&self, call: &'static str, elapsed: Duration, rv: CK_RV) {
        self.latency
            .get_or_create(&Call { call })
            .observe(elapsed.as_secs_f64());
        if backend_error(rv) {
            self.backend_errors
                .get_or_create(&CallResult {
                    call,
                    result: rv::name(rv).to_owned(),
                })
                .inc();
        }
    }

    /// The text exposition, with the per-client gauges set from `clients` (uid,
    /// executable, open sessions) first.
    pub fn encode(&self, clients: &[(u32, String, usize)]) -> String {
        self.sessions.clear();
        for (uid, exe, n) in clients {
            self.sessions
                .get_or_create(&ClientLabels {
                    uid: uid.to_string(),
                    exe: exe.clone(),
                })
                .set(*n as i64);
        }
        self.clients.set(clients.len() as i64);
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Where metrics are served.
pub enum Endpoint {
    /// HTTP over a Unix socket at this path.
    Unix(std::path::PathBuf),
    /// HTTP on a loopback TCP address.
    Tcp(std::net::SocketAddr),
}

/// Checks `service.metrics_listen`: a socket address on a loopback interface.
pub fn loopback(addr: &str) -> Result<std::net::SocketAddr, String> {
    let a: std::net::SocketAddr = addr.parse().map_err(|e| {
        format!("service.metrics_listen `{addr}`: {e} (expected e.g. 127.0.0.1:9464)")
    })?;
    if !a.ip().is_loopback() {
        return Err(format!(
            "service.metrics_listen `{addr}` is not a loopback address: metrics name keys and \
             clients, serve them on 127.0.0.1 or ::1 (or a Unix socket) and let a local \
             agent forward them"
        ));
    }
    Ok(a)
}

/// Serves `GET /metrics` on `at` from a thread of its own; `clients` gives the per-client
/// session counts at each scrape.
pub fn serve(
    at: Endpoint,
    clients: impl Fn() -> Vec<(u32, String, usize)> + Send + 'static,
) -> Result<(), String> {
    let (server, name) = match &at {
        Endpoint::Unix(p) => {
            let _ = std::fs::remove_file(p);
            let s = tiny_http::Server::http_unix(p)
                .map_err(|e| format!("service.metrics_socket {}: {e}", p.display()))?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o660))
                .map_err(|e| format!("service.metrics_socket {}: chmod: {e}", p.display()))?;
            (s, p.display().to_string())
        }
        Endpoint::Tcp(a) => (
            tiny_http::Server::http(a).map_err(|e| format!("service.metrics_listen {a}: {e}"))?,
            a.to_string(),
        ),
    };
    let m = get();
    let content_type = tiny_http::Header::from_bytes(
        &b"Content-Type"[..],
        &b"text/plain; version=0.0.4; charset=utf-8"[..],
    )
    .map_err(|()| "metrics: bad header".to_string())?;
    std::thread::Builder::new()
        .name("cmkp11d-metrics".into())
        .spawn(move || {
            for req in server.incoming_requests() {
                let resp = if req.url() == "/metrics" {
                    tiny_http::Response::from_string(m.encode(&clients()))
                        .with_header(content_type.clone())
                } else {
                    tiny_http::Response::from_string("see /metrics\n").with_status_code(404)
                };
                let _ = req.respond(resp);
            }
        })
        .map_err(|e| format!("cannot start the metrics thread: {e}"))?;
    log::info!("cmkp11d: metrics on {name}");
    Ok(())
}
