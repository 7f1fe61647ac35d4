//! Behaviour of the routed-expert layer, end to end, on small seeded inputs.

// `tensor.slice([a..b])` is Burn's slicing of the first dimension.
#![allow(clippy::single_range_in_vec_init)]

use burn::module::Param;
use burn::prelude::*;
use burn::tensor::Distribution;
use std::sync::{Mutex, MutexGuard};
use switchyard::config::{DropPolicy, MoeConfig, RouterScore, TopkOrder};
use switchyard::moe::{MoeLayer, Phase};
use switchyard::nn::Mlp;

/// The flex backend's RNG is process-wide: tests that seed it and then draw
/// from it hold this lock so that parallel tests cannot interleave draws.
static RNG: Mutex<()> = Mutex::new(());

fn seeded(device: &Device, seed: u64) -> MutexGuard<'static, ()> {
    let guard = RNG.lock().unwrap_or_else(|e| e.into_inner());
    device.seed(seed);
    guard
}

fn vec1(t: Tensor<1>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap()
}
fn vec2(t: Tensor<2>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap()
}
fn vec3(t: Tensor<3>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap()
}

fn cfg(e: usize, k: usize) -> MoeConfig {
    MoeConfig {
        num_experts: e,
        top_k: k,
        d_expert: 16,
        ..MoeConfig::default()
    }
}

fn randn3(shape: [usize; 3], device: &Device) -> Tensor<3> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), device)
}

#[test]
fn one_expert_top1_equals_dense_mlp() {
    let device = Device::flex();
    let _rng = seeded(&device, 1);
    let d = 12;
    let mlp = Mlp::new(d, 16, 0.2, &device);
    let mut moe = MoeLayer::new(
        d,
        &MoeConfig {
            drop_policy: DropPolicy::Dropless,
            ..cfg(1, 1)
        },
        0.2,
        &device,
    );
    moe.experts.gate_proj = Param::from_tensor(mlp.gate_proj.weight.val().unsqueeze());
    moe.experts.up_proj = Param::from_tensor(mlp.up_proj.weight.val().unsqueeze());
    moe.experts.down_proj = Param::from_tensor(mlp.down_proj.weight.val().unsqueeze());

    let x = randn3([2, 5, d], &device);
    let (y, aux) = moe.forward(x.clone(), Tensor::ones([2, 5], &device), Phase::Train);
    let want = mlp.forward(x);
    let (a, b) = (vec3(y), vec3(want));
    let diff = a
        .iter()
        .zip(&b)
        .map(|(p, q)| (p - q).abs())
        .fold(0.0, f32::max);
    assert!(
        diff < 1e-5,
        "MoE(E=1,k=1) differs from the dense MLP by {diff}"
    );
    assert_eq!(vec1(aux.stats.dropped()), vec![0.0]);
    // A single expert is perfectly "balanced": f = P = 1 → aux = 1.
    assert!((vec1(aux.losses.load_balancing)[0] - 1.0).abs() < 1e-6);
}

