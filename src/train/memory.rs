//! The host memory a CPU training step needs at least, checked against
//! this machine's before anything is allocated.

use crate::config::RunConfig;
use anyhow::{bail, Result};

/// The least host memory a training step takes on the CPU backend, in
/// bytes, by its two parts that grow without bound with the config:
/// `(weights, attention)`. The weights are the embedding, the head, and
/// each block's attention and FFN matrices (norms and routers left out),
/// four times over: the values, their gradients and AdamW's two moments.
/// The attention part is the probabilities each layer keeps for the
/// backward, `n_layers × batch × heads × seq_len² × 4` bytes. Everything
/// else a step holds comes on top, so a run above this cannot fit.
pub fn step_memory_floor(cfg: &RunConfig) -> (f64, f64) {
    let m = &cfg.model;
    let f32_bytes = 4.0;
    let tables = if m.tie_embeddings { 1.0 } else { 2.0 };
    let values = tables * m.vocab_size as f64 * m.d_model as f64
        + (0..m.n_layers)
            .map(|l| cfg.block_weights(l, cfg.moe.num_experts) as f64)
            .sum::<f64>();
    let weights = 4.0 * f32_bytes * values;
    let s = m.seq_len as f64;
    let attention =
        f32_bytes * m.n_layers as f64 * cfg.train.batch_size as f64 * m.n_heads as f64 * s * s;
    (weights, attention)
}

/// This machine's memory in bytes, `(total with swap, available)`, from
/// `/proc/meminfo`; none where that file does not exist.
fn host_memory() -> Option<(f64, f64)> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<f64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        let kib: f64 = line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib * 1024.0)
    };
    let total = field("MemTotal:")? + field("SwapTotal:").unwrap_or(0.0);
    Some((total, field("MemAvailable:").unwrap_or(total)))
}

/// A byte count for people: MiB under a GiB, GiB above.
pub(super) fn gib(bytes: f64) -> String {
    let mib = bytes / (1u64 << 20) as f64;
    if mib < 1024.0 {
        format!("{mib:.0} MiB")
    } else {
        format!("{:.1} GiB", mib / 1024.0)
    }
}

/// Refuse, before anything is allocated, a run on the CPU backend whose
/// step cannot fit in this machine's memory (an allocation that large
/// would abort the process, not return an error); say so when it exceeds
/// the memory free now. Returns the warning, if any.
pub(super) fn check_host_memory(spec: &str, cfg: &RunConfig) -> Result<Option<String>> {
    if spec != "flex" {
        return Ok(None);
    }
    let Some((total, available)) = host_memory() else {
        return Ok(None);
    };
    let (weights, attention) = step_memory_floor(cfg);
    let need = weights + attention;
    let what = format!(
        "a training step needs at least {} ({} for the attention probabilities kept for \
         the backward: model.n_layers × train.batch_size × model.n_heads × model.seq_len² \
         × 4 bytes; {} for the weights, their gradients and their AdamW moments)",
        gib(need),
        gib(attention),
        gib(weights)
    );
    if need > total {
        bail!(
            "{what}, and this machine has {} with swap: lower model.seq_len or \
             train.batch_size (train.grad_accum keeps the tokens per step), or the \
             model's widths (model.vocab_size, model.d_model, model.d_ff, \
             moe.num_experts, moe.d_expert); on a GPU with its kernels \
             (--device cuda) attention keeps no seq_len² buffer",
            gib(total)
        );
    }
    Ok((need > available).then(|| format!("warning: {what}; {} is free now", gib(available))))
}

/// `configs/tiny.toml`'s shape, set key by key so that unit tests can work
/// its sizes by hand: vocabulary 4,096, width 128, 4 layers of 4 query and
/// 2 key/value heads, sequence 128, batch 16, 8 experts of 128, top-2, in
/// every block, no shared expert, an untied head.
#[cfg(test)]
pub(crate) fn tiny_by_hand() -> RunConfig {
    let mut cfg = RunConfig::default();
    cfg.model.vocab_size = 4096;
    cfg.model.d_model = 128;
    cfg.model.n_layers = 4;
    cfg.model.n_heads = 4;
    cfg.model.n_kv_heads = 2;
    cfg.model.head_dim = None;
    cfg.model.tie_embeddings = false;
    cfg.model.seq_len = 128;
    cfg.moe.num_experts = 8;
    cfg.moe.d_expert = 128;
    cfg.moe.num_shared_experts = 0;
    cfg.moe.layers = None;
    cfg.moe.first_k_dense = 0;
    cfg.moe.every_n_layers = 1;
    cfg.train.batch_size = 16;
    cfg.moe.top_k = 2;
    cfg.train.gpu_kernels = true;
    cfg
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::LanguageModel;
    use burn::prelude::*;

    /// The tiny config's floor by hand. Weights: embedding and head 2 ×
    /// 4,096 × 128; per layer q and o 2 × 128 × 128, k and v 2 × 128 × 64,
    /// 8 experts of 3 × 128 × 128; 4 layers; four copies of 4 bytes.
    /// Attention: 4 layers × 16 rows × 4 heads × 128² probabilities.
    #[test]
    fn the_memory_floor_of_the_tiny_config() {
        let cfg = tiny_by_hand();
        let (weights, attention) = step_memory_floor(&cfg);
        let per_layer = 2.0 * 16_384.0 + 2.0 * 8_192.0 + 8.0 * 3.0 * 16_384.0;
        assert_eq!(weights, 16.0 * (2.0 * 524_288.0 + 4.0 * per_layer)); // 40.8 MiB
        assert_eq!(attention, 4.0 * 4.0 * 16.0 * 4.0 * 16_384.0); // 16 MiB
        assert_eq!(gib(attention), "16 MiB");
        assert_eq!(gib(3.0 * (1u64 << 30) as f64), "3.0 GiB");
    }

    /// The weights counted are the model's parameters less its norms and
    /// routers: never more, and within 1% of them, with a dense first
    /// block, shared experts and a tied head too.
    #[test]
    fn the_floor_counts_the_models_own_weights() {
        use burn::module::Module;
        let mut cfg = RunConfig::default();
        cfg.model.d_model = 64;
        cfg.model.n_layers = 3;
        for (tied, first_dense, shared) in [(false, 0, 0), (true, 1, 1)] {
            cfg.model.tie_embeddings = tied;
            cfg.moe.first_k_dense = first_dense;
            cfg.moe.num_shared_experts = shared;
            let device = Device::flex();
            let model = LanguageModel::new(&cfg.model, &cfg.moe, 1, &device);
            let params = model.num_params() as f64;
            let counted = step_memory_floor(&cfg).0 / 16.0;
            assert!(
                counted <= params && counted > 0.99 * params,
                "tied {tied}, dense {first_dense}, shared {shared}: {counted} of {params}"
            );
        }
    }
}
