//! Fused operations with hand-written backward passes, for the CPU backend.
//!
//! Under autodiff Burn builds SiLU, softmax and log-softmax from several
//! full-size tensor operations, each with its own allocation, its own
//! backward step and (on the CPU backend) a single thread; and it has no
//! grouped matmul. The operations here replace the largest of those chains
//! in a training step:
//!
//! - [`grouped_swiglu`]: every expert's SwiGLU MLP over exactly its tokens
//!   (and the dense MLP, as one expert), matmuls and activation in one
//!   operation ([`grouped`]);
//! - [`causal_attention`]: grouped-query causal attention ([`attention`]);
//! - [`swiglu`] and [`causal_softmax`]: the activation and the masked
//!   softmax alone, for the paths that do not use the two above;
//! - [`cross_entropy_rows`]: per-token cross-entropy from the LM head's
//!   logits;
//! - [`adamw_update`] and [`sum_squares`]: the optimizer update and the
//!   gradient norm, one pass each (no autodiff involved).
//!
//! Each is a Burn backend extension implemented for the CPU backend (`Flex`)
//! and for `Autodiff` over it, whose backward is one fused kernel (see
//! [`cpu`]). On every other backend, and for dtypes other than f32, the
//! callers compose the same result from Burn's tensor operations, so GPU
//! backends keep the path their own fusion is built for.

pub mod attention;
pub mod cpu;
pub mod grouped;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{backend_extension, Autodiff, AutodiffBackend, Backend, Dispatch, Flex};
use burn::prelude::*;
use burn::tensor::activation::{log_softmax, silu, softmax};
use burn::tensor::{DType, TensorData};

/// The fused operations, as a backend extension.
#[backend_extension(Flex, Autodiff)]
pub trait FusedOps: Backend {
    /// `silu(gate) * up`, element-wise; both of one shape.
    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self>;
    /// Softmax over the last dimension of each `[rows, cols]` matrix, where
    /// row r sees only columns `0..=offset + r`.
    fn causal_softmax(scores: FloatTensor<Self>, offset: usize) -> FloatTensor<Self>;
    /// `logsumexp(logits[i]) - logits[i, targets[i]]` for `[n, v]` logits.
    fn cross_entropy_rows(logits: FloatTensor<Self>, targets: IntTensor<Self>)
        -> FloatTensor<Self>;
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
    /// RoPE (`rotate_half` pairing) on `[.., S, hd]` with `[S, hd]` tables;
    /// the tables carry no gradient.
    fn rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
    /// Causal attention `softmax(q kᵀ / √hd) v` with grouped key/value heads:
    /// `q: [B, H, S, hd]`, `k, v: [B, KV, S, hd]`, query head i reads
    /// key/value head i / (H / KV).
    fn causal_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
    /// SwiGLU experts over rows grouped by expert: rows
    /// `offsets[e]..offsets[e + 1]` of `x` (`[N, d]`) go through expert e of
    /// the stacked `gate`, `up` (`[E, d, F]`) and `down` (`[E, F, d]`).
    fn grouped_swiglu(
        x: FloatTensor<Self>,
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        down: FloatTensor<Self>,
        offsets: IntTensor<Self>,
    ) -> FloatTensor<Self>;
}

