//! The router: the one place where top-k happens.
//!
//! Logits are a bias-free linear map of the token to E experts, computed in
//! f32. Training-time noise follows Switch Transformer (Fedus et al. 2021,
//! multiplicative input jitter) and noisy top-k (Shazeer et al. 2017, additive
//! Gaussian logit noise). Expert dropout masks whole experts before top-k.
//! The aux-loss-free bias of DeepSeek-V3 (Wang et al. 2024, "Auxiliary-Loss-Free
//! Load Balancing") shifts scores for *selection only*; the combine weights
//! come from the unbiased scores.

use crate::config::{MoeConfig, RouterScore, TopkOrder};
use burn::module::Param;
use burn::nn::Initializer;
use burn::prelude::*;
use burn::tensor::activation::{sigmoid, softmax};
use burn::tensor::{DType, Distribution, IndexingUpdateOp};

/// Whether the layer runs in training mode (noise, dropout, training capacity)
/// or evaluation mode (deterministic, evaluation capacity).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Noise and expert dropout on; `capacity_factor`.
    Train,
    /// Deterministic; `eval_capacity_factor`.
    Eval,
}

/// Everything downstream needs to know about one routing step. Nothing else
/// recomputes routing.
#[derive(Debug, Clone)]
pub struct RoutingDecision {
    /// Router logits after noise and expert-dropout masking, f32. `[T, E]`
    pub logits: Tensor<2>,
    /// Per-expert probabilities used by the balance losses and statistics:
    /// softmax of the logits, or sigmoid scores normalised to sum 1. `[T, E]`
    pub probs: Tensor<2>,
    /// Chosen experts per token, best first. `[T, k]`
    pub topk_experts: Tensor<2, Int>,
    /// Combine weight of each chosen expert. `[T, k]`
    pub topk_weights: Tensor<2>,
    /// 1.0 where token t chose expert e, else 0.0; carries no gradient. `[T, E]`
    pub routing_map: Tensor<2>,
    /// Scores the combine weights are taken from: softmax or sigmoid of the
    /// logits. `[T, E]`
    pub scores: Tensor<2>,
    /// The selection key top-k ranked by (scores or logits, plus any
    /// aux-free bias; disabled experts, and under group-limited routing the
    /// experts outside the token's groups, at [`MASKED`]); no gradient. `[T, E]`
    pub select: Tensor<2>,
}

impl RoutingDecision {
    /// The combine weights of experts chosen per token (`[T, k]`), by the
    /// same formula as the router's own top-k weights: for an assignment
    /// sent elsewhere than its top-k choice (rerouting).
    pub fn weights_for(&self, experts: Tensor<2, Int>, cfg: &MoeConfig) -> Tensor<2> {
        combine_weights(&self.logits, &self.scores, experts, cfg)
    }
}

/// The combine weights of `experts` (`[T, k]`) from the logits or scores.
fn combine_weights(
    logits: &Tensor<2>,
    scores: &Tensor<2>,
    experts: Tensor<2, Int>,
    cfg: &MoeConfig,
) -> Tensor<2> {
    let w = match cfg.topk_order {
        TopkOrder::TopkThenSoftmax => softmax(logits.clone().gather(1, experts), 1),
        TopkOrder::SoftmaxThenTopk => {
            let w = scores.clone().gather(1, experts);
            if cfg.normalize_topk {
                w.clone() / w.sum_dim(1).clamp_min(1e-20)
            } else {
                w
            }
        }
    };
    if cfg.routed_scaling_factor == 1.0 {
        w
    } else {
        w.mul_scalar(cfg.routed_scaling_factor)
    }
}

/// Group-limited selection (DeepSeek-V3, GLM-4.5): the experts form
/// `n_group` groups of consecutive experts; a group's score is the sum of
/// its two best selection keys; every expert outside the `topk_group`
/// best groups is set to [`MASKED`], so top-k only sees the chosen groups.
///
/// # Shapes
/// - `select`: `[T, E]` → `[T, E]`
fn limit_to_groups(select: Tensor<2>, n_group: usize, topk_group: usize) -> Tensor<2> {
    let [t, e] = select.dims();
    let per_group = e / n_group;
    let device = select.device();
    let grouped = select.clone().reshape([t, n_group, per_group]);
    let group_score = grouped.topk(2, 2).sum_dim(2).reshape([t, n_group]); // [T, G]
    let (_, best) = group_score.topk_with_indices(topk_group, 1); // [T, topk_group]
    let open = Tensor::<2>::zeros([t, n_group], &device)
        .scatter(
            1,
            best,
            Tensor::ones([t, topk_group], &device),
            IndexingUpdateOp::Add,
        )
        .reshape([t, n_group, 1])
        .expand([t, n_group, per_group])
        .reshape([t, e]); // [T, E], 1.0 inside a chosen group
    select.mask_fill(open.lower_elem(0.5), MASKED)
}

/// The learned router of one MoE layer.
#[derive(Module, Debug)]
pub struct Router {
    /// Router projection. `[d_model, E]`
    pub weight: Param<Tensor<2>>,
    /// Aux-loss-free selection bias; not trained by the optimizer. `[E]`
    pub expert_bias: Option<Param<Tensor<1>>>,
}

/// Large negative score that removes an expert from top-k and from the softmax.
pub const MASKED: f32 = -1.0e9;

