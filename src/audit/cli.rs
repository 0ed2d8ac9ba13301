//! The logic behind `cmkp11 audit tail` and `cmkp11 audit report` (the binary only parses
//! arguments): reading records back, time bounds, per key and operation counts.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::{Duration, SystemTime};

/// The fields of a record that tail and report show.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Entry {
    /// RFC 3339 UTC.
    pub time: String,
    /// Sequence number.
    pub seq: u64,
    /// Process id.
    pub pid: u64,
    /// User id.
    pub uid: u64,
    /// Executable.
    pub exe: Option<String>,
    /// Slot.
    pub slot: Option<u64>,
    /// Token label.
    pub token: Option<String>,
    /// Session handle.
    pub session: Option<u64>,
    /// Operation.
    pub op: String,
    /// `CKM_*` name.
    pub mechanism: Option<String>,
    /// Key label.
    pub key: Option<String>,
    /// Key id (hex).
    pub key_id: Option<String>,
    /// Key version.
    pub version: Option<u64>,
    /// `CKR_*` name.
    pub result: String,
    /// Reason.
    pub reason: Option<String>,
    /// DEK bulk counts (`session-close`).
    pub bulk: Option<BTreeMap<String, u64>>,
}

impl Entry {
    /// Parses one line; `None` for torn or foreign lines.
    pub fn parse(line: &str) -> Option<Entry> {
        serde_json::from_str(line).ok()
    }

    /// One human-readable line.
    pub fn human(&self) -> String {
        let mut s = format!("{} #{} {:<14}", self.time, self.seq, self.op);
        if let Some(k) = &self.key {
            let _ = write!(s, " key={k}");
            if let Some(v) = self.version {
                let _ = write!(s, " v{v}");
            }
        }
        if let Some(m) = &self.mechanism {
            let _ = write!(s, " {m}");
        }
        let _ = write!(s, " {}", self.result);
        if let Some(b) = &self.bulk {
            let counts: Vec<String> = b.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let _ = write!(s, " bulk[{}]", counts.join(","));
        }
        if let Some(r) = &self.reason {
            let _ = write!(s, " ({r})");
        }
        let _ = write!(
            s,
            " pid={} uid={} exe={}",
            self.pid,
            self.uid,
            self.exe.as_deref().unwrap_or("?")
        );
        if let Some(x) = self.session {
            let _ = write!(s, " session={x}");
        }
        s
    }
}

/// Options of `audit tail`.
#[derive(Debug, Clone, Default)]
pub struct TailOptions {
    /// How many matching records to show before following.
    pub lines: usize,
    /// Only records of this key label.
    pub key: Option<String>,
    /// Print the raw JSON lines.
    pub json: bool,
    /// Keep printing new records.
    pub follow: bool,
}

fn show(line: &str, o: &TailOptions, out: &mut dyn Write) -> std::io::Result<bool> {
    let Some(e) = Entry::parse(line) else {
        return Ok(false);
    };
    if o.key.as_ref().is_some_and(|k| e.key.as_ref() != Some(k)) {
        return Ok(false);
    }
    if o.json {
        writeln!(out, "{line}")?;
    } else {
        writeln!(out, "{}", e.human())?;
    }
    Ok(true)
}

/// `audit tail`: the last `lines` matching records, then (with `follow`) new ones as they
/// are appended, polling every 200 ms while `keep_going()` says so. Only whole lines are
/// shown; torn bytes are skipped.
pub fn tail(
    path: &Path,
    o: &TailOptions,
    out: &mut dyn Write,
    keep_going: &mut dyn FnMut() -> bool,
) -> Result<(), String> {
    match tail_inner(path, o, out, keep_going) {
        Err(e) if e.is_empty() => Ok(()), // the reader went away (`| head`)
        r => r,
    }
}

