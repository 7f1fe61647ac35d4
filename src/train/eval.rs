//! Evaluation on the validation split: eval capacity factor, no noise, no
//! expert dropout, token-weighted mean cross-entropy, and per MoE layer the
//! loss of the tokens each expert was the first choice for.

use super::step::BatchTensors;
use crate::config::RunConfig;
use crate::data::stream::{DataStream, Split, StreamOptions};
use crate::metrics::ExpertLosses;
use crate::model::LanguageModel;
use crate::moe::{MoeAux, Phase};
use anyhow::Result;
use burn::prelude::*;
use burn::tensor::{IndexingUpdateOp, Transaction};
use std::sync::Arc;
use tokenizers::Tokenizer;

/// What one evaluation measured.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalReport {
    /// Token-weighted mean cross-entropy.
    pub loss: f64,
    /// Per MoE layer, in order: each expert's first-choice tokens and their loss.
    pub experts: Vec<ExpertLosses>,
}

/// Per-expert sums of one MoE layer, on the device.
struct ExpertSums {
    /// Σ loss over real tokens whose first choice is e. `[E]`
    loss: Tensor<1>,
    /// Real tokens whose first choice is e. `[E]`
    tokens: Tensor<1>,
}

impl ExpertSums {
    /// This batch's sums for one layer, from each position's loss and the
    /// mask (`[T]` each).
    fn of(aux: &MoeAux, nll: &Tensor<1>, mask: &Tensor<1>) -> Self {
        let [t, e] = aux.router_logits.dims();
        let device = nll.device();
        let first = aux.topk_experts.clone().slice([0..t, 0..1]).reshape([t]);
        let by_expert = |values: Tensor<1>| {
            Tensor::<1>::zeros([e], &device).scatter(
                0,
                first.clone(),
                values,
                IndexingUpdateOp::Add,
            )
        };
        Self {
            loss: by_expert(nll.clone() * mask.clone()),
            tokens: by_expert(mask.clone()),
        }
    }

    fn add(self, other: Self) -> Self {
        Self {
            loss: self.loss + other.loss,
            tokens: self.tokens + other.tokens,
        }
    }
}

/// Evaluate at most `max_batches` validation batches. The device sums are
/// read back once, at the end.
pub fn evaluate(
    model: &LanguageModel,
    cfg: &RunConfig,
    tok: Arc<Tokenizer>,
    device: &Device,
    max_batches: usize,
) -> Result<EvalReport> {
    let opts = StreamOptions {
        seq_len: cfg.model.seq_len,
        batch_size: cfg.train.batch_size,
        split: Split::Validation,
        seed: cfg.train.seed,
    };
    let mut stream = DataStream::open(&cfg.data, tok, opts, None)?;
    let mut loss_sum = Tensor::<1>::zeros([1], device);
    let mut tokens = 0usize;
    let mut layers: Vec<ExpertSums> = Vec::new();
    for _ in 0..max_batches {
        let Some(batch) = stream.next_batch()? else {
            break;
        };
        tokens += batch.num_tokens();
        let bt = BatchTensors::new(&batch, device);
        let [b, s] = bt.mask.dims();
        let (x, moe) = model.hidden(bt.inputs.clone(), Some(bt.mask.clone()), Phase::Eval);
        let nll = model.head_row_losses(x, bt.targets.clone()); // [B·S]
        let mask = bt.mask.clone().reshape([b * s]);
        loss_sum = loss_sum + (nll.clone() * mask.clone()).sum();
        let sums = moe.iter().map(|aux| ExpertSums::of(aux, &nll, &mask));
        layers = if layers.is_empty() {
            sums.collect()
        } else {
            layers
                .into_iter()
                .zip(sums)
                .map(|(a, b)| a.add(b))
                .collect()
        };
    }
    // One read for the whole evaluation.
    let mut tx = Transaction::default().register(loss_sum);
    for l in &layers {
        tx = tx.register(l.loss.clone()).register(l.tokens.clone());
    }
    let data = tx.execute();
    let host = |d: &TensorData| -> Vec<f64> { d.iter::<f32>().map(|v| v as f64).collect() };
    let sum = host(&data[0]).first().copied().unwrap_or(f64::NAN);
    Ok(EvalReport {
        loss: sum / tokens.max(1) as f64,
        experts: data[1..]
            .chunks(2)
            .map(|pair| ExpertLosses {
                loss_sum: host(&pair[0]),
                tokens: host(&pair[1]),
            })
            .collect(),
    })
}
