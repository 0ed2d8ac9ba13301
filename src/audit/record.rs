//! One audit record as a JSON line: field order, escaping, the RFC 3339 clock, names of
//! mechanisms and return codes, and the cheap parsing the writer needs on its hot path.
//!
//! A line is built in two halves. The *body* (`{"time":..,` then everything from `pid` to
//! `reason`/`bulk`) is formatted by the calling thread without any lock; the writer adds
//! `seq`, `prev` and `mac` under the file lock:
//!
//! ```text
//! {"time":"2026-11-23T13:18:58.123456Z","seq":42,"pid":..,"uid":..,"exe":..,"slot":..,
//!  "token":..,"session":..,"op":..,"mechanism":..,"key":..,"key_id":..,"version":..,
//!  "result":..,"reason":..[,"bulk":{..}],"prev":"<64 hex>","mac":null|"<hex>"}
//! ```
//!
//! `mac` is always the last field, so the bytes the MAC covers (the *prefix*) are the line
//! up to `,"mac":`. Strings are escaped, so `,"mac":` cannot occur inside a value.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

/// Longest `key` label kept in a record (characters beyond are cut, marked with `…`).
pub const MAX_LABEL: usize = 256;
/// Longest `reason` kept in a record.
pub const MAX_REASON: usize = 512;
/// Longest `exe` path kept in a record.
pub const MAX_EXE: usize = 1024;
/// Longest `key_id` (bytes) kept in a record.
pub const MAX_KEY_ID: usize = 64;
/// Upper bound of a record line in bytes, bulk counts included (used to size tail reads).
pub const MAX_LINE: usize = 16384;

/// The separator in front of the last field; the MAC covers everything before it.
pub const MAC_SEP: &str = ",\"mac\":";

/// `prev` of the first record of a log.
pub const GENESIS: [u8; 32] = [0; 32];

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = Vec::with_capacity(bytes.len() * 2);
    push_hex(&mut s, bytes);
    String::from_utf8(s).expect("hex is ASCII")
}

/// Appends the lower-case hex of `bytes` to `out`.
pub fn push_hex(out: &mut Vec<u8>, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for &b in bytes {
        out.push(DIGITS[usize::from(b >> 4)]);
        out.push(DIGITS[usize::from(b & 15)]);
    }
}