impl Router {
    /// A router for `cfg.num_experts` experts, weights from N(0, std).
    pub fn new(d_model: usize, cfg: &MoeConfig, std: f64, device: &Device) -> Self {
        let e = cfg.num_experts;
        // Drawn on first use, like Burn's layers (see `LanguageModel::new`).
        let weight = Initializer::Normal { mean: 0.0, std }.init([d_model, e], device);
        let expert_bias = cfg
            .aux_free_bias
            .then(|| Param::from_tensor(Tensor::zeros([e], device)).set_require_grad(false));
        Self {
            weight,
            expert_bias,
        }
    }

    /// Route `x` under the layer's configuration `cfg`.
    ///
    /// # Shapes
    /// - `x`: `[T, d_model]`
    pub fn forward(&self, x: Tensor<2>, cfg: &MoeConfig, phase: Phase) -> RoutingDecision {
        let [t, _] = x.dims();
        let (e, k) = (cfg.num_experts, cfg.top_k);
        let device = x.device();
        let train = phase == Phase::Train;

        // Router maths in f32 whatever the model dtype.
        let mut x = x.cast(DType::F32);
        // A jitter too small to move 1.0 in f32 multiplies by exactly 1
        // (and would leave the sampler an empty range): skipped.
        let eps = cfg.jitter_eps;
        if train && ((1.0 - eps) as f32) < ((1.0 + eps) as f32) {
            x = x.clone() * x.random_like(Distribution::Uniform(1.0 - eps, 1.0 + eps));
        }
        let mut logits = x.matmul(self.weight.val().cast(DType::F32)); // [T, E]
        if train && cfg.logit_noise_std > 0.0 {
            logits =
                logits.clone() + logits.random_like(Distribution::Normal(0.0, cfg.logit_noise_std));
        }
        let disabled = (train && cfg.expert_dropout > 0.0)
            .then(|| dropout_mask(e, k, cfg.expert_dropout, &device).expand([t, e]));
        if let Some(mask) = &disabled {
            logits = logits.mask_fill(mask.clone(), MASKED);
        }

        let scores = match cfg.score {
            RouterScore::Softmax => softmax(logits.clone(), 1),
            RouterScore::Sigmoid => sigmoid(logits.clone()),
        }; // [T, E]
        let probs = match cfg.score {
            RouterScore::Softmax => scores.clone(),
            RouterScore::Sigmoid => scores.clone() / scores.clone().sum_dim(1).clamp_min(1e-20),
        };

        // Selection key: scores (or logits, for top-k-then-softmax) plus the
        // aux-free bias, with disabled experts pushed out of reach.
        let mut select = match cfg.topk_order {
            TopkOrder::SoftmaxThenTopk => scores.clone(),
            TopkOrder::TopkThenSoftmax => logits.clone(),
        }
        .detach();
        if let Some(bias) = &self.expert_bias {
            select = select + bias.val().detach().unsqueeze::<2>();
        }
        if let Some(mask) = &disabled {
            select = select.mask_fill(mask.clone(), MASKED);
        }
        if cfg.n_group > 1 {
            select = limit_to_groups(select, cfg.n_group, cfg.topk_group);
        }
        let (_, topk_experts) = select.clone().topk_with_indices(k, 1); // [T, k]
        let topk_weights = combine_weights(&logits, &scores, topk_experts.clone(), cfg);
        let routing_map = Tensor::<2>::zeros([t, e], &device).scatter(
            1,
            topk_experts.clone(),
            Tensor::ones([t, k], &device),
            IndexingUpdateOp::Add,
        );
        RoutingDecision {
            logits,
            probs,
            topk_experts,
            topk_weights,
            routing_map,
            scores,
            select,
        }
    }

    /// DeepSeek-V3 bias update, outside autodiff, at rate `gamma`
    /// (`moe.bias_update_rate`): `b_e ← b_e + γ · sign(mean_load − load_e)`.
    ///
    /// # Shapes
    /// - `routed_per_expert`: `[E]`
    pub fn update_expert_bias(&mut self, routed_per_expert: Tensor<1>, gamma: f64) {
        if let Some(bias) = self.expert_bias.take() {
            let load = routed_per_expert.detach(); // [E]
            let e = load.dims()[0];
            let mean = load.clone().mean().expand([e]);
            let (id, value, _) = bias.consume();
            let updated = (value + (mean - load).sign().mul_scalar(gamma)).detach();
            self.expert_bias = Some(Param::initialized(id, updated).set_require_grad(false));
        }
    }
}

/// Expert dropout for one step: each expert is disabled with probability `p`,
/// except that the `k` experts with the largest draws are always kept, so at
/// least k stay available. Decided on the device with no host read.
///
/// # Shapes
/// - returns `[1, E]`, true where disabled
fn dropout_mask(e: usize, k: usize, p: f64, device: &Device) -> Tensor<2, Bool> {
    let u = Tensor::<1>::random([e], Distribution::Default, device);
    let (_, keep) = u.clone().topk_with_indices(k, 0);
    let protected = Tensor::<1>::zeros([e], device)
        .scatter(0, keep, Tensor::ones([k], device), IndexingUpdateOp::Add)
        .greater_elem(0.5);
    u.lower_elem(p)
        .bool_and(protected.bool_not())
        .unsqueeze::<2>()
}
