//! Causal grouped-query attention on the CPU, forward and backward, one
//! parallel task per (batch, key/value head). Each task runs the query heads
//! that share its key/value head, so their key and value gradients add up in
//! one place without locks, and no repeated key/value copies are made.
//!
//! All tensors are row-major f32: `q: [B, H, S, hd]`, `k, v: [B, KV, S, hd]`,
//! the probabilities `p: [B, H, S, S]` (zero above the diagonal).

use super::cpu::{self, Operand};
use rayon::prelude::*;

/// Shapes of one call.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    /// Batch.
    pub b: usize,
    /// Query heads.
    pub h: usize,
    /// Key/value heads (dividing `h`).
    pub kv: usize,
    /// Sequence length.
    pub s: usize,
    /// Head width.
    pub hd: usize,
}

/// `c (+)= alpha · a · b` on one thread, operands given as (data, row
/// stride, column stride): the callers run many of these in parallel.
#[allow(clippy::too_many_arguments)]
fn gemm(
    m: usize,
    k: usize,
    n: usize,
    a: (&[f32], usize, usize),
    b: (&[f32], usize, usize),
    c: &mut [f32],
    accumulate: bool,
    alpha: f32,
) {
    fn operand((data, rs, cs): (&[f32], usize, usize)) -> Operand<'_> {
        if cs == 1 {
            Operand::plain(data, rs)
        } else {
            assert_eq!(rs, 1, "attention operands are plain or transposed");
            Operand::transposed(data, cs)
        }
    }
    cpu::matmul(
        (m, k, n),
        operand(a),
        operand(b),
        c,
        accumulate,
        alpha,
        false,
    );
}

/// Forward: the output `[B, H, S, hd]` and the probabilities `[B, H, S, S]`.
pub fn forward(q: &[f32], k: &[f32], v: &[f32], dims: Dims) -> (Vec<f32>, Vec<f32>) {
    let Dims { b, h, kv, s, hd } = dims;
    let rep = h / kv;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut o = vec![0.0; b * h * s * hd];
    let mut p = vec![0.0; b * h * s * s];
    // One task per (batch, kv head): `rep` consecutive query heads.
    o.par_chunks_mut(rep * s * hd)
        .zip(p.par_chunks_mut(rep * s * s))
        .enumerate()
        .for_each(|(task, (o, p))| {
            let kv_off = task * s * hd;
            let (kh, vh) = (&k[kv_off..kv_off + s * hd], &v[kv_off..kv_off + s * hd]);
            for r in 0..rep {
                let qh_off = (task * rep + r) * s * hd;
                let qh = &q[qh_off..qh_off + s * hd];
                let ph = &mut p[r * s * s..(r + 1) * s * s];
                // scores = scale · q kᵀ, then the causal softmax in place.
                gemm(s, hd, s, (qh, hd, 1), (kh, 1, hd), ph, false, scale);
                let scores = ph.to_vec();
                cpu::causal_softmax_forward(&scores, ph, s, s, 0);
                let oh = &mut o[r * s * hd..(r + 1) * s * hd];
                gemm(s, s, hd, (ph, s, 1), (vh, hd, 1), oh, false, 1.0);
            }
        });
    (o, p)
}

/// Backward: the gradients of q, k and v from the output gradient `dout`,
/// given the forward's output `o` and probabilities `p`.
pub fn backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    p: &[f32],
    dout: &[f32],
    dims: Dims,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let Dims { b, h, kv, s, hd } = dims;
    let rep = h / kv;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut dq = vec![0.0; b * h * s * hd];
    let mut dk = vec![0.0; b * kv * s * hd];
    let mut dv = vec![0.0; b * kv * s * hd];
    dq.par_chunks_mut(rep * s * hd)
        .zip(dk.par_chunks_mut(s * hd).zip(dv.par_chunks_mut(s * hd)))
        .enumerate()
        .for_each(|(task, (dq, (dk, dv)))| {
            let kv_off = task * s * hd;
            let (kh, vh) = (&k[kv_off..kv_off + s * hd], &v[kv_off..kv_off + s * hd]);
            let mut ds = vec![0.0; s * s];
            for r in 0..rep {
                let head = task * rep + r;
                let span = head * s * hd..(head + 1) * s * hd;
                let (qh, oh, doh) = (&q[span.clone()], &o[span.clone()], &dout[span]);
                let ph = &p[head * s * s..(head + 1) * s * s];
                // dv += pᵀ · dout
                gemm(s, s, hd, (ph, 1, s), (doh, hd, 1), dv, r > 0, 1.0);
                // dp = dout · vᵀ, into ds
                gemm(s, hd, s, (doh, hd, 1), (vh, 1, hd), &mut ds, false, 1.0);
                // ds = p ⊙ (dp − rowsum(dout ⊙ o)), times the score scale
                for i in 0..s {
                    let span = i * hd..(i + 1) * hd;
                    let dot = cpu::dot(&doh[span.clone()], &oh[span]);
                    let row = &mut ds[i * s..(i + 1) * s];
                    let prow = &ph[i * s..(i + 1) * s];
                    for (j, x) in row.iter_mut().enumerate() {
                        *x = if j <= i {
                            prow[j] * (*x - dot) * scale
                        } else {
                            0.0
                        };
                    }
                }
                // dq = ds · k; dk += dsᵀ · q
                let dqh = &mut dq[r * s * hd..(r + 1) * s * hd];
                gemm(s, s, hd, (&ds, s, 1), (kh, hd, 1), dqh, false, 1.0);
                gemm(s, s, hd, (&ds, 1, s), (qh, hd, 1), dk, r > 0, 1.0);
            }
        });
    (dq, dk, dv)
}
