//! `train.init_from` a Hugging Face checkpoint keeps what the source
//! computes: its routing keys (top-k, score function, renormalisation,
//! groups, scaling) come from the source unless the config sets them, so a
//! step at a negligible learning rate, and an export, give back the
//! source's logits.

mod common;

use burn::prelude::*;
use common::{here as fixture, max_diff};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use switchyard::checkpoint;
use switchyard::config::RouterScore;
use switchyard::export::{export, ExportDtype, ExportFormat};
use switchyard::hf;
use switchyard::model::LanguageModel;
use switchyard::moe::Phase;
use switchyard::train::{run, RunOptions};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const VOCAB: usize = 4096;

fn scratch(name: &str) -> common::Scratch {
    common::Scratch::new("initfrom", name)
}

/// A copy of an HF fixture whose vocabulary is widened to the bundled
/// tokenizer's 4096 (zero rows for the new tokens), with `edit` applied to
/// its config.json.
fn widened_copy(src: &Path, dst: &Path, edit: impl Fn(&mut serde_json::Value)) {
    std::fs::create_dir_all(dst).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let old_vocab = cfg["vocab_size"].as_u64().unwrap() as usize;
    cfg["vocab_size"] = serde_json::json!(VOCAB);
    edit(&mut cfg);
    std::fs::write(
        dst.join("config.json"),
        serde_json::to_string_pretty(&cfg).unwrap(),
    )
    .unwrap();
    let tensors = hf::read_safetensors(&src.join("model.safetensors")).unwrap();
    let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, data) in tensors {
        let mut shape = data.shape().to_vec();
        let mut values: Vec<f32> = data.convert::<f32>().try_to_vec().unwrap();
        if (name.ends_with("embed_tokens.weight") || name == "lm_head.weight")
            && shape[0] == old_vocab
        {
            values.resize(VOCAB * shape[1], 0.0);
            shape[0] = VOCAB;
        }
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        owned.push((name, shape, bytes));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = owned
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    let bytes = safetensors::tensor::serialize(views, None).unwrap();
    std::fs::write(dst.join("model.safetensors"), bytes).unwrap();
}

/// The fixture's input ids, through `model`.
fn logits(model: &LanguageModel, fixture_dir: &Path) -> Vec<f32> {
    let device = Device::flex();
    let expected = hf::read_safetensors(&fixture_dir.join("expected.safetensors")).unwrap();
    let ids = Tensor::<2, Int>::from_data(expected["input_ids"].clone(), &device);
    model
        .forward(ids, None, Phase::Eval)
        .logits
        .into_data()
        .try_to_vec()
        .unwrap()
}

/// A config that sets only data, optimizer and training keys (and
/// `extra`), continued from `src` for one step at a learning rate of 1e-30.
fn continue_one_step(dir: &Path, src: &Path, extra: &str) -> PathBuf {
    let text = format!(
        "{extra}\n[data]\ntokenizer = \"{}\"\n[[data.sources]]\npaths = [\"{}\"]\nblank_lines = 2\n\
         [optim]\nlr = 1e-30\nmin_lr = 1e-30\nwarmup_steps = 0\n\
         [train]\nsteps = 1\nbatch_size = 2\neval_every = 0\ncheckpoint_every = 1\n[log]\nprogress = \"lines\"\n",
        fixture("data/tokenizer.json").display(),
        fixture("data/shakespeare/shakespeare_complete_works.txt").display()
    );
    std::fs::write(dir.join("cfg.toml"), text).unwrap();
    let out = run(&RunOptions {
        config: dir.join("cfg.toml"),
        overrides: vec![format!("train.init_from=\"{}\"", src.display())],
        name: Some("continued".into()),
        resume: false,
        device: "flex".into(),
        runs_dir: dir.join("runs"),
        stop_after: None,
    })
    .unwrap();
    out.run_dir
}

fn load_run(run_dir: &Path) -> (switchyard::config::RunConfig, LanguageModel) {
    let (_, ckpt) = checkpoint::list(run_dir).unwrap().pop().unwrap();
    checkpoint::load_model(&ckpt, &Device::flex()).unwrap()
}

#[test]
fn glm_routing_keys_come_from_the_source() {
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("glm");
    let fx = fixture("../shared/fixtures/hf-glm4moe-tiny");
    let src = dir.join("source");
    widened_copy(&fx, &src, |_| {});
    let (_, source) = hf::load(&src, &Device::flex()).unwrap();
    // The selection bias's own update (not scaled by the learning rate) is
    // off, so that the step leaves the function alone.
    let run_dir = continue_one_step(&dir, &src, "[moe]\nbias_update_rate = 0.0\n");
    let (cfg, model) = load_run(&run_dir);
    // Compared dropless, as transformers computes it.
    let model = model.without_capacity();
    assert_eq!(cfg.moe.score, RouterScore::Sigmoid);
    assert_eq!((cfg.moe.n_group, cfg.moe.topk_group), (2, 1));
    assert_eq!(cfg.moe.routed_scaling_factor, 2.5);
    let d = max_diff(&logits(&model, &fx), &logits(&source, &fx));
    assert!(d < 1e-5, "the continued model's logits moved by {d}");
    // config.toml says what came from the source.
    let text = std::fs::read_to_string(run_dir.join("config.toml")).unwrap();
    assert!(
        text.contains("# from the source: moe.score: \"softmax\" -> \"sigmoid\""),
        "{text}"
    );
    assert!(
        text.contains("# from the source: moe.routed_scaling_factor"),
        "{text}"
    );
}

