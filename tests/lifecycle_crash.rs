//! Crash safety of the lifecycle steps (DESIGN.md §5): a child process loops through
//! rotate / disable / enable / schedule deletion / cancel / purge on a few CMKs through
//! the module and is killed with SIGKILL at a random instant (0-80 ms after it is ready),
//! many times. After each kill this process re-reads the token (a new login) and checks
//! every CMK:
//! - its state and version count are what the child's last completed step left, or
//!   what the step it was in would have made (old or new, nothing else);
//! - versions are numbered 1..=count with exactly one object each (none lost, none
//!   duplicated), and every handle of the key reports the same state;
//! - every blob wrapped so far (under any version) still unwraps.
//!
//! Some rounds also kill the child while it purges an expired key (its record moved into
//! the past by a SoftHSM2 child): that key must be invisible at once and completely gone
//! after the next logged-in session. A final direct look at the token checks the objects
//! and the state records (one newest generation per key). A rotation killed inside
//! SoftHSM2's two writes of the new object can leave a torn one (no value): the purge of
//! the next read-write login destroys it (`keystore::torn`), so the object count must
//! still equal the version count exactly: any lost or duplicated version fails.
//!
//! `LC_CRASH_SEED` replays a run (the seed is printed); `LC_CRASH_ROUNDS` changes the
//! number of kills (default 50).

#[macro_use]
mod common;
mod lifecycle_support;

use cryptoki_sys::*;
use lifecycle_support::*;
use std::collections::BTreeSet;
use std::io::Read;
use std::time::{Duration, Instant};

/// A tiny deterministic generator (xorshift64*), so a failing run can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What a key looks like from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Model {
    state: CK_ULONG,
    count: CK_ULONG,
}

/// The steps the child takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Rotate,
    Disable,
    Enable,
    Schedule,
    Cancel,
    Purge,
}

impl Step {
    fn name(self) -> &'static str {
        match self {
            Step::Rotate => "rotate",
            Step::Disable => "disable",
            Step::Enable => "enable",
            Step::Schedule => "schedule",
            Step::Cancel => "cancel",
            Step::Purge => "purge",
        }
    }
    fn parse(s: &str) -> Step {
        match s {
            "rotate" => Step::Rotate,
            "disable" => Step::Disable,
            "enable" => Step::Enable,
            "schedule" => Step::Schedule,
            "cancel" => Step::Cancel,
            "purge" => Step::Purge,
            other => panic!("unknown step {other}"),
        }
    }
    /// The model after the step (the caller only takes steps the state allows).
    fn apply(self, m: Model) -> Model {
        match self {
            Step::Rotate => Model {
                count: m.count + 1,
                ..m
            },
            Step::Disable => Model {
                state: STATE_DISABLED,
                ..m
            },
            Step::Enable => Model {
                state: STATE_ENABLED,
                ..m
            },
            Step::Schedule => Model {
                state: STATE_PENDING_DELETION,
                ..m
            },
            Step::Cancel => Model {
                state: STATE_DISABLED,
                ..m
            },
            Step::Purge => m,
        }
    }
    /// A step the state allows, at random.
    fn pick(rng: &mut Rng, state: CK_ULONG) -> Step {
        let r = rng.below(100);
        if r < 8 {
            return Step::Purge;
        }
        match state {
            STATE_ENABLED => match r {
                8..=54 => Step::Rotate,
                55..=74 => Step::Disable,
                _ => Step::Schedule,
            },
            STATE_DISABLED => match r {
                8..=49 => Step::Enable,
                50..=69 => Step::Disable,
                _ => Step::Schedule,
            },
            _ => Step::Cancel,
        }
    }
}

/// Child-process entry point (see `lifecycle_support`); not a test of its own.
#[test]
#[ignore = "entry point of child processes spawned by the other tests"]
fn child_entry() {
    let Some(role) = child_role() else { return };
    if direct_child(&role) {
        return;
    }
    assert_eq!(role, "churn", "unknown child role");
    let m = cmk();
    // Log in through a read-only session; the read-write session shares the login.
    let ro = S::open_ro(m);
    ok(ro.login(), "child: C_Login");
    let s = S::open(m);
    let labels: Vec<String> = arg("LC_LABELS").split(',').map(str::to_string).collect();
    let mut rng = Rng(arg("LC_SEED").parse::<u64>().unwrap() | 1);
    let mut keys = Vec::new();
    for l in &labels {
        let found = ok(s.find_label(l), "child: find");
        assert_eq!(found.len(), 1, "child: `{l}`: {found:?}");
        keys.push((found[0], s.ulong(found[0], CKA_CMKP11_STATE)));
    }
    let mut steps: Vec<Step> = Vec::new();
    if std::env::var("LC_PURGE_FIRST").is_ok() {
        steps.push(Step::Purge);
    }
    say("ready");
    loop {
        let i = rng.below(keys.len() as u64) as usize;
        let (k, state) = keys[i];
        let step = steps.pop().unwrap_or_else(|| Step::pick(&mut rng, state));
        say(&format!("begin {i} {}", step.name()));
        let r = match step {
            Step::Rotate => s.rotate(k),
            Step::Disable => s.disable(k),
            Step::Enable => s.enable(k),
            Step::Schedule => s.schedule_deletion(k, 1 + rng.below(30)),
            Step::Cancel => s.cancel_deletion(k),
            Step::Purge => s.purge(),
        };
        if let Err(e) = r {
            say(&format!(
                "error {i} {}: {}",
                step.name(),
                common::rv_name(e)
            ));
            std::process::exit(3);
        }
        say(&format!("end {i} {}", step.name()));
        keys[i].1 = step.apply(Model { state, count: 0 }).state;
    }
}

