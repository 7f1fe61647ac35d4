//! Fused operations with hand-written backward passes: the CPU kernels and,
//! with a GPU feature, the GPU ones.
//!
//! Under autodiff Burn builds SiLU, softmax and log-softmax from several
//! full-size tensor operations, each with its own allocation, its own
//! backward step and (on the CPU backend) a single thread; and it has no
//! grouped matmul. The operations here replace the largest of those chains
//! in a training step:
//!
//! - [`grouped_swiglu`]: every expert's SwiGLU MLP over exactly its tokens
//!   (and the dense MLP, as one expert), matmuls and activation in one
//!   operation ([`cpu::grouped`]);
//! - [`causal_attention`]: grouped-query causal attention ([`cpu::attention`]);
//! - [`linear_cross_entropy`]: the LM head and the per-token cross-entropy
//!   in cache-sized chunks of rows, never writing the full logits
//!   ([`cpu::head`]); [`cross_entropy_rows`] for logits made elsewhere;
//! - [`combine_rows`]: the weighted sum of each token's expert outputs
//!   ([`cpu::grouped`]);
//! - [`linear`]: a bias-free linear layer's matmul;
//! - [`adamw_update`] and [`sum_squares`]: the optimizer update and the
//!   gradient norm, one pass each (no autodiff involved).
//!
//! Each is a Burn backend extension implemented for the CPU backend (`Flex`)
//! and for `Autodiff` over it, whose backward is one fused kernel (see
//! [`cpu`]). The GPU (Cube) backends implement the same extension with
//! CubeCL kernels in `cube/` (with the `wgpu` or `cuda` feature), for the
//! operations [`served_on`] lists; everywhere else, and for dtypes other
//! than f32, the callers compose the same result from Burn's tensor
//! operations.

mod autodiff;
pub mod cpu;
#[cfg(feature = "gpu-kernels")]
pub mod cube;
mod optim;
mod raw;
mod routing;

pub use optim::{adamw_update, sum_squares, AdamWStep};
pub use raw::{FusedKernels, GroupedSaved};
pub use routing::{
    fused_on, fused_swiglu, on_cpu, on_cube, served_on, use_fused_swiglu, use_gpu_kernels, Op,
    GPU_MAX_HEAD_DIM,
};

use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{backend_extension, Backend, Dispatch};
use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use burn::tensor::DType;

