//! Hugging Face checkpoints: `config.json` and `model.safetensors` (or a
//! sharded `model.safetensors.index.json`) in the legacy per-expert layout
//! that transformers v4/v5, candle and mistral.rs use.
//!
//! The families live one per file, each saying how its `config.json` and
//! key names map ([`family::Family`]); the registry below finds them by
//! `model_type`. The mapping between Hugging Face keys and switchyard
//! parameter paths lives in one table, [`key_table`]. PyTorch `Linear`
//! stores `[out, in]` and Burn `[in, out]`, so linear weights are
//! transposed; per-expert matrices are stacked into `[E, in, out]`.

mod config;
pub mod family;
mod glm4_moe;
mod granitemoe;
mod keys;
mod llama;
mod mistral;
mod mixtral;
mod olmoe;
mod qwen2;
mod qwen2_moe;
mod qwen3;
mod qwen3_moe;

pub use config::{parse_config, write_config};
pub use family::Family;
pub use keys::{key_table, KeyMapping};

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
    /// `GraniteMoeForCausalLM`: fused expert tensors and muP scalars.
    GraniteMoe,
    /// `LlamaForCausalLM`: dense.
    Llama,
    /// `MistralForCausalLM`: dense.
    Mistral,
    /// `Qwen2ForCausalLM`: dense, q/k/v biases.
    Qwen2,
    /// `Qwen3ForCausalLM`: dense, per-head q/k norms.
    Qwen3,
}

/// Every family, in the order `export --format auto` tries them: the
/// simplest that expresses a model exactly comes first.
pub const FAMILIES: [&Family; 10] = [
    &mixtral::FAMILY,
    &qwen3_moe::FAMILY,
    &olmoe::FAMILY,
    &glm4_moe::FAMILY,
    &qwen2_moe::FAMILY,
    &granitemoe::FAMILY,
    &llama::FAMILY,
    &qwen3::FAMILY,
    &qwen2::FAMILY,
    &mistral::FAMILY,
];

impl HfArch {
    /// The family's description.
    pub fn family(self) -> &'static Family {
        match self {
            HfArch::Mixtral => &mixtral::FAMILY,
            HfArch::Qwen2Moe => &qwen2_moe::FAMILY,
            HfArch::Qwen3Moe => &qwen3_moe::FAMILY,
            HfArch::Olmoe => &olmoe::FAMILY,
            HfArch::Glm4Moe => &glm4_moe::FAMILY,
            HfArch::GraniteMoe => &granitemoe::FAMILY,
            HfArch::Llama => &llama::FAMILY,
            HfArch::Mistral => &mistral::FAMILY,
            HfArch::Qwen2 => &qwen2::FAMILY,
            HfArch::Qwen3 => &qwen3::FAMILY,
        }
    }

    /// The family named `name` as `export --format` spells it.
    pub fn from_name(name: &str) -> Option<HfArch> {
        FAMILIES.iter().find(|f| f.name == name).map(|f| f.arch)
    }
}

/// The family whose `model_type` this is, or an error naming the ones read.
fn family_of_model_type(model_type: &str) -> Result<&'static Family> {
    FAMILIES
        .iter()
        .copied()
        .find(|f| f.model_type == model_type)
        .with_context(|| {
            let known: Vec<String> = FAMILIES
                .iter()
                .map(|f| format!("{:?}", f.model_type))
                .collect();
            format!(
                "config.json: unsupported field `model_type` = {model_type:?} (supported: {})",
                known.join(", ")
            )
        })
}

/// The values of parameter `name` as f32 (parameters are f32 master
/// weights; anything else is an error, never an empty tensor).
pub fn f32s(name: &str, d: &TensorData) -> Result<Vec<f32>> {
    d.clone()
        .convert_dtype(burn::tensor::DType::F32)
        .try_to_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("parameter `{name}`: cannot read it as f32: {e:?}"))
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
        if let Some(rows) = m.rows {
            out.insert(m.ours.clone(), unfuse(hf, &m.hf[0], rows, m.transpose)?);
            continue;
        }
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

/// Each expert's rows of a fused `[E, total, C]` tensor, stacked as
/// `[E, C, len]` (transposed) or `[E, len, C]`.
fn unfuse(
    hf: &HashMap<String, TensorData>,
    key: &str,
    rows: keys::Rows,
    transpose: bool,
) -> Result<TensorData> {
    let t = hf
        .get(key)
        .with_context(|| format!("checkpoint has no tensor `{key}`"))?;
    let shape = t.shape().to_vec();
    let [e, total, c] = shape[..] else {
        bail!("tensor `{key}`: expected [experts, rows, columns], found shape {shape:?}");
    };
    if total != rows.total {
        bail!(
            "tensor `{key}`: expected {} rows per expert, found {total}",
            rows.total
        );
    }
    let v = t
        .as_slice::<f32>()
        .map_err(|err| anyhow::anyhow!("{key}: {err:?}"))?;
    let mut out = Vec::with_capacity(e * rows.len * c);
    for x in 0..e {
        let from = (x * total + rows.start) * c;
        let block = &v[from..from + rows.len * c]; // [len, C]
        match transpose {
            true => out.extend(transpose_matrix(block, rows.len, c)),
            false => out.extend_from_slice(block),
        }
    }
    let shape = match transpose {
        true => vec![e, c, rows.len],
        false => vec![e, rows.len, c],
    };
    Ok(TensorData::new(out, shape))
}

/// Whether a directory looks like a Hugging Face checkpoint.
pub fn is_hf_dir(dir: &Path) -> bool {
    dir.join("config.json").exists()
        && (dir.join("model.safetensors").exists()
            || dir.join("model.safetensors.index.json").exists())
}

/// Load a Hugging Face directory of any family in [`FAMILIES`] into a switchyard model.
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
