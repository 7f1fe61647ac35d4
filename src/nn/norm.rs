//! RMSNorm as the model uses it: weight 1 at start, computed in f32 (fused
//! on the CPU backend) whatever the activations' dtype.

use crate::kernels;
use burn::nn::{RmsNorm, RmsNormConfig};
use burn::prelude::*;
use burn::tensor::DType;

/// RMSNorm over a last dimension of `width`, weight 1 and epsilon `eps`.
pub fn rms_norm(width: usize, eps: f64, device: &Device) -> RmsNorm {
    RmsNormConfig::new(width).with_epsilon(eps).init(device)
}

/// RMSNorm over the last dimension, computed in f32 whatever the
/// activations' dtype, and returned in that dtype.
pub fn norm<const D: usize>(layer: &RmsNorm, x: Tensor<D>) -> Tensor<D> {
    let dt = x.dtype();
    if dt == DType::F32 {
        return match kernels::rms_norm(x.clone(), layer.gamma.val(), layer.epsilon) {
            Some(y) => y,
            None => layer.forward(x),
        };
    }
    layer.forward(x.cast(DType::F32)).cast(dt)
}
