//! Export to a Hugging Face directory: `config.json`, `model.safetensors`
//! (legacy per-expert layout, loadable by transformers v4/v5, candle and
//! mistral.rs), `generation_config.json`, and the tokenizer.
//!
//! Each family says which models it expresses exactly and how it writes
//! them ([`crate::hf::family::Family`]); `--format auto` takes the first of
//! [`crate::hf::FAMILIES`] that expresses the model, or refuses with each
//! family's reason.

use crate::config::{ModelConfig, MoeConfig, TopkOrder};
use crate::hf::family::{mup_differs, Family};
use crate::hf::{f32s, key_table, transpose_matrix as transpose, write_config, HfArch, FAMILIES};
use crate::model::LanguageModel;
use anyhow::{bail, Context, Result};
use burn::prelude::*;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;

/// Which Hugging Face family to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// The simplest family that expresses the model exactly.
    Auto,
    /// This family, or an error saying why it cannot.
    Family(HfArch),
}

/// Weight dtype of the written safetensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportDtype {
    /// float32.
    F32,
    /// bfloat16.
    Bf16,
}

/// Why `family` cannot express the model, if it cannot.
fn refused(family: &Family, m: &ModelConfig, moe: &MoeConfig) -> Option<String> {
    match family.mup {
        false => mup_differs(m).or_else(|| (family.refuses)(m, moe)),
        true => (family.refuses)(m, moe),
    }
}

/// Pick the family, or refuse with the reason.
pub fn choose_format(model: &LanguageModel, want: ExportFormat) -> Result<HfArch> {
    let (m, moe) = (model.config(), model.moe_config());
    match want {
        ExportFormat::Family(arch) => {
            let family = arch.family();
            match refused(family, m, moe) {
                Some(why) => bail!("cannot export as {} ({}): {why}", family.name, family.class),
                None => Ok(arch),
            }
        }
        ExportFormat::Auto => {
            let mut reasons = Vec::new();
            for family in FAMILIES {
                match refused(family, m, moe) {
                    None => return Ok(family.arch),
                    Some(why) => reasons.push(format!("  {}: {why}", family.name)),
                }
            }
            bail!(
                "cannot export: no Hugging Face family expresses this model exactly:\n{}",
                reasons.join("\n")
            )
        }
    }
}

/// Rewrite parameters and configs into a form the family expresses exactly.
fn adapt(
    arch: HfArch,
    model: &LanguageModel,
    mut params: BTreeMap<String, TensorData>,
) -> Result<(ModelConfig, MoeConfig, BTreeMap<String, TensorData>)> {
    let mut m = model.config().clone();
    let mut moe = model.moe_config().clone();
    if moe.topk_order == TopkOrder::TopkThenSoftmax {
        // Softmax over the k chosen logits equals renormalised full-softmax probabilities.
        moe.topk_order = TopkOrder::SoftmaxThenTopk;
        moe.normalize_topk = true;
    }
    (arch.family().adapt)(&mut m, &mut moe, &mut params)?;
    Ok((m, moe, params))
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
        if let Some(rows) = map.rows {
            // Ours [E, C, len] → rows start..start+len of each expert's
            // [total, C] block in one fused tensor.
            let (e, c, len) = (shape[0], shape[1], shape[2]);
            let (buf, _) = hf
                .entry(map.hf[0].clone())
                .or_insert_with(|| (vec![0f32; e * rows.total * c], vec![e, rows.total, c]));
            for x in 0..e {
                let block = transpose(&v[x * c * len..(x + 1) * c * len], c, len); // [len, C]
                let at = (x * rows.total + rows.start) * c;
                buf[at..at + len * c].copy_from_slice(&block);
            }
        } else if map.stacked {
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
    let mut cfg = write_config(arch, &m, &moe, eos);
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
