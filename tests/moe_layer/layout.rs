//! The capacity buffers and grouped rows against per-token sums, and the host and device plans slot for slot.

use super::*;

/// One expert applied to one token, straight from the stacked weights.
fn expert_on_token(moe: &MoeLayer, e: usize, x: Tensor<2>) -> Tensor<2> {
    let [_, d, f] = moe.experts.gate_proj.val().dims();
    let w = |p: &Param<Tensor<3>>, rows, cols| p.val().slice([e..e + 1]).reshape([rows, cols]);
    let g = x.clone().matmul(w(&moe.experts.gate_proj, d, f));
    let u = x.matmul(w(&moe.experts.up_proj, d, f));
    (burn::tensor::activation::silu(g) * u).matmul(w(&moe.experts.down_proj, f, d))
}

#[test]
fn cpu_capacity_buffers_are_cut_to_the_busiest_expert_and_both_expert_paths_match_per_token_sums() {
    use switchyard::moe::dispatch;
    let device = Device::flex();
    let _rng = seeded(&device, 33);
    let (d, e, k, b, s) = (8, 8, 2, 4, 80);
    let t = b * s;
    // C = ceil(2 · 320 · 2 / 8) = 160, about twice what any expert gets.
    let moe = MoeLayer::new(
        d,
        &MoeConfig {
            capacity_factor: 2.0,
            ..cfg(e, k)
        },
        0.5,
        &device,
    );
    let c = moe.config().capacity(t, 2.0).unwrap();
    assert_eq!(c, 160);
    let x = randn3([b, s, d], &device);
    let valid = Tensor::<2>::ones([b, s], &device);
    let (y, aux) = moe.forward(x.clone(), valid.clone(), Phase::Train);
    assert_eq!(vec1(aux.stats.dropped()), vec![0.0]);

    let flat = x.reshape([t, d]);
    let decision = moe.router.forward(flat.clone(), moe.config(), Phase::Train);
    let plan = switchyard::moe::policy::plan(
        &decision,
        valid.reshape([t]),
        Some(c),
        switchyard::moe::policy::Overflow::Drop,
    );
    let busiest = vec1(aux.stats.routed_per_expert.clone())
        .into_iter()
        .fold(0.0, f32::max) as usize;
    assert!(
        plan.capacity >= busiest && plan.capacity < c,
        "buffer {} for busiest {busiest}",
        plan.capacity
    );

    // Every token's output, one expert at a time, from the chosen experts and
    // their combine weights.
    let experts = aux
        .topk_experts
        .into_data()
        .convert::<i64>()
        .try_to_vec::<i64>()
        .unwrap();
    let aux_weights = aux.topk_weights.clone();
    let weights = vec2(aux.topk_weights);
    let y = vec3(y);
    let mut worst = 0.0f32;
    for tok in 0..t {
        let xt = flat.clone().slice([tok..tok + 1]);
        let mut want = vec![0f32; d];
        for j in 0..k {
            let out = vec2(expert_on_token(
                &moe,
                experts[tok * k + j] as usize,
                xt.clone(),
            ));
            for (w, o) in want.iter_mut().zip(out) {
                *w += weights[tok * k + j] * o;
            }
        }
        for (i, w) in want.iter().enumerate() {
            worst = worst.max((y[tok * d + i] - w).abs());
        }
    }
    assert!(
        worst < 1e-5,
        "layer output differs from the per-token sum by {worst}"
    );

    // The padded path GPU backends take (capacity buffers, one batched
    // matmul per projection) gives the same output from the same plan.
    let weights = aux_weights.cast(flat.dtype());
    let buffers = dispatch::dispatch(flat, &plan, e);
    let padded = vec2(dispatch::combine(
        moe.experts.forward(buffers),
        &plan,
        weights,
    ));
    let worst = padded
        .iter()
        .zip(&y)
        .map(|(p, q)| (p - q).abs())
        .fold(0.0, f32::max);
    assert!(
        worst < 1e-5,
        "padded path differs from the grouped one by {worst}"
    );
}

#[test]
fn the_host_plan_and_the_device_plan_agree_slot_for_slot() {
    use switchyard::moe::dispatch;
    let device = Device::flex();
    let _rng = seeded(&device, 41);
    let (d, e, k, b, s) = (8, 8, 2, 3, 50);
    let t = b * s;
    let moe = MoeLayer::new(d, &cfg(e, k), 0.5, &device);
    let x = randn3([b, s, d], &device).reshape([t, d]);
    // Padding: the last 7 positions of the second sequence.
    let valid: Vec<f32> = (0..t)
        .map(|i| {
            if (s + s - 7..2 * s).contains(&i) {
                0.0
            } else {
                1.0
            }
        })
        .collect();
    let valid = Tensor::<1>::from_data(TensorData::new(valid, [t]), &device);
    let decision = moe.router.forward(x, moe.config(), Phase::Train);
    let ints = |t: Tensor<1, Int>| t.into_data().convert::<i64>().try_to_vec::<i64>().unwrap();
    // Capacity well below the busiest expert's load, at it, and dropless.
    let busiest = vec1(
        (decision.routing_map.clone() * valid.clone().reshape([t, 1]))
            .sum_dim(0)
            .reshape([e]),
    )
    .into_iter()
    .fold(0.0, f32::max) as usize;
    let mut dropped_some = false;
    for capacity in [Some(t * k / e / 2), Some(busiest), None] {
        let host = dispatch::plan_on_host(&decision, valid.clone(), capacity);
        let dev = dispatch::plan_on_device(&decision, valid.clone(), capacity);
        assert_eq!(host.capacity, dev.capacity, "capacity {capacity:?}");
        assert_eq!(
            ints(host.token_for_slot.clone()),
            ints(dev.token_for_slot.clone()),
            "token_for_slot at capacity {capacity:?}"
        );
        assert_eq!(
            ints(host.slot_for_assignment.clone()),
            ints(dev.slot_for_assignment.clone()),
            "slot_for_assignment at capacity {capacity:?}"
        );
        let kept = vec1(host.kept_per_expert.clone());
        assert_eq!(kept, vec1(dev.kept_per_expert.clone()));
        dropped_some |= kept.iter().sum::<f32>() < ((t - 7) * k) as f32;
        let grouped = host
            .grouping
            .clone()
            .expect("the host plan groups its rows");
        let want = dispatch::group(&dev, e, t);
        assert_eq!(ints(grouped.token_for_row), ints(want.token_for_row));
        assert_eq!(grouped.offsets, want.offsets);
        assert_eq!(
            ints(grouped.row_for_assignment),
            ints(want.row_for_assignment)
        );
    }
    assert!(dropped_some, "no capacity above was tight enough to drop");
}
