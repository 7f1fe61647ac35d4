//! The LM head and next-token cross-entropy as one operation on the CPU:
//! `loss = Σ_i r_i · cross_entropy(x_i · w, t_i)` with `x: [N, d]`,
//! `w: [d, V]` and row weights `r` (the loss mask).
//!
//! Rows go in chunks whose `[rows, V]` logits stay in cache: each chunk's
//! logits are made, used and dropped, so the full `[N, V]` logits (32 MiB
//! at N = 2048, V = 4096, more than the last-level cache) are never written
//! to memory nor read back. Because the loss is one scalar, its gradients
//! are known up to that scalar's own gradient while a chunk's logits are
//! still in cache: the forward computes them, and the backward only scales
//! them. That is three matmuls over the logits in all, as for an unfused
//! head, and no second pass over them.

use super::{self as cpu, exp, lane_max, lane_sum, rows_per_task};
use rayon::prelude::*;

/// Logit values per chunk: 4 MiB of f32, which leaves room in a shared
/// last-level cache for the chunk's gradient and the weight.
const CHUNK_VALUES: usize = 1 << 20;

/// Rows per chunk for a vocabulary of `v`.
pub fn chunk_rows(v: usize) -> usize {
    (CHUNK_VALUES / v.max(1)).max(8)
}

/// Shapes of one call.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    /// Rows.
    pub n: usize,
    /// Model width.
    pub d: usize,
    /// Vocabulary.
    pub v: usize,
    /// Rows per chunk ([`chunk_rows`] outside tests).
    pub chunk: usize,
}

/// `logits = x[r0..r1] · w` into `buf`.
fn logits(x: &[f32], w: &[f32], (r0, r1): (usize, usize), dims: Dims, buf: &mut [f32]) {
    let Dims { d, v, .. } = dims;
    cpu::linear(&x[r0 * d..r1 * d], w, (r1 - r0, d, v), buf);
}

fn chunks(dims: Dims) -> impl Iterator<Item = (usize, usize)> {
    let Dims { n, chunk, .. } = dims;
    (0..n)
        .step_by(chunk.max(1))
        .map(move |r0| (r0, (r0 + chunk).min(n)))
}

/// The weighted loss `Σ r_i nll_i` alone.
///
/// # Panics
/// If a target is outside `0..V`.
pub fn loss(x: &[f32], w: &[f32], targets: &[i64], r: &[f32], dims: Dims) -> f32 {
    weighted_sum(&row_losses(x, w, targets, dims), r)
}

/// Each row's loss `nll_i` (`[N]`), the logits made chunk by chunk as for
/// [`loss`].
///
/// # Panics
/// If a target is outside `0..V`.
pub fn row_losses(x: &[f32], w: &[f32], targets: &[i64], dims: Dims) -> Vec<f32> {
    let Dims { n, v, chunk, .. } = dims;
    let (mut nll, mut lse) = (cpu::zeros(n), cpu::zeros(n));
    let mut buf = cpu::zeros(chunk.min(n) * v);
    for (r0, r1) in chunks(dims) {
        let buf = &mut buf[..(r1 - r0) * v];
        logits(x, w, (r0, r1), dims, buf);
        let (nll, lse) = (&mut nll[r0..r1], &mut lse[r0..r1]);
        cross_entropy_forward(buf, &targets[r0..r1], v, nll, lse);
    }
    nll
}

/// `Σ r_i nll_i`, in f64.
fn weighted_sum(nll: &[f32], r: &[f32]) -> f32 {
    nll.iter()
        .zip(r)
        .map(|(&l, &r)| l as f64 * r as f64)
        .sum::<f64>() as f32
}

/// The weighted loss `Σ r_i nll_i` and its gradients with respect to x
/// (`[N, d]`) and w (`[d, V]`).
///
/// # Panics
/// If a target is outside `0..V`.
pub fn loss_and_grads(
    x: &[f32],
    w: &[f32],
    targets: &[i64],
    r: &[f32],
    dims: Dims,
) -> (f32, Vec<f32>, Vec<f32>) {
    let Dims { n, d, v, chunk } = dims;
    let (mut nll, mut lse) = (cpu::zeros(n), cpu::zeros(n));
    let mut dx = cpu::zeros(n * d);
    let mut dw = cpu::zeros(d * v);
    let rows = chunk.min(n);
    let (mut buf, mut dlogits) = (cpu::zeros(rows * v), cpu::zeros(rows * v));
    for (i, (r0, r1)) in chunks(dims).enumerate() {
        let m = r1 - r0;
        let (buf, dl) = (&mut buf[..m * v], &mut dlogits[..m * v]);
        logits(x, w, (r0, r1), dims, buf);
        let (t, lse) = (&targets[r0..r1], &mut lse[r0..r1]);
        cross_entropy_forward(buf, t, v, &mut nll[r0..r1], lse);
        // dlogits = r_i (softmax - onehot), row by row
        cross_entropy_backward(buf, t, lse, &r[r0..r1], v, dl);
        // dx = dlogits · wᵀ; dw += xᵀ · dlogits
        let (xc, dxc) = (&x[r0 * d..r1 * d], &mut dx[r0 * d..r1 * d]);
        cpu::linear_backward(xc, w, dl, (m, d, v), dxc, &mut dw, i > 0);
    }
    (weighted_sum(&nll, r), dx, dw)
}