#[test]
fn every_family_continues_and_exports_as_it_came() {
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // Mixtral at top-3 (switchyard's default is 2); Qwen2-MoE without
    // renormalised weights (switchyard's default renormalises); the others
    // as transformers wrote them. GLM's selection-bias update (not scaled
    // by the learning rate) is off, so that the step leaves the function alone.
    type Edit = fn(&mut serde_json::Value);
    let cases: [(&str, &str, Edit, &str); 7] = [
        (
            "mixtral",
            "tests/fixtures/hf-mixtral-tiny",
            |c| c["num_experts_per_tok"] = serde_json::json!(3),
            "",
        ),
        (
            "qwen2moe",
            "tests/fixtures/hf-qwen2moe-tiny",
            |c| c["norm_topk_prob"] = serde_json::json!(false),
            "",
        ),
        (
            "qwen3moe",
            "../shared/fixtures/hf-qwen3moe-tiny",
            |_| {},
            "",
        ),
        ("olmoe", "../shared/fixtures/hf-olmoe-tiny", |_| {}, ""),
        (
            "glm4moe",
            "../shared/fixtures/hf-glm4moe-tiny",
            |_| {},
            "[moe]\nbias_update_rate = 0.0\n",
        ),
        (
            "granitemoe",
            "../shared/fixtures/hf-granitemoe-tiny",
            |_| {},
            "",
        ),
        ("llama", "../shared/fixtures/hf-llama-tiny", |_| {}, ""),
    ];
    for (name, path, edit, extra) in cases {
        let dir = scratch(name);
        let fx = fixture(path);
        let src = dir.join("source");
        widened_copy(&fx, &src, edit);
        let (arch, source) = hf::load(&src, &Device::flex()).unwrap();
        let want = logits(&source, &fx);
        let run_dir = continue_one_step(&dir, &src, extra);
        let (cfg, model) = load_run(&run_dir);
        match name {
            "mixtral" => assert_eq!(cfg.moe.top_k, 3),
            "qwen2moe" => assert!(!cfg.moe.normalize_topk),
            _ => {}
        }
        let out = dir.join("exported");
        let wrote = export(&model, None, &out, ExportFormat::Auto, ExportDtype::F32).unwrap();
        assert_eq!(wrote, arch, "{name}: exported as another family");
        let (_, exported) = hf::load(&out, &Device::flex()).unwrap();
        let d = max_diff(&logits(&exported, &fx), &want);
        assert!(
            d < 1e-4,
            "{name}: exported logits differ from the source's by {d}"
        );
    }
}

#[test]
fn an_explicit_routing_key_is_kept_with_a_warning() {
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("explicit");
    let src = dir.join("source");
    widened_copy(&fixture("tests/fixtures/hf-mixtral-tiny"), &src, |c| {
        c["num_experts_per_tok"] = serde_json::json!(3)
    });
    let run_dir = continue_one_step(&dir, &src, "[moe]\ntop_k = 2\n");
    let (cfg, _) = load_run(&run_dir);
    assert_eq!(cfg.moe.top_k, 2);
    let text = std::fs::read_to_string(run_dir.join("config.toml")).unwrap();
    assert!(
        text.contains("# kept: moe.top_k = 2 is set in the config; the source has 3"),
        "{text}"
    );
}

/// The dense families without a transformers fixture (Mistral, Qwen2,
/// Qwen3): a model written as each, continued for one step at a learning
/// rate of 1e-30 and exported, is the same family with the same logits.
#[test]
fn dense_families_without_a_fixture_continue_and_export_as_they_came() {
    use switchyard::config::RunConfig;
    use switchyard::hf::HfArch;
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let attn = "[model]\nvocab_size = 4096\nd_model = 32\nn_layers = 2\nn_heads = 2\nn_kv_heads = 1\nd_ff = 48\nseq_len = 32\ninit_std = 0.3\n";
    let cases = [
        ("", HfArch::Mistral),
        ("qkv_bias = true\n", HfArch::Qwen2),
        (
            "qk_norm = \"per_head\"\nqkv_bias = true\no_bias = true\n",
            HfArch::Qwen3,
        ),
    ];
    for (extra, arch) in cases {
        let dir = scratch(&format!("{arch:?}"));
        let cfg = RunConfig::from_toml_str(&format!("{attn}{extra}[moe]\nnum_experts = 0\n"), &[])
            .unwrap();
        let built = LanguageModel::new(&cfg.model, &cfg.moe, 3, &Device::flex());
        let src = dir.join("source");
        let format = ExportFormat::Family(arch);
        assert_eq!(
            export(&built, None, &src, format, ExportDtype::F32).unwrap(),
            arch
        );
        let (read_as, source) = hf::load(&src, &Device::flex()).unwrap();
        assert_eq!(read_as, arch);
        let ids = Tensor::<2, Int>::from_data(
            TensorData::new(
                (0..24).map(|i| (i * 37 % 4096) as i64).collect::<Vec<_>>(),
                [1, 24],
            ),
            &Device::flex(),
        );
        let run_dir = continue_one_step(&dir, &src, "");
        let (_, model) = load_run(&run_dir);
        let out = dir.join("exported");
        assert_eq!(
            export(&model, None, &out, format, ExportDtype::F32).unwrap(),
            arch
        );
        let (_, exported) = hf::load(&out, &Device::flex()).unwrap();
        let forward = |m: &LanguageModel| -> Vec<f32> {
            m.forward(ids.clone(), None, Phase::Eval)
                .logits
                .into_data()
                .try_to_vec()
                .unwrap()
        };
        let d = max_diff(&forward(&exported), &forward(&source));
        assert!(
            d < 1e-4,
            "{arch:?}: exported logits differ from the source's by {d}"
        );
    }
}
