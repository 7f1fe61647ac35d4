//! Overflow rerouting (`moe.drop_policy = "reroute"`): where overflowing
//! assignments go, their weights and gradients, the two plan builders and
//! the two expert layouts against each other, and inference without
//! capacity.

// `tensor.slice([a..b])` is Burn's slicing of the first dimension.
#![allow(clippy::single_range_in_vec_init)]

use burn::module::Param;
use burn::prelude::*;
use burn::tensor::activation::{silu, softmax};
use burn::tensor::Distribution;
use std::sync::{Mutex, MutexGuard};
use switchyard::config::{DropPolicy, ModelConfig, MoeConfig};
use switchyard::model::LanguageModel;
use switchyard::moe::dispatch;
use switchyard::moe::policy::{self, Overflow};
use switchyard::moe::{MoeLayer, Phase};

/// The flex backend's RNG is process-wide: tests that seed it and then draw
/// from it hold this lock.
static RNG: Mutex<()> = Mutex::new(());

fn seeded(device: &Device, seed: u64) -> MutexGuard<'static, ()> {
    let guard = RNG.lock().unwrap_or_else(|e| e.into_inner());
    device.seed(seed);
    guard
}

fn floats<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}
fn ints<const D: usize>(t: Tensor<D, Int>) -> Vec<i64> {
    t.into_data().convert::<i64>().try_to_vec::<i64>().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(p, q)| (p - q).abs())
        .fold(0.0, f32::max)
}

/// One expert of the layer applied to rows `x: [n, d]`.
fn expert(moe: &MoeLayer, e: usize, x: Tensor<2>) -> Tensor<2> {
    let [_, d, f] = moe.experts.gate_proj.val().dims();
    let w = |p: &Param<Tensor<3>>, rows, cols| p.val().slice([e..e + 1]).reshape([rows, cols]);
    let g = x.clone().matmul(w(&moe.experts.gate_proj, d, f));
    let u = x.matmul(w(&moe.experts.up_proj, d, f));
    (silu(g) * u).matmul(w(&moe.experts.down_proj, f, d))
}

/// Six tokens that all put expert 0 first, through three experts with two
/// slots each (k = 1, capacity factor 1.0). Worked by hand:
///
/// - logits are `[2, a, b]` for a token `[1, a, b]`; expert 0 keeps the two
///   tokens with the highest p₀ (t0 and t5, whose a and b are lowest);
/// - pass 1: t1, t2 and t4 ask for expert 1 (their second choice), t3 for
///   expert 2. Expert 1 takes its two most probable askers, t4 (p₁ = 0.293)
///   and t1 (0.231), not t2 (0.205); expert 2 takes t3;
/// - pass 2: t2 asks for its third choice, expert 2, which has one slot left.
const TOKENS: [[f32; 3]; 6] = [
    [1.0, -1.0, -1.5],
    [1.0, 1.0, 0.5],
    [1.0, 0.8, 0.2],
    [1.0, 0.6, 1.0],
    [1.0, 1.2, -0.5],
    [1.0, -1.2, -1.0],
];

fn hand_case(policy: DropPolicy, depth: Option<usize>, device: &Device) -> MoeLayer {
    let cfg = MoeConfig {
        num_experts: 3,
        top_k: 1,
        d_expert: 4,
        capacity_factor: 1.0,
        normalize_topk: false,
        drop_policy: policy,
        reroute_depth: depth,
        ..MoeConfig::default()
    };
    let mut moe = MoeLayer::new(3, &cfg, 0.5, device);
    let w = vec![2.0f32, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]; // [d = 3, E = 3]
    moe.router.weight = Param::from_tensor(Tensor::from_data(TensorData::new(w, [3, 3]), device));
    moe
}

fn hand_tokens(device: &Device) -> Tensor<3> {
    let x: Vec<f32> = TOKENS.iter().flatten().copied().collect();
    Tensor::from_data(TensorData::new(x, [1, 6, 3]), device)
}

