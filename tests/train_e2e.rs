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

#[test]
fn init_from_starts_at_the_source_weights() {
    let _g = lock();
    let dir = scratch("init");
    let cfg = write_config(&dir, TINY);
    let src = train(&options(
        &dir,
        &cfg,
        "src",
        &["train.steps=25", "train.eval_every=0"],
    ));
    let source_loss = src.losses[20..].iter().sum::<f64>() / 5.0;
    let init = format!("train.init_from=\"{}\"", src.run_dir.display());
    let out = train(&options(
        &dir,
        &cfg,
        "continued",
        &["train.steps=2", "train.eval_every=0", &init],
    ));
    // A fresh model starts near ln(4096) = 8.3; the continued one where the source ended.
    assert!(
        out.losses[0] < source_loss + 0.5,
        "{} vs source {source_loss}",
        out.losses[0]
    );
    assert!(out.losses[0] < 7.5, "{}", out.losses[0]);
}

#[test]
fn resume_is_bit_identical() {
    let _g = lock();
    let dir = scratch("resume");
    let cfg = write_config(&dir, TINY);
    let set = [
        "train.steps=12",
        "train.eval_every=0",
        "train.checkpoint_every=0",
    ];
    let straight = train(&options(&dir, &cfg, "straight", &set));

    let mut first = options(&dir, &cfg, "split", &set);
    first.stop_after = Some(6);
    let a = train(&first);
    assert_eq!(a.final_step, 6);
    let mut second = options(&dir, &cfg, "split", &set);
    second.resume = true;
    let b = train(&second);
    assert_eq!(b.final_step, 12);
    let joined: Vec<f64> = a.losses.iter().chain(&b.losses).copied().collect();
    assert_eq!(joined, straight.losses, "resumed run diverged");

    // The JSONL of the resumed run holds each step once.
    let steps: Vec<u64> = std::fs::read_to_string(b.run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()?
                .get("loss/total")
                .and(Some(l.to_string()))
        })
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(&l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, (1..=12).collect::<Vec<_>>());

    // Changing an architecture key is refused, naming the key.
    let mut changed = options(&dir, &cfg, "split", &["train.steps=14", "model.d_model=48"]);
    changed.resume = true;
    let err = run(&changed).unwrap_err().to_string();
    assert!(err.contains("model.d_model: 32 -> 48"), "{err}");
}

/// A checkpoint damaged on disk after it was written (a flipped byte, a
/// truncated file) is caught by its checksum; `--resume` falls back to the
/// newest intact checkpoint and continues exactly as an undamaged run.
#[test]
fn resume_skips_a_damaged_checkpoint_for_the_newest_intact_one() {
    let _g = lock();
    let dir = scratch("damaged");
    let cfg = write_config(&dir, TINY);
    let set = [
        "train.steps=8",
        "train.eval_every=0",
        "train.checkpoint_every=2",
        "train.keep_checkpoints=5",
    ];
    let straight = train(&options(&dir, &cfg, "straight", &set));
    let mut first = options(&dir, &cfg, "r", &set);
    first.stop_after = Some(6);
    let a = train(&first);
    let ckpts = checkpoint::list(&a.run_dir).unwrap();
    assert_eq!(ckpts.iter().map(|c| c.0).collect::<Vec<_>>(), [2, 4, 6]);
    for (_, c) in &ckpts {
        checkpoint::verify(c).unwrap();
    }

    // Step 6: one byte of the weights flipped; step 4: the optimizer state cut short.
    let model6 = ckpts[2].1.join("model.safetensors");
    let mut bytes = std::fs::read(&model6).unwrap();
    let at = bytes.len() - 10;
    bytes[at] ^= 0x40;
    std::fs::write(&model6, &bytes).unwrap();
    let opt4 = ckpts[1].1.join("optimizer.safetensors");
    let bytes = std::fs::read(&opt4).unwrap();
    std::fs::write(&opt4, &bytes[..bytes.len() - 100]).unwrap();
    let e = checkpoint::verify(&ckpts[2].1).unwrap_err().to_string();
    assert!(
        e.contains("model.safetensors") && e.contains("checksum"),
        "{e}"
    );
    let e = checkpoint::verify(&ckpts[1].1).unwrap_err().to_string();
    assert!(
        e.contains("optimizer.safetensors") && e.contains("bytes"),
        "{e}"
    );

    // The resume starts from step 2 and ends where the straight run ended.
    let (found, warnings) = checkpoint::newest_intact(&a.run_dir).unwrap().unwrap();
    assert_eq!(found, ckpts[0].1);
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(warnings[0].contains("step-0000006"), "{warnings:?}");
    let mut again = options(&dir, &cfg, "r", &set);
    again.resume = true;
    let b = train(&again);
    assert_eq!((b.losses.len(), b.final_step), (6, 8));
    assert_eq!(b.losses[..], straight.losses[2..], "resumed run diverged");

    // With every checkpoint damaged, the resume is refused, naming each.
    let model2 = ckpts[0].1.join("model.safetensors");
    for (_, c) in checkpoint::list(&a.run_dir).unwrap() {
        let f = c.join("model.safetensors");
        let bytes = std::fs::read(&f).unwrap();
        std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    }
    let mut doomed = options(&dir, &cfg, "r", &["train.steps=10", "train.eval_every=0"]);
    doomed.resume = true;
    let e = format!("{:#}", run(&doomed).unwrap_err());
    assert!(e.contains("every checkpoint is damaged"), "{e}");
    assert!(model2.exists());
}

