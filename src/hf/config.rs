//! Each family's `config.json`, read into switchyard's `[model]` and
//! `[moe]` sections; fields that change the function and are not supported
//! are refused by name.

use super::HfArch;
use crate::config::{DropPolicy, ModelConfig, MoeConfig, QkNorm, RouterScore, TopkOrder};
use anyhow::{bail, Context, Result};
use serde_json::Value;

fn field<'a>(cfg: &'a Value, key: &str) -> Result<&'a Value> {
    cfg.get(key)
        .filter(|v| !v.is_null())
        .with_context(|| format!("config.json: missing field `{key}`"))
}

fn usize_field(cfg: &Value, key: &str) -> Result<usize> {
    field(cfg, key)?
        .as_u64()
        .map(|v| v as usize)
        .with_context(|| format!("config.json: field `{key}` must be a non-negative integer"))
}

fn f64_field(cfg: &Value, key: &str) -> Result<f64> {
    field(cfg, key)?
        .as_f64()
        .with_context(|| format!("config.json: field `{key}` must be a number"))
}

fn bool_field(cfg: &Value, key: &str) -> Result<bool> {
    field(cfg, key)?
        .as_bool()
        .with_context(|| format!("config.json: field `{key}` must be true or false"))
}

fn opt<T>(cfg: &Value, key: &str, f: impl Fn(&Value, &str) -> Result<T>) -> Result<Option<T>> {
    match cfg.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(_) => f(cfg, key).map(Some),
    }
}

/// RoPE theta from `rope_parameters.rope_theta` (transformers v5) or the
/// top-level `rope_theta` (v4). Non-default RoPE scaling is refused.
fn rope_theta(cfg: &Value) -> Result<f64> {
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
    if let Some(scaling) = cfg.get("rope_scaling").filter(|v| !v.is_null()) {
        bail!("config.json: unsupported field `rope_scaling` = {scaling} (RoPE scaling is not supported)");
    }
    Ok(opt(cfg, "rope_theta", f64_field)?.unwrap_or(10_000.0))
}

