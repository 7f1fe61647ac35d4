//! Token dispatch to the experts, and the combine back: the plan here,
//! its layouts for the experts in `layout.rs`.
//!
//! Each expert has C slots. Among the tokens that chose expert e, the ones
//! with the highest router probability take its slots (priority by
//! probability, not position, as in Switch Transformer's "batch prioritized
//! routing", Riquelme et al. 2021); the rest are dropped and the residual
//! connection carries them. Padding tokens never take a slot. Dropless
//! could use C = T, which no expert can overflow since a token picks an
//! expert at most once.
//!
//! The plan is built with sorts and gathers on the device, with no
//! materialised `[T, E, C]` one-hot tensor. Then, by backend:
//!
//! - GPU backends: dispatch is one gather into `[E, C, d]` capacity
//!   buffers for one batched matmul per projection; combine is one gather
//!   back plus a weighted sum over k. Under dropless, C is the busiest
//!   expert's count rounded up to 64 (one host read per layer).
//! - The CPU backend: the plan is built on the host ([`plan_on_host`]) from
//!   the router's choices, since reading them back is free there and a few
//!   thousand assignments sort faster in one pass than the device plan's
//!   column sorts of `[T, E]`. It lays the kept tokens out by expert with no
//!   empty slots ([`Grouping`]), for the grouped expert kernel (one matmul
//!   per expert over exactly its rows), and combine gathers from those rows
//!   in one fused operation. The buffers are cut to the busiest expert.

mod layout;

pub use layout::{combine, combine_rows, dispatch, group, Dispatched, Grouping};

use super::router::RoutingDecision;
use crate::kernels::on_cpu;
use burn::prelude::*;

/// Where every assignment goes. Built once per layer call; carries no gradient.
#[derive(Debug, Clone)]
pub struct DispatchPlan {
    /// Slots per expert.
    pub capacity: usize,
    /// Token index feeding each slot, expert-major; empty slots point at the
    /// zero row T. `[E * C]`
    pub token_for_slot: Tensor<1, Int>,
    /// Slot index of each assignment (token-major, t * k + j); dropped and
    /// padding assignments point at the zero row E * C. `[T * k]`
    pub slot_for_assignment: Tensor<1, Int>,
    /// Assignments of real tokens that got a slot, per expert. `[E]`
    pub kept_per_expert: Tensor<1>,
    /// The kept slots as grouped rows, when the plan was built on the host.
    pub grouping: Option<Grouping>,
    /// Under rerouting: the expert each assignment uses (token-major,
    /// `[T, k]`), and how many assignments went elsewhere than their own
    /// choice (`[1]`). `None` when every assignment keeps its choice.
    pub rerouted: Option<(Tensor<2, Int>, Tensor<1>)>,
}

