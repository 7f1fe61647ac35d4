//! The GPU code path against the CPU one, on the wgpu backend. Built only
//! with `--features wgpu`; any Vulkan driver runs it, the llvmpipe software
//! rasteriser included (Debian's `mesa-vulkan-drivers`).
//!
//! On a GPU backend the fused operations run as CubeCL kernels
//! (`src/kernels/cube/`) where the CPU runs its own kernels, and the rest
//! (the router, the combine, the losses' statistics) as Burn's composed
//! operations. The same weights and tokens must give the same losses,
//! routing and gradients on both.
#![cfg(feature = "wgpu")]

use burn::prelude::*;
use switchyard::config::RunConfig;
use switchyard::model::block::Ffn;
use switchyard::model::LanguageModel;
use switchyard::moe::Phase;
use switchyard::train::step::{forward, BatchTensors};

const MODEL: &str = r#"
[model]
vocab_size = 512
d_model = 64
n_layers = 2
n_heads = 4
n_kv_heads = 2
d_ff = 128
seq_len = 48

[moe]
num_experts = 4
top_k = 2
d_expert = 64
num_shared_experts = 1
aux_loss_coef = 0.01
seq_aux_loss_coef = 0.01
z_loss_coef = 0.001
"#;

fn batch(b: usize, s: usize, vocab: usize, device: &Device) -> BatchTensors {
    let ids: Vec<i64> = (0..b * (s + 1))
        .map(|i| ((i * 7919 + 13) % vocab) as i64)
        .collect();
    let all = Tensor::<2, Int>::from_data(TensorData::new(ids, [b, s + 1]), device);
    // The last row is half padding, to exercise the mask.
    let mask: Vec<f32> = (0..b * s)
        .map(|i| {
            if i / s == b - 1 && i % s >= s / 2 {
                0.0
            } else {
                1.0
            }
        })
        .collect();
    BatchTensors {
        inputs: all.clone().slice([0..b, 0..s]),
        targets: all.slice([0..b, 1..s + 1]),
        mask: Tensor::from_data(TensorData::new(mask, [b, s]), device),
    }
}

fn rel_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
    let b = b.to_device(&a.device());
    let scale = b.clone().abs().max().into_scalar::<f32>().max(1e-12);
    (a - b).abs().max().into_scalar::<f32>() / scale
}

/// Assert that `a` is within 1e-5 of `b`, relative to `b`'s largest
/// magnitude ([`rel_diff`]), naming what is compared and where.
fn assert_close<const D: usize>(what: &str, a: Tensor<D>, b: Tensor<D>, at: &str) {
    let d = rel_diff(a, b);
    assert!(d < 1e-5, "{what} differs by {d} (relative) at {at}");
}