#[test]
fn interrupted_checkpoint_write_leaves_the_previous_one() {
    let _g = lock();
    let dir = scratch("crash");
    let cfg = write_config(&dir, TINY);
    let set = ["train.steps=6", "train.eval_every=0"];
    let mut first = options(&dir, &cfg, "c", &set);
    first.stop_after = Some(4);
    let out = train(&first);
    let ckpt = checkpoint::list(&out.run_dir).unwrap().pop().unwrap().1;
    let (cfg_saved, model) = checkpoint::load_model(&ckpt, &Device::flex()).unwrap();
    let (state, optimizer) = checkpoint::read_state(&ckpt).unwrap();

    // A write of step 5 dies after two of its files.
    let mut state5 = state.clone();
    state5.step = 5;
    let crash = checkpoint::save(
        &out.run_dir,
        &checkpoint::Checkpoint {
            model: switchyard::params::collect(&model),
            optimizer,
            state: state5,
            config: cfg_saved,
            tokenizer: None,
        },
        &checkpoint::SaveOptions {
            keep: 3,
            fail_after_files: Some(2),
        },
    );
    assert!(crash.is_err());
    let leftovers: Vec<_> = std::fs::read_dir(out.run_dir.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        leftovers.iter().any(|n| n.starts_with(".tmp-step-0000005")),
        "{leftovers:?}"
    );

    // The last complete checkpoint is still the one found and it loads.
    assert_eq!(
        checkpoint::locate(&out.run_dir).unwrap(),
        checkpoint::Location::Switchyard(ckpt.clone())
    );
    checkpoint::load_model(&ckpt, &Device::flex()).unwrap();

    // Resuming continues from step 4 and clears the debris.
    let mut again = options(&dir, &cfg, "c", &set);
    again.resume = true;
    let resumed = train(&again);
    assert_eq!((resumed.losses.len(), resumed.final_step), (2, 6));
    let names: BTreeSet<String> = std::fs::read_dir(out.run_dir.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| n.starts_with("step-")), "{names:?}");
}

#[test]
fn inspect_on_hf_fixtures_gives_their_logits() {
    for name in ["hf-mixtral-tiny", "hf-qwen2moe-tiny"] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name);
        let device = Device::flex();
        let (model, _) = checkpoint::load_any(&dir, &device).unwrap();
        let expected = hf::read_safetensors(&dir.join("expected.safetensors")).unwrap();
        let ids: Vec<i64> = expected["input_ids"].try_to_vec().unwrap();
        let row: Vec<u32> = ids[..16].iter().map(|&i| i as u32).collect();
        let trace = switchyard::inspect::trace(&model, &row, &device).unwrap();
        let dir = scratch(name);
        let out = dir.join("trace.safetensors");
        trace.save(&out).unwrap();
        let back = hf::read_safetensors(&out).unwrap();
        let got: Vec<f32> = back["logits"].try_to_vec().unwrap();
        let want: Vec<f32> = expected["logits"].try_to_vec().unwrap();
        assert_eq!(back["logits"].shape().to_vec(), vec![16, 256]);
        let diff = got
            .iter()
            .zip(&want[..16 * 256])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(diff < 1e-4, "{name}: inspect logits differ by {diff}");
        for i in 0..2 {
            let rl: Vec<f32> = back[&format!("router_logits.{i}")].try_to_vec().unwrap();
            let want: Vec<f32> = expected[&format!("router_logits.{i}")]
                .try_to_vec()
                .unwrap();
            let d = rl
                .iter()
                .zip(&want[..rl.len()])
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(d < 1e-4, "{name}: router logits {i} differ by {d}");
            assert_eq!(
                back[&format!("topk_experts.{i}")].shape().to_vec(),
                vec![16, 2]
            );
        }
    }
}

