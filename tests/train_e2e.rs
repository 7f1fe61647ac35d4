//! `switchyard train` end to end on a tiny model: the loss falls, TensorBoard
//! and JSONL logs agree, resume is bit-identical, interrupted checkpoint
//! writes are harmless, export/import round-trips, and bad input is refused.

mod common;

use burn::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use switchyard::checkpoint;
use switchyard::config::RunConfig;
use switchyard::hf;
use switchyard::metrics::tensorboard::{event_files, read_events, EventWhat, ValueKind};
use switchyard::model::LanguageModel;
use switchyard::moe::Phase;
use switchyard::train::{run, RunOptions, RunOutcome};

/// Training draws from the backend's process-wide RNG: one run at a time.
static RNG: Mutex<()> = Mutex::new(());
fn lock() -> MutexGuard<'static, ()> {
    RNG.lock().unwrap_or_else(|e| e.into_inner())
}

const TINY: &str = r#"
[model]
vocab_size = 4096
d_model = 32
n_layers = 2
n_heads = 2
n_kv_heads = 1
d_ff = 64
seq_len = 32

[moe]
num_experts = 4
top_k = 2
d_expert = 32
capacity_factor = 1.0
logit_noise_std = 0.1
jitter_eps = 0.01
expert_dropout = 0.1
aux_free_bias = true

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
eval_batches = 2

[log]
progress = "lines"
"#;

fn scratch(name: &str) -> common::Scratch {
    common::Scratch::new("e2e", name)
}

