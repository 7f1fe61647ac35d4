//! Seeing inside: which experts each token is routed to, and a trace file of
//! logits, router logits and choices for comparison with other frameworks.

use crate::model::LanguageModel;
use crate::moe::Phase;
use anyhow::Result;
use burn::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;

/// Routing of one sequence through every MoE layer.
pub struct Trace {
    /// `[T, V]` row-major.
    pub logits: (Vec<f32>, [usize; 2]),
    /// Per MoE layer: router logits `[T, E]`.
    pub router_logits: Vec<(Vec<f32>, [usize; 2])>,
    /// Per MoE layer: chosen experts `[T, k]`.
    pub topk_experts: Vec<(Vec<i64>, [usize; 2])>,
    /// Per MoE layer: their weights `[T, k]`.
    pub topk_weights: Vec<Vec<f32>>,
}

/// Run one sequence in eval mode and collect its routing. The sequence
/// must fit the model ([`LanguageModel::check_tokens`]).
pub fn trace(model: &LanguageModel, ids: &[u32], device: &Device) -> Result<Trace> {
    model.check_tokens(ids, "the input")?;
    let t = ids.len();
    let data: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    let tokens = Tensor::<2, Int>::from_data(TensorData::new(data, [1, t]), device);
    let out = model.forward(tokens, None, Phase::Eval);
    let v = model.config().vocab_size;
    let logits = out
        .logits
        .reshape([t, v])
        .into_data()
        .try_to_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let mut tr = Trace {
        logits: (logits, [t, v]),
        router_logits: Vec::new(),
        topk_experts: Vec::new(),
        topk_weights: Vec::new(),
    };
    for aux in out.moe {
        let [_, e] = aux.router_logits.dims();
        let [_, k] = aux.topk_experts.dims();
        let rl = aux
            .router_logits
            .into_data()
            .try_to_vec::<f32>()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let ex = aux
            .topk_experts
            .into_data_as::<i64>()
            .try_to_vec::<i64>()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let w = aux
            .topk_weights
            .into_data()
            .try_to_vec::<f32>()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        tr.router_logits.push((rl, [t, e]));
        tr.topk_experts.push((ex, [t, k]));
        tr.topk_weights.push(w);
    }
    Ok(tr)
}

impl Trace {
    /// Human-readable routing table: one line per token and MoE layer.
    pub fn describe(&self, pieces: &[String]) -> String {
        let mut s = String::new();
        for (layer, (ex, [t, k])) in self.topk_experts.iter().enumerate() {
            s.push_str(&format!("MoE layer {layer}:\n"));
            for pos in 0..*t {
                let picks: Vec<String> = (0..*k)
                    .map(|j| {
                        format!(
                            "e{}:{:.3}",
                            ex[pos * k + j],
                            self.topk_weights[layer][pos * k + j]
                        )
                    })
                    .collect();
                let piece = pieces.get(pos).map(String::as_str).unwrap_or("");
                s.push_str(&format!(
                    "  {pos:>4} {:<16} {}\n",
                    format!("{piece:?}"),
                    picks.join("  ")
                ));
            }
        }
        s
    }

    /// Write `logits`, `router_logits.{i}` and `topk_experts.{i}` to safetensors.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors = BTreeMap::new();
        tensors.insert(
            "logits".to_string(),
            TensorData::new(self.logits.0.clone(), self.logits.1),
        );
        for (i, (rl, shape)) in self.router_logits.iter().enumerate() {
            tensors.insert(
                format!("router_logits.{i}"),
                TensorData::new(rl.clone(), *shape),
            );
        }
        for (i, (ex, shape)) in self.topk_experts.iter().enumerate() {
            tensors.insert(
                format!("topk_experts.{i}"),
                TensorData::new(ex.clone(), *shape),
            );
        }
        std::fs::write(path, crate::tensorfile::to_bytes(&tensors, None)?)?;
        Ok(())
    }
}
