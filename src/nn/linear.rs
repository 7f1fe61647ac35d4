//! Linear layers as both the model and the MoE layer use them: built from
//! N(0, std), applied in the activations' dtype (f32 master weights cast
//! under mixed precision), and on the CPU backend in f32 through the fused
//! matmul of [`crate::kernels::linear`].

use burn::nn::{Initializer, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::DType;

/// A bias-free linear layer initialised from N(0, std).
pub fn linear(d_in: usize, d_out: usize, bias: bool, std: f64, device: &Device) -> Linear {
    LinearConfig::new(d_in, d_out)
        .with_bias(bias)
        .with_initializer(Initializer::Normal { mean: 0.0, std })
        .init(device)
}

/// `layer(x)` computed in x's dtype: under mixed precision the f32 weight
/// (and bias) are cast to the activations' dtype, and the gradient flows
/// back to the f32 master copy through the cast.
pub fn apply<const D: usize>(layer: &Linear, x: Tensor<D>) -> Tensor<D> {
    if let Some(y) = crate::kernels::linear(x.clone(), layer.weight.val()) {
        return match &layer.bias {
            Some(b) => y + b.val().unsqueeze(),
            None => y,
        };
    }
    let dt = x.dtype();
    burn::tensor::module::linear(
        x,
        in_dtype(layer.weight.val(), dt),
        layer.bias.as_ref().map(|b| in_dtype(b.val(), dt)),
    )
}

/// `t` in dtype `dt`; no operation when it already is.
pub fn in_dtype<const D: usize>(t: Tensor<D>, dt: DType) -> Tensor<D> {
    if t.dtype() == dt {
        t
    } else {
        t.cast(dt)
    }
}
