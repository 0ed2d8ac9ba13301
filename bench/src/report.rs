//! Parent process: runs the setup and the workers (A and B alternating), prints the report.

use crate::cases::Case;
use crate::cli::ParentOpts;
use crate::timing::{median, RunSummary};
use crate::BenchError;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Goal ratio A/B for a thread count (issue 2, "Done when").
pub fn goal(threads: usize) -> f64 {
    if threads <= 1 {
        0.97
    } else {
        0.95
    }
}

/// Which module a run used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    A,
    B,
}

/// Output of one child process.
struct ChildOutput {
    stdout: String,
    stderr: String,
}

/// Runs this binary with `args`, with a time limit; error on failure or timeout.
fn run_child(args: &[String], limit: Duration, what: &str) -> Result<ChildOutput, BenchError> {
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = t_err.join().unwrap_or_default();
            return Err(BenchError::msg(format!(
                "{what}: no result after {:.0} s, killed; stderr:\n{stderr}",
                limit.as_secs_f64()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = t_out.join().unwrap_or_default();
    let stderr = t_err.join().unwrap_or_default();
    if !status.success() {
        return Err(BenchError::msg(format!(
            "{what}: worker failed ({status}); stderr:\n{}",
            stderr.trim_end()
        )));
    }
    Ok(ChildOutput { stdout, stderr })
}

/// Extracts a numeric field from the worker's one-line JSON.
fn field(line: &str, key: &str) -> Option<f64> {
    let pat = format!("\"{key}\":");
    let start = line.find(&pat)? + pat.len();
    let rest = &line[start..];
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    rest[..end].trim().parse().ok()
}

/// Parses the worker's result line: the summary and the involuntary context switches.
fn parse_result(stdout: &str, case: Case, threads: usize) -> Option<(RunSummary, i64)> {
    let want = format!("{{\"case\":\"{}\",", case.name());
    let line = stdout.lines().rev().find(|l| l.starts_with(&want))?;
    if field(line, "threads")? as usize != threads {
        return None;
    }
    let s = RunSummary {
        ops: field(line, "ops")? as u64,
        ops_per_s: field(line, "ops_per_s")?,
        mean_ops_per_s: field(line, "mean_ops_per_s")?,
        p50_ns: field(line, "p50_ns")? as u32,
        p99_ns: field(line, "p99_ns")? as u32,
    };
    Some((s, field(line, "nivcsw").unwrap_or(0.0) as i64))
}

/// All runs of one case at one thread count.
struct Cell {
    case: Case,
    threads: usize,
    a: Vec<RunSummary>,
    b: Vec<RunSummary>,
    /// First failure of a worker for this cell (the cell is then skipped).
    error: Option<String>,
}

impl Cell {
    fn med(runs: &[RunSummary], f: impl Fn(&RunSummary) -> f64) -> f64 {
        median(&runs.iter().map(f).collect::<Vec<_>>())
    }
    fn ops(&self, side: Side) -> f64 {
        Self::med(self.side(side), |r| r.ops_per_s)
    }
    fn p50_us(&self, side: Side) -> f64 {
        Self::med(self.side(side), |r| r.p50_ns as f64 / 1000.0)
    }
    fn p99_us(&self, side: Side) -> f64 {
        Self::med(self.side(side), |r| r.p99_ns as f64 / 1000.0)
    }
    fn side(&self, side: Side) -> &[RunSummary] {
        match side {
            Side::A => &self.a,
            Side::B => &self.b,
        }
    }
    /// Ratio of the medians (the figure the goals are about).
    fn ratio(&self) -> f64 {
        self.ops(Side::A) / self.ops(Side::B)
    }
    /// Speed ratio from the median latencies (B p50 / A p50; above 1 means A is faster).
    /// Far less sensitive to load from other processes than throughput.
    fn p50_ratio(&self) -> f64 {
        self.p50_us(Side::B) / self.p50_us(Side::A)
    }
    /// 95% bootstrap interval of `ratio()`: rounds of A and of B resampled with replacement
    /// (deterministic generator, so a report can be reproduced from its runs).
    fn ratio_ci(&self) -> (f64, f64) {
        const RESAMPLES: usize = 2000;
        let a: Vec<f64> = self.a.iter().map(|r| r.ops_per_s).collect();
        let b: Vec<f64> = self.b.iter().map(|r| r.ops_per_s).collect();
        if a.is_empty() || b.is_empty() {
            return (f64::NAN, f64::NAN);
        }
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let mut draw = |v: &[f64], buf: &mut Vec<f64>| {
            buf.clear();
            for _ in 0..v.len() {
                buf.push(v[(rng.next() % v.len() as u64) as usize]);
            }
            median(buf)
        };
        let (mut ba, mut bb) = (Vec::new(), Vec::new());
        let mut ratios: Vec<f64> = (0..RESAMPLES)
            .map(|_| draw(&a, &mut ba) / draw(&b, &mut bb))
            .collect();
        ratios.sort_by(|x, y| x.total_cmp(y));
        let at = |q: f64| ratios[((q * RESAMPLES as f64) as usize).min(RESAMPLES - 1)];
        (at(0.025), at(0.975))
    }
}

/// Small deterministic generator for the bootstrap (xorshift64).
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn fmt_ops(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.1}")
    }
}

fn fmt_us(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

fn check_file(p: &Path, what: &str) -> Result<(), BenchError> {
    if !p.is_file() {
        return Err(BenchError::msg(format!(
            "{what} {}: no such file",
            p.display()
        )));
    }
    Ok(())
}

/// Entry point of the parent process.
pub fn run_parent(o: &ParentOpts) -> Result<(), BenchError> {
    check_file(&o.module_a, "--module-a")?;
    check_file(&o.module_b, "--module-b")?;
    if std::env::var_os("SOFTHSM2_CONF").is_none() {
        return Err(BenchError::msg(
            "SOFTHSM2_CONF is not set (it must name the SoftHSM2 config of the token; see --help)",
        ));
    }
    if std::env::var_os("CMKP11_CONFIG").is_none() {
        eprintln!(
            "cmkp11-bench: warning: CMKP11_CONFIG is not set; cmkp11 (if A or B is cmkp11) will \
             use its default config"
        );
    }
    let common = |module: &Path| -> Vec<String> {
        vec![
            "--module".into(),
            module.display().to_string(),
            "--pin".into(),
            o.pin.clone(),
            "--token".into(),
            o.token.clone(),
        ]
    };

    // Setup (through A by default): creates what is missing, by label.
    let mut args = vec!["--setup".to_string()];
    args.extend(common(if o.setup_via_a {
        &o.module_a
    } else {
        &o.module_b
    }));
    let out = run_child(&args, Duration::from_secs(300), "setup")?;
    eprint!("{}", out.stderr);

    let mut cells: Vec<Cell> = Vec::new();
    for &t in &o.threads {
        for &c in &o.cases {
            cells.push(Cell {
                case: c,
                threads: t,
                a: Vec::new(),
                b: Vec::new(),
                error: None,
            });
        }
    }
    let total = cells.len() * o.rounds * 2;
    let limit = Duration::from_secs_f64(o.seconds + o.warmup + 120.0);
    let load_start = loadavg();
    let mut preempted = [0i64; 2];
    let started = Instant::now();
    let mut done = 0usize;
    let mut seen_stderr: Vec<String> = Vec::new();
    for round in 0..o.rounds {
        for cell in cells.iter_mut() {
            // Counterbalanced order: A,B in even rounds, B,A in odd rounds.
            let order = if round % 2 == 0 {
                [Side::A, Side::B]
            } else {
                [Side::B, Side::A]
            };
            for side in order {
                if cell.error.is_some() {
                    done += 1;
                    continue;
                }
                let (module, name) = match side {
                    Side::A => (&o.module_a, &o.name_a),
                    Side::B => (&o.module_b, &o.name_b),
                };
                let mut args = vec!["--worker".to_string()];
                args.extend(common(module));
                args.extend([
                    "--case".into(),
                    cell.case.name().into(),
                    "--threads".into(),
                    cell.threads.to_string(),
                    "--seconds".into(),
                    o.seconds.to_string(),
                    "--warmup".into(),
                    o.warmup.to_string(),
                ]);
                if !o.pin_threads {
                    args.push("--no-pin".into());
                }
                let what = format!("{} {} threads={}", name, cell.case.name(), cell.threads);
                let run = run_child(&args, limit, &what).and_then(|out| {
                    let parsed = parse_result(&out.stdout, cell.case, cell.threads);
                    let parsed = parsed.ok_or_else(|| {
                        BenchError::msg(format!("{what}: no result line in:\n{}", out.stdout))
                    })?;
                    Ok((out, parsed))
                });
                let (out, (r, nivcsw)) = match run {
                    Ok(x) => x,
                    Err(e) => {
                        // Report it, skip the rest of this cell, go on with the others.
                        eprintln!("cmkp11-bench: {e}");
                        cell.error = Some(e.to_string());
                        done += 1;
                        continue;
                    }
                };
                let err = out.stderr.trim();
                if !err.is_empty() && !seen_stderr.iter().any(|s| s == err) {
                    eprintln!("cmkp11-bench: [{what}] stderr (shown once):\n{err}");
                    seen_stderr.push(err.to_string());
                }
                done += 1;
                eprintln!(
                    "[{done:>3}/{total}] round {}/{} {:<20} t={} {:<9} {:>10.0} ops/s (plain {:>10.0})  p50 {:>8.1} us  p99 {:>8.1} us  preempted {:>4}  ({:.0} s)",
                    round + 1,
                    o.rounds,
                    cell.case.name(),
                    cell.threads,
                    name,
                    r.ops_per_s,
                    r.mean_ops_per_s,
                    r.p50_ns as f64 / 1e3,
                    r.p99_ns as f64 / 1e3,
                    nivcsw,
                    started.elapsed().as_secs_f64()
                );
                match side {
                    Side::A => cell.a.push(r),
                    Side::B => cell.b.push(r),
                }
                preempted[side as usize] += nivcsw;
            }
        }
    }
    let conditions = format!(
        "Load average (1/5/15 min) at start {load_start}, at end {}; involuntary context \
         switches of the workers (other processes took their CPU): {} {}, {} {}.",
        loadavg(),
        o.name_a,
        preempted[0],
        o.name_b,
        preempted[1]
    );
    print_report(o, &cells, started.elapsed(), &conditions);
    let failed: Vec<String> = cells
        .iter()
        .filter(|c| c.error.is_some())
        .map(|c| format!("{} threads={}", c.case.name(), c.threads))
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(BenchError::msg(format!(
            "{} case(s) failed: {}",
            failed.len(),
            failed.join(", ")
        )))
    }
}

/// The first three fields of /proc/loadavg (or "?").
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "?".into())
}

