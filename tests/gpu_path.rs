//! The GPU code path against the CPU one, on the wgpu backend. Built only
//! with `--features wgpu`; any Vulkan driver runs it, the llvmpipe software
//! rasteriser included (Debian's `mesa-vulkan-drivers`).
//!
//! On a GPU backend every layer takes the composed path: Burn's matmuls and
//! attention instead of the fused CPU kernels, the MoE layer's padded
//! capacity buffers instead of the grouped rows, the LM head's full logits
//! instead of the chunked head. The same weights and tokens must give the
//! same losses, routing and gradients on both.
#![cfg(feature = "wgpu")]

use burn::prelude::*;
use switchyard::config::RunConfig;
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

/// Burn's attention on key/value heads repeated to the query heads, heads
/// first: the composed reference for the GPU kernel.
fn composed_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
    use burn::tensor::module::attention;
    use burn::tensor::ops::AttentionModuleOptions;
    let (h, kv) = (q.dims()[2], k.dims()[2]);
    let repeat = |x: Tensor<4>| {
        let [b, s, _, hd] = x.dims();
        x.unsqueeze_dim::<5>(3)
            .expand([b, s, kv, h / kv, hd])
            .reshape([b, s, h, hd])
            .swap_dims(1, 2)
    };
    let options = AttentionModuleOptions {
        scale: None,
        softcap: None,
        is_causal: true,
    };
    attention(q.swap_dims(1, 2), repeat(k), repeat(v), None, None, options).swap_dims(1, 2)
}

/// The GPU attention kernel (online softmax, no `[S, S]` tensor) against
/// the composed attention on the same device, in value and in the
/// gradients of q, k and v: grouped and ungrouped heads, one token,
/// lengths that are not multiples of the workgroup (more than one
/// workgroup per head at S = 300), and two head widths (each width
/// compiles its own kernels, which llvmpipe does slowly).
#[test]
fn gpu_attention_kernel_matches_composed_attention_and_its_gradients() {
    use burn::tensor::Distribution;
    use switchyard::kernels::{self, served_on, Op};
    let gpu = Device::wgpu(Default::default()).autodiff();
    assert!(served_on(
        Op::CausalAttention,
        &gpu,
        burn::tensor::DType::F32
    ));
    gpu.seed(11);
    for (b, h, kv, s, hd) in [(2, 6, 2, 37, 8), (2, 2, 2, 1, 8), (1, 4, 1, 300, 32)] {
        let r = |heads| {
            Tensor::<4>::random([b, s, heads, hd], Distribution::Normal(0.0, 1.0), &gpu)
                .require_grad()
        };
        let (q, k, v) = (r(h), r(kv), r(kv));
        let w = Tensor::<4>::random([b, s, h, hd], Distribution::Normal(0.0, 1.0), &gpu);
        let ours = kernels::causal_attention(q.clone(), k.clone(), v.clone());
        let want = composed_attention(q.clone(), k.clone(), v.clone());
        let at = format!("B = {b}, H = {h}, KV = {kv}, S = {s}, hd = {hd}");
        let d = rel_diff(ours.clone(), want.clone());
        assert!(d < 1e-5, "values differ by {d} (relative) at {at}");
        let g1 = (ours * w.clone()).sum().backward();
        let g2 = (want * w).sum().backward();
        for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
            let d = rel_diff(x.grad(&g1).unwrap(), x.grad(&g2).unwrap());
            assert!(
                d < 1e-5,
                "gradient of {name} differs by {d} (relative) at {at}"
            );
        }
    }
}

