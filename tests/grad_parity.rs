//! Gradients held to PyTorch: the backward pass of switchyard's model against
//! what transformers computed (in float64) on the fixtures in
//! `../shared/fixtures/*/grads.safetensors` (see that folder's README).
//!
//! Both code paths are checked: the fused CPU kernels (f32 on the CPU
//! backend, each with a hand-written backward) and the composed tensor-op
//! path that GPU backends run (here in f64 on the CPU backend). Each
//! parameter's gradient must match to 1e-4 of its norm, for the language-model
//! loss and, for the MoE fixtures, for the loss with the Switch and z-losses
//! added (`loss_lm + 0.01 Σ switch_aux + 0.001 Σ z_loss`). Routing is dropless
//! with no noise, as transformers computes it.

use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::DType;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use switchyard::hf::{self, HfArch};
use switchyard::model::LanguageModel;
use switchyard::moe::Phase;
use switchyard::params;

/// The shared fixtures, beside the project.
fn fixture(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/fixtures")
        .join(name);
    assert!(
        dir.join("grads.safetensors").exists(),
        "{}: the transformers gradient fixtures are missing (the shared/ folder \
         must sit beside the project)",
        dir.display()
    );
    dir
}

fn f32s(t: &TensorData) -> Vec<f32> {
    t.clone().convert::<f32>().try_to_vec::<f32>().unwrap()
}

/// `[rows, cols]` row-major → its transpose.
fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; v.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = v[r * cols + c];
        }
    }
    out
}

/// PyTorch's gradient of our parameter `ours`, in our layout, from the
/// tensors of `grads.safetensors` under `prefix` (`lm.` or `total.`).
fn reference(
    arch: HfArch,
    ours: &str,
    shape: &[usize],
    grads: &HashMap<String, TensorData>,
    table: &[hf::KeyMapping],
    prefix: &str,
) -> Vec<f32> {
    let get = |key: &str| {
        let full = format!("{prefix}{key}");
        grads
            .get(&full)
            .unwrap_or_else(|| panic!("no PyTorch gradient `{full}` for `{ours}`"))
    };
    // transformers 5 keeps each layer's experts in two fused tensors:
    // gate_up_proj [E, 2F, d] (gate rows, then up rows) and down_proj [E, d, F].
    if let Some(layer) = ours.strip_suffix(".mlp.experts.gate_proj") {
        return expert_rows(get(&fused_key(arch, layer, "gate_up_proj")), shape, 0);
    }
    if let Some(layer) = ours.strip_suffix(".mlp.experts.up_proj") {
        return expert_rows(get(&fused_key(arch, layer, "gate_up_proj")), shape, 1);
    }
    if let Some(layer) = ours.strip_suffix(".mlp.experts.down_proj") {
        let [e, f, d] = [shape[0], shape[1], shape[2]];
        let theirs = f32s(get(&fused_key(arch, layer, "down_proj"))); // [E, d, F]
        return (0..e)
            .flat_map(|i| transpose(&theirs[i * d * f..(i + 1) * d * f], d, f))
            .collect();
    }
    let map = table
        .iter()
        .find(|m| m.ours == ours)
        .unwrap_or_else(|| panic!("`{ours}` is not in the Hugging Face key table"));
    // In transformers 5 Mixtral's router is `mlp.gate`, Granite's `router`
    // (`block_sparse_moe.gate` and `router.layer` on disk).
    let key = match arch {
        HfArch::Mixtral => map.hf[0].replace(".block_sparse_moe.", ".mlp."),
        HfArch::GraniteMoe => map.hf[0].replace(".router.layer.", ".router."),
        _ => map.hf[0].clone(),
    };
    let theirs = f32s(get(&key));
    if map.transpose {
        // Ours [in, out], theirs [out, in].
        transpose(&theirs, shape[1], shape[0])
    } else {
        theirs
    }
}

