//! Export writes what transformers writes. Each family's fixture (saved by
//! transformers), imported and exported again, gives back the same tensors
//! under the same keys, the same `config.json` fields, and (read back)
//! the logits transformers computed. Models built here export as the
//! simplest family that expresses them exactly, and a model that no family
//! expresses is refused with the feature named.

mod common;

use burn::prelude::*;
use common::{here, logits, max_diff, scratch};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Mutex;
use switchyard::config::RunConfig;
use switchyard::export::{export, ExportDtype, ExportFormat};
use switchyard::hf::{self, HfArch};
use switchyard::model::LanguageModel;

/// Models drawn here use the process-wide RNG.
static RNG: Mutex<()> = Mutex::new(());

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Fields that do not change what the model computes (`max_window_layers`
/// is read only with `use_sliding_window`, false in both).
const NOT_THE_FUNCTION: [&str; 10] = [
    "max_window_layers",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "use_cache",
    "output_router_logits",
    "router_aux_loss_coef",
];

#[test]
fn fixtures_export_as_transformers_wrote_them() {
    let cases = [
        ("tests/fixtures/hf-mixtral-tiny", HfArch::Mixtral),
        ("tests/fixtures/hf-qwen2moe-tiny", HfArch::Qwen2Moe),
        ("../shared/fixtures/hf-qwen3moe-tiny", HfArch::Qwen3Moe),
        ("tests/fixtures/hf-qwen3moe-bias-tiny", HfArch::Qwen3Moe),
        ("../shared/fixtures/hf-olmoe-tiny", HfArch::Olmoe),
        ("../shared/fixtures/hf-glm4moe-tiny", HfArch::Glm4Moe),
        ("../shared/fixtures/hf-granitemoe-tiny", HfArch::GraniteMoe),
        ("../shared/fixtures/hf-llama-tiny", HfArch::Llama),
    ];
    let device = Device::flex();
    for (path, arch) in cases {
        let fx = here(path);
        let (read_as, model) = hf::load(&fx, &device).unwrap();
        assert_eq!(read_as, arch, "{path}");
        let out = scratch("export", &format!("{arch:?}"));
        let wrote = export(&model, None, &out, ExportFormat::Auto, ExportDtype::F32).unwrap();
        assert_eq!(wrote, arch, "{path}: auto picked another family");

        // The same tensors under the same keys.
        let theirs = hf::read_safetensors(&fx.join("model.safetensors")).unwrap();
        let ours = hf::read_safetensors(&out.join("model.safetensors")).unwrap();
        let keys = |m: &std::collections::HashMap<String, TensorData>| -> BTreeSet<String> {
            m.keys().cloned().collect()
        };
        assert_eq!(keys(&ours), keys(&theirs), "{path}: tensor keys differ");
        for (k, t) in &theirs {
            assert_eq!(ours[k].shape(), t.shape(), "{path}: {k}");
            let d = max_diff(
                ours[k].as_slice::<f32>().unwrap(),
                t.as_slice::<f32>().unwrap(),
            );
            assert_eq!(d, 0.0, "{path}: {k} differs by {d}");
        }

        // Every field that defines the function, with the value transformers wrote.
        let theirs = read_json(&fx.join("config.json"));
        let ours = read_json(&out.join("config.json"));
        for (k, v) in theirs.as_object().unwrap() {
            // null: the family's default (head_dim = hidden / heads, no window).
            let windowless = theirs["use_sliding_window"] == Value::Bool(false);
            if NOT_THE_FUNCTION.contains(&k.as_str())
                || v.is_null()
                || (k == "sliding_window" && windowless)
            {
                continue;
            }
            // transformers 5 saves Qwen3-MoE's `num_experts` under its
            // attribute_map name; both names load.
            let mine = match (ours.get(k), k.as_str()) {
                (None, "num_local_experts") => &ours["num_experts"],
                (m, _) => m.unwrap_or(&Value::Null),
            };
            let same = match (mine.as_f64(), v.as_f64()) {
                (Some(a), Some(b)) => a == b,
                _ => mine == v,
            };
            assert!(
                same,
                "{path}: config.json `{k}` is {mine}, transformers wrote {v}"
            );
        }

        // Read back: transformers' logits.
        let expected = hf::read_safetensors(&fx.join("expected.safetensors")).unwrap();
        let (_, back) = hf::load(&out, &device).unwrap();
        let ids = Tensor::<2, Int>::from_data(expected["input_ids"].clone(), &device);
        let want: Vec<f32> = expected["logits"].try_to_vec().unwrap();
        let d = max_diff(&logits(&back, ids), &want);
        assert!(
            d < 1e-4,
            "{path}: exported logits differ from transformers' by {d}"
        );
    }
}

/// Build a model from `toml`, export it as `format`, check the family and
/// that reading it back gives the same logits.
fn round_trip(case: usize, toml: &str, format: ExportFormat, want: HfArch) {
    let _g = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let cfg = RunConfig::from_toml_str(toml, &[]).unwrap();
    let device = Device::flex();
    let model = LanguageModel::new(&cfg.model, &cfg.moe, 7, &device);
    let out = scratch("export", &format!("case{case}-{want:?}"));
    let arch = export(
        &model,
        Some(Path::new("data/tokenizer.json")),
        &out,
        format,
        ExportDtype::F32,
    )
    .unwrap_or_else(|e| panic!("{want:?}: {e:#}"));
    assert_eq!(arch, want, "{toml}");
    for f in [
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
    ] {
        assert!(out.join(f).exists(), "{f}");
    }
    let (arch2, back) = hf::load(&out, &device).unwrap();
    assert_eq!(arch2, want);
    let ids: Vec<i64> = (0..24).map(|i| (i * 37 % 4096) as i64).collect();
    let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, 24]), &device);
    let d = max_diff(&logits(&model, ids.clone()), &logits(&back, ids));
    assert!(
        d < 1e-5,
        "{want:?}: logits differ by {d} after export and import"
    );
}