/// The raw kernels a backend provides for [`FusedOps`] under autodiff:
/// forwards that also return what their backward needs, and the backwards.
pub trait FusedKernels: Backend {
    /// [`FusedOps::cross_entropy_rows`] and the rows' log-sum-exp.
    fn cross_entropy_rows_lse(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// Gradients of `gate` and `up` given the output gradient.
    fn swiglu_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// Gradient of the scores from the probabilities and their gradient.
    fn causal_softmax_backward(
        probs: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        offset: usize,
    ) -> FloatTensor<Self>;
    /// [`FusedOps::grouped_swiglu`] and what its backward needs.
    fn grouped_swiglu_forward(
        x: FloatTensor<Self>,
        weights: [FloatTensor<Self>; 3],
        offsets: IntTensor<Self>,
    ) -> (FloatTensor<Self>, GroupedSaved<Self>);
    /// Gradients of x and the three weight stacks.
    fn grouped_swiglu_backward(
        x: FloatTensor<Self>,
        weights: [FloatTensor<Self>; 3],
        offsets: IntTensor<Self>,
        saved: GroupedSaved<Self>,
        grad: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 4];
    /// [`FusedOps::rms_norm`] and each row's `1 / rms`.
    fn rms_norm_forward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        eps: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// Gradients of x and gamma.
    fn rms_norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        inv_rms: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// The transpose of [`FusedOps::rope`] applied to a gradient.
    fn rope_backward(
        grad: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
    /// [`FusedOps::causal_attention`] and its probabilities `[B, H, S, S]`.
    fn causal_attention_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// Gradients of q, k and v from the inputs, the output, the
    /// probabilities and the output gradient.
    fn causal_attention_backward(
        qkv: [FloatTensor<Self>; 3],
        out: FloatTensor<Self>,
        probs: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 3];
    /// Gradient of the logits given each row's loss gradient.
    fn cross_entropy_rows_backward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
}

/// The `[N, F]` gate and up projections and SwiGLU output a grouped
/// forward keeps for its backward.
pub type GroupedSaved<B> = [FloatTensor<B>; 3];

/// Whether the fused kernels serve a float tensor on `device` of `dtype`:
/// the CPU backend (with or without autodiff) in f32.
pub fn fused_on(device: &Device, dtype: DType) -> bool {
    on_cpu(device) && dtype == DType::F32
}

/// Whether `device` is the CPU backend (with or without autodiff).
pub fn on_cpu(device: &Device) -> bool {
    device.clone().without_autodiff() == Device::flex()
}

/// `silu(gate) * up`.
pub fn swiglu<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    if fused_on(&gate.device(), gate.dtype()) {
        let out = <Dispatch as FusedOps>::swiglu(gate.into_dispatch(), up.into_dispatch());
        Tensor::from_dispatch(out)
    } else {
        silu(gate) * up
    }
}

/// Softmax over the last dimension, where row r of each `[rows, cols]`
/// matrix sees only columns `0..=offset + r` and gives the others 0.
pub fn causal_softmax<const D: usize>(scores: Tensor<D>, offset: usize) -> Tensor<D> {
    if fused_on(&scores.device(), scores.dtype()) {
        let out = <Dispatch as FusedOps>::causal_softmax(scores.into_dispatch(), offset);
        return Tensor::from_dispatch(out);
    }
    let dims = scores.dims();
    let (rows, cols) = (dims[D - 2], dims[D - 1]);
    let future = Tensor::<2, Bool>::tril_mask([rows, cols], offset as i64, &scores.device());
    let bias = Tensor::<2>::zeros([rows, cols], &scores.device())
        .mask_fill(future, f32::NEG_INFINITY)
        .cast(scores.dtype());
    softmax(scores + bias.unsqueeze::<D>(), D - 1)
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

/// AdamW's hyperparameters for one update, in the order [`cpu::adamw`]
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
/// one pass on the CPU backend; composed from tensor operations elsewhere.
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
        .all(|t| fused_on(&t.device(), t.dtype()));
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

/// Causal attention `softmax(q kᵀ / √hd) v` with grouped key/value heads,
/// fused on the CPU backend (f32 only: check [`fused_on`] first). Key/value
/// head j serves query heads `j·H/KV .. (j+1)·H/KV`; nothing is repeated.
///
/// # Shapes
/// - `q`: `[B, H, S, hd]`; `k`, `v`: `[B, KV, S, hd]` → `[B, H, S, hd]`
pub fn causal_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
    assert!(
        fused_on(&q.device(), q.dtype()),
        "the fused causal_attention runs on the CPU backend in f32"
    );
    let out = <Dispatch as FusedOps>::causal_attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
    );
    Tensor::from_dispatch(out)
}

/// SwiGLU experts over rows grouped by expert, with one matmul per expert
/// and projection over exactly its rows (CPU backend, f32 only: check
/// [`fused_on`] first).
///
/// # Shapes
/// - `x`: `[N, d]`, rows `offsets[e]..offsets[e + 1]` for expert e
/// - `gate`, `up`: `[E, d, F]`; `down`: `[E, F, d]`; `offsets`: `[E + 1]`
/// - returns `[N, d]`
pub fn grouped_swiglu(
    x: Tensor<2>,
    gate: Tensor<3>,
    up: Tensor<3>,
    down: Tensor<3>,
    offsets: Tensor<1, Int>,
) -> Tensor<2> {
    assert!(
        fused_on(&x.device(), x.dtype()),
        "grouped_swiglu runs on the CPU backend in f32"
    );
    let out = <Dispatch as FusedOps>::grouped_swiglu(
        x.into_dispatch(),
        gate.into_dispatch(),
        up.into_dispatch(),
        down.into_dispatch(),
        offsets.into_dispatch(),
    );
    Tensor::from_dispatch(out)
}

