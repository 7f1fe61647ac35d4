//! Sparse upcycling: the upcycled model computes the dense model's function
//! at step 0 (plain copies, granular slices, shared slices, some blocks
//! only), noise changes it, it exports as Mixtral or Qwen2-MoE with the
//! same logits, a run upcycles its `train.init_from` model and trains,
//! and bad settings are refused by name.

mod common;

use burn::prelude::*;
use common::{here, logits, max_diff};
use std::path::Path;
use std::sync::Mutex;
use switchyard::config::UpcycleConfig;
use switchyard::export::{export, ExportDtype, ExportFormat};
use switchyard::hf::{self, HfArch};
use switchyard::model::LanguageModel;
use switchyard::moe::Phase;
use switchyard::train::{run, RunOptions};
use switchyard::upcycle::upcycle;

/// Runs and model builds use the process-wide RNG.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The Llama fixture, its input ids, and the logits transformers computed.
fn llama() -> (LanguageModel, Tensor<2, Int>, Vec<f32>) {
    let dir = here("../shared/fixtures/hf-llama-tiny");
    let (_, model) = hf::load(&dir, &Device::flex()).unwrap();
    let expected = hf::read_safetensors(&dir.join("expected.safetensors")).unwrap();
    let ids = Tensor::<2, Int>::from_data(expected["input_ids"].clone(), &Device::flex());
    (model, ids, expected["logits"].try_to_vec().unwrap())
}

fn settings(experts: usize, top_k: usize, granularity: usize, shared: usize) -> UpcycleConfig {
    UpcycleConfig {
        experts,
        top_k,
        granularity,
        shared_experts: shared,
        ..UpcycleConfig::default()
    }
}

#[test]
fn the_upcycled_llama_computes_the_dense_function() {
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (dense, ids, transformers) = llama();
    let want = logits(&dense, ids.clone());
    assert!(max_diff(&want, &transformers) < 1e-4);
    let some_blocks = UpcycleConfig {
        layers: Some(vec![1]),
        ..settings(4, 1, 1, 0)
    };
    // (settings, MoE blocks, experts' width, the layer's top-k)
    let cases = [
        (settings(4, 2, 1, 0), 2, 96, 2),
        (settings(8, 2, 2, 0), 2, 48, 4),
        (settings(6, 1, 4, 1), 2, 24, 3),
        (settings(8, 1, 4, 2), 2, 24, 2),
        (some_blocks, 1, 96, 1),
    ];
    for (up, blocks, width, k) in cases {
        let moe = upcycle(&dense, &up, 7).unwrap();
        assert_eq!(moe.moe_layers().count(), blocks, "{up:?}");
        let c = moe.moe_config();
        assert_eq!((c.d_expert, c.top_k), (width, k), "{up:?}");
        assert_eq!(c.shared_width(), up.shared_experts * width, "{up:?}");
        let d = max_diff(&logits(&moe, ids.clone()), &want);
        assert!(d < 1e-5, "{up:?}: logits moved by {d}");
        // Not a dense model in disguise: the routers choose among experts.
        let out = moe.forward(ids.clone(), None, Phase::Eval);
        let chosen: std::collections::BTreeSet<i64> = out.moe[0]
            .topk_experts
            .clone()
            .into_data()
            .convert::<i64>()
            .try_to_vec()
            .unwrap()
            .into_iter()
            .collect();
        assert!(chosen.len() > k, "{up:?}: the router uses only {chosen:?}");
    }
    // Noise breaks the copies' symmetry, and the function.
    let noisy = UpcycleConfig {
        noise: 0.1,
        ..settings(4, 2, 1, 0)
    };
    let d = max_diff(&logits(&upcycle(&dense, &noisy, 7).unwrap(), ids), &want);
    assert!(d > 1e-3, "noise 0.1 left the logits within {d}");
}

#[test]
fn the_upcycled_llama_exports_with_the_same_logits() {
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (dense, ids, _) = llama();
    let want = logits(&dense, ids.clone());
    for (up, family) in [
        (settings(4, 2, 1, 0), HfArch::Mixtral),
        (settings(6, 1, 4, 1), HfArch::Qwen2Moe),
    ] {
        let moe = upcycle(&dense, &up, 7).unwrap();
        let out = common::scratch("upcycle", &format!("export-{family:?}"));
        let wrote = export(&moe, None, &out, ExportFormat::Auto, ExportDtype::F32).unwrap();
        assert_eq!(wrote, family);
        let (_, back) = hf::load(&out, &Device::flex()).unwrap();
        let d = max_diff(&logits(&back, ids.clone()), &want);
        assert!(d < 1e-5, "{family:?}: exported logits moved by {d}");
    }
}

const DENSE: &str = r#"
[model]
vocab_size = 4096
d_model = 32
n_layers = 2
n_heads = 2
n_kv_heads = 1
d_ff = 64
seq_len = 32

[moe]
num_experts = 0

[data]
tokenizer = "data/tokenizer.json"
[[data.sources]]
paths = ["data/shakespeare/shakespeare_complete_works.txt"]
blank_lines = 2

[optim]
lr = 1e-2
min_lr = 1e-3
warmup_steps = 2

[train]
steps = 60
batch_size = 8
eval_every = 60
eval_batches = 8
checkpoint_every = 60

[log]
progress = "lines"
"#;

