//! Mixtral (`MixtralForCausalLM`): every block MoE, softmax routing with
//! the top-k weights always renormalised, no shared expert, no biases.

use super::family::*;
use super::HfArch;
use crate::config::{ModelConfig, MoeConfig, QkNorm, TopkOrder};
use anyhow::Result;
use serde_json::{json, Map, Value};

/// The family.
pub const FAMILY: Family = Family {
    arch: HfArch::Mixtral,
    model_type: "mixtral",
    class: "MixtralForCausalLM",
    name: "mixtral",
    mup: false,
    dense: false,
    layout: Layout {
        moe: "block_sparse_moe",
        expert: ["w1", "w3", "w2"],
        shared: "shared_expert",
        router: "gate",
        fused: None,
    },
    read,
    refuses,
    adapt: as_is,
    write,
};

fn read(cfg: &Value, model: ModelConfig) -> Result<(ModelConfig, MoeConfig)> {
    refuse_sliding_window(cfg)?;
    let moe = MoeConfig {
        num_experts: usize_field(cfg, "num_local_experts")?,
        d_expert: model.d_ff,
        normalize_topk: true,
        jitter_eps: opt(cfg, "router_jitter_noise", f64_field)?.unwrap_or(0.0),
        layers: Some((0..model.n_layers).collect()),
        ..routed_moe(cfg)?
    };
    Ok((model, moe))
}

fn refuses(m: &ModelConfig, moe: &MoeConfig) -> Option<String> {
    first([has_bias(m), plain_moe_differs(m, moe)])
}

/// What Mixtral and Granite MoE share: every block MoE, softmax routing
/// with the top-k weights renormalised, no shared expert, no q/k norms.
pub(super) fn plain_moe_differs(m: &ModelConfig, moe: &MoeConfig) -> Option<String> {
    first([
        no_moe(m, moe),
        has_dense_blocks(m, moe),
        has_shared(moe),
        attention_differs(m, QkNorm::None, false),
        softmax_routing_differs(moe),
        (moe.topk_order == TopkOrder::SoftmaxThenTopk && !moe.normalize_topk)
            .then(|| "moe.normalize_topk = false (the family always renormalises)".into()),
    ])
}

fn write(_: &ModelConfig, moe: &MoeConfig, obj: &mut Map<String, Value>) {
    put(
        obj,
        [
            ("intermediate_size", json!(moe.d_expert)),
            ("num_local_experts", json!(moe.num_experts)),
            ("router_jitter_noise", json!(moe.jitter_eps)),
            ("sliding_window", Value::Null),
        ],
    );
}