/// The GPU LM head (chunked logits, gradients made in the forward) against
/// the composed head on the same device, in the weighted loss, each row's
/// loss and the gradients of x and the weight (with a loss gradient of 0.7,
/// to check the backward scales them): a tied weight (a transposed view),
/// one row, a masked row, and 2,100 rows over a 4,096 vocabulary, which
/// takes three chunks.
#[test]
fn gpu_head_kernel_matches_composed_head_and_its_gradients() {
    use burn::tensor::activation::log_softmax;
    use burn::tensor::{Distribution, Int};
    use switchyard::kernels::{self, served_on, Op};
    let gpu = Device::wgpu(Default::default()).autodiff();
    assert!(served_on(
        Op::LinearCrossEntropy,
        &gpu,
        burn::tensor::DType::F32
    ));
    gpu.seed(5);
    for (n, d, v, tied) in [
        (37, 16, 50, true),
        (1, 8, 10, false),
        (2100, 16, 4096, false),
    ] {
        let x = Tensor::<2>::random([n, d], Distribution::Normal(0.0, 1.0), &gpu).require_grad();
        // The leaf the gradients are read from; each path takes its own
        // [d, V] view of it (a graph's nodes serve one backward pass).
        let shape = if tied { [v, d] } else { [d, v] };
        let leaf = Tensor::<2>::random(shape, Distribution::Normal(0.0, 0.5), &gpu).require_grad();
        let weight = || {
            if tied {
                leaf.clone().transpose()
            } else {
                leaf.clone()
            }
        };
        let ids: Vec<i64> = (0..n).map(|i| ((i * 7919 + 3) % v) as i64).collect();
        let targets = Tensor::<1, Int>::from_data(TensorData::new(ids, [n]), &gpu);
        let mask: Vec<f32> = (0..n).map(|i| if i % 5 == 4 { 0.0 } else { 1.0 }).collect();
        let weights = Tensor::<1>::from_data(TensorData::new(mask, [n]), &gpu);
        let at = format!("n = {n}, d = {d}, V = {v}");

        let ours =
            kernels::linear_cross_entropy(x.clone(), weight(), targets.clone(), weights.clone())
                .expect("the GPU serves the head");
        let logp = log_softmax(x.clone().matmul(weight()), 1);
        let nll = logp
            .gather(1, targets.clone().reshape([n, 1]))
            .reshape([n])
            .neg();
        let want = (nll.clone() * weights).sum();
        let d_loss = rel_diff(ours.clone(), want.clone());
        assert!(d_loss < 1e-5, "loss differs by {d_loss} (relative) at {at}");
        let rows = kernels::linear_cross_entropy_rows(
            x.clone().detach(),
            weight().detach(),
            targets.clone(),
        )
        .expect("the GPU serves the head");
        let d_rows = rel_diff(rows, nll.detach());
        assert!(
            d_rows < 1e-5,
            "row losses differ by {d_rows} (relative) at {at}"
        );

        let g1 = ours.mul_scalar(0.7).backward();
        let g2 = want.mul_scalar(0.7).backward();
        let d_x = rel_diff(x.grad(&g1).unwrap(), x.grad(&g2).unwrap());
        assert!(
            d_x < 1e-5,
            "gradient of x differs by {d_x} (relative) at {at}"
        );
        let d_w = rel_diff(leaf.grad(&g1).unwrap(), leaf.grad(&g2).unwrap());
        assert!(
            d_w < 1e-5,
            "gradient of w differs by {d_w} (relative) at {at}"
        );
    }
}

