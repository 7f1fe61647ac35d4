//! The decoder-only language model: token embedding → blocks → final RMSNorm
//! → LM head. It expresses Hugging Face Mixtral and Qwen2-MoE exactly; module
//! field names follow their checkpoint keys so the import table in `hf/keys.rs`
//! stays short.

pub mod attention;
pub mod block;
pub mod rope;

use crate::config::{DropPolicy, ModelConfig, MoeConfig, Precision};
use crate::moe::{MoeAux, MoeLayer, Phase};
use crate::nn::norm;
use crate::nn::{apply, in_dtype};
use block::{rms_norm, Block, Ffn};
use burn::nn::{Embedding, EmbeddingConfig, Initializer, Linear, RmsNorm};
use burn::prelude::*;
use burn::tensor::DType;
use rope::Rope;

/// What one forward pass returns.
#[derive(Debug, Clone)]
pub struct ModelOutput {
    /// Next-token logits. `[B, S, V]`
    pub logits: Tensor<3>,
    /// One entry per MoE block, in block order (MoE layer i is the i-th entry).
    pub moe: Vec<MoeAux>,
}

/// A decoder-only MoE language model.
#[derive(Module, Debug)]
pub struct LanguageModel {
    /// Token embedding. `[V, d_model]`
    pub embed_tokens: Embedding,
    /// The blocks.
    pub layers: Vec<Block>,
    /// Final RMSNorm.
    pub norm: RmsNorm,
    /// LM head; `None` when tied to the embedding. `[d_model, V]`
    pub lm_head: Option<Linear>,
    /// RoPE tables (constants, not parameters).
    pub rope: Rope,
    #[module(skip)]
    cfg: ModelConfig,
    #[module(skip)]
    moe_cfg: MoeConfig,
    /// The dtype activations and matmuls run in (parameters stay f32).
    #[module(skip)]
    compute: DType,
}

impl LanguageModel {
    /// A freshly initialised model, every weight drawn now from its own
    /// random stream under `seed` ([`crate::params::materialize`]). Call
    /// `validate` on both configs first.
    ///
    /// A parameter's stream is named by its path, except that expert weights
    /// are named as the dense MLP of the same block: expert 0 of an MoE
    /// layer starts from the weights the dense twin's MLP would have (all of
    /// them when `d_expert = d_ff`), and every parameter the two models
    /// share starts equal. A one-expert model thus trains exactly as its
    /// dense twin, and an MoE-versus-dense comparison is paired.
    pub fn new(cfg: &ModelConfig, moe: &MoeConfig, seed: u64, device: &Device) -> Self {
        let model = Self::unloaded(cfg, moe, device);
        crate::params::materialize(&model, seed, init_stream);
        model
    }

    /// A model whose every parameter a load is about to replace
    /// ([`crate::params::load`]): shapes, device and gradient settings as
    /// [`Self::new`] gives them, but no weights drawn, so a load allocates
    /// each tensor once and takes nothing from the random stream.
    pub fn unloaded(cfg: &ModelConfig, moe: &MoeConfig, device: &Device) -> Self {
        let init = Initializer::Normal {
            mean: 0.0,
            std: cfg.init_std,
        };
        Self {
            embed_tokens: EmbeddingConfig::new(cfg.vocab_size, cfg.d_model)
                .with_initializer(init)
                .init(device),
            layers: (0..cfg.n_layers)
                .map(|l| Block::new(l, cfg, moe, device))
                .collect(),
            norm: rms_norm(cfg, device),
            lm_head: (!cfg.tie_embeddings).then(|| {
                crate::nn::linear(cfg.d_model, cfg.vocab_size, false, cfg.init_std, device)
            }),
            rope: Rope::new(cfg.head_dim(), cfg.seq_len, cfg.rope_theta, device),
            cfg: cfg.clone(),
            moe_cfg: moe.clone(),
            compute: DType::F32,
        }
    }

