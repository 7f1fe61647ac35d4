//! One AdamW update for the Cube backends: one pass over a flat parameter,
//! its gradient and its two moments, as on the CPU
//! ([`super::super::cpu::adamw`]); and the gradient norm's sum of squares,
//! one read of each gradient.

use super::{empty_like, launch_elementwise};
use burn::backend::cubecl::dtype_to_storage_type;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;
use cubecl::CubeDim;

/// The hyperparameters.
#[derive(CubeType, CubeLaunch)]
struct Hyper {
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    bc1: f32,
    bc2: f32,
}

/// A moment's update `β m + (1 − β) x`.
#[cube]
fn decay<F: Float>(m: F, x: F, beta: f32) -> F {
    let b = F::cast_from(beta);
    m * b + x * (F::new(1.0) - b)
}

/// The new parameter from the old one and the new moments:
/// `p' = p (1 − lr·wd) − lr · (m' / bc1) / (√(v' / bc2) + eps)`.
#[cube]
fn step<F: Float>(p: F, m: F, v: F, h: &Hyper) -> F {
    let lr = F::cast_from(h.lr);
    let decayed = p * (F::new(1.0) - lr * F::cast_from(h.weight_decay));
    let denom = (v / F::cast_from(h.bc2)).sqrt() + F::cast_from(h.eps);
    decayed - lr * (m / F::cast_from(h.bc1)) / denom
}

/// `g = grad · scale`; `m' = β1 m + (1 − β1) g`; `v' = β2 v + (1 − β2) g²`;
/// the parameter by [`step`]; written to new buffers.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn adamw_kernel<F: Float>(
    param: &Tensor<F>,
    grad: &Tensor<F>,
    m: &Tensor<F>,
    v: &Tensor<F>,
    scale: &Tensor<F>,
    param_out: &mut Tensor<F>,
    m_out: &mut Tensor<F>,
    v_out: &mut Tensor<F>,
    h: Hyper,
    #[define(F)] _dtype: ElemType,
) {
    let i = ABSOLUTE_POS;
    if i >= param.len() {
        terminate!();
    }
    let g = grad[i] * scale[0];
    let mi = decay::<F>(m[i], g, h.beta1);
    let vi = decay::<F>(v[i], g * g, h.beta2);
    param_out[i] = step::<F>(param[i], mi, vi, &h);
    m_out[i] = mi;
    v_out[i] = vi;
}

/// [`adamw_kernel`] in place, for a parameter and moments no other tensor
/// shares: no new buffers.
#[cube(launch)]
fn adamw_in_place_kernel<F: Float>(
    param: &mut Tensor<F>,
    grad: &Tensor<F>,
    m: &mut Tensor<F>,
    v: &mut Tensor<F>,
    scale: &Tensor<F>,
    h: Hyper,
    #[define(F)] _dtype: ElemType,
) {
    let i = ABSOLUTE_POS;
    if i >= param.len() {
        terminate!();
    }
    let g = grad[i] * scale[0];
    let mi = decay::<F>(m[i], g, h.beta1);
    let vi = decay::<F>(v[i], g * g, h.beta2);
    param[i] = step::<F>(param[i], mi, vi, &h);
    m[i] = mi;
    v[i] = vi;
}

/// The new parameter and moments of flat `[n]` tensors; `scale` is `[1]`,
/// `hyper` is (lr, β1, β2, eps, weight decay, bc1, bc2). Written over the
/// old parameter and moments when no other tensor shares them.
pub fn update(
    [param, grad, m, v, scale]: [CubeTensor; 5],
    hyper: [f32; 7],
) -> (CubeTensor, CubeTensor, CubeTensor) {
    let [param, grad, m, v, scale] = [param, grad, m, v, scale].map(into_contiguous);
    let n = param.meta.shape().num_elements();
    for (name, t) in [
        ("gradient", &grad),
        ("first moment", &m),
        ("second moment", &v),
    ] {
        assert_eq!(
            t.meta.shape().num_elements(),
            n,
            "adamw: the {name} does not match the parameter's {n} values"
        );
    }
    let empty = || empty_like(&param, param.meta.shape().clone());
    let (count, dim) = launch_elementwise(&param, n);
    let [lr, beta1, beta2, eps, weight_decay, bc1, bc2] = hyper;
    let h = HyperLaunch::new(lr, beta1, beta2, eps, weight_decay, bc1, bc2);
    let dtype = dtype_to_storage_type(param.dtype);
    let client = param.client.clone();
    if param.can_mut() && m.can_mut() && v.can_mut() {
        adamw_in_place_kernel::launch(
            &client,
            count,
            dim,
            param.clone().into_tensor_arg(),
            grad.into_tensor_arg(),
            m.clone().into_tensor_arg(),
            v.clone().into_tensor_arg(),
            scale.into_tensor_arg(),
            h,
            dtype,
        );
        return (param, m, v);
    }
    let (p_out, m_out, v_out) = (empty(), empty(), empty());
    adamw_kernel::launch(
        &client,
        count,
        dim,
        param.into_tensor_arg(),
        grad.into_tensor_arg(),
        m.into_tensor_arg(),
        v.into_tensor_arg(),
        scale.into_tensor_arg(),
        p_out.clone().into_tensor_arg(),
        m_out.clone().into_tensor_arg(),
        v_out.clone().into_tensor_arg(),
        h,
        dtype,
    );
    (p_out, m_out, v_out)
}

/// Units per cube of [`sum_squares_kernel`].
const SUM_BLOCK: usize = 256;
/// The most cubes [`sum_squares`] launches; each adds a strided share.
const SUM_CUBES: usize = 1024;

/// Each cube's sum of squares over its strided share of `x`: each unit
/// sums its own values, and the cube's first unit adds up the units' sums
/// in shared memory: `partial[cube]`.
#[cube(launch)]
fn sum_squares_kernel<F: Float>(
    x: &Tensor<F>,
    partial: &mut Tensor<F>,
    #[comptime] block: usize,
    #[define(F)] _dtype: ElemType,
) {
    let u = UNIT_POS_X as usize;
    let cube = CUBE_POS_X as usize;
    let step = CUBE_COUNT_X as usize * block;
    let mut acc = F::new(0.0);
    let mut i = cube * block + u;
    while i < x.len() {
        let value = x[i];
        acc += value * value;
        i += step;
    }
    let mut sums = Shared::<[F]>::new_slice(block);
    sums[u] = acc;
    sync_cube();
    if u == 0 {
        let mut total = F::new(0.0);
        for j in 0..block {
            total += sums[j];
        }
        partial[cube] = total;
    }
}

/// The sum of the squared entries of `x` (`[1]`): one read of `x` by at
/// most [`SUM_CUBES`] cubes, then the backend's sum of their partial sums.
pub fn sum_squares(x: CubeTensor) -> CubeTensor {
    use burn::backend::ops::FloatTensorOps;
    let x = into_contiguous(x);
    let n = x.meta.shape().num_elements();
    let cubes = n.div_ceil(SUM_BLOCK).clamp(1, SUM_CUBES);
    let partial = empty_like(&x, burn::tensor::Shape::new([cubes]));
    sum_squares_kernel::launch(
        &x.client.clone(),
        CubeCount::Static(cubes as u32, 1, 1),
        CubeDim::new_1d(SUM_BLOCK as u32),
        x.clone().into_tensor_arg(),
        partial.clone().into_tensor_arg(),
        SUM_BLOCK,
        dtype_to_storage_type(x.dtype),
    );
    burn_cubecl::CubeBackend::float_sum(partial)
}
