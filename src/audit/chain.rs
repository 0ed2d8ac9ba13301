//! The hash chain and the token checkpoint: what is hashed, what is MACed, how the token
//! checkpoint is encoded, and how a writer finds the chain head (and a torn tail) at the
//! end of the file.

use super::record::{self, hex, unhex, GENESIS, MAX_LINE};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::os::unix::fs::FileExt;

/// Domain separation of the MAC input.
const MAC_DOMAIN: &[u8] = b"cmkp11 audit checkpoint v1\0";

/// SHA-256 of a complete line (without its newline): the next record's `prev`.
pub fn line_hash(line: &[u8]) -> [u8; 32] {
    Sha256::digest(line).into()
}

/// What the token MACs for a checkpoint record: a domain tag and the SHA-256 of the
/// record's prefix (the line up to `,"mac":`). The prefix holds `seq` and `prev`, and `prev`
/// commits to every earlier line, so one MAC authenticates the whole log up to here.
pub fn mac_input(prefix: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(MAC_DOMAIN.len() + 32);
    v.extend_from_slice(MAC_DOMAIN);
    v.extend_from_slice(&Sha256::digest(prefix));
    v
}

/// The content of the token's checkpoint object: the latest MACed record's seq, the hash
/// of its line, and its MAC (so the checkpoint names one exact line); since v2 also where
/// that line ends in the file, and the first gap a writer ever found (sticky).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// `seq` of the record.
    pub seq: u64,
    /// SHA-256 of its whole line.
    pub hash: [u8; 32],
    /// Its `mac` value.
    pub mac: Vec<u8>,
    /// Offset just past its newline in the file it is in (`None` for a v1 checkpoint).
    pub end: Option<u64>,
    /// `seq` of the `audit-gap` record of the first gap a writer found (0: none). Kept by
    /// every later checkpoint: cutting or replacing the log is never forgotten.
    pub gap: u64,
}

impl Checkpoint {
    /// `cmkp11-audit-checkpoint v2 <seq> <hash hex> <mac hex> <end> <gap>`
    pub fn encode(&self) -> Vec<u8> {
        format!(
            "cmkp11-audit-checkpoint v2 {} {} {} {} {}",
            self.seq,
            hex(&self.hash),
            hex(&self.mac),
            self.end.unwrap_or(0),
            self.gap
        )
        .into_bytes()
    }

    /// The inverse of [`Checkpoint::encode`] (v1 too: `... v1 <seq> <hash> <mac>`).
    pub fn decode(b: &[u8]) -> Option<Checkpoint> {
        let s = std::str::from_utf8(b).ok()?;
        let mut it = s.split(' ');
        if it.next()? != "cmkp11-audit-checkpoint" {
            return None;
        }
        let v2 = match it.next()? {
            "v1" => false,
            "v2" => true,
            _ => return None,
        };
        let seq = it.next()?.parse().ok()?;
        let hash = unhex(it.next()?)?.try_into().ok()?;
        let mac = unhex(it.next()?)?;
        let (end, gap) = if v2 {
            let end: u64 = it.next()?.parse().ok()?;
            (Some(end).filter(|e| *e > 0), it.next()?.parse().ok()?)
        } else {
            (None, 0)
        };
        if it.next().is_some() {
            return None;
        }
        Some(Checkpoint {
            seq,
            hash,
            mac,
            end,
            gap,
        })
    }
}

/// Where a token checkpoint's record is, as a writer checks it before moving the
/// checkpoint ([`find_checkpointed`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Anchor {
    /// The record is in the file, unchanged.
    Found,
    /// It belongs to an earlier file of the series (this file starts after it).
    Earlier,
    /// It is not in the file as the token knows it: why.
    Missing(String),
}

/// `seq` of the first record of the file (`None` if it has no complete first line).
pub fn first_seq(f: &File, len: u64) -> std::io::Result<Option<u64>> {
    let mut buf = vec![0u8; (MAX_LINE as u64 + 1).min(len) as usize];
    f.read_exact_at(&mut buf, 0)?;
    Ok(buf
        .iter()
        .position(|&b| b == b'\n')
        .and_then(|p| record::quick_seq(&buf[..p])))
}

