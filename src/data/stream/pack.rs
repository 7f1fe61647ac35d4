//! Packing: the next document of a source, the choice of source by its
//! weighted share of tokens, and the cut of the mixed token stream into
//! `seq_len + 1` windows with stride `seq_len`, advancing each source's
//! cursor as its tokens are used.

use super::{Active, DataStream, Window, UNKNOWN_SOURCE};
use crate::data::batch::push_span;
use crate::data::workers::{Msg, TokDoc};
use anyhow::{bail, Result};

impl DataStream {
    /// The next tokenized document of source `s`, waiting for its reader.
    fn next_doc(&mut self, s: usize) -> Result<Option<TokDoc>> {
        let src = &mut self.sources[s];
        loop {
            if let Some(d) = src.queue.pop_front() {
                return Ok(Some(d));
            }
            if src.ended {
                return Ok(None);
            }
            let msg = src.rx.as_ref().and_then(|rx| rx.recv().ok());
            match msg {
                Some(Msg::Docs(docs, skipped)) => {
                    src.queue.extend(docs);
                    src.skipped = skipped;
                }
                Some(Msg::End(skipped)) => {
                    src.ended = true;
                    src.skipped = skipped;
                }
                Some(Msg::Failed(e)) => return Err(e.context(format!("data source {s}"))),
                None => bail!("data source {s}: its reader thread stopped unexpectedly"),
            }
        }
    }

    /// Pick the source furthest below its share of tokens (lowest index on ties).
    fn pick_source(&self) -> Option<usize> {
        let total: f64 = self
            .sources
            .iter()
            .filter(|s| !s.cursor.exhausted)
            .map(|s| s.weight)
            .sum();
        self.sources
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.cursor.exhausted)
            .map(|(i, s)| (i, s.cursor.emitted_tokens as f64 / (s.weight / total)))
            .min_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)))
            .map(|(i, _)| i)
    }

    pub(super) fn next_window(&mut self) -> Result<Option<Window>> {
        let need = self.opts.seq_len + 1;
        loop {
            if let Some(a) = &mut self.active {
                let take = (need - self.window.len()).min(a.doc.tokens.len() - a.consumed);
                self.window
                    .extend_from_slice(&a.doc.tokens[a.consumed..a.consumed + take]);
                push_span(&mut self.window_sources, a.source as u16, take as u32);
                a.consumed += take;
                let c = &mut self.sources[a.source].cursor;
                c.emitted_tokens += take as u64;
                if a.consumed == a.doc.tokens.len() {
                    c.resume = a.doc.next;
                    c.skip_tokens = 0;
                    self.active = None;
                } else {
                    c.resume = a.doc.pos;
                    c.skip_tokens = a.consumed as u64;
                }
                if self.window.len() == need {
                    // Stride seq_len: the last token starts the next window.
                    let last = self.window[need - 1];
                    let tokens = std::mem::replace(&mut self.window, vec![last]);
                    let last_source = self.window_sources.last().map_or(UNKNOWN_SOURCE, |s| s.0);
                    let sources =
                        std::mem::replace(&mut self.window_sources, vec![(last_source, 1)]);
                    return Ok(Some(Window {
                        tokens,
                        valid: self.opts.seq_len,
                        sources,
                    }));
                }
                continue;
            }
            let Some(s) = self.force_next.take().or_else(|| self.pick_source()) else {
                // Every source has ended: flush a final, padded window.
                if self.window.len() > 1 {
                    let valid = self.window.len() - 1;
                    let mut tokens = std::mem::take(&mut self.window);
                    tokens.resize(need, self.eos);
                    let sources = std::mem::take(&mut self.window_sources);
                    return Ok(Some(Window {
                        tokens,
                        valid,
                        sources,
                    }));
                }
                self.window.clear();
                self.window_sources.clear();
                return Ok(None);
            };
            match self.next_doc(s)? {
                Some(doc) => {
                    let skip = std::mem::take(&mut self.sources[s].cursor.skip_tokens) as usize;
                    if skip > doc.tokens.len() {
                        bail!("data source {s}: the cursor points {skip} tokens into a document of {} (corpus changed since it was saved?)", doc.tokens.len());
                    }
                    self.active = Some(Active {
                        source: s,
                        doc,
                        consumed: skip,
                    });
                }
                None => self.sources[s].cursor.exhausted = true,
            }
        }
    }
}
