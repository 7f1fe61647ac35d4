//! Export to a Hugging Face directory: `config.json`, `model.safetensors`
//! (legacy per-expert layout, loadable by transformers v4/v5, candle and
//! mistral.rs), `generation_config.json`, and the tokenizer.
//!
//! Mixtral is chosen when it expresses the model exactly: every block MoE, no
//! shared experts, no attention biases, softmax routing with renormalised
//! top-k. Otherwise Qwen2-MoE, which can express the rest exactly:
//! - missing q/k/v biases are written as zeros;
//! - an ungated shared expert gets a zero gate (sigmoid(0) = 1/2) and a
//!   doubled `down_proj`;
//! - no shared expert becomes a width-1 expert whose weights are all zero.
//!
//! Sigmoid scores and the aux-loss-free selection bias have no equivalent in
//! either family, so such models are refused with the reason.

use crate::config::{ModelConfig, MoeConfig, QkNorm, RouterScore, TopkOrder};
use crate::hf::{key_table, transpose_matrix as transpose, HfArch};
use crate::model::LanguageModel;
use anyhow::{bail, Context, Result};
use burn::prelude::*;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;

/// Which Hugging Face family to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// Mixtral when possible, else Qwen2-MoE.
    Auto,
    /// `MixtralForCausalLM`.
    Mixtral,
    /// `Qwen2MoeForCausalLM`.
    Qwen2Moe,
}

/// Weight dtype of the written safetensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportDtype {
    /// float32.
    F32,
    /// bfloat16.
    Bf16,
}

/// Why neither family can express the model, if so.
fn inexpressible(model: &ModelConfig, moe: &MoeConfig, n_moe_layers: usize) -> Option<String> {
    if n_moe_layers == 0 {
        return Some("the model has no MoE layers (moe.num_experts = 0)".into());
    }
    if model.qk_norm != QkNorm::None {
        return Some("model.qk_norm (q/k norms) has no Mixtral or Qwen2-MoE equivalent".into());
    }
    if model.clip_qkv.is_some() {
        return Some(
            "model.clip_qkv (clamped q/k/v) has no Mixtral or Qwen2-MoE equivalent".into(),
        );
    }
    if moe.score == RouterScore::Sigmoid {
        return Some("moe.score = \"sigmoid\" has no Mixtral or Qwen2-MoE equivalent".into());
    }
    if moe.aux_free_bias {
        return Some("moe.aux_free_bias changes expert selection, which Mixtral and Qwen2-MoE cannot express".into());
    }
    if moe.n_group > 1 {
        return Some(
            "moe.n_group > 1 (group-limited routing) has no Mixtral or Qwen2-MoE equivalent".into(),
        );
    }
    if moe.routed_scaling_factor != 1.0 {
        return Some(
            "moe.routed_scaling_factor != 1 has no Mixtral or Qwen2-MoE equivalent".into(),
        );
    }
    None
}

/// Why Mixtral cannot express the model, if so.
fn not_mixtral(model: &ModelConfig, moe: &MoeConfig, n_moe_layers: usize) -> Option<String> {
    if n_moe_layers != model.n_layers {
        return Some("some blocks are dense".into());
    }
    if moe.shared_width() > 0 {
        return Some("it has shared experts".into());
    }
    if model.qkv_bias {
        return Some("attention has q/k/v biases".into());
    }
    if moe.topk_order == TopkOrder::SoftmaxThenTopk && !moe.normalize_topk {
        return Some("top-k weights are not renormalised".into());
    }
    None
}

/// Pick the family, or refuse with the reason.
pub fn choose_format(model: &LanguageModel, want: ExportFormat) -> Result<HfArch> {
    let (m, moe) = (model.config(), model.moe_config());
    let n_moe = model.moe_layers().count();
    if let Some(why) = inexpressible(m, moe, n_moe) {
        bail!("cannot export: {why}");
    }
    let mixtral_problem = not_mixtral(m, moe, n_moe);
    match (want, mixtral_problem) {
        (ExportFormat::Mixtral, Some(why)) => {
            bail!("cannot export as Mixtral: {why}; use --format qwen2-moe or auto")
        }
        (ExportFormat::Mixtral, None) | (ExportFormat::Auto, None) => Ok(HfArch::Mixtral),
        (ExportFormat::Qwen2Moe, _) | (ExportFormat::Auto, Some(_)) => Ok(HfArch::Qwen2Moe),
    }
}

