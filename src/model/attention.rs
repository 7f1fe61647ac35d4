//! Causal multi-head self-attention with grouped-query heads (Ainslie et al.
//! 2023) and RoPE, laid out as in Hugging Face Mixtral/Qwen2: separate
//! `q_proj`, `k_proj`, `v_proj` and `o_proj` (each optionally biased),
//! with an optional RMSNorm of the queries and keys before RoPE (`q_norm`,
//! `k_norm`: of each head, as Qwen3-MoE and GLM-4.5, or of the whole
//! projection, as OLMoE) and an optional clamp of q, k and v (OLMoE's
//! `clip_qkv`).

use super::rope::Rope;
use crate::config::{ModelConfig, QkNorm};
use crate::kernels;
use crate::nn::{apply, linear, norm, rms_norm};
use burn::nn::{Linear, RmsNorm};
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
    /// Query RMSNorm (`model.qk_norm`). `[head_dim]` per head, or
    /// `[n_heads * head_dim]` over the projection
    pub q_norm: Option<RmsNorm>,
    /// Key RMSNorm (`model.qk_norm`). `[head_dim]` per head, or
    /// `[n_kv_heads * head_dim]` over the projection
    pub k_norm: Option<RmsNorm>,
    #[module(skip)]
    n_heads: usize,
    #[module(skip)]
    n_kv_heads: usize,
    #[module(skip)]
    head_dim: usize,
    #[module(skip)]
    qk_norm: QkNorm,
    #[module(skip)]
    clip_qkv: Option<f64>,
    /// What q is multiplied by so that the attention's 1/√head_dim scale
    /// becomes `model.attention_multiplier`; none when that is unset.
    #[module(skip)]
    q_scale: Option<f64>,
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
            o_proj: linear(cfg.n_heads * hd, cfg.d_model, cfg.o_bias, std, device),
            q_norm: norm_width(cfg.qk_norm, hd, cfg.n_heads)
                .map(|w| rms_norm(w, cfg.rms_norm_eps, device)),
            k_norm: norm_width(cfg.qk_norm, hd, cfg.n_kv_heads)
                .map(|w| rms_norm(w, cfg.rms_norm_eps, device)),
            qk_norm: cfg.qk_norm,
            clip_qkv: cfg.clip_qkv,
            q_scale: cfg.attention_multiplier.map(|m| m * (hd as f64).sqrt()),
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
        // Heads stay sequence-major, [B, S, heads, hd]: a free reshape of
        // the projection's output.
        let split = |t: Tensor<3>, heads: usize| t.reshape([b, s, heads, hd]);
        let projection_norm = self.qk_norm == QkNorm::Projection;
        let per_head = self.qk_norm == QkNorm::PerHead;
        // Projections, the whole-projection norm, the clamp. [B, S, heads·hd]
        let project = |lin: &Linear, n: &Option<RmsNorm>| {
            let t = apply(lin, x.clone());
            let t = match n {
                Some(n) if projection_norm => norm(n, t),
                _ => t,
            };
            match self.clip_qkv {
                Some(c) => t.clamp(-c, c),
                None => t,
            }
        };
        let heads = |t: Tensor<3>, count: usize, n: &Option<RmsNorm>| {
            let t = split(t, count);
            match n {
                Some(n) if per_head => norm(n, t),
                _ => t,
            }
        };
        let q = rope.apply(heads(project(&self.q_proj, &self.q_norm), h, &self.q_norm)); // [B, S, H, hd]
                                                                                         // With `model.attention_multiplier`: scores = (c·q)·kᵀ/√hd = multiplier · q·kᵀ.
        let q = match self.q_scale {
            Some(c) => q.mul_scalar(c),
            None => q,
        };
        let k = rope.apply(heads(project(&self.k_proj, &self.k_norm), kv, &self.k_norm)); // [B, S, KV, hd]
        let v = split(project(&self.v_proj, &None), kv); // [B, S, KV, hd]
        let out = if kernels::attention_served(&q) {
            // f32 on the CPU or a GPU: one fused operation with its own
            // backward, reading the heads in place and each key/value head
            // for all its query heads without repeating it.
            kernels::causal_attention(q, k, v)
        } else {
            // Other dtypes (and very wide heads on a GPU): Burn's attention.
            let heads_first = |t: Tensor<4>| t.swap_dims(1, 2);
            let (k, v) = (
                repeat_kv(heads_first(k), h / kv),
                repeat_kv(heads_first(v), h / kv),
            );
            let options = AttentionModuleOptions {
                scale: None,
                softcap: None,
                is_causal: true,
            };
            attention(heads_first(q), k, v, None, None, options).swap_dims(1, 2)
        }; // [B, S, H, hd]
        apply(&self.o_proj, out.reshape([b, s, h * hd]))
    }
}

/// The width a q or k norm covers: a head, or all `heads` of the projection.
fn norm_width(kind: QkNorm, head_dim: usize, heads: usize) -> Option<usize> {
    match kind {
        QkNorm::None => None,
        QkNorm::PerHead => Some(head_dim),
        QkNorm::Projection => Some(head_dim * heads),
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

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    fn max_diff(a: Tensor<4>, b: Tensor<4>) -> f32 {
        (a - b).abs().max().into_scalar::<f32>()
    }

    /// The fused CPU attention (grouped key/value heads read in place)
    /// against Burn's attention on repeated key/value heads, in value and in
    /// the gradients of q, k and v.
    #[test]
    fn fused_grouped_attention_matches_burn_attention_and_its_gradients() {
        let device = Device::flex().autodiff();
        for (b, h, kv, s) in [(2, 4, 2, 37), (3, 6, 3, 130), (2, 2, 2, 16), (1, 4, 1, 200)] {
            let r = |heads| {
                Tensor::<4>::random([b, s, heads, 8], Distribution::Normal(0.0, 1.0), &device)
                    .require_grad()
            };
            let (q, k, v) = (r(h), r(kv), r(kv));
            let w = Tensor::<4>::random([b, s, h, 8], Distribution::Normal(0.0, 1.0), &device);
            let ours = kernels::causal_attention(q.clone(), k.clone(), v.clone());
            let options = AttentionModuleOptions {
                scale: None,
                softcap: None,
                is_causal: true,
            };
            // Burn's attention is heads-first: transpose in and out.
            let t = |x: Tensor<4>| x.swap_dims(1, 2);
            let (kr, vr) = (
                repeat_kv(t(k.clone()), h / kv),
                repeat_kv(t(v.clone()), h / kv),
            );
            let want = t(attention(t(q.clone()), kr, vr, None, None, options));
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
