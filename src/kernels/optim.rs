//! The optimizer's two fused operations: the AdamW update of one flat
//! parameter and the sum of squares behind the global gradient norm. Neither
//! runs under autodiff.

use super::{served_on, FusedOps, Op};
use burn::backend::Dispatch;
use burn::prelude::*;

/// AdamW's hyperparameters for one update, in the order [`super::cpu::adamw::adamw`]
/// takes them.
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    /// Learning rate.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay (0 for undecayed parameters).
    pub weight_decay: f64,
    /// Bias corrections 1 - β1^t and 1 - β2^t.
    pub bias_correction: (f64, f64),
}

impl AdamWStep {
    fn packed(&self) -> [f32; 7] {
        [
            self.lr as f32,
            self.beta1 as f32,
            self.beta2 as f32,
            self.eps as f32,
            self.weight_decay as f32,
            self.bias_correction.0 as f32,
            self.bias_correction.1 as f32,
        ]
    }
}

/// One AdamW update of flat `[n]` tensors: the new parameter and moments,
/// from the gradient times `scale` (`[1]`, the clipping factor). Fused into
/// one pass on the CPU and GPU backends in f32; composed from tensor
/// operations elsewhere.
pub fn adamw_update(
    param: Tensor<1>,
    grad: Tensor<1>,
    m: Tensor<1>,
    v: Tensor<1>,
    scale: Tensor<1>,
    step: &AdamWStep,
) -> (Tensor<1>, Tensor<1>, Tensor<1>) {
    let fused = [&param, &grad, &m, &v, &scale]
        .iter()
        .all(|t| served_on(Op::AdamW, &t.device(), t.dtype()));
    if fused {
        let (p, m, v) = <Dispatch as FusedOps>::adamw_update(
            param.into_dispatch(),
            grad.into_dispatch(),
            m.into_dispatch(),
            v.into_dispatch(),
            scale.into_dispatch(),
            step.packed(),
        );
        return (
            Tensor::from_dispatch(p),
            Tensor::from_dispatch(m),
            Tensor::from_dispatch(v),
        );
    }
    let (b1, b2) = (step.beta1, step.beta2);
    let g = grad * scale;
    let m = m.mul_scalar(b1) + g.clone().mul_scalar(1.0 - b1);
    let v = v.mul_scalar(b2) + g.square().mul_scalar(1.0 - b2);
    let m_hat = m.clone().div_scalar(step.bias_correction.0);
    let v_hat = v.clone().div_scalar(step.bias_correction.1);
    let p = param.mul_scalar(1.0 - step.lr * step.weight_decay)
        - (m_hat / (v_hat.sqrt() + step.eps)).mul_scalar(step.lr);
    (p, m, v)
}

/// Sum of the squared entries of `x`, in one read of `x` on the CPU and
/// GPU backends in f32. `[1]`
pub fn sum_squares<const D: usize>(x: Tensor<D>) -> Tensor<1> {
    if served_on(Op::SumSquares, &x.device(), x.dtype()) {
        return Tensor::from_dispatch(<Dispatch as FusedOps>::sum_squares(x.into_dispatch()));
    }
    x.square().sum()
}
