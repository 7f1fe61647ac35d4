//! The token stream: documents → tokens (background threads) → weighted mix →
//! packed `seq_len + 1` windows → seeded shuffle buffer → batches.
//!
//! Each source has a reader thread that reads documents in order, keeps those
//! of the requested split (decided by a hash of the document text, so the
//! split is the same on every run), and tokenizes them on a shared pool of
//! worker threads, sending them over a bounded channel. The consumer mixes
//! sources by tokens (the source furthest below its weighted share goes
//! next), appends EOS after each document, and cuts the token stream into
//! windows of `seq_len + 1` with stride `seq_len`, so every token is predicted
//! exactly once.
//!
//! Memory is bounded by the channel depth, the shuffle buffer and the
//! largest document (or parquet row group), whatever the corpus size.
//!
//! A [`Cursor`] captures, after any batch, where each source stands (the
//! start of its first unconsumed document, and how many tokens of it were
//! used), the partial window, the shuffle buffer and the RNG, so a stream
//! reopened from it yields exactly the batches an uninterrupted one would.

mod pack;

pub use super::batch::{Batch, Window, UNKNOWN_SOURCE};
pub use super::cursor::{Cursor, SourceCursor};
use super::files::resolve_files;
pub use super::rng::SplitMix64;
use super::sources::DocPos;
pub use super::split::{is_validation, Shard, Split};
use super::workers::{reader_thread, Msg, TokDoc};
use super::{tokenizer, DataConfig};
use anyhow::{bail, Context, Result};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;
use tokenizers::Tokenizer;

/// Options of one stream.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    /// Tokens per input row.
    pub seq_len: usize,
    /// Rows per batch.
    pub batch_size: usize,
    /// Train or validation.
    pub split: Split,
    /// Seed of the shuffle buffer.
    pub seed: u64,
    /// The documents this stream reads ([`Shard::WHOLE`] for one process).
    pub shard: Shard,
}

struct Source {
    rx: Option<Receiver<Msg>>,
    handle: Option<JoinHandle<()>>,
    queue: VecDeque<TokDoc>,
    ended: bool,
    weight: f64,
    skipped: u64,
    cursor: SourceCursor,
}

struct Active {
    source: usize,
    doc: TokDoc,
    consumed: usize,
}

/// A stream of batches over the configured sources.
pub struct DataStream {
    sources: Vec<Source>,
    stop: Arc<AtomicBool>,
    opts: StreamOptions,
    eos: u32,
    active: Option<Active>,
    /// After a resume: the source whose part-consumed document comes first.
    force_next: Option<usize>,
    window: Vec<u32>,
    window_sources: Vec<(u16, u32)>,
    shuffle: Vec<Window>,
    shuffle_cap: usize,
    drained: bool,
    rng: SplitMix64,
    batches: u64,
}