#[test]
fn capacity_keeps_the_highest_probability_assignments() {
    let device = Device::flex();
    let _rng = seeded(&device, 9);
    let (d, e, t) = (4, 4, 8);
    let moe_cfg = MoeConfig {
        capacity_factor: 1.0,
        ..cfg(e, 1)
    };
    let mut moe = MoeLayer::new(d, &moe_cfg, 0.2, &device);
    // Only feature 0 reaches the router, and only expert 0's logit: every
    // token picks expert 0 with probability increasing in x[0].
    let mut w = vec![0f32; d * e];
    w[0] = 3.0;
    moe.router.weight = Param::from_tensor(Tensor::from_data(TensorData::new(w, [d, e]), &device));
    // x[0] per token: the two largest sit at positions 2 and 5, not at the start.
    let x0 = [0.1f32, 0.3, 0.9, 0.2, 0.4, 0.8, 0.5, 0.6];
    let mut x = vec![0f32; t * d];
    for (i, v) in x0.iter().enumerate() {
        x[i * d] = *v;
        x[i * d + 1] = 1.0; // gives every expert a nonzero output
        x[i * d + 2] = -0.5;
    }
    let x = Tensor::<3>::from_data(TensorData::new(x, [1, t, d]), &device);
    let (y, aux) = moe.forward(x, Tensor::ones([1, t], &device), Phase::Train);

    // capacity = ceil(1.0 * 8 * 1 / 4) = 2
    assert_eq!(
        vec1(aux.stats.routed_per_expert.clone()),
        vec![8.0, 0.0, 0.0, 0.0]
    );
    assert_eq!(
        vec1(aux.stats.kept_per_expert.clone()),
        vec![2.0, 0.0, 0.0, 0.0]
    );
    assert_eq!(vec1(aux.stats.dropped()), vec![6.0]);
    let y = vec3(y);
    let nonzero: Vec<usize> = (0..t)
        .filter(|&i| y[i * d..(i + 1) * d].iter().any(|v| v.abs() > 0.0))
        .collect();
    assert_eq!(
        nonzero,
        vec![2, 5],
        "kept tokens must be the two most probable"
    );
}

#[test]
fn dropless_drops_nothing_under_total_collapse() {
    let device = Device::flex();
    let _rng = seeded(&device, 10);
    let (d, e) = (4, 4);
    let mut moe = MoeLayer::new(
        d,
        &MoeConfig {
            drop_policy: DropPolicy::Dropless,
            ..cfg(e, 1)
        },
        0.2,
        &device,
    );
    let mut w = vec![0f32; d * e];
    w[0] = 3.0;
    moe.router.weight = Param::from_tensor(Tensor::from_data(TensorData::new(w, [d, e]), &device));
    let x = randn3([2, 6, d], &device).abs();
    let (_, aux) = moe.forward(x, Tensor::ones([2, 6], &device), Phase::Train);
    assert_eq!(
        vec1(aux.stats.kept_per_expert.clone()),
        vec![12.0, 0.0, 0.0, 0.0]
    );
    assert_eq!(vec1(aux.stats.dropped()), vec![0.0]);
}

#[test]
fn padding_is_excluded_from_stats_and_losses() {
    let device = Device::flex();
    let _rng = seeded(&device, 3);
    let d = 8;
    let moe = MoeLayer::new(d, &cfg(4, 2), 0.5, &device);
    let x = randn3([2, 6, d], &device);
    let mut mask = vec![1f32; 12];
    for i in [4, 5, 9, 10, 11] {
        mask[i] = 0.0;
    }
    let valid = Tensor::<2>::from_data(TensorData::new(mask, [2, 6]), &device);
    let (_, aux) = moe.forward(x.clone(), valid, Phase::Eval);
    let routed: f32 = vec1(aux.stats.routed_per_expert.clone()).iter().sum();
    assert_eq!(
        routed,
        7.0 * 2.0,
        "only the 7 real tokens count, k = 2 each"
    );
    assert_eq!(vec1(aux.stats.num_tokens.clone()), vec![7.0]);

    // The same real tokens without the padding rows give the same losses.
    let real = Tensor::cat(
        vec![x.clone().slice([0..1, 0..4]), x.slice([1..2, 0..3])],
        1,
    ); // [1, 7, d]
    let (_, aux2) = moe.forward(real, Tensor::ones([1, 7], &device), Phase::Eval);
    for (a, b) in [
        (aux.losses.load_balancing, aux2.losses.load_balancing),
        (aux.losses.z_loss, aux2.losses.z_loss),
    ] {
        let (a, b) = (vec1(a)[0], vec1(b)[0]);
        assert!((a - b).abs() < 1e-5 * b.abs().max(1.0), "{a} vs {b}");
    }
    assert_eq!(
        vec1(aux.stats.routed_per_expert),
        vec1(aux2.stats.routed_per_expert)
    );
}

