//! What a training step reports, and where it goes: TensorBoard event files,
//! `metrics.jsonl`, the console, and expert-collapse alerts.
//!
//! One [`StepReport`] is built per step from a single batched host read. Its
//! [`StepReport::values`] are the tagged numbers written both to TensorBoard
//! and, under the same names, to `metrics.jsonl`.

mod collapse;
pub mod console;
pub mod domains;
pub mod routing_report;
mod tb_proto;
pub mod tensorboard;

pub use collapse::{Alert, CollapseMonitor};

use crate::config::LogConfig;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::io::Write;
use std::path::Path;

/// The validation loss by first-choice expert of one MoE layer, on the host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExpertLosses {
    /// Σ loss over the validation tokens whose first choice is each expert.
    pub loss_sum: Vec<f64>,
    /// How many validation tokens chose each expert first.
    pub tokens: Vec<f64>,
}

impl ExpertLosses {
    /// Each expert's mean loss; `None` for an expert no token chose first.
    pub fn mean(&self) -> Vec<Option<f64>> {
        self.loss_sum
            .iter()
            .zip(&self.tokens)
            .map(|(&l, &n)| (n > 0.0).then(|| l / n))
            .collect()
    }
}

/// Routing numbers of one MoE layer for one step, on the host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerReport {
    /// Assignments routed to each expert (before capacity).
    pub routed_per_expert: Vec<f64>,
    /// Assignments each expert computed (after capacity and rerouting).
    pub kept_per_expert: Vec<f64>,
    /// Assignments computed by an expert other than their own choice.
    #[serde(default)]
    pub rerouted: f64,
    /// Mean router entropy, nats.
    pub router_entropy: f64,
    /// Aux-loss-free selection bias after this step's update, when enabled.
    pub expert_bias: Option<Vec<f64>>,
    /// Mean router input over the step's tokens, under `moe.revive_dead_experts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_input: Option<Vec<f64>>,
    /// In a run of several processes: each rank's own `kept_per_expert`,
    /// in rank order (what each rank's tokens asked of each expert).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept_by_rank: Option<Vec<Vec<f64>>>,
}

impl LayerReport {
    fn total(&self) -> f64 {
        self.routed_per_expert.iter().sum()
    }
    /// Share of assignments per expert (sums to 1).
    pub fn token_share(&self) -> Vec<f64> {
        let total = self.total().max(1.0);
        self.routed_per_expert.iter().map(|c| c / total).collect()
    }
    /// Fraction of assignments dropped for capacity.
    pub fn drop_rate(&self) -> f64 {
        let kept: f64 = self.kept_per_expert.iter().sum();
        (self.total() - kept) / self.total().max(1.0)
    }
    /// Fraction of assignments sent to another expert than their own
    /// choice (under `drop_policy = "reroute"`).
    pub fn reroute_rate(&self) -> f64 {
        self.rerouted / self.total().max(1.0)
    }
    /// Busiest expert's load over the mean load (1.0 when balanced).
    pub fn max_over_mean(&self) -> f64 {
        let e = self.routed_per_expert.len() as f64;
        let max = self.routed_per_expert.iter().cloned().fold(0.0, f64::max);
        max / (self.total() / e).max(1e-12)
    }
    /// Experts whose share is below `threshold` × the uniform share 1/E.
    pub fn dead_experts(&self, threshold: f64) -> Vec<usize> {
        let e = self.routed_per_expert.len() as f64;
        self.token_share()
            .iter()
            .enumerate()
            .filter(|(_, &s)| s < threshold / e)
            .map(|(i, _)| i)
            .collect()
    }
}