/// The GPU RMSNorm and RoPE kernels against their compositions on the same
/// device, in value and in the gradients of x (and gamma): rows not a
/// multiple of the workgroup, a 3-d and a 4-d input, two head widths.
#[test]
fn gpu_norm_and_rope_kernels_match_their_compositions_and_gradients() {
    use burn::tensor::Distribution;
    use switchyard::kernels::{self, served_on, Op};
    let gpu = Device::wgpu(Default::default()).autodiff();
    for op in [Op::RmsNorm, Op::Rope] {
        assert!(served_on(op, &gpu, burn::tensor::DType::F32), "{op:?}");
    }
    gpu.seed(7);
    let normal = |std| Distribution::Normal(0.0, std);

    for (b, s, d) in [(3, 37, 24), (1, 300, 64)] {
        let x = Tensor::<3>::random([b, s, d], normal(2.0), &gpu).require_grad();
        let gamma = Tensor::<1>::random([d], normal(1.0), &gpu).require_grad();
        let w = Tensor::<3>::random([b, s, d], normal(1.0), &gpu);
        let eps = 1e-5;
        let ours = kernels::rms_norm(x.clone(), gamma.clone(), eps).expect("served");
        let rms = (x.clone().square().mean_dim(2) + eps).sqrt();
        let want = x.clone() / rms * gamma.clone().reshape([1, 1, d]);
        let at = format!("rms_norm [{b}, {s}, {d}]");
        let dv = rel_diff(ours.clone(), want.clone());
        assert!(dv < 1e-5, "{at}: values differ by {dv} (relative)");
        let g1 = (ours * w.clone()).sum().backward();
        let g2 = (want * w).sum().backward();
        let dx = rel_diff(x.grad(&g1).unwrap(), x.grad(&g2).unwrap());
        assert!(dx < 1e-5, "{at}: gradient of x differs by {dx} (relative)");
        let dg = rel_diff(gamma.grad(&g1).unwrap(), gamma.grad(&g2).unwrap());
        assert!(
            dg < 1e-5,
            "{at}: gradient of gamma differs by {dg} (relative)"
        );
    }

    for (b, s, h, hd) in [(2, 37, 3, 8), (1, 130, 4, 32)] {
        let x = Tensor::<4>::random([b, s, h, hd], normal(1.0), &gpu).require_grad();
        let angles = Tensor::<2>::random([s, hd], Distribution::Uniform(-3.0, 3.0), &gpu);
        let (cos, sin) = (angles.clone().cos(), angles.sin());
        let w = Tensor::<4>::random([b, s, h, hd], normal(1.0), &gpu);
        let ours = kernels::rope(x.clone(), cos.clone(), sin.clone()).expect("served");
        let half = hd / 2;
        let rotated = Tensor::cat(
            vec![
                x.clone().slice([0..b, 0..s, 0..h, half..hd]).neg(),
                x.clone().slice([0..b, 0..s, 0..h, 0..half]),
            ],
            3,
        );
        let table = |t: Tensor<2>| t.reshape([1, s, 1, hd]);
        let want = x.clone() * table(cos) + rotated * table(sin);
        let at = format!("rope [{b}, {s}, {h}, {hd}]");
        let dv = rel_diff(ours.clone(), want.clone());
        assert!(dv < 1e-5, "{at}: values differ by {dv} (relative)");
        let g1 = (ours * w.clone()).sum().backward();
        let g2 = (want * w).sum().backward();
        let dg = rel_diff(x.grad(&g1).unwrap(), x.grad(&g2).unwrap());
        assert!(dg < 1e-5, "{at}: gradient of x differs by {dg} (relative)");
    }
}

/// The GPU AdamW kernel against the update composed from tensor operations
/// on the same device, decayed and not, over a size that is not a multiple
/// of the workgroup.
#[test]
fn gpu_adamw_kernel_matches_the_composed_update() {
    use burn::tensor::Distribution;
    use switchyard::kernels::{adamw_update, served_on, AdamWStep, Op};
    let gpu = Device::wgpu(Default::default());
    assert!(served_on(Op::AdamW, &gpu, burn::tensor::DType::F32));
    gpu.seed(9);
    let n = 1000;
    let r = |std: f64| Tensor::<1>::random([n], Distribution::Normal(0.0, std), &gpu);
    let (param, grad, m) = (r(1.0), r(0.1), r(0.01));
    let v = r(0.01).abs();
    let scale = Tensor::<1>::from_floats([0.8], &gpu);
    for weight_decay in [0.1, 0.0] {
        let step = AdamWStep {
            lr: 3e-3,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay,
            bias_correction: (1.0 - 0.9f64.powi(3), 1.0 - 0.95f64.powi(3)),
        };
        let (p, m1, v1) = adamw_update(
            param.clone(),
            grad.clone(),
            m.clone(),
            v.clone(),
            scale.clone(),
            &step,
        );
        let g = grad.clone() * scale.clone();
        let m2 = m.clone().mul_scalar(0.9) + g.clone().mul_scalar(0.1);
        let v2 = v.clone().mul_scalar(0.95) + g.square().mul_scalar(0.05);
        let update = m2.clone().div_scalar(step.bias_correction.0)
            / (v2.clone().div_scalar(step.bias_correction.1).sqrt() + 1e-8);
        let p2 = param.clone().mul_scalar(1.0 - 3e-3 * weight_decay) - update.mul_scalar(3e-3);
        for (name, a, b) in [
            ("parameter", p, p2),
            ("first moment", m1, m2),
            ("second moment", v1, v2),
        ] {
            let d = rel_diff(a, b);
            assert!(
                d < 1e-5,
                "{name} differs by {d} (relative) at weight decay {weight_decay}"
            );
        }
    }
}

