//! Qwen2 (`Qwen2ForCausalLM`), dense: Llama's blocks with q/k/v biases
//! (always present: a model without them is written with zero biases).

use super::family::*;
use super::HfArch;
use crate::config::{ModelConfig, MoeConfig, QkNorm};
use anyhow::Result;
use serde_json::{json, Map, Value};

/// The family.
pub const FAMILY: Family = Family {
    arch: HfArch::Qwen2,
    model_type: "qwen2",
    class: "Qwen2ForCausalLM",
    name: "qwen2",
    mup: false,
    dense: true,
    layout: MLP_LAYOUT,
    read,
    refuses,
    adapt,
    write,
};

fn read(cfg: &Value, mut model: ModelConfig) -> Result<(ModelConfig, MoeConfig)> {
    refuse_sliding_window(cfg)?;
    model.qkv_bias = true;
    Ok((model, dense_moe()))
}

fn refuses(m: &ModelConfig, moe: &MoeConfig) -> Option<String> {
    first([
        has_moe(m, moe),
        has_o_bias(m),
        attention_differs(m, QkNorm::None, false),
    ])
}

fn adapt(m: &mut ModelConfig, _: &mut MoeConfig, params: &mut Params) -> Result<()> {
    add_zero_qkv_biases(m, params);
    Ok(())
}

fn write(m: &ModelConfig, _: &MoeConfig, obj: &mut Map<String, Value>) {
    put(
        obj,
        [
            ("use_sliding_window", json!(false)),
            ("sliding_window", Value::Null),
            ("max_window_layers", json!(m.n_layers)),
            ("layer_types", full_attention_layers(m)),
        ],
    );
}
