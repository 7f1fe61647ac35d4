//! Qwen3 (`Qwen3ForCausalLM`), dense: Llama's blocks with per-head q/k
//! RMSNorm before RoPE, a `head_dim` of its own, and `attention_bias`
//! (biases on q, k, v and o).

use super::family::*;
use super::HfArch;
use crate::config::{ModelConfig, MoeConfig, QkNorm};
use anyhow::Result;
use serde_json::{json, Map, Value};

/// The family.
pub const FAMILY: Family = Family {
    arch: HfArch::Qwen3,
    model_type: "qwen3",
    class: "Qwen3ForCausalLM",
    name: "qwen3",
    mup: false,
    dense: true,
    layout: MLP_LAYOUT,
    read,
    refuses,
    adapt: as_is,
    write,
};

fn read(cfg: &Value, mut model: ModelConfig) -> Result<(ModelConfig, MoeConfig)> {
    read_attention_bias(cfg, &mut model)?;
    refuse_sliding_window(cfg)?;
    model.qk_norm = QkNorm::PerHead;
    Ok((model, dense_moe()))
}

fn refuses(m: &ModelConfig, moe: &MoeConfig) -> Option<String> {
    first([
        has_moe(m, moe),
        mixed_bias(m),
        attention_differs(m, QkNorm::PerHead, false),
    ])
}

fn write(m: &ModelConfig, _: &MoeConfig, obj: &mut Map<String, Value>) {
    put(
        obj,
        [
            ("attention_bias", json!(m.qkv_bias)),
            ("use_sliding_window", json!(false)),
            ("sliding_window", Value::Null),
            ("max_window_layers", json!(m.n_layers)),
            ("layer_types", full_attention_layers(m)),
        ],
    );
}
