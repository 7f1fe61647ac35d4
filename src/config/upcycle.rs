//! The `[upcycle]` section: build an MoE model from the dense model that
//! `train.init_from` names, before training starts (sparse upcycling,
//! Komatsuzaki et al. 2022). `switchyard upcycle` takes the same values as
//! flags.

use super::{err, ConfigError};
use serde::{Deserialize, Serialize};

/// How each chosen dense MLP becomes an MoE layer ([`crate::upcycle`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpcycleConfig {
    /// Routed experts per upcycled block. Default 8.
    pub experts: usize,
    /// Copies of the MLP each token is routed to; the layer's `moe.top_k`
    /// is this times `granularity - shared_experts`. Default 2.
    pub top_k: usize,
    /// Split each MLP's hidden width into this many slices; each routed
    /// expert holds one slice (granular upcycling). Default 1.
    pub granularity: usize,
    /// The blocks to upcycle; none means every block. Default none.
    pub layers: Option<Vec<usize>>,
    /// Slices (of `granularity`) that become an always-on shared expert
    /// instead of routed ones. Default 0.
    pub shared_experts: usize,
    /// Gaussian noise added to each routed expert's weights, relative to
    /// each matrix's standard deviation. It breaks the copies' symmetry and
    /// changes the function. Default 0.
    pub noise: f64,
}

impl Default for UpcycleConfig {
    fn default() -> Self {
        Self {
            experts: 8,
            top_k: 2,
            granularity: 1,
            layers: None,
            shared_experts: 0,
            noise: 0.0,
        }
    }
}

impl UpcycleConfig {
    /// Routed slices per copy of the MLP: `granularity - shared_experts`.
    pub fn routed_slices(&self) -> usize {
        self.granularity - self.shared_experts
    }

    /// Check every field, naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (key, v) in [
            ("upcycle.experts", self.experts),
            ("upcycle.top_k", self.top_k),
            ("upcycle.granularity", self.granularity),
        ] {
            if v == 0 {
                return Err(err(key, "must be a positive integer"));
            }
        }
        if self.shared_experts >= self.granularity {
            return Err(err(
                "upcycle.shared_experts",
                format!(
                    "must be below upcycle.granularity = {} (shared experts take {} of its slices and the routed experts need at least one)",
                    self.granularity, self.shared_experts
                ),
            ));
        }
        let n = self.routed_slices();
        if !self.experts.is_multiple_of(n) {
            return Err(err(
                "upcycle.experts",
                format!(
                    "must be a multiple of granularity - shared_experts = {n} (each copy of the MLP is {n} routed experts), got {}",
                    self.experts
                ),
            ));
        }
        let copies = self.experts / n;
        if self.top_k > copies {
            return Err(err(
                "upcycle.top_k",
                format!(
                    "must be at most the {copies} copies of the MLP that {} experts of {n} slice(s) make, got {}",
                    self.experts, self.top_k
                ),
            ));
        }
        if !(self.noise >= 0.0 && self.noise.is_finite()) {
            return Err(err(
                "upcycle.noise",
                format!("must be a finite number >= 0, got {}", self.noise),
            ));
        }
        Ok(())
    }
}