fn zeros(shape: &[usize]) -> TensorData {
    TensorData::new(vec![0f32; shape.iter().product()], shape.to_vec())
}

/// The values of parameter `name` as f32 (parameters are f32 master
/// weights; anything else is an error, never an empty tensor).
fn f32s(name: &str, d: &TensorData) -> Result<Vec<f32>> {
    d.clone()
        .convert_dtype(burn::tensor::DType::F32)
        .try_to_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("parameter `{name}`: cannot read it as f32: {e:?}"))
}

/// Rewrite parameters and configs into a form the family expresses exactly.
fn adapt(
    arch: HfArch,
    model: &LanguageModel,
    mut params: BTreeMap<String, TensorData>,
) -> Result<(ModelConfig, MoeConfig, BTreeMap<String, TensorData>)> {
    let mut m = model.config().clone();
    let mut moe = model.moe_config().clone();
    let d = m.d_model;
    if moe.topk_order == TopkOrder::TopkThenSoftmax {
        // Softmax over the k chosen logits equals renormalised full-softmax probabilities.
        moe.topk_order = TopkOrder::SoftmaxThenTopk;
        moe.normalize_topk = true;
    }
    if arch == HfArch::Qwen2Moe {
        let hd = m.head_dim();
        if !m.qkv_bias {
            for i in 0..m.n_layers {
                for (p, heads) in [
                    ("q_proj", m.n_heads),
                    ("k_proj", m.n_kv_heads),
                    ("v_proj", m.n_kv_heads),
                ] {
                    params.insert(
                        format!("layers.{i}.self_attn.{p}.bias"),
                        zeros(&[heads * hd]),
                    );
                }
            }
            m.qkv_bias = true;
        }
        let moe_layers: Vec<usize> = (0..m.n_layers).filter(|&i| moe.is_moe_layer(i)).collect();
        let gated = moe.shared_expert_gate;
        let had_shared = moe.shared_width() > 0;
        for &i in &moe_layers {
            let pre = format!("layers.{i}.mlp");
            if !had_shared {
                params.insert(
                    format!("{pre}.shared_expert.gate_proj.weight"),
                    zeros(&[d, 1]),
                );
                params.insert(
                    format!("{pre}.shared_expert.up_proj.weight"),
                    zeros(&[d, 1]),
                );
                params.insert(
                    format!("{pre}.shared_expert.down_proj.weight"),
                    zeros(&[1, d]),
                );
            }
            if !gated {
                params.insert(format!("{pre}.shared_expert_gate.weight"), zeros(&[d, 1]));
                if had_shared {
                    let key = format!("{pre}.shared_expert.down_proj.weight");
                    let w = params
                        .get(&key)
                        .with_context(|| format!("model has no parameter `{key}`"))?;
                    let doubled: Vec<f32> = f32s(&key, w)?.iter().map(|v| v * 2.0).collect();
                    let shape = w.shape().to_vec();
                    params.insert(key, TensorData::new(doubled, shape));
                }
            }
        }
        if !had_shared {
            moe.num_shared_experts = 1;
            moe.d_shared_expert = Some(1);
        }
        moe.shared_expert_gate = true;
    }
    Ok((m, moe, params))
}

fn config_json(
    arch: HfArch,
    m: &ModelConfig,
    moe: &MoeConfig,
    eos: Option<u32>,
) -> Result<serde_json::Value> {
    let mut c = json!({
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
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
        "num_experts_per_tok": moe.top_k,
        "attention_dropout": 0.0,
        "torch_dtype": "float32",
        "use_cache": true,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "output_router_logits": false,
        "router_aux_loss_coef": moe.aux_loss_coef,
    });
    let Some(obj) = c.as_object_mut() else {
        unreachable!("json!({{..}}) is an object")
    };
    match arch {
        HfArch::Mixtral => {
            obj.insert("architectures".into(), json!(["MixtralForCausalLM"]));
            obj.insert("model_type".into(), json!("mixtral"));
            obj.insert("intermediate_size".into(), json!(moe.d_expert));
            obj.insert("num_local_experts".into(), json!(moe.num_experts));
            obj.insert("router_jitter_noise".into(), json!(moe.jitter_eps));
            obj.insert("sliding_window".into(), serde_json::Value::Null);
        }
        HfArch::Qwen2Moe => {
            let dense: Vec<usize> = (0..m.n_layers).filter(|&i| !moe.is_moe_layer(i)).collect();
            obj.insert("architectures".into(), json!(["Qwen2MoeForCausalLM"]));
            obj.insert("model_type".into(), json!("qwen2_moe"));
            obj.insert("intermediate_size".into(), json!(m.d_ff));
            obj.insert("moe_intermediate_size".into(), json!(moe.d_expert));
            obj.insert(
                "shared_expert_intermediate_size".into(),
                json!(moe.shared_width()),
            );
            obj.insert("num_experts".into(), json!(moe.num_experts));
            obj.insert("norm_topk_prob".into(), json!(moe.normalize_topk));
            obj.insert("decoder_sparse_step".into(), json!(1));
            obj.insert("mlp_only_layers".into(), json!(dense));
            obj.insert("qkv_bias".into(), json!(true));
            obj.insert("use_sliding_window".into(), json!(false));
            obj.insert("sliding_window".into(), serde_json::Value::Null);
            obj.insert("max_window_layers".into(), json!(m.n_layers));
        }
        HfArch::Qwen3Moe | HfArch::Olmoe | HfArch::Glm4Moe | HfArch::Llama => {
            bail!("writing {arch:?} checkpoints is not supported yet")
        }
    }
    Ok(c)
}

