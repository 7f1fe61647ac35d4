//! Expert-collapse alerts: an expert that stays (nearly) unused for
//! `log.dead_expert_steps` steps, or a layer whose busiest expert carries
//! more than `log.max_over_mean_alert` times the mean load.

use super::StepReport;
use crate::config::LogConfig;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// An expert-collapse alert.
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    /// Step at which it fired.
    pub step: u64,
    /// "dead_expert" or "load_imbalance".
    pub kind: &'static str,
    /// MoE layer index.
    pub layer: usize,
    /// Human-readable text.
    pub message: String,
}

impl Alert {
    /// The `metrics.jsonl` line of this alert.
    pub fn json(&self) -> Value {
        json!({"step": self.step, "alert": self.kind, "layer": self.layer, "message": self.message})
    }
}

/// Watches for experts that stay (nearly) unused and for overloaded layers.
/// Each condition alerts once when it starts, and again only after it clears.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CollapseMonitor {
    /// Consecutive dead steps, per layer and expert.
    pub dead_steps: Vec<Vec<u64>>,
    /// Whether each layer is currently above the imbalance threshold.
    pub imbalanced: Vec<bool>,
}

impl CollapseMonitor {
    /// Update with one step; returns the alerts that fire now.
    pub fn update(&mut self, report: &StepReport, log: &LogConfig) -> Vec<Alert> {
        let mut alerts = Vec::new();
        self.dead_steps.resize(report.layers.len(), Vec::new());
        self.imbalanced.resize(report.layers.len(), false);
        for (i, layer) in report.layers.iter().enumerate() {
            let runs = &mut self.dead_steps[i];
            runs.resize(layer.routed_per_expert.len(), 0);
            let dead = layer.dead_experts(log.dead_expert_share);
            for (e, run) in runs.iter_mut().enumerate() {
                if dead.contains(&e) {
                    *run += 1;
                    if *run == log.dead_expert_steps {
                        alerts.push(Alert {
                            step: report.step,
                            kind: "dead_expert",
                            layer: i,
                            message: format!(
                                "MoE layer {i}: expert {e} has received under {:.1}% of the uniform share for {} consecutive steps",
                                log.dead_expert_share * 100.0,
                                log.dead_expert_steps
                            ),
                        });
                    }
                } else {
                    *run = 0;
                }
            }
            let ratio = layer.max_over_mean();
            let over = ratio > log.max_over_mean_alert;
            if over && !self.imbalanced[i] {
                alerts.push(Alert {
                    step: report.step,
                    kind: "load_imbalance",
                    layer: i,
                    message: format!(
                        "MoE layer {i}: max/mean expert load {ratio:.2} exceeds {:.2}",
                        log.max_over_mean_alert
                    ),
                });
            }
            self.imbalanced[i] = over;
        }
        alerts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::tests::layer;

    #[test]
    fn collapse_alerts_fire_once_after_k_steps() {
        let log = LogConfig {
            dead_expert_steps: 3,
            max_over_mean_alert: 2.5,
            ..LogConfig::default()
        };
        let mut mon = CollapseMonitor::default();
        let mut fired = Vec::new();
        for step in 1..=6 {
            let report = StepReport {
                step,
                loss_total: 0.0,
                loss_lm: 0.0,
                loss_aux: 0.0,
                loss_seq_aux: 0.0,
                loss_z: 0.0,
                lr: 0.0,
                grad_norm: 0.0,
                tokens_per_s: 0.0,
                skipped: false,
                layers: vec![layer(&[6.0, 2.0, 0.0, 8.0])],
                eval_loss: None,
                eval_experts: Vec::new(),
                eval_domains: None,
                comm: None,
            };
            fired.extend(
                mon.update(&report, &log)
                    .into_iter()
                    .map(|a| (a.step, a.kind)),
            );
        }
        // max/mean = 8 / 4 = 2 (no imbalance alert); expert 2 dead from step 1.
        assert_eq!(fired, vec![(3, "dead_expert")]);
    }
}