fn tail_inner(
    path: &Path,
    o: &TailOptions,
    out: &mut dyn Write,
    keep_going: &mut dyn FnMut() -> bool,
) -> Result<(), String> {
    let err = |e: std::io::Error| format!("{}: {e}", path.display());
    let oerr = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            String::new()
        } else {
            format!("output: {e}")
        }
    };
    let mut f = std::fs::File::open(path).map_err(err)?;
    let mut data = Vec::new();
    f.read_to_end(&mut data).map_err(err)?;
    let mut pos = data.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
    let text = String::from_utf8_lossy(&data[..pos]);
    let matching: Vec<&str> = text
        .lines()
        .filter(|l| {
            Entry::parse(l)
                .is_some_and(|e| o.key.as_ref().is_none_or(|k| e.key.as_ref() == Some(k)))
        })
        .collect();
    for l in &matching[matching.len().saturating_sub(o.lines)..] {
        show(l, o, out).map_err(oerr)?;
    }
    out.flush().map_err(oerr)?;
    if !o.follow {
        return Ok(());
    }
    let mut partial = Vec::new();
    while keep_going() {
        std::thread::sleep(Duration::from_millis(200));
        let len = f.metadata().map_err(err)?.len();
        if len < pos as u64 {
            // cut or replaced: start over from its end
            pos = len as usize;
            partial.clear();
            continue;
        }
        f.seek(SeekFrom::Start(pos as u64)).map_err(err)?;
        let mut new = Vec::new();
        f.read_to_end(&mut new).map_err(err)?;
        pos += new.len();
        partial.extend_from_slice(&new);
        if let Some(p) = partial.iter().rposition(|&b| b == b'\n') {
            let whole: Vec<u8> = partial.drain(..=p).collect();
            for l in String::from_utf8_lossy(&whole).lines() {
                show(l, o, out).map_err(oerr)?;
            }
            out.flush().map_err(oerr)?;
        }
    }
    Ok(())
}

/// A time bound of `audit report`, as a string that compares with record times:
/// an RFC 3339 UTC prefix (`2026-11-23`, `2026-11-23T13:00`, `2026-11-23T13:00:00Z`) or an
/// age (`90s`, `30m`, `24h`, `7d`) counted back from `now`.
pub fn time_bound(s: &str, now: SystemTime) -> Result<String, String> {
    let s = s.trim();
    if let Some(unit) = s.chars().last().filter(|c| "smhd".contains(*c)) {
        if let Ok(n) = s[..s.len() - 1].parse::<u64>() {
            let mul = match unit {
                's' => 1,
                'm' => 60,
                'h' => 3600,
                _ => 86_400,
            };
            let t = now
                .checked_sub(Duration::from_secs(n.saturating_mul(mul)))
                .unwrap_or(SystemTime::UNIX_EPOCH);
            return Ok(super::record::rfc3339(t));
        }
    }
    const TEMPLATE: &str = "0000-01-01T00:00:00.000000";
    let body = s.strip_suffix('Z').unwrap_or(s).replacen(' ', "T", 1);
    let ok_len = [10, 13, 16, 19].contains(&body.len()) || (21..=26).contains(&body.len());
    let ok_chars = body.chars().zip(TEMPLATE.chars()).all(|(c, t)| {
        if t.is_ascii_digit() {
            c.is_ascii_digit()
        } else {
            c == t
        }
    });
    if !ok_len || !ok_chars {
        return Err(format!(
            "`{s}`: expected a UTC time like 2026-11-23, 2026-11-23T13:00:00Z, or an age like 24h"
        ));
    }
    Ok(format!("{body}{}Z", &TEMPLATE[body.len()..]))
}

/// One row of `audit report`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Row {
    /// Key label, `-` for records without a key, `(DEK bulk)` for bulk counts.
    pub key: String,
    /// Operation.
    pub op: String,
    /// Records with result `CKR_OK`.
    pub ok: u64,
    /// Records with another result.
    pub failed: u64,
}

