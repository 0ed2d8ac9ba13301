//! Micro-benchmark of the audit writer: records/s for 1 and 2 threads, with the software
//! token double (MAC every 1024 records) and without a token. No timed asserts.
//!
//! `cargo test --release --test audit_bench -- --ignored --nocapture`
//!
//! For profiling one variant: `AUDIT_BENCH_ONLY=1,off` (threads, token MAC `on`/`off`);
//! `AUDIT_BENCH_N` sets the record count (default 200 000).

mod audit_support;

use audit_support::*;
use cmkp11::audit::{self, Auditor, TokenMac, Tuning};
use std::sync::Arc;
use std::time::Instant;

fn run(threads: usize, per_thread: u64, with_mac: bool) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("bench.log");
    let mac = SoftMac::for_log(&log);
    let a = Auditor::open_with(
        &cfg(&log, "deny"),
        with_mac.then(|| mac.clone() as Arc<dyn TokenMac>),
        Tuning::default(),
    )
    .unwrap();
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                for i in 0..per_thread {
                    a.record(use_record(i)).unwrap();
                }
            });
        }
    });
    let secs = start.elapsed().as_secs_f64();
    drop(a);
    let r = audit::verify(&log, with_mac.then_some(&*mac as &dyn TokenMac));
    assert!(r.ok(), "{r}");
    assert_eq!(r.records, threads as u64 * per_thread + u64::from(with_mac));
    (threads as u64 * per_thread) as f64 / secs
}

#[test]
#[ignore = "benchmark: run with --ignored --nocapture (release)"]
fn records_per_second() {
    let n = std::env::var("AUDIT_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let only = std::env::var("AUDIT_BENCH_ONLY").ok();
    for with_mac in [true, false] {
        for threads in [1, 2] {
            let name = format!("{threads},{}", if with_mac { "on" } else { "off" });
            if only.as_ref().is_some_and(|o| *o != name) {
                continue;
            }
            let rate = run(threads, n / threads as u64, with_mac);
            println!(
                "audit bench: {threads} thread(s), token MAC {}: {:>9.0} records/s ({:.2} us/record)",
                if with_mac { "on " } else { "off" },
                rate,
                1e6 / rate
            );
        }
    }
}
