//! Evaluation on the validation split: eval capacity factor, no noise, no
//! expert dropout, token-weighted mean cross-entropy; per MoE layer the
//! loss of the tokens each expert was the first choice for; and per data
//! source (domain) the loss and each layer's routing
//! ([`crate::metrics::domains`]). Everything is summed on the device and
//! read back once.

use super::step::BatchTensors;
use crate::config::RunConfig;
use crate::data::stream::{Batch, UNKNOWN_SOURCE};
use crate::data::stream::{DataStream, Split, StreamOptions};
use crate::metrics::domains::{DomainMap, DomainReport};
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
    /// Loss and routing per data source.
    pub domains: DomainReport,
}

/// Per-domain sums on the device; row D collects tokens of unknown source.
struct DomainSums {
    /// Σ loss per domain. `[D + 1]`
    loss: Tensor<1>,
    /// Real tokens per domain. `[D + 1]`
    tokens: Tensor<1>,
    /// Per MoE layer: assignments routed and kept, domain-major. `[(D + 1) · E]` each
    layers: Vec<(Tensor<1>, Tensor<1>)>,
}

impl DomainSums {
    /// This batch's sums: `d` domains, each position's loss and mask (`[T]`).
    fn of(batch: &Batch, d: usize, moe: &[MoeAux], nll: &Tensor<1>, mask: &Tensor<1>) -> Self {
        let t = batch.rows * batch.seq_len;
        let device = nll.device();
        let ids: Vec<i64> = if batch.sources.len() == t {
            batch
                .sources
                .iter()
                .map(|&s| if s == UNKNOWN_SOURCE { d } else { (s as usize).min(d) } as i64)
                .collect()
        } else {
            vec![d as i64; t]
        };
        let dom = Tensor::<1, Int>::from_data(TensorData::new(ids, [t]), &device);
        let per_domain = |v: Tensor<1>| {
            Tensor::<1>::zeros([d + 1], &device).scatter(0, dom.clone(), v, IndexingUpdateOp::Add)
        };
        let layers = moe
            .iter()
            .map(|aux| {
                let [_, e] = aux.router_logits.dims();
                let [_, k] = aux.topk_experts.dims();
                let cell = (dom.clone().reshape([t, 1]).mul_scalar(e as i64)
                    + aux.topk_experts.clone())
                .reshape([t * k]);
                let routed = mask.clone().reshape([t, 1]).expand([t, k]).reshape([t * k]);
                let kept = routed.clone() * aux.kept_assignments();
                let cells = |v: Tensor<1>| {
                    Tensor::<1>::zeros([(d + 1) * e], &device).scatter(
                        0,
                        cell.clone(),
                        v,
                        IndexingUpdateOp::Add,
                    )
                };
                (cells(routed), cells(kept))
            })
            .collect();
        Self {
            loss: per_domain(nll.clone() * mask.clone()),
            tokens: per_domain(mask.clone()),
            layers,
        }
    }

    fn add(self, other: Self) -> Self {
        Self {
            loss: self.loss + other.loss,
            tokens: self.tokens + other.tokens,
            layers: self
                .layers
                .into_iter()
                .zip(other.layers)
                .map(|(a, b)| (a.0 + b.0, a.1 + b.1))
                .collect(),
        }
    }
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
        shard: crate::data::stream::Shard::WHOLE,
    };
    let mut stream = DataStream::open(&cfg.data, tok, opts, None)?;
    let mut loss_sum = Tensor::<1>::zeros([1], device);
    let mut tokens = 0usize;
    let mut layers: Vec<ExpertSums> = Vec::new();
    let names = cfg.data.source_names();
    let n_domains = names.len();
    let mut domains: Option<DomainSums> = None;
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
        let here = DomainSums::of(&batch, n_domains, &moe, &nll, &mask);
        domains = Some(match domains {
            Some(sum) => sum.add(here),
            None => here,
        });
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
    if tokens == 0 {
        anyhow::bail!("nothing to evaluate: the validation batches hold no target tokens");
    }
    // One read for the whole evaluation.
    let mut tx = Transaction::default().register(loss_sum);
    for l in &layers {
        tx = tx.register(l.loss.clone()).register(l.tokens.clone());
    }
    if let Some(dm) = &domains {
        tx = tx.register(dm.loss.clone()).register(dm.tokens.clone());
        for (routed, kept) in &dm.layers {
            tx = tx.register(routed.clone()).register(kept.clone());
        }
    }
    let data = tx.execute();
    let host = |d: &TensorData| -> Vec<f64> { d.iter::<f32>().map(|v| v as f64).collect() };
    let sum = host(&data[0]).first().copied().unwrap_or(f64::NAN);
    let n_layers = layers.len();
    let experts = data[1..1 + 2 * n_layers]
        .chunks(2)
        .map(|pair| ExpertLosses {
            loss_sum: host(&pair[0]),
            tokens: host(&pair[1]),
        })
        .collect();
    // Domain rows 0..D; row D (unknown source) is left out.
    let rest = &data[1 + 2 * n_layers..];
    let known = |v: Vec<f64>| v[..n_domains.min(v.len())].to_vec();
    let matrix = |v: Vec<f64>| -> Vec<Vec<f64>> {
        let e = v.len() / (n_domains + 1);
        (0..n_domains)
            .map(|d| v[d * e..(d + 1) * e].to_vec())
            .collect()
    };
    let domains = match rest {
        [loss, toks, maps @ ..] => DomainReport {
            names: names.clone(),
            loss_sum: known(host(loss)),
            tokens: known(host(toks)),
            layers: maps
                .chunks(2)
                .map(|pair| DomainMap {
                    routed: matrix(host(&pair[0])),
                    kept: matrix(host(&pair[1])),
                })
                .collect(),
        },
        _ => DomainReport {
            names: names.clone(),
            loss_sum: vec![0.0; n_domains],
            tokens: vec![0.0; n_domains],
            layers: Vec::new(),
        },
    };
    Ok(EvalReport {
        loss: sum / tokens as f64,
        experts,
        domains,
    })
}
