//! Router auxiliary losses, as pure functions of the routing decision.
//!
//! Every function takes a validity mask (1.0 for real tokens, 0.0 for padding)
//! and excludes padding from both numerator and denominator: padding tokens
//! would otherwise pull the balance statistics toward whatever the router
//! does on pad embeddings.

use burn::prelude::*;

/// Switch Transformer load-balancing loss (Fedus et al. 2021) with the
/// Megatron-Core normalisation:
///
/// ```text
/// L = E · Σ_e f_e · P_e
/// f_e = (1 / (N·k)) Σ_t valid_t · routed_{t,e}     fraction of assignments to e
/// P_e = (1 / N)     Σ_t valid_t · p_{t,e}          mean router probability of e
/// N   = Σ_t valid_t
/// ```
///
/// A perfectly balanced router gives 1.0; all tokens sent to the same k
/// experts with probability 1/k each gives E/k. Gradients flow through P only.
///
/// # Shapes
/// - `probs`, `routing_map`: `[T, E]`; `valid`: `[T]`; returns `[1]`
pub fn switch_load_balancing_loss(
    probs: Tensor<2>,
    routing_map: Tensor<2>,
    valid: Tensor<1>,
    top_k: usize,
) -> Tensor<1> {
    let [t, e] = probs.dims();
    let n = valid.clone().sum(); // [1]
    let routed = (routing_map.detach() * valid.clone().reshape([t, 1]))
        .sum_dim(0)
        .reshape([e]); // [E]
    balance_loss(routed, n, mean_probs(probs, valid), top_k)
}

/// `P_e`: the mean router probability of each expert over real tokens.
///
/// # Shapes
/// - `probs`: `[T, E]`; `valid`: `[T]`; returns `[E]`
pub fn mean_probs(probs: Tensor<2>, valid: Tensor<1>) -> Tensor<1> {
    let [t, e] = probs.dims();
    let n = valid.clone().sum().clamp_min(1.0); // [1]
    ((probs * valid.reshape([t, 1])).sum_dim(0).reshape([e]) / n).reshape([e])
}

/// `E · Σ_e f_e · P_e` with `f_e = routed_e / (k · tokens)`, from counts:
/// `routed` the assignments per expert and `tokens` the real tokens they
/// came from, both without gradient; `p` the mean probabilities, with it.
///
/// The global-batch balance loss (`moe.balance_scope = "global_batch"`;
/// Qiu et al. 2025, "Demons in the Detail"; Megatron-Core's
/// `global_aux_loss`) is this function fed with the counts of every
/// micro-batch of the optimizer step so far, while `p` stays the current
/// micro-batch's: micro-batch m of a step contributes
///
/// ```text
/// L_m = E · Σ_e f_e^(≤m) · P_e^(m)
/// f_e^(≤m) = Σ_{j≤m} routed_{j,e} / (k · Σ_{j≤m} N_j)
/// ```
///
/// so the last micro-batch sees the whole batch's `f_e`, and a micro-batch
/// may route unevenly as long as the batch as a whole does not.
///
/// # Shapes
/// - `routed`, `p`: `[E]`; `tokens`: `[1]`; returns `[1]`
pub fn balance_loss(routed: Tensor<1>, tokens: Tensor<1>, p: Tensor<1>, top_k: usize) -> Tensor<1> {
    let [e] = p.dims();
    let f = routed.detach() / tokens.detach().clamp_min(1.0).mul_scalar(top_k as f32); // [E]
    (f * p).sum().mul_scalar(e as f32)
}

