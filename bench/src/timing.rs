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

/// Number of equal time slices the measured window is cut into.
pub const SLICES: usize = 10;

/// Calls and busy time of one thread within one time slice.
#[derive(Debug, Default, Clone, Copy)]
pub struct Slice {
    /// Timed calls that ended in this slice.
    pub calls: u64,
    /// Sum of their latencies, in nanoseconds.
    pub busy_ns: u64,
}

/// What one thread measured.
#[derive(Debug, Default)]
pub struct ThreadSamples {
    /// Latency of every timed call, in nanoseconds (saturating at u32::MAX, ~4.3 s).
    pub lat_ns: Vec<u32>,
    /// Sum of the latencies, in nanoseconds.
    pub busy_ns: u64,
    /// Per time slice of the measured window (`SLICES` entries).
    pub slices: Vec<Slice>,
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
    let mut slices = vec![Slice::default(); SLICES];
    let slice_len = phases.measure / SLICES as u32;

    phases.barrier.wait();
    let start = Instant::now();
    let deadline = start + phases.measure;
    let mut slice = 0usize;
    let mut slice_end = start + slice_len;
    loop {
        let t0 = Instant::now();
        let r = op();
        let t1 = Instant::now();
        let r = r?;
        let ns = u32::try_from((t1 - t0).as_nanos()).unwrap_or(u32::MAX);
        lat_ns.push(ns);
        busy_ns += u64::from(ns);
        while t1 >= slice_end && slice + 1 < SLICES {
            slice += 1;
            slice_end += slice_len;
        }
        slices[slice].calls += 1;
        slices[slice].busy_ns += u64::from(ns);
        check(r)?;
        if t1 >= deadline {
            break;
        }
    }
    Ok(ThreadSamples {
        lat_ns,
        busy_ns,
        slices,
    })
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
    /// Robust throughput: median over the time slices of (sum over threads of calls / busy
    /// seconds in that slice). A burst of interference from other processes (a pinned thread
    /// preempted for milliseconds) spoils a few slices, not the figure.
    pub ops_per_s: f64,
    /// Plain throughput: sum over threads of calls / busy seconds over the whole window.
    pub mean_ops_per_s: f64,
    /// Median latency, nanoseconds, all threads pooled.
    pub p50_ns: u32,
    /// 99th percentile latency, nanoseconds, all threads pooled.
    pub p99_ns: u32,
}

/// Pools the samples of all threads of one run.
pub fn summarize(threads: Vec<ThreadSamples>) -> RunSummary {
    let rate = |calls: u64, busy_ns: u64| {
        if busy_ns > 0 {
            calls as f64 / (busy_ns as f64 / 1e9)
        } else {
            0.0
        }
    };
    let n_slices = threads.iter().map(|t| t.slices.len()).max().unwrap_or(0);
    let slice_rates: Vec<f64> = (0..n_slices)
        .map(|i| {
            threads
                .iter()
                .filter_map(|t| t.slices.get(i))
                .map(|s| rate(s.calls, s.busy_ns))
                .sum()
        })
        .collect();
    let mut mean_ops_per_s = 0.0;
    let mut all: Vec<u32> = Vec::with_capacity(threads.iter().map(|t| t.lat_ns.len()).sum());
    for t in threads {
        mean_ops_per_s += rate(t.lat_ns.len() as u64, t.busy_ns);
        all.extend_from_slice(&t.lat_ns);
    }
    all.sort_unstable();
    RunSummary {
        ops: all.len() as u64,
        ops_per_s: if slice_rates.is_empty() {
            mean_ops_per_s
        } else {
            median(&slice_rates)
        },
        mean_ops_per_s,
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
    fn slice_median_ignores_a_burst() {
        // 3 slices at 1 call/us, one slice where a call took 1 ms (preempted).
        let mut slices = vec![
            Slice {
                calls: 100,
                busy_ns: 100_000,
            };
            3
        ];
        slices.push(Slice {
            calls: 100,
            busy_ns: 99_000 + 1_000_000,
        });
        let t = ThreadSamples {
            lat_ns: vec![1_000; 400],
            busy_ns: 1_399_000,
            slices,
        };
        let s = summarize(vec![t]);
        assert!((s.ops_per_s - 1_000_000.0).abs() < 1e-6);
        assert!(s.mean_ops_per_s < 300_000.0);
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
            slices: vec![],
        };
        let b = ThreadSamples {
            lat_ns: vec![2_000; 5],
            busy_ns: 10_000,
            slices: vec![],
        };
        let s = summarize(vec![a, b]);
        assert_eq!(s.ops, 15);
        assert!((s.ops_per_s - 1_500_000.0).abs() < 1e-6);
        assert!((s.mean_ops_per_s - 1_500_000.0).abs() < 1e-6);
    }
}
