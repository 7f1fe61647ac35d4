//! Hugging Face Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE and GLM-4.5 (the last three read only)
//! checkpoints: `config.json` and `model.safetensors` (or a sharded
//! `model.safetensors.index.json`) in the legacy per-expert layout that
//! transformers v4/v5, candle and mistral.rs use.
//!
//! The mapping between Hugging Face keys and switchyard parameter paths lives
//! in one table, [`key_table`]. PyTorch `Linear` stores `[out, in]` and Burn
//! `[in, out]`, so linear weights are transposed; per-expert matrices are
//! stacked into `[E, in, out]`.

use crate::config::{DropPolicy, ModelConfig, MoeConfig, QkNorm, RouterScore, TopkOrder};
use crate::model::LanguageModel;
use anyhow::{bail, Context, Result};
use burn::prelude::*;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The Hugging Face model families switchyard reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HfArch {
    /// `MixtralForCausalLM`
    Mixtral,
    /// `Qwen2MoeForCausalLM`
    Qwen2Moe,
    /// `Qwen3MoeForCausalLM`: per-head q/k norms, no shared expert.
    Qwen3Moe,
    /// `OlmoeForCausalLM`: q/k norms over the whole projections, clamped q/k/v.
    Olmoe,
    /// `Glm4MoeForCausalLM`: sigmoid routing with a selection bias,
    /// group-limited top-k, a routed scaling factor, per-head q/k norms.
    Glm4Moe,
}

/// Where one switchyard parameter comes from in a Hugging Face checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyMapping {
    /// switchyard parameter path, as in [`crate::params`].
    pub ours: String,
    /// Hugging Face keys: one, or one per expert to be stacked along a new first axis.
    pub hf: Vec<String>,
    /// Whether each Hugging Face matrix is transposed (`[out, in]` ↔ `[in, out]`).
    pub transpose: bool,
    /// Whether `hf` holds one key per expert, stacked.
    pub stacked: bool,
}

