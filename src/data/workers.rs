//! The background side of the stream: one reader thread per source reads
//! documents in order, keeps those of the requested split, tokenizes them on
//! a shared pool of worker threads, and sends them over a bounded channel.

use super::files::Format;
use super::sources::{DocPos, DocReader};
use super::split::{is_validation, Shard, Split};
use super::OnBadRecord;
use anyhow::anyhow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use tokenizers::Tokenizer;

/// A tokenized document (EOS appended) and where it lies.
pub struct TokDoc {
    /// Token ids, EOS last.
    pub tokens: Vec<u32>,
    /// Where the document starts.
    pub pos: DocPos,
    /// Where the next one starts.
    pub next: DocPos,
}

/// What a reader thread sends: documents (with the running count of
/// skipped records), the end of the source, or a failure.
pub enum Msg {
    /// Tokenized documents, in order; skipped records so far.
    Docs(Vec<TokDoc>, u64),
    /// The source has ended; skipped records in total.
    End(u64),
    /// Reading or tokenizing failed.
    Failed(anyhow::Error),
}

/// Read documents of one source, keep those of the split (and of this
/// rank's shard), tokenize them on
/// the pool and send them on, in order.
#[allow(clippy::too_many_arguments)]
pub fn reader_thread(
    index: usize,
    files: Arc<Vec<(PathBuf, Format)>>,
    start: DocPos,
    split: Split,
    shard: Shard,
    val_fraction: f64,
    on_bad: OnBadRecord,
    tok: Arc<Tokenizer>,
    eos: u32,
    pool: Arc<rayon::ThreadPool>,
    tx: SyncSender<Msg>,
    stop: Arc<AtomicBool>,
) {
    let repeat = split == Split::Train;
    let mut reader = DocReader::new(files, start, repeat, on_bad);
    // Start of the current run of documents outside the split: a full lap
    // around the corpus without one inside it means the split is empty.
    let mut miss_since: Option<DocPos> = None;
    let lapped = |since: &DocPos, now: &DocPos| {
        now.epoch > since.epoch && (now.file, now.offset) >= (since.file, since.offset)
    };
    loop {
        let (mut texts, mut spans, mut bytes, mut ended) = (Vec::new(), Vec::new(), 0, false);
        while texts.len() < 64 && bytes < (1 << 20) {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            match reader.next_doc() {
                Ok(Some(doc)) => {
                    if is_validation(&doc.text, val_fraction) == (split == Split::Validation)
                        && shard.holds(&doc.text)
                    {
                        miss_since = None;
                        bytes += doc.text.len();
                        spans.push((doc.pos, doc.next));
                        texts.push(doc.text);
                    } else {
                        let since = *miss_since.get_or_insert(doc.pos);
                        if repeat && lapped(&since, &doc.pos) {
                            let what = if shard.count > 1 {
                                format!(
                                    "for rank {} of {} (too few documents to share among the ranks?)",
                                    shard.index, shard.count
                                )
                            } else {
                                format!(
                                    "(corpus too small for data.val_fraction = {val_fraction}?)"
                                )
                            };
                            let _ = tx.send(Msg::Failed(anyhow!(
                                "data source {index} has no documents in the {split:?} split {what}"
                            )));
                            return;
                        }
                    }
                }
                Ok(None) => {
                    ended = true;
                    break;
                }
                Err(e) => {
                    let _ = tx.send(Msg::Failed(e));
                    return;
                }
            }
        }
        if !texts.is_empty() {
            let encoded = pool.install(|| tok.encode_batch_fast(texts, false));
            let docs = match encoded {
                Ok(encs) => encs
                    .into_iter()
                    .zip(spans)
                    .map(|(enc, (pos, next))| {
                        let mut tokens = Vec::with_capacity(enc.len() + 1);
                        tokens.extend_from_slice(enc.get_ids());
                        tokens.push(eos);
                        TokDoc { tokens, pos, next }
                    })
                    .collect(),
                Err(e) => {
                    let _ = tx.send(Msg::Failed(anyhow!("tokenizing: {e}")));
                    return;
                }
            };
            if tx.send(Msg::Docs(docs, reader.skipped())).is_err() {
                return;
            }
        }
        if ended {
            let _ = tx.send(Msg::End(reader.skipped()));
            return;
        }
    }
}