/// Counts records per key and operation with `since <= time < until` (bounds from
/// [`time_bound`]). Writer-internal records (`checkpoint`, `torn`) and the intents of
/// lifecycle steps (their outcome is a record of its own) are left out; DEK bulk
/// counts from `session-close` records are added under `(DEK bulk)`.
pub fn report(path: &Path, since: Option<&str>, until: Option<&str>) -> Result<Vec<Row>, String> {
    let data = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let text = String::from_utf8_lossy(&data);
    let mut rows: BTreeMap<(String, String), Row> = BTreeMap::new();
    for e in text.lines().filter_map(Entry::parse) {
        if since.is_some_and(|s| e.time.as_str() < s) || until.is_some_and(|u| e.time.as_str() >= u)
        {
            continue;
        }
        if matches!(
            e.op.as_str(),
            "checkpoint" | "torn" | "intent" | "log-close" | "log-open" | "log-continue"
        ) {
            continue;
        }
        let mut add = |key: &str, op: &str, ok: u64, failed: u64| {
            let r = rows
                .entry((key.to_owned(), op.to_owned()))
                .or_insert_with(|| Row {
                    key: key.to_owned(),
                    op: op.to_owned(),
                    ..Row::default()
                });
            r.ok += ok;
            r.failed += failed;
        };
        if let Some(b) = &e.bulk {
            for (op, n) in b {
                add("(DEK bulk)", op, *n, 0);
            }
            continue;
        }
        let ok = e.result == "CKR_OK";
        add(
            e.key.as_deref().unwrap_or("-"),
            &e.op,
            u64::from(ok),
            u64::from(!ok),
        );
    }
    Ok(rows.into_values().collect())
}

/// The report as a table with a bar per row (scaled to the largest total).
pub fn render_report(rows: &[Row]) -> String {
    let kw = rows
        .iter()
        .map(|r| r.key.chars().count())
        .max()
        .unwrap_or(0)
        .max(3);
    let ow = rows.iter().map(|r| r.op.len()).max().unwrap_or(0).max(9);
    let max = rows
        .iter()
        .map(|r| r.ok + r.failed)
        .max()
        .unwrap_or(0)
        .max(1);
    let mut s = format!(
        "{:<kw$}  {:<ow$}  {:>10}  {:>10}  {:>10}\n",
        "KEY", "OPERATION", "OK", "FAILED", "TOTAL"
    );
    let (mut tok, mut tfail) = (0, 0);
    for r in rows {
        let total = r.ok + r.failed;
        let bar = (total * 30).div_ceil(max) as usize;
        let _ = writeln!(
            s,
            "{:<kw$}  {:<ow$}  {:>10}  {:>10}  {:>10}  {}",
            r.key,
            r.op,
            r.ok,
            r.failed,
            total,
            "#".repeat(bar)
        );
        tok += r.ok;
        tfail += r.failed;
    }
    let _ = writeln!(
        s,
        "{:<kw$}  {:<ow$}  {:>10}  {:>10}  {:>10}",
        "all",
        "",
        tok,
        tfail,
        tok + tfail
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(86_400 * 2);
        assert_eq!(
            time_bound("1d", now).unwrap(),
            "1970-01-02T00:00:00.000000Z"
        );
        assert_eq!(
            time_bound("2026-11-23", now).unwrap(),
            "2026-11-23T00:00:00.000000Z"
        );
        assert_eq!(
            time_bound("2026-11-23 13:05:07Z", now).unwrap(),
            "2026-11-23T13:05:07.000000Z"
        );
        assert!(time_bound("yesterday", now).is_err());
        assert!(time_bound("2026-1-23", now).is_err());
    }

    #[test]
    fn table() {
        let rows = vec![
            Row {
                key: "k1".into(),
                op: "sign".into(),
                ok: 3,
                failed: 1,
            },
            Row {
                key: "k2".into(),
                op: "wrap".into(),
                ok: 2,
                failed: 0,
            },
        ];
        let t = render_report(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("KEY"));
        assert!(lines[1].contains("k1") && lines[1].ends_with(&"#".repeat(30)));
        assert!(lines[2].ends_with(&"#".repeat(15)));
        assert!(lines[3].starts_with("all") && lines[3].trim_end().ends_with('6'));
    }
}
