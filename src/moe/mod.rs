//! The routed-expert layer: router → dispatch → experts → combine, plus
//! optional shared experts. Follows the separation of Megatron-Core's MoE
//! (router produces the decision, a dispatcher moves tokens, experts compute,
//! the layer combines), with aux losses and statistics as return values.
//!
//! References: Shazeer et al. 2017 (sparsely-gated MoE), Lepikhin et al. 2020
//! (GShard capacity), Fedus et al. 2021 (Switch), Zoph et al. 2022 (ST-MoE
//! z-loss), Jiang et al. 2024 (Mixtral), Qwen2-MoE shared experts, DeepSeek-V3
//! aux-loss-free balancing.

pub mod dispatch;
pub mod experts;
pub mod losses;
pub mod policy;
pub mod reroute;
pub mod revive;
pub mod router;
pub mod shard;
pub mod stats;

use crate::config::{DropPolicy, MoeConfig};
use crate::dist::exchange::RowLink;
use crate::nn::{apply, linear, Mlp};
use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::activation::sigmoid;
use burn::tensor::DType;
pub use experts::Experts;
pub use router::{Phase, Router, RoutingDecision};
pub use stats::RoutingStats;

/// The auxiliary losses of one MoE layer, unweighted. Each `[1]`.
#[derive(Debug, Clone)]
pub struct MoeLosses {
    /// Switch load-balancing loss (1.0 when balanced).
    pub load_balancing: Tensor<1>,
    /// Sequence-level balance loss.
    pub seq_load_balancing: Tensor<1>,
    /// Router z-loss.
    pub z_loss: Tensor<1>,
    /// `P_e`, the mean router probability of each expert over real tokens,
    /// with its gradient: the global-batch balance loss is built from it. `[E]`
    pub mean_probs: Tensor<1>,
}

/// Everything a MoE layer returns besides its output.
#[derive(Debug, Clone)]
pub struct MoeAux {
    /// Unweighted auxiliary losses.
    pub losses: MoeLosses,
    /// Routing statistics, on the device.
    pub stats: RoutingStats,
    /// Router logits (after any training noise). `[B*S, E]`
    pub router_logits: Tensor<2>,
    /// Chosen experts per token. `[B*S, k]`
    pub topk_experts: Tensor<2, Int>,
    /// Their combine weights. `[B*S, k]`
    pub topk_weights: Tensor<2>,
    /// Slot of each assignment (token-major); `empty_slot` when it was
    /// dropped. `[B*S * k]`
    pub slot_for_assignment: Tensor<1, Int>,
    /// The slot index that marks a dropped assignment.
    pub empty_slot: usize,
}

impl MoeAux {
    /// 1.0 for each assignment (token-major, `t * k + j`) that an expert
    /// computed, 0.0 for one dropped. `[B*S * k]`
    pub fn kept_assignments(&self) -> Tensor<1> {
        self.slot_for_assignment
            .clone()
            .lower_elem(self.empty_slot as i64)
            .float()
    }
}

/// A routed-expert FFN.
#[derive(Module, Debug)]
pub struct MoeLayer {
    /// The router (Hugging Face `gate`).
    pub router: Router,
    /// The routed experts, weights stacked.
    pub experts: Experts,
    /// All shared experts fused side by side into one SwiGLU.
    pub shared_expert: Option<Mlp>,
    /// Sigmoid gate on the shared-expert output. `[d_model, 1]`
    pub shared_expert_gate: Option<Linear>,
    #[module(skip)]
    cfg: MoeConfig,
    /// Under expert parallelism: the experts this rank holds (`experts`
    /// then holds only those) and the group that holds the rest.
    #[module(skip)]
    shard: Option<shard::ExpertShard>,
}

impl MoeLayer {
    /// A new layer for `cfg` at width `d_model`.
    pub fn new(d_model: usize, cfg: &MoeConfig, init_std: f64, device: &Device) -> Self {
        let shared = cfg.shared_width();
        Self {
            router: Router::new(
                d_model,
                cfg,
                cfg.router_init_std.unwrap_or(init_std),
                device,
            ),
            experts: Experts::new(cfg.num_experts, d_model, cfg.d_expert, init_std, device),
            shared_expert: (shared > 0).then(|| Mlp::new(d_model, shared, init_std, device)),
            shared_expert_gate: cfg
                .shared_expert_gate
                .then(|| linear(d_model, 1, false, init_std, device)),
            cfg: cfg.clone(),
            shard: None,
        }
    }

    /// The configuration of this layer.
    pub fn config(&self) -> &MoeConfig {
        &self.cfg
    }

    /// Keep here only the experts held by `slot`; expert e lives on the
    /// ranks of `homes[e]` in `link`'s group, each computing its share of
    /// e's rows (expert parallelism).
    pub fn shard_experts(&mut self, homes: &[Vec<(usize, f64)>], slot: usize, link: RowLink) {
        let shard = shard::ExpertShard::new(homes, slot, link);
        self.experts = shard::select_experts(&self.experts, shard.held());
        self.shard = Some(shard);
    }

    /// Under expert parallelism: the experts of each rank of the group.
    pub fn expert_ranks(&self) -> Option<&[Vec<usize>]> {
        self.shard.as_ref().map(|s| s.by_rank.as_slice())
    }

    /// The experts this layer's stack holds, in its order (all of them
    /// unless expert parallelism spreads them).
    pub fn held_experts(&self) -> Vec<usize> {
        match &self.shard {
            Some(s) => s.held().to_vec(),
            None => (0..self.cfg.num_experts).collect(),
        }
    }

