//! [`FusedOps`] under autodiff: each forward records one backward step that
//! calls the inner backend's fused backward kernel ([`FusedKernels`]).

use super::{FusedKernels, FusedOps, GroupedSaved};
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::NodeId;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Autodiff, AutodiffBackend, Backend};

/// Hand each parent that needs a gradient (a `Some` id) its gradient.
fn register_all<B: Backend, const N: usize>(
    grads: &mut Gradients,
    parents: [Option<NodeId>; N],
    values: [FloatTensor<B>; N],
) {
    for (id, g) in parents.into_iter().zip(values) {
        if let Some(id) = id {
            grads.register::<B>(id, g);
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
struct LinearBackward;

impl<B: Backend + FusedKernels> Backward<B, 2> for LinearBackward {
    /// x and w.
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (x, w) = ops.state;
        let all = B::fused_linear_backward(x, w, grad);
        register_all::<B, 2>(grads, ops.parents.map(|p| p.map(|n| n.id)), all);
    }
}

#[derive(Debug)]
struct LinearCrossEntropyBackward;

impl<B: Backend + FusedKernels> Backward<B, 2> for LinearCrossEntropyBackward {
    /// The gradients of x and w the forward computed.
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (dx, dw) = ops.state;
        let all = B::linear_cross_entropy_backward(dx, dw, grad);
        register_all::<B, 2>(grads, ops.parents.map(|p| p.map(|n| n.id)), all);
    }
}

#[derive(Debug)]
struct GroupedSwigluBackward;

impl<B: Backend + FusedKernels> Backward<B, 4> for GroupedSwigluBackward {
    /// x, the three weight stacks, the offsets, the GPU's choice of
    /// kernel and the saved projections.
    type State = (
        FloatTensor<B>,
        [FloatTensor<B>; 3],
        Vec<usize>,
        bool,
        GroupedSaved<B>,
    );

    fn backward(self, ops: Ops<Self::State, 4>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (x, weights, offsets, fused, saved) = ops.state;
        let all = B::grouped_swiglu_backward(x, weights, offsets, fused, saved, grad);
        register_all::<B, 4>(grads, ops.parents.map(|p| p.map(|n| n.id)), all);
    }
}

#[derive(Debug)]
struct CombineRowsBackward;

impl<B: Backend + FusedKernels> Backward<B, 2> for CombineRowsBackward {
    /// The rows, the indices and the weights.
    type State = (FloatTensor<B>, IntTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (rows, index, weights) = ops.state;
        let all = B::combine_rows_backward(rows, index, weights, grad);
        register_all::<B, 2>(grads, ops.parents.map(|p| p.map(|n| n.id)), all);
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
        register_all::<B, 3>(grads, ops.parents.map(|p| p.map(|n| n.id)), all);
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
        register_all::<B, 2>(grads, ops.parents.map(|p| p.map(|n| n.id)), [dx, dgamma]);
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
        offsets: Vec<usize>,
        fused: bool,
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
                    B::grouped_swiglu_forward(xi.clone(), weights.clone(), offsets.clone(), fused);
                prep.finish((xi, weights, offsets, fused, saved), y)
            }
            OpsKind::UnTracked(prep) => {
                let [g, u, d] = weights;
                prep.finish(B::grouped_swiglu(xi, g, u, d, offsets, fused))
            }
        }
    }

    /// The indices are constants.
    fn combine_rows(
        rows: FloatTensor<Self>,
        index: IntTensor<Self>,
        weights: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let (ri, wi) = (rows.primitive().clone(), weights.primitive().clone());
        match CombineRowsBackward
            .prepare::<C>([rows.node(), weights.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let y = B::combine_rows(ri.clone(), index.clone(), wi.clone());
                prep.finish((ri, index, wi), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::combine_rows(ri, index, wi)),
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

    fn linear_cross_entropy_rows(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        Self::from_inner(B::linear_cross_entropy_rows(
            x.into_primitive(),
            w.into_primitive(),
            targets,
        ))
    }

    fn sum_squares(x: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::from_inner(B::sum_squares(x.into_primitive()))
    }

    fn fused_linear(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        let (xi, wi) = (x.primitive().clone(), w.primitive().clone());
        match LinearBackward
            .prepare::<C>([x.node(), w.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let y = B::fused_linear(xi.clone(), wi.clone());
                prep.finish((xi, wi), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fused_linear(xi, wi)),
        }
    }

    fn linear_cross_entropy(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        targets: IntTensor<Self>,
        weights: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let (xi, wi) = (x.primitive().clone(), w.primitive().clone());
        let weights = weights.into_primitive();
        match LinearCrossEntropyBackward
            .prepare::<C>([x.node(), w.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let [loss, dx, dw] = B::linear_cross_entropy_forward(xi, wi, targets, weights);
                prep.finish((dx, dw), loss)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::linear_cross_entropy(xi, wi, targets, weights))
            }
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
