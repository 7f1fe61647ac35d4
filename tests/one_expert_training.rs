//! A model whose MoE layers have one expert, top-1, dropless, with no aux or
//! z-loss, computes exactly the dense model's function (the combine weight
//! is 1). Started from the same weights, the two must give the same loss,
//! gradients and updates step after step through the real training step.

mod common;

use burn::optim::GradientsParams;
use burn::prelude::*;
use std::collections::BTreeMap;
use std::sync::Mutex;
use switchyard::config::RunConfig;
use switchyard::data::stream::Batch;
use switchyard::model::LanguageModel;
use switchyard::params;
use switchyard::train::optim::{grad_sq_norm, learning_rate, AdamW};
use switchyard::train::step::{self, BatchTensors};
use switchyard::train::{run, RunOptions};

/// The backend's random stream is process-wide: one test at a time draws.
static RNG: Mutex<()> = Mutex::new(());

const DENSE: &str = r#"
[model]
vocab_size = 4096
d_model = 128
n_layers = 4
n_heads = 4
n_kv_heads = 2
d_ff = 256
seq_len = 128
[moe]
num_experts = 0
[optim]
lr = 1e-2
warmup_steps = 2
[train]
steps = 6
batch_size = 16
"#;

const ONE_EXPERT: [&str; 6] = [
    "moe.num_experts=1",
    "moe.top_k=1",
    "moe.d_expert=256",
    "moe.drop_policy=dropless",
    "moe.aux_loss_coef=0",
    "moe.z_loss_coef=0",
];

/// Every parameter's gradient, by path.
fn grads_by_path(model: &LanguageModel, grads: &GradientsParams) -> BTreeMap<String, Vec<f32>> {
    params::grads(model, grads)
        .into_iter()
        .map(|(path, g)| (path, g.convert::<f32>().try_into_vec::<f32>().unwrap()))
        .collect()
}

/// The dense model's name for a parameter of the one-expert model.
fn dense_name(moe_path: &str) -> Option<String> {
    if moe_path.contains(".mlp.router.") {
        return None;
    }
    Some(if moe_path.contains(".mlp.experts.") {
        format!("{}.weight", moe_path.replace(".experts.", "."))
    } else {
        moe_path.to_string()
    })
}

fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let norm = b.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
        / norm
}

fn batch(step: usize) -> Batch {
    let (rows, seq) = (16, 128);
    let mut s = 0x2545_f491_4f6c_dd1du64 ^ step as u64;
    let tokens = (0..rows * (seq + 1))
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % 4096) as u32
        })
        .collect();
    Batch {
        tokens,
        mask: vec![1.0; rows * seq],
        rows,
        seq_len: seq,
        sources: Vec::new(),
    }
}

