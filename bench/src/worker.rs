//! Worker process: loads one module, runs one case at one thread count, prints one line.

use crate::affinity::{allowed_cpus, pin_current_thread};
use crate::cases::run_thread;
use crate::cli::WorkerOpts;
use crate::timing::{summarize, Phases};
use crate::BenchError;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use std::sync::Barrier;
use std::time::Duration;

/// The environment variable that makes every worker initialize its module with mutexes of
/// its own (the ones cmkp11 gives its backend, `cmkp11::sys::locks`) instead of the
/// module's: with it, B is SoftHSM2 used directly by an application that supplies
/// cmkp11's locking, which separates the cost of forwarding from the effect of the
/// mutexes. (cmkp11 as A accepts the callbacks and keeps its own locking.)
pub const APP_MUTEXES_ENV: &str = "BENCH_APP_MUTEXES";

/// Whether [`APP_MUTEXES_ENV`] is set (to anything but empty or 0).
pub fn app_mutexes() -> bool {
    std::env::var(APP_MUTEXES_ENV).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Loads `module`, initializes it and returns the slot whose token has label `token`.
pub fn open_token(module: &std::path::Path, token: &str) -> Result<(Pkcs11, Slot), BenchError> {
    let ctx = Pkcs11::new(module)
        .map_err(|e| BenchError::msg(format!("loading {}: {e}", module.display())))?;
    if app_mutexes() {
        let rv = cmkp11::sys::locks::initialize_module(module);
        // 0 is CKR_OK.
        if rv != 0 {
            return Err(BenchError::msg(format!(
                "C_Initialize of {} with application mutexes: 0x{rv:x}",
                module.display()
            )));
        }
    } else {
        ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))?;
    }
    for slot in ctx.get_slots_with_token()? {
        if ctx.get_token_info(slot)?.label().trim_end() == token {
            return Ok((ctx, slot));
        }
    }
    Err(BenchError::msg(format!(
        "no token labelled {token:?} in {}",
        module.display()
    )))
}

/// Opens a session and logs the user in (login state is per application).
pub fn login(ctx: &Pkcs11, slot: Slot, pin: &str) -> Result<Session, BenchError> {
    let s = ctx.open_rw_session(slot)?;
    s.login(UserType::User, Some(&AuthPin::from(pin.to_string())))?;
    Ok(s)
}

/// Involuntary context switches of this process so far (other processes took the CPU).
fn involuntary_switches() -> i64 {
    // SAFETY: getrusage fills the zeroed struct it is given.
    unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut ru) == 0 {
            ru.ru_nivcsw
        } else {
            0
        }
    }
}

/// Entry point of `--worker`.
pub fn run_worker(o: &WorkerOpts) -> Result<(), BenchError> {
    let (ctx, slot) = open_token(&o.module, &o.token)?;
    let login_session = login(&ctx, slot, &o.pin)?;
    let phases = Phases {
        barrier: Barrier::new(o.threads),
        warmup: Duration::from_secs_f64(o.warmup),
        measure: Duration::from_secs_f64(o.seconds),
    };
    // One thread has nothing to contend with: leave it to the scheduler (it picks an idle CPU).
    let cpus = if o.pin_threads && o.threads > 1 {
        allowed_cpus()
    } else {
        Vec::new()
    };
    let nivcsw_before = involuntary_switches();
    let samples = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..o.threads)
            .map(|i| {
                let (ctx, phases, cpus) = (&ctx, &phases, &cpus);
                sc.spawn(move || {
                    if !cpus.is_empty() && !pin_current_thread(cpus[i % cpus.len()]) {
                        eprintln!("cmkp11-bench worker: could not pin thread {i}");
                    }
                    match run_thread(ctx, slot, o.case, phases) {
                        Ok(s) => s,
                        Err(e) => {
                            // The other threads may be waiting at a barrier: end the process.
                            eprintln!("cmkp11-bench worker: {} thread {i}: {e}", o.case.name());
                            std::process::exit(1);
                        }
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("worker thread panicked"))
            .collect::<Vec<_>>()
    });
    let nivcsw = involuntary_switches() - nivcsw_before;
    let s = summarize(samples);
    println!(
        "{{\"case\":\"{}\",\"threads\":{},\"ops\":{},\"ops_per_s\":{:.3},\"mean_ops_per_s\":{:.3},\"p50_ns\":{},\"p99_ns\":{},\"nivcsw\":{}}}",
        o.case.name(),
        o.threads,
        s.ops,
        s.ops_per_s,
        s.mean_ops_per_s,
        s.p50_ns,
        s.p99_ns,
        nivcsw
    );
    login_session.logout()?;
    drop(login_session);
    ctx.finalize()?;
    Ok(())
}