/// Everything one optimizer step reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    /// Optimizer step, 1-based.
    pub step: u64,
    /// Total loss.
    pub loss_total: f64,
    /// LM cross-entropy.
    pub loss_lm: f64,
    /// Σ over MoE layers of the Switch load-balancing loss (unweighted).
    pub loss_aux: f64,
    /// Σ over MoE layers of the sequence-level balance loss (unweighted).
    pub loss_seq_aux: f64,
    /// Σ over MoE layers of the router z-loss (unweighted).
    pub loss_z: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Training tokens per second over this step.
    pub tokens_per_s: f64,
    /// Whether the update was skipped for a non-finite loss or gradient.
    pub skipped: bool,
    /// Per MoE layer, in order.
    pub layers: Vec<LayerReport>,
    /// Validation loss at evaluation steps.
    pub eval_loss: Option<f64>,
    /// At evaluation steps, per MoE layer: the validation loss by
    /// first-choice expert.
    #[serde(default)]
    pub eval_experts: Vec<ExpertLosses>,
    /// At evaluation steps of a run with two or more data sources: loss
    /// and routing per domain.
    #[serde(default)]
    pub eval_domains: Option<domains::DomainReport>,
    /// In a run of several processes: this rank's traffic in the step's
    /// collectives.
    #[serde(default)]
    pub comm: Option<crate::dist::Traffic>,
}

impl StepReport {
    /// Mean drop rate over MoE layers.
    pub fn drop_rate(&self) -> f64 {
        if self.layers.is_empty() {
            return 0.0;
        }
        self.layers.iter().map(|l| l.drop_rate()).sum::<f64>() / self.layers.len() as f64
    }

    /// Every tagged scalar of this step, in a stable order.
    pub fn scalars(&self, log: &LogConfig) -> Vec<(String, f64)> {
        let mut v = vec![
            ("loss/total".to_string(), self.loss_total),
            ("loss/lm".into(), self.loss_lm),
            ("loss/aux".into(), self.loss_aux),
            ("loss/seq_aux".into(), self.loss_seq_aux),
            ("loss/z".into(), self.loss_z),
            ("lr".into(), self.lr),
            ("grad_norm".into(), self.grad_norm),
            ("throughput/tokens_per_s".into(), self.tokens_per_s),
        ];
        if let Some(c) = &self.comm {
            v.push(("comm/allreduce_bytes".into(), c.allreduce_bytes as f64));
            v.push(("comm/allreduce_secs".into(), c.allreduce_secs));
            v.push(("comm/alltoall_bytes".into(), c.alltoall_bytes as f64));
            v.push(("comm/alltoall_secs".into(), c.alltoall_secs));
        }
        if let Some(l) = self.eval_loss {
            v.push(("eval/loss".into(), l));
            v.push(("eval/ppl".into(), l.exp()));
        }
        for (i, layer) in self.eval_experts.iter().enumerate() {
            for (e, (mean, n)) in layer.mean().into_iter().zip(&layer.tokens).enumerate() {
                if let Some(mean) = mean {
                    v.push((format!("moe/layer{i}/expert{e}/lm_loss"), mean));
                }
                v.push((format!("moe/layer{i}/expert{e}/lm_loss_tokens"), *n));
            }
        }
        if let Some(d) = &self.eval_domains {
            v.extend(d.scalars());
        }
        for (i, layer) in self.layers.iter().enumerate() {
            for (e, s) in layer.token_share().iter().enumerate() {
                v.push((format!("moe/layer{i}/expert{e}/token_share"), *s));
            }
            v.push((format!("moe/layer{i}/drop_rate"), layer.drop_rate()));
            v.push((format!("moe/layer{i}/reroute_rate"), layer.reroute_rate()));
            v.push((
                format!("moe/layer{i}/max_over_mean_load"),
                layer.max_over_mean(),
            ));
            v.push((format!("moe/layer{i}/router_entropy"), layer.router_entropy));
            v.push((
                format!("moe/layer{i}/dead_experts"),
                layer.dead_experts(log.dead_expert_share).len() as f64,
            ));
            if let Some(bias) = &layer.expert_bias {
                for (e, b) in bias.iter().enumerate() {
                    v.push((format!("moe/layer{i}/expert{e}/bias"), *b));
                }
            }
        }
        v
    }

