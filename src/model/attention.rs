//! Causal multi-head self-attention with grouped-query heads (Ainslie et al.
//! 2023) and RoPE, laid out as in Hugging Face Mixtral/Qwen2: separate
//! `q_proj`, `k_proj`, `v_proj` (optionally biased) and a bias-free `o_proj`.

use super::mlp::linear;
use super::rope::Rope;
use crate::config::ModelConfig;
use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;

/// Grouped-query causal self-attention.
#[derive(Module, Debug)]
pub struct Attention {
    /// `[d_model, n_heads * head_dim]`
    pub q_proj: Linear,
    /// `[d_model, n_kv_heads * head_dim]`
    pub k_proj: Linear,
    /// `[d_model, n_kv_heads * head_dim]`
    pub v_proj: Linear,
    /// `[n_heads * head_dim, d_model]`
    pub o_proj: Linear,
    #[module(skip)]
    n_heads: usize,
    #[module(skip)]
    n_kv_heads: usize,
    #[module(skip)]
    head_dim: usize,
}

impl Attention {
    /// A new attention block for `cfg`.
    pub fn new(cfg: &ModelConfig, device: &Device) -> Self {
        let hd = cfg.head_dim();
        let std = cfg.init_std;
        Self {
            q_proj: linear(cfg.d_model, cfg.n_heads * hd, cfg.qkv_bias, std, device),
            k_proj: linear(cfg.d_model, cfg.n_kv_heads * hd, cfg.qkv_bias, std, device),
            v_proj: linear(cfg.d_model, cfg.n_kv_heads * hd, cfg.qkv_bias, std, device),
            o_proj: linear(cfg.n_heads * hd, cfg.d_model, false, std, device),
            n_heads: cfg.n_heads,
            n_kv_heads: cfg.n_kv_heads,
            head_dim: hd,
        }
    }

    /// # Shapes
    /// - `x`: `[B, S, d_model]` → `[B, S, d_model]`
    pub fn forward(&self, x: Tensor<3>, rope: &Rope) -> Tensor<3> {
        let [b, s, _] = x.dims();
        let (h, kv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let split = |t: Tensor<3>, heads: usize| t.reshape([b, s, heads, hd]).swap_dims(1, 2);
        let q = rope.apply(split(self.q_proj.forward(x.clone()), h)); // [B, H, S, hd]
        let k = rope.apply(split(self.k_proj.forward(x.clone()), kv)); // [B, KV, S, hd]
        let v = split(self.v_proj.forward(x), kv); // [B, KV, S, hd]
        let (k, v) = (repeat_kv(k, h / kv), repeat_kv(v, h / kv));
        let options = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: true,
        };
        let out = attention(q, k, v, None, None, options); // [B, H, S, hd]
        self.o_proj
            .forward(out.swap_dims(1, 2).reshape([b, s, h * hd]))
    }
}

/// Share each key/value head among `n_rep` consecutive query heads: query
/// head i reads kv head i / n_rep.
///
/// # Shapes
/// - `x`: `[B, KV, S, hd]` → `[B, KV * n_rep, S, hd]`
fn repeat_kv(x: Tensor<4>, n_rep: usize) -> Tensor<4> {
    if n_rep == 1 {
        return x;
    }
    let [b, kv, s, hd] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .expand([b, kv, n_rep, s, hd])
        .reshape([b, kv * n_rep, s, hd])
}