    /// Under expert parallelism, sum the gradients of the experts held by
    /// several ranks of the group (see [`shard::ExpertShard::sum_replica_grads`]).
    pub fn sum_replica_grads(&self, grads: &mut burn::optim::GradientsParams) {
        if let Some(s) = &self.shard {
            s.sum_replica_grads(&self.experts, grads);
        }
    }

    /// Under expert parallelism, the part of the gradient norm's sum of
    /// squares this rank's second copies of replicated experts hold (see
    /// [`shard::ExpertShard::copies_sq_norm`]).
    pub fn copies_sq_norm(&self, grads: &burn::optim::GradientsParams) -> f64 {
        self.shard
            .as_ref()
            .map_or(0.0, |s| s.copies_sq_norm(&self.experts, grads))
    }

    /// Change what happens to assignments beyond capacity.
    pub fn set_drop_policy(&mut self, policy: DropPolicy) {
        self.cfg.drop_policy = policy;
    }

    /// Change group-limited routing: `n_group` groups, `topk_group` chosen.
    pub fn set_groups(&mut self, n_group: usize, topk_group: usize) {
        self.cfg.n_group = n_group;
        self.cfg.topk_group = topk_group;
    }

    /// Change the evaluation routing: the drop policy and the capacity
    /// factor used in [`Phase::Eval`].
    pub fn set_eval_routing(&mut self, policy: DropPolicy, capacity_factor: f64) {
        self.cfg.drop_policy = policy;
        self.cfg.eval_capacity_factor = capacity_factor;
    }

    /// # Shapes
    /// - `x`: `[B, S, d_model]` → `[B, S, d_model]`
    /// - `valid`: `[B, S]`, 1.0 for real tokens and 0.0 for padding
    pub fn forward(&self, x: Tensor<3>, valid: Tensor<2>, phase: Phase) -> (Tensor<3>, MoeAux) {
        let [b, s, d] = x.dims();
        let (e, k) = (self.cfg.num_experts, self.cfg.top_k);
        let t = b * s;
        let flat = x.reshape([t, d]); // [T, d]
        let valid_flat = valid.clone().reshape([t]); // [T]

        let decision = self.router.forward(flat.clone(), &self.cfg, phase);
        let cf = match phase {
            Phase::Train => self.cfg.capacity_factor,
            Phase::Eval => self.cfg.eval_capacity_factor,
        };
        let plan = policy::plan(
            &decision,
            valid_flat.clone(),
            self.cfg.capacity(t, cf),
            policy::overflow(&self.cfg),
        );
        let weights = match &plan.rerouted {
            Some((experts, _)) => decision.weights_for(experts.clone(), &self.cfg),
            None => decision.topk_weights.clone(),
        }
        .cast(flat.dtype());
        let dispatched = dispatch::Dispatched::new(flat.clone(), plan.clone(), e);
        let mut y = match &self.shard {
            Some(shard) => shard.through(dispatched, &self.experts),
            None => dispatched.through(&self.experts),
        }
        .combine(weights); // [T, d]

        if let Some(shared) = &self.shared_expert {
            let mut out = shared.forward(flat.clone()); // [T, d]
            if let Some(gate) = &self.shared_expert_gate {
                out = out * sigmoid(apply(gate, flat.clone())); // [T, 1] broadcast
            }
            y = y + out;
        }

        let mean_probs = losses::mean_probs(decision.probs.clone(), valid_flat.clone());
        let mut stats = routing_stats(&decision, &plan, valid_flat.clone(), &mean_probs);
        if self.cfg.revive_dead_experts {
            let n = stats.num_tokens.clone().clamp_min(1.0);
            let sum = (flat.clone().detach().cast(DType::F32) * valid_flat.clone().reshape([t, 1]))
                .sum_dim(0)
                .reshape([d]);
            stats.mean_input = Some(sum / n);
        }
        let losses = MoeLosses {
            load_balancing: losses::balance_loss(
                stats.routed_per_expert.clone(),
                stats.num_tokens.clone(),
                mean_probs.clone(),
                k,
            ),
            seq_load_balancing: losses::sequence_load_balancing_loss(
                decision.probs.clone().reshape([b, s, e]),
                decision.routing_map.clone().reshape([b, s, e]),
                valid,
                k,
            ),
            z_loss: losses::router_z_loss(decision.logits.clone(), valid_flat),
            mean_probs,
        };
        let aux = MoeAux {
            slot_for_assignment: plan.slot_for_assignment.clone(),
            empty_slot: e * plan.capacity,
            losses,
            stats,
            router_logits: decision.logits,
            topk_experts: decision.topk_experts,
            topk_weights: decision.topk_weights,
        };
        (y.reshape([b, s, d]), aux)
    }
}

/// Statistics of one routing step over real tokens; `mean_probs` is
/// [`losses::mean_probs`] of the decision, computed once for the losses too.
fn routing_stats(
    decision: &RoutingDecision,
    plan: &dispatch::DispatchPlan,
    valid: Tensor<1>,
    mean_probs: &Tensor<1>,
) -> RoutingStats {
    let [t, e] = decision.probs.dims();
    let probs = decision.probs.clone().detach();
    let valid_col = valid.clone().reshape([t, 1]);
    let n = valid.clone().sum();
    RoutingStats {
        routed_per_expert: (decision.routing_map.clone().detach() * valid_col.clone())
            .sum_dim(0)
            .reshape([e]),
        kept_per_expert: plan.kept_per_expert.clone(),
        rerouted: match &plan.rerouted {
            Some((_, n)) => n.clone(),
            None => Tensor::zeros([1], &n.device()),
        },
        mean_prob: mean_probs.clone().detach(),
        num_tokens: n,
        router_entropy: losses::router_entropy(probs, valid),
        mean_input: None,
    }
}
