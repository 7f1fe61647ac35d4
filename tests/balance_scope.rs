//! `moe.balance_scope = "global_batch"`: the Switch loss of each micro-batch
//! takes its token fractions f_e from every micro-batch of the optimizer
//! step so far, while P_e stays the micro-batch's own.

mod common;

use burn::prelude::*;
use std::path::Path;
use switchyard::config::RunConfig;
use switchyard::model::LanguageModel;
use switchyard::moe::{MoeAux, Phase};
use switchyard::sweep::run::{run_sweep, Search, SweepOptions};
use switchyard::train::step::{forward, forward_in_step, BalanceCounts, BatchTensors};

const MODEL: &str = r#"
[model]
vocab_size = 512
d_model = 32
n_layers = 2
n_heads = 2
n_kv_heads = 1
d_ff = 64
seq_len = 24
[moe]
num_experts = 4
top_k = 2
d_expert = 16
router_init_std = 0.5     # routing far from uniform: f_e and P_e vary by expert
balance_scope = "global_batch"
"#;

/// Rows `rows` of a fixed pseudo-random batch of 8 sequences.
fn batch(rows: std::ops::Range<usize>, s: usize, device: &Device) -> BatchTensors {
    let b = rows.len();
    let ids: Vec<i64> = rows
        .flat_map(|r| (0..=s).map(move |i| ((r * 131 + i * 7919 + (r * i) % 17) % 512) as i64))
        .collect();
    let all = Tensor::<2, Int>::from_data(TensorData::new(ids, [b, s + 1]), device);
    BatchTensors {
        inputs: all.clone().slice([0..b, 0..s]),
        targets: all.slice([0..b, 1..s + 1]),
        mask: Tensor::ones([b, s], device),
    }
}

fn scalar(t: Tensor<1>) -> f64 {
    t.into_data().iter::<f32>().next().unwrap() as f64
}

fn host(t: Tensor<1>) -> Vec<f64> {
    t.into_data().iter::<f32>().map(|v| v as f64).collect()
}

/// Σ over layers of E · Σ_e f_e · P_e, with f_e from `counts` (each layer's
/// routed assignments and tokens) and P_e from `probs`.
fn switch_sum(counts: &[MoeAux], probs: &[MoeAux], k: usize) -> f64 {
    counts
        .iter()
        .zip(probs)
        .map(|(c, p)| {
            let routed = host(c.stats.routed_per_expert.clone());
            let n = scalar(c.stats.num_tokens.clone());
            let p = host(p.losses.mean_probs.clone());
            let e = p.len() as f64;
            e * routed
                .iter()
                .zip(&p)
                .map(|(r, p)| r / (k as f64 * n) * p)
                .sum::<f64>()
        })
        .sum()
}

#[test]
fn global_batch_counts_every_micro_batch_of_the_step() {
    let cfg = RunConfig::from_toml_str(MODEL, &[]).unwrap();
    let device = Device::flex();
    let model = LanguageModel::new(&cfg.model, &cfg.moe, 5, &device);
    let (s, k) = (cfg.model.seq_len, cfg.moe.top_k);

    // One micro-batch: the global loss is the micro-batch loss.
    let full = batch(0..8, s, &device);
    let (micro, full_aux) = forward(&model, &full, &cfg, Phase::Eval);
    let (global, _) = forward_in_step(
        &model,
        &full,
        &cfg,
        Phase::Train,
        &mut BalanceCounts::default(),
    );
    let (a, b) = (scalar(micro.aux), scalar(global.aux));
    assert!((a - b).abs() < 1e-6 * a.abs(), "{a} vs {b}");

    // The same batch as two micro-batches of one step.
    let mut counts = BalanceCounts::default();
    let (first, first_aux) = forward_in_step(
        &model,
        &batch(0..4, s, &device),
        &cfg,
        Phase::Train,
        &mut counts,
    );
    let (second, second_aux) = forward_in_step(
        &model,
        &batch(4..8, s, &device),
        &cfg,
        Phase::Train,
        &mut counts,
    );
    // The first sees only itself.
    let want = switch_sum(&first_aux, &first_aux, k);
    let got = scalar(first.aux);
    assert!((got - want).abs() < 1e-5 * want, "{got} vs {want}");
    // The last one's f_e are the whole batch's; its P_e its own.
    let want = switch_sum(&full_aux, &second_aux, k);
    let got = scalar(second.aux.clone());
    assert!((got - want).abs() < 1e-5 * want, "{got} vs {want}");
    // ...which is not what it would give on its own.
    let alone = switch_sum(&second_aux, &second_aux, k);
    assert!((alone - want).abs() > 1e-2, "{alone} vs {want}");

    // Under "micro_batch" each micro-batch balances itself.
    let micro_cfg =
        RunConfig::from_toml_str(MODEL, &["moe.balance_scope=\"micro_batch\"".into()]).unwrap();
    let mut counts = BalanceCounts::default();
    let (_, _) = forward_in_step(
        &model,
        &batch(0..4, s, &device),
        &micro_cfg,
        Phase::Train,
        &mut counts,
    );
    let (second, _) = forward_in_step(
        &model,
        &batch(4..8, s, &device),
        &micro_cfg,
        Phase::Train,
        &mut counts,
    );
    let got = scalar(second.aux);
    assert!((got - alone).abs() < 1e-5 * alone, "{got} vs {alone}");
}