    /// Compute in `precision` (see [`Precision`]); parameters stay f32.
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.compute = match precision {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
        };
        self
    }

    /// Compute in `dtype`, whatever it is (f64 runs the composed tensor-op
    /// path on the CPU backend, where f32 takes the fused kernels: the
    /// gradient parity tests hold both to PyTorch). Parameters stay f32.
    pub fn with_compute_dtype(mut self, dtype: DType) -> Self {
        self.compute = dtype;
        self
    }

    /// The dtype activations and matmuls run in.
    pub fn compute_dtype(&self) -> DType {
        self.compute
    }

    /// Refuse a token sequence the model cannot run: empty, longer than
    /// `seq_len` (the positions RoPE is tabulated for), or holding an id
    /// outside the vocabulary. `what` names the input in the error.
    pub fn check_tokens(&self, ids: &[u32], what: &str) -> anyhow::Result<()> {
        let (v, s) = (self.cfg.vocab_size, self.cfg.seq_len);
        if ids.is_empty() {
            anyhow::bail!("{what}: no tokens to run");
        }
        if ids.len() > s {
            anyhow::bail!(
                "{what}: {} tokens, more than the model's context of {s} (model.seq_len); \
                 give at most {s}",
                ids.len()
            );
        }
        if let Some((pos, id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= v) {
            anyhow::bail!(
                "{what}: token id {id} (position {pos}) is outside the model's vocabulary \
                 of {v} (ids 0..={})",
                v - 1
            );
        }
        Ok(())
    }

    /// The model configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The MoE configuration.
    pub fn moe_config(&self) -> &MoeConfig {
        &self.moe_cfg
    }

    /// The same model routing every token to all its k experts, with no
    /// capacity limit (what inference does by default: a trained model's
    /// capacity is a training device, and transformers has none).
    pub fn without_capacity(mut self) -> Self {
        self.moe_cfg.drop_policy = DropPolicy::Dropless;
        for layer in self.moe_layers_mut() {
            layer.set_drop_policy(DropPolicy::Dropless);
        }
        self
    }

    /// The MoE layers, in block order.
    pub fn moe_layers(&self) -> impl Iterator<Item = &MoeLayer> {
        self.layers.iter().filter_map(|b| match &b.mlp {
            Ffn::Moe(m) => Some(m),
            Ffn::Dense(_) => None,
        })
    }

    /// The block index of each MoE layer, in order.
    pub fn moe_layer_indices(&self) -> Vec<usize> {
        self.layers
            .iter()
            .enumerate()
            .filter(|(_, b)| matches!(b.mlp, Ffn::Moe(_)))
            .map(|(i, _)| i)
            .collect()
    }

    /// Mutable access to the MoE layers, in block order.
    pub fn moe_layers_mut(&mut self) -> impl Iterator<Item = &mut MoeLayer> {
        self.layers.iter_mut().filter_map(|b| match &mut b.mlp {
            Ffn::Moe(m) => Some(m),
            Ffn::Dense(_) => None,
        })
    }

    /// # Shapes
    /// - `tokens`: `[B, S]` → logits `[B, S, V]`
    /// - `valid`: `[B, S]`, 1.0 for real tokens, 0.0 for padding; `None` = all real
    pub fn forward(
        &self,
        tokens: Tensor<2, Int>,
        valid: Option<Tensor<2>>,
        phase: Phase,
    ) -> ModelOutput {
        let (x, moe) = self.hidden(tokens, valid, phase);
        ModelOutput {
            logits: self.head(x),
            moe,
        }
    }

    /// The mean next-token cross-entropy over positions where `mask` is 1,
    /// and each MoE layer's auxiliary outputs: [`Self::forward`] followed by
    /// [`cross_entropy`], except that on the CPU backend in f32 the LM head
    /// and the loss run as one operation that never holds the full logits.
    ///
    /// # Shapes
    /// - `tokens`, `targets`, `mask`: `[B, S]`; the loss is `[1]`
    pub fn forward_loss(
        &self,
        tokens: Tensor<2, Int>,
        targets: Tensor<2, Int>,
        mask: Tensor<2>,
        phase: Phase,
    ) -> (Tensor<1>, Vec<MoeAux>) {
        let (x, moe) = self.hidden(tokens, Some(mask.clone()), phase);
        (self.head_loss(x, targets, mask), moe)
    }

    /// The final norm, the LM head and the mean cross-entropy over
    /// positions where `mask` is 1, from the blocks' output `x: [B, S, d]`.
    pub fn head_loss(&self, x: Tensor<3>, targets: Tensor<2, Int>, mask: Tensor<2>) -> Tensor<1> {
        let h = self.final_norm(x);
        let [b, s, d] = h.dims();
        let mask_flat = mask.clone().reshape([b * s]);
        let fused = self.head_weight().and_then(|w| {
            crate::kernels::linear_cross_entropy(
                h.clone().reshape([b * s, d]),
                in_dtype(w, h.dtype()),
                targets.clone().reshape([b * s]),
                mask_flat.clone(),
            )
        });
        match fused {
            Some(sum) => per_masked_position(sum, mask_flat),
            None => cross_entropy(self.project(h), targets, mask),
        }
    }

    /// The LM head's weight as `[d, V]` (the tied embedding transposed);
    /// `None` for a biased head, which takes the composed path.
    fn head_weight(&self) -> Option<Tensor<2>> {
        match &self.lm_head {
            Some(head) if head.bias.is_none() => Some(head.weight.val()),
            Some(_) => None,
            None => Some(self.embed_tokens.weight.val().transpose()),
        }
    }

    /// Each position's next-token cross-entropy (`[B·S]`, row-major), with
    /// no gradient, from the blocks' output `x: [B, S, d]`: for evaluation
    /// statistics that need the loss per token.
    pub fn head_row_losses(&self, x: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<1> {
        let h = self.final_norm(x).detach();
        let [b, s, d] = h.dims();
        let targets = targets.reshape([b * s]);
        let fused = self.head_weight().and_then(|w| {
            crate::kernels::linear_cross_entropy_rows(
                h.clone().reshape([b * s, d]),
                in_dtype(w.detach(), h.dtype()),
                targets.clone(),
            )
        });
        match fused {
            Some(rows) => rows,
            None => {
                let logits = self.project(h); // [B, S, V]
                let v = logits.dims()[2];
                crate::kernels::cross_entropy_rows(logits.reshape([b * s, v]), targets).detach()
            }
        }
    }

    /// The blocks: embeddings in, final hidden states `[B, S, d]` (before
    /// the final norm) and each MoE layer's auxiliary outputs out. `valid`
    /// marks the tokens the routers count (all when `None`).
    pub fn hidden(
        &self,
        tokens: Tensor<2, Int>,
        valid: Option<Tensor<2>>,
        phase: Phase,
    ) -> (Tensor<3>, Vec<MoeAux>) {
        let [b, s] = tokens.dims();
        let device = tokens.device();
        let valid = valid.unwrap_or_else(|| Tensor::ones([b, s], &device));
        let mut x = in_dtype(self.embed_tokens.forward(tokens), self.compute); // [B, S, d]
        if self.cfg.embedding_multiplier != 1.0 {
            x = x.mul_scalar(self.cfg.embedding_multiplier);
        }
        let mut moe = Vec::new();
        for block in &self.layers {
            let (y, aux) = block.forward(x, valid.clone(), &self.rope, phase);
            x = y;
            moe.extend(aux);
        }
        (x, moe)
    }

    /// The final norm and the LM head (the tied embedding when there is no
    /// head): hidden states `[B, S, d]` → f32 logits `[B, S, V]`.
    pub fn head(&self, x: Tensor<3>) -> Tensor<3> {
        self.project(self.final_norm(x))
    }

    /// The final norm, divided by `model.logits_scaling`: the head is
    /// linear, so this divides the logits, and the fused loss sees it too.
    fn final_norm(&self, x: Tensor<3>) -> Tensor<3> {
        let h = norm(&self.norm, x);
        match self.cfg.logits_scaling {
            1.0 => h,
            s => h.div_scalar(s),
        }
    }

    /// The LM head alone, on normed hidden states.
    fn project(&self, x: Tensor<3>) -> Tensor<3> {
        let logits = match &self.lm_head {
            Some(head) => apply(head, x),
            None => {
                let dt = x.dtype();
                x.matmul(
                    in_dtype(self.embed_tokens.weight.val(), dt)
                        .transpose()
                        .unsqueeze(),
                )
            }
        };
        // The loss and everything read from the logits work in f32.
        in_dtype(logits, DType::F32)
    }
}

/// The name of the random stream parameter `path` is drawn from: its path,
/// with stacked expert weights (`layers.{i}.mlp.experts.{proj}`) named as
/// the dense MLP's (`layers.{i}.mlp.{proj}.weight`).
fn init_stream(path: &str) -> String {
    match path.split_once(".mlp.experts.") {
        Some((block, proj)) => format!("{block}.mlp.{proj}.weight"),
        None => path.to_string(),
    }
}

/// Mean next-token cross-entropy over positions where `mask` is 1.
///
/// # Shapes
/// - `logits`: `[B, S, V]`; `targets`: `[B, S]`; `mask`: `[B, S]`; returns `[1]`
pub fn cross_entropy(logits: Tensor<3>, targets: Tensor<2, Int>, mask: Tensor<2>) -> Tensor<1> {
    let [b, s, v] = logits.dims();
    let nll =
        crate::kernels::cross_entropy_rows(logits.reshape([b * s, v]), targets.reshape([b * s])); // [B*S]
    masked_mean(nll, mask.reshape([b * s]))
}

/// The mean of `values` where `mask` is 1 (0 when the mask is empty).
fn masked_mean(values: Tensor<1>, mask: Tensor<1>) -> Tensor<1> {
    per_masked_position((values * mask.clone()).sum(), mask)
}

/// A masked sum divided by the number of masked-in positions (at least 1).
fn per_masked_position(sum: Tensor<1>, mask: Tensor<1>) -> Tensor<1> {
    sum / mask.sum().clamp_min(1.0)
}
