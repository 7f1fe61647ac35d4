//! Expert dropout, the aux-loss-free bias, router score and order variants, and dropless buffers.

use super::*;

#[test]
fn expert_dropout_keeps_at_least_k_experts() {
    let device = Device::flex();
    let _rng = seeded(&device, 6);
    let d = 8;
    let moe_cfg = MoeConfig {
        expert_dropout: 0.999,
        ..cfg(8, 2)
    };
    let moe = MoeLayer::new(d, &moe_cfg, 0.5, &device);
    let x = randn3([2, 16, d], &device);
    let valid = Tensor::<2>::ones([2, 16], &device);
    // Without dropout, this batch spreads over more than two experts.
    let (_, eval) = moe.forward(x.clone(), valid.clone(), Phase::Eval);
    let used_eval = vec1(eval.stats.routed_per_expert)
        .iter()
        .filter(|&&c| c > 0.0)
        .count();
    assert!(
        used_eval > 2,
        "test batch should use several experts, used {used_eval}"
    );
    for _ in 0..5 {
        let (_, aux) = moe.forward(x.clone(), valid.clone(), Phase::Train);
        let tpe = vec1(aux.stats.routed_per_expert);
        let used = tpe.iter().filter(|&&c| c > 0.0).count();
        // With p ≈ 1 exactly the k protected experts remain, and every token uses both.
        assert_eq!(used, 2, "{tpe:?}");
        assert!(tpe.iter().all(|&c| c == 0.0 || c == 32.0), "{tpe:?}");
    }
}

#[test]
fn aux_free_bias_moves_toward_balance() {
    let device = Device::flex();
    let _rng = seeded(&device, 7);
    let (d, e) = (8, 4);
    let moe_cfg = MoeConfig {
        aux_free_bias: true,
        bias_update_rate: 0.02,
        drop_policy: DropPolicy::Dropless,
        ..cfg(e, 1)
    };
    let mut moe = MoeLayer::new(d, &moe_cfg, 0.3, &device);
    // Skew: expert 0 gets a head start of +2 on every logit.
    let ones = Tensor::<3>::ones([1, 64, 1], &device);
    let x = Tensor::cat(vec![ones, randn3([1, 64, d - 1], &device)], 2);
    let mut w = vec2(moe.router.weight.val());
    w[0] += 2.0;
    moe.router.weight = Param::from_tensor(Tensor::from_data(TensorData::new(w, [d, e]), &device));
    let valid = Tensor::<2>::ones([1, 64], &device);

    let imbalance = |tpe: &[f32]| tpe.iter().cloned().fold(0.0, f32::max) / (64.0 / e as f32);
    let (_, first) = moe.forward(x.clone(), valid.clone(), Phase::Train);
    let start = vec1(first.stats.routed_per_expert.clone());
    assert!(
        start[0] > 32.0,
        "the batch should be skewed to expert 0: {start:?}"
    );
    let mut tpe = start.clone();
    for _ in 0..200 {
        let (_, aux) = moe.forward(x.clone(), valid.clone(), Phase::Train);
        tpe = vec1(aux.stats.routed_per_expert.clone());
        let rate = moe.config().bias_update_rate;
        moe.router
            .update_expert_bias(aux.stats.routed_per_expert, rate);
    }
    let bias = vec1(moe.router.expert_bias.as_ref().unwrap().val());
    assert!(
        bias[0] < 0.0,
        "overloaded expert's bias must fall: {bias:?}"
    );
    assert!(
        imbalance(&tpe) < 0.6 * imbalance(&start),
        "load {start:?} -> {tpe:?} did not move toward balance"
    );
}