const ATTN: &str = "[model]\nd_model = 32\nn_layers = 3\nn_heads = 2\nn_kv_heads = 1\nd_ff = 48\nseq_len = 32\ninit_std = 0.3\n";

#[test]
fn models_export_as_the_simplest_family_that_expresses_them() {
    use ExportFormat::{Auto, Family};
    let moe = "[moe]\nnum_experts = 4\ntop_k = 2\nd_expert = 16\ndrop_policy = \"dropless\"\n";
    let cases: Vec<(String, ExportFormat, HfArch)> = vec![
        // Every block MoE, no shared experts, no biases.
        (format!("{ATTN}{moe}"), Auto, HfArch::Mixtral),
        // The same, asked for as Qwen2-MoE: zero biases and a zero shared expert.
        (format!("{ATTN}{moe}"), Family(HfArch::Qwen2Moe), HfArch::Qwen2Moe),
        // A dense first block and an ungated shared expert.
        (
            format!("{ATTN}{moe}first_k_dense = 1\nnum_shared_experts = 2\nd_shared_expert = 8\n"),
            Auto,
            HfArch::Qwen2Moe,
        ),
        // Top-k-then-softmax with q/k/v biases.
        (
            format!("{ATTN}qkv_bias = true\n{moe}topk_order = \"topk_then_softmax\"\n"),
            Auto,
            HfArch::Qwen2Moe,
        ),
        // Per-head q/k norms, a head width of its own, a dense middle block.
        (
            format!("{ATTN}qk_norm = \"per_head\"\nhead_dim = 8\n{moe}layers = [0, 2]\nnormalize_topk = false\n"),
            Auto,
            HfArch::Qwen3Moe,
        ),
        // q/k norms over the projections, clamped q/k/v.
        (
            format!("{ATTN}qk_norm = \"projection\"\nclip_qkv = 0.5\n{moe}"),
            Auto,
            HfArch::Olmoe,
        ),
        // Sigmoid scores with the selection bias, groups, scaling, a dense
        // first block and a shared expert.
        (
            format!("{ATTN}qkv_bias = true\nqk_norm = \"per_head\"\n{moe}score = \"sigmoid\"\naux_free_bias = true\nn_group = 2\ntopk_group = 1\nrouted_scaling_factor = 2.5\nfirst_k_dense = 1\nnum_shared_experts = 1\n"),
            Auto,
            HfArch::Glm4Moe,
        ),
        // Sigmoid scores alone: a zero selection bias and a zero shared expert.
        (format!("{ATTN}{moe}score = \"sigmoid\"\n"), Auto, HfArch::Glm4Moe),
        // Granite's muP scalars, with top-k-then-softmax routing.
        (
            format!("{ATTN}embedding_multiplier = 3.0\nresidual_multiplier = 0.5\nattention_multiplier = 0.1\nlogits_scaling = 2.0\n{moe}topk_order = \"topk_then_softmax\"\n"),
            Auto,
            HfArch::GraniteMoe,
        ),
        // The scalars left at their defaults: the attention scale is written out.
        (format!("{ATTN}{moe}"), Family(HfArch::GraniteMoe), HfArch::GraniteMoe),
        // Biases on q, k, v and o (`attention_bias`).
        (
            format!("{ATTN}qkv_bias = true\no_bias = true\nqk_norm = \"per_head\"\n{moe}layers = [0, 2]\n"),
            Auto,
            HfArch::Qwen3Moe,
        ),
        (
            format!("{ATTN}qkv_bias = true\no_bias = true\n{moe}"),
            Auto,
            HfArch::GraniteMoe,
        ),
        (
            format!("{ATTN}qkv_bias = true\no_bias = true\n[moe]\nnum_experts = 0\n"),
            Auto,
            HfArch::Llama,
        ),
        // Dense models.
        (format!("{ATTN}[moe]\nnum_experts = 0\n"), Auto, HfArch::Llama),
        (
            format!("{ATTN}[moe]\nnum_experts = 0\n"),
            Family(HfArch::Mistral),
            HfArch::Mistral,
        ),
        (
            format!("{ATTN}qkv_bias = true\n[moe]\nnum_experts = 0\n"),
            Auto,
            HfArch::Qwen2,
        ),
        (
            format!("{ATTN}[moe]\nnum_experts = 0\n"),
            Family(HfArch::Qwen2),
            HfArch::Qwen2,
        ),
        (
            format!("{ATTN}qk_norm = \"per_head\"\nhead_dim = 24\n[moe]\nnum_experts = 0\n"),
            Auto,
            HfArch::Qwen3,
        ),
    ];
    for (case, (toml, format, want)) in cases.into_iter().enumerate() {
        round_trip(case, &toml, format, want);
    }
}