/// Whether the record the token checkpoint `c` names is in the log `f` of `len` bytes
/// (whose first record has seq `base`): the line ending at `c.end` (v2), or, for a v1
/// checkpoint, the line with seq `c.seq` found by reading the file once.
pub fn find_checkpointed(
    f: &File,
    len: u64,
    base: Option<u64>,
    c: &Checkpoint,
) -> std::io::Result<Anchor> {
    if base.is_some_and(|b| c.seq < b) {
        return Ok(Anchor::Earlier);
    }
    let missing = |what: String| {
        Ok(Anchor::Missing(format!(
            "the token checkpoint names seq {} (hash {}{}) but {what}: records were cut or \
             the file was replaced",
            c.seq,
            &hex(&c.hash)[..16],
            c.end
                .map(|e| format!(", ending at offset {e}"))
                .unwrap_or_default()
        )))
    };
    let Some(end) = c.end else {
        // v1: read the file once
        let (mut pos, mut carry) = (0u64, Vec::new());
        let mut chunk = vec![0u8; 1 << 16];
        while pos < len {
            let n = ((len - pos) as usize).min(chunk.len());
            f.read_exact_at(&mut chunk[..n], pos)?;
            pos += n as u64;
            carry.extend_from_slice(&chunk[..n]);
            let mut from = 0;
            while let Some(p) = carry[from..].iter().position(|&b| b == b'\n') {
                let line = &carry[from..from + p];
                if record::quick_seq(line) == Some(c.seq) {
                    return if line_hash(line) == c.hash {
                        Ok(Anchor::Found)
                    } else {
                        missing("the file's record of that seq differs".into())
                    };
                }
                from += p + 1;
            }
            carry.drain(..from);
        }
        return missing("the file has no such record".into());
    };
    if end > len {
        return missing(format!("the file is only {len} bytes long"));
    }
    let start = end.saturating_sub(MAX_LINE as u64 + 1);
    let mut buf = vec![0u8; (end - start) as usize];
    f.read_exact_at(&mut buf, start)?;
    if buf.pop() != Some(b'\n') {
        return missing("no record ends there".into());
    }
    let line = match buf.iter().rposition(|&b| b == b'\n') {
        Some(p) => &buf[p + 1..],
        None if start == 0 => &buf[..],
        None => return missing("no record ends there".into()),
    };
    if line_hash(line) == c.hash {
        Ok(Anchor::Found)
    } else {
        missing("the record there differs".into())
    }
}

/// The end of the log as a writer finds it under the lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tail {
    /// `seq` of the last complete record (0 for an empty log).
    pub seq: u64,
    /// Hash of the last complete record's line ([`GENESIS`] for an empty log).
    pub hash: [u8; 32],
    /// Bytes after the last complete record: left by a writer killed mid-write.
    pub torn: Option<Torn>,
    /// The last complete record closes the file (`log-close`, `cmkp11 audit rotate`):
    /// nothing may be appended after it; the log goes on in the file at the log's path.
    pub sealed: bool,
}

/// A torn region at the end of the log: bytes after the last complete record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Torn {
    /// Offset of its first byte.
    pub offset: u64,
    /// Its length in bytes once terminated (the writer adds a newline if it lacks one).
    pub len: u64,
    /// SHA-256 of its bytes once terminated.
    pub hash: [u8; 32],
    /// Whether it ends with a newline already.
    pub terminated: bool,
}

impl Torn {
    fn of(region: &[u8], offset: u64) -> Torn {
        let terminated = region.last() == Some(&b'\n');
        let mut h = Sha256::new();
        h.update(region);
        if !terminated {
            h.update(b"\n");
        }
        Torn {
            offset,
            len: region.len() as u64 + u64::from(!terminated),
            hash: h.finalize().into(),
            terminated,
        }
    }

    /// The `reason` of the record that marks a torn region (verify parses it back).
    pub fn reason(&self) -> String {
        format!(
            "torn offset={} len={} sha256={}",
            self.offset,
            self.len,
            hex(&self.hash)
        )
    }
}

/// Parses the `reason` of a torn marker: offset, length, SHA-256 of the region.
pub fn parse_torn_reason(reason: &str) -> Option<(u64, u64, [u8; 32])> {
    let mut it = reason.split(' ');
    if it.next()? != "torn" {
        return None;
    }
    let mut f = |k: &str| it.next()?.strip_prefix(k).map(str::to_owned);
    let off = f("offset=")?.parse().ok()?;
    let len = f("len=")?.parse().ok()?;
    let h = unhex(&f("sha256=")?)?.try_into().ok()?;
    Some((off, len, h))
}