#[test]
fn global_batch_gradients_flow_through_the_micro_batch_probabilities() {
    // d/dP_e of the last micro-batch's loss is E · f_e(batch): the gradient
    // of the router weight equals that of Σ_e c_e · P_e with those constants.
    let cfg = RunConfig::from_toml_str(MODEL, &["model.n_layers=1".into()]).unwrap();
    let device = Device::flex().autodiff();
    let model = LanguageModel::new(&cfg.model, &cfg.moe, 9, &device);
    let s = cfg.model.seq_len;
    let (_, full_aux) = forward(&model, &batch(0..8, s, &device), &cfg, Phase::Eval);
    let mut counts = BalanceCounts::default();
    let _ = forward_in_step(
        &model,
        &batch(0..4, s, &device),
        &cfg,
        Phase::Train,
        &mut counts,
    );
    let (second, _) = forward_in_step(
        &model,
        &batch(4..8, s, &device),
        &cfg,
        Phase::Train,
        &mut counts,
    );
    let router = |m: &LanguageModel| m.moe_layers().next().unwrap().router.weight.clone();
    let grads = second.aux.backward();
    let got = router(&model).grad(&grads).unwrap();

    let routed = host(full_aux[0].stats.routed_per_expert.clone());
    let n = scalar(full_aux[0].stats.num_tokens.clone());
    let e = routed.len();
    let coef: Vec<f32> = routed
        .iter()
        .map(|r| (e as f64 * r / (cfg.moe.top_k as f64 * n)) as f32)
        .collect();
    let c = Tensor::<1>::from_data(TensorData::new(coef, [e]), &device);
    // A second forward of the same micro-batch for the reference graph.
    let (_, again) = forward(&model, &batch(4..8, s, &device), &cfg, Phase::Train);
    let grads = (again[0].losses.mean_probs.clone() * c).sum().backward();
    let want = router(&model).grad(&grads).unwrap();
    let scale = want.clone().abs().max().into_scalar::<f32>();
    let diff = (got - want).abs().max().into_scalar::<f32>();
    assert!(scale > 0.0 && diff <= 1e-5 * scale, "{diff} vs {scale}");
}

#[test]
fn balance_scope_is_a_sweep_axis() {
    let dir = common::Scratch::new("balance-scope", "sweep");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let base = format!(
        "{MODEL}[data]\ntokenizer = \"{}\"\nshuffle_buffer = 8\n[[data.sources]]\npaths = [\"{}\"]\n\
         [train]\nbatch_size = 2\ngrad_accum = 2\neval_batches = 1\n",
        root.join("data/tokenizer.json").display(),
        root.join("data/shakespeare/shakespeare_complete_works.txt")
            .display()
    )
    .replace("balance_scope = \"global_batch\"\n", "")
    .replace("vocab_size = 512", "vocab_size = 4096");
    std::fs::write(dir.join("base.toml"), base).unwrap();
    let sweep = dir.join("sweep.toml");
    std::fs::write(
        &sweep,
        format!(
            "base = \"{}\"\nname = \"scope\"\n[set]\n\"train.steps\" = 3\n\"train.eval_every\" = 3\n\
             [grid]\n\"moe.balance_scope\" = [\"micro_batch\", \"global_batch\"]\n",
            dir.join("base.toml").display()
        ),
    )
    .unwrap();
    let out = run_sweep(&SweepOptions {
        file: sweep,
        jobs: 2,
        resume: false,
        search: Search::Grid,
        exe: env!("CARGO_BIN_EXE_switchyard").into(),
        runs_dir: dir.join("runs"),
        bars: false,
    })
    .unwrap();
    assert_eq!(out.rows.len(), 2);
    // Same weights, same data: the first step's LM loss agrees, the
    // balance loss does not (the second micro-batch sees the batch's f_e).
    let first = |id: &str, key: &str| -> f64 {
        let text = std::fs::read_to_string(out.dir.join(id).join("metrics.jsonl")).unwrap();
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find_map(|v| v[key].as_f64())
            .unwrap_or_else(|| panic!("{key} missing in {id}"))
    };
    let ids: Vec<String> = out.rows.iter().map(|r| r.id.clone()).collect();
    for r in &out.rows {
        assert_eq!(r.steps, 3, "{}", r.id);
    }
    let (a, b) = (&ids[0], &ids[1]);
    assert_eq!(first(a, "loss/lm"), first(b, "loss/lm"));
    assert_ne!(first(a, "loss/aux"), first(b, "loss/aux"));
}
