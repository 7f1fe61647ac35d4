//! Per-domain expert maps at evaluation: a router that tells two synthetic
//! domains apart specialises, one that ignores them does not, and the
//! evaluation's counts and losses equal a recomputation from the stream's
//! sources, the routers' choices and the full logits.

mod common;

use burn::module::Param;
use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use switchyard::config::RunConfig;
use switchyard::data::stream::{DataStream, Split, StreamOptions};
use switchyard::data::tokenizer;
use switchyard::model::LanguageModel;
use switchyard::moe::Phase;
use switchyard::train::eval::{evaluate, EvalReport};
use switchyard::train::step::BatchTensors;
use tokenizers::Tokenizer;

/// The backend's random stream is process-wide, and a model's initial
/// weights are drawn from it: one test at a time builds and trains models.
static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn lock() -> std::sync::MutexGuard<'static, ()> {
    RNG.lock().unwrap_or_else(|e| e.into_inner())
}

const CFG: &str = r#"
[model]
vocab_size = 4096
d_model = 32
n_layers = 1
n_heads = 2
n_kv_heads = 1
d_ff = 64
seq_len = 32
init_std = 0.01
[moe]
num_experts = 4
top_k = 2
d_expert = 16
drop_policy = "dropless"
[data]
tokenizer = "TOKENIZER"
val_fraction = 0.999
[[data.sources]]
name = "words"
paths = ["WORDS"]
[[data.sources]]
name = "digits"
paths = ["DIGITS"]
[train]
batch_size = 4
"#;

struct Setup {
    cfg: RunConfig,
    tok: Arc<Tokenizer>,
    /// Token ids only the words corpus has, only the digits corpus has.
    only: [HashSet<u32>; 2],
    /// Where the two corpora are, removed with the setup.
    _dir: common::Scratch,
}

fn setup(name: &str) -> Setup {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = common::Scratch::new("domains", name);
    // Distinct documents (the split hashes each one; they differ at their
    // start), letters only in one corpus and digits only in the other.
    let letters = |i: usize| -> String {
        [i / 26 % 26, i % 26]
            .iter()
            .map(|&c| (b'a' + c as u8) as char)
            .collect()
    };
    let words: String = (0..300)
        .map(|i| format!("{} the king and the queen\n\n", letters(i)))
        .collect();
    let digits: String = (0..300)
        .map(|i| format!("{} {} 9393\n\n", 1000 + 7 * i, 4000 + i))
        .collect();
    std::fs::write(dir.join("words.txt"), &words).unwrap();
    std::fs::write(dir.join("digits.txt"), &digits).unwrap();
    let tok_path = root.join("data/tokenizer.json");
    let text = CFG
        .replace("TOKENIZER", &tok_path.to_string_lossy())
        .replace("WORDS", &dir.join("words.txt").to_string_lossy())
        .replace("DIGITS", &dir.join("digits.txt").to_string_lossy());
    let cfg = RunConfig::from_toml_str(&text, &[]).unwrap();
    let tok = Arc::new(tokenizer::load(&tok_path).unwrap());
    let ids = |t: &str| -> HashSet<u32> {
        tok.encode(t, false)
            .unwrap()
            .get_ids()
            .iter()
            .copied()
            .collect()
    };
    let (a, b) = (ids(&words), ids(&digits));
    let only = [
        a.difference(&b).copied().collect(),
        b.difference(&a).copied().collect(),
    ];
    Setup {
        cfg,
        tok,
        only,
        _dir: dir,
    }
}

