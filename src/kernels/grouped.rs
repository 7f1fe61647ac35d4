//! Grouped SwiGLU experts on the CPU: the tokens of each expert sit in one
//! contiguous run of rows, and every projection is one matmul per expert
//! over exactly its rows, with no padding slots. Burn has no grouped matmul,
//! and building one from slices of the stacked weights would give each
//! expert a full-size weight gradient in the backward pass; here each
//! expert's weight gradient is written into its own block.
//!
//! All matrices are row-major f32 slices. With `x: [N, d]`, rows
//! `offsets[e]..offsets[e + 1]` belong to expert e, and the weights are
//! stacked `gate, up: [E, d, F]` and `down: [E, F, d]`.

use super::cpu::{self, Operand};

/// `c (+)= a · b` over the whole rayon pool.
fn matmul(m: usize, k: usize, n: usize, a: Operand, b: Operand, c: &mut [f32], accumulate: bool) {
    cpu::matmul((m, k, n), a, b, c, accumulate, 1.0, true);
}

fn plain(data: &[f32], cols: usize) -> Operand<'_> {
    Operand::plain(data, cols)
}

fn transposed(data: &[f32], cols: usize) -> Operand<'_> {
    Operand::transposed(data, cols)
}

/// Shapes of one grouped call.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    /// Experts.
    pub experts: usize,
    /// Model width.
    pub d: usize,
    /// Expert hidden width.
    pub f: usize,
}

/// Expert e's block of a stack of `size`-element blocks.
fn block(stack: &[f32], e: usize, size: usize) -> &[f32] {
    &stack[e * size..(e + 1) * size]
}

fn check_offsets(offsets: &[usize], rows: usize, experts: usize) {
    assert_eq!(
        offsets.len(),
        experts + 1,
        "grouped experts: need E + 1 offsets"
    );
    assert!(
        offsets.windows(2).all(|w| w[0] <= w[1]) && offsets[0] == 0 && offsets[experts] == rows,
        "grouped experts: offsets must rise from 0 to the row count {rows}"
    );
}

/// What the forward keeps for the backward: the gate and up projections and
/// the SwiGLU output, each `[N, F]`; owned by the forward, borrowed by the
/// backward.
pub struct Saved<T = Vec<f32>> {
    /// `x · gate_e`
    pub g: T,
    /// `x · up_e`
    pub u: T,
    /// `silu(g) · u`
    pub h: T,
}

/// `y = down_e(silu(x · gate_e) · (x · up_e))` for every row of every expert.
pub fn forward(
    x: &[f32],
    gate: &[f32],
    up: &[f32],
    down: &[f32],
    offsets: &[usize],
    dims: Dims,
) -> (Vec<f32>, Saved) {
    let Dims { experts, d, f } = dims;
    let n = x.len() / d;
    check_offsets(offsets, n, experts);
    let (mut g, mut u, mut h) = (vec![0.0; n * f], vec![0.0; n * f], vec![0.0; n * f]);
    let mut y = vec![0.0; n * d];
    for e in 0..experts {
        let (r0, r1) = (offsets[e], offsets[e + 1]);
        let rows = r1 - r0;
        let xe = plain(&x[r0 * d..r1 * d], d);
        let (wg, wu) = (block(gate, e, d * f), block(up, e, d * f));
        matmul(rows, d, f, xe, plain(wg, f), &mut g[r0 * f..r1 * f], false);
        matmul(rows, d, f, xe, plain(wu, f), &mut u[r0 * f..r1 * f], false);
    }
    cpu::swiglu_forward(&g, &u, &mut h);
    for e in 0..experts {
        let (r0, r1) = (offsets[e], offsets[e + 1]);
        let wd = &down[e * f * d..(e + 1) * f * d];
        let he = plain(&h[r0 * f..r1 * f], f);
        matmul(
            r1 - r0,
            f,
            d,
            he,
            plain(wd, d),
            &mut y[r0 * d..r1 * d],
            false,
        );
    }
    (y, Saved { g, u, h })
}

/// Gradients of [`forward`]: `(dx, dgate, dup, ddown)`.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    x: &[f32],
    gate: &[f32],
    up: &[f32],
    down: &[f32],
    offsets: &[usize],
    dims: Dims,
    saved: Saved<&[f32]>,
    dy: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let Dims { experts, d, f } = dims;
    let n = x.len() / d;
    check_offsets(offsets, n, experts);
    let mut dh = vec![0.0; n * f];
    let mut ddown = vec![0.0; experts * f * d];
    for e in 0..experts {
        let (r0, r1) = (offsets[e], offsets[e + 1]);
        let rows = r1 - r0;
        let wd = &down[e * f * d..(e + 1) * f * d];
        let dye = &dy[r0 * d..r1 * d];
        // dh = dy · downᵀ; ddown = hᵀ · dy
        matmul(
            rows,
            d,
            f,
            plain(dye, d),
            transposed(wd, d),
            &mut dh[r0 * f..r1 * f],
            false,
        );
        let he = &saved.h[r0 * f..r1 * f];
        let block = &mut ddown[e * f * d..(e + 1) * f * d];
        matmul(f, rows, d, transposed(he, f), plain(dye, d), block, false);
    }
    let (mut dg, mut du) = (vec![0.0; n * f], vec![0.0; n * f]);
    cpu::swiglu_backward(saved.g, saved.u, &dh, &mut dg, &mut du);
    drop(dh);
    let mut dx = vec![0.0; n * d];
    let (mut dgate, mut dup) = (vec![0.0; experts * d * f], vec![0.0; experts * d * f]);
    for e in 0..experts {
        let (r0, r1) = (offsets[e], offsets[e + 1]);
        let rows = r1 - r0;
        let (wg, wu) = (block(gate, e, d * f), block(up, e, d * f));
        let (dge, due) = (&dg[r0 * f..r1 * f], &du[r0 * f..r1 * f]);
        // dx = dg · gateᵀ + du · upᵀ
        let dxe = &mut dx[r0 * d..r1 * d];
        matmul(rows, f, d, plain(dge, f), transposed(wg, f), dxe, false);
        matmul(rows, f, d, plain(due, f), transposed(wu, f), dxe, true);
        // dgate = xᵀ · dg; dup = xᵀ · du
        let xe = transposed(&x[r0 * d..r1 * d], d);
        matmul(
            d,
            rows,
            f,
            xe,
            plain(dge, f),
            &mut dgate[e * d * f..(e + 1) * d * f],
            false,
        );
        matmul(
            d,
            rows,
            f,
            xe,
            plain(due, f),
            &mut dup[e * d * f..(e + 1) * d * f],
            false,
        );
    }
    (dx, dgate, dup, ddown)
}
