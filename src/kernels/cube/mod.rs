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
//! and RoPE ([`norm`]), AdamW ([`adamw`]) and the routed experts over rows
//! grouped by expert ([`grouped`]). The other operations keep Burn's composed path there:
//! [`super::served_on`] routes them, and says which operation a backend
//! serves.

pub mod adamw;
pub mod attention;
pub mod grouped;
pub mod head;
pub mod norm;

use super::{FusedKernels, FusedOps, GroupedSaved};
use burn::backend::ops::{FloatTensorOps, IntTensorOps};
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{backend_extension, Backend, Cube};
use burn::tensor::Shape;
use burn_cubecl::CubeBackend;

/// The CubeCL kernels, as a backend extension.
#[backend_extension(Cube, Fusion)]
pub trait CubeKernels: Backend {
    /// Causal grouped-query attention on `q: [B, S, H, hd]`,
    /// `k, v: [B, S, KV, hd]`: the output `[B, S, H, hd]` and each query
    /// row's log-sum-exp `[B, H, S]`.
    #[fusion(meta = |q, _k, _v| {
        let [b, s, h, _] = q.shape.dims::<4>();
        (q.clone(), burn::backend::fusion::custom::TensorSpec::new(
            burn::tensor::Shape::new([b, h, s]), q.dtype))
    })]
    fn flash_attention_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// The gradients of q, k and v of [`CubeKernels::flash_attention_forward`].
    #[fusion(meta = |q, k, v, _out, _lse, _grad| (q.clone(), k.clone(), v.clone()))]
    fn flash_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// The LM head's weighted loss `Σ_i weights[i] · nll_i` (`[1]`) of the
    /// logits `x · w` (`x: [n, d]`, `w: [d, V]`) and its gradients of x and
    /// w, in chunks of rows.
    #[fusion(meta = |x, w, _targets, _weights| (
        burn::backend::fusion::custom::TensorSpec::new(burn::tensor::Shape::new([1]), x.dtype),
        x.clone(),
        w.clone(),
    ))]
    fn head_loss_and_grads(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        targets: IntTensor<Self>,
        weights: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// Each row's loss of the logits `x · w` (`[n]`), in chunks of rows.
    #[fusion(meta = |x, _w, _targets| burn::backend::fusion::custom::TensorSpec::new(
        burn::tensor::Shape::new([x.shape.dims::<2>()[0]]),
        x.dtype,
    ))]
    fn head_row_losses(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> FloatTensor<Self>;

    /// RMSNorm over the last dimension and each row's `1 / rms` (`[rows]`).
    #[fusion(meta = |x, _gamma, _eps| {
        let d = x.shape[x.shape.num_dims() - 1].max(1);
        (x.clone(), burn::backend::fusion::custom::TensorSpec::new(
            burn::tensor::Shape::new([x.shape.num_elements() / d]), x.dtype))
    })]
    fn gpu_rms_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        eps: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// The gradients of x and gamma of [`CubeKernels::gpu_rms_norm`].
    #[fusion(meta = |x, gamma, _inv, _grad| (x.clone(), gamma.clone()))]
    fn gpu_rms_norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        inv_rms: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// The routed experts' SwiGLU over rows grouped by expert (host row
    /// offsets `[E + 1]`): the output `[N, d]` and the gate, up and SwiGLU
    /// rows `[N, F]` for the backward.
    #[fusion(meta = |x, gate, _up, _down, _offsets| {
        let (n, f) = (x.shape.dims::<2>()[0], gate.shape.dims::<3>()[2]);
        let rows = burn::backend::fusion::custom::TensorSpec::new(
            burn::tensor::Shape::new([n, f]), x.dtype);
        (x.clone(), rows.clone(), rows.clone(), rows)
    })]
    #[allow(clippy::type_complexity)]
    fn gpu_grouped_swiglu(
        x: FloatTensor<Self>,
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        down: FloatTensor<Self>,
        offsets: Vec<usize>,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    );

    /// The gradients of x, gate, up and down of
    /// [`CubeKernels::gpu_grouped_swiglu`].
    #[fusion(meta = |x, gate, up, down, _g, _u, _h, _grad, _offsets| {
        (x.clone(), gate.clone(), up.clone(), down.clone())
    })]
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn gpu_grouped_swiglu_backward(
        x: FloatTensor<Self>,
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        down: FloatTensor<Self>,
        g: FloatTensor<Self>,
        u: FloatTensor<Self>,
        h: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        offsets: Vec<usize>,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    );

    /// One AdamW update of a flat parameter: the new parameter and moments
    /// (see [`FusedOps::adamw_update`]).
    #[fusion(meta = |param, _grad, m, v, _scale, _hyper| (param.clone(), m.clone(), v.clone()))]
    fn gpu_adamw(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        m: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        hyper: [f32; 7],
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// RoPE on `[B, S, H, hd]` from `[S, hd]` tables, or (`inverse`) its
    /// transpose.
    #[fusion(meta = |x, _cos, _sin, _inverse| x.clone())]
    fn gpu_rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        inverse: bool,
    ) -> FloatTensor<Self>;
}

