//! Granite MoE (`GraniteMoeForCausalLM`): every block MoE, top-k of the
//! router logits then a softmax over the k chosen, no shared expert,
//! `attention_bias` (biases on q, k, v and o), every
//! expert in two fused tensors (`input_linear` `[E, 2F, d]`, gate rows then
//! up rows; `output_linear` `[E, d, F]`), the router at `router.layer`, and
//! the muP scalars: `embedding_multiplier`, `residual_multiplier`,
//! `attention_multiplier` (the attention-score scale, 1 when absent, not
//! 1/√head_dim) and `logits_scaling` (logits divided by it).

use super::family::*;
use super::HfArch;
use crate::config::{ModelConfig, MoeConfig, TopkOrder};
use anyhow::Result;
use serde_json::{json, Map, Value};

/// The family.
pub const FAMILY: Family = Family {
    arch: HfArch::GraniteMoe,
    model_type: "granitemoe",
    class: "GraniteMoeForCausalLM",
    name: "granitemoe",
    mup: true,
    dense: false,
    layout: Layout {
        moe: "block_sparse_moe",
        expert: ["gate_proj", "up_proj", "down_proj"],
        shared: "shared_expert",
        router: "router.layer",
        fused: Some(["input_linear", "output_linear"]),
    },
    read,
    refuses,
    adapt: as_is,
    write,
};

fn read(cfg: &Value, mut model: ModelConfig) -> Result<(ModelConfig, MoeConfig)> {
    read_attention_bias(cfg, &mut model)?;
    let scalar = |key| Ok::<_, anyhow::Error>(opt(cfg, key, f64_field)?.unwrap_or(1.0));
    model.embedding_multiplier = scalar("embedding_multiplier")?;
    model.residual_multiplier = scalar("residual_multiplier")?;
    model.attention_multiplier = Some(scalar("attention_multiplier")?);
    model.logits_scaling = scalar("logits_scaling")?;
    let moe = MoeConfig {
        num_experts: usize_field(cfg, "num_local_experts")?,
        d_expert: model.d_ff,
        topk_order: TopkOrder::TopkThenSoftmax,
        normalize_topk: true,
        layers: Some((0..model.n_layers).collect()),
        ..routed_moe(cfg)?
    };
    Ok((model, moe))
}

fn refuses(m: &ModelConfig, moe: &MoeConfig) -> Option<String> {
    first([mixed_bias(m), super::mixtral::plain_moe_differs(m, moe)])
}

fn write(m: &ModelConfig, moe: &MoeConfig, obj: &mut Map<String, Value>) {
    let attention = m
        .attention_multiplier
        .unwrap_or(1.0 / (m.head_dim() as f64).sqrt());
    put(
        obj,
        [
            ("intermediate_size", json!(moe.d_expert)),
            ("num_local_experts", json!(moe.num_experts)),
            ("attention_bias", json!(m.qkv_bias)),
            ("embedding_multiplier", json!(m.embedding_multiplier)),
            ("residual_multiplier", json!(m.residual_multiplier)),
            ("attention_multiplier", json!(attention)),
            ("logits_scaling", json!(m.logits_scaling)),
        ],
    );
}
