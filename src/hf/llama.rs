//! Llama (`LlamaForCausalLM`), dense: every block a SwiGLU MLP of
//! `intermediate_size`, `attention_bias` (biases on q, k, v and o), no
//! q/k norms.

use super::family::*;
use super::HfArch;
use crate::config::{ModelConfig, MoeConfig, QkNorm};
use anyhow::Result;
use serde_json::{json, Map, Value};

/// The family.
pub const FAMILY: Family = Family {
    arch: HfArch::Llama,
    model_type: "llama",
    class: "LlamaForCausalLM",
    name: "llama",
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
    refuse_true(cfg, "mlp_bias", "a biased MLP")?;
    if let Some(t) = cfg.get("pretraining_tp").filter(|v| !v.is_null()) {
        if t.as_u64() != Some(1) {
            anyhow::bail!("config.json: unsupported field `pretraining_tp` = {t} (only 1)");
        }
    }
    Ok((model, dense_moe()))
}

fn refuses(m: &ModelConfig, moe: &MoeConfig) -> Option<String> {
    first([
        has_moe(m, moe),
        mixed_bias(m),
        attention_differs(m, QkNorm::None, false),
    ])
}

fn write(m: &ModelConfig, _: &MoeConfig, obj: &mut Map<String, Value>) {
    put(
        obj,
        [
            ("attention_bias", json!(m.qkv_bias)),
            ("mlp_bias", json!(false)),
            ("pretraining_tp", json!(1)),
        ],
    );
}
