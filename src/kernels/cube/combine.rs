//! The combine of the experts' outputs for the Cube backends: each token's
//! weighted sum of its k output rows, `out[t] = Σ_j w[t, j] · rows[index[t·k + j]]`,
//! read in place, where the composed path gathers a `[T·k, d]` copy of the
//! rows and a weighted copy of that. An index at or past the row count (a
//! dropped assignment) adds nothing.
//!
//! The backward writes each row's gradient `w[t, j] · grad[t]` straight to
//! the row the assignment read, which needs what every dispatch plan
//! guarantees: no row is read by two assignments. Rows no assignment reads
//! get a zero gradient; each weight's gradient is `rows[index] · grad[t]`.
//! The tensors may be f32, f16 or bf16; the sums are f32.

use super::{empty_like, launch_elementwise};
use burn::backend::cubecl::dtype_to_storage_type;
use burn::tensor::Shape;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::zeros_client;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

/// One output value `out[t, c]`.
#[cube(launch)]
fn combine_kernel<F: Float, I: Numeric>(
    rows: &Tensor<F>,
    index: &Tensor<I>,
    weights: &Tensor<F>,
    out: &mut Tensor<F>,
    #[comptime] k: usize,
    #[define(F, I)] _dtypes: [ElemType; 2],
) {
    let pos = ABSOLUTE_POS;
    if pos >= out.len() {
        terminate!();
    }
    let d = out.shape(1);
    let r = rows.shape(0);
    let (t, c) = (pos / d, pos % d);
    let mut acc = f32::new(0.0);
    #[unroll]
    for j in 0..k {
        let row = u32::cast_from(index[t * k + j]) as usize;
        if row < r {
            acc += f32::cast_from(weights[t * k + j]) * f32::cast_from(rows[row * d + c]);
        }
    }
    out[pos] = F::cast_from(acc);
}

/// One value of the rows' gradient per assignment and column:
/// `d_rows[index[a], c] = w[a] · grad[a / k, c]`.
#[cube(launch)]
fn rows_grad_kernel<F: Float, I: Numeric>(
    index: &Tensor<I>,
    weights: &Tensor<F>,
    grad: &Tensor<F>,
    d_rows: &mut Tensor<F>,
    #[comptime] k: usize,
    #[define(F, I)] _dtypes: [ElemType; 2],
) {
    let d = grad.shape(1);
    let pos = ABSOLUTE_POS;
    if pos >= index.len() * d {
        terminate!();
    }
    let (a, c) = (pos / d, pos % d);
    let row = u32::cast_from(index[a]) as usize;
    if row < d_rows.shape(0) {
        let w = f32::cast_from(weights[a]);
        d_rows[row * d + c] = F::cast_from(w * f32::cast_from(grad[(a / k) * d + c]));
    }
}

/// One weight's gradient per assignment: `rows[index[a]] · grad[a / k]`.
#[cube(launch)]
fn weights_grad_kernel<F: Float, I: Numeric>(
    rows: &Tensor<F>,
    index: &Tensor<I>,
    grad: &Tensor<F>,
    d_weights: &mut Tensor<F>,
    #[comptime] k: usize,
    #[define(F, I)] _dtypes: [ElemType; 2],
) {
    let a = ABSOLUTE_POS;
    if a >= index.len() {
        terminate!();
    }
    let d = grad.shape(1);
    let row = u32::cast_from(index[a]) as usize;
    let mut acc = f32::new(0.0);
    if row < rows.shape(0) {
        let t = a / k;
        for c in 0..d {
            acc += f32::cast_from(rows[row * d + c]) * f32::cast_from(grad[t * d + c]);
        }
    }
    d_weights[a] = F::cast_from(acc);
}

/// `(T, k, d)` of a combine, checked.
fn dims(rows: &CubeTensor, index: &CubeTensor, weights: &CubeTensor) -> [usize; 3] {
    let [_, d] = rows.meta.shape().dims::<2>();
    let [t, k] = weights.meta.shape().dims::<2>();
    let [n] = index.meta.shape().dims::<1>();
    assert_eq!(n, t * k, "combine_rows: {n} indices for {t} × {k} weights");
    [t, k, d]
}

/// Each token's weighted sum of its rows: `rows: [R, d]`, `index: [T·k]`,
/// `weights: [T, k]`; returns `[T, d]`.
pub fn forward(rows: CubeTensor, index: CubeTensor, weights: CubeTensor) -> CubeTensor {
    let [rows, index, weights] = [rows, index, weights].map(into_contiguous);
    let [t, k, d] = dims(&rows, &index, &weights);
    let out = empty_like(&rows, Shape::new([t, d]));
    let (count, dim) = launch_elementwise(&rows, t * d);
    let dtypes = [
        dtype_to_storage_type(rows.dtype),
        dtype_to_storage_type(index.dtype),
    ];
    combine_kernel::launch(
        &rows.client.clone(),
        count,
        dim,
        rows.into_tensor_arg(),
        index.into_tensor_arg(),
        weights.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        k,
        dtypes,
    );
    out
}

/// The gradients of the rows (`[R, d]`) and the weights (`[T, k]`) for the
/// output gradient `grad: [T, d]`.
pub fn backward(
    rows: CubeTensor,
    index: CubeTensor,
    weights: CubeTensor,
    grad: CubeTensor,
) -> (CubeTensor, CubeTensor) {
    let [rows, index, weights, grad] = [rows, index, weights, grad].map(into_contiguous);
    let [t, k, d] = dims(&rows, &index, &weights);
    let client = rows.client.clone();
    let dtypes = [
        dtype_to_storage_type(rows.dtype),
        dtype_to_storage_type(index.dtype),
    ];
    let d_rows = zeros_client(
        client.clone(),
        rows.device.clone(),
        rows.meta.shape().clone(),
        rows.dtype,
    );
    let (count, dim) = launch_elementwise(&rows, t * k * d);
    rows_grad_kernel::launch(
        &client,
        count,
        dim,
        index.clone().into_tensor_arg(),
        weights.clone().into_tensor_arg(),
        grad.clone().into_tensor_arg(),
        d_rows.clone().into_tensor_arg(),
        k,
        dtypes,
    );
    let d_weights = empty_like(&rows, weights.meta.shape().clone());
    let (count, dim) = launch_elementwise(&rows, t * k);
    weights_grad_kernel::launch(
        &client,
        count,
        dim,
        rows.into_tensor_arg(),
        index.into_tensor_arg(),
        grad.into_tensor_arg(),
        d_weights.clone().into_tensor_arg(),
        k,
        dtypes,
    );
    (d_rows, d_weights)
}
