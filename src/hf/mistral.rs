//! Mistral (`MistralForCausalLM`), dense: Llama's blocks; a sliding
//! window, if any, is refused.

use super::family::*;
use super::HfArch;
use crate::config::{ModelConfig, MoeConfig, QkNorm};
use anyhow::Result;
use serde_json::{Map, Value};

/// The family.
pub const FAMILY: Family = Family {
    arch: HfArch::Mistral,
    model_type: "mistral",
    class: "MistralForCausalLM",
    name: "mistral",
    mup: false,
    dense: true,
    layout: MLP_LAYOUT,
    read,
    refuses,
    adapt: as_is,
    write,
};

fn read(cfg: &Value, model: ModelConfig) -> Result<(ModelConfig, MoeConfig)> {
    refuse_sliding_window(cfg)?;
    Ok((model, dense_moe()))
}

fn refuses(m: &ModelConfig, moe: &MoeConfig) -> Option<String> {
    first([
        has_moe(m, moe),
        has_bias(m),
        attention_differs(m, QkNorm::None, false),
    ])
}

fn write(_: &ModelConfig, _: &MoeConfig, obj: &mut Map<String, Value>) {
    put(obj, [("sliding_window", Value::Null)]);
}
