//! Overflow rerouting (`moe.drop_policy = "reroute"`): an assignment whose
//! expert is full goes to the token's best remaining expert with a free
//! slot, by the router's own selection key, instead of being dropped.
//!
//! Slots are won pass by pass. Every token ranks the experts: its top-k
//! choices first, in the router's order, then the others by selection key
//! (disabled experts never). In pass p each token that still holds fewer
//! than k slots asks for its p-th ranked expert, and each expert gives its
//! remaining slots to those askers with the highest router probability
//! (ties by token index). Pass 0 is every token's first choice, pass 1 its
//! second, and so on, so with room everywhere the plan is the drop plan.
//! A token stops after k + `depth` passes: whatever it still lacks is
//! dropped. Each pass is one batched step on the device
//! ([`plan_on_device`]); on the CPU backend the same passes run on the host
//! ([`plan_on_host`]), where reading the router's choices back is free.
//!
//! An assignment that is dropped keeps, as its expert, one of the token's
//! own choices that it did not get, so the combine weights are normalised
//! over the same experts as under the drop policy when nothing can be
//! rerouted.

use super::dispatch::{
    busiest_capacity, granule, host_floats, host_ints, plan_from_queues, DispatchPlan,
};
use super::router::{RoutingDecision, MASKED};
use crate::kernels::on_cpu;
use burn::prelude::*;
use burn::tensor::IndexingUpdateOp;

/// Selection keys at or below this mark a disabled expert.
const DISABLED: f32 = MASKED / 2.0;

/// The rerouting plan built on the host, with its [`Grouping`].
///
/// # Shapes
/// - `valid`: `[T]`, 1.0 for real tokens and 0.0 for padding
pub fn plan_on_host(
    decision: &RoutingDecision,
    valid: Tensor<1>,
    capacity: usize,
    depth: usize,
) -> DispatchPlan {
    let [t, e] = decision.probs.dims();
    let [_, k] = decision.topk_experts.dims();
    let device = decision.probs.device();
    let probs = host_floats(decision.probs.clone().detach());
    let select = host_floats(decision.select.clone());
    let valid = host_floats(valid);
    let topk = host_ints(decision.topk_experts.clone());
    let c = capacity.min(t);
    let passes = k.saturating_add(depth).min(e);

    // Each token's ranking: its top-k choices, then the enabled others by
    // selection key, best first (ties by expert index).
    let ranking: Vec<Vec<usize>> = (0..t)
        .map(|tok| {
            let own = &topk[tok * k..(tok + 1) * k];
            let mut rest: Vec<usize> = (0..e)
                .filter(|&ex| !own.contains(&(ex as i64)) && select[tok * e + ex] > DISABLED)
                .collect();
            rest.sort_by(|&a, &b| {
                select[tok * e + b]
                    .total_cmp(&select[tok * e + a])
                    .then(a.cmp(&b))
            });
            own.iter()
                .map(|&ex| ex as usize)
                .chain(rest)
                .take(passes)
                .collect()
        })
        .collect();

    // queues[ex]: (token, assignment j) in slot order.
    let mut queues: Vec<Vec<(usize, usize)>> = vec![Vec::new(); e];
    let mut used: Vec<Option<usize>> = vec![None; t * k];
    let mut filled = vec![0usize; t];
    for p in 0..passes {
        // (expert, probability, token) of every asker in this pass.
        let mut asks: Vec<(usize, f32, usize)> = (0..t)
            .filter(|&tok| valid[tok] != 0.0 && filled[tok] < k)
            .filter_map(|tok| {
                ranking[tok]
                    .get(p)
                    .map(|&ex| (ex, probs[tok * e + ex], tok))
            })
            .collect();
        asks.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.total_cmp(&a.1)).then(a.2.cmp(&b.2)));
        for (ex, _, tok) in asks {
            if queues[ex].len() < c {
                let j = filled[tok];
                queues[ex].push((tok, j));
                used[tok * k + j] = Some(ex);
                filled[tok] += 1;
            }
        }
    }

    let mut experts = vec![0i64; t * k];
    let mut rerouted = 0usize;
    for tok in 0..t {
        let own = &topk[tok * k..(tok + 1) * k];
        let got = &used[tok * k..tok * k + filled[tok]];
        rerouted += got
            .iter()
            .filter(|ex| !own.contains(&(ex.unwrap() as i64)))
            .count();
        // Dropped assignments keep the token's own choices it did not get.
        let mut missed = own.iter().filter(|&&ex| !got.contains(&Some(ex as usize)));
        for j in 0..k {
            experts[tok * k + j] = match used[tok * k + j] {
                Some(ex) => ex as i64,
                None => *missed
                    .next()
                    .expect("a token misses as many choices as it lacks"),
            };
        }
    }

    DispatchPlan {
        rerouted: Some((
            Tensor::from_data(TensorData::new(experts, [t, k]), &device),
            Tensor::from_data(TensorData::new(vec![rerouted as f32], [1]), &device),
        )),
        ..plan_from_queues(&queues, Some(c), t, k, &device)
    }
}

