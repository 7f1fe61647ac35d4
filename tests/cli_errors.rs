//! The `switchyard` binary on bad input, as a user would meet it: every case
//! exits non-zero with a message that names the culprit, and none panics.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn scratch(name: &str) -> common::Scratch {
    common::Scratch::new("cli", name)
}

/// Run the binary from the project root; returns (success, stdout + stderr).
fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .current_dir(root())
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The command fails cleanly, and its message holds every needle.
fn refused(args: &[&str], needles: &[&str]) -> String {
    let (ok, text) = run(args);
    assert!(!ok, "`{}` succeeded:\n{text}", args.join(" "));
    assert!(
        !text.contains("panicked at"),
        "`{}` panicked:\n{text}",
        args.join(" ")
    );
    for n in needles {
        assert!(
            text.contains(n),
            "`{}`: the message does not name `{n}`:\n{text}",
            args.join(" ")
        );
    }
    text
}

const TINY: &str = r#"
[model]
vocab_size = 4096
d_model = 16
n_layers = 1
n_heads = 2
n_kv_heads = 1
d_ff = 32
seq_len = 16
[moe]
num_experts = 2
top_k = 1
d_expert = 16
[data]
tokenizer = "data/tokenizer.json"
shuffle_buffer = 4
[[data.sources]]
paths = ["data/shakespeare/shakespeare_complete_works.txt"]
blank_lines = 2
[train]
steps = 2
batch_size = 2
eval_every = 0
checkpoint_every = 1
keep_checkpoints = 5
[log]
progress = "lines"
"#;

/// A run trained by the binary for two steps (checkpoints at steps 1 and 2).
fn trained_run() -> &'static Path {
    static RUN: OnceLock<PathBuf> = OnceLock::new();
    RUN.get_or_init(|| {
        let dir = common::process_dir("cli-run");
        let cfg = dir.join("tiny.toml");
        std::fs::write(&cfg, TINY).unwrap();
        let runs = dir.join("runs");
        let (ok, text) = run(&[
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--name",
            "tiny",
            "--runs-dir",
            runs.to_str().unwrap(),
        ]);
        assert!(ok, "training the fixture run failed:\n{text}");
        runs.join("tiny")
    })
}

/// A copy of a directory tree.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

fn mixtral() -> String {
    root()
        .join("tests/fixtures/hf-mixtral-tiny")
        .to_string_lossy()
        .into_owned()
}

#[test]
fn token_ids_outside_the_vocabulary_or_past_the_context_are_refused() {
    let m = mixtral();
    refused(
        &["inspect", "--checkpoint", &m, "--token-ids", "1,2,999999"],
        &["999999", "vocabulary of 256"],
    );
    let long: Vec<String> = (0..200).map(|i| (i % 256).to_string()).collect();
    refused(
        &[
            "inspect",
            "--checkpoint",
            &m,
            "--token-ids",
            &long.join(","),
        ],
        &["200 tokens", "128", "model.seq_len"],
    );
    refused(
        &["inspect", "--checkpoint", &m, "--token-ids", "1,x"],
        &["--token-ids", "x"],
    );
    // Within both limits it runs.
    let (ok, text) = run(&["inspect", "--checkpoint", &m, "--token-ids", "1,2,3"]);
    assert!(ok, "{text}");
}

#[test]
fn a_tokenizer_larger_than_the_model_vocabulary_is_refused() {
    let m = mixtral();
    for cmd in ["inspect", "generate"] {
        let flag = if cmd == "inspect" {
            "--text"
        } else {
            "--prompt"
        };
        refused(
            &[
                cmd,
                "--checkpoint",
                &m,
                flag,
                "To be",
                "--tokenizer",
                "data/tokenizer.json",
            ],
            &["data/tokenizer.json", "4096 tokens", "256"],
        );
    }
}

