//! The `[moe]` section: which blocks route, how the router scores and
//! chooses, capacity and drops, shared experts, balancing losses and
//! revival. Plain serialisable data with documented defaults, unknown keys
//! rejected, one `validate()`.

mod validate;

use serde::{Deserialize, Serialize};

/// How router scores are computed from logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouterScore {
    /// Softmax over experts (Switch, Mixtral, Qwen2-MoE).
    Softmax,
    /// Independent sigmoid per expert (DeepSeek-V3).
    Sigmoid,
}

/// Whether the softmax is taken before or after choosing the top k.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TopkOrder {
    /// Softmax over all experts, then keep the k largest probabilities.
    SoftmaxThenTopk,
    /// Keep the k largest logits, then softmax over those k only.
    TopkThenSoftmax,
}

/// What happens to assignments beyond an expert's capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropPolicy {
    /// Capacity-limited: overflowing assignments contribute zero and the
    /// residual connection carries the token.
    Drop,
    /// No capacity limit: every assignment is computed.
    Dropless,
    /// Capacity-limited, but an assignment whose expert is full goes to the
    /// token's best remaining expert with a free slot (up to
    /// `moe.reroute_depth` further choices) before it is dropped.
    Reroute,
}

/// Over which tokens the Switch balance loss counts assignments (`f_e`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BalanceScope {
    /// Each micro-batch on its own (Switch, Megatron-Core's default).
    MicroBatch,
    /// The assignments of every micro-batch of the optimizer step so far
    /// (Qiu et al. 2025; Megatron-Core's `global_aux_loss`): balance is asked
    /// of the whole batch, so a micro-batch drawn from one domain may lean
    /// on a few experts.
    GlobalBatch,
}

/// Where a revived expert's weights come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReviveFrom {
    /// A copy of the layer's most loaded expert, with small noise.
    Busiest,
    /// Fresh draws from the initial distribution.
    Init,
}

/// The routed-expert layer and where it sits in the stack.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MoeConfig {
    /// Routed experts per MoE layer; 0 makes every block dense. Default 8.
    pub num_experts: usize,
    /// Experts chosen per token. Default 2.
    pub top_k: usize,
    /// Hidden width of each routed SwiGLU expert. Default 256.
    pub d_expert: usize,
    /// Block i is MoE when `(i + 1) % every_n_layers == 0` (the Hugging Face
    /// `decoder_sparse_step` convention), and i >= `first_k_dense`. Default 1.
    pub every_n_layers: usize,
    /// The first k blocks are dense. Default 0.
    pub first_k_dense: usize,
    /// Explicit list of MoE block indices; overrides the two keys above. Default none.
    pub layers: Option<Vec<usize>>,
    /// Router score function: "softmax" or "sigmoid". Default "softmax".
    pub score: RouterScore,
    /// "softmax_then_topk" or "topk_then_softmax". Default "softmax_then_topk".
    pub topk_order: TopkOrder,
    /// Renormalise the k chosen weights to sum to 1 (Mixtral always does;
    /// Qwen2-MoE when `norm_topk_prob`). Default true.
    pub normalize_topk: bool,
    /// "drop" (capacity-limited), "reroute" (capacity-limited, overflow to
    /// the next-best expert with room) or "dropless". Default "drop".
    pub drop_policy: DropPolicy,
    /// Under "reroute": how many choices past its own an overflowing
    /// assignment may try; none means all. Default none.
    pub reroute_depth: Option<usize>,
    /// Training capacity factor: capacity = ceil(cf * tokens * k / E). Default 1.25.
    pub capacity_factor: f64,
    /// Capacity factor at evaluation. Default 2.0.
    pub eval_capacity_factor: f64,
    /// Multiplicative router-input jitter epsilon, x * U(1-eps, 1+eps); training only. Default 0.
    pub jitter_eps: f64,
    /// Standard deviation of additive Gaussian noise on router logits; training only. Default 0.
    pub logit_noise_std: f64,
    /// Probability that an expert is disabled for a step; training only. Default 0.
    pub expert_dropout: f64,
    /// Always-on shared SwiGLU experts added to the routed output. Default 0.
    pub num_shared_experts: usize,
    /// Hidden width of each shared expert; `None` means `d_expert`. Default none.
    pub d_shared_expert: Option<usize>,
    /// Multiply the shared-expert output by sigmoid(gate(x)) (Qwen2-MoE). Default false.
    pub shared_expert_gate: bool,
    /// Aux-loss-free balancing (DeepSeek-V3): a per-expert bias used for
    /// top-k selection only. Default false.
    pub aux_free_bias: bool,
    /// Bias update rate gamma: b_e += gamma * sign(mean_load - load_e). Default 0.001.
    pub bias_update_rate: f64,
    /// Coefficient of the Switch load-balancing loss. Default 0.01.
    pub aux_loss_coef: f64,
    /// Which tokens the Switch loss balances over: "micro_batch" or
    /// "global_batch" (all micro-batches of the optimizer step). Default "micro_batch".
    pub balance_scope: BalanceScope,
    /// Coefficient of the sequence-level balance loss. Default 0.
    pub seq_aux_loss_coef: f64,
    /// Coefficient of the router z-loss. Default 0.001.
    pub z_loss_coef: f64,
    /// Standard deviation of the router's initial weights; none means
    /// `model.init_std`. Default none.
    pub router_init_std: Option<f64>,
    /// Group-limited routing (DeepSeek-V3, GLM-4.5): the experts split into
    /// this many equal groups of consecutive experts; 1 turns it off. Default 1.
    pub n_group: usize,
    /// Under group-limited routing, how many groups a token may choose from:
    /// those whose two best selection scores sum highest. Default 1.
    pub topk_group: usize,
    /// Multiplies the combine weights of the routed experts (not the shared
    /// ones). Default 1.0.
    pub routed_scaling_factor: f64,
    /// Re-initialise an expert once the collapse monitor has found it dead
    /// for `log.dead_expert_steps` steps in a row. Default false.
    pub revive_dead_experts: bool,
    /// A revived expert's weights: "busiest" (copy the layer's most loaded
    /// expert, plus noise) or "init" (fresh draws). Its router column is
    /// always the busiest expert's plus noise. Default "busiest".
    pub revive_from: ReviveFrom,
    /// Standard deviation of the noise added to copied weights, relative to
    /// the root mean square of what is copied. Default 0.01.
    pub revive_noise: f64,
}

