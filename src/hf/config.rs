//! `config.json` ↔ switchyard's `[model]` and `[moe]`: the fields every
//! family shares are read and written here, the rest by the family's file.
//! Fields that change the function and are not supported are refused by
//! name.

use super::family::{bool_field, f64_field, opt, str_field, usize_field};
use super::{family_of_model_type, HfArch};
use crate::config::{ModelConfig, MoeConfig, QkNorm};
use anyhow::{bail, Result};
use serde_json::{json, Value};

/// RoPE theta from `rope_parameters.rope_theta` (transformers v5) or the
/// top-level `rope_theta` (v4). Non-default RoPE scaling is refused.
fn rope_theta(cfg: &Value) -> Result<f64> {
    if let Some(scaling) = cfg.get("rope_scaling").filter(|v| !v.is_null()) {
        bail!("config.json: unsupported field `rope_scaling` = {scaling} (RoPE scaling is not supported)");
    }
    if let Some(params) = cfg.get("rope_parameters").filter(|v| !v.is_null()) {
        if let Some(kind) = params.get("rope_type").and_then(Value::as_str) {
            if kind != "default" {
                bail!("config.json: unsupported field `rope_parameters.rope_type` = {kind:?} (only \"default\" RoPE is supported)");
            }
        }
        if let Some(theta) = params.get("rope_theta").and_then(Value::as_f64) {
            return Ok(theta);
        }
    }
    Ok(opt(cfg, "rope_theta", f64_field)?.unwrap_or(10_000.0))
}

/// Parse a Hugging Face `config.json` into switchyard configs. Anything the
/// model cannot express exactly is refused with the field's name.
pub fn parse_config(cfg: &Value) -> Result<(HfArch, ModelConfig, MoeConfig)> {
    let family = family_of_model_type(str_field(cfg, "model_type")?)?;
    match cfg.get("hidden_act") {
        None | Some(Value::Null) => {}
        Some(Value::String(act)) if act == "silu" => {}
        Some(act) => bail!("config.json: unsupported field `hidden_act` = {act} (only \"silu\")"),
    }
    let n_heads = usize_field(cfg, "num_attention_heads")?;
    let shared = ModelConfig {
        vocab_size: usize_field(cfg, "vocab_size")?,
        d_model: usize_field(cfg, "hidden_size")?,
        n_layers: usize_field(cfg, "num_hidden_layers")?,
        n_heads,
        n_kv_heads: opt(cfg, "num_key_value_heads", usize_field)?.unwrap_or(n_heads),
        head_dim: opt(cfg, "head_dim", usize_field)?,
        d_ff: usize_field(cfg, "intermediate_size")?,
        seq_len: opt(cfg, "max_position_embeddings", usize_field)?.unwrap_or(4096),
        rope_theta: rope_theta(cfg)?,
        rms_norm_eps: opt(cfg, "rms_norm_eps", f64_field)?.unwrap_or(1e-6),
        qkv_bias: false,
        o_bias: false,
        qk_norm: QkNorm::None,
        clip_qkv: None,
        tie_embeddings: opt(cfg, "tie_word_embeddings", bool_field)?.unwrap_or(false),
        init_std: opt(cfg, "initializer_range", f64_field)?.unwrap_or(0.02),
        embedding_multiplier: 1.0,
        residual_multiplier: 1.0,
        attention_multiplier: None,
        logits_scaling: 1.0,
    };
    shared.check_ceilings()?;
    let (model, moe) = (family.read)(cfg, shared)?;
    model.validate()?;
    moe.validate(&model)?;
    Ok((family.arch, model, moe))
}

/// The `config.json` of `arch` for this model (already adapted to the family).
pub fn write_config(arch: HfArch, m: &ModelConfig, moe: &MoeConfig, eos: Option<u32>) -> Value {
    let family = arch.family();
    let mut c = json!({
        "architectures": [family.class],
        "model_type": family.model_type,
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "intermediate_size": m.d_ff,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_kv_heads,
        "head_dim": m.head_dim(),
        "hidden_act": "silu",
        "max_position_embeddings": m.seq_len,
        "rms_norm_eps": m.rms_norm_eps,
        "rope_theta": m.rope_theta,
        "rope_parameters": {"rope_theta": m.rope_theta, "rope_type": "default"},
        "tie_word_embeddings": m.tie_embeddings,
        "initializer_range": m.init_std,
        "attention_dropout": 0.0,
        "torch_dtype": "float32",
        "use_cache": true,
        "bos_token_id": eos,
        "eos_token_id": eos,
    });
    let Some(obj) = c.as_object_mut() else {
        unreachable!("json!({{..}}) is an object")
    };
    if !family.dense {
        obj.insert("num_experts_per_tok".into(), json!(moe.top_k));
        obj.insert("output_router_logits".into(), json!(false));
        obj.insert("router_aux_loss_coef".into(), json!(moe.aux_loss_coef));
    }
    (family.write)(m, moe, obj);
    c
}
