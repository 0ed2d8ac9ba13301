//! `cmkp11 doctor`: what the configured token can do for cmkp11.
//!
//! Runs the capability probe ([`cmkp11::backend::probe`]) against the configured backend
//! and prints what works, what is missing and which cmkp11 features that disables, the
//! token's session limits and known quirks, and a quick throughput check. With a PIN
//! (`--pin-file` or `CMKP11_PIN`; never prompted) it logs in and also tries private
//! objects and a token data object (created and destroyed again). Exit status 0 when
//! every capability cmkp11 needs works (or could not be tried), 1 otherwise.

use crate::{ctx, fail, output, CliError, Global, R};
use clap::Args;
use cmkp11::backend::probe::{self, Capabilities, Capability, Depth, Status};
use serde::Serialize;
use std::time::Duration;

/// Options of `cmkp11 doctor`.
#[derive(Args, Debug)]
pub struct DoctorArgs {
    /// Milliseconds of each throughput case (0: no throughput check).
    #[arg(long, default_value_t = 200, value_name = "MS")]
    pub bench_ms: u64,
}

/// Capabilities whose absence makes the token unfit for cmkp11 as configured by default
/// (the others only disable an optional feature).
pub const REQUIRED: [Capability; 7] = [
    Capability::SessionObjects,
    Capability::PrivateObjects,
    Capability::DataObjects,
    Capability::ModifiableFalse,
    Capability::AesGcm,
    Capability::AesKwp,
    Capability::HmacSha256,
];

#[derive(Serialize)]
struct Check {
    capability: Capability,
    status: &'static str,
    detail: String,
    required: bool,
    needed_by: &'static str,
}

#[derive(Serialize)]
struct Rate {
    case: &'static str,
    ops_per_s: f64,
}

#[derive(Serialize)]
struct Report<'a> {
    ok: bool,
    token: &'a str,
    module: &'a str,
    family: probe::Family,
    manufacturer: &'a str,
    model: &'a str,
    logged_in: bool,
    checks: Vec<Check>,
    max_sessions: Option<u64>,
    max_rw_sessions: Option<u64>,
    quirks: &'a [probe::Quirk],
    mechanisms: &'a [probe::MechInfo],
    probe_calls: u64,
    probe_us: u64,
    throughput: Vec<Rate>,
}

fn checks(caps: &Capabilities) -> Vec<Check> {
    caps.checks
        .iter()
        .map(|(cap, st)| {
            let (status, detail) = match st {
                Status::Works => ("works", String::new()),
                Status::Missing(d) => ("missing", d.clone()),
                Status::Untested(d) => ("untested", d.clone()),
            };
            Check {
                capability: *cap,
                status,
                detail,
                required: REQUIRED.contains(cap),
                needed_by: cap.needed_by(),
            }
        })
        .collect()
}

/// `cmkp11 doctor`.
pub fn run(g: &Global, a: DoctorArgs) -> R<u8> {
    let mut cfg = ctx::load_config()?;
    // A diagnosis uses no key: nothing for the audit log.
    cfg.audit.file = None;
    let module = cfg.backend.module.clone();
    let lib = ctx::open_library(cfg, g.verbose)?;
    let (slot_id, token) = ctx::pick_token(&lib, g.token.as_deref())?;
    let slot = lib
        .slot(slot_id)
        .map_err(|e| CliError::new(ctx::describe(&e)))?;
    let backend = &lib.backend.ctx;
    // The PIN only if the operator gave one: a diagnosis never prompts.
    let login = if g.pin_file.is_some() || std::env::var_os("CMKP11_PIN").is_some() {
        let pin = ctx::user_pin(g, &token)?;
        let s = backend
            .open_ro_session(slot)
            .map_err(|e| CliError::new(format!("token `{token}`: open a session: {e}")))?;
        if let Err(e) = s.login_with_raw(cryptoki::session::UserType::User, &pin) {
            return fail(format!("token `{token}`: login failed: {e}"));
        }
        Some(s)
    } else {
        None
    };
    let depth = if login.is_some() {
        Depth::TokenObjects
    } else {
        Depth::Session
    };
    let caps = probe::probe(backend, &module, slot, Some(lib.backend.raw), depth)
        .map_err(|e| CliError::new(format!("token `{token}`: the probe failed: {e}")))?;
    let rates = if a.bench_ms > 0 {
        probe::throughput(backend, slot, &caps, Duration::from_millis(a.bench_ms))
    } else {
        Vec::new()
    };
    drop(login);
    let checks = checks(&caps);
    let ok = !checks.iter().any(|c| c.required && c.status == "missing");
    let report = Report {
        ok,
        token: &caps.token,
        module: &caps.module,
        family: caps.family,
        manufacturer: &caps.manufacturer,
        model: &caps.model,
        logged_in: caps.logged_in,
        checks,
        max_sessions: caps.max_sessions,
        max_rw_sessions: caps.max_rw_sessions,
        quirks: &caps.quirks,
        mechanisms: &caps.mechanisms,
        probe_calls: caps.calls,
        probe_us: caps.elapsed.as_micros() as u64,
        throughput: rates
            .into_iter()
            .map(|(case, ops_per_s)| Rate { case, ops_per_s })
            .collect(),
    };
    if g.json {
        output::json(&report)?;
    } else {
        print(&report);
    }
    drop(lib);
    Ok(u8::from(!ok))
}

fn print(r: &Report) {
    println!(
        "token `{}` ({} {}) over {}",
        r.token, r.manufacturer, r.model, r.module
    );
    let rows: Vec<Vec<String>> = r
        .checks
        .iter()
        .map(|c| {
            vec![
                serde_json::to_value(c.capability)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
                c.status.to_string(),
                if c.required { "yes" } else { "no" }.into(),
                match c.status {
                    "works" => String::new(),
                    "missing" => format!("{}; disables: {}", c.detail, c.needed_by),
                    _ => c.detail.clone(),
                },
            ]
        })
        .collect();
    output::table(&["CAPABILITY", "STATUS", "REQUIRED", "NOTE"], &rows);
    let limit = |l: Option<u64>| l.map_or("no limit told".to_string(), |n| format!("at most {n}"));
    println!(
        "sessions: {}; read-write sessions: {}",
        limit(r.max_sessions),
        limit(r.max_rw_sessions)
    );
    println!(
        "mechanisms: {} listed; probe: {} backend calls in {} µs{}",
        r.mechanisms.len(),
        r.probe_calls,
        r.probe_us,
        if r.logged_in {
            ""
        } else {
            " (no login: give --pin-file or CMKP11_PIN to try private and token objects)"
        }
    );
    for q in r.quirks {
        println!("quirk {}: {}; {}", q.name, q.what, q.handling);
    }
    for t in &r.throughput {
        println!("throughput {}: {:.0} ops/s", t.case, t.ops_per_s);
    }
    println!(
        "{}",
        if r.ok {
            "verdict: this token has every capability cmkp11 needs"
        } else {
            "verdict: capabilities cmkp11 needs are missing (see above)"
        }
    );
}
