//! The GPU side of the fused operations: CubeCL kernels for the Cube
//! backends (CUDA and wgpu, one source for both).
//!
//! [`CubeKernels`] holds the kernels, as a backend extension of the Cube
//! backend and of Burn's operation fusion over it, which schedules each
//! kernel in its stream like any other operation. [`FusedOps`] and
//! [`FusedKernels`] are then implemented for the Cube backend on top of it,
//! so that the autodiff implementation in [`super::autodiff`], the one the
//! CPU uses, records the same backward steps on a GPU.
//!
//! Served on the GPU so far: causal grouped-query attention
//! ([`attention`]), the LM head with its cross-entropy ([`head`]), RMSNorm
//! and RoPE ([`norm`]), AdamW ([`adamw`]), the routed experts over rows
//! grouped by expert ([`grouped`], with the SwiGLU fused into a tiled
//! matmul as an option: [`grouped_fused`]), the combine of their outputs
//! ([`combine`]) and the gradient norm's sum of squares ([`adamw`]). The
//! other operations keep Burn's
//! composed path there: [`super::served_on`] says which operation a
//! backend serves, and the callers route by it.

pub mod adamw;
pub mod attention;
pub mod attention_grad;
pub mod combine;
mod extension;
pub mod grouped;
pub mod grouped_fused;
pub mod head;
pub mod norm;
mod swiglu;

pub use extension::CubeKernels;

use super::{FusedKernels, FusedOps, GroupedSaved};
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::Cube;
use burn::tensor::Shape;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::CubeCount;
use cubecl::{calculate_cube_count_elemwise, CubeDim};

/// Give this process its own CubeCL environment, `<name>-rank<rank>`: the
/// on-disk database in which CubeCL keeps autotune results and compiled
/// kernels. Processes of one run that share a machine (or a home directory)
/// would otherwise write one database at once, which CubeCL does not
/// survive. Call before any Cube device is made; later, CubeCL's settings
/// are fixed and this returns false. The environment's name comes from
/// CubeCL's own settings (`cubecl.toml`, `CUBECL_ENVIRONMENT`), so a run
/// that names one keeps it, per rank.
pub fn own_cache_per_rank(rank: usize) -> bool {
    use cubecl::config::{CubeClRuntimeConfig, RuntimeConfig};
    let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
    config.environment.name = format!("{}-rank{rank}", config.environment.name);
    CubeClRuntimeConfig::try_set(config)
}

/// A new tensor of `shape` on `t`'s device and in its dtype, values unset.
fn empty_like(t: &CubeTensor, shape: Shape) -> CubeTensor {
    empty_device_dtype(t.client.clone(), t.device.clone(), shape, t.dtype)
}

/// A new f32 tensor of `shape` on `t`'s device, values unset (the f32
/// statistics of kernels whose tensors may be f16 or bf16).
fn empty_f32_like(t: &CubeTensor, shape: Shape) -> CubeTensor {
    empty_device_dtype(
        t.client.clone(),
        t.device.clone(),
        shape,
        burn::tensor::DType::F32,
    )
}

/// The launch of one unit per element for `n` elements (at least one unit)
/// on `t`'s device: the cube count and the cube size.
fn launch_elementwise(t: &CubeTensor, n: usize) -> (CubeCount, CubeDim) {
    let dim = CubeDim::new(&t.client, n.max(1));
    (calculate_cube_count_elemwise(&t.client, n.max(1), dim), dim)
}

/// An operation [`super::served_on`] keeps off the Cube backends reached
/// them anyway: a routing bug, reported as such.
fn not_served(op: &str) -> ! {
    panic!(
        "{op} has no GPU kernel yet and takes Burn's composed path on the Cube backends; \
         kernels::served_on should not have sent it here"
    )
}

impl FusedOps for Cube {
    fn cross_entropy_rows(_: FloatTensor<Self>, _: IntTensor<Self>) -> FloatTensor<Self> {
        not_served("cross_entropy_rows")
    }

    fn fused_linear(_: FloatTensor<Self>, _: FloatTensor<Self>) -> FloatTensor<Self> {
        not_served("fused_linear")
    }

    /// Without autodiff the gradients are made and dropped: the loss alone
    /// costs the same matmul and row pass.
    fn linear_cross_entropy(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        targets: IntTensor<Self>,
        weights: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        Self::head_loss_and_grads(x, w, targets, weights).0
    }