#[test]
fn bad_runs_are_refused_with_the_reason() {
    let _g = lock();
    let dir = scratch("bad");
    let cfg = write_config(&dir, TINY);
    let err = |set: &[&str]| run(&options(&dir, &cfg, "b", set)).unwrap_err().to_string();

    let e = err(&["model.vocab_size=100", "train.steps=1"]);
    assert!(e.contains("model.vocab_size") && e.contains("4096"), "{e}");
    let e = err(&["moe.nope=1"]);
    assert!(e.contains("nope") && e.contains("capacity_factor"), "{e}");
    let e = err(&["train.steps=abc"]);
    assert!(e.contains("train.steps"), "{e}");
    let e = err(&["data.val_fraction=1.5"]);
    assert!(e.contains("data.val_fraction"), "{e}");

    let mut opts = options(&dir, &cfg, "b", &["train.steps=1"]);
    opts.device = "tpu".into();
    let e = run(&opts).unwrap_err().to_string();
    assert!(e.contains("tpu") && e.contains("flex"), "{e}");
    let mut opts = options(&dir, &cfg, "never-ran", &[]);
    opts.resume = true;
    let e = run(&opts).unwrap_err().to_string();
    assert!(e.contains("no complete checkpoint"), "{e}");

    // An existing run is not overwritten.
    train(&options(
        &dir,
        &cfg,
        "taken",
        &["train.steps=1", "train.eval_every=0"],
    ));
    let e = run(&options(&dir, &cfg, "taken", &["train.steps=1"]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("--resume"), "{e}");

    // Non-finite losses: stop names the step; skip gives up after max_bad_steps.
    // A learning rate of 1e30 sends the weights to infinity after the first update.
    let blowup = [
        "optim.lr=1e30",
        "optim.min_lr=1e30",
        "optim.warmup_steps=0",
        "train.steps=10",
        "train.eval_every=0",
    ];
    let e = err(&[&blowup[..], &["train.on_nonfinite=stop"]].concat());
    assert!(e.contains("non-finite") && e.contains("at step 2"), "{e}");
    let mut o = options(
        &dir,
        &cfg,
        "skip",
        &[&blowup[..], &["train.max_bad_steps=3"]].concat(),
    );
    o.name = Some("skip".into());
    let e = run(&o).unwrap_err().to_string();
    assert!(e.contains("3 consecutive"), "{e}");
}

/// Deterministic `[b, s]` input tokens and their next-token targets.
fn token_batch(b: usize, s: usize, device: &Device) -> (Tensor<2, Int>, Tensor<2, Int>) {
    let ids: Vec<i64> = (0..b * (s + 1))
        .map(|i| ((i * 7919 + 5) % 4000) as i64)
        .collect();
    let all = Tensor::<2, Int>::from_data(TensorData::new(ids, [b, s + 1]), device);
    (all.clone().slice([0..b, 0..s]), all.slice([0..b, 1..s + 1]))
}

/// The training-phase loss of `model` on two deterministic rows, the device
/// reseeded first so that router noise, jitter and expert dropout draw the
/// same numbers each call.
fn seeded_train_loss(model: &LanguageModel, device: &Device) -> Tensor<1> {
    let (b, s) = (2, model.config().seq_len);
    let (inputs, targets) = token_batch(b, s, device);
    let mask = Tensor::<2>::ones([b, s], device);
    device.seed(5);
    model.forward_loss(inputs, targets, mask, Phase::Train).0
}

/// The training loss (LM head and cross-entropy fused on the CPU, never
/// holding the logits) equals the logits of `forward` put through
/// `cross_entropy`, in value and in the gradients of the head, the
/// embedding and a block weight, with an untied and a tied head and a mask
/// that drops positions.
#[test]
fn fused_head_loss_matches_logits_then_cross_entropy() {
    use switchyard::model::cross_entropy;
    let _g = lock();
    let device = Device::flex().autodiff();
    for tied in [false, true] {
        device.seed(11);
        let tie = format!("model.tie_embeddings={tied}");
        let cfg = RunConfig::from_toml_str(TINY, &[tie]).unwrap();
        let model = LanguageModel::new(&cfg.model, &cfg.moe, 11, &device);
        assert_eq!(model.lm_head.is_none(), tied);
        let (b, s) = (2, cfg.model.seq_len);
        let (inputs, targets) = token_batch(b, s, &device);
        let mask: Vec<f32> = (0..b * s)
            .map(|i| if i % 7 == 3 { 0.0 } else { 1.0 })
            .collect();
        let mask = Tensor::<2>::from_data(TensorData::new(mask, [b, s]), &device);

        // Evaluation routing: no router noise or expert dropout, so both
        // passes route alike.
        let (fused, _) =
            model.forward_loss(inputs.clone(), targets.clone(), mask.clone(), Phase::Eval);
        let logits = model
            .forward(inputs, Some(mask.clone()), Phase::Eval)
            .logits;
        let want = cross_entropy(logits, targets, mask);
        let (a, w) = (
            fused.clone().into_scalar::<f32>(),
            want.clone().into_scalar::<f32>(),
        );
        assert!((a - w).abs() < 1e-5 * w, "tied {tied}: loss {a} vs {w}");

        let (g1, g2) = (fused.backward(), want.backward());
        let mut weights = vec![
            ("embedding", model.embed_tokens.weight.clone()),
            ("q_proj", model.layers[0].self_attn.q_proj.weight.clone()),
        ];
        if let Some(head) = &model.lm_head {
            weights.push(("lm_head", head.weight.clone()));
        }
        for (name, p) in weights {
            let (a, b) = (p.grad(&g1).unwrap(), p.grad(&g2).unwrap());
            let scale = b.clone().abs().max().into_scalar::<f32>();
            let d = (a - b).abs().max().into_scalar::<f32>() / scale;
            assert!(
                d < 1e-4,
                "tied {tied}: gradient of {name} differs by {d} of {scale}"
            );
        }
    }
}

/// Mixed precision: the same weights computing in bf16 give nearly the f32
/// loss and gradients; the router and the logits stay f32, the gradients
/// reach the f32 parameters in f32; and a bf16 run trains.
#[test]
fn bf16_mixed_precision_tracks_f32_and_trains() {
    use switchyard::config::Precision;
    use switchyard::model::cross_entropy;
    let _g = lock();
    let device = Device::flex().autodiff();
    device.seed(5);
    let cfg = RunConfig::from_toml_str(TINY, &[]).unwrap();
    let f32_model = LanguageModel::new(&cfg.model, &cfg.moe, 5, &device);
    let bf16_model = f32_model.clone().with_precision(Precision::Bf16);
    assert_eq!(bf16_model.compute_dtype(), burn::tensor::DType::BF16);
    let (b, s) = (2, cfg.model.seq_len);
    let ids: Vec<i64> = (0..b * (s + 1))
        .map(|i| ((i * 7919) % 4000) as i64)
        .collect();
    let all = Tensor::<2, Int>::from_data(TensorData::new(ids, [b, s + 1]), &device);
    let (inputs, targets) = (all.clone().slice([0..b, 0..s]), all.slice([0..b, 1..s + 1]));
    let mask = Tensor::<2>::ones([b, s], &device);

    let run = |m: &LanguageModel| {
        let out = m.forward(inputs.clone(), None, Phase::Eval);
        assert_eq!(out.logits.dtype(), burn::tensor::DType::F32);
        for aux in &out.moe {
            assert_eq!(aux.router_logits.dtype(), burn::tensor::DType::F32);
        }
        let loss = cross_entropy(out.logits, targets.clone(), mask.clone());
        let value = loss.clone().into_scalar::<f32>();
        let grads = loss.backward();
        let g = m.layers[0].self_attn.q_proj.weight.grad(&grads).unwrap();
        assert_eq!(g.dtype(), burn::tensor::DType::F32);
        (value, g.into_data().try_to_vec::<f32>().unwrap())
    };
    let (l32, g32) = run(&f32_model);
    let (l16, g16) = run(&bf16_model);
    assert!(
        (l16 - l32).abs() < 0.02 * l32,
        "bf16 loss {l16} vs f32 {l32}"
    );
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let diff: Vec<f32> = g16.iter().zip(&g32).map(|(a, b)| a - b).collect();
    let rel = norm(&diff) / norm(&g32);
    assert!(
        rel < 0.1,
        "bf16 gradient differs from f32 by {rel} (relative norm)"
    );

    let dir = scratch("bf16");
    let cfgp = write_config(&dir, TINY);
    let out = train(&options(
        &dir,
        &cfgp,
        "r",
        &["train.steps=20", "train.precision=bf16"],
    ));
    let first: f64 = out.losses[..4].iter().sum::<f64>() / 4.0;
    let last: f64 = out.losses[16..].iter().sum::<f64>() / 4.0;
    assert!(
        last < first - 0.5,
        "bf16 loss did not fall: {first} -> {last}"
    );
}

/// A seed fixes the initial weights whatever else draws from the random
/// stream afterwards, and, reseeded, a training-phase forward (router noise,
/// input jitter, expert dropout) repeats exactly, the model's first forward
/// included.
#[test]
fn seed_fixes_weights_and_training_noise() {
    let _g = lock();
    let device = Device::flex().autodiff();
    let cfg = RunConfig::from_toml_str(TINY, &[]).unwrap();
    assert!(cfg.moe.logit_noise_std > 0.0 && cfg.moe.expert_dropout > 0.0);
    let train_loss = |model: &LanguageModel| seeded_train_loss(model, &device).into_scalar::<f32>();

    device.seed(3);
    let first = LanguageModel::new(&cfg.model, &cfg.moe, 3, &device);
    let losses = [train_loss(&first), train_loss(&first), train_loss(&first)];
    assert_eq!(losses[0], losses[1], "first forward draws differently");
    assert_eq!(losses[1], losses[2]);

    // The same seed, whatever the device's random stream holds and with
    // another draw in between, gives the same weights as the model above
    // had before its forwards.
    device.seed(99);
    let second = LanguageModel::new(&cfg.model, &cfg.moe, 3, &device);
    let _ = Tensor::<2>::random([64, 64], burn::tensor::Distribution::Default, &device);
    let (w1, w2) = (
        switchyard::params::collect(&first),
        switchyard::params::collect(&second),
    );
    assert!(w1.len() > 10);
    for (name, w) in &w1 {
        assert_eq!(w, &w2[name], "{name} differs between same-seed models");
    }
    // And it is not the same under another seed.
    device.seed(4);
    let other = switchyard::params::collect(&LanguageModel::new(&cfg.model, &cfg.moe, 4, &device));
    assert_ne!(w1["embed_tokens.weight"], other["embed_tokens.weight"]);
    assert_eq!(train_loss(&second), losses[0]);
}

/// A model built for loading takes its weights from the load alone: it holds
/// exactly the loaded values, trains (every parameter gets a gradient) the
/// same as the model the values came from, and draws nothing from the random
/// stream, which a model built with `new` would.
#[test]
fn a_model_built_for_loading_draws_nothing_and_loads_exactly() {
    let _g = lock();
    let device = Device::flex().autodiff();
    let cfg = RunConfig::from_toml_str(TINY, &[]).unwrap();
    let draw = || {
        Tensor::<1>::random([16], burn::tensor::Distribution::Default, &device)
            .into_data()
            .try_into_vec::<f32>()
            .unwrap()
    };
    device.seed(11);
    let source = LanguageModel::new(&cfg.model, &cfg.moe, 11, &device);
    let values = switchyard::params::collect(&source);

    device.seed(12);
    let fresh_draw = draw();
    device.seed(12);
    let loaded = switchyard::params::load(
        LanguageModel::unloaded(&cfg.model, &cfg.moe, &device),
        &values,
    )
    .unwrap();
    assert_eq!(
        draw(),
        fresh_draw,
        "building and loading drew random numbers"
    );
    device.seed(12);
    let _ = LanguageModel::new(&cfg.model, &cfg.moe, 12, &device);
    assert_ne!(draw(), fresh_draw, "`new` should have drawn the weights");

    let got = switchyard::params::collect(&loaded);
    assert_eq!(got.len(), values.len());
    for (name, w) in &values {
        assert_eq!(w, &got[name], "{name} not loaded exactly");
    }
    let loss_and_grads = |model: &LanguageModel| {
        let loss = seeded_train_loss(model, &device);
        let value = loss.clone().into_scalar::<f32>();
        let grads = burn::optim::GradientsParams::from_grads(loss.backward(), model);
        (value, grads.len())
    };
    let (want, n_grads) = loss_and_grads(&source);
    assert_eq!(loss_and_grads(&loaded), (want, n_grads));
    // Everything trains but the aux-loss-free selection biases.
    let trained = values
        .keys()
        .filter(|k| !k.ends_with("expert_bias"))
        .count();
    assert_eq!(n_grads, trained, "a loaded parameter does not train");
}
