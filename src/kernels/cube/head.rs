//! The LM head and its cross-entropy for the Cube backends, in chunks of
//! rows: the `[n, V]` logits are never held whole, and the gradients of x
//! and the head weight are made in the forward pass, as on the CPU
//! ([`super::super::cpu::head`]).
//!
//! Each chunk is one matmul for its logits, one kernel that turns them in
//! place into the loss gradient `(softmax − onehot) · weight` while writing
//! each row's loss, and two matmuls for its share of the gradients. The
//! matmuls are the backend's own (CubeCL's matmul, autotuned); the kernel
//! is one cube per row, its units sharing the row's vocabulary.
//!
//! x and the weight may be f32, f16 or bf16 (the logits and the gradients
//! then are too); the row kernel computes in f32, the losses, the row
//! weights and the weight gradient's sum over chunks are f32.

use super::empty_f32_like;
use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::ops::FloatTensorOps;
use burn::backend::Slice;
use burn::tensor::Shape;
use burn::tensor::{DType, FloatDType};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeBackend;
use cubecl::calculate_cube_count_elemwise;
use cubecl::prelude::*;

/// The logits a chunk holds at most: 2^22 (16 MiB in f32).
const CHUNK_LOGITS: usize = 1 << 22;

/// Units per cube of [`rows_kernel`] at vocabulary `v`: one cube per row,
/// the units striding over the vocabulary together; no more units than a
/// small vocabulary can use (at least a warp's 32).
fn row_block(v: usize) -> usize {
    v.next_power_of_two().clamp(32, 256)
}
/// Rows `row0..row0 + n` of the cross-entropy: each row's loss
/// `logsumexp(logits) − logits[target]`, and with `grad` the logits
/// replaced by their gradient `(softmax − onehot(target)) · weights[row]`.
///
/// One cube per row (spread over the launch's dimensions, for more rows
/// than one holds). Each unit takes every `block`-th logit of the row;
/// the row's maximum and sum of exponentials are the units' shares added up
/// in shared memory, so a unit loops over `V / block` values, not `V`.
#[cube(launch)]
fn rows_kernel<F: Float, I: Numeric>(
    logits: &mut Tensor<F>,
    targets: &Tensor<I>,
    weights: &Tensor<f32>,
    loss: &mut Tensor<f32>,
    row0: u32,
    #[comptime] block: usize,
    #[comptime] grad: bool,
    #[define(F, I)] _dtypes: [ElemType; 2],
) {
    let n = logits.shape(0);
    let v = logits.shape(1);
    let r = CUBE_POS;
    let u = UNIT_POS_X as usize;
    let mut shares = Shared::<[f32]>::new_slice(block);
    let mut row_stats = Shared::<[f32]>::new_slice(2usize);
    // `r` is the same for every unit of a cube, so the barriers below are
    // reached by all of a cube's units or by none.
    if r < n {
        let base = r * v;
        let mut m = f32::cast_from(logits[base]);
        let mut c = u;
        while c < v {
            let x = f32::cast_from(logits[base + c]);
            if x > m {
                m = x;
            }
            c += block;
        }
        shares[u] = m;
        sync_cube();
        if u == 0 {
            let mut top = shares[0];
            for j in 1..block {
                if shares[j] > top {
                    top = shares[j];
                }
            }
            row_stats[0] = top;
        }
        sync_cube();
        let top = row_stats[0];
        let mut sum = f32::new(0.0);
        let mut c = u;
        while c < v {
            sum += (f32::cast_from(logits[base + c]) - top).exp();
            c += block;
        }
        shares[u] = sum;
        sync_cube();
        let row = r + row0 as usize;
        let t = u32::cast_from(targets[row]) as usize;
        if u == 0 {
            let mut total = f32::new(0.0);
            for j in 0..block {
                total += shares[j];
            }
            let lse = top + total.ln();
            row_stats[1] = lse;
            loss[row] = lse - f32::cast_from(logits[base + t]);
        }
        sync_cube();
        if grad {
            let lse = row_stats[1];
            let w = weights[row];
            let mut c = u;
            while c < v {
                let p = (f32::cast_from(logits[base + c]) - lse).exp() * w;
                logits[base + c] = F::cast_from(if c == t { p - w } else { p });
                c += block;
            }
        }
    }
}

fn chunk_rows(v: usize) -> usize {
    (CHUNK_LOGITS / v.max(1)).max(1)
}

