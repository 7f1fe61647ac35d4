//! The one table between switchyard parameter paths and Hugging Face keys,
//! per family.

use super::HfArch;
use crate::config::{ModelConfig, MoeConfig, QkNorm};

/// Where one switchyard parameter comes from in a Hugging Face checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyMapping {
    /// switchyard parameter path, as in [`crate::params`].
    pub ours: String,
    /// Hugging Face keys: one, or one per expert to be stacked along a new first axis.
    pub hf: Vec<String>,
    /// Whether each Hugging Face matrix is transposed (`[out, in]` ↔ `[in, out]`).
    pub transpose: bool,
    /// Whether `hf` holds one key per expert, stacked, or (with `rows`)
    /// one tensor holding every expert.
    pub stacked: bool,
    /// Where each expert's matrix sits in a fused `[E, total, C]` tensor
    /// that holds every expert (Granite's `input_linear`, gate rows then up
    /// rows): rows `start..start + len` of each expert's `[total, C]`.
    pub rows: Option<Rows>,
}

/// Rows `start..start + len` of each expert's `[total, C]` block.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rows {
    /// First row.
    pub start: usize,
    /// How many rows.
    pub len: usize,
    /// Rows per expert in the fused tensor.
    pub total: usize,
}

/// The one table between switchyard parameter paths and Hugging Face keys for
/// a model of this shape.
pub fn key_table(arch: HfArch, model: &ModelConfig, moe: &MoeConfig) -> Vec<KeyMapping> {
    let layout = arch.family().layout;
    let (moe_key, expert_names) = (layout.moe, layout.expert);
    let mut t = Vec::new();
    let one = |t: &mut Vec<KeyMapping>, ours: String, hf: String, transpose: bool| {
        t.push(KeyMapping {
            ours,
            hf: vec![hf],
            transpose,
            stacked: false,
            rows: None,
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
            let biased = match proj {
                "o_proj" => model.o_bias,
                _ => model.qkv_bias,
            };
            if biased {
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
        one(
            &mut t,
            format!("{o}.mlp.router.weight"),
            format!("{h}.{moe_key}.{}.weight", layout.router),
            true,
        );
        if moe.aux_free_bias {
            one(
                &mut t,
                format!("{o}.mlp.router.expert_bias"),
                format!("{h}.{moe_key}.{}.e_score_correction_bias", layout.router),
                false,
            );
        }
        if let Some([input, output]) = layout.fused {
            // [E, 2F, d]: gate rows, then up rows; [E, d, F].
            let (f, d) = (moe.d_expert, model.d_model);
            for (ours, theirs, start, len, total) in [
                ("gate_proj", input, 0, f, 2 * f),
                ("up_proj", input, f, f, 2 * f),
                ("down_proj", output, 0, d, d),
            ] {
                t.push(KeyMapping {
                    ours: format!("{o}.mlp.experts.{ours}"),
                    hf: vec![format!("{h}.{moe_key}.{theirs}.weight")],
                    transpose: true,
                    stacked: true,
                    rows: Some(Rows { start, len, total }),
                });
            }
        } else {
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
                    rows: None,
                });
            }
        }
        if moe.shared_width() > 0 {
            let theirs = layout.shared;
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
