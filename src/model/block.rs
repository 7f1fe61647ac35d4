//! One pre-norm transformer block: `x + attn(norm(x))`, then `x + ffn(norm(x))`,
//! where the FFN is a dense SwiGLU MLP or a routed-expert layer.

use super::attention::Attention;
use super::rope::Rope;
use crate::config::{ModelConfig, MoeConfig};
use crate::moe::{MoeAux, MoeLayer, Phase};
use crate::nn::norm;
use crate::nn::Mlp;
use burn::nn::RmsNorm;
use burn::prelude::*;

/// The feed-forward half of a block.
// One per block, built once and never moved in a hot loop: boxing the MoE
// variant would only add an indirection.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Ffn {
    /// A dense SwiGLU MLP.
    Dense(Mlp),
    /// A routed-expert layer.
    Moe(MoeLayer),
}

/// A pre-norm decoder block.
#[derive(Module, Debug)]
pub struct Block {
    /// RMSNorm before attention.
    pub input_layernorm: RmsNorm,
    /// Causal self-attention.
    pub self_attn: Attention,
    /// RMSNorm before the FFN.
    pub post_attention_layernorm: RmsNorm,
    /// Dense MLP or MoE layer (Hugging Face `mlp` / `block_sparse_moe`).
    pub mlp: Ffn,
    /// `model.residual_multiplier`.
    #[module(skip)]
    residual_multiplier: f64,
}

/// RMSNorm with weight 1 and the model's epsilon.
pub fn rms_norm(cfg: &ModelConfig, device: &Device) -> RmsNorm {
    crate::nn::rms_norm(cfg.d_model, cfg.rms_norm_eps, device)
}

impl Block {
    /// Block number `layer` of the stack.
    pub fn new(layer: usize, cfg: &ModelConfig, moe: &MoeConfig, device: &Device) -> Self {
        let mlp = if moe.is_moe_layer(layer) {
            Ffn::Moe(MoeLayer::new(cfg.d_model, moe, cfg.init_std, device))
        } else {
            Ffn::Dense(Mlp::new(cfg.d_model, cfg.d_ff, cfg.init_std, device))
        };
        Self {
            input_layernorm: rms_norm(cfg, device),
            self_attn: Attention::new(cfg, device),
            post_attention_layernorm: rms_norm(cfg, device),
            mlp,
            residual_multiplier: cfg.residual_multiplier,
        }
    }

    /// # Shapes
    /// - `x`: `[B, S, d_model]` → `[B, S, d_model]`; `valid`: `[B, S]`
    pub fn forward(
        &self,
        x: Tensor<3>,
        valid: Tensor<2>,
        rope: &Rope,
        phase: Phase,
    ) -> (Tensor<3>, Option<MoeAux>) {
        let r = self.residual_multiplier;
        let scaled = |t: Tensor<3>| if r == 1.0 { t } else { t.mul_scalar(r) };
        let x = x.clone() + scaled(self.self_attn.forward(norm(&self.input_layernorm, x), rope));
        let h = norm(&self.post_attention_layernorm, x.clone());
        match &self.mlp {
            Ffn::Dense(mlp) => (x + scaled(mlp.forward(h)), None),
            Ffn::Moe(moe) => {
                let (y, aux) = moe.forward(h, valid, phase);
                (x + scaled(y), Some(aux))
            }
        }
    }
}
