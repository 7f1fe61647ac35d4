//! What every family file fills in: how its `config.json` reads into
//! switchyard's config and back, which models it can express exactly, and
//! the names its checkpoint gives the MoE modules. The checks and JSON
//! helpers the families share live here too.

use super::HfArch;
use crate::config::{ModelConfig, MoeConfig, QkNorm, RouterScore};
use anyhow::{Context, Result};
use burn::prelude::TensorData;
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// Parameters by switchyard path, as [`crate::params::collect`] gives them.
pub type Params = BTreeMap<String, TensorData>;

/// The checkpoint's names for the MoE block's parts.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    /// The module holding the router and the experts (`block_sparse_moe`, `mlp`).
    pub moe: &'static str,
    /// Each expert's gate, up and down projections.
    pub expert: [&'static str; 3],
    /// The shared expert's module, under `mlp`.
    pub shared: &'static str,
    /// The router's module, under `moe` (`gate`, `router.layer`).
    pub router: &'static str,
    /// Every expert in two fused tensors, `[E, 2F, d]` (gate rows, then up
    /// rows) and `[E, d, F]`, instead of one tensor per expert and projection.
    pub fused: Option<[&'static str; 2]>,
}

/// The layout of the families that follow Qwen2-MoE's names.
pub const MLP_LAYOUT: Layout = Layout {
    moe: "mlp",
    expert: ["gate_proj", "up_proj", "down_proj"],
    shared: "shared_expert",
    router: "gate",
    fused: None,
};

/// One Hugging Face family.
pub struct Family {
    /// Which one.
    pub arch: HfArch,
    /// `config.json`'s `model_type`.
    pub model_type: &'static str,
    /// `config.json`'s `architectures[0]`.
    pub class: &'static str,
    /// The name `export --format` takes.
    pub name: &'static str,
    /// Whether the family has Granite's muP scalars (`model.embedding_multiplier`,
    /// `residual_multiplier`, `attention_multiplier`, `logits_scaling`).
    pub mup: bool,
    /// Whether the family is dense (no experts).
    pub dense: bool,
    /// Checkpoint names of the MoE parts.
    pub layout: Layout,
    /// Read the family's fields: `model` holds the fields every family
    /// shares; the family sets the rest and returns both configs.
    pub read: fn(&Value, ModelConfig) -> Result<(ModelConfig, MoeConfig)>,
    /// Why the family cannot express this model exactly, if it cannot.
    pub refuses: fn(&ModelConfig, &MoeConfig) -> Option<String>,
    /// Rewrite the model into a form the family writes (zero biases, a
    /// zero shared expert); a no-op for most.
    pub adapt: fn(&mut ModelConfig, &mut MoeConfig, &mut Params) -> Result<()>,
    /// Add the family's own fields to `config.json`.
    pub write: fn(&ModelConfig, &MoeConfig, &mut Map<String, Value>),
}

/// An [`Family::adapt`] that changes nothing.
pub fn as_is(_: &mut ModelConfig, _: &mut MoeConfig, _: &mut Params) -> Result<()> {
    Ok(())
}

fn field<'a>(cfg: &'a Value, key: &str) -> Result<&'a Value> {
    cfg.get(key)
        .filter(|v| !v.is_null())
        .with_context(|| format!("config.json: missing field `{key}`"))
}

/// A required non-negative integer field.
pub fn usize_field(cfg: &Value, key: &str) -> Result<usize> {
    field(cfg, key)?
        .as_u64()
        .map(|v| v as usize)
        .with_context(|| format!("config.json: field `{key}` must be a non-negative integer"))
}

/// A required number field.
pub fn f64_field(cfg: &Value, key: &str) -> Result<f64> {
    field(cfg, key)?
        .as_f64()
        .with_context(|| format!("config.json: field `{key}` must be a number"))
}

/// A required boolean field.
pub fn bool_field(cfg: &Value, key: &str) -> Result<bool> {
    field(cfg, key)?
        .as_bool()
        .with_context(|| format!("config.json: field `{key}` must be true or false"))
}

/// A required string field.
pub fn str_field<'a>(cfg: &'a Value, key: &str) -> Result<&'a str> {
    field(cfg, key)?
        .as_str()
        .with_context(|| format!("config.json: field `{key}` must be a string"))
}

/// An optional field read with `f`; absent and `null` give `None`.
pub fn opt<T>(cfg: &Value, key: &str, f: impl Fn(&Value, &str) -> Result<T>) -> Result<Option<T>> {
    match cfg.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(_) => f(cfg, key).map(Some),
    }
}

