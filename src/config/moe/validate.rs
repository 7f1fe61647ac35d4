//! `MoeConfig::validate`: every `[moe]` key checked against the model it
//! will be placed in, each error naming its key.

use super::{MoeConfig, RouterScore, TopkOrder};
use crate::config::{at_most, err, limit, ConfigError, ModelConfig};

impl MoeConfig {
    /// Check every field against the model it will be placed in.
    pub fn validate(&self, model: &ModelConfig) -> Result<(), ConfigError> {
        at_most("moe.num_experts", self.num_experts, limit::EXPERTS)?;
        if self.num_experts == 0 {
            return Ok(());
        }
        for (key, v, max) in [
            ("moe.d_expert", self.d_expert, limit::WIDTH),
            (
                "moe.num_shared_experts",
                self.num_shared_experts,
                limit::SHARED,
            ),
            (
                "moe.d_shared_expert",
                self.d_shared_expert.unwrap_or(0),
                limit::WIDTH,
            ),
        ] {
            at_most(key, v, max)?;
        }
        if self.top_k == 0 || self.top_k > self.num_experts {
            return Err(err(
                "moe.top_k",
                format!(
                    "must be in 1..={} (moe.num_experts), got {}",
                    self.num_experts, self.top_k
                ),
            ));
        }
        if self.d_expert == 0 {
            return Err(err("moe.d_expert", "must be a positive integer"));
        }
        if self.every_n_layers == 0 {
            return Err(err("moe.every_n_layers", "must be a positive integer"));
        }
        if let Some(list) = &self.layers {
            if let Some(&bad) = list.iter().find(|&&l| l >= model.n_layers) {
                return Err(err(
                    "moe.layers",
                    format!(
                        "layer {bad} is out of range 0..{} (model.n_layers)",
                        model.n_layers
                    ),
                ));
            }
        }
        for (key, v) in [
            ("moe.capacity_factor", self.capacity_factor),
            ("moe.eval_capacity_factor", self.eval_capacity_factor),
        ] {
            if !(v > 0.0) || !v.is_finite() {
                return Err(err(key, format!("must be a finite number > 0, got {v}")));
            }
        }
        if let Some(std) = self.router_init_std {
            if !(std > 0.0 && std.is_finite()) {
                return Err(err("moe.router_init_std", "must be a finite number > 0"));
            }
        }
        if !(0.0..1.0).contains(&self.jitter_eps) {
            return Err(err("moe.jitter_eps", "must be in [0, 1)"));
        }
        if !(self.logit_noise_std >= 0.0) || !self.logit_noise_std.is_finite() {
            return Err(err("moe.logit_noise_std", "must be a finite number >= 0"));
        }
        if !(0.0..1.0).contains(&self.expert_dropout) {
            return Err(err("moe.expert_dropout", "must be in [0, 1)"));
        }
        if self.d_shared_expert == Some(0) {
            return Err(err("moe.d_shared_expert", "must be positive"));
        }
        if self.shared_expert_gate && self.num_shared_experts == 0 {
            return Err(err(
                "moe.shared_expert_gate",
                "needs moe.num_shared_experts >= 1",
            ));
        }
        if self.score == RouterScore::Sigmoid && self.topk_order == TopkOrder::TopkThenSoftmax {
            return Err(err(
                "moe.topk_order",
                "\"topk_then_softmax\" needs moe.score = \"softmax\"",
            ));
        }
        if self.n_group == 0 || !self.num_experts.is_multiple_of(self.n_group) {
            return Err(err(
                "moe.n_group",
                format!(
                    "must divide moe.num_experts ({}), got {}",
                    self.num_experts, self.n_group
                ),
            ));
        }
        if self.topk_group == 0 || self.topk_group > self.n_group {
            return Err(err(
                "moe.topk_group",
                format!(
                    "must be in 1..={} (moe.n_group), got {}",
                    self.n_group, self.topk_group
                ),
            ));
        }
        if self.n_group > 1 {
            let per_group = self.num_experts / self.n_group;
            if per_group < 2 {
                return Err(err(
                    "moe.n_group",
                    format!(
                        "a group's score is the sum of its two best experts, so each group needs \
                         at least 2; {} experts in {} groups leave {per_group}",
                        self.num_experts, self.n_group
                    ),
                ));
            }
            if self.top_k > self.topk_group * per_group {
                return Err(err(
                    "moe.topk_group",
                    format!(
                        "{} groups of {per_group} experts hold fewer than moe.top_k = {} experts",
                        self.topk_group, self.top_k
                    ),
                ));
            }
        }
        if !(self.routed_scaling_factor > 0.0) || !self.routed_scaling_factor.is_finite() {
            return Err(err(
                "moe.routed_scaling_factor",
                format!(
                    "must be a finite number > 0, got {}",
                    self.routed_scaling_factor
                ),
            ));
        }
        if !(self.revive_noise >= 0.0) || !self.revive_noise.is_finite() {
            return Err(err(
                "moe.revive_noise",
                format!("must be a finite number >= 0, got {}", self.revive_noise),
            ));
        }
        for (key, v) in [
            ("moe.bias_update_rate", self.bias_update_rate),
            ("moe.aux_loss_coef", self.aux_loss_coef),
            ("moe.seq_aux_loss_coef", self.seq_aux_loss_coef),
            ("moe.z_loss_coef", self.z_loss_coef),
        ] {
            if !(v >= 0.0) || !v.is_finite() {
                return Err(err(key, format!("must be a finite number >= 0, got {v}")));
            }
        }
        Ok(())
    }
}
