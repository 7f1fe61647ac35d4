//! Where a stream stands after any batch: each source's position (the
//! start of its first unconsumed document, and how many tokens of it were
//! used), the partial window, the shuffle buffer and the RNG. A checkpoint
//! stores it, and a stream reopened from it yields exactly the batches an
//! uninterrupted one would.

use super::batch::Window;
use super::rng::SplitMix64;
use super::sources::DocPos;
use super::split::{Shard, Split};
use serde::{Deserialize, Serialize};

/// Where one source stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceCursor {
    /// Start of the first document not fully consumed.
    pub resume: DocPos,
    /// Tokens of that document already consumed (EOS included in the count).
    pub skip_tokens: u64,
    /// Tokens this source has contributed so far (drives the mixing).
    pub emitted_tokens: u64,
    /// The source has ended (validation split only).
    pub exhausted: bool,
}

/// Everything needed to continue a stream exactly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// Window length minus one, to refuse a resume at another length.
    pub seq_len: usize,
    /// The split this cursor belongs to.
    pub split: Split,
    /// One per source, in config order.
    pub sources: Vec<SourceCursor>,
    /// The source whose document is part-consumed, if any.
    pub active: Option<usize>,
    /// The partially filled window.
    pub window: Vec<u32>,
    /// Its tokens' sources, as runs (see [`Window::sources`]).
    #[serde(default)]
    pub window_sources: Vec<(u16, u32)>,
    /// The shuffle buffer's windows.
    pub shuffle: Vec<Window>,
    /// Shuffle RNG state.
    pub rng: SplitMix64,
    /// Batches produced so far.
    pub batches: u64,
    /// The share of the documents this cursor's stream reads.
    #[serde(default)]
    pub shard: Shard,
}
