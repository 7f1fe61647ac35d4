//! Qwen3-MoE (`Qwen3MoeForCausalLM`): Qwen2-MoE's routing and dense-block
//! layout without the shared expert, with per-head q/k RMSNorm before
//! RoPE, a `head_dim` of its own, and `attention_bias` (biases on q, k, v
//! and o).

use super::family::*;
use super::qwen2_moe::{read_qwen_moe, write_qwen_moe};
use super::HfArch;
use crate::config::{ModelConfig, MoeConfig, QkNorm};
use anyhow::Result;
use serde_json::{json, Map, Value};

/// The family.
pub const FAMILY: Family = Family {
    arch: HfArch::Qwen3Moe,
    model_type: "qwen3_moe",
    class: "Qwen3MoeForCausalLM",
    name: "qwen3-moe",
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
    model.qk_norm = QkNorm::PerHead;
    let moe = read_qwen_moe(cfg, &model, 0)?;
    Ok((model, moe))
}

fn refuses(m: &ModelConfig, moe: &MoeConfig) -> Option<String> {
    first([
        no_moe(m, moe),
        has_shared(moe),
        mixed_bias(m),
        attention_differs(m, QkNorm::PerHead, false),
        softmax_routing_differs(moe),
    ])
}

fn write(m: &ModelConfig, moe: &MoeConfig, obj: &mut Map<String, Value>) {
    write_qwen_moe(m, moe, obj);
    put(obj, [("attention_bias", json!(m.qkv_bias))]);
}