/// Build the dispatch plan with sorts and gathers on the device, with no
/// host read unless the buffers can be cut to the busiest expert cheaply.
///
/// # Shapes
/// - `valid`: `[T]`, 1.0 for real tokens and 0.0 for padding
pub fn plan_on_device(
    decision: &RoutingDecision,
    valid: Tensor<1>,
    capacity: Option<usize>,
) -> DispatchPlan {
    let [t, e] = decision.routing_map.dims();
    let device = decision.routing_map.device();
    let routed = decision.routing_map.clone().detach() * valid.unsqueeze_dim::<2>(1); // [T, E]
                                                                                      // Slots past the busiest expert's count stay empty whatever the policy,
                                                                                      // so the buffers are cut to that count (rounded up) whenever reading it
                                                                                      // back is cheap: always under dropless (C would otherwise be T), and on
                                                                                      // the CPU backend, where the read is not a device sync.
    let busiest = || routed.clone().sum_dim(0).max().into_scalar::<f32>();
    let c = match capacity {
        Some(c) if on_cpu(&device) => c.min(busiest_capacity(busiest(), t, CPU_GRANULE)),
        Some(c) => c.min(t),
        None => busiest_capacity(busiest(), t, granule(&device)),
    };

    // Routed real tokens keep their probability (in [0, 1]); all others -1,
    // so they sort after every routed token.
    let priority = routed.clone() * (decision.probs.clone().detach() + 1.0) - 1.0; // [T, E]
                                                                                   // Sort indices may come back in a different integer width than the
                                                                                   // router's top-k indices; everything below uses the router's.
    let int = decision.topk_experts.dtype();
    let order = priority.argsort_descending(0).cast(int); // [T, E]: c-th best token per expert
    let rank = order.clone().argsort(0).cast(int); // [T, E]: position of token t in expert e's queue

    let count = routed.clone().sum_dim(0).int().cast(int); // [1, E]
    let slot_ids = Tensor::<1, Int>::arange(0..c as i64, &device)
        .cast(int)
        .unsqueeze_dim::<2>(1); // [C, 1]
    let empty = slot_ids.expand([c, e]).greater_equal(count.expand([c, e])); // [C, E]
    let token_for_slot = order
        .slice([0..c])
        .mask_fill(empty, t as i64)
        .transpose() // [E, C]
        .reshape([e * c]);

    let kept = routed.bool().bool_and(rank.clone().lower_elem(c as i64)); // [T, E]
    let kept_per_expert = kept.clone().float().sum_dim(0).reshape([e]);

    let experts = decision.topk_experts.clone(); // [T, k]
    let [_, k] = experts.dims();
    let slot = experts.clone() * (c as i64) + rank.gather(1, experts.clone()); // [T, k]
    let kept_a = kept.int().cast(int).gather(1, experts).bool(); // [T, k]
    let slot_for_assignment = slot
        .mask_fill(kept_a.bool_not(), (e * c) as i64)
        .reshape([t * k]);

    DispatchPlan {
        capacity: c,
        token_for_slot,
        slot_for_assignment,
        kept_per_expert,
        grouping: None,
        rerouted: None,
    }
}

/// Build the dispatch plan on the host from the router's probabilities and
/// choices, with its [`Grouping`]: each expert's queue (the real tokens that
/// chose it) sorted by probability, best first, ties by token index; the
/// first C keep their slots.
///
/// # Shapes
/// - `valid`: `[T]`, 1.0 for real tokens and 0.0 for padding
pub fn plan_on_host(
    decision: &RoutingDecision,
    valid: Tensor<1>,
    capacity: Option<usize>,
) -> DispatchPlan {
    let [t, e] = decision.probs.dims();
    let [_, k] = decision.topk_experts.dims();
    let device = decision.probs.device();
    let probs = host_floats(decision.probs.clone().detach());
    let valid = host_floats(valid);
    let experts = host_ints(decision.topk_experts.clone());

    // (probability, token, choice j) of every real assignment, per expert.
    let mut queues: Vec<Vec<(f32, usize, usize)>> = vec![Vec::new(); e];
    for tok in (0..t).filter(|&tok| valid[tok] != 0.0) {
        for (j, &ex) in experts[tok * k..(tok + 1) * k].iter().enumerate() {
            let ex = ex as usize;
            queues[ex].push((probs[tok * e + ex], tok, j));
        }
    }
    for queue in &mut queues {
        queue.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    }
    let kept: Vec<Vec<(usize, usize)>> = queues
        .iter()
        .map(|q| {
            let n = capacity.map_or(q.len(), |c| q.len().min(c));
            q[..n].iter().map(|&(_, tok, j)| (tok, j)).collect()
        })
        .collect();
    plan_from_queues(&kept, capacity, t, k, &device)
}

