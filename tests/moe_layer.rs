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

#[path = "moe_layer/variants.rs"]
mod variants;

#[path = "moe_layer/layout.rs"]
mod layout;

#[path = "moe_layer/groups.rs"]
mod groups;