struct Key {
    label: String,
    id: Vec<u8>,
    model: Model,
    envelopes: Vec<Envelope>,
}

/// Re-reads the token in this process: a new login, then the operator's purge (which
/// finishes any interrupted one; a login itself never destroys anything).
fn relogin(s: &S) {
    ok(s.logout(), "C_Logout");
    ok(s.login(), "C_Login");
    ok(s.purge(), "CMKP11_Purge");
}

/// Checks one key against the outcomes the child's log allows; returns what it found.
fn check_key(s: &S, k: &Key, allowed: &[Model], round: usize) -> Model {
    let what = format!("round {round}, key `{}`", k.label);
    let found = ok(s.find_label(&k.label), "find by label");
    assert_eq!(found.len(), 1, "{what}: find by label gave {found:?}");
    let h = found[0];
    let got = Model {
        state: s.ulong(h, CKA_CMKP11_STATE),
        count: s.ulong(h, CKA_CMKP11_VERSION_COUNT),
    };
    assert!(
        allowed.contains(&got),
        "{what}: found {got:?}, the child's log allows only {allowed:?}"
    );
    assert_eq!(
        s.ulong(h, CKA_CMKP11_VERSION),
        got.count,
        "{what}: the primary is not the newest version"
    );
    for v in 1..=got.count {
        let vh = ok(s.find_version(&k.label, v), "find version");
        assert_eq!(vh.len(), 1, "{what}: version {v} objects: {vh:?}");
        assert_eq!(s.ulong(vh[0], CKA_CMKP11_VERSION), v);
        assert_eq!(
            s.ulong(vh[0], CKA_CMKP11_STATE),
            got.state,
            "{what}: version {v} reports another state than the key"
        );
    }
    assert!(
        ok(s.find_version(&k.label, got.count + 1), "find").is_empty(),
        "{what}: a version beyond the count"
    );
    got
}

