//! Qwen2-MoE (`Qwen2MoeForCausalLM`): softmax routing, optional
//! renormalisation (`norm_topk_prob`), dense blocks through
//! `mlp_only_layers` / `decoder_sparse_step`, q/k/v biases, and a shared
//! expert gated by sigmoid(`shared_expert_gate`).
//!
//! It expresses more than it literally has, exactly:
//! - missing q/k/v biases are written as zeros;
//! - an ungated shared expert gets a zero gate (sigmoid(0) = 1/2) and a
//!   doubled `down_proj`;
//! - no shared expert becomes one of width 1 whose weights are all zero.

use super::family::*;
use super::HfArch;
use crate::config::{ModelConfig, MoeConfig, QkNorm};
use anyhow::{Context, Result};
use burn::prelude::TensorData;
use serde_json::{json, Map, Value};

/// The family.
pub const FAMILY: Family = Family {
    arch: HfArch::Qwen2Moe,
    model_type: "qwen2_moe",
    class: "Qwen2MoeForCausalLM",
    name: "qwen2-moe",
    mup: false,
    dense: false,
    layout: MLP_LAYOUT,
    read,
    refuses,
    adapt,
    write,
};

/// The MoE fields Qwen2-MoE and Qwen3-MoE share; `shared` is the shared
/// expert's width (0 for none).
pub(super) fn read_qwen_moe(cfg: &Value, model: &ModelConfig, shared: usize) -> Result<MoeConfig> {
    refuse_sliding_window(cfg)?;
    let step = opt(cfg, "decoder_sparse_step", usize_field)?
        .unwrap_or(1)
        .max(1);
    let dense = layer_list(cfg, "mlp_only_layers")?;
    let num_experts = match opt(cfg, "num_experts", usize_field)? {
        Some(n) => n,
        None => usize_field(cfg, "num_local_experts")?,
    };
    Ok(MoeConfig {
        num_experts,
        d_expert: usize_field(cfg, "moe_intermediate_size")?,
        normalize_topk: opt(cfg, "norm_topk_prob", bool_field)?.unwrap_or(false),
        layers: Some(
            (0..model.n_layers)
                .filter(|i| !dense.contains(i) && (i + 1) % step == 0)
                .collect(),
        ),
        num_shared_experts: usize::from(shared > 0),
        d_shared_expert: (shared > 0).then_some(shared),
        shared_expert_gate: shared > 0,
        ..routed_moe(cfg)?
    })
}

/// The `config.json` fields Qwen2-MoE and Qwen3-MoE share.
pub(super) fn write_qwen_moe(m: &ModelConfig, moe: &MoeConfig, obj: &mut Map<String, Value>) {
    put(
        obj,
        [
            ("intermediate_size", json!(m.d_ff)),
            ("moe_intermediate_size", json!(moe.d_expert)),
            ("num_experts", json!(moe.num_experts)),
            ("norm_topk_prob", json!(moe.normalize_topk)),
            ("decoder_sparse_step", json!(1)),
            ("mlp_only_layers", json!(dense_layers(m, moe))),
            ("use_sliding_window", json!(false)),
            ("sliding_window", Value::Null),
            ("max_window_layers", json!(m.n_layers)),
        ],
    );
}

fn read(cfg: &Value, mut model: ModelConfig) -> Result<(ModelConfig, MoeConfig)> {
    model.qkv_bias = opt(cfg, "qkv_bias", bool_field)?.unwrap_or(true);
    let shared = opt(cfg, "shared_expert_intermediate_size", usize_field)?.unwrap_or(0);
    let moe = read_qwen_moe(cfg, &model, shared)?;
    Ok((model, moe))
}

fn refuses(m: &ModelConfig, moe: &MoeConfig) -> Option<String> {
    first([
        no_moe(m, moe),
        has_o_bias(m),
        attention_differs(m, QkNorm::None, false),
        softmax_routing_differs(moe),
    ])
}

fn adapt(m: &mut ModelConfig, moe: &mut MoeConfig, params: &mut Params) -> Result<()> {
    add_zero_qkv_biases(m, params);
    let had_shared = moe.shared_width() > 0;
    if !had_shared {
        add_zero_shared_expert(m, moe, params, 1);
    }
    if !moe.shared_expert_gate {
        for i in moe_layers(m, moe) {
            let pre = format!("layers.{i}.mlp");
            params.insert(
                format!("{pre}.shared_expert_gate.weight"),
                zeros(&[m.d_model, 1]),
            );
            if had_shared {
                // sigmoid(0) = 1/2 halves the shared output: double down_proj.
                let key = format!("{pre}.shared_expert.down_proj.weight");
                let w = params
                    .get(&key)
                    .with_context(|| format!("model has no parameter `{key}`"))?;
                let doubled: Vec<f32> = super::f32s(&key, w)?.iter().map(|v| v * 2.0).collect();
                let shape = w.shape().to_vec();
                params.insert(key, TensorData::new(doubled, shape));
            }
        }
    }
    moe.shared_expert_gate = true;
    Ok(())
}

fn write(m: &ModelConfig, moe: &MoeConfig, obj: &mut Map<String, Value>) {
    write_qwen_moe(m, moe, obj);
    put(
        obj,
        [
            ("shared_expert_intermediate_size", json!(moe.shared_width())),
            ("qkv_bias", json!(true)),
            ("layer_types", full_attention_layers(m)),
        ],
    );
}