/// The plan in which expert e keeps `kept[e]`, its (token, choice j)
/// assignments in slot order (at most `capacity` of them), with its
/// [`Grouping`]; the buffers are cut to the busiest expert. Every
/// assignment not in a queue is dropped.
pub(crate) fn plan_from_queues(
    kept: &[Vec<(usize, usize)>],
    capacity: Option<usize>,
    t: usize,
    k: usize,
    device: &Device,
) -> DispatchPlan {
    let e = kept.len();
    let busiest = kept.iter().map(Vec::len).max().unwrap_or(0);
    let cut = busiest_capacity(busiest as f32, t, granule(device));
    let c = capacity.map_or(cut, |c| c.min(cut));

    let mut token_for_slot = vec![t as i64; e * c];
    let mut slot_for_assignment = vec![(e * c) as i64; t * k];
    let mut row_for_assignment = vec![-1i64; t * k];
    let mut token_for_row = Vec::with_capacity(t * k);
    let mut offsets = vec![0usize; e + 1];
    for (ex, queue) in kept.iter().enumerate() {
        for (i, &(tok, j)) in queue.iter().enumerate() {
            token_for_slot[ex * c + i] = tok as i64;
            slot_for_assignment[tok * k + j] = (ex * c + i) as i64;
            row_for_assignment[tok * k + j] = (offsets[ex] + i) as i64;
            token_for_row.push(tok as i64);
        }
        offsets[ex + 1] = offsets[ex] + queue.len();
    }
    let n = offsets[e] as i64;
    row_for_assignment
        .iter_mut()
        .filter(|r| **r < 0)
        .for_each(|r| *r = n);
    let kept_per_expert: Vec<f32> = kept.iter().map(|q| q.len() as f32).collect();

    let int = |v: Vec<i64>| {
        let len = v.len();
        Tensor::<1, Int>::from_data(TensorData::new(v, [len]), device)
    };
    DispatchPlan {
        capacity: c,
        token_for_slot: int(token_for_slot),
        slot_for_assignment: int(slot_for_assignment),
        kept_per_expert: Tensor::from_data(TensorData::new(kept_per_expert, [e]), device),
        grouping: Some(Grouping {
            token_for_row: int(token_for_row),
            offsets,
            row_for_assignment: int(row_for_assignment),
        }),
        rerouted: None,
    }
}

/// A float tensor's values on the host.
pub(crate) fn host_floats<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("converted to f32")
}

/// An integer tensor's values on the host.
pub(crate) fn host_ints<const D: usize>(t: Tensor<D, Int>) -> Vec<i64> {
    t.into_data()
        .convert::<i64>()
        .try_into_vec::<i64>()
        .expect("converted to i64")
}

/// Buffer size that holds the busiest expert's `max_count` assignments,
/// rounded up to a multiple of `granule`, never above `t` and at least 1.
pub fn busiest_capacity(max_count: f32, t: usize, granule: usize) -> usize {
    let need = max_count.max(0.0).ceil() as usize;
    need.div_ceil(granule)
        .max(1)
        .saturating_mul(granule)
        .min(t)
        .max(1)
}

/// Buffer rounding on the CPU backend, which builds nothing per shape.
const CPU_GRANULE: usize = 16;
/// Buffer rounding on GPU backends: fewer distinct shapes for kernels to be
/// compiled and tuned for.
const GPU_GRANULE: usize = 64;

/// The buffer rounding for `device`.
pub fn granule(device: &Device) -> usize {
    if on_cpu(device) {
        CPU_GRANULE
    } else {
        GPU_GRANULE
    }
}

#[cfg(test)]
mod tests {
    use super::busiest_capacity;

    #[test]
    fn busiest_capacity_rounds_up_to_the_granule_and_caps_at_t() {
        assert_eq!(busiest_capacity(0.0, 2048, 64), 64);
        assert_eq!(busiest_capacity(1.0, 2048, 64), 64);
        assert_eq!(busiest_capacity(64.0, 2048, 64), 64);
        assert_eq!(busiest_capacity(65.0, 2048, 64), 128);
        assert_eq!(busiest_capacity(600.0, 2048, 64), 640);
        assert_eq!(busiest_capacity(545.0, 2048, 16), 560);
        assert_eq!(busiest_capacity(30.0, 40, 64), 40);
        assert_eq!(busiest_capacity(0.0, 10, 64), 10);
    }
}