#[test]
fn gradients_reach_router_selected_and_shared_experts_only() {
    let device = Device::flex().autodiff();
    let _rng = seeded(&device, 4);
    let (d, e, k) = (8, 4, 2);
    let moe_cfg = MoeConfig {
        num_shared_experts: 1,
        shared_expert_gate: true,
        drop_policy: DropPolicy::Dropless,
        ..cfg(e, k)
    };
    let mut moe = MoeLayer::new(d, &moe_cfg, 0.3, &device);
    // Feature 0 is a constant 1 for every token; expert 3's router column
    // gives it logit -100, so it is never among the top 2.
    let mut w: Vec<f32> = (0..d * e)
        .map(|i| ((i * 7919) % 13) as f32 / 13.0 - 0.5)
        .collect();
    w[3] = -100.0; // row 0, column 3
    moe.router.weight = Param::from_tensor(Tensor::from_data(TensorData::new(w, [d, e]), &device));
    let x = randn3([2, 8, d], &device);
    let ones = Tensor::<3>::ones([2, 8, 1], &device);
    let x = Tensor::cat(vec![ones, x.slice_dim(2, 1..d)], 2);

    let (y, aux) = moe.forward(x, Tensor::ones([2, 8], &device), Phase::Train);
    let loss = y.square().mean() + aux.losses.load_balancing.clone() * 0.01;
    let grads = loss.backward();

    let tpe = vec1(aux.stats.routed_per_expert.clone().inner());
    assert_eq!(tpe[3], 0.0, "expert 3 must receive no tokens: {tpe:?}");
    let router_g = vec2(moe.router.weight.grad(&grads).unwrap());
    assert!(
        router_g.iter().any(|v| v.abs() > 0.0),
        "router has no gradient"
    );

    for (name, p) in [
        ("gate_proj", &moe.experts.gate_proj),
        ("up_proj", &moe.experts.up_proj),
        ("down_proj", &moe.experts.down_proj),
    ] {
        let g = p.grad(&grads).unwrap();
        let per_expert = vec1(g.abs().sum_dim(2).sum_dim(1).reshape([e]));
        for ex in 0..e {
            if tpe[ex] > 0.0 {
                assert!(
                    per_expert[ex] > 0.0,
                    "{name}: expert {ex} had tokens but no gradient"
                );
            } else {
                assert_eq!(
                    per_expert[ex], 0.0,
                    "{name}: idle expert {ex} has a gradient"
                );
            }
        }
    }
    let shared = moe.shared_expert.as_ref().unwrap();
    let g = vec2(shared.down_proj.weight.grad(&grads).unwrap());
    assert!(
        g.iter().any(|v| v.abs() > 0.0),
        "shared expert has no gradient"
    );
    let g = vec2(
        moe.shared_expert_gate
            .as_ref()
            .unwrap()
            .weight
            .grad(&grads)
            .unwrap(),
    );
    assert!(
        g.iter().any(|v| v.abs() > 0.0),
        "shared gate has no gradient"
    );
}

fn noisy_cfg() -> MoeConfig {
    MoeConfig {
        jitter_eps: 0.1,
        logit_noise_std: 1.0,
        expert_dropout: 0.3,
        ..cfg(8, 2)
    }
}

