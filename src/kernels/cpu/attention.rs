//! Causal grouped-query attention on the CPU, forward and backward.
//!
//! Tensors are row-major f32 in the sequence-major layout the projections
//! produce, so no head transposes are copied on the way in or out:
//! `q` and the output `[B, S, H, hd]`, `k, v: [B, S, KV, hd]`. The
//! probabilities `p: [B, H, S, S]` are kept for the backward, zero above the
//! diagonal. Query head i reads key/value head i / (H / KV) in place.
//!
//! One parallel task per batch row owns that row's outputs and gradients,
//! so the key and value gradients of heads that share a key/value head add
//! up without locks. Query positions go in blocks of [`BLOCK`]; each block's
//! products stop at its last key, so the masked upper triangle is neither
//! computed nor read (5/8 of the full products at S = 256).

use super::{self as cpu, Operand};
use rayon::prelude::*;

/// Query positions per block.
const BLOCK: usize = 64;

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

/// The query blocks `(first, end)` of a sequence of length `s`.
fn blocks(s: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..s)
        .step_by(BLOCK)
        .map(move |i0| (i0, (i0 + BLOCK).min(s)))
}

/// `c (+)= alpha · a · b` into a `[m, n]` block of `c` with row stride `ldc`.
#[allow(clippy::too_many_arguments)]
fn gemm(
    (m, k, n): (usize, usize, usize),
    a: Operand,
    b: Operand,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    alpha: f32,
    parallel: bool,
) {
    cpu::matmul_strided((m, k, n), a, b, (c, ldc), accumulate, alpha, parallel);
}

/// Whether the matmuls of one task should split across the pool: only when
/// there are fewer batch rows than threads to keep busy.
fn inner_parallel(b: usize) -> bool {
    b < rayon::current_num_threads()
}

/// Forward: the output `[B, S, H, hd]` and the probabilities `[B, H, S, S]`.
pub fn forward(q: &[f32], k: &[f32], v: &[f32], dims: Dims) -> (Vec<f32>, Vec<f32>) {
    let Dims { b, h, kv, s, hd } = dims;
    let rep = h / kv;
    let scale = 1.0 / (hd as f32).sqrt();
    // Row strides of the query-shaped and key-shaped tensors.
    let (qs, ks) = (h * hd, kv * hd);
    let par = inner_parallel(b);
    let mut o = cpu::zeros(b * s * qs);
    let mut p = cpu::zeros(b * h * s * s);
    o.par_chunks_mut(s * qs)
        .zip(p.par_chunks_mut(h * s * s))
        .enumerate()
        .for_each(|(bi, (o, p))| {
            let (qb, kb, vb) = (
                &q[bi * s * qs..(bi + 1) * s * qs],
                &k[bi * s * ks..(bi + 1) * s * ks],
                &v[bi * s * ks..(bi + 1) * s * ks],
            );
            for head in 0..h {
                let g = head / rep;
                let (qh, kh, vh) = (&qb[head * hd..], &kb[g * hd..], &vb[g * hd..]);
                let ph = &mut p[head * s * s..(head + 1) * s * s];
                for (i0, i1) in blocks(s) {
                    let rows = i1 - i0;
                    let pb = &mut ph[i0 * s..];
                    // scores = scale · q[i0..i1] · k[..i1]ᵀ
                    gemm(
                        (rows, hd, i1),
                        Operand::plain(&qh[i0 * qs..], qs),
                        Operand::transposed(kh, ks),
                        pb,
                        s,
                        false,
                        scale,
                        par,
                    );
                    for r in 0..rows {
                        cpu::softmax_prefix(&mut pb[r * s..r * s + i1], i0 + r + 1);
                    }
                    // o[i0..i1] = p[i0..i1, ..i1] · v[..i1]
                    gemm(
                        (rows, i1, hd),
                        Operand::plain(pb, s),
                        Operand::plain(vh, ks),
                        &mut o[i0 * qs + head * hd..],
                        qs,
                        false,
                        1.0,
                        par,
                    );
                }
            }
        });
    (o, p)
}

/// Backward: the gradients of q, k and v from the output gradient `dout`,
/// given the forward's output `o` and probabilities `p`.
#[allow(clippy::too_many_arguments)]
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
    let (qs, ks) = (h * hd, kv * hd);
    let par = inner_parallel(b);
    let mut dq = cpu::zeros(b * s * qs);
    let mut dk = cpu::zeros(b * s * ks);
    let mut dv = cpu::zeros(b * s * ks);
    dq.par_chunks_mut(s * qs)
        .zip(dk.par_chunks_mut(s * ks).zip(dv.par_chunks_mut(s * ks)))
        .enumerate()
        .for_each(|(bi, (dq, (dk, dv)))| {
            let qspan = bi * s * qs..(bi + 1) * s * qs;
            let kspan = bi * s * ks..(bi + 1) * s * ks;
            let (qb, ob, db) = (&q[qspan.clone()], &o[qspan.clone()], &dout[qspan]);
            let (kb, vb) = (&k[kspan.clone()], &v[kspan]);
            let mut ds = cpu::zeros(s * s);
            for head in 0..h {
                let g = head / rep;
                let (qh, oh, doh) = (&qb[head * hd..], &ob[head * hd..], &db[head * hd..]);
                let (kh, vh) = (&kb[g * hd..], &vb[g * hd..]);
                let ph = &p[(bi * h + head) * s * s..(bi * h + head + 1) * s * s];
                for (i0, i1) in blocks(s) {
                    let rows = i1 - i0;
                    let (pb, dsb) = (&ph[i0 * s..], &mut ds[i0 * s..]);
                    // dv[..i1] += p[i0..i1, ..i1]ᵀ · dout[i0..i1]
                    gemm(
                        (i1, rows, hd),
                        Operand::transposed(pb, s),
                        Operand::plain(&doh[i0 * qs..], qs),
                        &mut dv[g * hd..],
                        ks,
                        true,
                        1.0,
                        par,
                    );
                    // dp = dout[i0..i1] · v[..i1]ᵀ, into ds
                    gemm(
                        (rows, hd, i1),
                        Operand::plain(&doh[i0 * qs..], qs),
                        Operand::transposed(vh, ks),
                        dsb,
                        s,
                        false,
                        1.0,
                        par,
                    );
                    // ds = p ⊙ (dp − rowsum(dout ⊙ o)), times the score scale
                    for r in 0..rows {
                        let i = i0 + r;
                        let dot = cpu::dot(&doh[i * qs..i * qs + hd], &oh[i * qs..i * qs + hd]);
                        let row = &mut dsb[r * s..r * s + i1];
                        let prow = &pb[r * s..r * s + i1];
                        for (j, x) in row.iter_mut().enumerate() {
                            *x = if j <= i {
                                prow[j] * (*x - dot) * scale
                            } else {
                                0.0
                            };
                        }
                    }
                    // dq[i0..i1] = ds · k[..i1]
                    gemm(
                        (rows, i1, hd),
                        Operand::plain(dsb, s),
                        Operand::plain(kh, ks),
                        &mut dq[i0 * qs + head * hd..],
                        qs,
                        false,
                        1.0,
                        par,
                    );
                    // dk[..i1] += dsᵀ · q[i0..i1]
                    gemm(
                        (i1, rows, hd),
                        Operand::transposed(dsb, s),
                        Operand::plain(&qh[i0 * qs..], qs),
                        &mut dk[g * hd..],
                        ks,
                        true,
                        1.0,
                        par,
                    );
                }
            }
        });
    (dq, dk, dv)
}
