//! Each rank's part of the training stream in a run of several processes
//! (`data.sharding`), and where each rank resumes.
//!
//! - `documents`: rank r of W reads only the documents that hash to shard r
//!   ([`Shard`]), with its own shuffle seed and its own cursor. A checkpoint
//!   holds every rank's cursor; resuming at the same world size continues
//!   each rank exactly.
//! - `rows`: every rank reads the whole stream with the global batch size
//!   (W × `train.batch_size`) and keeps rows `r·B .. (r+1)·B`, so the run sees
//!   the batches one process with the global batch would, at any W. One
//!   cursor serves every rank.
//!
//! Resuming at another world size under `documents` cannot continue the old
//! shards exactly. Each source restarts, on every new rank, at the earliest
//! document any old rank had not finished: nothing is skipped, and the
//! documents the other old ranks had read past that point (at most what they
//! read since the slowest rank's position, plus shuffle buffers) are read
//! again. The shuffle buffers start empty.

use super::stream::{Batch, Cursor, DataStream, Shard, SourceCursor, SplitMix64, StreamOptions};
use crate::config::{DataConfig, Sharding};
use crate::dist::World;
use anyhow::Result;
use std::sync::Arc;
use tokenizers::Tokenizer;

/// This rank's training stream.
pub struct RankStream {
    stream: DataStream,
    /// Under `rows`: (rank, rows per rank) of each global batch.
    rows: Option<(usize, usize)>,
}

/// The shuffle seed of rank `rank`: the run's seed on rank 0, so one
/// process draws what it always did.
fn rank_seed(seed: u64, rank: usize) -> u64 {
    seed ^ (rank as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

impl RankStream {
    /// Open this rank's stream. `saved` holds a checkpoint's cursors, rank 0
    /// first (one cursor under `rows` or for one process).
    pub fn open(
        cfg: &DataConfig,
        tok: Arc<Tokenizer>,
        mut opts: StreamOptions,
        world: World,
        saved: Option<Vec<Cursor>>,
    ) -> Result<Self> {
        let rows = (world.size > 1 && cfg.sharding == Sharding::Rows)
            .then_some((world.rank, opts.batch_size));
        let shard = match rows {
            Some(_) => Shard::WHOLE,
            None => Shard {
                index: world.rank,
                count: world.size,
            },
        };
        match rows {
            Some((_, b)) => opts.batch_size = b * world.size,
            None => opts.seed = rank_seed(opts.seed, world.rank),
        }
        opts.shard = shard;
        let cursor = saved.map(|all| resume_cursor(&all, shard, opts.seed));
        Ok(Self {
            stream: DataStream::open(cfg, tok, opts, cursor)?,
            rows,
        })
    }

    /// This rank's next batch.
    pub fn next_batch(&mut self) -> Result<Option<Batch>> {
        let batch = self.stream.next_batch()?;
        Ok(match (batch, self.rows) {
            (Some(b), Some((rank, n))) => Some(b.rows_slice(rank * n, n)),
            (b, _) => b,
        })
    }

    /// Where this rank's stream stands.
    pub fn cursor(&self) -> Cursor {
        self.stream.cursor()
    }

    /// Bad records skipped so far.
    pub fn bad_records_skipped(&self) -> u64 {
        self.stream.bad_records_skipped()
    }
}

/// The cursor a stream reading `shard` resumes from, given the cursors a
/// checkpoint holds (rank 0 first): the one saved for that shard if the
/// shards are unchanged, otherwise a merge (see the module header).
pub fn resume_cursor(saved: &[Cursor], shard: Shard, seed: u64) -> Cursor {
    if let Some(c) = saved
        .iter()
        .find(|c| c.shard == shard && c.shard.count == saved.len())
    {
        return c.clone();
    }
    let first = &saved[0];
    let n_sources = first.sources.len();
    let sources = (0..n_sources)
        .map(|s| {
            let all = || saved.iter().filter_map(|c| c.sources.get(s));
            let earliest = all()
                .map(|c| c.resume)
                .min_by_key(|p| (p.epoch, p.file, p.offset))
                .unwrap_or_default();
            let emitted: u64 = all().map(|c| c.emitted_tokens).sum();
            SourceCursor {
                resume: earliest,
                skip_tokens: 0,
                emitted_tokens: emitted / shard.count as u64,
                exhausted: all().all(|c| c.exhausted),
            }
        })
        .collect();
    Cursor {
        seq_len: first.seq_len,
        split: first.split,
        sources,
        active: None,
        window: Vec::new(),
        window_sources: Vec::new(),
        shuffle: Vec::new(),
        rng: SplitMix64(seed),
        batches: saved.iter().map(|c| c.batches).max().unwrap_or(0),
        shard,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::sources::DocPos;
    use crate::data::stream::{Split, Window};

    fn cursor(shard: Shard, positions: &[(u64, usize, u64)], emitted: u64) -> Cursor {
        Cursor {
            seq_len: 8,
            split: Split::Train,
            sources: positions
                .iter()
                .map(|&(epoch, file, offset)| SourceCursor {
                    resume: DocPos {
                        epoch,
                        file,
                        offset,
                        line: 1,
                    },
                    skip_tokens: 3,
                    emitted_tokens: emitted,
                    exhausted: false,
                })
                .collect(),
            active: Some(0),
            window: vec![1, 2, 3],
            window_sources: vec![(0, 3)],
            shuffle: vec![Window {
                tokens: vec![7; 9],
                valid: 8,
                sources: vec![(0, 9)],
            }],
            rng: SplitMix64(99),
            batches: 10,
            shard,
        }
    }

    #[test]
    fn the_same_world_resumes_each_rank_exactly() {
        let saved: Vec<Cursor> = (0..2)
            .map(|r| cursor(Shard { index: r, count: 2 }, &[(0, r, 100)], 50))
            .collect();
        for r in 0..2 {
            let c = resume_cursor(&saved, Shard { index: r, count: 2 }, 5);
            assert_eq!(c, saved[r]);
        }
        let one = vec![cursor(Shard::WHOLE, &[(1, 0, 7)], 50)];
        assert_eq!(resume_cursor(&one, Shard::WHOLE, 5), one[0]);
    }

    #[test]
    fn another_world_restarts_at_the_earliest_unfinished_document() {
        // Two old ranks; source 0 stands at epoch 1 file 0 on rank 0 and at
        // epoch 0 file 3 on rank 1; source 1 the other way round.
        let saved = vec![
            cursor(Shard { index: 0, count: 2 }, &[(1, 0, 10), (0, 2, 500)], 60),
            cursor(
                Shard { index: 1, count: 2 },
                &[(0, 3, 900), (0, 2, 400)],
                40,
            ),
        ];
        for (shard, share) in [(Shard::WHOLE, 100), (Shard { index: 2, count: 3 }, 33)] {
            let c = resume_cursor(&saved, shard, 5);
            let at: Vec<_> = c
                .sources
                .iter()
                .map(|s| (s.resume.epoch, s.resume.file, s.resume.offset))
                .collect();
            assert_eq!(at, [(0, 3, 900), (0, 2, 400)]);
            assert!(c.sources.iter().all(|s| s.skip_tokens == 0));
            assert!(c.sources.iter().all(|s| s.emitted_tokens == share));
            assert!(c.window.is_empty() && c.shuffle.is_empty() && c.active.is_none());
            assert_eq!((c.shard, c.rng, c.batches), (shard, SplitMix64(5), 10));
        }
    }
}