    /// The TensorBoard summary values: every scalar plus two histograms per
    /// layer, whose bucket e counts expert e's assignments:
    /// `moe/layer{i}/routed_per_expert` as the router chose them, and
    /// `moe/layer{i}/kept_per_expert` as the expert processed them (after
    /// capacity drops). Token shares and load ratios use the routed counts,
    /// since capacity caps the kept counts and would hide an imbalance.
    pub fn summary_values(&self, log: &LogConfig) -> Vec<tensorboard::SummaryValue> {
        let mut out: Vec<_> = self
            .scalars(log)
            .into_iter()
            .map(|(tag, v)| tensorboard::scalar(tag, v))
            .collect();
        for (i, layer) in self.layers.iter().enumerate() {
            out.push(tensorboard::index_histogram(
                format!("moe/layer{i}/routed_per_expert"),
                &layer.routed_per_expert,
            ));
            out.push(tensorboard::index_histogram(
                format!("moe/layer{i}/kept_per_expert"),
                &layer.kept_per_expert,
            ));
        }
        out
    }

    /// The `metrics.jsonl` object: the same tags and numbers, plus the raw
    /// per-expert counts.
    pub fn json(&self, log: &LogConfig) -> Value {
        let mut m = Map::new();
        m.insert("step".into(), json!(self.step));
        m.insert("skipped".into(), json!(self.skipped));
        for (tag, v) in self.scalars(log) {
            m.insert(tag, json!(v));
        }
        for (i, layer) in self.layers.iter().enumerate() {
            m.insert(
                format!("moe/layer{i}/routed_per_expert"),
                json!(layer.routed_per_expert),
            );
            m.insert(
                format!("moe/layer{i}/kept_per_expert"),
                json!(layer.kept_per_expert),
            );
            if let Some(by_rank) = &layer.kept_by_rank {
                m.insert(format!("moe/layer{i}/kept_by_rank"), json!(by_rank));
            }
        }
        Value::Object(m)
    }
}

/// Appends one JSON object per line to `metrics.jsonl`.
pub struct JsonlWriter {
    out: std::io::BufWriter<std::fs::File>,
}

impl JsonlWriter {
    /// Open (append) `path`.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(Self {
            out: std::io::BufWriter::new(f),
        })
    }
    /// Open `path` to continue a run resumed at `step`: lines of later
    /// steps (written after the checkpoint the run resumes from) are
    /// dropped first, so the file holds each step once.
    pub fn resume_at(path: &Path, step: u64) -> anyhow::Result<Self> {
        if path.exists() {
            let kept: String = std::fs::read_to_string(path)?
                .lines()
                .filter(|l| {
                    serde_json::from_str::<Value>(l)
                        .ok()
                        .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                        .is_some_and(|s| s <= step)
                })
                .map(|l| format!("{l}\n"))
                .collect();
            std::fs::write(path, kept)?;
        }
        Self::open(path)
    }

    /// Write one object.
    pub fn write(&mut self, v: &Value) -> anyhow::Result<()> {
        serde_json::to_writer(&mut self.out, v)?;
        self.out.write_all(b"\n")?;
        Ok(())
    }
    /// Flush to the file.
    pub fn flush(&mut self) -> anyhow::Result<()> {
        self.out.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn layer(counts: &[f64]) -> LayerReport {
        LayerReport {
            rerouted: 0.0,
            routed_per_expert: counts.to_vec(),
            kept_per_expert: counts.iter().map(|c| c.min(4.0)).collect(),
            router_entropy: 1.0,
            expert_bias: None,
            mean_input: None,
            kept_by_rank: None,
        }
    }

    #[test]
    fn layer_statistics_by_hand() {
        let l = layer(&[6.0, 2.0, 0.0, 0.0]);
        assert_eq!(l.token_share(), vec![0.75, 0.25, 0.0, 0.0]);
        // kept = 4 + 2 = 6 of 8
        assert!((l.drop_rate() - 0.25).abs() < 1e-12);
        // mean = 2, max = 6
        assert!((l.max_over_mean() - 3.0).abs() < 1e-12);
        assert_eq!(l.dead_experts(0.1), vec![2, 3]);
    }
}