/// Bytes of a lower- or upper-case hex string, `None` if it is not hex.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Appends `s` as a JSON string (quotes included), cut to `max` characters.
pub fn push_json_str(out: &mut String, s: &str, max: usize) {
    // fast path: short and nothing to escape (bytes >= 0xe2 may start U+2028/U+2029)
    if s.len() <= max
        && s.bytes()
            .all(|b| b >= 0x20 && b != b'"' && b != b'\\' && b != 0x7f && b < 0xe2)
    {
        out.push('"');
        out.push_str(s);
        out.push('"');
        return;
    }
    out.push('"');
    for (n, c) in s.chars().enumerate() {
        if n == max {
            out.push('…');
            break;
        }
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\u{7f}' || c == '\u{2028}' || c == '\u{2029}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn push_opt_str(out: &mut String, s: Option<&str>, max: usize) {
    match s {
        Some(s) => push_json_str(out, s, max),
        None => out.push_str("null"),
    }
}

/// RFC 3339 UTC with microseconds (`2026-11-23T13:18:58.123456Z`) of a point in time.
pub fn rfc3339(t: SystemTime) -> String {
    let mut out = String::with_capacity(27);
    push_rfc3339(&mut out, t);
    out
}

/// Appends [`rfc3339`] of `t` to `out` (no formatting machinery: this is per record).
pub fn push_rfc3339(out: &mut String, t: SystemTime) {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (y, m, day) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    let mut b = *b"0000-00-00T00:00:00.000000Z";
    let mut put = |at: usize, width: usize, mut v: u64| {
        for i in (at..at + width).rev() {
            b[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, y.clamp(0, 9999) as u64);
    put(5, 2, u64::from(m));
    put(8, 2, u64::from(day));
    put(11, 2, rem / 3600);
    put(14, 2, rem / 60 % 60);
    put(17, 2, rem % 60);
    put(20, 6, u64::from(d.subsec_micros()));
    out.push_str(std::str::from_utf8(&b).expect("ASCII"));
}

/// The proleptic Gregorian date of a day count since 1970-01-01.
///
/// Works in 400-year eras (146 097 days each) counted from 0000-03-01, so that the leap
/// day is the last day of the shifted year and the month lengths follow a linear formula.
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468; // days from 0000-03-01 to 1970-01-01
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // day of era, 0..=146096
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // year of era
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // day of the March-based year
    let mp = (5 * doy + 2) / 153; // March = 0
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// `CKM_*` name of a mechanism, or `0x%08x` when cryptoki does not know it.
pub fn mechanism_name(m: u64) -> String {
    match cryptoki::mechanism::MechanismType::try_from(m as cryptoki_sys::CK_MECHANISM_TYPE) {
        Ok(t) => t.to_string(),
        Err(_) => format!("0x{m:08x}"),
    }
}

/// Appends the JSON string of [`mechanism_name`], caching the last name per thread (a
/// thread usually repeats its mechanism).
fn push_mechanism(out: &mut String, m: u64) {
    thread_local! {
        static LAST: std::cell::RefCell<(u64, String)> = const {
            std::cell::RefCell::new((u64::MAX, String::new()))
        };
    }
    LAST.with(|l| {
        let mut l = l.borrow_mut();
        if l.0 != m {
            *l = (m, mechanism_name(m));
        }
        push_json_str(out, &l.1, 64);
    })
}

/// Who writes: fixed for the life of a process (the pid is read per record, for `fork`).
#[derive(Debug, Clone)]
pub struct Ident {
    /// Real user id.
    pub uid: u32,
    /// The executable's path, as a JSON string (escaped once).
    pub exe_json: String,
}

impl Ident {
    /// The identity of the calling process.
    pub fn current() -> Ident {
        let exe = std::env::current_exe()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "?".into());
        Ident::of(rustix::process::getuid().as_raw(), &exe)
    }

    /// An identity from its uid and executable path (the daemon's peers).
    pub fn of(uid: u32, exe: &str) -> Ident {
        let mut exe_json = String::new();
        push_json_str(&mut exe_json, exe, MAX_EXE);
        Ident { uid, exe_json }
    }
}

/// The lock-free part of a line: `{"time":"..",` and the fields from `pid` on, in one
/// buffer; the writer puts `seq` between the two.
#[derive(Debug, Clone)]
pub struct Body {
    text: String,
    split: usize,
}

impl Body {
    /// `{"time":"...",`
    pub fn head(&self) -> &str {
        &self.text[..self.split]
    }

    /// `"pid":...` up to and including `reason` (and `bulk`), with a trailing comma.
    pub fn rest(&self) -> &str {
        &self.text[self.split..]
    }
}

/// Appends the decimal digits of `v` (no formatting machinery: this is per record).
pub fn push_u64(out: &mut String, mut v: u64) {
    let mut d = [0u8; 20];
    let mut i = d.len();
    loop {
        i -= 1;
        d[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.push_str(std::str::from_utf8(&d[i..]).unwrap_or("0"));
}

fn push_opt_u64(out: &mut String, n: Option<u64>) {
    match n {
        Some(n) => push_u64(out, n),
        None => out.push_str("null"),
    }
}

/// Formats the body of a record (everything but `seq`, `prev`, `mac`).
pub fn body(
    id: &Ident,
    pid: u32,
    r: &super::RecordRef<'_>,
    bulk: Option<&BTreeMap<String, u64>>,
    now: SystemTime,
) -> Body {
    let mut s = String::with_capacity(448);
    s.push_str("{\"time\":\"");
    push_rfc3339(&mut s, now);
    s.push_str("\",");
    let split = s.len();
    s.push_str("\"pid\":");
    push_u64(&mut s, u64::from(pid));
    s.push_str(",\"uid\":");
    push_u64(&mut s, u64::from(id.uid));
    s.push_str(",\"exe\":");
    s.push_str(&id.exe_json);
    s.push_str(",\"slot\":");
    push_opt_u64(&mut s, r.slot);
    s.push_str(",\"token\":");
    push_opt_str(&mut s, r.token, 64);
    s.push_str(",\"session\":");
    push_opt_u64(&mut s, r.session);
    s.push_str(",\"op\":");
    push_json_str(&mut s, r.op, 64);
    s.push_str(",\"mechanism\":");
    match r.mechanism {
        Some(m) => push_mechanism(&mut s, m),
        None => s.push_str("null"),
    }
    s.push_str(",\"key\":");
    push_opt_str(&mut s, r.key, MAX_LABEL);
    s.push_str(",\"key_id\":");
    match r.key_id {
        Some(id) => {
            let cut = &id[..id.len().min(MAX_KEY_ID)];
            s.push('"');
            for &b in cut {
                const DIGITS: &[u8; 16] = b"0123456789abcdef";
                s.push(char::from(DIGITS[usize::from(b >> 4)]));
                s.push(char::from(DIGITS[usize::from(b & 15)]));
            }
            s.push('"');
        }
        None => s.push_str("null"),
    }
    s.push_str(",\"version\":");
    push_opt_u64(&mut s, r.version.map(u64::from));
    s.push_str(",\"result\":");
    push_json_str(
        &mut s,
        crate::backend::rv::name(r.result as cryptoki_sys::CK_RV),
        64,
    );
    s.push_str(",\"reason\":");
    push_opt_str(&mut s, r.reason, MAX_REASON);
    if let Some(b) = bulk {
        s.push_str(",\"bulk\":{");
        for (i, (op, n)) in b.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            push_json_str(&mut s, op, 32);
            s.push(':');
            push_u64(&mut s, *n);
        }
        s.push('}');
    }
    s.push(',');
    Body { text: s, split }
}

/// The MAC-covered prefix of a line (everything before `,"mac":`) and the mac value text
/// (`null` or `"hex"`), or `None` if the line has no `mac` field last.
pub fn split_mac(line: &str) -> Option<(&str, &str)> {
    let body = line.strip_suffix('}')?;
    let at = body.rfind(MAC_SEP)?;
    let value = &body[at + MAC_SEP.len()..];
    if value == "null" || (value.starts_with('"') && value.ends_with('"') && value.len() >= 2) {
        Some((&body[..at], value))
    } else {
        None
    }
}

/// Whether `line` (no newline) is a complete record as the writer produced it: a torn
/// prefix of a record never ends with the `mac` field.
pub fn is_complete(line: &[u8]) -> bool {
    line.starts_with(b"{\"time\":\"")
        && std::str::from_utf8(line).ok().and_then(split_mac).is_some()
}

/// The `seq` of a complete record, read without a JSON parser (the writer's hot path).
pub fn quick_seq(line: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(line).ok()?;
    // `time` comes first and holds no `"seq":`; `seq` is the second field.
    let at = s.find(",\"seq\":")? + 7;
    let digits: &str = &s[at..at + s[at..].find(|c: char| !c.is_ascii_digit())?];
    digits.parse().ok()
}

/// The `op` of the record that closes a file of a rotated log (`cmkp11 audit rotate`).
pub const OP_CLOSE: &str = "log-close";
/// The `op` of the record that opens a file of a rotated log, chained to the `log-close`
/// record of the file before it (`cmkp11 audit rotate`).
pub const OP_OPEN: &str = "log-open";
/// The `op` of the record a writer puts first in a log it found emptied (truncated in
/// place, `copytruncate`) or renamed away and replaced, chained to the last record it
/// knew of.
pub const OP_CONTINUE: &str = "log-continue";

/// Whether the complete record `line` has `op` (without a JSON parser: strings are
/// escaped, so `"op":"<op>"` cannot occur inside a value).
pub fn quick_op_is(line: &[u8], op: &str) -> bool {
    let pat = format!(",\"op\":\"{op}\",");
    line.windows(pat.len()).any(|w| w == pat.as_bytes())
}

/// Builds the line of a record from its body, `seq`, `prev` and `mac` (no newline).
pub fn line(b: &Body, seq: u64, prev: &[u8; 32], mac: Option<&[u8]>) -> Vec<u8> {
    let mut buf = prefix(b, seq, prev);
    finish(&mut buf, mac);
    buf
}

/// The MAC-covered prefix of a record's line (up to `,"mac":`).
pub fn prefix(b: &Body, seq: u64, prev: &[u8; 32]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(b.text.len() + 200);
    buf.extend_from_slice(b.head().as_bytes());
    buf.extend_from_slice(b"\"seq\":");
    let mut n = String::new();
    push_u64(&mut n, seq);
    buf.extend_from_slice(n.as_bytes());
    buf.push(b',');
    buf.extend_from_slice(b.rest().as_bytes());
    buf.extend_from_slice(b"\"prev\":\"");
    push_hex(&mut buf, prev);
    buf.push(b'"');
    buf
}

/// Completes a [`prefix`] with the `mac` field.
pub fn finish(buf: &mut Vec<u8>, mac: Option<&[u8]>) {
    buf.extend_from_slice(MAC_SEP.as_bytes());
    match mac {
        Some(v) => {
            buf.push(b'"');
            push_hex(buf, v);
            buf.extend_from_slice(b"\"}");
        }
        None => buf.extend_from_slice(b"null}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn clock() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
        // 2000-02-29 (leap day of a century leap year), 2100-03-01 (no leap day in 2100).
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400) + Duration::from_micros(7);
        assert_eq!(rfc3339(t), "2000-02-29T00:00:00.000007Z");
        let t = UNIX_EPOCH + Duration::from_secs(4_107_542_400 + 3_661);
        assert_eq!(rfc3339(t), "2100-03-01T01:01:01.000000Z");
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(civil_from_days(20_780), (2026, 11, 23));
    }

    #[test]
    fn escaping_and_cut() {
        let mut s = String::new();
        push_json_str(&mut s, "a\"b\\c\n\u{1}", 10);
        assert_eq!(s, r#""a\"b\\c\n\u0001""#);
        let mut s = String::new();
        push_json_str(&mut s, "abcdef", 3);
        assert_eq!(s, "\"abc…\"");
        let v: serde_json::Value = serde_json::from_str(r#""a\"b\\c\n\u0001""#).unwrap();
        assert_eq!(v, "a\"b\\c\n\u{1}");
    }

    #[test]
    fn names() {
        assert_eq!(mechanism_name(cryptoki_sys::CKM_AES_GCM), "CKM_AES_GCM");
        assert_eq!(mechanism_name(0x8000_1234), "0x80001234");
    }

    #[test]
    fn mac_split_and_seq() {
        let l = r#"{"time":"x","seq":17,"reason":",\"mac\":1}","prev":"00","mac":null}"#;
        let (p, v) = split_mac(l).unwrap();
        assert!(p.ends_with(r#""prev":"00""#));
        assert_eq!(v, "null");
        assert_eq!(quick_seq(l.as_bytes()), Some(17));
        assert!(is_complete(l.as_bytes()));
        assert!(!is_complete(&l.as_bytes()[..l.len() - 1]));
        assert!(!is_complete(br#"{"time":"x","seq":17,"bulk":{"a":1}"#));
        assert_eq!(unhex("0aFf"), Some(vec![10, 255]));
        assert_eq!(unhex("0g"), None);
    }
}
