//! Per-layer routing statistics, kept on the device. The training loop reads
//! them back in one batched transfer at logging time; nothing here syncs.

use burn::prelude::*;

/// What one MoE layer did in one forward pass. All counts cover real tokens
/// only (padding excluded).
#[derive(Debug, Clone)]
pub struct RoutingStats {
    /// Assignments routed to each expert before capacity (top-k choices). `[E]`
    pub routed_per_expert: Tensor<1>,
    /// Assignments each expert actually computed (after capacity, and
    /// after rerouting). `[E]`
    pub kept_per_expert: Tensor<1>,
    /// Assignments computed by an expert other than their own choice
    /// (rerouted). `[1]`
    pub rerouted: Tensor<1>,
    /// Mean router probability of each expert. `[E]`
    pub mean_prob: Tensor<1>,
    /// Number of real tokens. `[1]`
    pub num_tokens: Tensor<1>,
    /// Mean router entropy in nats. `[1]`
    pub router_entropy: Tensor<1>,
    /// Mean router input over real tokens, kept only under
    /// `moe.revive_dead_experts` (a revival splits tokens around it). `[d_model]`
    pub mean_input: Option<Tensor<1>>,
}

impl RoutingStats {
    /// Assignments dropped for lack of capacity. `[1]`
    pub fn dropped(&self) -> Tensor<1> {
        (self.routed_per_expert.clone() - self.kept_per_expert.clone()).sum()
    }
}