    fn linear_cross_entropy_rows(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        Self::head_row_losses(x, w, targets)
    }

    fn adamw_update(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        m: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        hyper: [f32; 7],
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        Self::gpu_adamw(param, grad, m, v, scale, hyper)
    }

    fn sum_squares(x: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::gpu_sum_squares(x)
    }

    fn rms_norm(x: FloatTensor<Self>, gamma: FloatTensor<Self>, eps: f32) -> FloatTensor<Self> {
        Self::gpu_rms_norm(x, gamma, eps).0
    }

    fn rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        Self::gpu_rope(x, cos, sin, false)
    }

    fn causal_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        Self::flash_attention_forward(q, k, v).0
    }

    fn grouped_swiglu(
        x: FloatTensor<Self>,
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        down: FloatTensor<Self>,
        offsets: Vec<usize>,
        fused: bool,
    ) -> FloatTensor<Self> {
        Self::gpu_grouped_swiglu(x, gate, up, down, offsets, fused).0
    }

    fn combine_rows(
        rows: FloatTensor<Self>,
        index: IntTensor<Self>,
        weights: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        Self::gpu_combine_rows(rows, index, weights)
    }
}

impl FusedKernels for Cube {
    fn cross_entropy_rows_lse(
        _: FloatTensor<Self>,
        _: IntTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        not_served("cross_entropy_rows")
    }

    fn grouped_swiglu_forward(
        x: FloatTensor<Self>,
        [gate, up, down]: [FloatTensor<Self>; 3],
        offsets: Vec<usize>,
        fused: bool,
    ) -> (FloatTensor<Self>, GroupedSaved<Self>) {
        let (y, g, u, h) = Self::gpu_grouped_swiglu(x, gate, up, down, offsets, fused);
        (y, [g, u, h])
    }

    fn grouped_swiglu_backward(
        x: FloatTensor<Self>,
        [gate, up, down]: [FloatTensor<Self>; 3],
        offsets: Vec<usize>,
        fused: bool,
        [g, u, h]: GroupedSaved<Self>,
        grad: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 4] {
        let (dx, dgate, dup, ddown) =
            Self::gpu_grouped_swiglu_backward(x, gate, up, down, g, u, h, grad, offsets, fused);
        [dx, dgate, dup, ddown]
    }

    fn rms_norm_forward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        eps: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        Self::gpu_rms_norm(x, gamma, eps)
    }

    fn rms_norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        inv_rms: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        Self::gpu_rms_norm_backward(x, gamma, inv_rms, grad)
    }

    fn rope_backward(
        grad: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        Self::gpu_rope(grad, cos, sin, true)
    }

    /// The output and each query row's log-sum-exp (not the probabilities).
    fn causal_attention_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        Self::flash_attention_forward(q, k, v)
    }

    fn causal_attention_backward(
        [q, k, v]: [FloatTensor<Self>; 3],
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 3] {
        let (dq, dk, dv) = Self::flash_attention_backward(q, k, v, out, lse, grad);
        [dq, dk, dv]
    }

    fn fused_linear_backward(
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 2] {
        not_served("fused_linear")
    }

    fn linear_cross_entropy_forward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        targets: IntTensor<Self>,
        weights: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 3] {
        let (loss, dx, dw) = Self::head_loss_and_grads(x, w, targets, weights);
        [loss, dx, dw]
    }

    /// The forward's gradients times the loss gradient (`[1]`, f32,
    /// broadcast), in the gradients' dtype.
    fn linear_cross_entropy_backward(
        dx: FloatTensor<Self>,
        dw: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 2] {
        use burn::backend::TensorMetadata;
        let mut g = Self::float_reshape(grad, Shape::new([1, 1]));
        let dtype = dx.dtype();
        if TensorMetadata::dtype(&g) != dtype {
            g = Self::float_cast(g, dtype.into());
        }
        [Self::float_mul(dx, g.clone()), Self::float_mul(dw, g)]
    }

    fn combine_rows_backward(
        rows: FloatTensor<Self>,
        index: IntTensor<Self>,
        weights: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 2] {
        let (d_rows, d_weights) = Self::gpu_combine_rows_backward(rows, index, weights, grad);
        [d_rows, d_weights]
    }

    fn cross_entropy_rows_backward(
        _: FloatTensor<Self>,
        _: IntTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        not_served("cross_entropy_rows")
    }
}