/// `model.layers.{i}.mlp.experts.{name}` for our `layers.{i}`
/// (`block_sparse_moe` in Granite MoE).
fn fused_key(arch: HfArch, layer: &str, name: &str) -> String {
    let module = match arch {
        HfArch::GraniteMoe => "block_sparse_moe",
        _ => "mlp",
    };
    format!("model.{layer}.{module}.experts.{name}")
}

/// Our `[E, d, F]` gate (`half` 0) or up (`half` 1) projection from
/// transformers' fused `gate_up_proj` `[E, 2F, d]`.
fn expert_rows(fused: &TensorData, shape: &[usize], half: usize) -> Vec<f32> {
    let [e, d, f] = [shape[0], shape[1], shape[2]];
    let v = f32s(fused);
    (0..e)
        .flat_map(|i| {
            let start = i * 2 * f * d + half * f * d;
            transpose(&v[start..start + f * d], f, d)
        })
        .collect()
}

/// ‖a − b‖ / ‖b‖.
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let diff: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    let norm: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (diff / norm.max(1e-30)).sqrt()
}

/// Which loss a check differentiates.
#[derive(Clone, Copy, Debug)]
enum Loss {
    /// The mean next-token cross-entropy (`lm.` gradients).
    Lm,
    /// Plus 0.01 Σ Switch loss and 0.001 Σ z-loss (`total.` gradients).
    Total,
}

/// The loss the fixture defines, on `model` computing in `dtype`: logits at
/// positions 0..S-1 predict tokens 1..S, all weighted equally; the routers
/// see every token.
fn loss(model: &LanguageModel, ids: &TensorData, which: Loss, device: &Device) -> Tensor<1> {
    let [b, s] = [ids.shape()[0], ids.shape()[1]];
    let tokens = Tensor::<2, Int>::from_data(ids.clone(), device);
    // The target of the last position is arbitrary and masked out.
    let targets = Tensor::cat(
        vec![
            tokens.clone().slice([0..b, 1..s]),
            Tensor::zeros([b, 1], device),
        ],
        1,
    );
    let mask = Tensor::<2>::ones([b, s - 1], device).pad((0, 1, 0, 0), 0.0);
    let (x, moe) = model.hidden(tokens, None, Phase::Eval);
    let lm = model.head_loss(x, targets, mask);
    match which {
        Loss::Lm => lm,
        Loss::Total => moe.iter().fold(lm, |acc, layer| {
            acc + layer.losses.load_balancing.clone().mul_scalar(0.01)
                + layer.losses.z_loss.clone().mul_scalar(0.001)
        }),
    }
}

/// Every parameter's gradient of `which` against PyTorch's, computing in
/// `dtype` (f32: the fused CPU kernels; f64: the composed path). Returns
/// the worst relative error, for the failure messages of the caller.
fn check(name: &str, dtype: DType, which: Loss) -> f64 {
    let dir = fixture(name);
    let device = Device::flex().autodiff();
    let (arch, model) = hf::load(&dir, &device).unwrap();
    let model = model.with_compute_dtype(dtype);
    let grads_file = hf::read_safetensors(&dir.join("grads.safetensors")).unwrap();
    let expected = hf::read_safetensors(&dir.join("expected.safetensors")).unwrap();
    let ids = &expected["input_ids"];

    let (prefix, loss_key) = match which {
        Loss::Lm => ("lm.", "loss_lm"),
        Loss::Total => ("total.", "loss_total"),
    };
    let loss = loss(&model, ids, which, &device);
    let got = loss.clone().into_scalar::<f64>();
    let want = f32s(&grads_file[loss_key])[0] as f64;
    assert!(
        ((got - want) / want).abs() < 1e-5,
        "{name} ({dtype:?}): {loss_key} = {got}, PyTorch {want}"
    );

    let grads = GradientsParams::from_grads(loss.backward(), &model);
    let ours: BTreeMap<String, TensorData> = params::grads(&model, &grads);
    let shapes = params::shapes(&model);
    let table = hf::key_table(arch, model.config(), model.moe_config());
    // Every trained parameter (all but the aux-free selection bias, which
    // transformers keeps as a buffer) has a gradient.
    let trained = shapes
        .keys()
        .filter(|p| !p.ends_with("expert_bias"))
        .count();
    assert_eq!(
        ours.len(),
        trained,
        "{name} ({dtype:?}): every parameter has a gradient"
    );
    let mut worst = 0.0f64;
    let mut checked = 0;
    for (path, g) in &ours {
        let shape = &shapes[path];
        let want = reference(arch, path, shape, &grads_file, &table, prefix);
        let err = rel_err(&f32s(g), &want);
        assert!(
            err < 1e-4,
            "{name} ({dtype:?}, {which:?}): gradient of `{path}` differs from PyTorch's by {err:.2e} of its norm"
        );
        worst = worst.max(err);
        checked += 1;
    }
    // Every PyTorch gradient of this loss was compared.
    let theirs = grads_file.keys().filter(|k| k.starts_with(prefix)).count();
    let fused_pairs = model.moe_layers().count(); // 3 of ours per 2 of theirs
    assert_eq!(checked, theirs + fused_pairs, "{name}: gradients compared");
    worst
}

