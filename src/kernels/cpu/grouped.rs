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

use super::{self as cpu, Operand};
use rayon::prelude::*;
use std::sync::Mutex;

/// `c (+)= a · b`, over the whole rayon pool when `parallel`.
#[allow(clippy::too_many_arguments)]
fn matmul(
    m: usize,
    k: usize,
    n: usize,
    a: Operand,
    b: Operand,
    c: &mut [f32],
    accumulate: bool,
    parallel: bool,
) {
    cpu::matmul((m, k, n), a, b, c, accumulate, 1.0, parallel);
}

/// Run `work` once per expert task. With at least two experts per thread,
/// the experts run side by side, largest first, each on one thread with
/// its matmuls unsplit (`work` gets `false`): every core keeps its own
/// expert's data in cache and no matmul waits on another thread. With fewer
/// (a dense MLP is one expert), they run in turn and each matmul splits
/// across the pool (`work` gets `true`).
fn for_each_expert<T: Send>(
    mut tasks: Vec<(usize, T)>,
    offsets: &[usize],
    work: impl Fn(usize, T, bool) + Sync,
) {
    let threads = rayon::current_num_threads();
    if tasks.len() < 2 * threads {
        for (e, t) in tasks {
            work(e, t, true);
        }
        return;
    }
    tasks.sort_by_key(|&(e, _)| std::cmp::Reverse(offsets[e + 1] - offsets[e]));
    let queue = Mutex::new(tasks.into_iter());
    rayon::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|_| loop {
                let next = queue.lock().expect("expert queue").next();
                match next {
                    Some((e, t)) => work(e, t, false),
                    None => break,
                }
            });
        }
    });
}

/// `buf` (rows of `width` values) cut into each expert's rows.
fn split_rows<'a>(mut buf: &'a mut [f32], offsets: &[usize], width: usize) -> Vec<&'a mut [f32]> {
    offsets
        .windows(2)
        .map(|w| {
            let (head, rest) = std::mem::take(&mut buf).split_at_mut((w[1] - w[0]) * width);
            buf = rest;
            head
        })
        .collect()
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
    let (mut g, mut u, mut h) = (cpu::zeros(n * f), cpu::zeros(n * f), cpu::zeros(n * f));
    let mut y = cpu::zeros(n * d);
    let tasks = split_rows(&mut g, offsets, f)
        .into_iter()
        .zip(split_rows(&mut u, offsets, f))
        .zip(split_rows(&mut h, offsets, f))
        .zip(split_rows(&mut y, offsets, d))
        .enumerate()
        .map(|(e, (((g, u), h), y))| (e, (g, u, h, y)))
        .collect();
    for_each_expert(tasks, offsets, |e, (g, u, h, y), par| {
        let (r0, r1) = (offsets[e], offsets[e + 1]);
        let rows = r1 - r0;
        let xe = plain(&x[r0 * d..r1 * d], d);
        let (wg, wu, wd) = (
            block(gate, e, d * f),
            block(up, e, d * f),
            block(down, e, f * d),
        );
        matmul(rows, d, f, xe, plain(wg, f), g, false, par);
        matmul(rows, d, f, xe, plain(wu, f), u, false, par);
        cpu::swiglu_forward(g, u, h);
        matmul(rows, f, d, plain(h, f), plain(wd, d), y, false, par);
    });
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
    let mut dx = cpu::zeros(n * d);
    let (mut dgate, mut dup) = (cpu::zeros(experts * d * f), cpu::zeros(experts * d * f));
    let mut ddown = cpu::zeros(experts * f * d);
    let tasks = split_rows(&mut dx, offsets, d)
        .into_iter()
        .zip(dgate.chunks_mut(d * f))
        .zip(dup.chunks_mut(d * f))
        .zip(ddown.chunks_mut(f * d))
        .enumerate()
        .map(|(e, (((dx, dg), du), dd))| (e, (dx, dg, du, dd)))
        .collect();
    for_each_expert(tasks, offsets, |e, (dxe, dgate, dup, ddown), par| {
        let (r0, r1) = (offsets[e], offsets[e + 1]);
        let rows = r1 - r0;
        if rows == 0 {
            return; // no rows: zero weight gradients, as allocated
        }
        let (wg, wu, wd) = (
            block(gate, e, d * f),
            block(up, e, d * f),
            block(down, e, f * d),
        );
        let dye = plain(&dy[r0 * d..r1 * d], d);
        // dh = dy · downᵀ; ddown = hᵀ · dy
        let mut dh = cpu::zeros(rows * f);
        matmul(rows, d, f, dye, transposed(wd, d), &mut dh, false, par);
        let he = transposed(&saved.h[r0 * f..r1 * f], f);
        matmul(f, rows, d, he, dye, ddown, false, par);
        let (mut dg, mut du) = (cpu::zeros(rows * f), cpu::zeros(rows * f));
        let (ge, ue) = (&saved.g[r0 * f..r1 * f], &saved.u[r0 * f..r1 * f]);
        cpu::swiglu_backward(ge, ue, &dh, &mut dg, &mut du);
        drop(dh);
        // dx = dg · gateᵀ + du · upᵀ
        matmul(
            rows,
            f,
            d,
            plain(&dg, f),
            transposed(wg, f),
            dxe,
            false,
            par,
        );
        matmul(rows, f, d, plain(&du, f), transposed(wu, f), dxe, true, par);
        // dgate = xᵀ · dg; dup = xᵀ · du
        let xe = transposed(&x[r0 * d..r1 * d], d);
        matmul(d, rows, f, xe, plain(&dg, f), dgate, false, par);
        matmul(d, rows, f, xe, plain(&du, f), dup, false, par);
    });
    (dx, dgate, dup, ddown)
}