/// Run [`rows_kernel`] on one chunk's logits.
fn launch_rows(
    logits: &CubeTensor,
    targets: &CubeTensor,
    weights: &CubeTensor,
    loss: &CubeTensor,
    row0: usize,
    grad: bool,
) {
    let [rows, v] = logits.meta.shape().dims::<2>();
    let rows = rows.max(1);
    let block = row_block(v);
    let dim = CubeDim::new_1d(block as u32);
    rows_kernel::launch(
        &logits.client.clone(),
        calculate_cube_count_elemwise(&logits.client, rows * block, dim),
        dim,
        logits.clone().into_tensor_arg(),
        targets.clone().into_tensor_arg(),
        weights.clone().into_tensor_arg(),
        loss.clone().into_tensor_arg(),
        row0 as u32,
        block,
        grad,
        [
            dtype_to_storage_type(logits.dtype),
            dtype_to_storage_type(targets.dtype),
        ],
    );
}

fn dims(x: &CubeTensor, w: &CubeTensor, targets: &CubeTensor) -> [usize; 3] {
    let [n, d] = x.meta.shape().dims::<2>();
    let [wd, v] = w.meta.shape().dims::<2>();
    let [t] = targets.meta.shape().dims::<1>();
    assert!(
        wd == d && t == n,
        "LM head: x is [{n}, {d}], the weight [{wd}, {v}], {t} targets"
    );
    [n, d, v]
}

/// Rows `r0..r1` of x, and that chunk's logits `x · w`.
fn chunk_logits(x: &CubeTensor, w: &CubeTensor, r0: usize, r1: usize) -> (CubeTensor, CubeTensor) {
    let d = x.meta.shape().dims::<2>()[1];
    let xc = CubeBackend::float_slice(x.clone(), &[Slice::from(r0..r1), Slice::from(0..d)]);
    let logits = into_contiguous(CubeBackend::float_matmul(xc.clone(), w.clone()));
    (xc, logits)
}

/// `Σ_i weights[i] · nll_i` (`[1]`, f32, with f32 `weights`) and its
/// gradients of x (`[n, d]`) and w (`[d, V]`), in their dtype.
pub fn loss_and_grads(
    x: CubeTensor,
    w: CubeTensor,
    targets: CubeTensor,
    weights: CubeTensor,
) -> (CubeTensor, CubeTensor, CubeTensor) {
    let [n, _, v] = dims(&x, &w, &targets);
    let (targets, weights) = (into_contiguous(targets), into_contiguous(weights));
    let loss_rows = empty_f32_like(&x, Shape::new([n]));
    let half = x.dtype != DType::F32;
    let wt = CubeBackend::float_transpose(w.clone());
    let mut dx = Vec::new();
    let mut dw: Option<CubeTensor> = None;
    let step = chunk_rows(v);
    for r0 in (0..n).step_by(step) {
        let r1 = (r0 + step).min(n);
        let (xc, g) = chunk_logits(&x, &w, r0, r1);
        launch_rows(&g, &targets, &weights, &loss_rows, r0, true);
        dx.push(CubeBackend::float_matmul(g.clone(), wt.clone()));
        let mut part = CubeBackend::float_matmul(CubeBackend::float_transpose(xc), g);
        if half {
            // Summed over the chunks in f32.
            part = CubeBackend::float_cast(part, FloatDType::F32);
        }
        dw = Some(match dw {
            Some(acc) => CubeBackend::float_add(acc, part),
            None => part,
        });
    }
    let zeros = |t: &CubeTensor| {
        CubeBackend::float_zeros(t.meta.shape().clone(), &t.device, t.dtype.into())
    };
    let dx = match dx.len() {
        0 => zeros(&x),
        1 => dx.remove(0),
        _ => CubeBackend::float_cat(dx, 0),
    };
    let dw = match dw {
        Some(dw) if half => CubeBackend::float_cast(dw, w.dtype.into()),
        Some(dw) => dw,
        None => zeros(&w),
    };
    let loss = CubeBackend::float_sum(CubeBackend::float_mul(loss_rows, weights));
    (CubeBackend::float_reshape(loss, Shape::new([1])), dx, dw)
}

/// Each row's `nll_i` (`[n]`, f32), with no gradient.
pub fn row_losses(x: CubeTensor, w: CubeTensor, targets: CubeTensor) -> CubeTensor {
    let [n, _, v] = dims(&x, &w, &targets);
    let targets = into_contiguous(targets);
    let loss_rows = empty_f32_like(&x, Shape::new([n]));
    // The weights are not read without the gradient: any f32 tensor not
    // bound otherwise.
    let unread = empty_f32_like(&x, Shape::new([1]));
    let step = chunk_rows(v);
    for r0 in (0..n).step_by(step) {
        let (_, logits) = chunk_logits(&x, &w, r0, (r0 + step).min(n));
        launch_rows(&logits, &targets, &unread, &loss_rows, r0, false);
    }
    loss_rows
}
