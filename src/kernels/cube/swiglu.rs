//! The SwiGLU of one value and its gradients, in f32, as cube functions:
//! the separate SwiGLU pass ([`super::grouped`]) and the fused matmul
//! epilogues ([`super::grouped_fused`]) share them.

use cubecl::prelude::*;

/// `silu(g) · u`, in f32: the SwiGLU of one value.
#[cube]
pub(super) fn swiglu_value(g: f32, u: f32) -> f32 {
    g / (f32::new(1.0) + (-g).exp()) * u
}

/// The gradients of g and u of `silu(g) · u` for the gradient `dh`.
#[derive(CubeType, Clone)]
pub(super) struct SwigluGrads {
    pub dg: f32,
    pub du: f32,
}

/// [`SwigluGrads`] of one value, in f32: `dg = dh · u · σ(g)(1 + g(1 − σ(g)))`
/// and `du = dh · silu(g)`.
#[cube]
pub(super) fn swiglu_grads(g: f32, u: f32, dh: f32) -> SwigluGrads {
    let one = f32::new(1.0);
    let s = one / (one + (-g).exp());
    SwigluGrads {
        dg: dh * u * s * (one + g * (one - s)),
        du: dh * g * s,
    }
}