/// The one table between switchyard parameter paths and Hugging Face keys for
/// a model of this shape.
pub fn key_table(arch: HfArch, model: &ModelConfig, moe: &MoeConfig) -> Vec<KeyMapping> {
    let mut t = Vec::new();
    let one = |t: &mut Vec<KeyMapping>, ours: String, hf: String, transpose: bool| {
        t.push(KeyMapping {
            ours,
            hf: vec![hf],
            transpose,
            stacked: false,
        })
    };
    one(
        &mut t,
        "embed_tokens.weight".into(),
        "model.embed_tokens.weight".into(),
        false,
    );
    one(
        &mut t,
        "norm.gamma".into(),
        "model.norm.weight".into(),
        false,
    );
    if !model.tie_embeddings {
        one(
            &mut t,
            "lm_head.weight".into(),
            "lm_head.weight".into(),
            true,
        );
    }
    for i in 0..model.n_layers {
        let (o, h) = (format!("layers.{i}"), format!("model.layers.{i}"));
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            one(
                &mut t,
                format!("{o}.{norm}.gamma"),
                format!("{h}.{norm}.weight"),
                false,
            );
        }
        if model.qk_norm != QkNorm::None {
            for n in ["q_norm", "k_norm"] {
                one(
                    &mut t,
                    format!("{o}.self_attn.{n}.gamma"),
                    format!("{h}.self_attn.{n}.weight"),
                    false,
                );
            }
        }
        for proj in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            one(
                &mut t,
                format!("{o}.self_attn.{proj}.weight"),
                format!("{h}.self_attn.{proj}.weight"),
                true,
            );
            if model.qkv_bias && proj != "o_proj" {
                one(
                    &mut t,
                    format!("{o}.self_attn.{proj}.bias"),
                    format!("{h}.self_attn.{proj}.bias"),
                    false,
                );
            }
        }
        if !moe.is_moe_layer(i) {
            for proj in ["gate_proj", "up_proj", "down_proj"] {
                one(
                    &mut t,
                    format!("{o}.mlp.{proj}.weight"),
                    format!("{h}.mlp.{proj}.weight"),
                    true,
                );
            }
            continue;
        }
        let (moe_key, expert_names) = match arch {
            HfArch::Mixtral => ("block_sparse_moe", ["w1", "w3", "w2"]),
            HfArch::Qwen2Moe | HfArch::Qwen3Moe | HfArch::Olmoe | HfArch::Glm4Moe => {
                ("mlp", ["gate_proj", "up_proj", "down_proj"])
            }
        };
        one(
            &mut t,
            format!("{o}.mlp.router.weight"),
            format!("{h}.{moe_key}.gate.weight"),
            true,
        );
        if moe.aux_free_bias {
            one(
                &mut t,
                format!("{o}.mlp.router.expert_bias"),
                format!("{h}.{moe_key}.gate.e_score_correction_bias"),
                false,
            );
        }
        for (ours, theirs) in ["gate_proj", "up_proj", "down_proj"]
            .iter()
            .zip(expert_names)
        {
            t.push(KeyMapping {
                ours: format!("{o}.mlp.experts.{ours}"),
                hf: (0..moe.num_experts)
                    .map(|e| format!("{h}.{moe_key}.experts.{e}.{theirs}.weight"))
                    .collect(),
                transpose: true,
                stacked: true,
            });
        }
        if moe.shared_width() > 0 {
            let theirs = match arch {
                HfArch::Glm4Moe => "shared_experts",
                HfArch::Mixtral | HfArch::Qwen2Moe | HfArch::Qwen3Moe | HfArch::Olmoe => {
                    "shared_expert"
                }
            };
            for proj in ["gate_proj", "up_proj", "down_proj"] {
                one(
                    &mut t,
                    format!("{o}.mlp.shared_expert.{proj}.weight"),
                    format!("{h}.mlp.{theirs}.{proj}.weight"),
                    true,
                );
            }
        }
        if moe.shared_expert_gate {
            one(
                &mut t,
                format!("{o}.mlp.shared_expert_gate.weight"),
                format!("{h}.mlp.shared_expert_gate.weight"),
                true,
            );
        }
    }
    t
}

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
        other => bail!(
            "config.json: unsupported field `model_type` = {other:?} (supported: \"mixtral\", \"qwen2_moe\", \"qwen3_moe\", \"olmoe\", \"glm4_moe\")"
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
        HfArch::Olmoe => {
            if opt(cfg, "attention_bias", bool_field)? == Some(true) {
                bail!("config.json: unsupported field `attention_bias` = true (a biased o_proj is not supported)");
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
            HfArch::Qwen3Moe | HfArch::Olmoe => false,
        },
        qk_norm: match arch {
            HfArch::Glm4Moe if opt(cfg, "use_qk_norm", bool_field)?.unwrap_or(false) => {
                QkNorm::PerHead
            }
            HfArch::Qwen3Moe => QkNorm::PerHead,
            HfArch::Olmoe => QkNorm::Projection,
            HfArch::Mixtral | HfArch::Qwen2Moe | HfArch::Glm4Moe => QkNorm::None,
        },
        clip_qkv: match arch {
            HfArch::Olmoe => opt(cfg, "clip_qkv", f64_field)?,
            _ => None,
        },
        tie_embeddings: opt(cfg, "tie_word_embeddings", bool_field)?.unwrap_or(false),
        init_std: opt(cfg, "initializer_range", f64_field)?.unwrap_or(0.02),
    };
    let base = MoeConfig {
        top_k: usize_field(cfg, "num_experts_per_tok")?,
        score: RouterScore::Softmax,
        topk_order: TopkOrder::SoftmaxThenTopk,
        drop_policy: DropPolicy::Dropless,
        ..MoeConfig::default()
    };
    let moe = match arch {
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

/// Read every tensor of a checkpoint directory, converted to f32 (ints to i64).
pub fn read_safetensors_dir(dir: &Path) -> Result<HashMap<String, TensorData>> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if single.exists() {
        vec![single]
    } else if index.exists() {
        let idx: Value = serde_json::from_slice(&std::fs::read(&index)?)
            .with_context(|| format!("{}: not valid JSON", index.display()))?;
        let map = idx
            .get("weight_map")
            .and_then(Value::as_object)
            .with_context(|| format!("{}: no `weight_map`", index.display()))?;
        let mut names: Vec<&str> = map.values().filter_map(Value::as_str).collect();
        names.sort();
        names.dedup();
        names.into_iter().map(|n| dir.join(n)).collect()
    } else {
        bail!(
            "{}: no model.safetensors or model.safetensors.index.json",
            dir.display()
        );
    };
    let mut out = HashMap::new();
    for f in files {
        out.extend(read_safetensors(&f)?);
    }
    Ok(out)
}

/// Read one safetensors file, floats as f32 and integers as i64 (see
/// [`crate::tensorfile`]).
pub fn read_safetensors(path: &Path) -> Result<HashMap<String, TensorData>> {
    crate::tensorfile::read(path)
}

/// Transpose a row-major `[r, c]` matrix into `[c, r]`.
pub fn transpose_matrix(v: &[f32], r: usize, c: usize) -> Vec<f32> {
    let mut out = vec![0f32; r * c];
    for i in 0..r {
        for j in 0..c {
            out[j * r + i] = v[i * c + j];
        }
    }
    out
}

/// Transpose a host-side `[r, c]` f32 tensor.
fn transpose(data: &TensorData) -> Result<(Vec<f32>, [usize; 2])> {
    let shape = data.shape().to_vec();
    let [r, c] = shape[..] else {
        bail!("expected a matrix, found shape {shape:?}");
    };
    let v = data
        .as_slice::<f32>()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    Ok((transpose_matrix(v, r, c), [c, r]))
}

/// Apply the key table to Hugging Face tensors, giving switchyard parameters.
pub fn to_params(
    table: &[KeyMapping],
    hf: &HashMap<String, TensorData>,
) -> Result<BTreeMap<String, TensorData>> {
    let mut out = BTreeMap::new();
    for m in table {
        let mut parts = Vec::with_capacity(m.hf.len());
        for key in &m.hf {
            let t = hf
                .get(key)
                .with_context(|| format!("checkpoint has no tensor `{key}`"))?;
            let (v, shape) = if m.transpose {
                let (v, s) = transpose(t).with_context(|| format!("tensor `{key}`"))?;
                (v, s.to_vec())
            } else {
                (
                    t.try_to_vec::<f32>()
                        .map_err(|e| anyhow::anyhow!("{key}: {e:?}"))?,
                    t.shape().to_vec(),
                )
            };
            parts.push((v, shape));
        }
        let data = if m.stacked {
            let mut shape = vec![parts.len()];
            shape.extend(&parts[0].1);
            if parts.iter().any(|p| p.1 != parts[0].1) {
                bail!("experts of `{}` have differing shapes", m.ours);
            }
            TensorData::new(
                parts.into_iter().flat_map(|p| p.0).collect::<Vec<f32>>(),
                shape,
            )
        } else {
            let (v, s) = parts.pop().unwrap();
            TensorData::new(v, s)
        };
        out.insert(m.ours.clone(), data);
    }
    Ok(out)
}

/// Whether a directory looks like a Hugging Face checkpoint.
pub fn is_hf_dir(dir: &Path) -> bool {
    dir.join("config.json").exists()
        && (dir.join("model.safetensors").exists()
            || dir.join("model.safetensors.index.json").exists())
}

/// Load a Hugging Face Mixtral or Qwen2-MoE directory into a switchyard model.
pub fn load(dir: &Path, device: &Device) -> Result<(HfArch, LanguageModel)> {
    let cfg_path = dir.join("config.json");
    let cfg: Value = serde_json::from_slice(
        &std::fs::read(&cfg_path).with_context(|| format!("reading {}", cfg_path.display()))?,
    )
    .with_context(|| format!("{}: not valid JSON", cfg_path.display()))?;
    let (arch, model_cfg, moe_cfg) =
        parse_config(&cfg).with_context(|| format!("in {}", cfg_path.display()))?;
    let tensors = read_safetensors_dir(dir)?;
    let params = to_params(&key_table(arch, &model_cfg, &moe_cfg), &tensors)
        .with_context(|| format!("in {}", dir.display()))?;
    let model = LanguageModel::unloaded(&model_cfg, &moe_cfg, device);
    let model = crate::params::load(model, &params)?;
    Ok((arch, model))
}
