//! `cmkp11 audit ...`: verify, tail and report the audit log.
//!
//! Mounted by `main.rs` as a subcommand (`Audit(audit::AuditArgs)`); the logic lives in
//! the library (`cmkp11::audit`), this file only parses arguments and prints.

use cmkp11::audit::{self, cli, TokenMac};
use cmkp11::config::Config;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

/// `cmkp11 audit`
#[derive(Debug, clap::Args)]
pub struct AuditArgs {
    /// What to do.
    #[command(subcommand)]
    pub cmd: AuditCmd,
}

/// The audit subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum AuditCmd {
    /// Check the hash chain, the token MACs and the token checkpoint; print the first bad
    /// record and why (modified, inserted, deleted, reordered, truncated, torn, gap,
    /// checkpoint). Read-only: appends nothing to the log.
    /// Exit status 0: the log verifies; 1: it does not; 3: the chain is intact but the
    /// token could not be used (no PIN, token unavailable), so the MACs or the token
    /// checkpoint were not checked.
    ///
    /// Several files (`verify OLDEST ... NEWEST`, or `--series`) are checked as one log
    /// rotated into several files: each must start where the one before ends.
    Verify {
        /// The log (default: `[audit] file` of the configuration).
        #[arg(long)]
        file: Option<PathBuf>,
        /// The files of a rotated log, oldest first (instead of `--file`).
        #[arg(conflicts_with_all = ["file", "series"])]
        files: Vec<PathBuf>,
        /// Check the log and the files rotated out of it (`LOG.*` and `LOG-*` next to
        /// it, ordered by their first record) as one series.
        #[arg(long)]
        series: bool,
        /// Print the outcome as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Close the audit log with a MACed `log-close` record, keep it as `LOG.<UTC time>`
    /// (or `--to`), and start a new file at the log's path whose first record (`log-open`)
    /// chains to it. Writers switch to the new file at their next record; nothing is lost
    /// or written twice. Both files verify on their own and as a series.
    Rotate {
        /// The name to keep the closed file under (same file system).
        #[arg(long, value_name = "PATH", conflicts_with = "renamed")]
        to: Option<PathBuf>,
        /// The log was renamed to PATH already (logrotate with `nocreate`, from its
        /// `postrotate` script): close PATH where it is and start the new file.
        #[arg(long, value_name = "PATH")]
        renamed: Option<PathBuf>,
        /// Print the outcome as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the last records, optionally following the log as it grows.
    Tail {
        /// Keep printing records as they are appended.
        #[arg(short = 'f', long)]
        follow: bool,
        /// Only records of this key (label).
        #[arg(long, value_name = "NAME")]
        key: Option<String>,
        /// Print the JSON lines as they are in the log.
        #[arg(long)]
        json: bool,
        /// How many records to print first.
        #[arg(short = 'n', long, default_value_t = 10)]
        lines: usize,
        /// The log (default: `[audit] file` of the configuration).
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Count records per key and operation (OK / failed) over a time range, as a table.
    Report {
        /// From this UTC time on (2026-11-23, 2026-11-23T13:00:00Z) or this long ago (24h, 7d).
        #[arg(long)]
        since: Option<String>,
        /// Before this UTC time (exclusive), same forms.
        #[arg(long)]
        until: Option<String>,
        /// The log (default: `[audit] file` of the configuration).
        #[arg(long)]
        file: Option<PathBuf>,
        /// Print the rows as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Exit status of `audit verify` when the chain is intact but the token side (MACs,
/// checkpoint) could not be checked.
pub const NOT_AUTHENTICATED: i32 = 3;

fn log_file(file: Option<PathBuf>, cfg: &Config) -> Result<PathBuf, String> {
    file.or_else(|| cfg.audit.file.clone()).ok_or_else(|| {
        "no audit log: pass --file or set [audit] file in the configuration".to_string()
    })
}

/// Runs `cmkp11 audit ...`. `mac` is the token's audit key and checkpoint (`None` when no
/// token session is available: verify then checks the chain only, and says so).
/// Returns the process exit status; `Err` for usage problems (no log configured,
/// unreadable file, bad time).
pub fn run(args: AuditArgs, cfg: &Config, mac: Option<Arc<dyn TokenMac>>) -> Result<i32, String> {
    run_to(args, cfg, mac, &mut std::io::stdout().lock())
}

/// [`run`] printing to `out`.
pub fn run_to(
    args: AuditArgs,
    cfg: &Config,
    mac: Option<Arc<dyn TokenMac>>,
    out: &mut dyn Write,
) -> Result<i32, String> {
    match args.cmd {
        AuditCmd::Verify {
            file,
            files,
            series,
            json,
        } => {
            let (path, paths) = if !files.is_empty() {
                (files.last().cloned().expect("not empty"), files)
            } else {
                let path = log_file(file, cfg)?;
                let paths = if series {
                    audit::verify::series_files(&path).map_err(|e| e.to_string())?
                } else {
                    vec![path.clone()]
                };
                (path, paths)
            };
            let report = audit::verify::verify_series(&paths, mac.as_deref());
            if matches!(
                report.problem.as_ref().map(|p| p.kind),
                Some(audit::Tamper::Unreadable)
            ) {
                return Err(report.problem.map(|p| p.detail).unwrap_or_default());
            }
            if json {
                let p = report.problem.as_ref().map(|p| {
                    serde_json::json!({
                        "kind": p.kind.to_string(), "line": p.line, "seq": p.seq,
                        "detail": p.detail, "file": p.file,
                    })
                });
                let fl: Vec<_> = report
                    .files
                    .iter()
                    .map(|s| {
                        serde_json::json!({"file": s.path, "first_seq": s.first_seq,
                            "last_seq": s.last_seq, "records": s.records, "closed": s.closed})
                    })
                    .collect();
                let v = serde_json::json!({
                    "file": path, "files": fl, "ok": report.ok(), "lines": report.lines,
                    "records": report.records, "last_seq": report.last_seq,
                    "macs": report.macs, "macs_checked": report.macs_checked,
                    "authenticated_through": report.authenticated_through,
                    "token_checkpoint": report.token_checkpoint, "notes": report.notes,
                    "checkpoint_checked": report.checkpoint_checked,
                    "problem": p,
                });
                let _ = writeln!(out, "{v}");
            } else if report.series {
                let _ = write!(out, "{} files of {}: {report}", paths.len(), path.display());
            } else {
                let _ = write!(out, "{}: {report}", path.display());
            }
            let unchecked = !report.macs_checked || !report.checkpoint_checked;
            if report.ok() && unchecked && !json {
                let _ = writeln!(
                    out,
                    "  warning: {}: MACs and truncation were not checked; anyone who can \
                     write the file could have rewritten it (exit status 3)",
                    if mac.is_none() {
                        "no token"
                    } else {
                        "the token could not check them"
                    }
                );
            }
            Ok(match (report.ok(), unchecked) {
                (false, _) => 1,
                (true, true) => NOT_AUTHENTICATED,
                (true, false) => 0,
            })
        }
        AuditCmd::Rotate { to, renamed, json } => {
            let path =
                cfg.audit.file.clone().ok_or_else(|| {
                    "no audit log: set [audit] file in the configuration".to_string()
                })?;
            let r =
                audit::rotate::rotate(&path, renamed.as_deref(), to.as_deref(), mac.as_deref())?;
            if json {
                let _ = writeln!(
                    out,
                    "{}",
                    serde_json::json!({"file": path, "archive": r.archive,
                        "closed_at": r.closed_at, "opened_at": r.opened_at, "maced": r.maced})
                );
            } else {
                let _ = writeln!(
                    out,
                    "{}: rotated: {} closed after record {} (log-close); the new file starts \
                     at record {} (log-open){}",
                    path.display(),
                    r.archive.display(),
                    r.closed_at,
                    r.opened_at,
                    if r.maced {
                        ""
                    } else {
                        "; no token: records not MACed"
                    }
                );
            }
            Ok(0)
        }
        AuditCmd::Tail {
            follow,
            key,
            json,
            lines,
            file,
        } => {
            let path = log_file(file, cfg)?;
            let o = cli::TailOptions {
                lines,
                key,
                json,
                follow,
            };
            cli::tail(&path, &o, out, &mut || true)?;
            Ok(0)
        }
        AuditCmd::Report {
            since,
            until,
            file,
            json,
        } => {
            let path = log_file(file, cfg)?;
            let now = std::time::SystemTime::now();
            let since = since.map(|s| cli::time_bound(&s, now)).transpose()?;
            let until = until.map(|s| cli::time_bound(&s, now)).transpose()?;
            let rows = cli::report(&path, since.as_deref(), until.as_deref())?;
            if json {
                let v: Vec<_> = rows
                    .iter()
                    .map(|r| {
                        serde_json::json!({"key": r.key, "op": r.op, "ok": r.ok,
                            "failed": r.failed})
                    })
                    .collect();
                let _ = writeln!(
                    out,
                    "{}",
                    serde_json::json!({"file": path, "since": since, "until": until, "rows": v})
                );
                return Ok(0);
            }
            let _ = writeln!(
                out,
                "{}: {} to {}",
                path.display(),
                since.as_deref().unwrap_or("start"),
                until.as_deref().unwrap_or("now")
            );
            let _ = write!(out, "{}", cli::render_report(&rows));
            Ok(0)
        }
    }
}