/// Write `model` to `out` as a Hugging Face directory; returns the family used.
pub fn export(
    model: &LanguageModel,
    tokenizer: Option<&Path>,
    out: &Path,
    format: ExportFormat,
    dtype: ExportDtype,
) -> Result<HfArch> {
    let arch = choose_format(model, format)?;
    let (m, moe, ours) = adapt(arch, model, crate::params::collect(model))?;
    // Every HF tensor, from the one key table.
    let mut hf: BTreeMap<String, (Vec<f32>, Vec<usize>)> = BTreeMap::new();
    for map in key_table(arch, &m, &moe) {
        let t = ours
            .get(&map.ours)
            .with_context(|| format!("model has no parameter `{}`", map.ours))?;
        let shape = t.shape().to_vec();
        let v = f32s(&map.ours, t)?;
        if map.stacked {
            let (e, r, c) = (shape[0], shape[1], shape[2]);
            for (i, key) in map.hf.iter().enumerate().take(e) {
                let slice = &v[i * r * c..(i + 1) * r * c];
                hf.insert(key.clone(), (transpose(slice, r, c), vec![c, r]));
            }
        } else if map.transpose {
            hf.insert(
                map.hf[0].clone(),
                (transpose(&v, shape[0], shape[1]), vec![shape[1], shape[0]]),
            );
        } else {
            hf.insert(map.hf[0].clone(), (v, shape));
        }
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let tensors: BTreeMap<String, TensorData> = hf
        .into_iter()
        .map(|(k, (v, s))| {
            let data = match dtype {
                ExportDtype::F32 => TensorData::new(v, s),
                ExportDtype::Bf16 => TensorData::new(
                    v.into_iter().map(half::bf16::from_f32).collect::<Vec<_>>(),
                    s,
                ),
            };
            (k, data)
        })
        .collect();
    let meta = [("format".to_string(), "pt".to_string())]
        .into_iter()
        .collect();
    std::fs::write(
        out.join("model.safetensors"),
        crate::tensorfile::to_bytes(&tensors, Some(meta))?,
    )?;

    let eos = match tokenizer {
        Some(t) => {
            let tok = crate::data::tokenizer::load(t)?;
            std::fs::copy(t, out.join("tokenizer.json"))?;
            let eos = tok.token_to_id("<|endoftext|>");
            let tc = json!({
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": eos.map(|_| "<|endoftext|>"),
                "bos_token": eos.map(|_| "<|endoftext|>"),
                "model_max_length": m.seq_len,
                "clean_up_tokenization_spaces": false,
            });
            std::fs::write(
                out.join("tokenizer_config.json"),
                serde_json::to_string_pretty(&tc)?,
            )?;
            eos
        }
        None => None,
    };
    let mut cfg = config_json(arch, &m, &moe, eos)?;
    if dtype == ExportDtype::Bf16 {
        cfg["torch_dtype"] = json!("bfloat16");
    }
    std::fs::write(out.join("config.json"), serde_json::to_string_pretty(&cfg)?)?;
    let gen = json!({"bos_token_id": eos, "eos_token_id": eos, "do_sample": true, "temperature": 1.0, "top_k": 50});
    std::fs::write(
        out.join("generation_config.json"),
        serde_json::to_string_pretty(&gen)?,
    )?;
    Ok(arch)
}