/// One configuration on both backends: the total loss and each of its
/// terms, each layer's router logits and kept-token counts, and the
/// gradients of one weight from every kind of module. Evaluation routing
/// (no noise or expert dropout, whose random streams differ by backend),
/// at `moe.eval_capacity_factor`; `drops` says whether that capacity drops
/// tokens.
fn compare(overrides: &[&str], drops: bool) {
    let set: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    let cfg = RunConfig::from_toml_str(MODEL, &set).unwrap();
    let cpu = Device::flex().autodiff();
    let gpu = Device::wgpu(Default::default()).autodiff();
    cpu.seed(3);
    let model = LanguageModel::new(&cfg.model, &cfg.moe, 3, &cpu);
    let on_gpu = model.clone().fork(&gpu);
    let (b, s) = (3, cfg.model.seq_len);

    let (l1, aux1) = forward(
        &model,
        &batch(b, s, cfg.model.vocab_size, &cpu),
        &cfg,
        Phase::Eval,
    );
    let (l2, aux2) = forward(
        &on_gpu,
        &batch(b, s, cfg.model.vocab_size, &gpu),
        &cfg,
        Phase::Eval,
    );
    for (name, a, g) in [
        ("total", &l1.total, &l2.total),
        ("lm", &l1.lm, &l2.lm),
        ("aux", &l1.aux, &l2.aux),
        ("seq_aux", &l1.seq_aux, &l2.seq_aux),
        ("z", &l1.z, &l2.z),
    ] {
        let d = rel_diff(a.clone(), g.clone());
        assert!(d < 1e-5, "{overrides:?}: {name} loss differs by {d}");
    }
    let dropped: f32 = aux1
        .iter()
        .map(|a| a.stats.dropped().into_scalar::<f32>())
        .sum();
    assert_eq!(
        dropped > 0.0,
        drops,
        "{overrides:?}: {dropped} assignments dropped"
    );
    for (layer, (a, g)) in aux1.iter().zip(&aux2).enumerate() {
        let d = rel_diff(a.router_logits.clone(), g.router_logits.clone());
        assert!(
            d < 1e-4,
            "{overrides:?}: layer {layer} router logits differ by {d}"
        );
        let kept = |t: &Tensor<1>| t.clone().into_data().try_into_vec::<f32>().unwrap();
        assert_eq!(
            kept(&a.stats.kept_per_expert),
            kept(&g.stats.kept_per_expert),
            "{overrides:?}: layer {layer} keeps different tokens"
        );
    }

    let (g1, g2) = (l1.total.backward(), l2.total.backward());
    let block = |m: &LanguageModel| {
        let l = &m.layers[0];
        let moe = m.moe_layers().next().unwrap();
        vec![
            ("embedding", m.embed_tokens.weight.val()),
            ("q_proj", l.self_attn.q_proj.weight.val()),
            ("o_proj", l.self_attn.o_proj.weight.val()),
            ("router", moe.router.weight.val()),
            (
                "shared up_proj",
                moe.shared_expert.as_ref().unwrap().up_proj.weight.val(),
            ),
        ]
    };
    for ((name, a), (_, g)) in block(&model).into_iter().zip(block(&on_gpu)) {
        let (a, g) = (a.grad(&g1).unwrap(), g.grad(&g2).unwrap());
        let d = rel_diff(a, g);
        assert!(d < 2e-5, "{overrides:?}: gradient of {name} differs by {d}");
    }
    // A dense block, where the config has one: its MLP runs as the grouped
    // kernel with a single expert.
    let dense = |m: &LanguageModel| match &m.layers[0].mlp {
        Ffn::Dense(mlp) => {
            Some([&mlp.gate_proj, &mlp.up_proj, &mlp.down_proj].map(|l| l.weight.val()))
        }
        Ffn::Moe(_) => None,
    };
    if let (Some(a), Some(g)) = (dense(&model), dense(&on_gpu)) {
        for (i, (a, g)) in a.into_iter().zip(g).enumerate() {
            let d = rel_diff(a.grad(&g1).unwrap(), g.grad(&g2).unwrap());
            assert!(
                d < 2e-5,
                "{overrides:?}: gradient of dense projection {i} differs by {d}"
            );
        }
    }
    let d = rel_diff(
        model.norm.gamma.val().grad(&g1).unwrap(),
        on_gpu.norm.gamma.val().grad(&g2).unwrap(),
    );
    assert!(
        d < 2e-5,
        "{overrides:?}: gradient of the final norm differs by {d}"
    );
    let experts = |m: &LanguageModel| {
        let e = &m.moe_layers().next().unwrap().experts;
        [e.gate_proj.val(), e.up_proj.val(), e.down_proj.val()]
    };
    for (i, (a, g)) in experts(&model)
        .into_iter()
        .zip(experts(&on_gpu))
        .enumerate()
    {
        let d = rel_diff(a.grad(&g1).unwrap(), g.grad(&g2).unwrap());
        assert!(
            d < 2e-5,
            "{overrides:?}: gradient of expert projection {i} differs by {d}"
        );
    }
}

#[test]
fn gpu_path_matches_cpu_path_with_token_drops() {
    // Capacity 0.5 holds half the assignments, so tokens are dropped however
    // the router splits them.
    compare(&["moe.eval_capacity_factor=0.5"], true);
}

#[test]
fn gpu_path_matches_cpu_path_dropless_with_tied_head() {
    compare(
        &["moe.drop_policy=\"dropless\"", "model.tie_embeddings=true"],
        false,
    );
}

#[test]
fn gpu_path_matches_cpu_path_with_a_dense_first_block() {
    compare(
        &["moe.first_k_dense=1", "moe.drop_policy=\"dropless\""],
        false,
    );
}