/// Refuse `key = true` (a feature the model does not have), naming it.
pub fn refuse_true(cfg: &Value, key: &str, what: &str) -> Result<()> {
    if opt(cfg, key, bool_field)? == Some(true) {
        anyhow::bail!("config.json: unsupported field `{key}` = true ({what} is not supported)");
    }
    Ok(())
}

/// Refuse a non-null `sliding_window` unless `use_sliding_window` is false.
pub fn refuse_sliding_window(cfg: &Value) -> Result<()> {
    refuse_true(cfg, "use_sliding_window", "sliding-window attention")?;
    if opt(cfg, "use_sliding_window", bool_field)?.is_none() {
        if let Some(w) = cfg.get("sliding_window").filter(|v| !v.is_null()) {
            anyhow::bail!("config.json: unsupported field `sliding_window` = {w} (sliding-window attention is not supported; it must be null)");
        }
    }
    if let Some(types) = cfg.get("layer_types").and_then(Value::as_array) {
        if let Some(t) = types.iter().find(|t| t.as_str() != Some("full_attention")) {
            anyhow::bail!("config.json: unsupported field `layer_types` entry {t} (only \"full_attention\"; sliding-window attention is not supported)");
        }
    }
    Ok(())
}

/// Layer indices from a list field such as `mlp_only_layers`.
pub fn layer_list(cfg: &Value, key: &str) -> Result<Vec<usize>> {
    match cfg.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_u64().map(|v| v as usize).with_context(|| {
                    format!("config.json: field `{key}` must list layer indices (non-negative integers), found {v}")
                })
            })
            .collect(),
        Some(other) => {
            anyhow::bail!("config.json: field `{key}` must be a list of layer indices, found {other}")
        }
    }
}

/// The MoE block indices of a model.
pub fn moe_layers(m: &ModelConfig, moe: &MoeConfig) -> Vec<usize> {
    (0..m.n_layers).filter(|&i| moe.is_moe_layer(i)).collect()
}

/// The dense block indices of a model.
pub fn dense_layers(m: &ModelConfig, moe: &MoeConfig) -> Vec<usize> {
    (0..m.n_layers).filter(|&i| !moe.is_moe_layer(i)).collect()
}

/// Why a family whose q/k norm is `want` (and whose q/k/v are never
/// clamped unless `clip` says so) cannot hold this attention.
pub fn attention_differs(m: &ModelConfig, want: QkNorm, clip: bool) -> Option<String> {
    if m.qk_norm != want {
        let name = |q: QkNorm| match q {
            QkNorm::None => "\"none\"",
            QkNorm::PerHead => "\"per_head\"",
            QkNorm::Projection => "\"projection\"",
        };
        return Some(format!(
            "model.qk_norm = {} (the family has {})",
            name(m.qk_norm),
            name(want)
        ));
    }
    if !clip && m.clip_qkv.is_some() {
        return Some("model.clip_qkv (clamped q/k/v)".into());
    }
    None
}

/// Why a softmax-routed family (Mixtral, the Qwen MoEs, OLMoE) cannot
/// express this router.
pub fn softmax_routing_differs(moe: &MoeConfig) -> Option<String> {
    if moe.score == RouterScore::Sigmoid {
        return Some("moe.score = \"sigmoid\"".into());
    }
    if moe.aux_free_bias {
        return Some("moe.aux_free_bias (a selection bias on softmax scores)".into());
    }
    if moe.n_group > 1 {
        return Some("moe.n_group > 1 (group-limited routing)".into());
    }
    if moe.routed_scaling_factor != 1.0 {
        return Some("moe.routed_scaling_factor != 1".into());
    }
    None
}

/// Why an MoE family with no shared expert cannot express this model.
pub fn has_shared(moe: &MoeConfig) -> Option<String> {
    (moe.shared_width() > 0).then(|| "moe.num_shared_experts > 0 (shared experts)".into())
}

/// Why an MoE family cannot hold a model without MoE blocks.
pub fn no_moe(m: &ModelConfig, moe: &MoeConfig) -> Option<String> {
    moe_layers(m, moe)
        .is_empty()
        .then(|| "the model has no MoE blocks (a dense model)".into())
}

/// Why a family without attention biases cannot express this model.
pub fn has_bias(m: &ModelConfig) -> Option<String> {
    if m.qkv_bias {
        return Some("model.qkv_bias (biased q/k/v projections)".into());
    }
    has_o_bias(m)
}

/// Why a family without a bias on the output projection cannot express this model.
pub fn has_o_bias(m: &ModelConfig) -> Option<String> {
    m.o_bias
        .then(|| "model.o_bias (a biased attention output projection)".into())
}

