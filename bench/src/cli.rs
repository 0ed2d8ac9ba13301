//! Command-line parsing (hand-written: the bench has few options and no other dependencies).

use crate::cases::Case;
use std::path::PathBuf;

/// Text printed by `--help`.
pub const HELP: &str = "\
cmkp11-bench: A/B benchmark of a PKCS#11 module (A, normally libcmkp11.so) against the
backend token's module used directly (B, normally SoftHSM2), over the same token.

USAGE:
  cmkp11-bench --module-a PATH --module-b PATH --pin PIN --token LABEL
               [--rounds N] [--seconds S] [--warmup S] [--threads 1,2] [--cases a,b,c]

OPTIONS:
  --module-a PATH   module under test (e.g. target/release/libcmkp11.so)
  --module-b PATH   reference module (e.g. /usr/lib/softhsm/libsofthsm2.so)
  --pin PIN         user PIN of the token
  --token LABEL     label of the token (as seen by both modules)
  --rounds N        rounds per case and thread count, >= 5 recommended (default 5)
  --seconds S       measured seconds per run (default 1)
  --warmup S        unmeasured warm-up seconds per run (default 0.25)
  --threads LIST    thread counts, comma separated (default 1,2)
  --cases LIST      cases, comma separated (default: all)
  --name-a NAME     name of A in the report (default cmkp11)
  --name-b NAME     name of B in the report (default softhsm2)
  --setup-via a|b   module that creates the token objects (default a: keys made through
                    cmkp11 carry its metadata and pass its policy; B uses them as they are)
  --no-pin          do not pin worker thread i to CPU i (pinning is the default; see below)
  -h, --help        this text