#[test]
fn rerouted_assignments_go_where_the_passes_send_them_with_the_right_weights_and_gradients() {
    let device = Device::flex().autodiff();
    let _rng = seeded(&device, 3);
    // (policy, depth, the expert each token computes with or None if dropped)
    let cases: [(DropPolicy, Option<usize>, [Option<usize>; 6]); 4] = [
        (
            DropPolicy::Drop,
            None,
            [Some(0), None, None, None, None, Some(0)],
        ),
        (
            DropPolicy::Reroute,
            None,
            [Some(0), Some(1), Some(2), Some(2), Some(1), Some(0)],
        ),
        // One choice past its own: t2's third choice is out of reach.
        (
            DropPolicy::Reroute,
            Some(1),
            [Some(0), Some(1), None, Some(2), Some(1), Some(0)],
        ),
        (
            DropPolicy::Reroute,
            Some(0),
            [Some(0), None, None, None, None, Some(0)],
        ),
    ];
    for (policy, depth, want) in cases {
        let moe = hand_case(policy, depth, &device);
        let x = hand_tokens(&device).require_grad();
        let (y, aux) = moe.forward(x.clone(), Tensor::ones([1, 6], &device), Phase::Train);
        let label = format!("{policy:?}, depth {depth:?}");
        let dropped = want.iter().filter(|w| w.is_none()).count() as f32;
        let rerouted = want.iter().filter(|w| **w > Some(0)).count() as f32;
        assert_eq!(
            floats(aux.stats.dropped()),
            vec![dropped],
            "{label}: dropped"
        );
        assert_eq!(
            floats(aux.stats.rerouted.clone()),
            vec![rerouted],
            "{label}: rerouted"
        );

        // The same function written out: y_t = p_t[e_t] · expert_{e_t}(x_t).
        let flat = x.clone().reshape([6, 3]);
        let probs = softmax(flat.clone().matmul(moe.router.weight.val()), 1);
        let rows: Vec<Tensor<2>> = (0..6)
            .map(|t| {
                let xt = flat.clone().slice([t..t + 1]);
                match want[t] {
                    Some(e) => expert(&moe, e, xt).mul(probs.clone().slice([t..t + 1, e..e + 1])),
                    None => xt.zeros_like(),
                }
            })
            .collect();
        let expected = Tensor::cat(rows, 0);
        let diff = max_diff(
            &floats(y.clone().reshape([6, 3])),
            &floats(expected.clone()),
        );
        assert!(diff < 1e-6, "{label}: output differs by {diff}");

        // Gradients of x, the router and the experts under a fixed readout.
        let g = Tensor::<2>::random([6, 3], Distribution::Normal(0.0, 1.0), &device);
        let ours = (y.reshape([6, 3]) * g.clone()).sum().backward();
        let theirs = (expected * g).sum().backward();
        let pairs = [
            ("x", x.grad(&ours).map(floats), x.grad(&theirs).map(floats)),
            (
                "router",
                moe.router.weight.val().grad(&ours).map(floats),
                moe.router.weight.val().grad(&theirs).map(floats),
            ),
            (
                "down_proj",
                moe.experts.down_proj.val().grad(&ours).map(floats),
                moe.experts.down_proj.val().grad(&theirs).map(floats),
            ),
        ];
        for (name, a, b) in pairs {
            let (a, b) = (a.expect("a gradient"), b.expect("a gradient"));
            let diff = max_diff(&a, &b);
            assert!(diff < 1e-5, "{label}: {name} gradient differs by {diff}");
        }
    }
}

/// A router that sends almost every token to experts 0 and 1.
fn biased_layer(policy: DropPolicy, device: &Device) -> MoeLayer {
    let (d, e) = (8, 8);
    let cfg = MoeConfig {
        num_experts: e,
        top_k: 2,
        d_expert: 16,
        capacity_factor: 1.25,
        drop_policy: policy,
        ..MoeConfig::default()
    };
    let mut moe = MoeLayer::new(d, &cfg, 0.3, device);
    let mut w = floats(moe.router.weight.val());
    w[0] = 4.0; // feature 0 (constant 1.0 below) → experts 0 and 1
    w[1] = 3.5;
    moe.router.weight = Param::from_tensor(Tensor::from_data(TensorData::new(w, [d, e]), device));
    moe
}

fn biased_tokens(t: usize, device: &Device) -> Tensor<2> {
    let x = Tensor::<2>::random([t, 8], Distribution::Normal(0.0, 1.0), device);
    let one = Tensor::<2>::ones([t, 1], device);
    Tensor::cat(vec![one, x.slice([0..t, 1..8])], 1)
}

#[test]
fn reroute_drops_nothing_while_other_experts_have_room_and_each_token_uses_distinct_experts() {
    let device = Device::flex();
    let _rng = seeded(&device, 5);
    let (t, k) = (128, 2);
    let x = biased_tokens(t, &device);
    let valid = Tensor::<2>::ones([1, t], &device);
    let drop = biased_layer(DropPolicy::Drop, &device);
    let mut rer = biased_layer(DropPolicy::Reroute, &device);
    rer.router = drop.router.clone();
    rer.experts = drop.experts.clone();
    let x3 = x.clone().reshape([1, t, 8]);

    let (_, aux) = drop.forward(x3.clone(), valid.clone(), Phase::Train);
    let routed = floats(aux.stats.routed_per_expert.clone());
    assert!(
        routed[0] + routed[1] > 0.9 * (t * k) as f32,
        "the router is not biased: {routed:?}"
    );
    let dropped = floats(aux.stats.dropped())[0];
    assert!(
        dropped > 0.5 * (t * k) as f32,
        "drop dropped only {dropped} of {}",
        t * k
    );

    // Capacity 40 per expert, 256 assignments: room for all of them.
    let (_, aux) = rer.forward(x3, valid, Phase::Train);
    assert_eq!(floats(aux.stats.dropped()), vec![0.0]);
    let kept = floats(aux.stats.kept_per_expert.clone());
    assert_eq!(kept.iter().sum::<f32>(), (t * k) as f32);
    assert!(kept.iter().all(|&n| n <= 40.0), "over capacity: {kept:?}");
    assert!(floats(aux.stats.rerouted.clone())[0] >= dropped);

    let decision = rer.router.forward(x, rer.config(), Phase::Train);
    let plan = policy::plan(
        &decision,
        Tensor::ones([t], &device),
        rer.config().capacity(t, 1.25),
        Overflow::Reroute { depth: usize::MAX },
    );
    let (experts, _) = plan
        .rerouted
        .expect("a reroute plan says where assignments went");
    let experts = ints(experts);
    for tok in 0..t {
        let (a, b) = (experts[tok * k], experts[tok * k + 1]);
        assert_ne!(a, b, "token {tok} uses expert {a} twice");
    }
}