/// [`check`] for both losses, printing the worst error of each.
fn check_both_losses(name: &str, dtype: DType) {
    for which in [Loss::Lm, Loss::Total] {
        let worst = check(name, dtype, which);
        println!("{name} {dtype:?} {which:?}: worst {worst:.2e}");
    }
}

/// A dense Llama: the fixture holds the LM loss's gradients.
#[test]
fn llama_gradients_match_pytorch_on_both_paths() {
    for dtype in [DType::F32, DType::F64] {
        let worst = check("hf-llama-tiny", dtype, Loss::Lm);
        println!("hf-llama-tiny {dtype:?} Lm: worst {worst:.2e}");
    }
}

#[test]
fn olmoe_gradients_match_pytorch_on_both_paths() {
    check_both_losses("hf-olmoe-tiny", DType::F32);
    check_both_losses("hf-olmoe-tiny", DType::F64);
}

#[test]
fn qwen3_moe_gradients_match_pytorch_on_both_paths() {
    check_both_losses("hf-qwen3moe-tiny", DType::F32);
    check_both_losses("hf-qwen3moe-tiny", DType::F64);
}

/// GLM-4.5 (sigmoid routing with a selection bias, group-limited top-k,
/// routed scaling, per-head q/k norms): the fixture holds the LM loss's
/// gradients only.
#[test]
fn glm4_moe_gradients_match_pytorch_on_both_paths() {
    for dtype in [DType::F32, DType::F64] {
        let worst = check("hf-glm4moe-tiny", dtype, Loss::Lm);
        println!("hf-glm4moe-tiny {dtype:?} Lm: worst {worst:.2e}");
    }
}

/// Granite MoE (fused expert tensors, top-k then softmax, the muP
/// scalars): the fixture holds the LM loss's gradients only.
#[test]
fn granite_moe_gradients_match_pytorch_on_both_paths() {
    for dtype in [DType::F32, DType::F64] {
        let worst = check("hf-granitemoe-tiny", dtype, Loss::Lm);
        println!("hf-granitemoe-tiny {dtype:?} Lm: worst {worst:.2e}");
    }
}

#[test]
fn mixtral_gradients_match_pytorch_on_the_fused_cpu_path() {
    check_both_losses("hf-mixtral-tiny", DType::F32);
}

#[test]
fn mixtral_gradients_match_pytorch_on_the_composed_path() {
    check_both_losses("hf-mixtral-tiny", DType::F64);
}

#[test]
fn qwen2_moe_gradients_match_pytorch_on_the_fused_cpu_path() {
    check_both_losses("hf-qwen2moe-tiny", DType::F32);
}

#[test]
fn qwen2_moe_gradients_match_pytorch_on_the_composed_path() {
    check_both_losses("hf-qwen2moe-tiny", DType::F64);
}
