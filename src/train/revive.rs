//! When to revive a dead expert and what a revival does outside the layer:
//! the decision is taken when the collapse monitor's count of dead steps
//! reaches `log.dead_expert_steps`, stored in the training state (so a
//! checkpoint written between the decision and the revival resumes into
//! the same revival), and applied before the next step, which also resets
//! the expert's AdamW moments.

use super::optim::AdamW;
use crate::config::{LogConfig, ReviveFrom, RunConfig};
use crate::metrics::{CollapseMonitor, StepReport};
use crate::model::LanguageModel;
use burn::prelude::*;
use serde::{Deserialize, Serialize};

/// One expert to revive.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Revival {
    /// MoE layer (counting MoE layers only).
    pub layer: usize,
    /// The dead expert.
    pub expert: usize,
    /// The layer's most loaded expert at the decision.
    pub donor: usize,
    /// The layer's mean router input at the decision.
    #[serde(default)]
    pub mean_input: Option<Vec<f64>>,
}

impl Revival {
    /// Refuse a revival a checkpoint holds that does not fit `cfg`'s model:
    /// a layer, expert or donor that does not exist, or a mean router
    /// input of another width. Only a damaged or hand-edited checkpoint
    /// (or one from another architecture) fails.
    pub fn check(&self, cfg: &RunConfig) -> anyhow::Result<()> {
        let layers = crate::hf::family::moe_layers(&cfg.model, &cfg.moe).len();
        let e = cfg.moe.num_experts;
        let width = self.mean_input.as_ref().map_or(cfg.model.d_model, Vec::len);
        if self.layer >= layers || self.expert >= e || self.donor >= e || width != cfg.model.d_model
        {
            anyhow::bail!(
                "the checkpoint's pending revival (MoE layer {}, expert {} from expert {}, mean \
                 input of width {width}) does not fit this model ({layers} MoE layers of {e} \
                 experts, d_model {}): the state file is damaged",
                self.layer,
                self.expert,
                self.donor,
                cfg.model.d_model
            );
        }
        Ok(())
    }

    /// One line for the console and TensorBoard.
    pub fn describe(&self, from: ReviveFrom) -> String {
        format!(
            "MoE layer {}: expert {} revived from expert {} ({})",
            self.layer,
            self.expert,
            self.donor,
            match from {
                ReviveFrom::Busiest => "a noisy copy",
                ReviveFrom::Init => "fresh weights",
            }
        )
    }

    /// The `metrics.jsonl` event of this revival, before 1-based step `step`.
    pub fn json(&self, step: u64) -> serde_json::Value {
        serde_json::json!({
            "step": step,
            "event": "revival",
            "layer": self.layer,
            "expert": self.expert,
            "donor": self.donor,
        })
    }
}

/// Restart the monitor's count of dead steps for a revived expert, so that
/// it is judged afresh.
pub fn forget_dead_run(monitor: &mut CollapseMonitor, r: &Revival) {
    if let Some(run) = monitor
        .dead_steps
        .get_mut(r.layer)
        .and_then(|l| l.get_mut(r.expert))
    {
        *run = 0;
    }
}

/// The experts whose dead-step count has just reached
/// `log.dead_expert_steps`, each with its layer's busiest expert as donor.
pub fn decide(monitor: &CollapseMonitor, report: &StepReport, log: &LogConfig) -> Vec<Revival> {
    let mut out = Vec::new();
    for (layer, (runs, rep)) in monitor.dead_steps.iter().zip(&report.layers).enumerate() {
        let Some(donor) = rep
            .routed_per_expert
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
            .map(|(e, _)| e)
        else {
            continue;
        };
        for (expert, &run) in runs.iter().enumerate() {
            if run == log.dead_expert_steps && expert != donor {
                out.push(Revival {
                    layer,
                    expert,
                    donor,
                    mean_input: rep.mean_input.clone(),
                });
            }
        }
    }
    out
}

/// The seed of a revival's noise: fixed by the run seed, the step and the
/// expert, so that a resumed run draws the same.
fn seed(run_seed: u64, step: u64, r: &Revival) -> u64 {
    let mut x = crate::data::stream::SplitMix64(
        run_seed
            ^ 0x7265_7669_7665
            ^ step.wrapping_mul(0x9e37_79b9)
            ^ ((r.layer as u64) << 40)
            ^ ((r.expert as u64) << 52),
    );
    x.next_u64()
}

/// Apply `r` before optimizer step `step` (0-based): new weights and router
/// column for the expert, and zero AdamW moments for its slices of the
/// expert and router weights.
pub fn apply(
    mut model: LanguageModel,
    adam: &mut AdamW,
    cfg: &RunConfig,
    step: u64,
    r: &Revival,
    device: &Device,
) -> LanguageModel {
    device.seed(seed(cfg.train.seed, step, r));
    // The experts this rank's stacks hold (some of them under expert
    // parallelism), in stack order.
    let mut held = Vec::new();
    if let Some(layer) = model.moe_layers_mut().nth(r.layer) {
        held = layer.held_experts();
        let center = r.mean_input.as_ref().map(|m| {
            let v: Vec<f32> = m.iter().map(|&x| x as f32).collect();
            Tensor::<1>::from_data(TensorData::new(v, [m.len()]), &device.clone().inner())
        });
        layer.revive_expert(
            r.expert,
            r.donor,
            cfg.moe.revive_from,
            cfg.model.init_std,
            center,
        );
    }
    let Some(block) = (0..cfg.model.n_layers)
        .filter(|&i| cfg.moe.is_moe_layer(i))
        .nth(r.layer)
    else {
        return model;
    };
    let e = cfg.moe.num_experts;
    let prefix = format!("layers.{block}.mlp.");
    for (path, shape) in crate::params::shapes(&model) {
        let Some(name) = path.strip_prefix(&prefix) else {
            continue;
        };
        let zero_expert = |t: Tensor<1>| -> Tensor<1> {
            let n = t.dims()[0];
            match name {
                // [E, a, b]: expert e's block of rows, where it is held.
                _ if name.starts_with("experts.") => {
                    let Some(i) = held.iter().position(|&x| x == r.expert) else {
                        return t;
                    };
                    let per = n / held.len();
                    let t = t.reshape([held.len(), per]);
                    let z = Tensor::zeros([1, per], &t.device());
                    t.slice_assign([i..i + 1, 0..per], z).reshape([n])
                }
                // [d, E]: column e.
                "router.weight" => {
                    let d = shape[0];
                    let t = t.reshape([d, e]);
                    let z = Tensor::zeros([d, 1], &t.device());
                    t.slice_assign([0..d, r.expert..r.expert + 1], z)
                        .reshape([n])
                }
                _ => t,
            }
        };
        for moments in [&mut adam.m, &mut adam.v] {
            if let Some(t) = moments.remove(&path) {
                moments.insert(path.clone(), zero_expert(t));
            }
        }
    }
    model
}
