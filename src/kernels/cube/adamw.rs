//! One AdamW update for the Cube backends: one pass over a flat parameter,
//! its gradient and its two moments, as on the CPU
//! ([`super::super::cpu::adamw`]).

use burn::backend::cubecl::dtype_to_storage_type;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;
use cubecl::{calculate_cube_count_elemwise, CubeDim};

/// `g = grad · scale`; `m' = β1 m + (1 − β1) g`; `v' = β2 v + (1 − β2) g²`;
/// `p' = p (1 − lr·wd) − lr · (m' / bc1) / (√(v' / bc2) + eps)`.
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
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    bc1: f32,
    bc2: f32,
    #[define(F)] _dtype: ElemType,
) {
    let i = ABSOLUTE_POS;
    if i >= param.len() {
        terminate!();
    }
    let lr = F::cast_from(lr);
    let b1 = F::cast_from(beta1);
    let b2 = F::cast_from(beta2);
    let eps = F::cast_from(eps);
    let wd = F::cast_from(weight_decay);
    let bc1 = F::cast_from(bc1);
    let bc2 = F::cast_from(bc2);
    let one = F::new(1.0);
    let g = grad[i] * scale[0];
    let mi = m[i] * b1 + g * (one - b1);
    let vi = v[i] * b2 + g * g * (one - b2);
    param_out[i] = param[i] * (one - lr * wd) - lr * (mi / bc1) / ((vi / bc2).sqrt() + eps);
    m_out[i] = mi;
    v_out[i] = vi;
}

/// The new parameter and moments of flat `[n]` tensors; `scale` is `[1]`,
/// `hyper` is (lr, β1, β2, eps, weight decay, bc1, bc2).
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
    let empty = || {
        empty_device_dtype(
            param.client.clone(),
            param.device.clone(),
            param.meta.shape().clone(),
            param.dtype,
        )
    };
    let (p_out, m_out, v_out) = (empty(), empty(), empty());
    let dim = CubeDim::new(&param.client, n.max(1));
    let count = calculate_cube_count_elemwise(&param.client, n.max(1), dim);
    let [lr, beta1, beta2, eps, weight_decay, bc1, bc2] = hyper;
    adamw_kernel::launch(
        &param.client.clone(),
        count,
        dim,
        param.clone().into_tensor_arg(),
        grad.into_tensor_arg(),
        m.into_tensor_arg(),
        v.into_tensor_arg(),
        scale.into_tensor_arg(),
        p_out.clone().into_tensor_arg(),
        m_out.clone().into_tensor_arg(),
        v_out.clone().into_tensor_arg(),
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        bc1,
        bc2,
        dtype_to_storage_type(param.dtype),
    );
    (p_out, m_out, v_out)
}