/// The combine after the experts: `out[t] = Σ_j w[t·k + j] · rows[index[t·k + j]]`
/// over `d`-wide rows, skipping indices outside the rows. `out` (`[T, d]`)
/// starts zeroed.
pub fn combine_forward(
    rows: &[f32],
    index: &[i64],
    w: &[f32],
    k: usize,
    d: usize,
    out: &mut [f32],
) {
    let n_rows = rows.len() / d;
    let per = cpu::rows_per_task(d);
    out.par_chunks_mut(per * d)
        .enumerate()
        .for_each(|(chunk, out)| {
            for (i, o) in out.chunks_mut(d).enumerate() {
                let a0 = (chunk * per + i) * k;
                for a in a0..a0 + k {
                    let Some(row) = row_of(index[a], n_rows) else {
                        continue;
                    };
                    let wa = w[a];
                    for (o, &x) in o.iter_mut().zip(&rows[row * d..(row + 1) * d]) {
                        *o += wa * x;
                    }
                }
            }
        });
}

/// Gradients of [`combine_forward`] for the output gradient `g` (`[T, d]`):
/// `d_rows[index[a]] += w[a] · g[t]` and `d_w[a] = rows[index[a]] · g[t]` for
/// each assignment `a = t·k + j`. `d_rows` and `d_w` start zeroed. Rows read
/// by one assignment each (what the dispatch plans make) are written in
/// parallel; otherwise the rows' gradients accumulate on one thread.
#[allow(clippy::too_many_arguments)]
pub fn combine_backward(
    rows: &[f32],
    index: &[i64],
    w: &[f32],
    k: usize,
    d: usize,
    g: &[f32],
    d_rows: &mut [f32],
    d_w: &mut [f32],
) {
    let n_rows = rows.len() / d;
    let per = cpu::rows_per_task(d);
    d_w.par_chunks_mut(per * k)
        .enumerate()
        .for_each(|(chunk, d_w)| {
            let a0 = chunk * per * k;
            for (i, dw) in d_w.iter_mut().enumerate() {
                let a = a0 + i;
                if let Some(row) = row_of(index[a], n_rows) {
                    let t = a / k;
                    *dw = cpu::dot(&rows[row * d..(row + 1) * d], &g[t * d..(t + 1) * d]);
                }
            }
        });

    // The assignment reading each row, if exactly one does.
    let mut reader = vec![usize::MAX; n_rows];
    let mut shared = false;
    for (a, &r) in index.iter().enumerate() {
        if let Some(row) = row_of(r, n_rows) {
            shared |= reader[row] != usize::MAX;
            reader[row] = a;
        }
    }
    if shared {
        for (a, &r) in index.iter().enumerate() {
            if let Some(row) = row_of(r, n_rows) {
                let t = a / k;
                let dst = &mut d_rows[row * d..(row + 1) * d];
                for (o, &x) in dst.iter_mut().zip(&g[t * d..(t + 1) * d]) {
                    *o += w[a] * x;
                }
            }
        }
        return;
    }
    d_rows
        .par_chunks_mut(per * d)
        .zip(reader.par_chunks(per))
        .for_each(|(dst, reader)| {
            for (dst, &a) in dst.chunks_mut(d).zip(reader) {
                if a == usize::MAX {
                    continue;
                }
                let t = a / k;
                for (o, &x) in dst.iter_mut().zip(&g[t * d..(t + 1) * d]) {
                    *o = w[a] * x;
                }
            }
        });
}

/// The row an assignment's index names, if it is one of the `n_rows`.
fn row_of(index: i64, n_rows: usize) -> Option<usize> {
    usize::try_from(index).ok().filter(|&r| r < n_rows)
}