/// RMSNorm over the last dimension, `x / √(mean(x²) + eps) · gamma`, fused
/// on the CPU backend in f32 (`None` elsewhere: the caller uses Burn's).
pub fn rms_norm<const D: usize>(x: Tensor<D>, gamma: Tensor<1>, eps: f64) -> Option<Tensor<D>> {
    if !fused_on(&x.device(), x.dtype()) || gamma.dtype() != x.dtype() {
        return None;
    }
    let out =
        <Dispatch as FusedOps>::rms_norm(x.into_dispatch(), gamma.into_dispatch(), eps as f32);
    Some(Tensor::from_dispatch(out))
}

/// RoPE with `rotate_half` pairing on `[.., S, hd]`, from `[S, hd]` cos and
/// sin tables, fused on the CPU backend in f32 (`None` elsewhere).
pub fn rope<const D: usize>(x: Tensor<D>, cos: Tensor<2>, sin: Tensor<2>) -> Option<Tensor<D>> {
    if !fused_on(&x.device(), x.dtype()) || cos.dtype() != x.dtype() {
        return None;
    }
    let out =
        <Dispatch as FusedOps>::rope(x.into_dispatch(), cos.into_dispatch(), sin.into_dispatch());
    Some(Tensor::from_dispatch(out))
}

/// Sum of the squared entries of `x`. `[1]`
pub fn sum_squares<const D: usize>(x: Tensor<D>) -> Tensor<1> {
    if fused_on(&x.device(), x.dtype()) {
        return Tensor::from_dispatch(<Dispatch as FusedOps>::sum_squares(x.into_dispatch()));
    }
    x.square().sum()
}

// ---------------------------------------------------------------- Flex --

/// An f32 tensor's values, contiguous.
fn values(t: &FlexTensor) -> std::borrow::Cow<'_, [f32]> {
    match t.as_slice::<f32>() {
        Some(s) => std::borrow::Cow::Borrowed(s),
        None => std::borrow::Cow::Owned(
            t.to_contiguous()
                .as_slice::<f32>()
                .expect("fused kernels take f32 tensors")
                .to_vec(),
        ),
    }
}

/// An integer tensor's values as i64, whatever its integer width.
fn indices(t: &FlexTensor) -> Vec<i64> {
    t.clone()
        .into_data()
        .convert::<i64>()
        .try_into_vec::<i64>()
        .unwrap_or_else(|e| panic!("fused kernels take integer indices: {e:?}"))
}

fn shape_of(t: &FlexTensor) -> Vec<usize> {
    t.layout().shape().to_vec()
}

fn tensor(data: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(data, shape))
}

/// The last two dimensions of `shape`, or (1, n) for a vector.
fn matrix_dims(shape: &[usize]) -> (usize, usize) {
    match shape {
        [] => (1, 1),
        [n] => (1, *n),
        [.., r, c] => (*r, *c),
    }
}

impl FusedOps for Flex {
    fn swiglu(gate: FlexTensor, up: FlexTensor) -> FlexTensor {
        let shape = shape_of(&gate);
        assert_eq!(shape, shape_of(&up), "swiglu: gate and up differ in shape");
        let (g, u) = (values(&gate), values(&up));
        let mut h = vec![0.0; g.len()];
        cpu::swiglu_forward(&g, &u, &mut h);
        tensor(h, shape)
    }

    fn causal_softmax(scores: FlexTensor, offset: usize) -> FlexTensor {
        let shape = shape_of(&scores);
        let (rows, cols) = matrix_dims(&shape);
        let x = values(&scores);
        let mut p = vec![0.0; x.len()];
        cpu::causal_softmax_forward(&x, &mut p, rows, cols, offset);
        tensor(p, shape)
    }

    fn cross_entropy_rows(logits: FlexTensor, targets: FlexTensor) -> FlexTensor {
        Self::cross_entropy_rows_lse(logits, targets).0
    }

    fn adamw_update(
        param: FlexTensor,
        grad: FlexTensor,
        m: FlexTensor,
        v: FlexTensor,
        scale: FlexTensor,
        hyper: [f32; 7],
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let shape = shape_of(&param);
        let scale = values(&scale)[0];
        let (mut p, mut m, mut v) = (owned(param), owned(m), owned(v));
        cpu::adamw(&mut p, &values(&grad), &mut m, &mut v, scale, hyper);
        (
            tensor(p, shape.clone()),
            tensor(m, shape.clone()),
            tensor(v, shape),
        )
    }