#[test]
fn generate_and_eval_take_edge_values_or_refuse_them() {
    let run_dir = trained_run().to_string_lossy().into_owned();
    // An empty prompt starts a new document.
    let (ok, text) = run(&[
        "generate",
        "--checkpoint",
        &run_dir,
        "--prompt",
        "",
        "--max-tokens",
        "3",
    ]);
    assert!(ok && !text.contains("panicked"), "{text}");
    // A prompt longer than the context keeps its last seq_len tokens.
    let long = "To be, or not to be, that is the question. ".repeat(20);
    let (ok, text) = run(&[
        "generate",
        "--checkpoint",
        &run_dir,
        "--prompt",
        &long,
        "--max-tokens",
        "3",
    ]);
    assert!(ok && !text.contains("panicked"), "{text}");
    refused(
        &["eval", "--checkpoint", &run_dir, "--max-batches", "0"],
        &["--max-batches"],
    );
    let out = format!("{run_dir}-report");
    refused(
        &[
            "routing-report",
            "--checkpoint",
            &run_dir,
            "--data",
            "plays=data/shakespeare",
            "--out",
            &out,
            "--max-batches",
            "0",
        ],
        &["--max-batches must be at least 1"],
    );
    // A temperature that is not a finite number >= 0 is refused.
    for t in ["--temperature=nan", "--temperature=-1", "--temperature=inf"] {
        refused(
            &["generate", "--checkpoint", &run_dir, "--prompt", "To be", t],
            &["--temperature", "finite number >= 0"],
        );
    }
}

#[test]
fn missing_and_wrong_paths_are_named() {
    refused(
        &[
            "inspect",
            "--checkpoint",
            "/no/such/dir",
            "--token-ids",
            "1",
        ],
        &["/no/such/dir"],
    );
    refused(
        &["train", "--config", "/no/such/config.toml"],
        &["/no/such/config.toml"],
    );
    refused(
        &["export", "--checkpoint", "/no/such/run", "--out", "/tmp/x"],
        &["/no/such/run"],
    );
    refused(&["eval", "--checkpoint", "/no/such/run"], &["/no/such/run"]);
    refused(&["info", "--hf", "/no/such/hf"], &["/no/such/hf"]);
    let run_dir = trained_run().to_string_lossy().into_owned();
    refused(
        &[
            "eval",
            "--checkpoint",
            &run_dir,
            "--data",
            "/no/such/corpus.txt",
        ],
        &["/no/such/corpus.txt"],
    );
}

#[test]
fn bad_config_values_name_the_key() {
    let dir = scratch("cfg");
    let cfg = dir.join("tiny.toml");
    std::fs::write(&cfg, TINY).unwrap();
    let c = cfg.to_str().unwrap();
    let runs = dir.join("runs");
    let r = runs.to_str().unwrap();
    for (set, needle) in [
        ("model.d_model=abc", "model.d_model"),
        ("moe.top_k=5", "moe.top_k"),
        ("moe.nope=1", "nope"),
        ("data.sources.0.weight=-1", "data.sources.0.weight"),
        ("data.sources.3.weight=1", "data.sources"),
        ("optim.lr=0", "optim.lr"),
        ("train.allreduce_bucket_mb=0", "train.allreduce_bucket_mb"),
        ("train.expert_parallel=2", "train.expert_parallel"),
        ("data.sharding=\"pages\"", "sharding"),
        ("train.steps", "key=value"),
        // Values that passed validation and then panicked, aborted or hung.
        ("model.init_std=inf", "model.init_std"),
        ("model.rms_norm_eps=inf", "model.rms_norm_eps"),
        ("model.n_layers=9223372036854775807", "model.n_layers"),
        (
            "moe.num_shared_experts=9223372036854775807",
            "moe.num_shared_experts",
        ),
        ("moe.num_experts=4294967297", "moe.num_experts"),
        ("data.workers=4294967297", "data.workers"),
        ("data.shuffle_buffer=4294967297", "data.shuffle_buffer"),
        ("train.grad_accum=4294967297", "train.grad_accum"),
        ("optim.weight_decay=inf", "optim.weight_decay"),
    ] {
        refused(
            &["train", "--config", c, "--runs-dir", r, "--set", set],
            &[needle],
        );
    }
    refused(
        &["train", "--config", c, "--runs-dir", r, "--device", "tpu"],
        &["tpu"],
    );
    // A run name that would put the run beside or over the runs directory.
    for name in ["", "../beside", "/tmp/sy-absolute-run", "..", "a/../b"] {
        refused(
            &["train", "--config", c, "--runs-dir", r, "--name", name],
            &["--name", "not absolute"],
        );
    }
    assert!(!dir.join("beside").exists() && !Path::new("/tmp/sy-absolute-run").exists());
    std::fs::write(&cfg, "[model\nd_model = 3").unwrap();
    refused(&["train", "--config", c, "--runs-dir", r], &["TOML"]);
}

#[path = "cli_errors/resume.rs"]
mod resume;

#[path = "cli_errors/files.rs"]
mod files;