#[test]
fn eval_is_deterministic_and_train_is_seeded() {
    let device = Device::flex();
    let _rng = seeded(&device, 5);
    let d = 8;
    let moe = MoeLayer::new(d, &noisy_cfg(), 0.5, &device);
    let x = randn3([2, 16, d], &device);
    let valid = Tensor::<2>::ones([2, 16], &device);
    let run = |phase| {
        let (y, aux) = moe.forward(x.clone(), valid.clone(), phase);
        (vec3(y), vec2(aux.router_logits))
    };
    let e1 = run(Phase::Eval);
    let e2 = run(Phase::Eval);
    assert_eq!(e1, e2, "eval must be deterministic");
    // Eval logits are the plain linear map: no noise.
    let plain = vec2(x.clone().reshape([32, d]).matmul(moe.router.weight.val()));
    let diff =
        e1.1.iter()
            .zip(&plain)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
    assert!(diff < 1e-5, "eval router logits carry noise ({diff})");

    device.seed(42);
    let t1 = run(Phase::Train);
    device.seed(42);
    let t2 = run(Phase::Train);
    assert_eq!(t1, t2, "training with the same seed must reproduce");
    assert_ne!(t1.1, e1.1, "training mode must add noise");
}

/// A jitter too small to move 1.0 in f32 (1e-30) multiplies by exactly 1:
/// training-mode router logits equal the eval ones, where the sampler
/// would otherwise be handed the empty range [1, 1).
#[test]
fn a_jitter_below_f32_resolution_changes_nothing() {
    let device = Device::flex();
    let _rng = seeded(&device, 7);
    let d = 8;
    let moe_cfg = MoeConfig {
        jitter_eps: 1e-30,
        ..cfg(8, 2)
    };
    let moe = MoeLayer::new(d, &moe_cfg, 0.5, &device);
    let x = randn3([2, 16, d], &device);
    let valid = Tensor::<2>::ones([2, 16], &device);
    let logits = |phase| vec2(moe.forward(x.clone(), valid.clone(), phase).1.router_logits);
    assert_eq!(logits(Phase::Train), logits(Phase::Eval));
}

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

/// A router over 8 experts whose logits are the token itself (identity
/// weight), so each row of `scores` sets the sigmoid scores directly.
fn identity_router(moe_cfg: &MoeConfig, bias: Option<Vec<f32>>, device: &Device) -> MoeLayer {
    let e = moe_cfg.num_experts;
    let mut moe = MoeLayer::new(e, moe_cfg, 0.1, device);
    let eye: Vec<f32> = (0..e * e)
        .map(|i| if i / e == i % e { 1.0 } else { 0.0 })
        .collect();
    moe.router.weight = Param::from_tensor(Tensor::from_data(TensorData::new(eye, [e, e]), device));
    if let Some(b) = bias {
        moe.router.expert_bias = Some(
            Param::from_tensor(Tensor::from_data(TensorData::new(b, [e]), device))
                .set_require_grad(false),
        );
    }
    moe
}

/// Tokens whose sigmoid router scores are `scores`. `[1, T, E]`
fn tokens_with_scores(scores: &[[f32; 8]], device: &Device) -> Tensor<3> {
    let logits: Vec<f32> = scores
        .iter()
        .flat_map(|r| r.iter().map(|p| (p / (1.0 - p)).ln()))
        .collect();
    Tensor::from_data(TensorData::new(logits, [1, scores.len(), 8]), device)
}