fn write_config(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("cfg.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn options(dir: &Path, cfg: &Path, name: &str, set: &[&str]) -> RunOptions {
    RunOptions {
        config: cfg.to_path_buf(),
        overrides: set.iter().map(|s| s.to_string()).collect(),
        name: Some(name.into()),
        resume: false,
        device: "flex".into(),
        runs_dir: dir.join("runs"),
        stop_after: None,
    }
}

fn train(opts: &RunOptions) -> RunOutcome {
    run(opts).unwrap()
}

#[test]
fn trains_and_logs_every_step() {
    let _g = lock();
    let dir = scratch("logs");
    let cfg = write_config(&dir, TINY);
    let set = [
        "train.steps=30",
        "train.eval_every=10",
        "train.checkpoint_every=10",
        "train.keep_checkpoints=2",
    ];
    let out = train(&options(&dir, &cfg, "r", &set));
    assert_eq!(out.final_step, 30);

    // The loss falls from about ln(4096) = 8.3.
    let first: f64 = out.losses[..5].iter().sum::<f64>() / 5.0;
    let last: f64 = out.losses[25..].iter().sum::<f64>() / 5.0;
    assert!(first > 7.5, "initial loss {first}");
    assert!(last < first - 1.0, "loss did not fall: {first} -> {last}");
    assert!(out.eval_loss.unwrap() < first - 1.0);

    // Layout of the run directory; only the last two checkpoints are kept.
    let run_dir = &out.run_dir;
    assert!(run_dir.join("config.toml").exists());
    let kept: Vec<u64> = checkpoint::list(run_dir)
        .unwrap()
        .iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(kept, vec![20, 30]);
    let saved = RunConfig::load(&run_dir.join("config.toml"), &[]).unwrap();
    assert_eq!(saved.train.steps, 30);

    // metrics.jsonl: one object per step.
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v.get("alert").is_none())
        .collect();
    assert_eq!(lines.len(), 30);

    // The event file parses back, with every tag at every step.
    let files = event_files(run_dir).unwrap();
    assert_eq!(files.len(), 1);
    let events = read_events(&files[0]).unwrap();
    let mut by_step: BTreeMap<i64, BTreeMap<String, ValueKind>> = BTreeMap::new();
    let mut hparams = false;
    for e in &events {
        if let Some(EventWhat::Summary(s)) = &e.what {
            for v in &s.value {
                match &v.value {
                    Some(kind) => {
                        by_step
                            .entry(e.step)
                            .or_default()
                            .insert(v.tag.clone(), kind.clone());
                    }
                    None => hparams |= v.tag == "_hparams_/session_start_info",
                }
            }
        }
    }
    assert!(hparams, "no HParams session summary");
    assert_eq!(
        by_step.keys().copied().collect::<Vec<_>>(),
        (1..=30).collect::<Vec<_>>()
    );
    let mut required: Vec<String> = [
        "loss/total",
        "loss/lm",
        "loss/aux",
        "loss/z",
        "lr",
        "grad_norm",
        "throughput/tokens_per_s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for i in 0..2 {
        for e in 0..4 {
            required.push(format!("moe/layer{i}/expert{e}/token_share"));
            required.push(format!("moe/layer{i}/expert{e}/bias"));
        }
        for t in [
            "drop_rate",
            "max_over_mean_load",
            "router_entropy",
            "dead_experts",
            "routed_per_expert",
            "kept_per_expert",
        ] {
            required.push(format!("moe/layer{i}/{t}"));
        }
    }
    let tokens_k = 4.0 * 32.0 * 2.0; // batch × seq_len × k
    for (step, tags) in &by_step {
        for t in &required {
            assert!(tags.contains_key(t), "step {step}: no `{t}`");
        }
        assert_eq!(
            tags.contains_key("eval/loss"),
            step % 10 == 0,
            "step {step}"
        );
        assert_eq!(tags.contains_key("eval/ppl"), step % 10 == 0, "step {step}");
        // At evaluations, each expert's first-choice tokens and their mean
        // loss; weighted by the counts they give back the eval loss.
        for i in 0..2 {
            let tag = |e: usize, what: &str| format!("moe/layer{i}/expert{e}/{what}");
            assert_eq!(
                tags.contains_key(&tag(0, "lm_loss_tokens")),
                step % 10 == 0,
                "step {step}"
            );
            if step % 10 != 0 {
                continue;
            }
            let (mut n, mut sum) = (0.0, 0.0);
            for e in 0..4 {
                let Some(ValueKind::SimpleValue(c)) = tags.get(&tag(e, "lm_loss_tokens")) else {
                    panic!("step {step}: no `{}`", tag(e, "lm_loss_tokens"))
                };
                n += *c as f64;
                if *c > 0.0 {
                    let Some(ValueKind::SimpleValue(l)) = tags.get(&tag(e, "lm_loss")) else {
                        panic!("step {step}: no `{}`", tag(e, "lm_loss"))
                    };
                    sum += *c as f64 * *l as f64;
                }
            }
            let Some(ValueKind::SimpleValue(eval)) = tags.get("eval/loss") else {
                unreachable!()
            };
            assert_eq!(
                n,
                2.0 * 4.0 * 32.0,
                "step {step}: every eval token counted once"
            );
            assert!(
                (sum / n - *eval as f64).abs() < 1e-4 * *eval as f64,
                "step {step}: {} vs {eval}",
                sum / n
            );
        }
        let json = &lines[(*step - 1) as usize];
        assert_eq!(json["step"], serde_json::json!(step));
        // metrics.jsonl holds the same numbers as the event file.
        for (tag, kind) in tags {
            if let ValueKind::SimpleValue(v) = kind {
                let j = json[tag]
                    .as_f64()
                    .unwrap_or_else(|| panic!("step {step}: `{tag}` missing in metrics.jsonl"));
                assert_eq!(j as f32, *v, "step {step}: `{tag}`");
            }
        }
        // Each sink holds the routed and the kept counts under their own
        // names, the same numbers in both: routed add up to tokens × k,
        // kept to that minus the dropped assignments.
        for i in 0..2 {
            let counts = |what: &str| {
                let tag = format!("moe/layer{i}/{what}_per_expert");
                let Some(ValueKind::Histo(h)) = tags.get(&tag) else {
                    panic!("step {step}: no histogram `{tag}`")
                };
                let listed: Vec<f64> = json[&tag]
                    .as_array()
                    .unwrap_or_else(|| panic!("step {step}: `{tag}` missing in metrics.jsonl"))
                    .iter()
                    .map(|v| v.as_f64().unwrap())
                    .collect();
                assert_eq!(
                    h.bucket, listed,
                    "step {step}: `{tag}` differs between sinks"
                );
                assert_eq!(listed.len(), 4);
                listed.iter().sum::<f64>()
            };
            let (routed, kept) = (counts("routed"), counts("kept"));
            assert_eq!(
                routed, tokens_k,
                "step {step}: every token routes to k experts"
            );
            let drop_rate = json[format!("moe/layer{i}/drop_rate")].as_f64().unwrap();
            let dropped = (drop_rate * tokens_k).round();
            assert_eq!(kept, tokens_k - dropped, "step {step} layer {i}");
        }
    }
}

#[path = "train_e2e/resume.rs"]
mod resume;

#[path = "train_e2e/numerics.rs"]
mod numerics;
