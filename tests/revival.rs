//! Dead-expert revival (`moe.revive_dead_experts`): what a revival does to
//! the layer, that it leaves fewer dead experts in a collapsing run, and
//! that a resume across a revival repeats the run exactly.

mod common;

use burn::prelude::*;
use burn::tensor::Distribution;
use std::path::Path;
use std::sync::Mutex;
use switchyard::checkpoint;
use switchyard::config::{MoeConfig, ReviveFrom};
use switchyard::metrics::tensorboard::{event_files, read_events, EventWhat, ValueKind};
use switchyard::moe::MoeLayer;
use switchyard::train::{run, RunOptions, RunOutcome};

static RNG: Mutex<()> = Mutex::new(());

fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap()
}

#[test]
fn a_revived_expert_copies_the_busiest_and_splits_its_router_column() {
    let _g = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let device = Device::flex();
    device.seed(4);
    let (d, e) = (16, 4);
    let cfg = MoeConfig {
        num_experts: e,
        top_k: 2,
        d_expert: 8,
        revive_noise: 0.05,
        ..MoeConfig::default()
    };
    let mut layer = MoeLayer::new(d, &cfg, 0.2, &device);
    let before = layer.clone();
    let mu = Tensor::<1>::random([d], Distribution::Normal(1.0, 0.5), &device);
    layer.revive_expert(3, 1, ReviveFrom::Busiest, 0.2, Some(mu.clone()));

    // Expert 3 is expert 1 plus noise of about 5% of its size; the others
    // are untouched.
    for (new, old) in [
        (&layer.experts.gate_proj, &before.experts.gate_proj),
        (&layer.experts.up_proj, &before.experts.up_proj),
        (&layer.experts.down_proj, &before.experts.down_proj),
    ] {
        let [_, a, b] = old.val().dims();
        let slice = |t: &Tensor<3>, i: usize| host(t.clone().slice([i..i + 1, 0..a, 0..b]));
        let (revived, donor) = (slice(&new.val(), 3), slice(&old.val(), 1));
        let diff: f32 = revived
            .iter()
            .zip(&donor)
            .map(|(x, y)| (x - y).powi(2))
            .sum();
        let size: f32 = donor.iter().map(|x| x * x).sum();
        let rel = (diff / size).sqrt();
        assert!(rel > 0.02 && rel < 0.1, "relative noise {rel}");
        for i in 0..3 {
            assert_eq!(
                slice(&new.val(), i),
                slice(&old.val(), i),
                "expert {i} changed"
            );
        }
    }

    // Router: columns 3 and 1 are w + δ and w − δ, with δ ⟂ μ; 0 and 2 unchanged.
    let (new, old) = (
        host(layer.router.weight.val()),
        host(before.router.weight.val()),
    );
    let mu = host(mu);
    let col = |w: &[f32], j: usize| (0..d).map(|r| w[r * e + j]).collect::<Vec<f32>>();
    let (w, plus, minus) = (col(&old, 1), col(&new, 3), col(&new, 1));
    let mut delta_dot_mu = 0.0;
    let mut delta_norm = 0.0;
    for r in 0..d {
        assert!((plus[r] + minus[r] - 2.0 * w[r]).abs() < 1e-6);
        let delta = (plus[r] - minus[r]) / 2.0;
        delta_dot_mu += delta * mu[r];
        delta_norm += delta * delta;
    }
    let mu_norm: f32 = mu.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!(delta_norm > 0.0);
    assert!(
        delta_dot_mu.abs() < 1e-4 * delta_norm.sqrt() * mu_norm,
        "δ·μ = {delta_dot_mu}"
    );
    for j in [0, 2] {
        assert_eq!(col(&new, j), col(&old, j));
    }

    // Fresh weights: drawn at the given standard deviation.
    let mut fresh = before.clone();
    fresh.revive_expert(2, 1, ReviveFrom::Init, 0.5, None);
    let [_, a, b] = fresh.experts.gate_proj.val().dims();
    let v = host(fresh.experts.gate_proj.val().slice([2..3, 0..a, 0..b]));
    let std = (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt();
    assert!((std - 0.5).abs() < 0.1, "std {std}");
}

const COLLAPSING: &str = r#"
[model]
vocab_size = 4096
d_model = 32
n_layers = 2
n_heads = 2
n_kv_heads = 1
d_ff = 64
seq_len = 32

[moe]
num_experts = 8
top_k = 2
d_expert = 32
aux_loss_coef = 0.0
z_loss_coef = 0.0
router_init_std = 0.5
drop_policy = "dropless"

[data]
tokenizer = "data/tokenizer.json"
shuffle_buffer = 16
[[data.sources]]
paths = ["data/shakespeare/shakespeare_complete_works.txt"]
blank_lines = 2

[optim]
lr = 1e-2
min_lr = 1e-3
warmup_steps = 2

[train]
batch_size = 4
eval_every = 0
checkpoint_every = 0

[log]
progress = "lines"
dead_expert_steps = 5
"#;

fn scratch(name: &str) -> common::Scratch {
    common::Scratch::new("revive", name)
}

fn options(dir: &Path, name: &str, set: &[&str]) -> RunOptions {
    let cfg = dir.join("cfg.toml");
    std::fs::write(&cfg, COLLAPSING).unwrap();
    RunOptions {
        config: cfg,
        overrides: set.iter().map(|s| s.to_string()).collect(),
        name: Some(name.into()),
        resume: false,
        device: "flex".into(),
        runs_dir: dir.join("runs"),
        stop_after: None,
    }
}

fn records(run: &RunOutcome) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Dead experts summed over layers, per step.
fn dead_per_step(run: &RunOutcome) -> Vec<f64> {
    records(run)
        .iter()
        .filter(|r| r.get("loss/total").is_some())
        .map(|r| {
            (0..2)
                .map(|i| r[format!("moe/layer{i}/dead_experts")].as_f64().unwrap())
                .sum()
        })
        .collect()
}

#[test]
fn revival_leaves_fewer_dead_experts_and_resumes_exactly() {
    let _g = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("collapse");
    let without = run(&options(&dir, "without", &["train.steps=60"])).unwrap();
    let with = run(&options(
        &dir,
        "with",
        &["train.steps=60", "moe.revive_dead_experts=true"],
    ))
    .unwrap();

    // Without an aux loss the routers collapse; over the last 20 steps the
    // run with revival has clearly fewer dead experts.
    let tail = |v: Vec<f64>| v[40..].iter().sum::<f64>() / 20.0;
    let (a, b) = (tail(dead_per_step(&without)), tail(dead_per_step(&with)));
    assert!(a >= 4.0, "the run without revival should collapse: {a}");
    assert!(b < a - 1.0, "dead experts: {b} with revival, {a} without");

    // Each revival is in metrics.jsonl and in TensorBoard's text tab.
    let revivals: Vec<u64> = records(&with)
        .iter()
        .filter(|r| r["event"] == "revival")
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert!(!revivals.is_empty());
    assert!(records(&without).iter().all(|r| r.get("event").is_none()));
    let events = read_events(&event_files(&with.run_dir).unwrap()[0]).unwrap();
    let texts = events
        .iter()
        .filter_map(|e| match &e.what {
            Some(EventWhat::Summary(s)) => Some(s.value.iter()),
            _ => None,
        })
        .flatten()
        .filter(|v| v.tag == "moe/revivals" && matches!(v.value, Some(ValueKind::Tensor(_))))
        .count();
    assert_eq!(texts, revivals.len());

    // Stop right after the first revival is decided: the checkpoint holds
    // it as pending, and the resumed run applies it and repeats every loss.
    let set = ["train.steps=30", "moe.revive_dead_experts=true"];
    let straight = run(&options(&dir, "straight", &set)).unwrap();
    let first = records(&straight)
        .iter()
        .find(|r| r["event"] == "revival")
        .and_then(|r| r["step"].as_u64())
        .expect("a revival within 30 steps");
    let mut opts = options(&dir, "split", &set);
    opts.stop_after = Some(first - 1);
    let a = run(&opts).unwrap();
    let (_, ckpt) = checkpoint::list(&a.run_dir).unwrap().pop().unwrap();
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("state.json")).unwrap()).unwrap();
    assert!(
        !state["pending_revivals"].as_array().unwrap().is_empty(),
        "{state}"
    );
    let mut opts = options(&dir, "split", &set);
    opts.resume = true;
    let b = run(&opts).unwrap();
    let joined: Vec<f64> = a.losses.iter().chain(&b.losses).copied().collect();
    assert_eq!(joined, straight.losses, "resumed run diverged");
}
