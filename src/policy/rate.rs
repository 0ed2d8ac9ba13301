//! Rate limits (`[[rate_limit]]`): at most `per_minute` uses of a CMK for the listed
//! operations, per key and per client uid (in the daemon, the kernel-attested uid of the
//! application; in library mode, the process's own), to slow down a bulk exfiltration
//! through a key an application may legitimately use (decrypt everything, unwrap every
//! DEK).
//!
//! Each (rule, key, uid) has a token bucket of `per_minute` uses that refills at
//! `per_minute / 60` per second: a burst of `per_minute` uses, then one use every
//! `60 / per_minute` seconds. A use that any matching rule refuses consumes nothing.
//!
//! A refusal is [`REFUSED`] (`CKR_FUNCTION_FAILED`): the use is refused for now, not
//! forever (`CKR_KEY_FUNCTION_NOT_PERMITTED` would tell the application that the key
//! may never be used so, which is what the access rules say), and the application's
//! session and key stay valid. The refusal is audited with the rule named in the reason,
//! and logged at warn.

use cryptoki_sys::*;
use parking_lot::Mutex;
use serde::Deserialize;
use std::collections::HashMap;
use std::time::Instant;

/// The code of a use refused by a rate limit.
pub const REFUSED: CK_RV = CKR_FUNCTION_FAILED;

/// Buckets kept before idle, full ones are dropped.
const MAX_BUCKETS: usize = 10_000;

/// One `[[rate_limit]]` rule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Key label glob (`payments-*`), as in `[[access]]`.
    pub keys: String,
    /// The operations counted (empty: every use).
    #[serde(default)]
    pub operations: Vec<String>,
    /// Uses per minute, per key and client uid (at least 1).
    pub per_minute: u32,
}

/// Checks the rules' syntax at configuration load: the first problem.
pub fn validate(rules: &[RateLimit]) -> Result<(), (usize, String)> {
    const OPS: [&str; 7] = [
        "encrypt", "decrypt", "sign", "verify", "wrap", "unwrap", "derive",
    ];
    for (i, r) in rules.iter().enumerate() {
        if r.keys.is_empty() {
            return Err((i, "keys: empty pattern".into()));
        }
        if let Some(op) = r.operations.iter().find(|o| !OPS.contains(&o.as_str())) {
            return Err((
                i,
                format!("operations: `{op}` is not one of {}", OPS.join(", ")),
            ));
        }
        if r.per_minute == 0 {
            return Err((i, "per_minute: must be at least 1".into()));
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// The buckets of one process (the daemon's, in service mode).
#[derive(Debug, Default)]
pub struct Limiter {
    buckets: Mutex<HashMap<(usize, String, u32), Bucket>>,
}

impl Limiter {
    /// Counts one use of key `label` for `op` by `uid` at `now`: `Err(reason)` when a
    /// matching rule has no use left (nothing is counted then).
    pub fn check(
        &self,
        rules: &[RateLimit],
        label: &str,
        op: &str,
        uid: u32,
        now: Instant,
    ) -> Result<(), String> {
        let matching: Vec<(usize, &RateLimit)> = rules
            .iter()
            .enumerate()
            .filter(|(_, r)| {
                super::access::glob(&r.keys, label)
                    && (r.operations.is_empty() || r.operations.iter().any(|o| o == op))
            })
            .collect();
        if matching.is_empty() {
            return Ok(());
        }
        let mut buckets = self.buckets.lock();
        if buckets.len() > MAX_BUCKETS {
            // Idle buckets that refilled completely hold nothing worth keeping.
            buckets.retain(|(i, _, _), b| {
                let cap = f64::from(rules.get(*i).map_or(1, |r| r.per_minute));
                b.tokens + now.duration_since(b.last).as_secs_f64() * cap / 60.0 < cap
            });
        }
        let mut refill = Vec::with_capacity(matching.len());
        for (i, r) in &matching {
            let cap = f64::from(r.per_minute);
            let b = buckets
                .get(&(*i, label.to_string(), uid))
                .copied()
                .unwrap_or(Bucket {
                    tokens: cap,
                    last: now,
                });
            let tokens = (b.tokens
                + now.saturating_duration_since(b.last).as_secs_f64() * cap / 60.0)
                .min(cap);
            if tokens < 1.0 {
                return Err(format!(
                    "rate limit rate_limit[{i}] (keys = \"{}\", {} per minute) reached for uid {uid}",
                    r.keys, r.per_minute
                ));
            }
            refill.push((*i, tokens));
        }
        for (i, tokens) in refill {
            buckets.insert(
                (i, label.to_string(), uid),
                Bucket {
                    tokens: tokens - 1.0,
                    last: now,
                },
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn rule(keys: &str, ops: &[&str], n: u32) -> RateLimit {
        RateLimit {
            keys: keys.into(),
            operations: ops.iter().map(|s| s.to_string()).collect(),
            per_minute: n,
        }
    }

    #[test]
    fn a_burst_then_the_refill_rate() {
        let rules = [rule("pay*", &["decrypt"], 3)];
        let l = Limiter::default();
        let t = Instant::now();
        for _ in 0..3 {
            l.check(&rules, "payments", "decrypt", 7, t).unwrap();
        }
        let e = l.check(&rules, "payments", "decrypt", 7, t).unwrap_err();
        assert!(e.contains("rate_limit[0]") && e.contains("uid 7"), "{e}");
        // Another uid, another key, another operation: their own (or no) bucket.
        l.check(&rules, "payments", "decrypt", 8, t).unwrap();
        l.check(&rules, "other", "decrypt", 7, t).unwrap();
        l.check(&rules, "payments", "encrypt", 7, t).unwrap();
        // 3 per minute: one more after 20 s.
        l.check(
            &rules,
            "payments",
            "decrypt",
            7,
            t + Duration::from_secs(20),
        )
        .unwrap();
        assert!(l
            .check(
                &rules,
                "payments",
                "decrypt",
                7,
                t + Duration::from_secs(21)
            )
            .is_err());
    }

    #[test]
    fn bad_rules_are_named() {
        assert_eq!(validate(&[rule("a", &["decrypt"], 0)]).unwrap_err().0, 0);
        assert!(validate(&[rule("a", &["dance"], 1)])
            .unwrap_err()
            .1
            .contains("dance"));
    }
}