/// A model whose embedding puts −1 on dimension 0 for the tokens only the
/// digits corpus has and +1 for every other token (the words', and those
/// both corpora share: blank lines, end of text), and whose router reads
/// dimension 0 alone with `router_row` (`[E]`).
fn model(s: &Setup, router_row: [f32; 4], device: &Device) -> LanguageModel {
    let mut m = LanguageModel::new(&s.cfg.model, &s.cfg.moe, 3, device);
    let [v, d] = m.embed_tokens.weight.val().dims();
    let mut emb: Vec<f32> = m
        .embed_tokens
        .weight
        .val()
        .into_data()
        .try_to_vec()
        .unwrap();
    for t in 0..v {
        emb[t * d] = if s.only[1].contains(&(t as u32)) {
            -1.0
        } else {
            1.0
        };
    }
    m.embed_tokens.weight =
        Param::from_tensor(Tensor::from_data(TensorData::new(emb, [v, d]), device));
    let mut w = vec![0f32; d * 4];
    w[..4].copy_from_slice(&router_row);
    for layer in m.moe_layers_mut() {
        layer.router.weight = Param::from_tensor(Tensor::from_data(
            TensorData::new(w.clone(), [d, 4]),
            device,
        ));
    }
    m
}

const BATCHES: usize = 6;

fn eval(s: &Setup, m: &LanguageModel, device: &Device) -> EvalReport {
    evaluate(m, &s.cfg, s.tok.clone(), device, BATCHES).unwrap()
}

#[test]
fn a_router_that_tells_the_domains_apart_specialises() {
    let _g = lock();
    let s = setup("apart");
    let device = Device::flex();
    // Words → experts 0 and 1, digits → 2 and 3.
    let m = model(&s, [3.0, 2.9, -2.9, -3.0], &device);
    let r = eval(&s, &m, &device);
    assert_eq!(r.domains.names, ["words", "digits"]);
    let map = &r.domains.layers[0];
    // Both domains are present in the evaluated batches.
    assert!(
        r.domains.tokens.iter().all(|&n| n > 100.0),
        "{:?}",
        r.domains.tokens
    );
    // The heat map by hand: every words token on experts 0 and 1; a digits
    // token on 2 and 3, unless it is one both corpora share (0 and 1).
    let mut stream = DataStream::open(
        &s.cfg.data,
        s.tok.clone(),
        StreamOptions {
            seq_len: s.cfg.model.seq_len,
            batch_size: s.cfg.train.batch_size,
            split: Split::Validation,
            seed: s.cfg.train.seed,
            shard: switchyard::data::stream::Shard::WHOLE,
        },
        None,
    )
    .unwrap();
    let mut want = vec![vec![0f64; 4]; 2];
    for _ in 0..BATCHES {
        let b = stream.next_batch().unwrap().unwrap();
        for r in 0..b.rows {
            for i in 0..b.seq_len {
                if b.mask[r * b.seq_len + i] == 0.0 {
                    continue;
                }
                let token = b.tokens[r * (b.seq_len + 1) + i];
                let d = b.sources[r * b.seq_len + i] as usize;
                let pair = if s.only[1].contains(&token) { 2 } else { 0 };
                want[d][pair] += 1.0;
                want[d][pair + 1] += 1.0;
            }
        }
    }
    assert_eq!(map.routed, want);
    // Digits tokens shared with the words corpus are a few percent: the
    // domain nearly decides the expert.
    let spec = map.specialisation().unwrap();
    assert!(spec > 0.75, "specialisation {spec}: {:?}", map.routed);

    // A router that ignores its input sends every token to the same
    // experts: no information about the domain.
    let flat = model(&s, [0.0; 4], &device);
    let r = eval(&s, &flat, &device);
    let spec = r.domains.layers[0].specialisation().unwrap();
    assert!(spec.abs() < 1e-9, "specialisation {spec}");
}