#[test]
fn score_and_order_variants_give_valid_weights() {
    let device = Device::flex();
    let _rng = seeded(&device, 8);
    let d = 8;
    let x = randn3([1, 10, d], &device);
    let valid = Tensor::<2>::ones([1, 10], &device);
    for (score, order, normalize) in [
        (RouterScore::Softmax, TopkOrder::SoftmaxThenTopk, false),
        (RouterScore::Softmax, TopkOrder::TopkThenSoftmax, false),
        (RouterScore::Sigmoid, TopkOrder::SoftmaxThenTopk, true),
        (RouterScore::Sigmoid, TopkOrder::SoftmaxThenTopk, false),
    ] {
        let c = MoeConfig {
            score,
            topk_order: order,
            normalize_topk: normalize,
            ..cfg(6, 3)
        };
        let moe = MoeLayer::new(d, &c, 0.5, &device);
        let (_, aux) = moe.forward(x.clone(), valid.clone(), Phase::Eval);
        let w = vec2(aux.topk_weights.clone());
        let logits = vec2(aux.router_logits.clone());
        let idx: Vec<i64> = aux
            .topk_experts
            .clone()
            .into_data_as::<i64>()
            .try_to_vec()
            .unwrap();
        for t in 0..10 {
            let row = &w[t * 3..t * 3 + 3];
            let sum: f32 = row.iter().sum();
            let l = |j: usize| logits[t * 6 + idx[t * 3 + j] as usize];
            // best first
            assert!(
                l(0) >= l(1) && l(1) >= l(2),
                "{score:?}/{order:?}: not sorted"
            );
            match (score, order, normalize) {
                (_, TopkOrder::TopkThenSoftmax, _) | (_, _, true) => {
                    assert!((sum - 1.0).abs() < 1e-5, "{score:?}/{order:?}: sum {sum}")
                }
                (RouterScore::Softmax, _, false) => assert!(sum < 1.0 && sum > 0.0),
                (RouterScore::Sigmoid, _, false) => {
                    for (j, wj) in row.iter().enumerate() {
                        let s = 1.0 / (1.0 + (-l(j)).exp());
                        assert!((wj - s).abs() < 1e-5, "sigmoid weight");
                    }
                }
            }
            if order == TopkOrder::TopkThenSoftmax {
                let m = l(0);
                let z: f32 = (0..3).map(|j| (l(j) - m).exp()).sum();
                for (j, &p) in row.iter().enumerate().take(3) {
                    assert!((p - (l(j) - m).exp() / z).abs() < 1e-5);
                }
            }
        }
    }
}

#[test]
fn dropless_buffers_fit_the_busiest_expert_and_match_full_capacity() {
    use switchyard::moe::dispatch;
    let device = Device::flex();
    let _rng = seeded(&device, 21);
    let (d, e, k, b, s) = (8, 8, 2, 4, 80);
    let t = b * s;
    let dropless = MoeLayer::new(
        d,
        &MoeConfig {
            drop_policy: DropPolicy::Dropless,
            ..cfg(e, k)
        },
        0.5,
        &device,
    );
    // The same weights with capacity C = ceil(cf · T · k / E) = T: nothing
    // can overflow, the plain (if E/k times costlier) dropless computation.
    let mut full = MoeLayer::new(
        d,
        &MoeConfig {
            drop_policy: DropPolicy::Drop,
            capacity_factor: (e / k) as f64,
            ..cfg(e, k)
        },
        0.5,
        &device,
    );
    full.router = dropless.router.clone();
    full.experts = dropless.experts.clone();
    assert_eq!(full.config().capacity(t, (e / k) as f64), Some(t));

    let x = randn3([b, s, d], &device);
    let valid = Tensor::<2>::ones([b, s], &device);
    let (y, aux) = dropless.forward(x.clone(), valid.clone(), Phase::Eval);
    let (want, _) = full.forward(x.clone(), valid.clone(), Phase::Train);
    let diff = vec3(y)
        .iter()
        .zip(vec3(want))
        .map(|(p, q)| (p - q).abs())
        .fold(0.0, f32::max);
    assert!(diff < 1e-5, "dropless differs from capacity T by {diff}");
    assert_eq!(vec1(aux.stats.dropped()), vec![0.0]);

    // The buffers hold the busiest expert, rounded up to 64, and are far
    // smaller than T.
    let decision = dropless
        .router
        .forward(x.reshape([t, d]), dropless.config(), Phase::Eval);
    let busiest = vec1(aux.stats.routed_per_expert.clone())
        .into_iter()
        .fold(0.0, f32::max) as usize;
    let plan = switchyard::moe::policy::plan(
        &decision,
        valid.reshape([t]),
        None,
        switchyard::moe::policy::Overflow::Drop,
    );
    assert!(plan.capacity >= busiest, "{} < {busiest}", plan.capacity);
    assert_eq!(plan.capacity % dispatch::granule(&device), 0);
    assert!(
        plan.capacity < t,
        "capacity {} is not below T = {t}",
        plan.capacity
    );
}