impl CubeKernels for CubeBackend {
    fn flash_attention_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        attention::forward(q, k, v)
    }

    fn flash_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let [dq, dk, dv] = attention::backward([q, k, v], out, lse, grad);
        (dq, dk, dv)
    }

    fn head_loss_and_grads(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        targets: IntTensor<Self>,
        weights: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        head::loss_and_grads(x, w, targets, weights)
    }

    fn head_row_losses(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        head::row_losses(x, w, targets)
    }

    fn gpu_rms_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        eps: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        norm::rms_norm_forward(x, gamma, eps)
    }

    fn gpu_rms_norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        inv_rms: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        norm::rms_norm_backward(x, gamma, inv_rms, grad)
    }

    fn gpu_rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        inverse: bool,
    ) -> FloatTensor<Self> {
        norm::rope(x, cos, sin, inverse)
    }

    fn gpu_adamw(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        m: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        hyper: [f32; 7],
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        adamw::update([param, grad, m, v, scale], hyper)
    }

    fn gpu_grouped_swiglu(
        x: FloatTensor<Self>,
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        down: FloatTensor<Self>,
        offsets: Vec<usize>,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    ) {
        let (y, [g, u, h]) = grouped::forward(x, [gate, up, down], &offsets);
        (y, g, u, h)
    }

    fn gpu_grouped_swiglu_backward(
        x: FloatTensor<Self>,
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        down: FloatTensor<Self>,
        g: FloatTensor<Self>,
        u: FloatTensor<Self>,
        h: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        offsets: Vec<usize>,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    ) {
        let [dx, dgate, dup, ddown] =
            grouped::backward(x, [gate, up, down], &offsets, [g, u, h], grad);
        (dx, dgate, dup, ddown)
    }
}

/// The row offsets of a grouping, read to the host (a device sync, like
/// the dispatch plan's read that made them).
fn host_offsets(offsets: IntTensor<Cube>) -> Vec<usize> {
    let data = cubecl::future::block_on(Cube::int_into_data(offsets))
        .unwrap_or_else(|e| panic!("reading the expert row offsets from the device failed: {e:?}"));
    data.convert::<i64>()
        .try_to_vec::<i64>()
        .unwrap_or_else(|e| panic!("expert row offsets: {e:?}"))
        .into_iter()
        .map(|o| o as usize)
        .collect()
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

    fn sum_squares(_: FloatTensor<Self>) -> FloatTensor<Self> {
        not_served("sum_squares")
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
        offsets: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        Self::gpu_grouped_swiglu(x, gate, up, down, host_offsets(offsets)).0
    }

    fn combine_rows(
        _: FloatTensor<Self>,
        _: IntTensor<Self>,
        _: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        not_served("combine_rows")
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
        offsets: IntTensor<Self>,
    ) -> (FloatTensor<Self>, GroupedSaved<Self>) {
        let (y, g, u, h) = Self::gpu_grouped_swiglu(x, gate, up, down, host_offsets(offsets));
        (y, [g, u, h])
    }

    fn grouped_swiglu_backward(
        x: FloatTensor<Self>,
        [gate, up, down]: [FloatTensor<Self>; 3],
        offsets: IntTensor<Self>,
        [g, u, h]: GroupedSaved<Self>,
        grad: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 4] {
        let offsets = host_offsets(offsets);
        let (dx, dgate, dup, ddown) =
            Self::gpu_grouped_swiglu_backward(x, gate, up, down, g, u, h, grad, offsets);
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

    /// The forward's gradients times the loss gradient (`[1]`, broadcast).
    fn linear_cross_entropy_backward(
        dx: FloatTensor<Self>,
        dw: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 2] {
        let g = Self::float_reshape(grad, Shape::new([1, 1]));
        [Self::float_mul(dx, g.clone()), Self::float_mul(dw, g)]
    }

    fn combine_rows_backward(
        _: FloatTensor<Self>,
        _: IntTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 2] {
        not_served("combine_rows")
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
