//! The routed experts: E SwiGLU MLPs whose weights are stacked. On GPU
//! backends all experts run as one batched matmul per projection over their
//! capacity buffers; on the CPU backend one fused grouped kernel runs each
//! expert over exactly its tokens.

use crate::kernels::grouped_swiglu;
use crate::nn::in_dtype;
use burn::module::Param;
use burn::nn::Initializer;
use burn::prelude::*;
use burn::tensor::activation::silu;

/// E stacked SwiGLU experts: expert e computes
/// `down_e(silu(gate_e(x)) * up_e(x))` (Mixtral's `w2(silu(w1 x) * w3 x)`).
#[derive(Module, Debug)]
pub struct Experts {
    /// Gate projections (Mixtral `w1`, Qwen2-MoE `gate_proj`). `[E, d_model, d_expert]`
    pub gate_proj: Param<Tensor<3>>,
    /// Up projections (Mixtral `w3`, Qwen2-MoE `up_proj`). `[E, d_model, d_expert]`
    pub up_proj: Param<Tensor<3>>,
    /// Down projections (Mixtral `w2`, Qwen2-MoE `down_proj`). `[E, d_expert, d_model]`
    pub down_proj: Param<Tensor<3>>,
}

impl Experts {
    /// `num_experts` experts of hidden width `d_expert`, weights from N(0, std).
    pub fn new(
        num_experts: usize,
        d_model: usize,
        d_expert: usize,
        std: f64,
        device: &Device,
    ) -> Self {
        // Drawn on first use, like Burn's layers (see `LanguageModel::new`).
        let init = |shape: [usize; 3]| Initializer::Normal { mean: 0.0, std }.init(shape, device);
        Self {
            gate_proj: init([num_experts, d_model, d_expert]),
            up_proj: init([num_experts, d_model, d_expert]),
            down_proj: init([num_experts, d_expert, d_model]),
        }
    }

    /// Run every expert on its own buffer.
    ///
    /// # Shapes
    /// - `x`: `[E, C, d_model]` → `[E, C, d_model]`
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let dt = x.dtype();
        let w = |p: &Param<Tensor<3>>| in_dtype(p.val(), dt);
        let h = silu(x.clone().matmul(w(&self.gate_proj))) * x.matmul(w(&self.up_proj)); // [E, C, F]
        h.matmul(w(&self.down_proj))
    }

    /// Run every expert on its rows of `x`, grouped by expert: rows
    /// `offsets[e]..offsets[e + 1]` go through expert e, with no padding
    /// (see [`crate::kernels::grouped_swiglu`]); the weights run in x's
    /// dtype.
    ///
    /// # Shapes
    /// - `x`: `[N, d_model]` → `[N, d_model]`; `offsets`: `E + 1` values
    pub fn forward_grouped(&self, x: Tensor<2>, offsets: Vec<usize>) -> Tensor<2> {
        let dt = x.dtype();
        let w = |p: &Param<Tensor<3>>| in_dtype(p.val(), dt);
        grouped_swiglu(
            x,
            w(&self.gate_proj),
            w(&self.up_proj),
            w(&self.down_proj),
            offsets,
        )
    }
}