fn print_report(o: &ParentOpts, cells: &[Cell], took: Duration, conditions: &str) {
    let (na, nb) = (&o.name_a, &o.name_b);
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    println!();
    println!("### cmkp11-bench: {na} (A) vs {nb} (B)");
    println!();
    println!(
        "A = `{}`, B = `{}`, token `{}`. {} rounds x {} s per side and case (warm-up {} s), \
         alternating A,B / B,A; each run in its own process; {} CPUs; total {:.0} s. \
         ops/s of one run = median over {} time slices of the calls per busy second (summed \
         over threads); the table gives medians over rounds; ratio = median A ops/s / median B \
         ops/s; \"95% CI\" = bootstrap interval of that ratio over the rounds (its width is the \
         noise of this run); \"p50 ratio\" = B p50 / A p50, the same comparison from median \
         latencies, which load from other processes disturbs far less than throughput.{} \
         {conditions}",
        o.module_a.display(),
        o.module_b.display(),
        o.token,
        o.rounds,
        o.seconds,
        o.warmup,
        cpus,
        took.as_secs_f64(),
        crate::timing::SLICES,
        if crate::worker::app_mutexes() {
            " Every module was initialized with application-supplied mutexes (cmkp11's, \
             `BENCH_APP_MUTEXES`): B is SoftHSM2 directly with the locking cmkp11 gives it."
        } else {
            ""
        }
    );
    println!();
    println!(
        "| case | threads | {na} ops/s | {nb} ops/s | ratio A/B | 95% CI | p50 ratio | {na} p50 µs | {nb} p50 µs | {na} p99 µs | {nb} p99 µs |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for c in cells {
        if let Some(e) = &c.error {
            let first = e.lines().last().unwrap_or("").trim();
            let first: String = first.chars().take(100).collect();
            println!(
                "| {} | {} | FAILED: {} | | | | | | | | |",
                c.case.name(),
                c.threads,
                first.replace('|', "/")
            );
            continue;
        }
        let (lo, hi) = c.ratio_ci();
        println!(
            "| {} | {} | {} | {} | **{:.3}** | {:.2}..{:.2} | {:.3} | {} | {} | {} | {} |",
            c.case.name(),
            c.threads,
            fmt_ops(c.ops(Side::A)),
            fmt_ops(c.ops(Side::B)),
            c.ratio(),
            lo,
            hi,
            c.p50_ratio(),
            fmt_us(c.p50_us(Side::A)),
            fmt_us(c.p50_us(Side::B)),
            fmt_us(c.p99_us(Side::A)),
            fmt_us(c.p99_us(Side::B)),
        );
    }
    println!();
    let goals: Vec<String> = o
        .threads
        .iter()
        .map(|&t| {
            format!(
                ">= {:.2} at {t} thread{}",
                goal(t),
                if t == 1 { "" } else { "s" }
            )
        })
        .collect();
    println!("Goals ({}):", goals.join(", "));
    println!();
    let mut all_ok = true;
    for &case in &o.cases {
        let mut parts = Vec::new();
        let mut ok = true;
        for c in cells.iter().filter(|c| c.case == case) {
            if c.error.is_some() {
                ok = false;
                parts.push(format!("{} thr FAILED", c.threads));
                continue;
            }
            let r = c.ratio();
            let g = goal(c.threads);
            let pass = r >= g;
            let (lo, hi) = c.ratio_ci();
            let verdict = match (pass, lo >= g, hi < g) {
                (true, true, _) => "ok",
                (true, false, _) => "ok (CI reaches below the goal)",
                (false, _, true) => "BELOW",
                (false, _, false) => "BELOW (CI reaches the goal)",
            };
            ok &= pass;
            parts.push(format!(
                "{} thr {:.3} {} [p50 ratio {:.3}]",
                c.threads,
                r,
                verdict,
                c.p50_ratio()
            ));
        }
        all_ok &= ok;
        println!(
            "- {}: {} -> {}",
            case.name(),
            parts.join(", "),
            if ok {
                "meets the goals"
            } else {
                "DOES NOT meet the goals"
            }
        );
    }
    println!();
    println!(
        "Overall: {}",
        if all_ok {
            "every case meets the goals"
        } else {
            "at least one case is below its goal"
        }
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_worker_line() {
        let out = "noise\n{\"case\":\"aes-keygen\",\"threads\":2,\"ops\":10,\"ops_per_s\":123.500,\"mean_ops_per_s\":120.000,\"p50_ns\":7,\"p99_ns\":9,\"nivcsw\":3}\n";
        let (r, nivcsw) = parse_result(out, Case::AesKeygen, 2).unwrap();
        assert_eq!(nivcsw, 3);
        assert_eq!(r.ops, 10);
        assert_eq!(r.ops_per_s, 123.5);
        assert_eq!(r.mean_ops_per_s, 120.0);
        assert_eq!((r.p50_ns, r.p99_ns), (7, 9));
        assert!(parse_result(out, Case::AesKeygen, 1).is_none());
        assert!(parse_result(out, Case::FindByLabel, 2).is_none());
    }

    #[test]
    fn goals_per_thread_count() {
        assert_eq!(goal(1), 0.97);
        assert_eq!(goal(2), 0.95);
    }

    #[test]
    fn ratio_and_range() {
        let r = |x: f64| RunSummary {
            ops: 1,
            ops_per_s: x,
            mean_ops_per_s: x,
            p50_ns: 1,
            p99_ns: 1,
        };
        let c = Cell {
            case: Case::AesKeygen,
            threads: 1,
            a: vec![r(90.0), r(100.0), r(95.0)],
            b: vec![r(100.0), r(100.0), r(100.0)],
            error: None,
        };
        assert!((c.ratio() - 0.95).abs() < 1e-12);
        let (lo, hi) = c.ratio_ci();
        assert!(lo >= 0.9 - 1e-12 && hi <= 1.0 + 1e-12 && lo <= 0.95 && hi >= 0.95);
        assert_eq!(c.ratio_ci(), (lo, hi), "deterministic");
        assert_eq!(c.p50_ratio(), 1.0);
    }
}