/// The GPU grouped experts (exact rows per expert, no padding) against the
/// SwiGLU composed expert by expert on the same device, in value and in
/// the gradients of x and the three stacks: an expert with no rows (its
/// gradients zero), one with a single row, and uneven others.
#[test]
fn gpu_grouped_experts_match_the_composed_experts_and_their_gradients() {
    use burn::tensor::activation::silu;
    use burn::tensor::{Distribution, Int};
    use switchyard::kernels::{grouped_swiglu, served_on, Op};
    let gpu = Device::wgpu(Default::default()).autodiff();
    assert!(served_on(Op::GroupedSwiglu, &gpu, burn::tensor::DType::F32));
    gpu.seed(13);
    let (d, f) = (24, 40);
    let offsets = [0usize, 5, 5, 6, 20, 57];
    let (e, n) = (offsets.len() - 1, offsets[offsets.len() - 1]);
    let normal = |std| Distribution::Normal(0.0, std);
    let x = Tensor::<2>::random([n, d], normal(1.0), &gpu).require_grad();
    let gate = Tensor::<3>::random([e, d, f], normal(0.2), &gpu).require_grad();
    let up = Tensor::<3>::random([e, d, f], normal(0.2), &gpu).require_grad();
    let down = Tensor::<3>::random([e, f, d], normal(0.2), &gpu).require_grad();
    let w = Tensor::<2>::random([n, d], normal(1.0), &gpu);
    let offs: Vec<i64> = offsets.iter().map(|&o| o as i64).collect();
    let offs = Tensor::<1, Int>::from_data(TensorData::new(offs, [e + 1]), &gpu);

    let ours = grouped_swiglu(x.clone(), gate.clone(), up.clone(), down.clone(), offs);
    let expert = |t: &Tensor<3>, i: usize| {
        let [_, a, b] = t.dims();
        t.clone().slice([i..i + 1, 0..a, 0..b]).reshape([a, b])
    };
    let parts: Vec<Tensor<2>> = (0..e)
        .filter(|&i| offsets[i + 1] > offsets[i])
        .map(|i| {
            let xe = x.clone().slice([offsets[i]..offsets[i + 1], 0..d]);
            let h = silu(xe.clone().matmul(expert(&gate, i))) * xe.matmul(expert(&up, i));
            h.matmul(expert(&down, i))
        })
        .collect();
    let want = Tensor::cat(parts, 0);
    let dv = rel_diff(ours.clone(), want.clone());
    assert!(dv < 1e-5, "values differ by {dv} (relative)");
    let g1 = (ours * w.clone()).sum().backward();
    let g2 = (want * w).sum().backward();
    let dx = rel_diff(x.grad(&g1).unwrap(), x.grad(&g2).unwrap());
    assert!(dx < 1e-5, "gradient of x differs by {dx} (relative)");
    for (name, p) in [("gate", &gate), ("up", &up), ("down", &down)] {
        let (a, b) = (p.grad(&g1).unwrap(), p.grad(&g2).unwrap());
        let empty = a.clone().slice([1..2]).abs().max().into_scalar::<f32>();
        assert_eq!(empty, 0.0, "the expert with no rows has a {name} gradient");
        let dg = rel_diff(a, b);
        assert!(dg < 1e-5, "gradient of {name} differs by {dg} (relative)");
    }
}