    fn sum_squares(x: FlexTensor) -> FlexTensor {
        tensor(vec![cpu::sum_squares(&values(&x))], vec![1])
    }

    fn grouped_swiglu(
        x: FlexTensor,
        gate: FlexTensor,
        up: FlexTensor,
        down: FlexTensor,
        offsets: FlexTensor,
    ) -> FlexTensor {
        Self::grouped_swiglu_forward(x, [gate, up, down], offsets).0
    }

    fn causal_attention(q: FlexTensor, k: FlexTensor, v: FlexTensor) -> FlexTensor {
        Self::causal_attention_forward(q, k, v).0
    }

    fn rms_norm(x: FlexTensor, gamma: FlexTensor, eps: f32) -> FlexTensor {
        Self::rms_norm_forward(x, gamma, eps).0
    }

    fn rope(x: FlexTensor, cos: FlexTensor, sin: FlexTensor) -> FlexTensor {
        rope_apply(x, cos, sin, false)
    }
}

/// RoPE or its transpose on the CPU backend.
fn rope_apply(x: FlexTensor, cos: FlexTensor, sin: FlexTensor, inverse: bool) -> FlexTensor {
    let shape = shape_of(&x);
    let (s, hd) = matrix_dims(&shape);
    assert_eq!(shape_of(&cos), vec![s, hd], "rope: tables must be [S, hd]");
    assert!(hd % 2 == 0, "rope: head width {hd} is odd");
    let xv = values(&x);
    let mut y = vec![0.0; xv.len()];
    cpu::rope(&xv, &values(&cos), &values(&sin), s, inverse, &mut y);
    tensor(y, shape)
}

/// The dimensions of a causal attention call, checked.
fn attention_dims(q: &FlexTensor, k: &FlexTensor, v: &FlexTensor) -> attention::Dims {
    let [b, h, s, hd] = shape_of(q)[..] else {
        panic!("causal_attention: q must be [B, H, S, hd]")
    };
    let [kb, kv, ks, khd] = shape_of(k)[..] else {
        panic!("causal_attention: k must be [B, KV, S, hd]")
    };
    assert_eq!(
        shape_of(k),
        shape_of(v),
        "causal_attention: k and v differ in shape"
    );
    assert!(
        kb == b && ks == s && khd == hd && kv > 0 && h % kv == 0,
        "causal_attention: q {:?} and k {:?} do not fit",
        shape_of(q),
        shape_of(k)
    );
    attention::Dims { b, h, kv, s, hd }
}

/// The grouping of a grouped call: its dimensions and row offsets.
fn grouping(
    x: &FlexTensor,
    gate: &FlexTensor,
    offsets: &FlexTensor,
) -> (grouped::Dims, Vec<usize>) {
    let [experts, d, f] = shape_of(gate)[..] else {
        panic!("grouped_swiglu: expert weights must be [E, d, F]")
    };
    assert_eq!(
        shape_of(x)[1],
        d,
        "grouped_swiglu: x width differs from the experts'"
    );
    let offsets = indices(offsets).into_iter().map(|o| o as usize).collect();
    (grouped::Dims { experts, d, f }, offsets)
}

/// An f32 tensor's values as an owned vector (no copy when the tensor is
/// contiguous and not shared).
fn owned(t: FlexTensor) -> Vec<f32> {
    match t.into_data().try_into_vec::<f32>() {
        Ok(v) => v,
        Err(e) => panic!("fused kernels take f32 tensors: {e:?}"),
    }
}

impl FusedKernels for Flex {
    fn cross_entropy_rows_lse(logits: FlexTensor, targets: FlexTensor) -> (FlexTensor, FlexTensor) {
        let shape = shape_of(&logits);
        let [n, v] = shape[..] else {
            panic!("cross_entropy_rows: logits must be [n, v], got {shape:?}")
        };
        let t = indices(&targets);
        assert_eq!(
            t.len(),
            n,
            "cross_entropy_rows: {n} rows but {} targets",
            t.len()
        );
        let x = values(&logits);
        let (mut loss, mut lse) = (vec![0.0; n], vec![0.0; n]);
        cpu::cross_entropy_forward(&x, &t, v, &mut loss, &mut lse);
        (tensor(loss, vec![n]), tensor(lse, vec![n]))
    }