CASES:
  aes-gcm-4k-encrypt, aes-gcm-4k-decrypt, aes-kwp-wrap, aes-kwp-unwrap, aes-keygen,
  rsa2048-sign, ecdsa-p256-sign, find-by-label, open-close-session
  The keys the cases create state every usage flag (encrypt/decrypt only), so that both
  modules make the same key.
  extra (only when named): aes-kwp-unwrap-partial, aes-keygen-partial (templates silent on
  SIGN, VERIFY, WRAP, UNWRAP, DERIVE: SoftHSM2 directly then makes a key that can also
  wrap, unwrap, sign and verify, cmkp11 completes the template; the ratio includes the
  token's cost of the five attributes)

ENVIRONMENT (set by the caller, inherited by every worker):
  SOFTHSM2_CONF     SoftHSM2 configuration naming the token directory (required)
  CMKP11_CONFIG     cmkp11 configuration (TOML, mode 600) whose [backend] module is the
                    same SoftHSM2 library as --module-b (required when A is cmkp11)

METHOD:
  A setup worker (through A by default) creates the token objects once, by label
  (idempotent). Then, for each round, thread count and case, one child process (this
  binary with --worker) runs A and one runs B, A,B in even rounds and B,A in odd rounds.
  A worker loads one module, logs in once, gives every thread its own session (with 2+
  threads, thread i is pinned to allowed CPU i mod n, so they always run in parallel),
  warms up, then times every call with Instant into a preallocated buffer. Cleanup
  (destroying generated keys, checking results) is not timed.
  ops/s of a run: the measured window is cut into 10 slices; per slice, the sum over
  threads of calls / time spent inside the timed calls; the run's figure is the median
  over slices (a burst of load from other processes spoils a slice, not the run); the
  plain whole-window figure is reported too.
  The report gives, per case and thread count, the medians over rounds of ops/s, p50 and
  p99 for A and B, the ratio A/B of the median ops/s, and a bootstrap 95% interval of that
  ratio (the noise of this run), the p50 ratio (B p50 / A p50: the same comparison from
  median latencies, which load from other processes disturbs far less), then one verdict
  line per case against the goals (>= 0.97 at 1 thread, >= 0.95 at 2+ threads).
  Exit status: 0 whatever the ratios; 1 if a worker failed (the other cases still run and
  the failed ones show as FAILED); 2 on bad arguments.

  scripts/bench.sh builds everything, creates a private token and runs this binary.
";

/// Options of the parent (orchestrating) process.
#[derive(Debug, Clone)]
pub struct ParentOpts {
    pub module_a: PathBuf,
    pub module_b: PathBuf,
    pub name_a: String,
    pub name_b: String,
    pub pin: String,
    pub token: String,
    pub rounds: usize,
    pub seconds: f64,
    pub warmup: f64,
    pub threads: Vec<usize>,
    pub cases: Vec<Case>,
    pub pin_threads: bool,
    /// Create the token objects through A (true) or B (false).
    pub setup_via_a: bool,
}

/// Options of a worker process (one module, one case, one thread count).
#[derive(Debug, Clone)]
pub struct WorkerOpts {
    pub module: PathBuf,
    pub pin: String,
    pub token: String,
    pub case: Case,
    pub threads: usize,
    pub seconds: f64,
    pub warmup: f64,
    pub pin_threads: bool,
}

/// Options of the setup process (creates the token objects).
#[derive(Debug, Clone)]
pub struct SetupOpts {
    pub module: PathBuf,
    pub pin: String,
    pub token: String,
}

/// What this process has to do.
#[derive(Debug)]
pub enum Mode {
    Help,
    Parent(ParentOpts),
    Worker(WorkerOpts),
    Setup(SetupOpts),
}

#[derive(Default)]
struct Raw {
    worker: bool,
    setup: bool,
    help: bool,
    no_pin: bool,
    module: Option<String>,
    module_a: Option<String>,
    module_b: Option<String>,
    name_a: Option<String>,
    name_b: Option<String>,
    pin: Option<String>,
    token: Option<String>,
    case: Option<String>,
    cases: Option<String>,
    threads: Option<String>,
    rounds: Option<String>,
    seconds: Option<String>,
    warmup: Option<String>,
    setup_via: Option<String>,
}

fn need(v: Option<String>, name: &str) -> Result<String, String> {
    v.ok_or_else(|| format!("missing {name} (see --help)"))
}

fn parse_f64(v: Option<String>, name: &str, default: f64) -> Result<f64, String> {
    match v {
        None => Ok(default),
        Some(s) => match s.parse::<f64>() {
            Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
            _ => Err(format!("{name}: not a non-negative number: {s:?}")),
        },
    }
}

fn parse_usize_list(s: &str, name: &str) -> Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        match part.trim().parse::<usize>() {
            Ok(n) if n >= 1 => out.push(n),
            _ => return Err(format!("{name}: not a positive integer: {part:?}")),
        }
    }
    if out.is_empty() {
        return Err(format!("{name}: empty list"));
    }
    Ok(out)
}

