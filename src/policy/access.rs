//! Access rules (`[[access]]`): which processes may use which CMKs, for what, when.

use cryptoki_sys::*;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// One `[[access]]` rule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Access {
    /// Key label glob (`payments-*`).
    pub keys: String,
    /// Allowed process uids (empty: any).
    #[serde(default)]
    pub uids: Vec<u32>,
    /// Allowed executables (empty: any).
    #[serde(default)]
    pub executables: Vec<PathBuf>,
    /// Allowed operations (empty: any).
    #[serde(default)]
    pub operations: Vec<String>,
    /// `HH:MM-HH:MM` in UTC.
    #[serde(default)]
    pub hours_utc: Option<String>,
}

/// Who is calling: fixed for the life of a process.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Real uid.
    pub uid: u32,
    /// The executable (`/proc/self/exe`).
    pub exe: PathBuf,
}

/// A `*`/`?` glob match over characters (`?` is one character, not one byte, so a
/// multi-byte UTF-8 label matches as it reads). Linear in the text per `*` at worst:
/// after a mismatch it resumes from the last `*` only (a later `*` makes the earlier ones
/// irrelevant), so a pattern of many `*` cannot make it backtrack exponentially.
pub fn glob(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut i, mut j) = (0, 0);
    // The last `*` seen, and the text position it is currently assumed to stop at.
    let mut star: Option<(usize, usize)> = None;
    while j < t.len() {
        if i < p.len() && (p[i] == '?' || (p[i] != '*' && p[i] == t[j])) {
            i += 1;
            j += 1;
        } else if i < p.len() && p[i] == '*' {
            star = Some((i, j));
            i += 1;
        } else if let Some((si, sj)) = star {
            // Let the last `*` take one more character.
            star = Some((si, sj + 1));
            i = si + 1;
            j = sj + 1;
        } else {
            return false;
        }
    }
    p[i..].iter().all(|c| *c == '*')
}

/// Minutes since midnight of an `HH:MM` string.
fn minutes(s: &str) -> Option<u32> {
    let (h, m) = s.trim().split_once(':')?;
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (h <= 24 && m < 60 && h * 60 + m <= 24 * 60).then_some(h * 60 + m)
}

/// Whether `now` (minutes since UTC midnight) is inside `HH:MM-HH:MM` (which may wrap
/// around midnight).
pub fn in_hours(range: &str, now: u32) -> Option<bool> {
    let (a, b) = range.split_once('-')?;
    let (a, b) = (minutes(a)?, minutes(b)?);
    Some(if a <= b {
        now >= a && now < b
    } else {
        now >= a || now < b
    })
}

/// Checks a rule set's syntax once, at configuration load: returns the first problem.
pub fn validate(rules: &[Access]) -> Result<(), (usize, String)> {
    const OPS: [&str; 7] = [
        "encrypt", "decrypt", "sign", "verify", "wrap", "unwrap", "derive",
    ];
    for (i, r) in rules.iter().enumerate() {
        if let Some(op) = r.operations.iter().find(|o| !OPS.contains(&o.as_str())) {
            return Err((
                i,
                format!("operations: `{op}` is not one of {}", OPS.join(", ")),
            ));
        }
        if let Some(h) = &r.hours_utc {
            if in_hours(h, 0).is_none() {
                return Err((i, format!("hours_utc: `{h}` is not HH:MM-HH:MM")));
            }
        }
    }
    Ok(())
}

/// Decides a use: if any rule's `keys` glob matches `label`, one such rule must allow
/// the caller, the operation and the time. Returns the reason of a denial.
pub fn check(
    rules: &[Access],
    label: &str,
    op: &str,
    caller: &Caller,
    now_minutes: u32,
) -> Result<(), String> {
    let mut matching = rules.iter().filter(|r| glob(&r.keys, label)).peekable();
    if matching.peek().is_none() {
        return Ok(());
    }
    let mut reason = String::new();
    for r in matching {
        let why = if !r.uids.is_empty() && !r.uids.contains(&caller.uid) {
            format!("uid {} not allowed", caller.uid)
        } else if !r.executables.is_empty()
            && !r.executables.iter().any(|e| Path::new(e) == caller.exe)
        {
            format!("executable {} not allowed", caller.exe.display())
        } else if !r.operations.is_empty() && !r.operations.iter().any(|o| o == op) {
            format!("operation {op} not allowed")
        } else if r
            .hours_utc
            .as_deref()
            .is_some_and(|h| in_hours(h, now_minutes) != Some(true))
        {
            "outside the allowed UTC hours".to_string()
        } else {
            return Ok(());
        };
        reason = format!("access rule `{}`: {why}", r.keys);
    }
    Err(reason)
}