#[test]
fn kill_9_during_lifecycle_steps_loses_nothing() {
    let t0 = Instant::now();
    let seed: u64 = std::env::var("LC_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| unix_ms() as u64);
    let rounds: usize = std::env::var("LC_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    println!("crash test: seed {seed} (LC_CRASH_SEED={seed} replays), {rounds} kills");
    let mut rng = Rng(seed | 1);

    let s = S::user(cmk());
    let mut keys: Vec<Key> = (0..3)
        .map(|i| {
            let label = unique_label(&format!("lc-crash-{i}"));
            let id = label.clone().into_bytes();
            let h = new_cmk(&s, Role::Wrap, &label, Some(&id));
            let envelopes = vec![seal(&s, h, 1)];
            Key {
                label,
                id,
                model: Model {
                    state: STATE_ENABLED,
                    count: 1,
                },
                envelopes,
            }
        })
        .collect();
    let labels: Vec<String> = keys.iter().map(|k| k.label.clone()).collect();
    let mut doomed: Vec<(String, Vec<u8>)> = Vec::new();
    let mut completed_steps = 0usize;
    let mut interrupted: BTreeSet<&'static str> = BTreeSet::new();
    let mut mid_step_kills = 0usize;

    for round in 0..rounds {
        // Every fifth round: an expired key for the child to purge as its first step.
        let purge_round = round % 5 == 2;
        let mut this_doomed = None;
        if purge_round {
            let label = unique_label("lc-crash-doomed");
            let id = label.clone().into_bytes();
            let h = new_cmk(&s, Role::Wrap, &label, Some(&id));
            ok(s.rotate(h), "rotate doomed");
            ok(s.rotate(h), "rotate doomed");
            ok(s.schedule_deletion(h, 1), "schedule doomed");
            expire(&id);
            this_doomed = Some((label.clone(), id.clone()));
            doomed.push((label, id));
        }

        let mut env = vec![
            ("LC_LABELS", labels.join(",")),
            ("LC_SEED", rng.next().to_string()),
        ];
        if purge_round {
            env.push(("LC_PURGE_FIRST", "1".to_string()));
        }
        let (mut child, mut out) = spawn_child("churn", &env);
        wait_line(&mut out, "ready");
        let delay = Duration::from_micros(rng.below(80_000));
        std::thread::sleep(delay);
        child.kill().expect("kill -9 the child");
        let status = child.wait().expect("wait");
        let mut rest = String::new();
        out.read_to_string(&mut rest).expect("read the child's log");
        let log = protocol_lines(&rest);
        assert!(
            !log.iter().any(|l| l.starts_with("error")),
            "round {round}: a step failed in the child: {log:?}"
        );
        assert!(
            status.code().is_none(),
            "round {round}: the child ended by itself ({status}): {log:?}"
        );

        // What the log allows for each key: every completed step applied, and for a step
        // in flight, its before and after.
        let mut in_flight: Vec<Option<Step>> = vec![None; keys.len()];
        for line in &log {
            let parts: Vec<&str> = line.split_whitespace().collect();
            let (i, step) = (parts[1].parse::<usize>().unwrap(), Step::parse(parts[2]));
            match parts[0] {
                "begin" => in_flight[i] = Some(step),
                "end" => {
                    keys[i].model = step.apply(keys[i].model);
                    in_flight[i] = None;
                    completed_steps += 1;
                }
                other => panic!("round {round}: unexpected line {other}"),
            }
        }

        // A purge the child was in must leave the expired key invisible at once.
        if let Some((label, _)) = &this_doomed {
            assert!(
                ok(s.find_label(label), "find doomed").is_empty(),
                "round {round}: an expired key is visible"
            );
        }

        if in_flight.iter().any(Option::is_some) {
            mid_step_kills += 1;
        }
        relogin(&s);
        for (i, k) in keys.iter_mut().enumerate() {
            let mut allowed = vec![k.model];
            if let Some(step) = in_flight[i] {
                interrupted.insert(step.name());
                allowed.push(step.apply(k.model));
            }
            let got = check_key(&s, k, &allowed, round);
            k.model = got;
            // Back to enabled, then every blob so far must unwrap.
            let h = ok(s.find_label(&k.label), "find")[0];
            if k.model.state == STATE_PENDING_DELETION {
                ok(s.cancel_deletion(h), "cancel after the kill");
            }
            if k.model.state != STATE_ENABLED {
                ok(s.enable(h), "enable after the kill");
            }
            k.model.state = STATE_ENABLED;
            for e in &k.envelopes {
                ok(
                    open(&s, h, e),
                    &format!(
                        "round {round}, `{}`: blob made at version {} (now {} versions)",
                        k.label, e.version, k.model.count
                    ),
                );
                let vh = s.version_handle(&k.label, e.version);
                ok(open(&s, vh, e), "blob through its own version");
            }
            k.envelopes.push(seal(&s, h, k.model.count));
        }
        if let Some((label, _)) = &this_doomed {
            assert!(
                ok(s.find_label(label), "find doomed").is_empty(),
                "round {round}: an expired key is visible after a new login"
            );
        }
    }

    // The token itself: expired keys completely gone, live keys with one object per
    // version and one newest state record.
    for (label, id) in &doomed {
        assert_eq!(
            inspect(label, id),
            (0, 0),
            "expired key `{label}` after purges interrupted by kills (keys, records)"
        );
    }
    for k in &keys {
        let lines = inspect_lines(&k.label, &k.id);
        let field = |w: &str| -> String {
            lines
                .iter()
                .find_map(|l| l.strip_prefix(w))
                .unwrap_or_else(|| panic!("inspect: no `{w}` in {lines:?}"))
                .trim()
                .to_string()
        };
        let objects: usize = field("keys ").parse().unwrap();
        assert_eq!(
            objects as CK_ULONG, k.model.count,
            "`{}`: key objects in the token vs versions",
            k.label
        );
        let ids: Vec<String> = field("ids ").split(',').map(str::to_string).collect();
        let unique: BTreeSet<&String> = ids.iter().collect();
        assert_eq!(
            unique.len(),
            ids.len(),
            "`{}`: duplicate CKA_IDs {ids:?}",
            k.label
        );
        let gens: Vec<(u64, u64)> = field("generations ")
            .split(',')
            .filter(|g| !g.is_empty())
            .map(|g| {
                let (a, b) = g.split_once(':').unwrap();
                (a.parse().unwrap(), b.parse().unwrap())
            })
            .collect();
        let newest = gens.iter().max().copied();
        assert!(newest.is_some(), "`{}`: no state record", k.label);
        assert_eq!(
            gens.iter().filter(|g| g.0 == newest.unwrap().0).count(),
            1,
            "`{}`: two records share the newest generation: {gens:?}",
            k.label
        );
    }
    println!(
        "crash test: {rounds} kills ({mid_step_kills} in the middle of a step), {completed_steps} steps completed, steps interrupted: {interrupted:?}, versions {:?}, {} expired keys purged, {:.1} s",
        keys.iter().map(|k| k.model.count).collect::<Vec<_>>(),
        doomed.len(),
        t0.elapsed().as_secs_f64()
    );
    assert!(
        t0.elapsed() < Duration::from_secs(120),
        "the crash test took {:?}",
        t0.elapsed()
    );
}