    fn swiglu_backward(
        gate: FlexTensor,
        up: FlexTensor,
        grad: FlexTensor,
    ) -> (FlexTensor, FlexTensor) {
        let shape = shape_of(&gate);
        let (g, u, dh) = (values(&gate), values(&up), values(&grad));
        let (mut dg, mut du) = (vec![0.0; g.len()], vec![0.0; g.len()]);
        cpu::swiglu_backward(&g, &u, &dh, &mut dg, &mut du);
        (tensor(dg, shape.clone()), tensor(du, shape))
    }

    fn causal_softmax_backward(probs: FlexTensor, grad: FlexTensor, offset: usize) -> FlexTensor {
        let shape = shape_of(&probs);
        let (rows, cols) = matrix_dims(&shape);
        let (p, dp) = (values(&probs), values(&grad));
        let mut dx = vec![0.0; p.len()];
        cpu::causal_softmax_backward(&p, &dp, &mut dx, rows, cols, offset);
        tensor(dx, shape)
    }

    fn grouped_swiglu_forward(
        x: FlexTensor,
        weights: [FlexTensor; 3],
        offsets: FlexTensor,
    ) -> (FlexTensor, GroupedSaved<Self>) {
        let (dims, offs) = grouping(&x, &weights[0], &offsets);
        let n = shape_of(&x)[0];
        let [gate, up, down] = weights.each_ref().map(values);
        let (y, saved) = grouped::forward(&values(&x), &gate, &up, &down, &offs, dims);
        let nf = vec![n, dims.f];
        let saved = [
            tensor(saved.g, nf.clone()),
            tensor(saved.u, nf.clone()),
            tensor(saved.h, nf),
        ];
        (tensor(y, vec![n, dims.d]), saved)
    }

    fn grouped_swiglu_backward(
        x: FlexTensor,
        weights: [FlexTensor; 3],
        offsets: FlexTensor,
        saved: GroupedSaved<Self>,
        grad: FlexTensor,
    ) -> [FlexTensor; 4] {
        let (dims, offs) = grouping(&x, &weights[0], &offsets);
        let [gate, up, down] = weights.each_ref().map(values);
        let [g, u, h] = saved.each_ref().map(|t| values(t).into_owned());
        let saved = grouped::Saved { g, u, h };
        let (dx, dg, du, dd) = grouped::backward(
            &values(&x),
            &gate,
            &up,
            &down,
            &offs,
            dims,
            &saved,
            &values(&grad),
        );
        let [wg_shape, wu_shape, wd_shape] = weights.each_ref().map(shape_of);
        [
            tensor(dx, shape_of(&x)),
            tensor(dg, wg_shape),
            tensor(du, wu_shape),
            tensor(dd, wd_shape),
        ]
    }

    fn rms_norm_forward(x: FlexTensor, gamma: FlexTensor, eps: f32) -> (FlexTensor, FlexTensor) {
        let shape = shape_of(&x);
        let d = shape_of(&gamma)[0];
        assert_eq!(
            shape.last(),
            Some(&d),
            "rms_norm: gamma width differs from x"
        );
        let xv = values(&x);
        let mut y = vec![0.0; xv.len()];
        let inv = cpu::rms_norm_forward(&xv, &values(&gamma), eps, &mut y);
        let rows = inv.len();
        (tensor(y, shape), tensor(inv, vec![rows]))
    }

    fn rms_norm_backward(
        x: FlexTensor,
        gamma: FlexTensor,
        inv_rms: FlexTensor,
        grad: FlexTensor,
    ) -> (FlexTensor, FlexTensor) {
        let shape = shape_of(&x);
        let xv = values(&x);
        let mut dx = vec![0.0; xv.len()];
        let dgamma = cpu::rms_norm_backward(
            &xv,
            &values(&gamma),
            &values(&inv_rms),
            &values(&grad),
            &mut dx,
        );
        (tensor(dx, shape), tensor(dgamma, shape_of(&gamma)))
    }

    fn rope_backward(grad: FlexTensor, cos: FlexTensor, sin: FlexTensor) -> FlexTensor {
        rope_apply(grad, cos, sin, true)
    }