/// Reads the end of a log of `len` bytes and finds the chain head and any torn tail.
///
/// Looks at the last `4 * MAX_LINE` bytes: enough for the last complete record plus a
/// torn one. The head is the last newline-terminated line that is a complete record; all
/// bytes after it are torn (a complete record still missing its newline included: it was
/// never acknowledged to its caller). A log whose window holds no complete record is a
/// single torn first record if the window is the whole file, otherwise an error.
pub fn read_tail(f: &File, len: u64) -> std::io::Result<Tail> {
    // Usually the last record is in the last 4 KiB; look further only if it is not.
    for window in [4096, 4 * MAX_LINE as u64] {
        let window = window.min(len);
        let start = len - window;
        let mut buf = vec![0u8; window as usize];
        f.read_exact_at(&mut buf, start)?;
        if let Some(t) = scan_tail(&buf, start) {
            return Ok(t);
        }
    }
    Err(std::io::Error::other(format!(
        "no complete record in the last {} KiB of the audit log",
        4 * MAX_LINE / 1024
    )))
}

/// [`read_tail`] over bytes already read: `buf` holds the file from offset `start` to its end.
pub fn scan_tail(buf: &[u8], start: u64) -> Option<Tail> {
    let mut nl: Vec<usize> = buf
        .iter()
        .enumerate()
        .filter(|(_, &b)| b == b'\n')
        .map(|(i, _)| i)
        .collect();
    while let Some(le) = nl.pop() {
        let ls = match nl.last() {
            Some(&p) => p + 1,
            None if start == 0 => 0,
            None => break, // the window cut this line
        };
        let line = &buf[ls..le];
        if record::is_complete(line) {
            if let Some(seq) = record::quick_seq(line) {
                let after = le + 1;
                return Some(Tail {
                    seq,
                    hash: line_hash(line),
                    sealed: record::quick_op_is(line, record::OP_CLOSE),
                    torn: (after < buf.len())
                        .then(|| Torn::of(&buf[after..], start + after as u64)),
                });
            }
        }
    }
    (start == 0).then(|| Tail {
        seq: 0,
        hash: GENESIS,
        sealed: false,
        torn: (!buf.is_empty()).then(|| Torn::of(buf, 0)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = r#"{"time":"t","seq":1,"x":1,"prev":"00","mac":null}"#;
    const B: &str = r#"{"time":"t","seq":2,"x":1,"prev":"11","mac":"ab"}"#;

    #[test]
    fn tails() {
        let t = scan_tail(b"", 0).unwrap();
        assert_eq!((t.seq, t.torn), (0, None));
        let log = format!("{A}\n{B}\n");
        let t = scan_tail(log.as_bytes(), 0).unwrap();
        assert_eq!((t.seq, t.hash, t.torn), (2, line_hash(B.as_bytes()), None));
        // torn third record, and a complete one missing only its newline
        for cut in [10, B.len()] {
            let log = format!("{A}\n{B}\n{}", &B[..cut]);
            let t = scan_tail(log.as_bytes(), 0).unwrap();
            assert_eq!(t.seq, 2);
            let torn = t.torn.unwrap();
            assert_eq!(torn.offset as usize, A.len() + B.len() + 2);
            assert_eq!(torn.len as usize, cut + 1);
            assert!(!torn.terminated);
            let mut r = B[..cut].to_string();
            r.push('\n');
            assert_eq!(torn.hash, line_hash(r.as_bytes()));
        }
        // a torn first record
        let t = scan_tail(&A.as_bytes()[..5], 0).unwrap();
        assert_eq!((t.seq, t.hash), (0, GENESIS));
        assert_eq!(t.torn.unwrap().len, 6);
        // a window that cuts the only line: unknown head
        assert!(scan_tail(&A.as_bytes()[3..], 100).is_none());
        let log = format!("{}\n{A}\n", &B[4..]);
        assert_eq!(scan_tail(log.as_bytes(), 100).unwrap().seq, 1);
        let mut c = Checkpoint {
            seq: 9,
            hash: [7; 32],
            mac: vec![1, 2],
            end: Some(300),
            gap: 4,
        };
        assert_eq!(Checkpoint::decode(&c.encode()), Some(c.clone()));
        let v1 = format!("cmkp11-audit-checkpoint v1 9 {} 0102", hex(&[7; 32]));
        (c.end, c.gap) = (None, 0);
        assert_eq!(Checkpoint::decode(v1.as_bytes()), Some(c));
        let torn = Torn::of(b"abc", 5);
        assert_eq!(parse_torn_reason(&torn.reason()), Some((5, 4, torn.hash)));
    }
}
