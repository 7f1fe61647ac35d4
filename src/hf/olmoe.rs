//! OLMoE (`OlmoeForCausalLM`): every block MoE, softmax routing with
//! optional renormalisation, RMSNorm over the whole q and k projections,
//! q/k/v optionally clamped to [-clip_qkv, clip_qkv], and `attention_bias`
//! (biases on q, k, v and o).

use super::family::*;
use super::HfArch;
use crate::config::{ModelConfig, MoeConfig, QkNorm};
use anyhow::Result;
use serde_json::{json, Map, Value};

/// The family.
pub const FAMILY: Family = Family {
    arch: HfArch::Olmoe,
    model_type: "olmoe",
    class: "OlmoeForCausalLM",
    name: "olmoe",
    mup: false,
    dense: false,
    layout: MLP_LAYOUT,
    read,
    refuses,
    adapt: as_is,
    write,
};

fn read(cfg: &Value, mut model: ModelConfig) -> Result<(ModelConfig, MoeConfig)> {
    read_attention_bias(cfg, &mut model)?;
    model.qk_norm = QkNorm::Projection;
    model.clip_qkv = opt(cfg, "clip_qkv", f64_field)?;
    let moe = MoeConfig {
        num_experts: usize_field(cfg, "num_experts")?,
        d_expert: model.d_ff,
        normalize_topk: opt(cfg, "norm_topk_prob", bool_field)?.unwrap_or(false),
        layers: Some((0..model.n_layers).collect()),
        ..routed_moe(cfg)?
    };
    Ok((model, moe))
}

fn refuses(m: &ModelConfig, moe: &MoeConfig) -> Option<String> {
    first([
        no_moe(m, moe),
        has_dense_blocks(m, moe),
        has_shared(moe),
        mixed_bias(m),
        (m.head_dim() * m.n_heads != m.d_model)
            .then(|| "model.head_dim differs from d_model / n_heads".into()),
        attention_differs(m, QkNorm::Projection, true),
        softmax_routing_differs(moe),
    ])
}

fn write(m: &ModelConfig, moe: &MoeConfig, obj: &mut Map<String, Value>) {
    put(
        obj,
        [
            ("intermediate_size", json!(moe.d_expert)),
            ("num_experts", json!(moe.num_experts)),
            ("norm_topk_prob", json!(moe.normalize_topk)),
            ("attention_bias", json!(m.qkv_bias)),
            ("clip_qkv", json!(m.clip_qkv)),
        ],
    );
}