    fn causal_attention_forward(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
    ) -> (FlexTensor, FlexTensor) {
        let dims = attention_dims(&q, &k, &v);
        let (o, p) = attention::forward(&values(&q), &values(&k), &values(&v), dims);
        let (b, h, s) = (dims.b, dims.h, dims.s);
        (tensor(o, shape_of(&q)), tensor(p, vec![b, h, s, s]))
    }

    fn causal_attention_backward(
        qkv: [FlexTensor; 3],
        out: FlexTensor,
        probs: FlexTensor,
        grad: FlexTensor,
    ) -> [FlexTensor; 3] {
        let [q, k, v] = &qkv;
        let dims = attention_dims(q, k, v);
        let (dq, dk, dv) = attention::backward(
            &values(q),
            &values(k),
            &values(v),
            &values(&out),
            &values(&probs),
            &values(&grad),
            dims,
        );
        [
            tensor(dq, shape_of(q)),
            tensor(dk, shape_of(k)),
            tensor(dv, shape_of(v)),
        ]
    }

    fn cross_entropy_rows_backward(
        logits: FlexTensor,
        targets: FlexTensor,
        lse: FlexTensor,
        grad: FlexTensor,
    ) -> FlexTensor {
        let shape = shape_of(&logits);
        let v = shape[1];
        let (x, t, lse, g) = (
            values(&logits),
            indices(&targets),
            values(&lse),
            values(&grad),
        );
        let mut d = vec![0.0; x.len()];
        cpu::cross_entropy_backward(&x, &t, &lse, &g, v, &mut d);
        tensor(d, shape)
    }
}

// ------------------------------------------------------------ Autodiff --

#[derive(Debug)]
struct SwigluBackward;

impl<B: Backend + FusedKernels> Backward<B, 2> for SwigluBackward {
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (gate, up) = ops.state;
        let (dg, du) = B::swiglu_backward(gate, up, grad);
        let [gate_node, up_node] = ops.parents;
        if let Some(node) = gate_node {
            grads.register::<B>(node.id, dg);
        }
        if let Some(node) = up_node {
            grads.register::<B>(node.id, du);
        }
    }
}

#[derive(Debug)]
struct CausalSoftmaxBackward;

impl<B: Backend + FusedKernels> Backward<B, 1> for CausalSoftmaxBackward {
    type State = (FloatTensor<B>, usize);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (probs, offset) = ops.state;
        if let [Some(node)] = ops.parents {
            grads.register::<B>(node.id, B::causal_softmax_backward(probs, grad, offset));
        }
    }
}

#[derive(Debug)]
struct CrossEntropyBackward;

impl<B: Backend + FusedKernels> Backward<B, 1> for CrossEntropyBackward {
    type State = (FloatTensor<B>, IntTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (logits, targets, lse) = ops.state;
        if let [Some(node)] = ops.parents {
            let d = B::cross_entropy_rows_backward(logits, targets, lse, grad);
            grads.register::<B>(node.id, d);
        }
    }
}

#[derive(Debug)]
struct GroupedSwigluBackward;

impl<B: Backend + FusedKernels> Backward<B, 4> for GroupedSwigluBackward {
    /// x, the three weight stacks, the offsets and the saved projections.
    type State = (
        FloatTensor<B>,
        [FloatTensor<B>; 3],
        IntTensor<B>,
        GroupedSaved<B>,
    );

    fn backward(self, ops: Ops<Self::State, 4>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (x, weights, offsets, saved) = ops.state;
        let all = B::grouped_swiglu_backward(x, weights, offsets, saved, grad);
        for (node, g) in ops.parents.into_iter().zip(all) {
            if let Some(node) = node {
                grads.register::<B>(node.id, g);
            }
        }
    }
}

#[derive(Debug)]
struct CausalAttentionBackward;

impl<B: Backend + FusedKernels> Backward<B, 3> for CausalAttentionBackward {
    /// q, k, v, the output and the probabilities.
    type State = ([FloatTensor<B>; 3], FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (qkv, out, probs) = ops.state;
        let all = B::causal_attention_backward(qkv, out, probs, grad);
        for (node, g) in ops.parents.into_iter().zip(all) {
            if let Some(node) = node {
                grads.register::<B>(node.id, g);
            }
        }
    }
}

#[derive(Debug)]
struct RmsNormBackward;