/// Parses the process arguments (without argv\[0\]).
pub fn parse(args: &[String]) -> Result<Mode, String> {
    let mut raw = Raw::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = |name: &str| -> Result<String, String> {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match a.as_str() {
            "-h" | "--help" => raw.help = true,
            "--worker" => raw.worker = true,
            "--setup" => raw.setup = true,
            "--no-pin" => raw.no_pin = true,
            "--module" => raw.module = Some(val(a)?),
            "--module-a" => raw.module_a = Some(val(a)?),
            "--module-b" => raw.module_b = Some(val(a)?),
            "--name-a" => raw.name_a = Some(val(a)?),
            "--name-b" => raw.name_b = Some(val(a)?),
            "--pin" => raw.pin = Some(val(a)?),
            "--token" => raw.token = Some(val(a)?),
            "--case" => raw.case = Some(val(a)?),
            "--cases" => raw.cases = Some(val(a)?),
            "--threads" => raw.threads = Some(val(a)?),
            "--rounds" => raw.rounds = Some(val(a)?),
            "--seconds" => raw.seconds = Some(val(a)?),
            "--warmup" => raw.warmup = Some(val(a)?),
            "--setup-via" => raw.setup_via = Some(val(a)?),
            other => return Err(format!("unknown argument {other:?} (see --help)")),
        }
    }
    if raw.help {
        return Ok(Mode::Help);
    }
    let seconds = parse_f64(raw.seconds, "--seconds", 1.0)?;
    let warmup = parse_f64(raw.warmup, "--warmup", 0.25)?;
    if seconds <= 0.0 {
        return Err("--seconds must be > 0".into());
    }
    if raw.setup {
        return Ok(Mode::Setup(SetupOpts {
            module: need(raw.module, "--module")?.into(),
            pin: need(raw.pin, "--pin")?,
            token: need(raw.token, "--token")?,
        }));
    }
    if raw.worker {
        let case_name = need(raw.case, "--case")?;
        let case = Case::from_name(&case_name).ok_or(format!("unknown case {case_name:?}"))?;
        let threads = parse_usize_list(&need(raw.threads, "--threads")?, "--threads")?;
        if threads.len() != 1 {
            return Err("--worker takes exactly one thread count".into());
        }
        return Ok(Mode::Worker(WorkerOpts {
            module: need(raw.module, "--module")?.into(),
            pin: need(raw.pin, "--pin")?,
            token: need(raw.token, "--token")?,
            case,
            threads: threads[0],
            seconds,
            warmup,
            pin_threads: !raw.no_pin,
        }));
    }
    let cases = match raw.cases {
        None => Case::ALL.to_vec(),
        Some(s) => {
            let mut v = Vec::new();
            for n in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                v.push(Case::from_name(n).ok_or(format!("unknown case {n:?}"))?);
            }
            if v.is_empty() {
                return Err("--cases: empty list".into());
            }
            v
        }
    };
    let rounds = match raw.rounds {
        None => 5,
        Some(s) => match s.parse::<usize>() {
            Ok(n) if n >= 1 => n,
            _ => return Err(format!("--rounds: not a positive integer: {s:?}")),
        },
    };
    let setup_via_a = match raw.setup_via.as_deref() {
        None | Some("a") | Some("A") => true,
        Some("b") | Some("B") => false,
        Some(x) => return Err(format!("--setup-via: a or b, not {x:?}")),
    };
    Ok(Mode::Parent(ParentOpts {
        module_a: need(raw.module_a, "--module-a")?.into(),
        module_b: need(raw.module_b, "--module-b")?.into(),
        name_a: raw.name_a.unwrap_or_else(|| "cmkp11".into()),
        name_b: raw.name_b.unwrap_or_else(|| "softhsm2".into()),
        pin: need(raw.pin, "--pin")?,
        token: need(raw.token, "--token")?,
        rounds,
        seconds,
        warmup,
        threads: parse_usize_list(raw.threads.as_deref().unwrap_or("1,2"), "--threads")?,
        cases,
        pin_threads: !raw.no_pin,
        setup_via_a,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn parent_defaults() {
        let m = parse(&s(&[
            "--module-a",
            "a.so",
            "--module-b",
            "b.so",
            "--pin",
            "1234",
            "--token",
            "t",
        ]))
        .unwrap();
        let Mode::Parent(p) = m else {
            panic!("not parent")
        };
        assert_eq!(p.rounds, 5);
        assert_eq!(p.threads, vec![1, 2]);
        assert_eq!(p.cases.len(), Case::ALL.len());
        assert_eq!(p.seconds, 1.0);
    }

    #[test]
    fn rejects_unknown_case_and_bad_threads() {
        let base = [
            "--module-a",
            "a",
            "--module-b",
            "b",
            "--pin",
            "1",
            "--token",
            "t",
        ];
        let mut a = s(&base);
        a.extend(s(&["--cases", "nope"]));
        assert!(parse(&a).is_err());
        let mut b = s(&base);
        b.extend(s(&["--threads", "0"]));
        assert!(parse(&b).is_err());
        assert!(parse(&s(&["--bogus"])).is_err());
    }

    #[test]
    fn worker_mode() {
        let m = parse(&s(&[
            "--worker",
            "--module",
            "m.so",
            "--case",
            "aes-keygen",
            "--threads",
            "2",
            "--seconds",
            "0.5",
            "--pin",
            "1",
            "--token",
            "t",
        ]))
        .unwrap();
        let Mode::Worker(w) = m else {
            panic!("not worker")
        };
        assert_eq!(w.case, Case::AesKeygen);
        assert_eq!(w.threads, 2);
        assert_eq!(w.seconds, 0.5);
    }
}
