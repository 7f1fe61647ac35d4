//! The evaluation's loss by first-choice expert, against a recomputation
//! from the full logits and the routers' choices of the same batches.

use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use std::sync::Arc;
use switchyard::config::RunConfig;
use switchyard::data::stream::{DataStream, Split, StreamOptions};
use switchyard::data::tokenizer;
use switchyard::model::LanguageModel;
use switchyard::moe::Phase;
use switchyard::train::eval::evaluate;
use switchyard::train::step::BatchTensors;

const CFG: &str = r#"
[model]
vocab_size = 4096
d_model = 32
n_layers = 2
n_heads = 2
n_kv_heads = 1
d_ff = 64
seq_len = 32
[moe]
num_experts = 4
top_k = 2
d_expert = 32
router_init_std = 0.5
[data]
tokenizer = "TOKENIZER"
shuffle_buffer = 16
[[data.sources]]
paths = ["CORPUS"]
blank_lines = 2
[train]
batch_size = 4
"#;

#[test]
fn per_expert_eval_loss_equals_a_recomputation_from_the_logits() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let tok_path = root.join("data/tokenizer.json");
    let text = CFG
        .replace("TOKENIZER", &tok_path.to_string_lossy())
        .replace(
            "CORPUS",
            &root
                .join("data/shakespeare/shakespeare_complete_works.txt")
                .to_string_lossy(),
        );
    let cfg = RunConfig::from_toml_str(&text, &[]).unwrap();
    let device = Device::flex();
    let model = LanguageModel::new(&cfg.model, &cfg.moe, 11, &device);
    let tok = Arc::new(tokenizer::load(&tok_path).unwrap());
    let batches = 3;
    let report = evaluate(&model, &cfg, tok.clone(), &device, batches).unwrap();

    // The same batches, through the composed head: full logits, log-softmax.
    let opts = StreamOptions {
        seq_len: cfg.model.seq_len,
        batch_size: cfg.train.batch_size,
        split: Split::Validation,
        seed: cfg.train.seed,
        shard: switchyard::data::stream::Shard::WHOLE,
    };
    let mut stream = DataStream::open(&cfg.data, tok, opts, None).unwrap();
    let e = cfg.moe.num_experts;
    let mut sums = vec![vec![0f64; e]; 2];
    let mut counts = vec![vec![0f64; e]; 2];
    let (mut total, mut n) = (0f64, 0f64);
    for _ in 0..batches {
        let batch = stream.next_batch().unwrap().unwrap();
        let bt = BatchTensors::new(&batch, &device);
        let [b, s] = bt.mask.dims();
        let (x, moe) = model.hidden(bt.inputs.clone(), Some(bt.mask.clone()), Phase::Eval);
        let logp = log_softmax(model.head(x).reshape([b * s, cfg.model.vocab_size]), 1);
        let nll: Vec<f32> = logp
            .gather(1, bt.targets.clone().reshape([b * s, 1]))
            .neg()
            .into_data()
            .try_to_vec()
            .unwrap();
        let mask: Vec<f32> = bt.mask.clone().into_data().try_to_vec().unwrap();
        for (l, aux) in moe.iter().enumerate() {
            let chosen: Vec<i64> = aux
                .topk_experts
                .clone()
                .into_data_as::<i64>()
                .try_to_vec()
                .unwrap();
            for t in 0..b * s {
                if mask[t] > 0.0 {
                    let first = chosen[t * cfg.moe.top_k] as usize;
                    sums[l][first] += nll[t] as f64;
                    counts[l][first] += 1.0;
                }
            }
        }
        for t in 0..b * s {
            total += (nll[t] * mask[t]) as f64;
            n += mask[t] as f64;
        }
    }
    assert!(
        (report.loss - total / n).abs() < 1e-4 * report.loss,
        "{} vs {}",
        report.loss,
        total / n
    );
    assert_eq!(report.experts.len(), 2);
    for l in 0..2 {
        let got = &report.experts[l];
        assert_eq!(got.tokens, counts[l], "layer {l}");
        // The router spreads the tokens: more than one expert is someone's first choice.
        assert!(
            counts[l].iter().filter(|&&c| c > 0.0).count() > 1,
            "{:?}",
            counts[l]
        );
        for (ex, mean) in got.mean().into_iter().enumerate() {
            match mean {
                None => assert_eq!(counts[l][ex], 0.0),
                Some(m) => {
                    let want = sums[l][ex] / counts[l][ex];
                    assert!(
                        (m - want).abs() < 1e-4 * want,
                        "layer {l} expert {ex}: {m} vs {want}"
                    );
                }
            }
        }
    }
}