/// Parse a Hugging Face `config.json` into switchyard configs. Anything the
/// model cannot express exactly is refused with the field's name.
pub fn parse_config(cfg: &Value) -> Result<(HfArch, ModelConfig, MoeConfig)> {
    let model_type = field(cfg, "model_type")?
        .as_str()
        .context("config.json: field `model_type` must be a string")?;
    let arch = match model_type {
        "mixtral" => HfArch::Mixtral,
        "qwen2_moe" => HfArch::Qwen2Moe,
        "qwen3_moe" => HfArch::Qwen3Moe,
        "olmoe" => HfArch::Olmoe,
        "glm4_moe" => HfArch::Glm4Moe,
        "llama" => HfArch::Llama,
        other => bail!(
            "config.json: unsupported field `model_type` = {other:?} (supported: \"mixtral\", \"qwen2_moe\", \"qwen3_moe\", \"olmoe\", \"glm4_moe\", \"llama\")"
        ),
    };
    match cfg.get("hidden_act") {
        None | Some(Value::Null) => {}
        Some(Value::String(act)) if act == "silu" => {}
        Some(act) => bail!("config.json: unsupported field `hidden_act` = {act} (only \"silu\")"),
    }
    match arch {
        HfArch::Mixtral => {
            if let Some(w) = cfg.get("sliding_window").filter(|v| !v.is_null()) {
                bail!("config.json: unsupported field `sliding_window` = {w} (sliding-window attention is not supported; it must be null)");
            }
        }
        HfArch::Qwen2Moe | HfArch::Qwen3Moe => {
            if opt(cfg, "use_sliding_window", bool_field)? == Some(true) {
                bail!("config.json: unsupported field `use_sliding_window` = true (sliding-window attention is not supported)");
            }
            if arch == HfArch::Qwen3Moe && opt(cfg, "attention_bias", bool_field)? == Some(true) {
                bail!("config.json: unsupported field `attention_bias` = true (a biased o_proj is not supported)");
            }
        }
        HfArch::Olmoe | HfArch::Llama => {
            if opt(cfg, "attention_bias", bool_field)? == Some(true) {
                bail!("config.json: unsupported field `attention_bias` = true (a biased o_proj is not supported)");
            }
            if opt(cfg, "mlp_bias", bool_field)? == Some(true) {
                bail!("config.json: unsupported field `mlp_bias` = true (biased MLP projections are not supported)");
            }
            if let Some(t) = cfg.get("pretraining_tp").filter(|v| !v.is_null()) {
                if t.as_u64() != Some(1) {
                    bail!("config.json: unsupported field `pretraining_tp` = {t} (only 1)");
                }
            }
        }
        HfArch::Glm4Moe => {
            let partial = cfg
                .get("rope_parameters")
                .and_then(|r| r.get("partial_rotary_factor"))
                .or_else(|| cfg.get("partial_rotary_factor"))
                .filter(|v| !v.is_null());
            if let Some(p) = partial {
                if p.as_f64() != Some(1.0) {
                    bail!("config.json: unsupported field `partial_rotary_factor` = {p} (only full rotary embeddings, 1.0, are supported)");
                }
            }
        }
    }
    let n_heads = usize_field(cfg, "num_attention_heads")?;
    let n_layers = usize_field(cfg, "num_hidden_layers")?;
    let model = ModelConfig {
        vocab_size: usize_field(cfg, "vocab_size")?,
        d_model: usize_field(cfg, "hidden_size")?,
        n_layers,
        n_heads,
        n_kv_heads: opt(cfg, "num_key_value_heads", usize_field)?.unwrap_or(n_heads),
        head_dim: opt(cfg, "head_dim", usize_field)?,
        d_ff: usize_field(cfg, "intermediate_size")?,
        seq_len: opt(cfg, "max_position_embeddings", usize_field)?.unwrap_or(4096),
        rope_theta: rope_theta(cfg)?,
        rms_norm_eps: opt(cfg, "rms_norm_eps", f64_field)?.unwrap_or(1e-6),
        qkv_bias: match arch {
            HfArch::Mixtral => false,
            HfArch::Qwen2Moe => opt(cfg, "qkv_bias", bool_field)?.unwrap_or(true),
            HfArch::Glm4Moe => opt(cfg, "attention_bias", bool_field)?.unwrap_or(false),
            HfArch::Qwen3Moe | HfArch::Olmoe | HfArch::Llama => false,
        },
        qk_norm: match arch {
            HfArch::Glm4Moe if opt(cfg, "use_qk_norm", bool_field)?.unwrap_or(false) => {
                QkNorm::PerHead
            }
            HfArch::Qwen3Moe => QkNorm::PerHead,
            HfArch::Olmoe => QkNorm::Projection,
            HfArch::Mixtral | HfArch::Qwen2Moe | HfArch::Glm4Moe | HfArch::Llama => QkNorm::None,
        },
        clip_qkv: match arch {
            HfArch::Olmoe => opt(cfg, "clip_qkv", f64_field)?,
            _ => None,
        },
        tie_embeddings: opt(cfg, "tie_word_embeddings", bool_field)?.unwrap_or(false),
        init_std: opt(cfg, "initializer_range", f64_field)?.unwrap_or(0.02),
    };
    let base = MoeConfig {
        top_k: match arch {
            HfArch::Llama => MoeConfig::default().top_k,
            _ => usize_field(cfg, "num_experts_per_tok")?,
        },
        score: RouterScore::Softmax,
        topk_order: TopkOrder::SoftmaxThenTopk,
        drop_policy: DropPolicy::Dropless,
        ..MoeConfig::default()
    };
    let moe = match arch {
        // A dense model: every block a SwiGLU MLP of intermediate_size.
        HfArch::Llama => MoeConfig {
            num_experts: 0,
            ..base
        },
        HfArch::Mixtral => MoeConfig {
            num_experts: usize_field(cfg, "num_local_experts")?,
            d_expert: model.d_ff,
            normalize_topk: true,
            jitter_eps: opt(cfg, "router_jitter_noise", f64_field)?.unwrap_or(0.0),
            layers: Some((0..n_layers).collect()),
            ..base
        },
        HfArch::Qwen2Moe | HfArch::Qwen3Moe => {
            let step = opt(cfg, "decoder_sparse_step", usize_field)?
                .unwrap_or(1)
                .max(1);
            let dense: Vec<usize> = match cfg.get("mlp_only_layers") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|v| {
                        v.as_u64().map(|v| v as usize).with_context(|| {
                            format!("config.json: field `mlp_only_layers` must list layer indices (non-negative integers), found {v}")
                        })
                    })
                    .collect::<Result<_>>()?,
                Some(other) => bail!(
                    "config.json: field `mlp_only_layers` must be a list of layer indices, found {other}"
                ),
            };
            let shared = match arch {
                HfArch::Qwen3Moe => 0,
                _ => opt(cfg, "shared_expert_intermediate_size", usize_field)?.unwrap_or(0),
            };
            let num_experts = match opt(cfg, "num_experts", usize_field)? {
                Some(n) => n,
                None => usize_field(cfg, "num_local_experts")?,
            };
            MoeConfig {
                num_experts,
                d_expert: usize_field(cfg, "moe_intermediate_size")?,
                normalize_topk: opt(cfg, "norm_topk_prob", bool_field)?.unwrap_or(false),
                layers: Some(
                    (0..n_layers)
                        .filter(|i| !dense.contains(i) && (i + 1) % step == 0)
                        .collect(),
                ),
                num_shared_experts: usize::from(shared > 0),
                d_shared_expert: (shared > 0).then_some(shared),
                shared_expert_gate: shared > 0,
                ..base
            }
        }
        HfArch::Olmoe => MoeConfig {
            num_experts: usize_field(cfg, "num_experts")?,
            d_expert: model.d_ff,
            normalize_topk: opt(cfg, "norm_topk_prob", bool_field)?.unwrap_or(false),
            layers: Some((0..n_layers).collect()),
            ..base
        },
        HfArch::Glm4Moe => {
            let d_expert = usize_field(cfg, "moe_intermediate_size")?;
            let n_shared = opt(cfg, "n_shared_experts", usize_field)?.unwrap_or(0);
            MoeConfig {
                num_experts: usize_field(cfg, "n_routed_experts")?,
                d_expert,
                score: RouterScore::Sigmoid,
                normalize_topk: opt(cfg, "norm_topk_prob", bool_field)?.unwrap_or(true),
                first_k_dense: opt(cfg, "first_k_dense_replace", usize_field)?.unwrap_or(0),
                num_shared_experts: n_shared,
                d_shared_expert: (n_shared > 0).then_some(d_expert),
                aux_free_bias: true,
                n_group: opt(cfg, "n_group", usize_field)?.unwrap_or(1),
                topk_group: opt(cfg, "topk_group", usize_field)?.unwrap_or(1),
                routed_scaling_factor: opt(cfg, "routed_scaling_factor", f64_field)?.unwrap_or(1.0),
                ..base
            }
        }
    };
    model.validate()?;
    moe.validate(&model)?;
    Ok((arch, model, moe))
}
