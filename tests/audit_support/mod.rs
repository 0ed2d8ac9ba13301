//! Test-only helpers for the audit tests.
//!
//! [`SoftMac`] is a TEST DOUBLE of the token side of the audit log: an HMAC-SHA256 key in
//! memory and a checkpoint kept in a file (so that several processes share it, as they
//! share the token's checkpoint object). Production uses the runtime's implementation
//! over a non-extractable HMAC key inside the token; nothing here is built into the
//! library.
#![allow(dead_code)]

use cmkp11::audit::{Auditor, TokenMac, Tuning};
use cmkp11::config::Audit;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A software stand-in for the token's audit key and checkpoint object.
pub struct SoftMac {
    key: Vec<u8>,
    checkpoint: PathBuf,
    /// Calls of `mac` (to show that MACs are per checkpoint, not per record).
    pub macs: AtomicU64,
    /// Calls of `store_checkpoint`.
    pub stores: AtomicU64,
}

impl SoftMac {
    /// A double whose checkpoint lives next to the log (`<log>.ckpt`).
    pub fn for_log(log: &Path) -> Arc<SoftMac> {
        Self::with_key(log, b"test-only audit key, not a secret")
    }

    /// The same, with another key (a "wrong token").
    pub fn with_key(log: &Path, key: &[u8]) -> Arc<SoftMac> {
        let mut checkpoint = log.as_os_str().to_owned();
        checkpoint.push(".ckpt");
        Arc::new(SoftMac {
            key: key.to_vec(),
            checkpoint: checkpoint.into(),
            macs: AtomicU64::new(0),
            stores: AtomicU64::new(0),
        })
    }

    /// Where the checkpoint is kept.
    pub fn checkpoint_path(&self) -> &Path {
        &self.checkpoint
    }
}

impl TokenMac for SoftMac {
    fn mac(&self, data: &[u8]) -> Result<Vec<u8>, u64> {
        self.macs.fetch_add(1, Ordering::Relaxed);
        let mut m = Hmac::<Sha256>::new_from_slice(&self.key).map_err(|_| 5u64)?;
        m.update(data);
        Ok(m.finalize().into_bytes().to_vec())
    }

    fn load_checkpoint(&self) -> Result<Option<Vec<u8>>, u64> {
        match std::fs::read(&self.checkpoint) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(_) => Err(6),
        }
    }

    fn store_checkpoint(&self, data: &[u8]) -> Result<(), u64> {
        self.stores.fetch_add(1, Ordering::Relaxed);
        // write + rename: a reader never sees half a checkpoint
        let tmp = self.checkpoint.with_extension("ckpt.tmp");
        std::fs::write(&tmp, data).map_err(|_| 6u64)?;
        std::fs::rename(&tmp, &self.checkpoint).map_err(|_| 6u64)
    }
}

/// `[audit]` for a log file.
pub fn cfg(file: &Path, on_failure: &str) -> Audit {
    Audit {
        file: Some(file.to_owned()),
        syslog: false,
        syslog_socket: None,
        on_failure: on_failure.into(),
    }
}

/// An auditor on `file` with the double and small checkpoint intervals.
pub fn auditor(file: &Path, mac: &Arc<SoftMac>, every: u32) -> Auditor {
    Auditor::open_with(
        &cfg(file, "deny"),
        Some(mac.clone() as Arc<dyn TokenMac>),
        Tuning {
            checkpoint_records: every,
            ..Tuning::default()
        },
    )
    .expect("open")
}

/// The log's lines.
pub fn lines(file: &Path) -> Vec<String> {
    std::fs::read_to_string(file)
        .expect("read log")
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Rewrites the log from lines (each gets its newline back).
pub fn write_lines(file: &Path, lines: &[String]) {
    let mut s = lines.join("\n");
    s.push('\n');
    std::fs::write(file, s).expect("write log");
}

/// A typical CMK use record.
pub fn use_record(i: u64) -> cmkp11::audit::Record {
    cmkp11::audit::Record {
        op: ["encrypt", "decrypt", "sign", "wrap", "unwrap"][(i % 5) as usize].into(),
        mechanism: Some(0x1087), // CKM_AES_GCM
        key: Some(format!("payments-{}", i % 3)),
        key_id: Some(vec![0xab, 0xcd, (i % 256) as u8]),
        version: Some(1 + (i % 2) as u32),
        result: 0,
        reason: None,
        slot: Some(0),
        token: Some("cmkp11-test".into()),
        session: Some(1 + i % 4),
    }
}
