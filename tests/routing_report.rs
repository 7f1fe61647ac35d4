//! `switchyard routing-report` end to end: a checkpoint trained on two
//! domains, reported on both, against a recomputation from `inspect`
//! traces of the same windows; and its refusals.

mod common;

use burn::prelude::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use switchyard::checkpoint;
use switchyard::data::stream::{DataStream, Split, StreamOptions};
use switchyard::data::tokenizer;
use switchyard::inspect::trace;
use switchyard::metrics::domains::DomainReport;
use switchyard::metrics::routing_report::{domain_sources, prepare};
use switchyard::train::{run, RunOptions};

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
d_expert = 16
drop_policy = "dropless"
[data]
tokenizer = "TOKENIZER"
[[data.sources]]
name = "words"
paths = ["WORDS"]
[[data.sources]]
name = "digits"
paths = ["DIGITS"]
[train]
batch_size = 4
steps = 6
eval_every = 0
[log]
progress = "lines"
"#;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Two corpora of distinct documents and a run trained on them.
fn trained(dir: &Path) -> (PathBuf, [PathBuf; 2]) {
    let words: String = (0..200)
        .map(|i| {
            format!(
                "{} the king and the queen went to york\n\n",
                ["a", "b", "c", "d"][i % 4].repeat(1 + i / 4)
            )
        })
        .collect();
    let digits: String = (0..200)
        .map(|i| format!("{} {} 9393 1717\n\n", 1000 + 7 * i, 4000 + i))
        .collect();
    let files = [dir.join("words.txt"), dir.join("digits.txt")];
    std::fs::write(&files[0], words).unwrap();
    std::fs::write(&files[1], digits).unwrap();
    let text = CFG
        .replace(
            "TOKENIZER",
            &root().join("data/tokenizer.json").to_string_lossy(),
        )
        .replace("WORDS", &files[0].to_string_lossy())
        .replace("DIGITS", &files[1].to_string_lossy());
    std::fs::write(dir.join("cfg.toml"), text).unwrap();
    let out = run(&RunOptions {
        config: dir.join("cfg.toml"),
        overrides: Vec::new(),
        name: Some("r".into()),
        resume: false,
        device: "flex".into(),
        runs_dir: dir.join("runs"),
        stop_after: None,
    })
    .unwrap();
    (out.run_dir, files)
}

fn scratch(name: &str) -> common::Scratch {
    common::Scratch::new("report", name)
}

fn report(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg("routing-report")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn the_report_equals_a_recomputation_from_inspect_traces() {
    let dir = scratch("equal");
    let (run_dir, files) = trained(&dir);
    let out_dir = dir.join("report");
    let data = [
        format!("words={}", files[0].display()),
        format!("digits={}", files[1].display()),
    ];
    let out = report(&[
        "--checkpoint",
        run_dir.to_str().unwrap(),
        "--data",
        &data[0],
        &data[1],
        "--max-batches",
        "3",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("report.json")).unwrap())
            .unwrap();
    let got: DomainReport = serde_json::from_value(json["domains"].clone()).unwrap();
    assert_eq!(got.names, ["words", "digits"]);
    for png in ["layer0.png", "layer1.png"] {
        assert_eq!(&std::fs::read(out_dir.join(png)).unwrap()[1..4], b"PNG");
    }

    // The same windows, one row at a time through `inspect`'s trace.
    let device = Device::flex();
    let (_, ckpt) = checkpoint::list(&run_dir).unwrap().pop().unwrap();
    let (mut cfg, model) = checkpoint::load_model(&ckpt, &device).unwrap();
    let named: Vec<(String, String)> = vec![
        ("words".into(), files[0].display().to_string()),
        ("digits".into(), files[1].display().to_string()),
    ];
    prepare(&mut cfg, domain_sources(&named, 2, "text"), None).unwrap();
    let tok = Arc::new(tokenizer::load(&root().join("data/tokenizer.json")).unwrap());
    let (e, k, v) = (4, 2, 4096);
    for (d, source) in cfg.data.sources.iter().enumerate() {
        let mut one = cfg.data.clone();
        one.sources = vec![source.clone()];
        let opts = StreamOptions {
            seq_len: cfg.model.seq_len,
            batch_size: cfg.train.batch_size,
            split: Split::Validation,
            seed: cfg.train.seed,
            shard: switchyard::data::stream::Shard::WHOLE,
        };
        let mut stream = DataStream::open(&one, tok.clone(), opts, None).unwrap();
        let mut routed = vec![vec![0f64; e]; 2];
        let (mut loss, mut tokens) = (0f64, 0f64);
        for _ in 0..3 {
            let Some(batch) = stream.next_batch().unwrap() else {
                break;
            };
            let s = batch.seq_len;
            for r in 0..batch.rows {
                let valid = batch.mask[r * s..(r + 1) * s]
                    .iter()
                    .filter(|&&m| m > 0.0)
                    .count();
                let row = &batch.tokens[r * (s + 1)..(r + 1) * (s + 1)];
                let tr = trace(&model, &row[..valid], &device).unwrap();
                for p in 0..valid {
                    let logits = &tr.logits.0[p * v..(p + 1) * v];
                    let m = logits.iter().copied().fold(f32::MIN, f32::max) as f64;
                    let lse = m + logits
                        .iter()
                        .map(|&x| (x as f64 - m).exp())
                        .sum::<f64>()
                        .ln();
                    loss += lse - logits[row[p + 1] as usize] as f64;
                    tokens += 1.0;
                    for (l, layer) in tr.topk_experts.iter().enumerate() {
                        for j in 0..k {
                            routed[l][layer.0[p * k + j] as usize] += 1.0;
                        }
                    }
                }
            }
        }
        assert_eq!(got.tokens[d], tokens, "domain {d}");
        let mean = got.losses()[d].unwrap();
        assert!(
            (mean - loss / tokens).abs() < 1e-4 * mean,
            "domain {d}: {mean} vs {}",
            loss / tokens
        );
        for (l, want) in routed.iter().enumerate().take(2) {
            assert_eq!(got.layers[l].routed[d], *want, "domain {d} layer {l}");
        }
        // report.md lists the same numbers.
        let md = std::fs::read_to_string(out_dir.join("report.md")).unwrap();
        let line = format!("| {} | {tokens:.0} | {:.4} |", got.names[d], loss / tokens);
        assert!(md.contains(&line), "{line} not in\n{md}");
    }
}

#[test]
fn bad_arguments_are_refused_with_the_reason() {
    let dir = scratch("bad");
    let (run_dir, files) = trained(&dir);
    let ck = run_dir.to_str().unwrap();
    let out = dir.join("out");
    let words = format!("words={}", files[0].display());
    for (args, want) in [
        (vec!["--data", "nonamegiven"], "expected NAME=PATH"),
        (vec!["--data", &words, &words], "given twice"),
        (
            vec!["--data", &words, "--capacity-factor", "-1"],
            "--capacity-factor must be",
        ),
        (vec!["--data", "x=/no/such/file.txt"], "does not exist"),
    ] {
        let mut all = vec!["--checkpoint", ck, "--out", out.to_str().unwrap()];
        all.extend(args.iter().copied());
        let o = report(&all);
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}
