//! Numerical parity with Hugging Face transformers on the tiny Mixtral and
//! Qwen2-MoE fixtures in `tests/fixtures/` (see its README): logits, router
//! logits, tokens per expert, Switch aux loss and z-loss per MoE layer.

use burn::prelude::*;
use std::path::{Path, PathBuf};
use switchyard::config::QkNorm;
use switchyard::hf;
use switchyard::model::LanguageModel;
use switchyard::moe::Phase;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn f32s(t: &TensorData) -> Vec<f32> {
    t.try_to_vec::<f32>().unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn check_fixture(name: &str, expect_arch: hf::HfArch, moe_layers: usize) {
    let device = Device::flex();
    let dir = fixture(name);
    let (arch, model) = hf::load(&dir, &device).unwrap();
    assert_eq!(arch, expect_arch);
    let expected = hf::read_safetensors(&dir.join("expected.safetensors")).unwrap();

    let ids = &expected["input_ids"];
    let shape = ids.shape().to_vec();
    let tokens = Tensor::<2, Int>::from_data(ids.clone(), &device);
    let out = model.forward(tokens, None, Phase::Eval);

    assert_eq!(out.logits.dims().to_vec(), vec![shape[0], shape[1], 256]);
    let logits = out.logits.into_data().try_to_vec::<f32>().unwrap();
    let d = max_abs_diff(&logits, &f32s(&expected["logits"]));
    assert!(d < 1e-4, "{name}: logits differ by {d}");

    assert_eq!(out.moe.len(), moe_layers, "{name}: number of MoE layers");
    for (i, aux) in out.moe.iter().enumerate() {
        let rl = aux
            .router_logits
            .clone()
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        let d = max_abs_diff(&rl, &f32s(&expected[&format!("router_logits.{i}")]));
        assert!(
            d < 1e-4,
            "{name}: router logits of MoE layer {i} differ by {d}"
        );

        let tpe: Vec<i64> = aux
            .stats
            .routed_per_expert
            .clone()
            .into_data()
            .try_to_vec::<f32>()
            .unwrap()
            .iter()
            .map(|&v| v.round() as i64)
            .collect();
        let want: Vec<i64> = expected[&format!("tokens_per_expert.{i}")]
            .try_to_vec()
            .unwrap();
        assert_eq!(tpe, want, "{name}: tokens per expert of MoE layer {i}");

        for (key, got) in [
            ("switch_aux_loss", &aux.losses.load_balancing),
            ("z_loss", &aux.losses.z_loss),
        ] {
            let got = got.clone().into_data().try_to_vec::<f32>().unwrap()[0];
            let want = f32s(&expected[&format!("{key}.{i}")])[0];
            let rel = ((got - want) / want).abs();
            assert!(
                rel < 1e-5,
                "{name}: {key}.{i} = {got}, transformers {want} (rel {rel})"
            );
        }
    }
}

#[test]
fn mixtral_matches_transformers() {
    check_fixture("hf-mixtral-tiny", hf::HfArch::Mixtral, 2);
}

#[test]
fn qwen2_moe_matches_transformers() {
    check_fixture("hf-qwen2moe-tiny", hf::HfArch::Qwen2Moe, 2);
}

#[test]
fn rope_theta_accepted_in_both_places() {
    let text = std::fs::read_to_string(fixture("hf-mixtral-tiny").join("config.json")).unwrap();
    let v5: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut v4 = v5.clone();
    let obj = v4.as_object_mut().unwrap();
    obj.remove("rope_parameters");
    obj.insert("rope_theta".into(), serde_json::json!(500000.0));
    let (_, m5, _) = hf::parse_config(&v5).unwrap();
    let (_, m4, _) = hf::parse_config(&v4).unwrap();
    assert_eq!(m5.rope_theta, 10000.0);
    assert_eq!(m4.rope_theta, 500000.0);
}

#[test]
fn unsupported_configs_name_the_field() {
    let text = std::fs::read_to_string(fixture("hf-mixtral-tiny").join("config.json")).unwrap();
    let base: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = [
        ("sliding_window", serde_json::json!(4096)),
        ("hidden_act", serde_json::json!("gelu")),
        ("model_type", serde_json::json!("gpt2")),
        (
            "rope_scaling",
            serde_json::json!({"type": "linear", "factor": 2.0}),
        ),
    ];
    for (key, value) in cases {
        let mut cfg = base.clone();
        let obj = cfg.as_object_mut().unwrap();
        obj.insert(key.into(), value);
        if key == "rope_scaling" {
            obj.remove("rope_parameters");
        }
        let err = hf::parse_config(&cfg).unwrap_err().to_string();
        assert!(
            err.contains(key),
            "error for `{key}` does not name it: {err}"
        );
    }
    let qwen = std::fs::read_to_string(fixture("hf-qwen2moe-tiny").join("config.json")).unwrap();
    let mut q: serde_json::Value = serde_json::from_str(&qwen).unwrap();
    q["use_sliding_window"] = serde_json::json!(true);
    let err = hf::parse_config(&q).unwrap_err().to_string();
    assert!(err.contains("use_sliding_window"), "{err}");
}

/// A fixture in `../shared/fixtures/{name}`, loaded as `arch`: its logits
/// and each of its `moe_layers` MoE layers' router logits against
/// transformers' (1e-4). Returns the model, the input ids and the
/// expected logits for further checks.
fn check_shared_fixture(
    name: &str,
    arch: hf::HfArch,
    moe_layers: usize,
) -> (LanguageModel, Tensor<2, Int>, Vec<f32>) {
    let device = Device::flex();
    // A bare name is in ../shared/fixtures; a path is the project's own.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = match name.contains('/') {
        true => root.join(name),
        false => root.join("../shared/fixtures").join(name),
    };
    let (got_arch, model) = hf::load(&dir, &device).unwrap();
    assert_eq!(got_arch, arch);
    let expected = hf::read_safetensors(&dir.join("expected.safetensors")).unwrap();
    let tokens = Tensor::<2, Int>::from_data(expected["input_ids"].clone(), &device);
    let out = model.forward(tokens.clone(), None, Phase::Eval);
    let logits = out.logits.into_data().try_to_vec::<f32>().unwrap();
    let want = f32s(&expected["logits"]);
    let d = max_abs_diff(&logits, &want);
    assert!(d < 1e-4, "{name}: logits differ by {d}");
    assert_eq!(out.moe.len(), moe_layers, "{name}: number of MoE layers");
    for (i, aux) in out.moe.iter().enumerate() {
        let rl = aux
            .router_logits
            .clone()
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        let d = max_abs_diff(&rl, &f32s(&expected[&format!("router_logits.{i}")]));
        assert!(
            d < 1e-4,
            "{name}: router logits of MoE layer {i} differ by {d}"
        );
    }
    (model, tokens, want)
}

