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

/// A `*`/`?` glob match over bytes.
pub fn glob(pattern: &str, text: &str) -> bool {
    fn m(p: &[u8], t: &[u8]) -> bool {
        match (p.first(), t.first()) {
            (None, None) => true,
            (Some(b'*'), _) => m(&p[1..], t) || (!t.is_empty() && m(p, &t[1..])),
            (Some(b'?'), Some(_)) => m(&p[1..], &t[1..]),
            (Some(a), Some(b)) if a == b => m(&p[1..], &t[1..]),
            _ => false,
        }
    }
    m(pattern.as_bytes(), text.as_bytes())
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