/// The `CK_RV` of an access denial.
pub const DENIED: CK_RV = CKR_KEY_FUNCTION_NOT_PERMITTED;

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(keys: &str) -> Access {
        Access {
            keys: keys.into(),
            uids: vec![],
            executables: vec![],
            operations: vec![],
            hours_utc: None,
        }
    }

    #[test]
    fn globs() {
        assert!(glob("payments-*", "payments-eu"));
        assert!(!glob("payments-*", "billing"));
        assert!(glob("a?c", "abc"));
        assert!(glob("*", ""));
        assert!(glob("", ""));
        assert!(!glob("", "a"));
        assert!(!glob("a", ""));
        assert!(glob("*a*b*", "xxaxxbxx"));
        assert!(!glob("*a*b*", "xxbxxaxx"));
        assert!(glob("a*", "a"));
        assert!(glob("*x", "abcx"));
        assert!(!glob("*x", "abcxy"));
        assert!(glob("a*b*c", "abbbcbc"));
        assert!(!glob("a*b*c", "abbbcb"));
        // `?` is one character of a UTF-8 label, not one byte.
        assert!(glob("zahlung-?", "zahlung-ä"));
        assert!(!glob("zahlung-??", "zahlung-ä"));
    }

    #[test]
    fn many_stars_do_not_backtrack_exponentially() {
        // With the former recursive matcher this took longer than the age of the universe.
        let pattern = "*a".repeat(40) + "b";
        let text = "a".repeat(200);
        let t = std::time::Instant::now();
        assert!(!glob(&pattern, &text));
        assert!(glob(&("*a".repeat(40) + "*"), &text));
        assert!(
            t.elapsed() < std::time::Duration::from_secs(1),
            "{:?}",
            t.elapsed()
        );
    }

    #[test]
    fn glob_agrees_with_a_reference_matcher() {
        // Exhaustive over short patterns and texts on a 3-letter alphabet.
        fn reference(p: &[char], t: &[char]) -> bool {
            match (p.first(), t.first()) {
                (None, None) => true,
                (Some('*'), _) => reference(&p[1..], t) || (!t.is_empty() && reference(p, &t[1..])),
                (Some('?'), Some(_)) => reference(&p[1..], &t[1..]),
                (Some(a), Some(b)) if a == b => reference(&p[1..], &t[1..]),
                _ => false,
            }
        }
        fn all(alphabet: &[char], n: usize) -> Vec<String> {
            let mut out = vec![String::new()];
            let mut last = vec![String::new()];
            for _ in 0..n {
                last = last
                    .iter()
                    .flat_map(|s| alphabet.iter().map(move |c| format!("{s}{c}")))
                    .collect();
                out.extend(last.iter().cloned());
            }
            out
        }
        let patterns = all(&['a', 'b', '*', '?'], 4);
        let texts = all(&['a', 'b', 'c'], 5);
        for p in &patterns {
            let pc: Vec<char> = p.chars().collect();
            for t in &texts {
                let tc: Vec<char> = t.chars().collect();
                assert_eq!(glob(p, t), reference(&pc, &tc), "pattern {p:?} text {t:?}");
            }
        }
    }

    #[test]
    fn hours_wrap_midnight() {
        assert_eq!(in_hours("06:00-22:00", 6 * 60), Some(true));
        assert_eq!(in_hours("06:00-22:00", 22 * 60), Some(false));
        assert_eq!(in_hours("22:00-06:00", 23 * 60), Some(true));
        assert_eq!(in_hours("22:00-06:00", 7 * 60), Some(false));
        assert_eq!(in_hours("bad", 0), None);
    }

    #[test]
    fn rules_decide_only_for_matching_keys() {
        let caller = Caller {
            uid: 105,
            exe: PathBuf::from("/usr/sbin/nginx"),
        };
        let mut r = rule("payments-*");
        r.uids = vec![105];
        r.operations = vec!["sign".into()];
        let rules = vec![r];
        assert!(check(&rules, "other", "decrypt", &caller, 0).is_ok());
        assert!(check(&rules, "payments-eu", "sign", &caller, 0).is_ok());
        let e = check(&rules, "payments-eu", "decrypt", &caller, 0).unwrap_err();
        assert!(e.contains("operation decrypt"), "{e}");
        let other = Caller { uid: 0, ..caller };
        assert!(check(&rules, "payments-eu", "sign", &other, 0)
            .unwrap_err()
            .contains("uid 0"));
    }

    #[test]
    fn validation() {
        let mut r = rule("x");
        r.operations = vec!["steal".into()];
        assert!(validate(&[r]).is_err());
        let mut r = rule("x");
        r.hours_utc = Some("25:00-26:00".into());
        assert!(validate(&[r]).is_err());
    }
}