#[test]
fn domain_counts_and_losses_equal_a_recomputation() {
    let _g = lock();
    let s = setup("recompute");
    let device = Device::flex();
    let m = model(&s, [1.0, 0.3, -0.2, -1.0], &device);
    let r = eval(&s, &m, &device);

    let mut stream = DataStream::open(
        &s.cfg.data,
        s.tok.clone(),
        StreamOptions {
            seq_len: s.cfg.model.seq_len,
            batch_size: s.cfg.train.batch_size,
            split: Split::Validation,
            seed: s.cfg.train.seed,
            shard: switchyard::data::stream::Shard::WHOLE,
        },
        None,
    )
    .unwrap();
    let (e, k) = (4, 2);
    let mut routed = vec![vec![0f64; e]; 2];
    let (mut loss, mut tokens) = (vec![0f64; 2], vec![0f64; 2]);
    for _ in 0..BATCHES {
        let batch = stream.next_batch().unwrap().unwrap();
        let bt = BatchTensors::new(&batch, &device);
        let [b, t] = bt.mask.dims();
        let (x, moe) = m.hidden(bt.inputs.clone(), Some(bt.mask.clone()), Phase::Eval);
        let logp = log_softmax(m.head(x).reshape([b * t, 4096]), 1);
        let nll: Vec<f32> = logp
            .gather(1, bt.targets.clone().reshape([b * t, 1]))
            .neg()
            .into_data()
            .try_to_vec()
            .unwrap();
        let chosen: Vec<i64> = moe[0]
            .topk_experts
            .clone()
            .into_data_as::<i64>()
            .try_to_vec()
            .unwrap();
        for p in 0..b * t {
            if batch.mask[p] == 0.0 {
                continue;
            }
            let d = batch.sources[p] as usize;
            loss[d] += nll[p] as f64;
            tokens[d] += 1.0;
            for j in 0..k {
                routed[d][chosen[p * k + j] as usize] += 1.0;
            }
        }
    }
    assert_eq!(r.domains.tokens, tokens);
    assert_eq!(r.domains.layers[0].routed, routed);
    // Dropless: every assignment kept.
    assert_eq!(r.domains.layers[0].kept, routed);
    for d in 0..2 {
        let (got, want) = (r.domains.losses()[d].unwrap(), loss[d] / tokens[d]);
        assert!(
            (got - want).abs() < 1e-4 * want,
            "domain {d}: {got} vs {want}"
        );
    }
    // The overall loss is the token-weighted mean of the domains'.
    let mean = loss.iter().sum::<f64>() / tokens.iter().sum::<f64>();
    assert!((r.loss - mean).abs() < 1e-4 * mean);
}

#[test]
fn a_two_source_run_logs_domain_maps_to_every_sink() {
    use switchyard::metrics::tensorboard::{event_files, read_events, EventWhat, ValueKind};
    use switchyard::train::{run, RunOptions};
    let _g = lock();
    let s = setup("sinks");
    let dir = common::Scratch::new("domains", "run");
    let text = toml::to_string(&s.cfg).unwrap();
    std::fs::write(dir.join("cfg.toml"), text).unwrap();
    let out = run(&RunOptions {
        config: dir.join("cfg.toml"),
        overrides: [
            "train.steps=4",
            "train.eval_every=2",
            "train.eval_batches=2",
            "data.val_fraction=0.5",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect(),
        name: Some("r".into()),
        resume: false,
        device: "flex".into(),
        runs_dir: dir.join("runs"),
        stop_after: None,
    })
    .unwrap();
    assert!(out.run_dir.join("domains/layer0.png").exists());
    let records: Vec<serde_json::Value> =
        std::fs::read_to_string(out.run_dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    for r in records.iter().filter(|r| r.get("loss/total").is_some()) {
        let eval = r.get("eval/loss").is_some();
        for key in [
            "moe/layer0/specialisation",
            "eval/domain/words/loss",
            "moe/layer0/domain/digits/drop_rate",
            "moe/layer0/domain/words/expert3/share",
        ] {
            assert_eq!(r.get(key).is_some(), eval, "{key} at step {}", r["step"]);
        }
    }
    let events = read_events(&event_files(&out.run_dir).unwrap()[0]).unwrap();
    let images: Vec<i64> = events
        .iter()
        .filter_map(|e| match &e.what {
            Some(EventWhat::Summary(s)) => s
                .value
                .iter()
                .any(|v| {
                    v.tag == "moe/layer0/expert_domain_map"
                        && matches!(v.value, Some(ValueKind::Image(_)))
                })
                .then_some(e.step),
            _ => None,
        })
        .collect();
    assert_eq!(images, vec![2, 4]);
}