impl Default for MoeConfig {
    fn default() -> Self {
        Self {
            num_experts: 8,
            top_k: 2,
            d_expert: 256,
            every_n_layers: 1,
            first_k_dense: 0,
            layers: None,
            score: RouterScore::Softmax,
            topk_order: TopkOrder::SoftmaxThenTopk,
            normalize_topk: true,
            drop_policy: DropPolicy::Drop,
            reroute_depth: None,
            capacity_factor: 1.25,
            eval_capacity_factor: 2.0,
            jitter_eps: 0.0,
            logit_noise_std: 0.0,
            expert_dropout: 0.0,
            num_shared_experts: 0,
            d_shared_expert: None,
            shared_expert_gate: false,
            aux_free_bias: false,
            bias_update_rate: 1e-3,
            aux_loss_coef: 1e-2,
            seq_aux_loss_coef: 0.0,
            z_loss_coef: 1e-3,
            router_init_std: None,
            balance_scope: BalanceScope::MicroBatch,
            n_group: 1,
            topk_group: 1,
            routed_scaling_factor: 1.0,
            revive_dead_experts: false,
            revive_from: ReviveFrom::Busiest,
            revive_noise: 0.01,
        }
    }
}

impl MoeConfig {
    /// Whether block `layer` of an `n_layers` stack uses the MoE FFN.
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        if self.num_experts == 0 {
            return false;
        }
        match &self.layers {
            Some(list) => list.contains(&layer),
            None => {
                layer >= self.first_k_dense
                    && (layer + 1).is_multiple_of(self.every_n_layers.max(1))
            }
        }
    }

    /// Width of the fused shared expert (all shared experts side by side).
    pub fn shared_width(&self) -> usize {
        self.num_shared_experts * self.d_shared_expert.unwrap_or(self.d_expert)
    }

    /// Capacity per expert for `tokens` tokens at capacity factor `cf`.
    /// `None` under the dropless policy.
    pub fn capacity(&self, tokens: usize, cf: f64) -> Option<usize> {
        match self.drop_policy {
            DropPolicy::Dropless => None,
            DropPolicy::Drop | DropPolicy::Reroute => {
                let c = (cf * (tokens * self.top_k) as f64 / self.num_experts as f64).ceil();
                Some((c as usize).max(1))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;

    #[test]
    fn defaults_validate() {
        let m = ModelConfig::default();
        m.validate().unwrap();
        MoeConfig::default().validate(&m).unwrap();
    }

    #[test]
    fn unknown_key_is_rejected_with_its_name() {
        let e = toml::from_str::<MoeConfig>("num_experts = 4\ntopk = 2\n").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("topk"), "{msg}");
        assert!(msg.contains("top_k"), "should list allowed keys: {msg}");
    }

    #[test]
    fn bad_enum_value_lists_allowed_values() {
        let e = toml::from_str::<MoeConfig>("score = \"relu\"\n").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("softmax") && msg.contains("sigmoid"), "{msg}");
    }

    #[test]
    fn validate_names_key() {
        let m = ModelConfig::default();
        let moe = MoeConfig {
            top_k: 9,
            ..MoeConfig::default()
        };
        assert_eq!(moe.validate(&m).unwrap_err().key, "moe.top_k");
        let bad = ModelConfig {
            n_kv_heads: 3,
            ..ModelConfig::default()
        };
        assert_eq!(bad.validate().unwrap_err().key, "model.n_kv_heads");
    }

    #[test]
    fn moe_layer_placement() {
        let mut moe = MoeConfig::default();
        assert!((0..4).all(|l| moe.is_moe_layer(l)));
        moe.every_n_layers = 2;
        let got: Vec<_> = (0..6).filter(|&l| moe.is_moe_layer(l)).collect();
        assert_eq!(got, vec![1, 3, 5]);
        moe.every_n_layers = 1;
        moe.first_k_dense = 1;
        let got: Vec<_> = (0..3).filter(|&l| moe.is_moe_layer(l)).collect();
        assert_eq!(got, vec![1, 2]);
        moe.layers = Some(vec![0, 2]);
        let got: Vec<_> = (0..3).filter(|&l| moe.is_moe_layer(l)).collect();
        assert_eq!(got, vec![0, 2]);
        moe.num_experts = 0;
        assert!((0..3).all(|l| !moe.is_moe_layer(l)));
    }

    #[test]
    fn capacity_formula() {
        let moe = MoeConfig {
            num_experts: 4,
            top_k: 2,
            ..MoeConfig::default()
        };
        // ceil(1.25 * 10 * 2 / 4) = ceil(6.25) = 7
        assert_eq!(moe.capacity(10, 1.25), Some(7));
        assert_eq!(moe.capacity(8, 1.0), Some(4));
        let dropless = MoeConfig {
            drop_policy: DropPolicy::Dropless,
            ..moe
        };
        assert_eq!(dropless.capacity(10, 1.25), None);
    }
}
