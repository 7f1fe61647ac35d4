//! Where a stream stands after any batch: each source's position (the
//! start of its first unconsumed document, and how many tokens of it were
//! used), the partial window, the shuffle buffer and the RNG. A checkpoint
//! stores it, and a stream reopened from it yields exactly the batches an
//! uninterrupted one would.

use super::batch::{Window, UNKNOWN_SOURCE};
use super::rng::SplitMix64;
use super::sources::DocPos;
use super::split::{Shard, Split};
use anyhow::{bail, Result};
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

impl Cursor {
    /// Refuse a cursor that this stream could not continue from, before it
    /// is used: the partial window no longer than `seq_len` tokens, each
    /// shuffled window `seq_len + 1` tokens with at most `seq_len` targets,
    /// every token id below `vocab` (the tokenizer's size), and every
    /// source index (the part-consumed document's, the runs') one of the
    /// cursor's sources. Only a damaged or hand-edited checkpoint fails.
    pub fn check(&self, vocab: usize) -> Result<()> {
        let n = self.sources.len();
        let damaged = |what: String| -> Result<()> {
            bail!("the data cursor in the checkpoint is damaged: {what}")
        };
        if let Some(a) = self.active.filter(|&a| a >= n) {
            return damaged(format!("its active source {a} is not one of its {n}"));
        }
        if self.window.len() > self.seq_len {
            return damaged(format!(
                "its partial window holds {} tokens, more than seq_len = {}",
                self.window.len(),
                self.seq_len
            ));
        }
        let runs = |what: &str, spans: &[(u16, u32)], len: usize| -> Result<()> {
            let covered: u64 = spans.iter().map(|s| s.1 as u64).sum();
            if covered > len as u64 {
                return damaged(format!("{what} gives sources to {covered} tokens of {len}"));
            }
            if let Some(s) = spans
                .iter()
                .find(|s| s.0 != UNKNOWN_SOURCE && s.0 as usize >= n)
            {
                return damaged(format!("{what} names source {}, of {n}", s.0));
            }
            Ok(())
        };
        runs(
            "the partial window",
            &self.window_sources,
            self.window.len(),
        )?;
        let token = |what: &str, tokens: &[u32]| -> Result<()> {
            match tokens.iter().find(|&&t| t as usize >= vocab) {
                Some(t) => damaged(format!(
                    "{what} holds token id {t}, past the tokenizer's {vocab}"
                )),
                None => Ok(()),
            }
        };
        token("the partial window", &self.window)?;
        for (i, w) in self.shuffle.iter().enumerate() {
            let what = format!("shuffled window {i}");
            if w.tokens.len() != self.seq_len + 1 || w.valid > self.seq_len {
                return damaged(format!(
                    "{what} holds {} tokens and {} targets, where a window holds {} and at most {}",
                    w.tokens.len(),
                    w.valid,
                    self.seq_len + 1,
                    self.seq_len
                ));
            }
            runs(&what, &w.sources, w.tokens.len())?;
            token(&what, &w.tokens)?;
        }
        Ok(())
    }
}