#[test]
fn a_model_no_family_expresses_is_refused_naming_the_feature() {
    let _g = RNG.lock().unwrap_or_else(|e| e.into_inner());
    use ExportFormat::{Auto, Family};
    let moe = "[moe]\nnum_experts = 4\ntop_k = 2\nd_expert = 16\n";
    let cases: Vec<(String, ExportFormat, &str)> = vec![
        // A selection bias on softmax scores: no family has it.
        (format!("{ATTN}{moe}aux_free_bias = true\n"), Auto, "aux_free_bias"),
        // Group-limited softmax routing.
        (format!("{ATTN}{moe}n_group = 2\ntopk_group = 1\n"), Auto, "n_group"),
        // Asked for a family that cannot hold it.
        (
            format!("{ATTN}{moe}score = \"sigmoid\"\n"),
            Family(HfArch::Mixtral),
            "moe.score = \"sigmoid\"",
        ),
        (
            format!("{ATTN}{moe}first_k_dense = 1\n"),
            Family(HfArch::Mixtral),
            "some blocks are dense",
        ),
        (
            format!("{ATTN}{moe}score = \"sigmoid\"\nnum_shared_experts = 1\nshared_expert_gate = true\n"),
            Auto,
            "shared_expert_gate",
        ),
        (
            format!("{ATTN}{moe}layers = [1]\nscore = \"sigmoid\"\n"),
            Family(HfArch::Glm4Moe),
            "dense blocks after an MoE block",
        ),
        (
            format!("{ATTN}[moe]\nnum_experts = 0\n"),
            Family(HfArch::Qwen3Moe),
            "no MoE blocks",
        ),
        (format!("{ATTN}{moe}"), Family(HfArch::Llama), "has MoE blocks"),
        // An output bias without q/k/v biases: no family's switch does that.
        (format!("{ATTN}o_bias = true\n{moe}"), Auto, "model.o_bias"),
        (
            format!("{ATTN}qkv_bias = true\no_bias = true\n{moe}first_k_dense = 1\n"),
            Family(HfArch::Qwen2Moe),
            "model.o_bias",
        ),
        (
            format!("{ATTN}logits_scaling = 2.0\n{moe}first_k_dense = 1\n"),
            Auto,
            "model.logits_scaling",
        ),
        (
            format!("{ATTN}qk_norm = \"per_head\"\n[moe]\nnum_experts = 0\n"),
            Family(HfArch::Llama),
            "model.qk_norm",
        ),
    ];
    for (toml, format, why) in cases {
        let cfg = RunConfig::from_toml_str(&toml, &[]).unwrap();
        let model = LanguageModel::new(&cfg.model, &cfg.moe, 1, &Device::flex());
        let err = export(
            &model,
            None,
            &scratch("export", "refused"),
            format,
            ExportDtype::F32,
        )
        .map(|a| format!("exported as {a:?}"))
        .unwrap_err();
        assert!(err.to_string().contains(why), "{toml}: {err}");
    }
}
