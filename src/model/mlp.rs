//! The SwiGLU feed-forward network (Shazeer 2020, "GLU Variants Improve
//! Transformer"): `down(silu(gate(x)) * up(x))`, used by dense blocks and by
//! shared experts. Field names follow the Hugging Face Qwen2/Llama keys.

use crate::kernels::swiglu;
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::prelude::*;

/// A bias-free SwiGLU MLP.
#[derive(Module, Debug)]
pub struct Mlp {
    /// `[d_model, d_ff]`
    pub gate_proj: Linear,
    /// `[d_model, d_ff]`
    pub up_proj: Linear,
    /// `[d_ff, d_model]`
    pub down_proj: Linear,
}

/// A bias-free linear layer initialised from N(0, std).
pub fn linear(d_in: usize, d_out: usize, bias: bool, std: f64, device: &Device) -> Linear {
    LinearConfig::new(d_in, d_out)
        .with_bias(bias)
        .with_initializer(Initializer::Normal { mean: 0.0, std })
        .init(device)
}

impl Mlp {
    /// A new MLP of hidden width `d_ff`.
    pub fn new(d_model: usize, d_ff: usize, init_std: f64, device: &Device) -> Self {
        Self {
            gate_proj: linear(d_model, d_ff, false, init_std, device),
            up_proj: linear(d_model, d_ff, false, init_std, device),
            down_proj: linear(d_ff, d_model, false, init_std, device),
        }
    }

    /// # Shapes
    /// - `x`: `[..., d_model]` → `[..., d_model]`
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let h = swiglu(self.gate_proj.forward(x.clone()), self.up_proj.forward(x));
        self.down_proj.forward(h)
    }
}