/// The fused operations, as a backend extension.
#[backend_extension(Flex, Autodiff, Cube: cfg(feature = "gpu-kernels"))]
pub trait FusedOps: Backend {
    /// `logsumexp(logits[i]) - logits[i, targets[i]]` for `[n, v]` logits.
    fn cross_entropy_rows(logits: FloatTensor<Self>, targets: IntTensor<Self>)
        -> FloatTensor<Self>;
    /// `x · w` for `x: [n, d_in]`, `w: [d_in, d_out]`.
    fn fused_linear(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self>;
    /// `Σ_i weights[i] · cross_entropy_rows(x · w, targets)[i]` (`[1]`) for
    /// `x: [n, d]`, `w: [d, v]`, without materialising the `[n, v]` logits.
    /// The weights (`[n]`) carry no gradient.
    fn linear_cross_entropy(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        targets: IntTensor<Self>,
        weights: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
    /// Each row's `cross_entropy_rows(x · w, targets)` (`[n]`) without
    /// materialising the logits; carries no gradient (evaluation only).
    fn linear_cross_entropy_rows(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> FloatTensor<Self>;
    /// One AdamW update of a flat parameter: returns the new parameter and
    /// moments. `scale` (`[1]`) multiplies the gradient first.
    #[allow(clippy::too_many_arguments)]
    fn adamw_update(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        m: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        hyper: [f32; 7],
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
    /// Sum of squared entries. `[1]`
    fn sum_squares(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// RMSNorm over the last dimension: `x / √(mean(x²) + eps) · gamma`.
    fn rms_norm(x: FloatTensor<Self>, gamma: FloatTensor<Self>, eps: f32) -> FloatTensor<Self>;
    /// RoPE (`rotate_half` pairing) on `[B, S, H, hd]` with `[S, hd]`
    /// tables; the tables carry no gradient.
    fn rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
    /// Causal attention `softmax(q kᵀ / √hd) v` with grouped key/value heads,
    /// sequence-major: `q: [B, S, H, hd]`, `k, v: [B, S, KV, hd]`, output
    /// `[B, S, H, hd]`; query head i reads key/value head i / (H / KV).
    fn causal_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
    /// SwiGLU experts over rows grouped by expert: rows
    /// `offsets[e]..offsets[e + 1]` of `x` (`[N, d]`) go through expert e of
    /// the stacked `gate`, `up` (`[E, d, F]`) and `down` (`[E, F, d]`). The
    /// `E + 1` offsets are host values, so no backend reads them back.
    /// `fused`: on the GPU, the SwiGLU in the epilogue of switchyard's own
    /// tiled matmul (forward and backward) rather than CubeCL's matmuls
    /// and a separate pass; the CPU kernel ignores it.
    fn grouped_swiglu(
        x: FloatTensor<Self>,
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        down: FloatTensor<Self>,
        offsets: Vec<usize>,
        fused: bool,
    ) -> FloatTensor<Self>;
    /// `out[t] = Σ_j weights[t, j] · rows[index[t·k + j]]` for `rows: [R, d]`,
    /// `index: [T·k]` and `weights: [T, k]`; an index outside the rows adds
    /// nothing.
    fn combine_rows(
        rows: FloatTensor<Self>,
        index: IntTensor<Self>,
        weights: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
}

/// Per-row cross-entropy `logsumexp(logits[i]) - logits[i, targets[i]]`.
///
/// # Shapes
/// - `logits`: `[n, v]`; `targets`: `[n]`; returns `[n]`
pub fn cross_entropy_rows(logits: Tensor<2>, targets: Tensor<1, Int>) -> Tensor<1> {
    if fused_on(&logits.device(), logits.dtype()) {
        let out = <Dispatch as FusedOps>::cross_entropy_rows(
            logits.into_dispatch(),
            targets.into_dispatch(),
        );
        return Tensor::from_dispatch(out);
    }
    let [n, _] = logits.dims();
    let logp = log_softmax(logits, 1);
    logp.gather(1, targets.reshape([n, 1])).reshape([n]).neg()
}

/// `x · w` over the last dimension of x (a bias-free linear layer), on the
/// CPU backend in f32 (`None` elsewhere: the caller uses Burn's). Its
/// output buffer is zeroed across the pool and its backward is two matmuls.
///
/// # Shapes
/// - `x`: `[.., d_in]`; `w`: `[d_in, d_out]`; returns `[.., d_out]`
pub fn linear<const D: usize>(x: Tensor<D>, w: Tensor<2>) -> Option<Tensor<D>> {
    if !fused_on(&x.device(), x.dtype()) || w.dtype() != x.dtype() {
        return None;
    }
    let mut dims = x.dims();
    let [d_in, d_out] = w.dims();
    assert_eq!(
        dims[D - 1],
        d_in,
        "linear: x is {} wide, w has {d_in} rows",
        dims[D - 1]
    );
    let rows = dims[..D - 1].iter().product::<usize>();
    let y = <Dispatch as FusedOps>::fused_linear(
        x.reshape([rows, d_in]).into_dispatch(),
        w.into_dispatch(),
    );
    dims[D - 1] = d_out;
    Some(Tensor::<2>::from_dispatch(y).reshape(dims))
}

/// The weighted sum of the per-row cross-entropies of the logits `x · w`,
/// `Σ_i weights[i] · nll_i`, fused with the matmul in chunks of rows that
/// never make the full logits, on the CPU backend in f32 and the GPU
/// backends in f32, f16 and bf16 (`None` elsewhere: the caller makes the
/// logits). The weights (the loss mask, f32) carry no gradient; the loss
/// is f32.
///
/// # Shapes
/// - `x`: `[n, d]`; `w`: `[d, v]`; `targets`, `weights`: `[n]`; returns `[1]`
pub fn linear_cross_entropy(
    x: Tensor<2>,
    w: Tensor<2>,
    targets: Tensor<1, Int>,
    weights: Tensor<1>,
) -> Option<Tensor<1>> {
    // The row weights and the loss are f32 whatever x's dtype.
    let same_dtype = w.dtype() == x.dtype() && weights.dtype() == DType::F32;
    if !served_on(Op::LinearCrossEntropy, &x.device(), x.dtype()) || !same_dtype {
        return None;
    }
    let out = <Dispatch as FusedOps>::linear_cross_entropy(
        x.into_dispatch(),
        w.into_dispatch(),
        targets.into_dispatch(),
        weights.into_dispatch(),
    );
    Some(Tensor::from_dispatch(out))
}

/// Each row's cross-entropy of the logits `x · w` (f32), with no gradient,
/// without the `[n, v]` logits, on the CPU backend in f32 and the GPU
/// backends in f32, f16 and bf16 (`None` elsewhere: the caller makes the
/// logits).
///
/// # Shapes
/// - `x`: `[n, d]`; `w`: `[d, v]`; `targets`: `[n]`; returns `[n]`
pub fn linear_cross_entropy_rows(
    x: Tensor<2>,
    w: Tensor<2>,
    targets: Tensor<1, Int>,
) -> Option<Tensor<1>> {
    if !served_on(Op::LinearCrossEntropy, &x.device(), x.dtype()) || w.dtype() != x.dtype() {
        return None;
    }
    let out = <Dispatch as FusedOps>::linear_cross_entropy_rows(
        x.into_dispatch(),
        w.into_dispatch(),
        targets.into_dispatch(),
    );
    Some(Tensor::from_dispatch(out))
}

/// Whether [`causal_attention`] serves queries `q: [B, S, H, hd]`: on the
/// CPU backend in f32, and on the GPU backends in f32 for heads up to
/// [`GPU_MAX_HEAD_DIM`] wide.
pub fn attention_served(q: &Tensor<4>) -> bool {
    let device = q.device();
    served_on(Op::CausalAttention, &device, q.dtype())
        && (on_cpu(&device) || q.dims()[3] <= GPU_MAX_HEAD_DIM)
}

/// Causal attention `softmax(q kᵀ / √hd) v` with grouped key/value heads,
/// fused on the CPU backend (f32) and on the GPU backends (f32, f16, bf16:
/// check [`attention_served`] first). Key/value head j serves query heads
/// `j·H/KV .. (j+1)·H/KV`; nothing is repeated. On a GPU no `[S, S]` tensor
/// is made, forward or backward ([`cube::attention`]); heads wider than
/// [`GPU_MAX_HEAD_DIM`] are refused there.
///
/// # Shapes
/// - `q`: `[B, S, H, hd]`; `k`, `v`: `[B, S, KV, hd]` → `[B, S, H, hd]`
///   (sequence-major, as the projections produce them)
pub fn causal_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
    assert!(
        attention_served(&q),
        "the fused causal_attention runs on the CPU and GPU backends in f32, on a GPU for \
         heads up to {GPU_MAX_HEAD_DIM} wide (these are {})",
        q.dims()[3]
    );
    let out = <Dispatch as FusedOps>::causal_attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
    );
    Tensor::from_dispatch(out)
}

/// SwiGLU experts over rows grouped by expert, with one matmul per expert
/// and projection over exactly its rows (the CPU backend in f32, the GPU
/// backends in f32, f16 and bf16: check [`served_on`] first). The row offsets are host values, known
/// from the dispatch plan, so a GPU launches the experts without reading
/// anything back.
///
/// # Shapes
/// - `x`: `[N, d]`, rows `offsets[e]..offsets[e + 1]` for expert e
/// - `gate`, `up`: `[E, d, F]`; `down`: `[E, F, d]`; `offsets`: `E + 1`
///   values rising from 0 to N
/// - returns `[N, d]`
///
/// On a GPU backend the SwiGLU runs fused into the matmuls' epilogue
/// where [`use_fused_swiglu`] (`train.gpu_fused_swiglu`) says so; see
/// [`grouped_swiglu_with`].
pub fn grouped_swiglu(
    x: Tensor<2>,
    gate: Tensor<3>,
    up: Tensor<3>,
    down: Tensor<3>,
    offsets: Vec<usize>,
) -> Tensor<2> {
    grouped_swiglu_with(x, gate, up, down, offsets, fused_swiglu())
}

/// [`grouped_swiglu`] with the GPU's choice given: `fused` runs the gate
/// and up projections with their SwiGLU, and in the backward the gradient
/// through the down projection with the SwiGLU's derivative, each as one
/// tiled kernel over all experts (`src/kernels/cube/grouped_fused.rs`); otherwise
/// CubeCL's matmuls with a separate SwiGLU pass. The CPU ignores it.
pub fn grouped_swiglu_with(
    x: Tensor<2>,
    gate: Tensor<3>,
    up: Tensor<3>,
    down: Tensor<3>,
    offsets: Vec<usize>,
    fused: bool,
) -> Tensor<2> {
    assert!(
        served_on(Op::GroupedSwiglu, &x.device(), x.dtype()),
        "grouped_swiglu runs on the CPU backend in f32 and the GPU backends (see served_on)"
    );
    let out = <Dispatch as FusedOps>::grouped_swiglu(
        x.into_dispatch(),
        gate.into_dispatch(),
        up.into_dispatch(),
        down.into_dispatch(),
        offsets,
        fused,
    );
    Tensor::from_dispatch(out)
}

/// The weighted sum of each token's k expert-output rows,
/// `out[t] = Σ_j weights[t, j] · rows[index[t·k + j]]`, where an index of R
/// (the row count) adds nothing (the CPU backend in f32, the GPU backends
/// in f32, f16 and bf16: check [`served_on`] first). Forward and backward are one pass each; the
/// backward assumes what the dispatch plans guarantee, that no row is read
/// twice (the CPU falls back to one thread otherwise; the GPU requires it).
///
/// # Shapes
/// - `rows`: `[R, d]`; `index`: `[T * k]`; `weights`: `[T, k]`; returns `[T, d]`
pub fn combine_rows(rows: Tensor<2>, index: Tensor<1, Int>, weights: Tensor<2>) -> Tensor<2> {
    assert!(
        served_on(Op::Combine, &rows.device(), rows.dtype()),
        "the fused combine_rows runs on the CPU backend in f32 and the GPU backends (see served_on)"
    );
    let out = <Dispatch as FusedOps>::combine_rows(
        rows.into_dispatch(),
        index.into_dispatch(),
        weights.into_dispatch(),
    );
    Tensor::from_dispatch(out)
}

/// RMSNorm over the last dimension, `x / √(mean(x²) + eps) · gamma`, fused
/// on the CPU and GPU backends in f32 (`None` elsewhere: the caller uses
/// Burn's).
pub fn rms_norm<const D: usize>(x: Tensor<D>, gamma: Tensor<1>, eps: f64) -> Option<Tensor<D>> {
    if !served_on(Op::RmsNorm, &x.device(), x.dtype()) || gamma.dtype() != x.dtype() {
        return None;
    }
    let out =
        <Dispatch as FusedOps>::rms_norm(x.into_dispatch(), gamma.into_dispatch(), eps as f32);
    Some(Tensor::from_dispatch(out))
}

/// RoPE with `rotate_half` pairing on `[B, S, H, hd]`, from `[S, hd]` cos
/// and sin tables (in x's dtype), fused on the CPU backend in f32 and the
/// GPU backends in f32, f16 and bf16 (`None` elsewhere).
pub fn rope(x: Tensor<4>, cos: Tensor<2>, sin: Tensor<2>) -> Option<Tensor<4>> {
    if !served_on(Op::Rope, &x.device(), x.dtype()) || cos.dtype() != x.dtype() {
        return None;
    }
    let out =
        <Dispatch as FusedOps>::rope(x.into_dispatch(), cos.into_dispatch(), sin.into_dispatch());
    Some(Tensor::from_dispatch(out))
}
