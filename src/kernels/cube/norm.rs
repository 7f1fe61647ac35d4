//! RMSNorm and RoPE for the Cube backends: one unit per row, forward and
//! backward, as on the CPU ([`super::super::cpu::norm`]).

use super::{empty_like, launch_elementwise};
use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::ops::FloatTensorOps;
use burn::tensor::Shape;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeBackend;
use cubecl::prelude::*;

/// `y = x / √(mean(x²) + eps) · gamma` over each row of width `d`, and each
/// row's `1 / rms`.
#[cube(launch)]
fn rms_forward_kernel<F: Float>(
    x: &Tensor<F>,
    gamma: &Tensor<F>,
    y: &mut Tensor<F>,
    inv_rms: &mut Tensor<F>,
    eps: f32,
    #[define(F)] _dtype: ElemType,
) {
    let d = gamma.len();
    let r = ABSOLUTE_POS;
    if r >= inv_rms.len() {
        terminate!();
    }
    let base = r * d;
    let mut ss = F::new(0.0);
    for c in 0..d {
        ss += x[base + c] * x[base + c];
    }
    let inv = F::new(1.0) / (ss / F::cast_from(d as u32) + F::cast_from(eps)).sqrt();
    for c in 0..d {
        y[base + c] = x[base + c] * inv * gamma[c];
    }
    inv_rms[r] = inv;
}

/// The gradient of x of RMSNorm, per row:
/// `dx = inv · (g·gamma) − x · inv³ · mean(g·gamma·x)`.
#[cube(launch)]
fn rms_backward_kernel<F: Float>(
    x: &Tensor<F>,
    gamma: &Tensor<F>,
    inv_rms: &Tensor<F>,
    grad: &Tensor<F>,
    dx: &mut Tensor<F>,
    #[define(F)] _dtype: ElemType,
) {
    let d = gamma.len();
    let r = ABSOLUTE_POS;
    if r >= inv_rms.len() {
        terminate!();
    }
    let base = r * d;
    let inv = inv_rms[r];
    let mut dot = F::new(0.0);
    for c in 0..d {
        dot += grad[base + c] * gamma[c] * x[base + c];
    }
    let k = inv * inv * inv * dot / F::cast_from(d as u32);
    for c in 0..d {
        dx[base + c] = inv * grad[base + c] * gamma[c] - x[base + c] * k;
    }
}

/// RoPE with `rotate_half` pairing on rows of width `hd` (`[B, S, H, hd]`
/// as `B·S·H` rows) from `[S, hd]` tables; `inverse` applies the
/// transpose (the backward).
#[cube(launch)]
fn rope_kernel<F: Float>(
    x: &Tensor<F>,
    cos: &Tensor<F>,
    sin: &Tensor<F>,
    y: &mut Tensor<F>,
    #[comptime] inverse: bool,
    #[define(F)] _dtype: ElemType,
) {
    let s = x.shape(1);
    let heads = x.shape(2);
    let hd = x.shape(3);
    let half = hd / 2;
    let r = ABSOLUTE_POS;
    if r >= x.shape(0) * s * heads {
        terminate!();
    }
    let base = r * hd;
    let t = ((r / heads) % s) * hd;
    for i in 0..half {
        let a = f32::cast_from(x[base + i]);
        let b = f32::cast_from(x[base + i + half]);
        let (c0, c1) = (
            f32::cast_from(cos[t + i]),
            f32::cast_from(cos[t + i + half]),
        );
        let (s0, s1) = (
            f32::cast_from(sin[t + i]),
            f32::cast_from(sin[t + i + half]),
        );
        if inverse {
            y[base + i] = F::cast_from(a * c0 + b * s1);
            y[base + i + half] = F::cast_from(b * c1 - a * s0);
        } else {
            y[base + i] = F::cast_from(a * c0 - b * s0);
            y[base + i + half] = F::cast_from(b * c1 + a * s1);
        }
    }
}