#[test]
fn group_limited_routing_picks_within_the_best_groups_by_hand() {
    // Two groups, {0..3} and {4..7}; a group scores the sum of its two best.
    //   token 0: group 0 = 0.9 + 0.1 = 1.0, group 1 = 0.8 + 0.7 = 1.5
    //            → group 1 → experts 5 and 6 (globally it would be 0 and 5)
    //   token 1: group 0 = 0.6 + 0.5 = 1.1, group 1 = 0.7 + 0.1 = 0.8
    //            → group 0 → experts 0 and 1 (globally 4 and 0)
    // Weights: the chosen scores renormalised, times routed_scaling_factor.
    let device = Device::flex();
    let scores = [
        [0.9, 0.1, 0.1, 0.1, 0.2, 0.8, 0.7, 0.1],
        [0.6, 0.5, 0.1, 0.1, 0.7, 0.1, 0.1, 0.1],
    ];
    let x = tokens_with_scores(&scores, &device);
    let grouped = MoeConfig {
        score: RouterScore::Sigmoid,
        n_group: 2,
        topk_group: 1,
        routed_scaling_factor: 2.5,
        drop_policy: DropPolicy::Dropless,
        ..cfg(8, 2)
    };
    let check = |moe_cfg: &MoeConfig, bias: Option<Vec<f32>>, want: [[(i64, f32); 2]; 2]| {
        let moe = identity_router(moe_cfg, bias, &device);
        let (_, aux) = moe.forward(x.clone(), Tensor::ones([1, 2], &device), Phase::Eval);
        let idx: Vec<i64> = aux.topk_experts.into_data_as::<i64>().try_to_vec().unwrap();
        let w = vec2(aux.topk_weights);
        for t in 0..2 {
            for j in 0..2 {
                let (e, wt) = want[t][j];
                assert_eq!(idx[t * 2 + j], e, "token {t} choice {j}: {idx:?}");
                assert!((w[t * 2 + j] - wt).abs() < 1e-5, "token {t}: {w:?}");
            }
        }
    };
    check(
        &grouped,
        None,
        [
            [(5, 2.5 * 0.8 / 1.5), (6, 2.5 * 0.7 / 1.5)],
            [(0, 2.5 * 0.6 / 1.1), (1, 2.5 * 0.5 / 1.1)],
        ],
    );
    // One group (the default): the global top-2, scaling 1.
    check(
        &MoeConfig {
            n_group: 1,
            routed_scaling_factor: 1.0,
            ..grouped.clone()
        },
        None,
        [
            [(0, 0.9 / 1.7), (5, 0.8 / 1.7)],
            [(4, 0.7 / 1.3), (0, 0.6 / 1.3)],
        ],
    );
    // The selection bias counts in the group score and the choice, not in
    // the weights: +0.5 on expert 7 lifts token 1's group 1 to 0.7 + 0.6 =
    // 1.3 > 1.1, so token 1 takes experts 4 and 7 with weights 0.7 and 0.1
    // renormalised. Token 0 keeps group 1 (0.8 + 0.7 against 1.0) and
    // experts 5 and 6 (0.6 for expert 7 is below both).
    let bias = vec![0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5];
    check(
        &MoeConfig {
            aux_free_bias: true,
            ..grouped.clone()
        },
        Some(bias),
        [
            [(5, 2.5 * 0.8 / 1.5), (6, 2.5 * 0.7 / 1.5)],
            [(4, 2.5 * 0.7 / 0.8), (7, 2.5 * 0.1 / 0.8)],
        ],
    );
}

#[test]
fn routed_scaling_factor_scales_the_routed_output_only() {
    let device = Device::flex();
    let _rng = seeded(&device, 21);
    let d = 8;
    let base = MoeConfig {
        num_shared_experts: 1,
        drop_policy: DropPolicy::Dropless,
        ..cfg(4, 2)
    };
    let x = randn3([2, 5, d], &device);
    let valid = Tensor::<2>::ones([2, 5], &device);
    let moe = MoeLayer::new(d, &base, 0.3, &device);
    let scaled_cfg = MoeConfig {
        routed_scaling_factor: 2.5,
        ..base.clone()
    };
    let mut scaled = MoeLayer::new(d, &scaled_cfg, 0.3, &device);
    scaled.router = moe.router.clone();
    scaled.experts = moe.experts.clone();
    scaled.shared_expert = moe.shared_expert.clone();
    let shared = moe
        .shared_expert
        .as_ref()
        .unwrap()
        .forward(x.clone().reshape([10, d]))
        .reshape([2, 5, d]);
    let (y1, _) = moe.forward(x.clone(), valid.clone(), Phase::Eval);
    let (y25, _) = scaled.forward(x, valid, Phase::Eval);
    let want = vec3((y1 - shared.clone()).mul_scalar(2.5) + shared);
    let got = vec3(y25);
    for (a, b) in got.iter().zip(&want) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
}