/// Sequence-level balance loss (DeepSeek-V2/V3): the Switch loss computed on
/// each sequence separately, then averaged over sequences that hold at least
/// one real token.
///
/// # Shapes
/// - `probs`, `routing_map`: `[B, S, E]`; `valid`: `[B, S]`; returns `[1]`
pub fn sequence_load_balancing_loss(
    probs: Tensor<3>,
    routing_map: Tensor<3>,
    valid: Tensor<2>,
    top_k: usize,
) -> Tensor<1> {
    let [b, _, e] = probs.dims();
    let n = valid.clone().sum_dim(1); // [B, 1]
    let has_tokens = n.clone().greater_elem(0.0).float(); // [B, 1]
    let n = n.clamp_min(1.0).unsqueeze_dim::<3>(2); // [B, 1, 1]
    let valid = valid.unsqueeze_dim::<3>(2); // [B, S, 1]
    let f = (routing_map.detach() * valid.clone()).sum_dim(1) / n.clone().mul_scalar(top_k as f32); // [B, 1, E]
    let p = (probs * valid).sum_dim(1) / n; // [B, 1, E]
    let per_seq = (f * p).sum_dim(2).reshape([b, 1]).mul_scalar(e as f32); // [B, 1]
    (per_seq * has_tokens.clone()).sum() / has_tokens.sum().clamp_min(1.0)
}

/// Router z-loss (Zoph et al. 2022, ST-MoE): the mean over real tokens of
/// the squared log-partition function, `(1/N) Σ_t valid_t · (logsumexp_e x_{t,e})²`.
/// It keeps router logits small, which keeps the softmax numerically tame.
///
/// # Shapes
/// - `logits`: `[T, E]`; `valid`: `[T]`; returns `[1]`
pub fn router_z_loss(logits: Tensor<2>, valid: Tensor<1>) -> Tensor<1> {
    let lse = logsumexp(logits).reshape([-1]); // [T]
    let n = valid.clone().sum().clamp_min(1.0);
    (lse.square() * valid).sum() / n
}

/// Numerically stable log-sum-exp over the last dimension.
///
/// # Shapes
/// - `x`: `[T, E]` → `[T, 1]`
pub fn logsumexp(x: Tensor<2>) -> Tensor<2> {
    let m = x.clone().max_dim(1).detach(); // [T, 1]
    (x - m.clone()).exp().sum_dim(1).log() + m
}