/// WGSL has no bf16 type: a bf16 run on wgpu is refused up front with the
/// setting to change, not left to fail inside a shader compiler.
#[test]
fn bf16_on_wgpu_is_refused_with_the_setting_to_change() {
    use switchyard::config::Precision;
    use switchyard::train::check_precision;
    let gpu = Device::wgpu(Default::default());
    let err = check_precision(&gpu, "wgpu", Precision::Bf16).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("train.precision") && msg.contains("wgpu"),
        "{msg}"
    );
    check_precision(&gpu, "wgpu", Precision::F32).unwrap();
    check_precision(&Device::flex(), "flex", Precision::Bf16).unwrap();
}

/// On a GPU backend the bench reads the device allocator: what it reserves
/// must hold at least the f32 weights and AdamW's two moments, all resident
/// on the device after a step. The CPU backend has no pools and reports none.
#[test]
fn bench_reports_device_memory_that_holds_weights_and_moments() {
    use switchyard::bench::{run, BenchOptions};
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let opts = |device: &str| BenchOptions {
        config: root.join("configs/tiny.toml"),
        overrides: vec![
            "train.batch_size=2".into(),
            "model.seq_len=32".into(),
            "model.n_layers=2".into(),
        ],
        device: device.into(),
        warmup: 1,
        steps: 2,
        profile: false,
        sgemm: false,
    };
    let report = run(&opts("wgpu")).unwrap();
    let resident_mb = 3.0 * 4.0 * report.params as f64 / (1024.0 * 1024.0);
    let reserved = report
        .device_reserved_mb
        .expect("wgpu reports its memory pools");
    assert!(
        reserved >= resident_mb,
        "{reserved:.2} MiB reserved, but weights + moments are {resident_mb:.2} MiB"
    );
    assert!(report.render().contains("device mem"));
    assert!(run(&opts("flex")).unwrap().device_reserved_mb.is_none());
}

/// `train.gpu_fused_swiglu`, end to end through the command line (its own
/// process, since the setting is process-wide): with the SwiGLU fused into
/// the tiled matmul (routed experts, the shared expert and a dense first
/// block) a run logs the losses and gradient norms of a run with CubeCL's
/// matmuls and the separate SwiGLU pass, step after step.
#[test]
fn a_run_with_the_fused_swiglu_logs_the_losses_of_one_without() {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = common::Scratch::new("gpu-fused", "runs");
    let text = format!(
        "{MODEL}first_k_dense = 1\n[data]\ntokenizer = \"{}\"\n[[data.sources]]\npaths = [\"{}\"]\n\
         [train]\nsteps = 4\nbatch_size = 2\neval_every = 0\ncheckpoint_every = 4\n\
         [log]\nprogress = \"lines\"\n",
        root.join("data/tokenizer.json").display(),
        root.join("data/shakespeare/shakespeare_complete_works.txt")
            .display()
    )
    .replace("vocab_size = 512", "vocab_size = 4096");
    let cfg = dir.join("fused.toml");
    std::fs::write(&cfg, text).unwrap();
    let train = |name: &str, fused: bool| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["train", "--device", "wgpu", "--config"])
            .arg(&cfg)
            .arg("--runs-dir")
            .arg(dir.as_os_str())
            .args(["--name", name, "--set"])
            .arg(format!("train.gpu_fused_swiglu={fused}"))
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{name}: {log}");
        std::fs::read_to_string(dir.join(name).join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v.get("loss/total").is_some())
            .map(|v| {
                [
                    v["loss/total"].as_f64().unwrap(),
                    v["grad_norm"].as_f64().unwrap(),
                ]
            })
            .collect::<Vec<_>>()
    };
    let (plain, fused) = (train("plain", false), train("fused", true));
    assert_eq!(plain.len(), 4);
    assert_eq!(plain.len(), fused.len());
    for (step, (a, b)) in plain.iter().zip(&fused).enumerate() {
        for (what, x, y) in [("loss", a[0], b[0]), ("grad norm", a[1], b[1])] {
            assert!(
                (x - y).abs() <= 1e-4 * x.abs(),
                "step {}: {what} {x} without the fused SwiGLU, {y} with it",
                step + 1
            );
        }
    }
}

mod common;

#[path = "gpu_path/kernels.rs"]
mod kernels;

#[path = "gpu_path/head.rs"]
mod head;

#[path = "gpu_path/refusals.rs"]
mod refusals;

#[path = "gpu_path/half.rs"]
mod half;
