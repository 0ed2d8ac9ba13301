//! The timed loop shared by every case, and the statistics over its samples.

use crate::BenchError;
use std::sync::Barrier;
use std::time::{Duration, Instant};

/// Phase timing shared by the threads of one worker.
#[derive(Debug)]
pub struct Phases {
    /// All threads meet here after preparing, and again after warming up.
    pub barrier: Barrier,
    /// Unmeasured warm-up time.
    pub warmup: Duration,
    /// Measured time.
    pub measure: Duration,
}

/// What one thread measured.
#[derive(Debug, Default)]
pub struct ThreadSamples {
    /// Latency of every timed call, in nanoseconds (saturating at u32::MAX, ~4.3 s).
    pub lat_ns: Vec<u32>,
    /// Sum of the latencies, in nanoseconds.
    pub busy_ns: u64,
}

/// Fewest warm-up calls, whatever the warm-up time.
const MIN_WARMUP_CALLS: u64 = 3;

/// Runs `op` repeatedly: warm-up, then the measured window.
///
/// Only `op` is inside the timed region. `check` receives its result outside the timed region
/// (verifies it, destroys generated objects, drops buffers), so result checking and cleanup
/// never count. The latency buffer is allocated before the measured window, sized from the
/// rate seen during warm-up, so the loop itself does not allocate.
pub fn drive<T, F, C>(phases: &Phases, mut op: F, mut check: C) -> Result<ThreadSamples, BenchError>
where
    F: FnMut() -> cryptoki::error::Result<T>,
    C: FnMut(T) -> Result<(), BenchError>,
{
    phases.barrier.wait();

    // Warm-up: same calls, not recorded; also estimates the rate to size the buffer.
    let warm_start = Instant::now();
    let warm_end = warm_start + phases.warmup;
    let mut warm_calls: u64 = 0;
    let mut warm_busy = Duration::ZERO;
    loop {
        let t0 = Instant::now();
        let r = op()?;
        let t1 = Instant::now();
        warm_busy += t1 - t0;
        check(r)?;
        warm_calls += 1;
        if t1 >= warm_end && warm_calls >= MIN_WARMUP_CALLS {
            break;
        }
    }
    let per_call = warm_busy.as_secs_f64() / warm_calls as f64;
    let expected = phases.measure.as_secs_f64() / per_call.max(1e-7);
    let capacity = (expected * 1.5) as usize + 1024;
    let mut lat_ns: Vec<u32> = Vec::with_capacity(capacity);
    let mut busy_ns: u64 = 0;

    phases.barrier.wait();
    let deadline = Instant::now() + phases.measure;
    loop {
        let t0 = Instant::now();
        let r = op();
        let t1 = Instant::now();
        let r = r?;
        let ns = u32::try_from((t1 - t0).as_nanos()).unwrap_or(u32::MAX);
        lat_ns.push(ns);
        busy_ns += u64::from(ns);
        check(r)?;
        if t1 >= deadline {
            break;
        }
    }
    Ok(ThreadSamples { lat_ns, busy_ns })
}

/// Nearest-rank percentile `p` (0..=1) of sorted samples.
pub fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Median of a list of values (mean of the two middle values for even lengths).
pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Summary of one worker run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunSummary {
    /// Timed calls, all threads.
    pub ops: u64,
    /// Sum over threads of calls / busy seconds.
    pub ops_per_s: f64,
    /// Median latency, nanoseconds, all threads pooled.
    pub p50_ns: u32,
    /// 99th percentile latency, nanoseconds, all threads pooled.
    pub p99_ns: u32,
}

/// Pools the samples of all threads of one run.
pub fn summarize(threads: Vec<ThreadSamples>) -> RunSummary {
    let mut ops_per_s = 0.0;
    let mut all: Vec<u32> = Vec::with_capacity(threads.iter().map(|t| t.lat_ns.len()).sum());
    for t in threads {
        if t.busy_ns > 0 {
            ops_per_s += t.lat_ns.len() as f64 / (t.busy_ns as f64 / 1e9);
        }
        all.extend_from_slice(&t.lat_ns);
    }
    all.sort_unstable();
    RunSummary {
        ops: all.len() as u64,
        ops_per_s,
        p50_ns: percentile(&all, 0.50),
        p99_ns: percentile(&all, 0.99),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_nearest_rank() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.50), 50);
        assert_eq!(percentile(&v, 0.99), 99);
        assert_eq!(percentile(&v, 1.0), 100);
        assert_eq!(percentile(&[7], 0.99), 7);
        assert_eq!(percentile(&[], 0.5), 0);
    }

    #[test]
    fn median_odd_even() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn summarize_sums_per_thread_rates() {
        let a = ThreadSamples {
            lat_ns: vec![1_000; 10],
            busy_ns: 10_000,
        };
        let b = ThreadSamples {
            lat_ns: vec![2_000; 5],
            busy_ns: 10_000,
        };
        let s = summarize(vec![a, b]);
        assert_eq!(s.ops, 15);
        assert!((s.ops_per_s - 1_500_000.0).abs() < 1e-6);
        assert_eq!(s.p50_ns, 1_000);
        assert_eq!(s.p99_ns, 2_000);
    }
}