impl<B: Backend + FusedKernels> Backward<B, 2> for RmsNormBackward {
    /// x, gamma and each row's 1 / rms.
    type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (x, gamma, inv) = ops.state;
        let (dx, dgamma) = B::rms_norm_backward(x, gamma, inv, grad);
        let [x_node, gamma_node] = ops.parents;
        if let Some(node) = x_node {
            grads.register::<B>(node.id, dx);
        }
        if let Some(node) = gamma_node {
            grads.register::<B>(node.id, dgamma);
        }
    }
}

#[derive(Debug)]
struct RopeBackward;

impl<B: Backend + FusedKernels> Backward<B, 1> for RopeBackward {
    /// The cos and sin tables.
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (cos, sin) = ops.state;
        if let [Some(node)] = ops.parents {
            grads.register::<B>(node.id, B::rope_backward(grad, cos, sin));
        }
    }
}

impl<B: Backend + FusedOps + FusedKernels, C: CheckpointStrategy> FusedOps for Autodiff<B, C> {
    fn rms_norm(x: FloatTensor<Self>, gamma: FloatTensor<Self>, eps: f32) -> FloatTensor<Self> {
        let (xi, gi) = (x.primitive().clone(), gamma.primitive().clone());
        match RmsNormBackward
            .prepare::<C>([x.node(), gamma.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (y, inv) = B::rms_norm_forward(xi.clone(), gi.clone(), eps);
                prep.finish((xi, gi, inv), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::rms_norm(xi, gi, eps)),
        }
    }

    /// Only x is differentiated; the tables are constants.
    fn rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let xi = x.primitive().clone();
        let (c, s) = (cos.into_primitive(), sin.into_primitive());
        match RopeBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let y = B::rope(xi, c.clone(), s.clone());
                prep.finish((c, s), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::rope(xi, c, s)),
        }
    }

    fn causal_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let qkv = [&q, &k, &v].map(|t| t.primitive().clone());
        match CausalAttentionBackward
            .prepare::<C>([q.node(), k.node(), v.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let [qi, ki, vi] = qkv.clone();
                let (o, p) = B::causal_attention_forward(qi, ki, vi);
                prep.finish((qkv, o.clone(), p), o)
            }
            OpsKind::UnTracked(prep) => {
                let [qi, ki, vi] = qkv;
                prep.finish(B::causal_attention(qi, ki, vi))
            }
        }
    }

    fn grouped_swiglu(
        x: FloatTensor<Self>,
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        down: FloatTensor<Self>,
        offsets: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        let xi = x.primitive().clone();
        let weights = [&gate, &up, &down].map(|w| w.primitive().clone());
        match GroupedSwigluBackward
            .prepare::<C>([x.node(), gate.node(), up.node(), down.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (y, saved) =
                    B::grouped_swiglu_forward(xi.clone(), weights.clone(), offsets.clone());
                prep.finish((xi, weights, offsets, saved), y)
            }
            OpsKind::UnTracked(prep) => {
                let [g, u, d] = weights;
                prep.finish(B::grouped_swiglu(xi, g, u, d, offsets))
            }
        }
    }

    /// Optimizer updates act on the inner tensors and are not tracked.
    fn adamw_update(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        m: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        hyper: [f32; 7],
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let inner = |t: FloatTensor<Self>| t.into_primitive();
        let (p, m, v) = B::adamw_update(
            inner(param),
            inner(grad),
            inner(m),
            inner(v),
            inner(scale),
            hyper,
        );
        (
            Self::from_inner(p),
            Self::from_inner(m),
            Self::from_inner(v),
        )
    }

    fn sum_squares(x: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::from_inner(B::sum_squares(x.into_primitive()))
    }

    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        let (g, u) = (gate.primitive().clone(), up.primitive().clone());
        match SwigluBackward
            .prepare::<C>([gate.node(), up.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let out = B::swiglu(g.clone(), u.clone());
                prep.finish((g, u), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::swiglu(g, u)),
        }
    }

    fn causal_softmax(scores: FloatTensor<Self>, offset: usize) -> FloatTensor<Self> {
        let x = scores.primitive().clone();
        match CausalSoftmaxBackward
            .prepare::<C>([scores.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let p = B::causal_softmax(x, offset);
                prep.finish((p.clone(), offset), p)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::causal_softmax(x, offset)),
        }
    }

    fn cross_entropy_rows(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        let x = logits.primitive().clone();
        match CrossEntropyBackward
            .prepare::<C>([logits.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (loss, lse) = B::cross_entropy_rows_lse(x.clone(), targets.clone());
                prep.finish((x, targets, lse), loss)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::cross_entropy_rows(x, targets)),
        }
    }
}