#[test]
fn one_expert_moe_trains_exactly_like_the_dense_mlp() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let device = Device::flex().autodiff();
    let base = device.clone().inner();
    let dense_cfg = RunConfig::from_toml_str(DENSE, &[]).unwrap();
    let set: Vec<String> = ONE_EXPERT.iter().map(|s| s.to_string()).collect();
    let moe_cfg = RunConfig::from_toml_str(DENSE, &set).unwrap();

    let mut dense = LanguageModel::new(&dense_cfg.model, &dense_cfg.moe, 7, &device);
    let dense_values = params::collect(&dense);
    let moe_shapes = params::shapes(&LanguageModel::unloaded(
        &moe_cfg.model,
        &moe_cfg.moe,
        &device,
    ));
    let mut values = BTreeMap::new();
    for (path, shape) in &moe_shapes {
        let v = match dense_name(path) {
            Some(name) => {
                let d = dense_values[&name].clone();
                TensorData::new(d.try_to_vec::<f32>().unwrap(), shape.clone())
            }
            None => TensorData::zeros::<f32, _>(shape.clone()),
        };
        values.insert(path.clone(), v);
    }
    let mut moe = params::load(
        LanguageModel::unloaded(&moe_cfg.model, &moe_cfg.moe, &device),
        &values,
    )
    .unwrap();
    assert_eq!(moe.moe_layers().count(), 4);

    let (mut adam_d, mut adam_m) = (AdamW::default(), AdamW::default());
    for s in 0..6 {
        let bt = BatchTensors::new(&batch(s), &device);
        let (gd, ld, _) = step::backward(&dense, &bt, &dense_cfg, &mut Default::default());
        let (gm, lm, stats) = step::backward(&moe, &bt, &moe_cfg, &mut Default::default());
        let (ld, lm) = (ld.total.into_scalar::<f32>(), lm.total.into_scalar::<f32>());
        assert!(
            ((ld - lm) / ld).abs() < 1e-5,
            "step {s}: loss dense {ld}, one expert {lm}"
        );
        let (by_d, by_m) = (grads_by_path(&dense, &gd), grads_by_path(&moe, &gm));
        for (path, g) in &by_m {
            let Some(name) = dense_name(path) else {
                continue;
            };
            let rel = max_rel(g, &by_d[&name]);
            assert!(rel < 1e-5, "step {s}: gradient of {path} differs ({rel})");
        }
        assert_eq!(by_m.len(), by_d.len() + 4, "step {s}: gradient count");

        let lr = learning_rate(&dense_cfg.optim, s as u64, 6);
        let sq_d = grad_sq_norm(&dense, &gd, &base);
        let sq_m = grad_sq_norm(&moe, &gm, &base);
        let tpe = stats
            .iter()
            .map(|s| s.routed_per_expert.clone().inner())
            .collect();
        dense = step::apply_update(dense, &mut adam_d, &dense_cfg, lr, gd, sq_d, Vec::new());
        moe = step::apply_update(moe, &mut adam_m, &moe_cfg, lr, gm, sq_m, tpe);

        let (pd, pm) = (params::collect(&dense), params::collect(&moe));
        for (path, v) in &pm {
            let Some(name) = dense_name(path) else {
                continue;
            };
            let rel = max_rel(
                &v.try_to_vec::<f32>().unwrap(),
                &pd[&name].try_to_vec::<f32>().unwrap(),
            );
            assert!(
                rel < 1e-5,
                "step {s}: {path} after the update differs ({rel})"
            );
        }
    }
}

/// End to end: `switchyard train` on the bundled corpus, the dense twin and
/// the one-expert model under the same seed. Each parameter is drawn from
/// its own stream (expert weights from the dense MLP's), so the two start
/// from the same weights and must log the same loss at every step.
#[test]
fn one_expert_run_logs_the_dense_twins_losses() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let dir = common::Scratch::new("one-expert", "twins");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = format!(
        r#"
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
tokenizer = "{tok}"
shuffle_buffer = 16
[[data.sources]]
paths = ["{corpus}"]
blank_lines = 2
[optim]
lr = 1e-2
warmup_steps = 2
[train]
steps = 12
batch_size = 4
eval_every = 0
checkpoint_every = 0
seed = 21
[log]
progress = "lines"
"#,
        tok = root.join("data/tokenizer.json").display(),
        corpus = root
            .join("data/shakespeare/shakespeare_complete_works.txt")
            .display()
    );
    let cfg = dir.join("dense.toml");
    std::fs::write(&cfg, text).unwrap();
    let train = |name: &str, set: &[&str]| {
        run(&RunOptions {
            config: cfg.clone(),
            overrides: set.iter().map(|s| s.to_string()).collect(),
            name: Some(name.into()),
            resume: false,
            device: "flex".into(),
            runs_dir: dir.join("runs"),
            stop_after: None,
        })
        .unwrap()
        .losses
    };
    let dense = train("dense", &[]);
    let mut set = ONE_EXPERT.to_vec();
    set[2] = "moe.d_expert=64";
    let one = train("one", &set);
    assert_eq!(dense.len(), 12);
    for (s, (d, m)) in dense.iter().zip(&one).enumerate() {
        assert!(
            ((d - m) / d).abs() < 1e-5,
            "step {}: dense {d}, one expert {m}",
            s + 1
        );
    }
    // The runs learned something, so the equality is not of two constants.
    assert!(dense[11] < dense[0] - 0.5, "{dense:?}");
}