/// The rerouting plan built with batched operations on the device: each
/// pass is a handful of `[T, E]` operations, with no host read (except, on
/// the CPU backend, the busiest expert's count to cut the buffers).
///
/// # Shapes
/// - `valid`: `[T]`, 1.0 for real tokens and 0.0 for padding
pub fn plan_on_device(
    decision: &RoutingDecision,
    valid: Tensor<1>,
    capacity: usize,
    depth: usize,
) -> DispatchPlan {
    let [t, e] = decision.probs.dims();
    let [_, k] = decision.topk_experts.dims();
    let device = decision.probs.device();
    let topk = decision.topk_experts.clone();
    let int = topk.dtype();
    let probs = decision.probs.clone().detach();
    let c = capacity.min(t);
    let passes = k.saturating_add(depth).min(e);

    // The ranking key: the top-k choices first, in order, then the
    // selection key. `[T, E]`
    let ones_tk = Tensor::<2>::ones([t, k], &device);
    let own = Tensor::<2>::zeros([t, e], &device)
        .scatter(1, topk.clone(), ones_tk.clone(), IndexingUpdateOp::Add)
        .greater_elem(0.5); // [T, E]
    let lead = Tensor::<1, Int>::arange(0..k as i64, &device)
        .float()
        .neg()
        .add_scalar(1.0e6)
        .unsqueeze::<2>()
        .expand([t, k]); // 1e6 - j
    let lead =
        Tensor::<2>::zeros([t, e], &device).scatter(1, topk.clone(), lead, IndexingUpdateOp::Add);
    let key = decision.select.clone().mask_where(own.clone(), lead);
    let ranking = key.clone().argsort_descending(1).cast(int); // [T, E]

    let real = valid.greater_elem(0.0).reshape([t, 1]); // [T, 1]
    let mut filled = Tensor::<2, Int>::zeros([t, 1], &device).cast(int); // [T, 1]
    let mut count = Tensor::<1, Int>::zeros([e], &device).cast(int); // [E]
                                                                     // Per assignment column (plus a discard column k): expert and place in
                                                                     // its queue.
    let mut used = Tensor::<2, Int>::zeros([t, k + 1], &device).cast(int);
    let mut place = Tensor::<2, Int>::zeros([t, k + 1], &device).cast(int);
    for p in 0..passes {
        let cand = ranking.clone().slice([0..t, p..p + 1]); // [T, 1]
        let enabled = key.clone().gather(1, cand.clone()).greater_elem(DISABLED);
        let active = real
            .clone()
            .bool_and(filled.clone().lower_elem(k as i64))
            .bool_and(enabled); // [T, 1]
        let asks = Tensor::<2>::zeros([t, e], &device).scatter(
            1,
            cand.clone(),
            active.clone().float(),
            IndexingUpdateOp::Add,
        ); // [T, E]
        let prob = probs.clone().gather(1, cand.clone()); // [T, 1]
        let priority = asks.clone() * (prob + 1.0) - 1.0; // askers first, best first
        let rank = priority
            .argsort_descending(0)
            .cast(int)
            .argsort(0)
            .cast(int); // [T, E]
        let pos = rank.gather(1, cand.clone()); // [T, 1]: place among the expert's askers
        let flat = cand.clone().reshape([t]);
        let before = count.clone().select(0, flat.clone()).reshape([t, 1]); // [T, 1]
        let taken = active.bool_and((pos.clone() + before.clone()).lower_elem(c as i64)); // [T, 1]
        let col = filled.clone().mask_fill(taken.clone().bool_not(), k as i64); // [T, 1]
        used = used.clone().scatter(
            1,
            col.clone(),
            cand.clone() - used.gather(1, col.clone()),
            IndexingUpdateOp::Add,
        );
        place = place.clone().scatter(
            1,
            col.clone(),
            (before + pos) - place.gather(1, col),
            IndexingUpdateOp::Add,
        );
        let taken_i = taken.int().cast(int);
        filled = filled + taken_i.clone();
        count = count
            + Tensor::<1, Int>::zeros([e], &device).cast(int).scatter(
                0,
                flat,
                taken_i.reshape([t]),
                IndexingUpdateOp::Add,
            );
    }
    let used = used.slice([0..t, 0..k]); // [T, k]
    let place = place.slice([0..t, 0..k]);
    let cols = Tensor::<1, Int>::arange(0..k as i64, &device)
        .cast(int)
        .unsqueeze::<2>()
        .expand([t, k]); // [T, k]
    let got = cols.clone().lower(filled.clone().expand([t, k])); // [T, k]: column j holds a slot

    // Own choices the token did not get, moved (in order) into the columns
    // after its slots.
    let same = used
        .clone()
        .unsqueeze_dim::<3>(1)
        .expand([t, k, k])
        .equal(topk.clone().unsqueeze_dim::<3>(2).expand([t, k, k])); // [T, own i, col j]
    let obtained = same
        .bool_and(got.clone().unsqueeze_dim::<3>(1).expand([t, k, k]))
        .int()
        .sum_dim(2)
        .reshape([t, k])
        .greater_elem(0); // [T, k]: own choice i was obtained
    let missed = obtained.clone().bool_not();
    let order = missed.clone().int().cast(int).cumsum(1) - 1; // [T, k]
                                                              // Past column k − 1 is the discard column (a token that got all its
                                                              // slots elsewhere misses more own choices than it has free columns).
    let dest = (filled.clone().expand([t, k]) + order)
        .clamp_max(k as i64)
        .mask_fill(obtained, k as i64); // [T, k]
    let widened = Tensor::cat(
        vec![
            used.clone(),
            Tensor::<2, Int>::zeros([t, 1], &device).cast(int),
        ],
        1,
    ); // [T, k + 1]
    let fill = topk.clone().mask_fill(missed.clone().bool_not(), 0)
        - widened
            .clone()
            .gather(1, dest.clone())
            .mask_fill(missed.bool_not(), 0);
    let experts = widened
        .scatter(1, dest, fill, IndexingUpdateOp::Add)
        .slice([0..t, 0..k]); // [T, k]
    let experts = experts.mask_where(got.clone(), used.clone());

    let cb = if on_cpu(&device) {
        let busiest = count.clone().max().into_scalar::<i64>() as f32;
        busiest_capacity(busiest, t, granule(&device)).min(c)
    } else {
        c
    };
    let slot =
        (used.clone() * (cb as i64) + place).mask_fill(got.clone().bool_not(), (e * cb) as i64); // [T, k]
    let slot_for_assignment = slot.reshape([t * k]);
    let tokens = Tensor::<1, Int>::arange(0..t as i64, &device)
        .cast(int)
        .unsqueeze_dim::<2>(1)
        .expand([t, k])
        .reshape([t * k]);
    let token_for_slot = Tensor::<1, Int>::full([e * cb + 1], t as i64, &device)
        .cast(int)
        .scatter(
            0,
            slot_for_assignment.clone(),
            tokens - (t as i64),
            IndexingUpdateOp::Add,
        )
        .slice([0..e * cb]);
    // Only slots taken by a token with a real slot were written; the
    // discard index e·cb collected every dropped assignment.
    let rerouted = (got.clone().int().sum()
        - own
            .int()
            .gather(1, used.clone())
            .bool()
            .bool_and(got)
            .int()
            .sum())
    .float();

    DispatchPlan {
        capacity: cb,
        token_for_slot,
        slot_for_assignment,
        kept_per_expert: count.float(),
        grouping: None,
        rerouted: Some((experts, rerouted)),
    }
}
