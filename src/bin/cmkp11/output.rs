//! Human tables, JSON, and dates.

use crate::{CliError, R};

/// Prints `value` as pretty JSON on stdout.
pub fn json<T: serde::Serialize>(value: &T) -> R<()> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| CliError::new(format!("cannot write JSON: {e}")))?;
    println!("{text}");
    Ok(())
}

/// Prints a table with left-aligned columns.
pub fn table(head: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = head.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(c);
            } else {
                out.push_str(&format!("{c:<w$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(head.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

/// RFC 3339 UTC time of unix seconds (`None` for 0, "unknown").
pub fn time(t: u64) -> Option<String> {
    if t == 0 {
        return None;
    }
    let days = (t / 86_400) as i64;
    let secs = t % 86_400;
    // Civil date from days since 1970-01-01 (proleptic Gregorian; H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    Some(format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    ))
}

/// [`time`] for a table cell ("-" when unknown).
pub fn time_cell(t: u64) -> String {
    time(t).unwrap_or_else(|| "-".into())
}

#[cfg(test)]
mod tests {
    use super::time;

    #[test]
    fn dates() {
        assert_eq!(time(0), None);
        assert_eq!(time(1).as_deref(), Some("1970-01-01T00:00:01Z"));
        assert_eq!(time(951_782_400).as_deref(), Some("2000-02-29T00:00:00Z"));
        assert_eq!(time(1_767_225_599).as_deref(), Some("2025-12-31T23:59:59Z"));
        assert_eq!(time(4_107_542_400).as_deref(), Some("2100-03-01T00:00:00Z"));
    }
}
