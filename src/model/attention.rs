//! Causal multi-head self-attention with grouped-query heads (Ainslie et al.
//! 2023) and RoPE, laid out as in Hugging Face Mixtral/Qwen2: separate
//! `q_proj`, `k_proj`, `v_proj` (optionally biased) and a bias-free `o_proj`.

use super::mlp::{apply, linear};
use super::rope::Rope;
use crate::config::ModelConfig;
use crate::kernels::{self, causal_softmax, fused_on, on_cpu};
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
        let q = rope.apply(split(apply(&self.q_proj, x.clone()), h)); // [B, H, S, hd]
        let k = rope.apply(split(apply(&self.k_proj, x.clone()), kv)); // [B, KV, S, hd]
        let v = split(apply(&self.v_proj, x), kv); // [B, KV, S, hd]
        let out = if fused_on(&q.device(), q.dtype()) {
            // CPU, f32: one fused operation with its own backward, reading
            // each key/value head for its query heads without repeating it.
            kernels::causal_attention(q, k, v)
        } else if on_cpu(&q.device()) {
            let (k, v) = (repeat_kv(k, h / kv), repeat_kv(v, h / kv));
            causal_attention(q, k, v)
        } else {
            let (k, v) = (repeat_kv(k, h / kv), repeat_kv(v, h / kv));
            // GPU backends: Burn's attention, the path the GPU figures in the
            // README were measured on.
            let options = AttentionModuleOptions {
                scale: None,
                softcap: None,
                is_causal: true,
            };
            attention(q, k, v, None, None, options)
        }; // [B, H, S, hd]
        apply(&self.o_proj, out.swap_dims(1, 2).reshape([b, s, h * hd]))
    }
}

/// softmax(q kᵀ / √hd + causal) v, written out so that training builds as
/// few `[B, H, S, S]` intermediates as possible: the scale is folded into q
/// (S times smaller than the scores), and the causal mask and the softmax
/// are one fused operation with its own backward ([`causal_softmax`]).
/// Burn's `attention` under autodiff decomposes into more full-size
/// operations (scaling, mask fill, NaN guards, the softmax's parts), each
/// with its own backward.
///
/// # Shapes
/// - `q`, `k`, `v`: `[B, H, S, hd]` → `[B, H, S, hd]`
pub fn causal_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
    let [b, h, s, hd] = q.dims();
    let q = q.mul_scalar(1.0 / (hd as f64).sqrt());
    // Query blocks see only the keys up to their last position, so the
    // upper triangle of the score matrix is mostly never built: with n
    // blocks, (n + 1) / 2n of it is (attention forward + backward 42%
    // faster on the CPU backend, the only one `Attention` uses this on).
    let blocks = attention_blocks(s);
    let mut outs = Vec::with_capacity(blocks);
    for i in 0..blocks {
        let (q0, q1) = (i * s / blocks, (i + 1) * s / blocks);
        let qi = q.clone().slice([0..b, 0..h, q0..q1, 0..hd]);
        let (ki, vi) = if q1 == s {
            (k.clone(), v.clone())
        } else {
            (
                k.clone().slice([0..b, 0..h, 0..q1, 0..hd]),
                v.clone().slice([0..b, 0..h, 0..q1, 0..hd]),
            )
        };
        // Row r is query q0 + r, which sees keys 0..=q0 + r.
        let scores = qi.matmul(ki.swap_dims(2, 3)); // [B, H, q1-q0, q1]
        outs.push(causal_softmax(scores, q0).matmul(vi));
    }
    if outs.len() == 1 {
        outs.pop().unwrap()
    } else {
        Tensor::cat(outs, 2)
    }
}

/// How many query blocks [`causal_attention`] uses for length `s`.
fn attention_blocks(s: usize) -> usize {
    (s / ATTENTION_BLOCK).clamp(1, MAX_ATTENTION_BLOCKS)
}

/// Query rows per block of [`causal_attention`] (at least), and the most blocks.
const ATTENTION_BLOCK: usize = 64;
const MAX_ATTENTION_BLOCKS: usize = 4;

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

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    fn max_diff(a: Tensor<4>, b: Tensor<4>) -> f32 {
        (a - b).abs().max().into_scalar::<f32>()
    }

    /// The blocked causal attention against Burn's own (unblocked) one, in
    /// value and in the gradients of q, k and v, at lengths that give 1, 3
    /// (uneven) and 4 blocks.
    #[test]
    fn blocked_causal_attention_matches_burn_attention_and_its_gradients() {
        let device = Device::flex().autodiff();
        for (s, blocks) in [(40, 1), (200, 3), (256, 4)] {
            assert_eq!(attention_blocks(s), blocks);
            let r = || {
                Tensor::<4>::random([2, 3, s, 8], Distribution::Normal(0.0, 1.0), &device)
                    .require_grad()
            };
            let (q, k, v) = (r(), r(), r());
            let w = Tensor::<4>::random([2, 3, s, 8], Distribution::Normal(0.0, 1.0), &device);
            let ours = causal_attention(q.clone(), k.clone(), v.clone());
            let options = AttentionModuleOptions {
                scale: None,
                softcap: None,
                is_causal: true,
            };
            let want = attention(q.clone(), k.clone(), v.clone(), None, None, options);
            assert!(
                max_diff(ours.clone(), want.clone()) < 1e-5,
                "values differ at S = {s}"
            );
            let g1 = (ours * w.clone()).sum().backward();
            let g2 = (want * w).sum().backward();
            for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
                let (a, b) = (x.grad(&g1).unwrap(), x.grad(&g2).unwrap());
                let d = (a - b).abs().max().into_scalar::<f32>();
                assert!(d < 1e-4, "grad of {name} differs by {d} at S = {s}");
            }
        }
    }

    /// The fused CPU attention (grouped key/value heads read in place)
    /// against Burn's attention on repeated key/value heads, in value and in
    /// the gradients of q, k and v.
    #[test]
    fn fused_grouped_attention_matches_burn_attention_and_its_gradients() {
        let device = Device::flex().autodiff();
        for (h, kv, s) in [(4, 2, 37), (6, 3, 130), (2, 2, 16)] {
            let r = |heads| {
                Tensor::<4>::random([2, heads, s, 8], Distribution::Normal(0.0, 1.0), &device)
                    .require_grad()
            };
            let (q, k, v) = (r(h), r(kv), r(kv));
            let w = Tensor::<4>::random([2, h, s, 8], Distribution::Normal(0.0, 1.0), &device);
            let ours = kernels::causal_attention(q.clone(), k.clone(), v.clone());
            let options = AttentionModuleOptions {
                scale: None,
                softcap: None,
                is_causal: true,
            };
            let (kr, vr) = (repeat_kv(k.clone(), h / kv), repeat_kv(v.clone(), h / kv));
            let want = attention(q.clone(), kr, vr, None, None, options);
            let d = max_diff(ours.clone(), want.clone());
            assert!(
                d < 1e-5,
                "values differ by {d} at H = {h}, KV = {kv}, S = {s}"
            );
            let g1 = (ours * w.clone()).sum().backward();
            let g2 = (want * w).sum().backward();
            for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
                let (a, b) = (x.grad(&g1).unwrap(), x.grad(&g2).unwrap());
                let d = (a - b).abs().max().into_scalar::<f32>();
                assert!(
                    d < 1e-4,
                    "grad of {name} differs by {d} at H = {h}, KV = {kv}, S = {s}"
                );
            }
        }
    }
}
