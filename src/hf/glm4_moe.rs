//! GLM-4.5 (`Glm4MoeForCausalLM`): sigmoid scores, a per-expert selection
//! bias (`e_score_correction_bias`, switchyard's aux-loss-free bias),
//! group-limited top-k (`n_group`, `topk_group`; a group scores the sum of
//! its two best biased scores), `routed_scaling_factor`, the first
//! `first_k_dense_replace` blocks dense, ungated shared experts of width
//! `n_shared_experts × moe_intermediate_size`, optional per-head q/k norms
//! and q/k/v biases.
//!
//! Written with `partial_rotary_factor = 1.0` (transformers' GLM default is
//! 0.5) and `num_nextn_predict_layers = 0`. A model without the selection
//! bias gets a zero one; a model without a shared expert gets one whose
//! weights are all zero (GLM always has one).

use super::family::*;
use super::HfArch;
use crate::config::{ModelConfig, MoeConfig, QkNorm, RouterScore, TopkOrder};
use anyhow::Result;
use serde_json::{json, Map, Value};

/// The family.
pub const FAMILY: Family = Family {
    arch: HfArch::Glm4Moe,
    model_type: "glm4_moe",
    class: "Glm4MoeForCausalLM",
    name: "glm4-moe",
    mup: false,
    dense: false,
    layout: Layout {
        moe: "mlp",
        expert: ["gate_proj", "up_proj", "down_proj"],
        shared: "shared_experts",
        router: "gate",
        fused: None,
    },
    read,
    refuses,
    adapt,
    write,
};

fn read(cfg: &Value, mut model: ModelConfig) -> Result<(ModelConfig, MoeConfig)> {
    let partial = cfg
        .get("rope_parameters")
        .and_then(|r| r.get("partial_rotary_factor"))
        .or_else(|| cfg.get("partial_rotary_factor"))
        .filter(|v| !v.is_null());
    if let Some(p) = partial {
        if p.as_f64() != Some(1.0) {
            anyhow::bail!("config.json: unsupported field `partial_rotary_factor` = {p} (only full rotary embeddings, 1.0, are supported)");
        }
    }
    model.qkv_bias = opt(cfg, "attention_bias", bool_field)?.unwrap_or(false);
    if opt(cfg, "use_qk_norm", bool_field)?.unwrap_or(false) {
        model.qk_norm = QkNorm::PerHead;
    }
    let d_expert = usize_field(cfg, "moe_intermediate_size")?;
    let n_shared = opt(cfg, "n_shared_experts", usize_field)?.unwrap_or(0);
    let moe = MoeConfig {
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
        ..routed_moe(cfg)?
    };
    Ok((model, moe))
}

fn refuses(m: &ModelConfig, moe: &MoeConfig) -> Option<String> {
    let dense = dense_layers(m, moe);
    let per_group = moe.num_experts / moe.n_group.max(1);
    first([
        no_moe(m, moe),
        has_o_bias(m),
        (moe.score != RouterScore::Sigmoid)
            .then(|| "moe.score = \"softmax\" (GLM-4.5 routes by sigmoid)".into()),
        (moe.topk_order == TopkOrder::TopkThenSoftmax)
            .then(|| "moe.topk_order = \"topk_then_softmax\" with sigmoid scores".into()),
        (dense.iter().enumerate().any(|(i, &l)| i != l)).then(|| {
            "dense blocks after an MoE block (GLM-4.5's dense blocks are the first ones)".into()
        }),
        (moe.shared_width() > 0 && moe.shared_expert_gate)
            .then(|| "moe.shared_expert_gate (GLM-4.5's shared experts are ungated)".into()),
        (!moe.shared_width().is_multiple_of(moe.d_expert)).then(|| {
            format!(
                "a shared-expert width of {} (GLM-4.5's is a multiple of moe.d_expert = {})",
                moe.shared_width(),
                moe.d_expert
            )
        }),
        (moe.n_group > 1 && per_group < 2).then(|| {
            "groups of one expert (GLM-4.5 scores a group by its two best experts)".into()
        }),
        attention_differs(m, m.qk_norm, false),
        (m.qk_norm == QkNorm::Projection)
            .then(|| "model.qk_norm = \"projection\" (GLM-4.5's q/k norms are per head)".into()),
    ])
}

fn adapt(m: &mut ModelConfig, moe: &mut MoeConfig, params: &mut Params) -> Result<()> {
    if !moe.aux_free_bias {
        for i in moe_layers(m, moe) {
            params.insert(
                format!("layers.{i}.mlp.router.expert_bias"),
                zeros(&[moe.num_experts]),
            );
        }
        moe.aux_free_bias = true;
    }
    if moe.shared_width() == 0 {
        add_zero_shared_expert(m, moe, params, moe.d_expert);
    }
    Ok(())
}

fn write(m: &ModelConfig, moe: &MoeConfig, obj: &mut Map<String, Value>) {
    put(
        obj,
        [
            ("intermediate_size", json!(m.d_ff)),
            ("moe_intermediate_size", json!(moe.d_expert)),
            ("n_routed_experts", json!(moe.num_experts)),
            ("n_shared_experts", json!(moe.shared_width() / moe.d_expert)),
            ("norm_topk_prob", json!(moe.normalize_topk)),
            ("routed_scaling_factor", json!(moe.routed_scaling_factor)),
            ("n_group", json!(moe.n_group.max(1))),
            ("topk_group", json!(moe.topk_group.max(1))),
            ("first_k_dense_replace", json!(dense_layers(m, moe).len())),
            ("use_qk_norm", json!(m.qk_norm == QkNorm::PerHead)),
            ("attention_bias", json!(m.qkv_bias)),
            ("num_nextn_predict_layers", json!(0)),
            ("partial_rotary_factor", json!(1.0)),
            (
                "rope_parameters",
                json!({"rope_theta": m.rope_theta, "rope_type": "default", "partial_rotary_factor": 1.0}),
            ),
        ],
    );
}
