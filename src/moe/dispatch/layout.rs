//! A plan applied: the kept tokens laid out for the experts (grouped rows
//! or capacity buffers), run through them, and combined back to one row
//! per token.

use super::{host_ints, DispatchPlan};
use crate::kernels::{self, served_on, Op};
use crate::moe::experts::Experts;
use crate::nn::in_dtype;
use burn::prelude::*;

/// The kept assignments on their way through the experts, in the layout
/// the backend runs best: grouped rows in f32 on the CPU backend and on
/// the GPU ones with their kernels (see [`group`]), padded capacity
/// buffers elsewhere.
// One per MoE layer and step, moved a few times: boxing the plan would
// only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Dispatched {
    /// Each expert's kept tokens as consecutive rows. `[N, d]`
    Rows(Tensor<2>, Grouping),
    /// Per-expert capacity buffers, empty slots zero. `[E, C, d]`
    Buffers(Tensor<3>, DispatchPlan),
}

impl Dispatched {
    /// Send the tokens `x: [T, d]` where `plan` puts them.
    pub fn new(x: Tensor<2>, plan: DispatchPlan, num_experts: usize) -> Self {
        if served_on(Op::GroupedSwiglu, &x.device(), x.dtype()) {
            let groups = plan
                .grouping
                .clone()
                .unwrap_or_else(|| group(&plan, num_experts, x.dims()[0]));
            Self::Rows(x.select(0, groups.token_for_row.clone()), groups)
        } else {
            Self::Buffers(dispatch(x, &plan, num_experts), plan)
        }
    }

    /// Each expert applied to its own tokens, in the same layout.
    pub fn through(self, experts: &Experts) -> Self {
        match self {
            Self::Rows(x, g) => Self::Rows(experts.forward_grouped(x, g.offsets.clone()), g),
            Self::Buffers(x, plan) => Self::Buffers(experts.forward(x), plan),
        }
    }

    /// Back to one row per token: the weighted sum of its experts' outputs,
    /// with `weights: [T, k]`; dropped assignments add zero. Returns `[T, d]`.
    pub fn combine(self, weights: Tensor<2>) -> Tensor<2> {
        match self {
            Self::Rows(x, g) => combine_rows(x, g.row_for_assignment, weights),
            Self::Buffers(x, plan) => combine(x, &plan, weights),
        }
    }

    /// The same layout, its values made a gradient leaf.
    pub fn require_grad(self) -> Self {
        match self {
            Self::Rows(x, g) => Self::Rows(x.require_grad(), g),
            Self::Buffers(x, plan) => Self::Buffers(x.require_grad(), plan),
        }
    }

    /// The sum of all values. `[1]`
    pub fn sum(self) -> Tensor<1> {
        match self {
            Self::Rows(x, _) => x.sum(),
            Self::Buffers(x, _) => x.sum(),
        }
    }
}

/// Gather tokens into the capacity buffers.
///
/// # Shapes
/// - `x`: `[T, d]` → `[E, C, d]`
pub fn dispatch(x: Tensor<2>, plan: &DispatchPlan, num_experts: usize) -> Tensor<3> {
    let [_, d] = x.dims();
    let zero = in_dtype(Tensor::<2>::zeros([1, d], &x.device()), x.dtype());
    Tensor::cat(vec![x, zero], 0)
        .select(0, plan.token_for_slot.clone())
        .reshape([num_experts, plan.capacity, d])
}

/// Weighted sum of each token's expert outputs; dropped assignments add zero.
///
/// # Shapes
/// - `expert_out`: `[E, C, d]`
/// - `weights`: `[T, k]`
/// - returns `[T, d]`
pub fn combine(expert_out: Tensor<3>, plan: &DispatchPlan, weights: Tensor<2>) -> Tensor<2> {
    let [e, c, d] = expert_out.dims();
    combine_rows(
        expert_out.reshape([e * c, d]),
        plan.slot_for_assignment.clone(),
        weights,
    )
}

/// Weighted sum of each token's k output rows, where assignment t·k + j
/// reads row `row_for_assignment[t·k + j]` of `rows` (`R` = the row count
/// means none: a dropped assignment adds zero). No row is read by two
/// assignments. One fused operation on the CPU backend in f32.
///
/// # Shapes
/// - `rows`: `[R, d]`; `row_for_assignment`: `[T * k]`; `weights`: `[T, k]`
/// - returns `[T, d]`
pub fn combine_rows(
    rows: Tensor<2>,
    row_for_assignment: Tensor<1, Int>,
    weights: Tensor<2>,
) -> Tensor<2> {
    if served_on(Op::Combine, &rows.device(), rows.dtype()) && weights.dtype() == rows.dtype() {
        return kernels::combine_rows(rows, row_for_assignment, weights);
    }
    let [_, d] = rows.dims();
    let [t, k] = weights.dims();
    let zero = in_dtype(Tensor::<2>::zeros([1, d], &rows.device()), rows.dtype());
    let picked = Tensor::cat(vec![rows, zero], 0).select(0, row_for_assignment); // [T * k, d]
    (picked * weights.reshape([t * k, 1]))
        .reshape([t, k, d])
        .sum_dim(1)
        .reshape([t, d])
}

/// The kept assignments laid out by expert with no empty slots, for the
/// grouped expert matmuls: expert e's tokens are rows
/// `offsets[e]..offsets[e + 1]`, in the same priority order as its slots.
#[derive(Debug, Clone)]
pub struct Grouping {
    /// Token index of each row. `[N]`
    pub token_for_row: Tensor<1, Int>,
    /// Row offsets per expert, on the host (`E + 1` values).
    pub offsets: Vec<usize>,
    /// Row of each assignment (token-major); dropped and padding
    /// assignments point at N. `[T * k]`
    pub row_for_assignment: Tensor<1, Int>,
}

/// Compact `plan`'s slots into a [`Grouping`], for `t` tokens. Reads the
/// plan back to the host: free on the CPU, one device sync per layer on a
/// GPU (as PyTorch's eager MoE layers make to find each expert's tokens).
pub fn group(plan: &DispatchPlan, num_experts: usize, t: usize) -> Grouping {
    let device = plan.token_for_slot.device();
    let ints = |t: &Tensor<1, Int>| host_ints(t.clone());
    let (tokens, slots) = (ints(&plan.token_for_slot), ints(&plan.slot_for_assignment));
    let c = plan.capacity;
    let mut offsets = vec![0usize; num_experts + 1];
    let mut token_for_row = Vec::with_capacity(tokens.len());
    for e in 0..num_experts {
        let block = &tokens[e * c..(e + 1) * c];
        // Kept slots come first; empty ones point at the zero row T.
        let kept = block.iter().take_while(|&&tok| tok < t as i64).count();
        token_for_row.extend_from_slice(&block[..kept]);
        offsets[e + 1] = offsets[e] + kept;
    }
    let n = offsets[num_experts];
    let row_for_assignment = slots
        .iter()
        .map(|&s| {
            let s = s as usize;
            let row = if s >= num_experts * c {
                n
            } else {
                offsets[s / c] + s % c
            };
            row as i64
        })
        .collect::<Vec<_>>();
    let int = |v: Vec<i64>| {
        let len = v.len();
        Tensor::<1, Int>::from_data(TensorData::new(v, [len]), &device)
    };
    Grouping {
        token_for_row: int(token_for_row),
        offsets,
        row_for_assignment: int(row_for_assignment),
    }
}
