//! IVs that cmkp11 generates itself for encryption under a CMK that the calling process
//! may encrypt with but not decrypt with, so that it cannot choose the IV (PKCS#11 modules
//! of HSMs in FIPS mode do the same). With AES-GCM, encrypting zeros under the IV of someone else's ciphertext gives
//! the keystream that decrypts it: a key that may encrypt would then decrypt.
//!
//! AES-GCM IVs are 96-bit deterministic IVs (NIST SP 800-38D §8.2.1): a random field
//! drawn once per initialized library (so per process: a forked child initializes again)
//! and a 64-bit invocation counter, combined so that no two IVs of one process repeat and
//! IVs of different processes collide only as two random 96-bit values would. Drawing them
//! costs one atomic increment, so the hot path keeps its speed. AES-CBC IVs must be
//! unpredictable, not only unique: they come from the token's random generator.

use std::sync::atomic::{AtomicU64, Ordering};

/// The source of AES-GCM IVs of one initialized library.
pub struct IvSource {
    field: [u8; 12],
    counter: AtomicU64,
}

impl IvSource {
    /// A source with a fresh random field (from the kernel's random generator).
    pub fn new() -> IvSource {
        use std::io::Read;
        let mut field = [0u8; 12];
        let got = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut field));
        if got.is_err() {
            // No /dev/urandom: the clock and the pid, hashed (unique per process start).
            use sha2::Digest;
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let h = sha2::Sha256::digest(format!("{t}/{}", std::process::id()));
            field.copy_from_slice(&h[..12]);
        }
        IvSource {
            field,
            counter: AtomicU64::new(0),
        }
    }

    /// The next 96-bit IV.
    pub fn next(&self) -> [u8; 12] {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut iv = self.field;
        for (b, c) in iv[4..].iter_mut().zip(n.to_be_bytes()) {
            *b ^= c;
        }
        iv
    }
}

impl Default for IvSource {
    fn default() -> Self {
        IvSource::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ivs_never_repeat_within_a_source_and_differ_between_sources() {
        let a = IvSource::new();
        let b = IvSource::new();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            assert!(seen.insert(a.next()));
        }
        assert_ne!(a.field, b.field);
    }
}