/// Per-row cross-entropy `loss = logsumexp(row) - row[target]`, with the
/// log-sum-exp kept for the backward pass. `logits` is `[n, v]`.
///
/// # Panics
/// If a target is outside `0..v`.
pub fn cross_entropy_forward(
    logits: &[f32],
    targets: &[i64],
    v: usize,
    loss: &mut [f32],
    lse: &mut [f32],
) {
    let per = rows_per_task(v);
    loss.par_chunks_mut(per)
        .zip(lse.par_chunks_mut(per))
        .zip(logits.par_chunks(per * v).zip(targets.par_chunks(per)))
        .for_each(|((loss, lse), (logits, targets))| {
            let mut e = vec![0.0f32; v];
            for (i, row) in logits.chunks(v).enumerate() {
                let t = check_target(targets[i], v);
                let max = lane_max(row);
                // The exponentials into a scratch row first: a map
                // vectorises where a sum over exp does not.
                for (e, &x) in e.iter_mut().zip(row) {
                    *e = exp(x - max);
                }
                let sum = lane_sum(&e, |p| p);
                lse[i] = max + sum.ln();
                loss[i] = lse[i] - row[t];
            }
        });
}

/// Gradient of [`cross_entropy_forward`]: row i of `dlogits` is
/// `g[i] (softmax(row) - onehot(target))`.
pub fn cross_entropy_backward(
    logits: &[f32],
    targets: &[i64],
    lse: &[f32],
    g: &[f32],
    v: usize,
    dlogits: &mut [f32],
) {
    let per = rows_per_task(v);
    dlogits
        .par_chunks_mut(per * v)
        .zip(logits.par_chunks(per * v))
        .enumerate()
        .for_each(|(task, (d, logits))| {
            for (j, (d, row)) in d.chunks_mut(v).zip(logits.chunks(v)).enumerate() {
                let i = task * per + j;
                let (gi, lse) = (g[i], lse[i]);
                for (d, &x) in d.iter_mut().zip(row) {
                    *d = gi * exp(x - lse);
                }
                d[check_target(targets[i], v)] -= gi;
            }
        });
}

fn check_target(t: i64, v: usize) -> usize {
    assert!(
        (0..v as i64).contains(&t),
        "cross-entropy target {t} is outside the vocabulary 0..{v}"
    );
    t as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: f32) -> Vec<f32> {
        (0..len).map(|i| ((i as f32 + 1.0) * seed).sin()).collect()
    }

    /// Chunking changes only the order of the weight-gradient sums: one
    /// chunk and uneven chunks of 3 agree, the loss matches a direct f64
    /// computation, and so do both gradients.
    #[test]
    fn chunks_agree_with_one_pass_and_with_f64() {
        let (n, d, v) = (10, 4, 7);
        let (x, w) = (data(n * d, 0.37), data(d * v, 0.53));
        let targets: Vec<i64> = (0..n as i64).map(|i| (i * 3) % v as i64).collect();
        let r: Vec<f32> = (0..n).map(|i| if i % 4 == 3 { 0.0 } else { 0.5 }).collect();
        let whole = Dims { n, d, v, chunk: n };
        let split = Dims { chunk: 3, ..whole };
        // f64 reference: loss, dlogits = r (softmax - onehot), dx, dw.
        let (mut want, mut dx, mut dw) = (0.0f64, vec![0.0f64; n * d], vec![0.0f64; d * v]);
        for i in 0..n {
            let row: Vec<f64> = (0..v)
                .map(|j| {
                    (0..d)
                        .map(|k| x[i * d + k] as f64 * w[k * v + j] as f64)
                        .sum()
                })
                .collect();
            let z: f64 = row.iter().map(|l| l.exp()).sum();
            want += r[i] as f64 * (z.ln() - row[targets[i] as usize]);
            for j in 0..v {
                let onehot = if j == targets[i] as usize { 1.0 } else { 0.0 };
                let g = r[i] as f64 * (row[j].exp() / z - onehot);
                for k in 0..d {
                    dx[i * d + k] += g * w[k * v + j] as f64;
                    dw[k * v + j] += g * x[i * d + k] as f64;
                }
            }
        }
        for dims in [whole, split] {
            assert!((loss(&x, &w, &targets, &r, dims) as f64 - want).abs() < 1e-5);
            let (l, gx, gw) = loss_and_grads(&x, &w, &targets, &r, dims);
            assert!((l as f64 - want).abs() < 1e-5, "{l} vs {want}");
            for (a, b) in gx.iter().zip(&dx).chain(gw.iter().zip(&dw)) {
                assert!((*a as f64 - b).abs() < 1e-5, "{a} vs {b}");
            }
        }
    }

    #[test]
    fn cross_entropy_is_logsumexp_minus_the_target_logit() {
        let logits = [1.0f32, 2.0, 3.0, -1.0, 0.5, 0.0];
        let mut loss = [0.0f32; 2];
        let mut lse = [0.0f32; 2];
        cross_entropy_forward(&logits, &[2, 0], 3, &mut loss, &mut lse);
        let l0 = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln() - 3.0;
        let l1 = ((-1f64).exp() + 0.5f64.exp() + 1.0).ln() + 1.0;
        assert!((loss[0] as f64 - l0).abs() < 1e-6);
        assert!((loss[1] as f64 - l1).abs() < 1e-6);
    }

    #[test]
    #[should_panic(expected = "outside the vocabulary")]
    fn cross_entropy_rejects_a_target_outside_the_vocabulary() {
        cross_entropy_forward(&[0.0; 3], &[3], 3, &mut [0.0], &mut [0.0]);
    }
}
