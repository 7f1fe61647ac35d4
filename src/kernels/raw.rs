//! The raw kernels behind [`super::FusedOps`] under autodiff: forwards that also
//! return what their backward needs, and the backwards. The autodiff steps
//! in `autodiff.rs` call them on the inner backend.

use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::Backend;

/// The raw kernels a backend provides for [`super::FusedOps`] under autodiff:
/// forwards that also return what their backward needs, and the backwards.
pub trait FusedKernels: Backend {
    /// [`super::FusedOps::cross_entropy_rows`] and the rows' log-sum-exp.
    fn cross_entropy_rows_lse(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// [`super::FusedOps::grouped_swiglu`] and what its backward needs.
    fn grouped_swiglu_forward(
        x: FloatTensor<Self>,
        weights: [FloatTensor<Self>; 3],
        offsets: Vec<usize>,
        fused: bool,
    ) -> (FloatTensor<Self>, GroupedSaved<Self>);
    /// Gradients of x and the three weight stacks.
    fn grouped_swiglu_backward(
        x: FloatTensor<Self>,
        weights: [FloatTensor<Self>; 3],
        offsets: Vec<usize>,
        fused: bool,
        saved: GroupedSaved<Self>,
        grad: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 4];
    /// [`super::FusedOps::rms_norm`] and each row's `1 / rms`.
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
    /// The transpose of [`super::FusedOps::rope`] applied to a gradient.
    fn rope_backward(
        grad: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
    /// [`super::FusedOps::causal_attention`] and its probabilities `[B, H, S, S]`.
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
    /// Gradients of x and w of [`super::FusedOps::fused_linear`].
    fn fused_linear_backward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 2];
    /// [`super::FusedOps::linear_cross_entropy`] and its gradients with respect to
    /// x and w (for a loss gradient of 1).
    fn linear_cross_entropy_forward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        targets: IntTensor<Self>,
        weights: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 3];
    /// The gradients of x and w for the loss gradient `grad` (`[1]`): the
    /// forward's, scaled.
    fn linear_cross_entropy_backward(
        dx: FloatTensor<Self>,
        dw: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 2];
    /// Gradients of rows and weights of [`super::FusedOps::combine_rows`].
    fn combine_rows_backward(
        rows: FloatTensor<Self>,
        index: IntTensor<Self>,
        weights: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 2];
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