fn options(dir: &Path, text: &str, name: &str, set: &[String]) -> RunOptions {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = dir.join(format!("{name}.toml"));
    std::fs::write(&cfg, text).unwrap();
    RunOptions {
        config: cfg,
        overrides: set.to_vec(),
        name: Some(name.into()),
        resume: false,
        device: "flex".into(),
        runs_dir: dir.join("runs"),
        stop_after: None,
    }
}

#[test]
fn a_run_upcycles_its_init_from_model_and_trains() {
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = common::scratch("upcycle", "run");
    let dense = run(&options(&dir, DENSE, "dense", &[])).unwrap();
    // Continue both for 40 steps on batches in another order, at a lower
    // lr, from the dense weights.
    let from = format!("train.init_from=\"{}\"", dense.run_dir.display());
    let cont = |name: &str, extra: &str| {
        let text = format!("{DENSE}\n{extra}")
            .replace("steps = 60", "steps = 40\nseed = 2")
            .replace("eval_every = 60", "eval_every = 40")
            .replace("lr = 1e-2", "lr = 3e-3")
            .replace("warmup_steps = 2", "warmup_steps = 0");
        run(&options(&dir, &text, name, std::slice::from_ref(&from))).unwrap()
    };
    let dense_cont = cont("dense-continued", "");
    let moe = cont("upcycled", "[upcycle]\nexperts = 4\ntop_k = 2\n");
    // The first step sees the same batch from the same function (dropless:
    // the run's [moe] does not set a capacity), so the same LM loss, up to
    // the aux and z losses the MoE adds.
    let cfg = switchyard::checkpoint::read_config(
        &switchyard::checkpoint::list(&moe.run_dir)
            .unwrap()
            .pop()
            .unwrap()
            .1,
    )
    .unwrap();
    assert_eq!((cfg.moe.num_experts, cfg.moe.top_k), (4, 2));
    let (a, b) = (dense_cont.losses[0], moe.losses[0]);
    assert!(
        (a - b).abs() < 0.05,
        "first losses {a} (dense) and {b} (upcycled)"
    );
    // It trains: its held-out loss falls below the dense model's, where
    // it started.
    let (start, end) = (dense.eval_loss.unwrap(), moe.eval_loss.unwrap());
    println!(
        "eval {start} -> {end}, dense continued {:?}",
        dense_cont.eval_loss
    );
    assert!(
        end < start - 0.05,
        "eval loss {start} (dense, step 0) → {end} (dense continued: {:?})",
        dense_cont.eval_loss
    );
    let header = std::fs::read_to_string(moe.run_dir.join("config.toml")).unwrap();
    assert!(header.contains("[upcycle]"), "{header}");

    // `switchyard upcycle` on the dense run writes a run directory whose
    // model evaluates to the dense model's loss on the run's own data.
    let out = dir.join("upcycled-run");
    switchyard::upcycle::write_run(&dense.run_dir, &settings(8, 1, 2, 0), 7, &out).unwrap();
    let device = Device::flex();
    let eval = |run_dir: &Path| {
        let (_, ckpt) = switchyard::checkpoint::list(run_dir)
            .unwrap()
            .pop()
            .unwrap();
        let (cfg, model) = switchyard::checkpoint::load_model(&ckpt, &device).unwrap();
        let tok = switchyard::data::tokenizer::load(Path::new(&cfg.data.tokenizer)).unwrap();
        let model = model.without_capacity();
        switchyard::train::eval::evaluate(&model, &cfg, std::sync::Arc::new(tok), &device, 4)
            .unwrap()
            .loss
    };
    let (a, b) = (eval(&dense.run_dir), eval(&out));
    assert!(
        (a - b).abs() < 1e-5,
        "eval loss {a} (dense) and {b} (upcycled)"
    );
    let err = switchyard::upcycle::write_run(&dense.run_dir, &settings(8, 1, 2, 0), 7, &out)
        .map(|_| ())
        .unwrap_err();
    assert!(err.to_string().contains("already holds a run"), "{err}");
}

#[test]
fn bad_upcycle_settings_are_refused_by_name() {
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (dense, _, _) = llama();
    let cases = [
        (settings(5, 1, 5, 0), "upcycle.granularity"),
        (settings(4, 2, 2, 2), "upcycle.shared_experts"),
        (settings(5, 1, 2, 0), "upcycle.experts"),
        (settings(2, 3, 1, 0), "upcycle.top_k"),
        (
            UpcycleConfig {
                layers: Some(vec![2]),
                ..settings(4, 2, 1, 0)
            },
            "upcycle.layers",
        ),
    ];
    for (up, key) in cases {
        let err = upcycle(&dense, &up, 7).map(|_| ()).unwrap_err();
        assert!(format!("{err:#}").contains(key), "{up:?}: {err:#}");
    }
    // An MoE source.
    let (_, mixtral) = hf::load(&here("tests/fixtures/hf-mixtral-tiny"), &Device::flex()).unwrap();
    let err = upcycle(&mixtral, &settings(4, 2, 1, 0), 7)
        .map(|_| ())
        .unwrap_err();
    assert!(err.to_string().contains("already has MoE blocks"), "{err}");
    // [upcycle] without a model to upcycle.
    let err =
        switchyard::config::RunConfig::from_toml_str("[upcycle]\nexperts = 4\n", &[]).unwrap_err();
    assert!(err.to_string().contains("train.init_from"), "{err}");
}