impl DataStream {
    /// Open a stream over `cfg`'s sources, from the start or from `cursor`.
    pub fn open(
        cfg: &DataConfig,
        tok: Arc<Tokenizer>,
        opts: StreamOptions,
        cursor: Option<Cursor>,
    ) -> Result<Self> {
        cfg.validate()?;
        if opts.seq_len == 0 || opts.batch_size == 0 {
            bail!("seq_len and batch_size must be positive");
        }
        let eos = tokenizer::eos_id(&tok, &cfg.eos_token)?;
        if let Some(c) = &cursor {
            if c.sources.len() != cfg.sources.len()
                || c.seq_len != opts.seq_len
                || c.split != opts.split
                || c.shard != opts.shard
            {
                bail!(
                    "the data cursor does not fit this configuration: it was saved for {} source(s), \
                     seq_len {}, {:?} split, shard {} of {}; now {} source(s), seq_len {}, {:?} split, \
                     shard {} of {}",
                    c.sources.len(),
                    c.seq_len,
                    c.split,
                    c.shard.index,
                    c.shard.count,
                    cfg.sources.len(),
                    opts.seq_len,
                    opts.split,
                    opts.shard.index,
                    opts.shard.count
                );
            }
            c.check(tok.get_vocab_size(true))?;
        }
        let pool = Arc::new(
            rayon::ThreadPoolBuilder::new()
                .num_threads(cfg.workers)
                .thread_name(|i| format!("tokenize-{i}"))
                .build()
                .context("starting tokenization threads")?,
        );
        let stop = Arc::new(AtomicBool::new(false));
        let mut sources = Vec::new();
        for (i, sc) in cfg.sources.iter().enumerate() {
            let files = Arc::new(resolve_files(sc, i)?);
            let state = cursor
                .as_ref()
                .map(|c| c.sources[i].clone())
                .unwrap_or(SourceCursor {
                    resume: DocPos::default(),
                    skip_tokens: 0,
                    emitted_tokens: 0,
                    exhausted: false,
                });
            if !state.exhausted && state.resume.file >= files.len() {
                bail!(
                    "data source {i}: the cursor resumes at file {} of its {} (corpus changed \
                     since it was saved?)",
                    state.resume.file,
                    files.len()
                );
            }
            let (tx, rx) = sync_channel(4);
            let handle = (!state.exhausted).then(|| {
                let (tok, pool, stop) = (tok.clone(), pool.clone(), stop.clone());
                let (split, shard, frac, bad, start) = (
                    opts.split,
                    opts.shard,
                    cfg.val_fraction,
                    cfg.on_bad_record,
                    state.resume,
                );
                std::thread::Builder::new()
                    .name(format!("data-source-{i}"))
                    .spawn(move || {
                        reader_thread(
                            i, files, start, split, shard, frac, bad, tok, eos, pool, tx, stop,
                        )
                    })
            });
            sources.push(Source {
                rx: Some(rx),
                handle: handle
                    .transpose()
                    .context("starting a data reader thread")?,
                queue: VecDeque::new(),
                ended: state.exhausted,
                weight: sc.weight,
                skipped: 0,
                cursor: state,
            });
        }
        let shuffle_cap = match opts.split {
            Split::Train => cfg.shuffle_buffer,
            Split::Validation => 0,
        };
        let (window, mut window_sources, shuffle, rng, batches, force_next) = match cursor {
            Some(c) => (
                c.window,
                c.window_sources,
                c.shuffle,
                c.rng,
                c.batches,
                c.active,
            ),
            None => (
                Vec::new(),
                Vec::new(),
                Vec::new(),
                SplitMix64(opts.seed),
                0,
                None,
            ),
        };
        // A cursor saved before sources were tracked: its partial window's
        // tokens are of unknown source.
        let covered: usize = window_sources.iter().map(|s| s.1 as usize).sum();
        if covered < window.len() {
            window_sources.insert(0, (UNKNOWN_SOURCE, (window.len() - covered) as u32));
        }
        Ok(Self {
            sources,
            stop,
            opts,
            eos,
            active: None,
            force_next,
            window,
            window_sources,
            shuffle,
            shuffle_cap,
            drained: false,
            rng,
            batches,
        })
    }

    /// The next batch, or `None` when a validation stream is done.
    pub fn next_batch(&mut self) -> Result<Option<Batch>> {
        let mut rows = Vec::with_capacity(self.opts.batch_size);
        while rows.len() < self.opts.batch_size {
            match self.next_shuffled()? {
                Some(w) => rows.push(w),
                None => break,
            }
        }
        if rows.is_empty() {
            if self.batches == 0 {
                match self.opts.split {
                    Split::Validation => bail!(
                        "the corpus produced no tokens for the validation split: no document \
                         fell in its share (data.val_fraction, drawn by a hash of each \
                         document's text); raise data.val_fraction, cut the corpus into more \
                         documents, or evaluate nothing (train.eval_every = 0)"
                    ),
                    Split::Train => bail!(
                        "the corpus produced no tokens for the training split: every document \
                         fell in the validation share (data.val_fraction); lower it, or cut \
                         the corpus into more documents"
                    ),
                }
            }
            return Ok(None);
        }
        self.batches += 1;
        Ok(Some(Batch::from_windows(rows, self.opts.seq_len)))
    }

    /// Where the stream stands after the last batch returned.
    pub fn cursor(&self) -> Cursor {
        Cursor {
            seq_len: self.opts.seq_len,
            split: self.opts.split,
            sources: self.sources.iter().map(|s| s.cursor.clone()).collect(),
            active: self.active.as_ref().map(|a| a.source).or(self.force_next),
            window: self.window.clone(),
            window_sources: self.window_sources.clone(),
            shuffle: self.shuffle.clone(),
            rng: self.rng,
            batches: self.batches,
            shard: self.opts.shard,
        }
    }

    /// Bad records skipped so far under `on_bad_record = "skip"`, all sources.
    pub fn bad_records_skipped(&self) -> u64 {
        self.sources.iter().map(|s| s.skipped).sum()
    }

    fn next_shuffled(&mut self) -> Result<Option<Window>> {
        if self.shuffle_cap <= 1 {
            return self.next_window();
        }
        while self.shuffle.len() < self.shuffle_cap && !self.drained {
            match self.next_window()? {
                Some(w) => self.shuffle.push(w),
                None => self.drained = true,
            }
        }
        if self.shuffle.is_empty() {
            return Ok(None);
        }
        let i = self.rng.below(self.shuffle.len());
        Ok(Some(self.shuffle.swap_remove(i)))
    }
}

impl Drop for DataStream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for s in &mut self.sources {
            // Dropping the receiver unblocks a reader waiting to send.
            s.rx.take();
            if let Some(h) = s.handle.take() {
                let _ = h.join();
            }
        }
    }
}