#[test]
fn the_host_and_device_reroute_plans_agree_and_both_expert_layouts_give_the_same_output() {
    let device = Device::flex();
    let _rng = seeded(&device, 8);
    let t = 150;
    let moe = biased_layer(DropPolicy::Reroute, &device);
    let x = biased_tokens(t, &device);
    // Padding: the last 9 tokens.
    let valid: Vec<f32> = (0..t).map(|i| if i >= t - 9 { 0.0 } else { 1.0 }).collect();
    let valid = Tensor::<1>::from_data(TensorData::new(valid, [t]), &device);
    let decision = moe.router.forward(x.clone(), moe.config(), Phase::Train);
    let c = moe.config().capacity(t, 1.0).unwrap();
    assert_eq!(c, 38);
    let mut both = false; // some case both rerouted and dropped
    for depth in [usize::MAX, 2, 1, 0] {
        // At half capacity, some tokens find no room within reach.
        for cap in [c, c / 2] {
            let host = switchyard::moe::reroute::plan_on_host(&decision, valid.clone(), cap, depth);
            let dev =
                switchyard::moe::reroute::plan_on_device(&decision, valid.clone(), cap, depth);
            let label = format!("depth {depth}, capacity {cap}");
            assert_eq!(host.capacity, dev.capacity, "{label}");
            assert_eq!(
                ints(host.token_for_slot.clone()),
                ints(dev.token_for_slot.clone()),
                "{label}: token_for_slot"
            );
            assert_eq!(
                ints(host.slot_for_assignment.clone()),
                ints(dev.slot_for_assignment.clone()),
                "{label}: slot_for_assignment"
            );
            assert_eq!(
                floats(host.kept_per_expert.clone()),
                floats(dev.kept_per_expert.clone()),
                "{label}: kept"
            );
            let (he, hn) = host.rerouted.clone().unwrap();
            let (de, dn) = dev.rerouted.clone().unwrap();
            assert_eq!(ints(he.clone()), ints(de), "{label}: experts used");
            assert_eq!(floats(hn.clone()), floats(dn), "{label}: rerouted count");
            let kept: f32 = floats(host.kept_per_expert.clone()).iter().sum();
            both |= floats(hn)[0] > 0.0 && kept < ((t - 9) * 2) as f32;

            // Grouped rows (the CPU kernels) and capacity buffers (the GPU
            // layout) from the same plan give the same layer output.
            let weights = decision.weights_for(he, moe.config());
            let rows = dispatch::Dispatched::new(x.clone(), host.clone(), 8)
                .through(&moe.experts)
                .combine(weights.clone());
            let buffers = dispatch::combine(
                moe.experts.forward(dispatch::dispatch(x.clone(), &host, 8)),
                &host,
                weights,
            );
            let diff = max_diff(&floats(rows), &floats(buffers));
            assert!(diff < 1e-5, "{label}: layouts differ by {diff}");
        }
    }
    assert!(both, "no case both rerouted and dropped assignments");
}

#[test]
fn inference_routes_without_capacity() {
    let device = Device::flex();
    let _rng = seeded(&device, 13);
    let model_cfg = ModelConfig {
        vocab_size: 64,
        d_model: 16,
        n_layers: 2,
        n_heads: 2,
        n_kv_heads: 2,
        d_ff: 32,
        seq_len: 32,
        ..ModelConfig::default()
    };
    // An evaluation capacity far too small for the batch.
    let moe_cfg = MoeConfig {
        num_experts: 4,
        top_k: 2,
        d_expert: 8,
        eval_capacity_factor: 0.25,
        ..MoeConfig::default()
    };
    let model = LanguageModel::new(&model_cfg, &moe_cfg, 7, &device);
    let ids: Vec<i64> = (0..32).map(|i| (i * 7) % 64).collect();
    let tokens = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, 32]), &device);
    let capped = model.forward(tokens.clone(), None, Phase::Eval);
    let dropped: f32 = capped
        .moe
        .iter()
        .map(|a| floats(a.stats.dropped())[0])
        .sum();
    assert!(dropped > 0.0, "the small capacity dropped nothing");

    let free = model.without_capacity();
    assert_eq!(free.moe_config().drop_policy, DropPolicy::Dropless);
    let out = free.forward(tokens, None, Phase::Eval);
    for aux in &out.moe {
        assert_eq!(floats(aux.stats.dropped()), vec![0.0]);
    }
    let diff = max_diff(&floats(out.logits), &floats(capped.logits));
    assert!(diff > 0.0, "dropping tokens did not change the logits");
}