/// Why a family whose one `attention_bias` switch covers q, k, v and o
/// cannot express this model (it has some of the four biases but not all).
pub fn mixed_bias(m: &ModelConfig) -> Option<String> {
    (m.qkv_bias != m.o_bias).then(|| {
        format!(
            "model.qkv_bias = {} with model.o_bias = {} (the family's attention_bias sets all four projections)",
            m.qkv_bias, m.o_bias
        )
    })
}

/// Read `attention_bias` as biases on q, k, v and o.
pub fn read_attention_bias(cfg: &Value, model: &mut ModelConfig) -> Result<()> {
    let on = opt(cfg, "attention_bias", bool_field)?.unwrap_or(false);
    model.qkv_bias = on;
    model.o_bias = on;
    Ok(())
}

/// A zero tensor.
pub fn zeros(shape: &[usize]) -> TensorData {
    TensorData::new(vec![0f32; shape.iter().product()], shape.to_vec())
}

/// Give a model without q/k/v biases zero ones, for families that always have them.
pub fn add_zero_qkv_biases(m: &mut ModelConfig, params: &mut Params) {
    if m.qkv_bias {
        return;
    }
    let hd = m.head_dim();
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

/// Give every MoE block a shared expert of width `width` whose weights are
/// all zero (its output is zero), for families that always have one.
pub fn add_zero_shared_expert(
    m: &ModelConfig,
    moe: &mut MoeConfig,
    params: &mut Params,
    width: usize,
) {
    let d = m.d_model;
    for i in moe_layers(m, moe) {
        let pre = format!("layers.{i}.mlp.shared_expert");
        params.insert(format!("{pre}.gate_proj.weight"), zeros(&[d, width]));
        params.insert(format!("{pre}.up_proj.weight"), zeros(&[d, width]));
        params.insert(format!("{pre}.down_proj.weight"), zeros(&[width, d]));
    }
    moe.num_shared_experts = 1;
    moe.d_shared_expert = Some(width);
}

/// The MoE fields shared by every routed family: experts are computed
/// dropless with softmax-then-top-k, as transformers does.
pub fn routed_moe(cfg: &Value) -> Result<MoeConfig> {
    Ok(MoeConfig {
        top_k: usize_field(cfg, "num_experts_per_tok")?,
        score: RouterScore::Softmax,
        topk_order: crate::config::TopkOrder::SoftmaxThenTopk,
        drop_policy: crate::config::DropPolicy::Dropless,
        ..MoeConfig::default()
    })
}

/// The MoE config of a dense family.
pub fn dense_moe() -> MoeConfig {
    MoeConfig {
        num_experts: 0,
        ..MoeConfig::default()
    }
}

/// The first of `checks` that finds a reason, if any.
pub fn first(checks: impl IntoIterator<Item = Option<String>>) -> Option<String> {
    checks.into_iter().flatten().next()
}

/// Insert `(key, value)` pairs into a JSON object.
pub fn put(obj: &mut Map<String, Value>, fields: impl IntoIterator<Item = (&'static str, Value)>) {
    for (k, v) in fields {
        obj.insert(k.into(), v);
    }
}

/// Why a dense family cannot hold a model with MoE blocks.
pub fn has_moe(m: &ModelConfig, moe: &MoeConfig) -> Option<String> {
    (!moe_layers(m, moe).is_empty()).then(|| "the model has MoE blocks (a dense family)".into())
}

/// `layer_types` saying every block attends over the whole sequence.
pub fn full_attention_layers(m: &ModelConfig) -> Value {
    Value::Array(vec![Value::from("full_attention"); m.n_layers])
}

/// Why a family without Granite's muP scalars cannot express this model.
pub fn mup_differs(m: &ModelConfig) -> Option<String> {
    [
        ("model.embedding_multiplier", m.embedding_multiplier != 1.0),
        ("model.residual_multiplier", m.residual_multiplier != 1.0),
        (
            "model.attention_multiplier",
            m.attention_multiplier.is_some(),
        ),
        ("model.logits_scaling", m.logits_scaling != 1.0),
    ]
    .into_iter()
    .find(|(_, set)| *set)
    .map(|(key, _)| format!("{key} (Granite's muP scalars)"))
}

/// Why a family whose every block is MoE cannot hold this model.
pub fn has_dense_blocks(m: &ModelConfig, moe: &MoeConfig) -> Option<String> {
    (moe_layers(m, moe).len() != m.n_layers).then(|| "some blocks are dense".into())
}