/// A dense Llama from `../shared/fixtures/hf-llama-tiny`: every block a
/// SwiGLU MLP, imported as a switchyard model with no experts.
#[test]
fn llama_matches_transformers() {
    check_shared_fixture("hf-llama-tiny", hf::HfArch::Llama, 0);
}

/// OLMoE from `../shared/fixtures/hf-olmoe-tiny`: q/k RMSNorm over the
/// whole projections, q/k/v clamped to ±2, top-2 of 8 without
/// renormalisation.
#[test]
fn olmoe_matches_transformers() {
    let (model, _, _) = check_shared_fixture("hf-olmoe-tiny", hf::HfArch::Olmoe, 2);
    assert_eq!(model.config().qk_norm, QkNorm::Projection);
    assert_eq!(model.config().clip_qkv, Some(2.0));
}

/// Qwen3-MoE from `../shared/fixtures/hf-qwen3moe-tiny`: per-head q/k
/// RMSNorm before RoPE, head_dim apart from d_model / n_heads, a dense
/// block through `mlp_only_layers`, RoPE theta 1e6.
#[test]
fn qwen3_moe_matches_transformers() {
    let (model, _, _) = check_shared_fixture("hf-qwen3moe-tiny", hf::HfArch::Qwen3Moe, 2);
    assert_eq!(model.config().qk_norm, QkNorm::PerHead);
}

/// GLM-4.5 (`glm4_moe`) from `../shared/fixtures/hf-glm4moe-tiny`: sigmoid
/// scores with a random selection bias, group-limited top-2 (2 groups, 1
/// chosen, a group scored by its two best biased scores), renormalised
/// weights times a routed scaling factor of 2.5, an ungated shared expert,
/// per-head q/k norms, q/k/v biases and a dense first block. The logits
/// depend on every routing decision, so matching them checks the router's
/// choices; the router logits are checked directly.
#[test]
fn glm4_moe_matches_transformers() {
    let (model, tokens, want) = check_shared_fixture("hf-glm4moe-tiny", hf::HfArch::Glm4Moe, 2);
    let moe = model.moe_config();
    assert_eq!(
        (moe.n_group, moe.topk_group, moe.routed_scaling_factor),
        (2, 1, 2.5)
    );
    assert!(model.config().qk_norm == QkNorm::PerHead && model.config().qkv_bias);

    // The same model routed without groups chooses other experts for some
    // tokens and misses transformers' logits: the groups are what matched.
    let mut flat = model.clone();
    for layer in flat.moe_layers_mut() {
        layer.set_groups(1, 1);
    }
    let out = flat.forward(tokens, None, Phase::Eval);
    let logits = out.logits.into_data().try_to_vec::<f32>().unwrap();
    let d = max_abs_diff(&logits, &want);
    assert!(d > 1e-3, "ungrouped routing should not match ({d})");
}

