//! Evaluation on the validation split: eval capacity factor, no noise, no
//! expert dropout, token-weighted mean cross-entropy.

use super::step::{forward, BatchTensors};
use crate::config::RunConfig;
use crate::data::stream::{DataStream, Split, StreamOptions};
use crate::model::LanguageModel;
use crate::moe::Phase;
use anyhow::Result;
use burn::prelude::*;
use std::sync::Arc;
use tokenizers::Tokenizer;

/// Mean validation loss over at most `max_batches` batches.
pub fn evaluate(
    model: &LanguageModel,
    cfg: &RunConfig,
    tok: Arc<Tokenizer>,
    device: &Device,
    max_batches: usize,
) -> Result<f64> {
    let opts = StreamOptions {
        seq_len: cfg.model.seq_len,
        batch_size: cfg.train.batch_size,
        split: Split::Validation,
        seed: cfg.train.seed,
    };
    let mut stream = DataStream::open(&cfg.data, tok, opts, None)?;
    let (mut loss_sum, mut tokens) = (Tensor::<1>::zeros([1], device), 0usize);
    for _ in 0..max_batches {
        let Some(batch) = stream.next_batch()? else {
            break;
        };
        let n = batch.num_tokens();
        let bt = BatchTensors::new(&batch, device);
        let (terms, _) = forward(model, &bt, cfg, Phase::Eval);
        loss_sum = loss_sum + terms.lm.mul_scalar(n as f64);
        tokens += n;
    }
    // One read for the whole evaluation.
    let sum = loss_sum.into_scalar::<f32>() as f64;
    Ok(sum / tokens.max(1) as f64)
}