/// The rows of x (`[.., d]`) and its last width, checked against gamma.
fn rows(x: &CubeTensor, gamma: &CubeTensor) -> (usize, usize) {
    let shape = x.meta.shape();
    let d = shape[shape.num_dims() - 1];
    let [g] = gamma.meta.shape().dims::<1>();
    assert_eq!(g, d, "rms_norm: x is {d} wide, gamma {g}");
    (shape.num_elements() / d.max(1), d)
}

/// RMSNorm's output and each row's `1 / rms` (`[rows]`).
pub fn rms_norm_forward(x: CubeTensor, gamma: CubeTensor, eps: f32) -> (CubeTensor, CubeTensor) {
    let (x, gamma) = (into_contiguous(x), into_contiguous(gamma));
    let (n, _) = rows(&x, &gamma);
    let y = empty_like(&x, x.meta.shape().clone());
    let inv = empty_like(&x, Shape::new([n]));
    let (count, dim) = launch_elementwise(&x, n);
    rms_forward_kernel::launch(
        &x.client.clone(),
        count,
        dim,
        x.clone().into_tensor_arg(),
        gamma.into_tensor_arg(),
        y.clone().into_tensor_arg(),
        inv.clone().into_tensor_arg(),
        eps,
        dtype_to_storage_type(x.dtype),
    );
    (y, inv)
}

/// The gradients of x and gamma: x's from one row kernel, gamma's
/// `Σ_rows g · x · inv` as a column sum.
pub fn rms_norm_backward(
    x: CubeTensor,
    gamma: CubeTensor,
    inv: CubeTensor,
    grad: CubeTensor,
) -> (CubeTensor, CubeTensor) {
    let (x, gamma) = (into_contiguous(x), into_contiguous(gamma));
    let (inv, grad) = (into_contiguous(inv), into_contiguous(grad));
    let (n, d) = rows(&x, &gamma);
    let dx = empty_like(&x, x.meta.shape().clone());
    let (count, dim) = launch_elementwise(&x, n);
    rms_backward_kernel::launch(
        &x.client.clone(),
        count,
        dim,
        x.clone().into_tensor_arg(),
        gamma.clone().into_tensor_arg(),
        inv.clone().into_tensor_arg(),
        grad.clone().into_tensor_arg(),
        dx.clone().into_tensor_arg(),
        dtype_to_storage_type(x.dtype),
    );
    let flat = |t: CubeTensor| CubeBackend::float_reshape(t, Shape::new([n, d]));
    let scaled = CubeBackend::float_mul(
        CubeBackend::float_mul(flat(grad), flat(x)),
        CubeBackend::float_reshape(inv, Shape::new([n, 1])),
    );
    let dgamma = CubeBackend::float_sum_dim(scaled, 0);
    (
        dx,
        CubeBackend::float_reshape(dgamma, gamma.meta.shape().clone()),
    )
}

/// RoPE of `x: [B, S, H, hd]` from `[S, hd]` tables, or its transpose.
pub fn rope(x: CubeTensor, cos: CubeTensor, sin: CubeTensor, inverse: bool) -> CubeTensor {
    let (x, cos, sin) = (
        into_contiguous(x),
        into_contiguous(cos),
        into_contiguous(sin),
    );
    let [b, s, h, hd] = x.meta.shape().dims::<4>();
    assert!(
        cos.meta.shape().dims::<2>() == [s, hd] && sin.meta.shape().dims::<2>() == [s, hd],
        "rope: x is [{b}, {s}, {h}, {hd}], the tables {:?}",
        cos.meta.shape()
    );
    let y = empty_like(&x, x.meta.shape().clone());
    let (count, dim) = launch_elementwise(&x, b * s * h);
    rope_kernel::launch(
        &x.client.clone(),
        count,
        dim,
        x.clone().into_tensor_arg(),
        cos.into_tensor_arg(),
        sin.into_tensor_arg(),
        y.clone().into_tensor_arg(),
        inverse,
        dtype_to_storage_type(x.dtype),
    );
    y
}