/// Mean router entropy in nats over real tokens, `-(1/N) Σ_t valid_t Σ_e p log p`.
///
/// # Shapes
/// - `probs`: `[T, E]`; `valid`: `[T]`; returns `[1]`
pub fn router_entropy(probs: Tensor<2>, valid: Tensor<1>) -> Tensor<1> {
    let plogp = probs.clone() * probs.clamp_min(1e-20).log();
    let h = plogp.sum_dim(1).reshape([-1]).neg(); // [T]
    (h * valid.clone()).sum() / valid.sum().clamp_min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t2(rows: &[&[f32]]) -> Tensor<2> {
        let (r, c) = (rows.len(), rows[0].len());
        let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_data(TensorData::new(flat, [r, c]), &Device::flex())
    }
    fn t1(v: &[f32]) -> Tensor<1> {
        Tensor::from_data(TensorData::new(v.to_vec(), [v.len()]), &Device::flex())
    }
    fn scalar(x: Tensor<1>) -> f32 {
        x.into_data().try_to_vec::<f32>().unwrap()[0]
    }

    #[test]
    fn balanced_routing_gives_one() {
        // E = 4, k = 1, four tokens each to a different expert, uniform probs.
        let probs = t2(&[&[0.25; 4], &[0.25; 4], &[0.25; 4], &[0.25; 4]]);
        let map = t2(&[
            &[1., 0., 0., 0.],
            &[0., 1., 0., 0.],
            &[0., 0., 1., 0.],
            &[0., 0., 0., 1.],
        ]);
        let l = scalar(switch_load_balancing_loss(probs, map, t1(&[1.; 4]), 1));
        assert!((l - 1.0).abs() < 1e-6, "{l}");
    }

    #[test]
    fn collapsed_routing_gives_e_over_k() {
        // E = 4, k = 2: every token picks experts 0 and 1 with 1/2 each.
        // f = (1/2, 1/2, 0, 0), P = (1/2, 1/2, 0, 0) → 4 · (1/4 + 1/4) = 2 = E/k.
        let row: &[f32] = &[0.5, 0.5, 0.0, 0.0];
        let map_row: &[f32] = &[1., 1., 0., 0.];
        let probs = t2(&[row, row, row]);
        let map = t2(&[map_row, map_row, map_row]);
        let l = scalar(switch_load_balancing_loss(probs, map, t1(&[1.; 3]), 2));
        assert!((l - 2.0).abs() < 1e-6, "{l}");
    }

    #[test]
    fn hand_computed_switch_loss() {
        // E = 2, k = 1, T = 2.
        // token 0: p = (0.7, 0.3) → e0; token 1: p = (0.6, 0.4) → e0.
        // f = (1, 0); P = (0.65, 0.35); L = 2 · (1 · 0.65) = 1.3
        let probs = t2(&[&[0.7, 0.3], &[0.6, 0.4]]);
        let map = t2(&[&[1., 0.], &[1., 0.]]);
        let l = scalar(switch_load_balancing_loss(probs, map, t1(&[1., 1.]), 1));
        assert!((l - 1.3).abs() < 1e-6, "{l}");
    }

    #[test]
    fn padding_is_excluded() {
        // The balanced batch of `balanced_routing_gives_one`, plus two padding
        // tokens that all went to expert 0 with certainty: still exactly 1.0.
        let probs = t2(&[
            &[0.25; 4],
            &[0.25; 4],
            &[0.25; 4],
            &[0.25; 4],
            &[1., 0., 0., 0.],
            &[1., 0., 0., 0.],
        ]);
        let map = t2(&[
            &[1., 0., 0., 0.],
            &[0., 1., 0., 0.],
            &[0., 0., 1., 0.],
            &[0., 0., 0., 1.],
            &[1., 0., 0., 0.],
            &[1., 0., 0., 0.],
        ]);
        let valid = t1(&[1., 1., 1., 1., 0., 0.]);
        let l = scalar(switch_load_balancing_loss(probs, map, valid.clone(), 1));
        assert!((l - 1.0).abs() < 1e-6, "{l}");

        // z-loss: padding rows with huge logits do not count.
        let logits = t2(&[&[0.0, 0.0], &[0.0, 0.0], &[50.0, 50.0]]);
        let z = scalar(router_z_loss(logits, t1(&[1., 1., 0.])));
        let want = (2f32.ln()).powi(2);
        assert!((z - want).abs() < 1e-6, "{z} vs {want}");
    }

    #[test]
    fn z_loss_hand_computed() {
        // Rows (0, 0) and (1, 2): lse = ln 2 and ln(e + e²).
        let logits = t2(&[&[0.0, 0.0], &[1.0, 2.0]]);
        let z = scalar(router_z_loss(logits, t1(&[1., 1.])));
        let a = 2f64.ln();
        let b = (1f64.exp() + 2f64.exp()).ln();
        let want = ((a * a + b * b) / 2.0) as f32;
        assert!((z - want).abs() < 1e-5, "{z} vs {want}");
    }

    #[test]
    fn sequence_loss_averages_per_sequence() {
        // Sequence 0 balanced (loss 1); sequence 1 collapsed on expert 0 with
        // p = 1 (f = (1, 0), P = (1, 0) → 2); sequence 2 all padding (ignored).
        let d = Device::flex();
        let probs = Tensor::<1>::from_data(
            TensorData::new(
                vec![0.5f32, 0.5, 0.5, 0.5, 1., 0., 1., 0., 1., 0., 1., 0.],
                [12],
            ),
            &d,
        )
        .reshape([3, 2, 2]);
        let map = Tensor::<1>::from_data(
            TensorData::new(vec![1f32, 0., 0., 1., 1., 0., 1., 0., 1., 0., 1., 0.], [12]),
            &d,
        )
        .reshape([3, 2, 2]);
        let valid =
            Tensor::<1>::from_data(TensorData::new(vec![1f32, 1., 1., 1., 0., 0.], [6]), &d)
                .reshape([3, 2]);
        let l = scalar(sequence_load_balancing_loss(probs, map, valid, 1));
        assert!((l - 1.5).abs() < 1e-6, "{l}");
    }

    #[test]
    fn entropy_of_uniform_is_ln_e() {
        let probs = t2(&[&[0.25; 4], &[1., 0., 0., 0.]]);
        let h = scalar(router_entropy(probs, t1(&[1., 0.])));
        assert!((h - 4f32.ln()).abs() < 1e-6, "{h}");
    }
}
