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

/// One rank's share of the training documents: those whose text hashes
/// to `index` among `count` shards. The whole corpus is `{0, 1}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    /// This shard, `0..count`.
    pub index: usize,
    /// Number of shards.
    pub count: usize,
}

impl Default for Shard {
    fn default() -> Self {
        Self::WHOLE
    }
}

impl Shard {
    /// Every document.
    pub const WHOLE: Shard = Shard { index: 0, count: 1 };

    /// Whether the document with this text belongs to the shard. The hash is
    /// remixed so the shard is independent of the validation split.
    pub fn holds(&self, text: &str) -> bool {
        if self.count <= 1 {
            return true;
        }
        let mut x = super::rng::SplitMix64(fnv1a(text.as_bytes()) ^ 0x5368_6172_6400);
        (x.next_u64() % self.count as u64) as usize == self.index
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_document_is_in_exactly_one_shard_and_the_shards_are_even() {
        let docs: Vec<String> = (0..3000).map(|i| format!("document number {i}")).collect();
        for count in [1, 2, 3, 4] {
            let mut sizes = vec![0usize; count];
            for d in &docs {
                let holders: Vec<usize> = (0..count)
                    .filter(|&index| Shard { index, count }.holds(d))
                    .collect();
                assert_eq!(
                    holders.len(),
                    1,
                    "{d} is held by shards {holders:?} of {count}"
                );
                sizes[holders[0]] += 1;
            }
            let fair = docs.len() / count;
            for s in sizes {
                // 3000 draws: a shard 10% off its fair share is over 5 sigma away.
                assert!(s.abs_diff(fair) < fair / 10, "shard sizes {s} vs {fair}");
            }
        }
    }

    #[test]
    fn shards_do_not_follow_the_validation_split() {
        let docs: Vec<String> = (0..4000)
            .map(|i| format!("text {i} of the corpus"))
            .collect();
        let val: Vec<&String> = docs.iter().filter(|d| is_validation(d, 0.25)).collect();
        let in_shard0 = val
            .iter()
            .filter(|d| Shard { index: 0, count: 2 }.holds(d))
            .count();
        // About half of the validation documents fall in each of two shards.
        assert!(
            in_shard0.abs_diff(val.len() / 2) < val.len() / 8,
            "{in_shard0} of {}",
            val.len()
        );
    }
}