/// Granite MoE from `../shared/fixtures/hf-granitemoe-tiny`: every
/// expert in two fused tensors, top-2 of the router logits then a softmax
/// over the two, and the muP scalars (embeddings × 6, each sublayer's
/// output × 0.22, attention scores × 0.0625 instead of 1/√16, logits ÷ 4).
#[test]
fn granite_moe_matches_transformers() {
    let (model, tokens, want) =
        check_shared_fixture("hf-granitemoe-tiny", hf::HfArch::GraniteMoe, 2);
    let m = model.config();
    assert_eq!(
        (
            m.embedding_multiplier,
            m.residual_multiplier,
            m.attention_multiplier,
            m.logits_scaling
        ),
        (6.0, 0.22, Some(0.0625), 4.0)
    );
    // Without the muP scalars the same weights miss transformers' logits.
    let plain = switchyard::config::ModelConfig {
        embedding_multiplier: 1.0,
        residual_multiplier: 1.0,
        attention_multiplier: None,
        logits_scaling: 1.0,
        ..m.clone()
    };
    let params = switchyard::params::collect(&model);
    let unscaled = LanguageModel::unloaded(&plain, model.moe_config(), &Device::flex());
    let unscaled = switchyard::params::load(unscaled, &params).unwrap();
    let logits = unscaled
        .forward(tokens, None, Phase::Eval)
        .logits
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    let d = max_abs_diff(&logits, &want);
    assert!(d > 1e-2, "unscaled logits should not match ({d})");
}

/// Each shared fixture's config with one field it cannot express: the
/// error names the field (and, for another `model_type`, the families read).
#[test]
fn unsupported_fields_of_each_family_are_named() {
    let cases: [(&str, &str, serde_json::Value, &str); 8] = [
        (
            "hf-glm4moe-tiny",
            "rope_parameters",
            serde_json::json!({"rope_theta": 10000.0, "rope_type": "default", "partial_rotary_factor": 0.5}),
            "partial_rotary_factor",
        ),
        (
            "hf-qwen3moe-tiny",
            "use_sliding_window",
            serde_json::json!(true),
            "use_sliding_window",
        ),
        (
            "hf-olmoe-tiny",
            "rope_parameters",
            serde_json::json!({"rope_theta": 10000.0, "rope_type": "linear", "factor": 2.0}),
            "rope_type",
        ),
        (
            "hf-granitemoe-tiny",
            "rope_scaling",
            serde_json::json!({"type": "linear", "factor": 2.0}),
            "rope_scaling",
        ),
        (
            "hf-llama-tiny",
            "mlp_bias",
            serde_json::json!(true),
            "mlp_bias",
        ),
        (
            "hf-llama-tiny",
            "rope_parameters",
            serde_json::json!({"rope_theta": 10000.0, "rope_type": "yarn", "factor": 4.0}),
            "rope_type",
        ),
        (
            "hf-llama-tiny",
            "hidden_act",
            serde_json::json!("gelu_pytorch_tanh"),
            "hidden_act",
        ),
        (
            "hf-llama-tiny",
            "model_type",
            serde_json::json!("deepseek_v3"),
            "\"granitemoe\"",
        ),
    ];
    for (name, key, value, needle) in cases {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/fixtures")
            .join(name);
        let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
        let mut cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
        cfg[key] = value;
        let err = hf::parse_config(&cfg).unwrap_err().to_string();
        assert!(err.contains(needle), "{name} with `{key}`: {err}");
    }
    // Sliding windows declared per layer, as transformers 5 writes them.
    let text = std::fs::read_to_string(fixture("hf-qwen2moe-tiny").join("config.json")).unwrap();
    let mut q: serde_json::Value = serde_json::from_str(&text).unwrap();
    q["layer_types"] = serde_json::json!(["full_attention", "sliding_attention", "full_attention"]);
    let err = hf::parse_config(&q).unwrap_err().to_string();
    assert!(err.contains("layer_types"), "{err}");
}

/// Qwen3-MoE with `attention_bias` (`tests/fixtures/hf-qwen3moe-bias-tiny`,
/// written by `scripts/make-hf-fixture.py`): biases on q, k, v and the
/// output projection, which the same weights without the output bias miss.
#[test]
fn qwen3_moe_with_attention_biases_matches_transformers() {
    let (model, tokens, want) = check_shared_fixture(
        "tests/fixtures/hf-qwen3moe-bias-tiny",
        hf::HfArch::Qwen3Moe,
        2,
    );
    assert!(model.config().qkv_bias && model.config().o_bias);
    let mut params = switchyard::params::collect(&model);
    for i in 0..3 {
        let key = format!("layers.{i}.self_attn.o_proj.bias");
        let n = params[&key].num_elements();
        params.insert(key, TensorData::new(vec![0f32; n], [n]));
    }
    let unbiased = LanguageModel::unloaded(model.config(), model.moe_config(), &Device::flex());
    let unbiased = switchyard::params::load(unbiased, &params).unwrap();
    let logits = unbiased
        .forward(tokens, None, Phase::Eval)
        .logits
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    let d = max_abs_diff(&logits, &want);
    assert!(
        d > 1e-2,
        "without the output bias the logits should not match ({d})"
    );
}
