//! The train/validation split: a document belongs to the validation split
//! by a hash of its text, so the split is the same on every run, machine
//! and version, and needs no index.

use serde::{Deserialize, Serialize};

/// Which part of the corpus a stream reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Split {
    /// Documents not held out; cycles forever, shuffled.
    Train,
    /// The held-out fraction; one pass, in order, then the stream ends.
    Validation,
}

/// Whether a document (by its text) belongs to the validation split.
pub fn is_validation(text: &str, val_fraction: f64) -> bool {
    let h = fnv1a(text.as_bytes());
    ((h >> 11) as f64 / (1u64 << 53) as f64) < val_fraction
}

/// FNV-1a, 64-bit: a hash stable across runs, platforms and versions.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}
