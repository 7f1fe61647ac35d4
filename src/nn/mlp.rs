//! The SwiGLU feed-forward network (Shazeer 2020, "GLU Variants Improve
//! Transformer"): `down(silu(gate(x)) * up(x))`, used by dense blocks and by
//! shared experts. Field names follow the Hugging Face Qwen2/Llama keys.

use super::linear::{apply, in_dtype, linear};
use crate::kernels::{grouped_swiglu, served_on, Op};
use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::activation::silu;

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
        if served_on(Op::GroupedSwiglu, &x.device(), x.dtype()) {
            // The three projections and SwiGLU as one fused operation (the
            // grouped expert kernel with a single expert), on the CPU and
            // on a GPU.
            let dims = x.dims();
            let d = dims[D - 1];
            let n = x.shape().num_elements() / d;
            let dt = x.dtype();
            let w = |l: &Linear| in_dtype(l.weight.val(), dt).unsqueeze::<3>();
            let y = grouped_swiglu(
                x.reshape([n, d]),
                w(&self.gate_proj),
                w(&self.up_proj),
                w(&self.down_proj),
                vec![0, n],
            );
            return y.reshape(dims);
        }
        let h = silu(apply(&self.gate_proj, x.clone())) * apply(&self.up_proj, x);
        apply(&self.down_proj, h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::activation::silu;
    use burn::tensor::Distribution;

    /// The fused CPU forward against the three Linear layers and SiLU, in
    /// value and in the gradients of the input and every weight.
    #[test]
    fn fused_forward_matches_the_composed_mlp() {
        let device = Device::flex().autodiff();
        let mlp = Mlp::new(12, 20, 0.3, &device);
        let x =
            Tensor::<3>::random([2, 5, 12], Distribution::Normal(0.0, 1.0), &device).require_grad();
        let w = Tensor::<3>::random([2, 5, 12], Distribution::Normal(0.0, 1.0), &device);
        let ours = mlp.forward(x.clone());
        let h = silu(mlp.gate_proj.forward(x.clone())) * mlp.up_proj.forward(x.clone());
        let want = mlp.down_proj.forward(h);
        let diff = |a: Tensor<3>, b: Tensor<3>| (a - b).abs().max().into_scalar::<f32>();
        assert!(diff(ours.clone(), want.clone()) < 1e-5);
        let g1 = (ours * w.clone()).sum().backward();
        let g2 = (want * w).sum().backward();
        assert!(diff(x.grad(&g1).unwrap(), x.grad(&g2).unwrap()) < 1e-5);
        for l in [&mlp.gate_proj, &mlp.up_proj, &mlp.down_proj] {
            let (a, b) = (l.weight.grad(&g1).unwrap(), l.weight.grad(&g2).unwrap());
            assert!((a - b).abs().max().into_scalar::<f32>() < 1e-5);
        }
    }
}
