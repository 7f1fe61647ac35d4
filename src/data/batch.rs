//! Windows and batches: what the token stream yields.
//!
//! A [`Window`] is `seq_len + 1` packed tokens with the sources they came
//! from; a [`Batch`] stacks windows into row-major token and mask arrays,
//! with each input token's source for the per-domain routing statistics.

use serde::{Deserialize, Serialize};

/// `seq_len + 1` tokens, of which the first `valid` targets count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    /// Token ids, `seq_len + 1` of them.
    pub tokens: Vec<u32>,
    /// Number of real target positions (seq_len except for the last window of a split).
    pub valid: usize,
    /// Which source each token came from, as runs: `(source, tokens)` in
    /// order (a window can straddle documents of several sources).
    #[serde(default)]
    pub sources: Vec<(u16, u32)>,
}

/// Append `n` tokens of `source` to the runs `spans`.
pub(super) fn push_span(spans: &mut Vec<(u16, u32)>, source: u16, n: u32) {
    match spans.last_mut() {
        Some((s, count)) if *s == source => *count += n,
        _ => spans.push((source, n)),
    }
}

/// The source of the token at each of the first `n` positions of a window
/// with runs `spans`; [`UNKNOWN_SOURCE`] past them.
fn expand_spans(spans: &[(u16, u32)], n: usize) -> impl Iterator<Item = u16> + '_ {
    spans
        .iter()
        .flat_map(|&(s, c)| std::iter::repeat_n(s, c as usize))
        .chain(std::iter::repeat(UNKNOWN_SOURCE))
        .take(n)
}

/// The source index of a token whose source is not known (a window saved
/// in a checkpoint from before sources were tracked).
pub const UNKNOWN_SOURCE: u16 = u16::MAX;

/// A batch of windows.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Token ids, row-major `[rows, seq_len + 1]`; inputs are `[.., :seq_len]`,
    /// targets `[.., 1:]`.
    pub tokens: Vec<u32>,
    /// Loss mask over targets, `[rows, seq_len]`: 1.0 real, 0.0 padding.
    pub mask: Vec<f32>,
    /// Number of rows (the batch size, or fewer at the end of a split).
    pub rows: usize,
    /// Tokens per input row.
    pub seq_len: usize,
    /// The source (`data.sources` index) of each input token, `[rows,
    /// seq_len]`; empty when unknown, [`UNKNOWN_SOURCE`] for a token whose
    /// source is unknown.
    pub sources: Vec<u16>,
}

impl Batch {
    pub(super) fn from_windows(windows: Vec<Window>, seq_len: usize) -> Self {
        let rows = windows.len();
        let mut tokens = Vec::with_capacity(rows * (seq_len + 1));
        let mut mask = Vec::with_capacity(rows * seq_len);
        let mut sources = Vec::with_capacity(rows * seq_len);
        for w in windows {
            tokens.extend_from_slice(&w.tokens);
            mask.extend((0..seq_len).map(|i| if i < w.valid { 1.0 } else { 0.0 }));
            sources.extend(expand_spans(&w.sources, seq_len));
        }
        Self {
            tokens,
            mask,
            rows,
            seq_len,
            sources,
        }
    }

    /// Rows `start..start + n` of the batch (fewer if it ends sooner).
    pub fn rows_slice(&self, start: usize, n: usize) -> Batch {
        let (start, end) = (start.min(self.rows), (start + n).min(self.rows));
        let (t, w) = (self.seq_len, self.seq_len + 1);
        Batch {
            tokens: self.tokens[start * w..end * w].to_vec(),
            mask: self.mask[start * t..end * t].to_vec(),
            rows: end - start,
            seq_len: t,
            sources: if self.sources.is_empty() {
                Vec::new()
            } else {
                self.sources[start * t..end * t].to_vec()
            },
        }
    }

    /// Number of real target tokens.
    pub fn num_tokens(&self) -> usize {
        self.mask.iter().filter(|&&m| m > 0.0).count()
    }
}
