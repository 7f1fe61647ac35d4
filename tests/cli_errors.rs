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

/// A training state edited by hand (or damaged without breaking its JSON,
/// which no checksum covers) is refused on resume with what does not fit:
/// a pending revival of an expert the model does not have, a data cursor
/// naming a source it does not have, optimizer moments of another model.
#[test]
fn a_training_state_that_does_not_fit_is_refused_on_resume() {
    let dir = scratch("state");
    copy_dir(trained_run(), &dir.join("run"));
    let state = dir.join("run/checkpoints/step-0000002/state.json");
    let good: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    let config = dir.join("run/config.toml");
    let (c, r) = (config.to_str().unwrap(), dir.to_str().unwrap());
    let resume = |needle: &str| {
        let args = [
            "train",
            "--config",
            c,
            "--runs-dir",
            r,
            "--name",
            "run",
            "--resume",
        ];
        refused(
            &[&args[..], &["--set", "train.steps=3"]].concat(),
            &[needle],
        )
    };
    for (field, value, needle) in [
        (
            "pending_revivals",
            serde_json::json!([{"layer": 0, "expert": 9, "donor": 0}]),
            "pending revival",
        ),
        (
            "pending_revivals",
            serde_json::json!([{"layer": 0, "expert": 1, "donor": 0, "mean_input": [1.0]}]),
            "width 1",
        ),
        ("cursor", serde_json::json!(9), "active source 9"),
    ] {
        let mut edited = good.clone();
        if field == "cursor" {
            edited["cursor"]["active"] = value;
        } else {
            edited[field] = value;
        }
        std::fs::write(&state, serde_json::to_string(&edited).unwrap()).unwrap();
        let text = resume(needle);
        assert!(!text.contains("step 3/3"), "{text}");
    }
    // AdamW moments of another model, in a checkpoint whose state keeps no
    // checksums (as those written before checksums were kept).
    let mut no_sums = good.clone();
    no_sums["files"] = serde_json::json!({});
    std::fs::write(&state, serde_json::to_string(&no_sums).unwrap()).unwrap();
    let optimizer = dir.join("run/checkpoints/step-0000002/optimizer.safetensors");
    for (name, needle) in [
        ("m.embed_tokens.weight", "holds 3 values"),
        ("v.no.such.weight", "does not have"),
    ] {
        let header = format!(r#"{{"{name}":{{"dtype":"F32","shape":[3],"data_offsets":[0,12]}}}}"#);
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend(header.as_bytes());
        bytes.extend([0u8; 12]);
        std::fs::write(&optimizer, bytes).unwrap();
        resume(needle);
    }
}

/// `tokenizer train` refuses a vocabulary it cannot build (below the byte
/// tokens and the EOS token, or past the ceiling: that one panicked in the
/// trainer's hash table), an empty EOS token, and an input with no text.
#[test]
fn tokenizer_training_refuses_what_it_cannot_build() {
    let dir = scratch("tok");
    let corpus = dir.join("c.txt");
    std::fs::write(&corpus, "the cat sat on the mat.\n\nthe dog sat.\n").unwrap();
    let empty = dir.join("empty.txt");
    std::fs::write(&empty, "\n").unwrap();
    let out = dir.join("tok.json");
    let (c, e, o) = (
        corpus.to_str().unwrap(),
        empty.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    let train = ["tokenizer", "train", "--out", o, "--input"];
    for (extra, needle) in [
        (vec![c, "--vocab-size", "0"], "--vocab-size"),
        (
            vec![c, "--vocab-size", "9223372036854775807"],
            "--vocab-size",
        ),
        (vec![c, "--eos-token", ""], "--eos-token"),
        (vec![e, "--vocab-size", "300"], "no documents"),
    ] {
        refused(&[&train[..], &extra[..]].concat(), &[needle]);
        assert!(!out.exists());
    }
    let (ok, text) = run(&[&train[..], &[c, "--vocab-size", "257"]].concat());
    assert!(ok && out.exists(), "{text}");
}

/// A step larger than the machine's memory is refused with what it needs
/// and the keys to lower, before anything is allocated: an allocation that
/// large would abort the process instead of returning an error.
#[test]
fn a_step_too_large_for_the_machine_is_refused() {
    let dir = scratch("mem");
    let cfg = dir.join("tiny.toml");
    std::fs::write(&cfg, TINY).unwrap();
    let c = cfg.to_str().unwrap();
    let r = dir.join("runs");
    let r = r.to_str().unwrap();
    // 1 layer × 2 rows × 2 heads × (10^6)² × 4 bytes: 14.6 TiB of attention.
    let needles = ["needs at least", "model.seq_len", "train.batch_size"];
    let set = "model.seq_len=1000000";
    let text = refused(
        &["train", "--config", c, "--runs-dir", r, "--set", set],
        &needles,
    );
    assert!(text.contains("14901.2 GiB"), "{text}");
    // Refused before the run directory is made.
    assert!(!dir.join("runs/tiny").exists());
    refused(
        &["bench", "--config", c, "--set", set, "--steps", "1"],
        &needles,
    );
    // The embedding table (and its gradient and moments) counts too: at the
    // vocabulary's ceiling, 2 tables × 2^24 × 1,024 × 16 bytes = 512 GiB.
    let set = "model.vocab_size=16777216";
    refused(
        &[
            "train",
            "--config",
            c,
            "--runs-dir",
            r,
            "--set",
            set,
            "--set",
            "model.d_model=1024",
        ],
        &["needs at least", "model.vocab_size"],
    );
}

/// Evaluations with no validation split are refused before the first
/// step: at 0 by the config check, and when no document falls in a tiny
/// share by a look at the split at start, so no training is lost to it.
#[test]
fn an_empty_validation_split_is_refused_before_training() {
    let dir = scratch("val");
    let cfg = dir.join("tiny.toml");
    std::fs::write(&cfg, TINY).unwrap();
    let c = cfg.to_str().unwrap();
    let runs = dir.join("runs");
    let r = runs.to_str().unwrap();
    let every = "train.eval_every=1";
    refused(
        &[
            "train",
            "--config",
            c,
            "--runs-dir",
            r,
            "--set",
            every,
            "--set",
            "data.val_fraction=0",
        ],
        &["data.val_fraction", "train.eval_every"],
    );
    // The first evaluation would come after step 2, and step 1 would have
    // written a checkpoint (checkpoint_every = 1): none may be there.
    let text = refused(
        &[
            "train",
            "--config",
            c,
            "--runs-dir",
            r,
            "--name",
            "tiny-share",
            "--set",
            "train.eval_every=2",
            "--set",
            "data.val_fraction=1e-12",
        ],
        &["no tokens for the validation split", "data.val_fraction"],
    );
    assert!(!runs.join("tiny-share/checkpoints").exists(), "{text}");
    // Without evaluations a run needs no validation split.
    let (ok, text) = run(&[
        "train",
        "--config",
        c,
        "--runs-dir",
        r,
        "--name",
        "no-eval",
        "--set",
        "train.eval_every=0",
        "--set",
        "data.val_fraction=0",
    ]);
    assert!(ok, "{text}");
}

#[test]
fn damaged_checkpoints_are_named() {
    let dir = scratch("damaged");
    copy_dir(trained_run(), &dir.join("run"));
    let ckpt = dir.join("run/checkpoints/step-0000002");
    let model = ckpt.join("model.safetensors");
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&model, &bytes[..bytes.len() / 2]).unwrap();
    let c = ckpt.to_string_lossy().into_owned();
    for args in [
        vec!["inspect", "--checkpoint", &c, "--token-ids", "1,2"],
        vec!["export", "--checkpoint", &c, "--out", "/tmp/sy-never"],
        vec!["eval", "--checkpoint", &c, "--max-batches", "1"],
    ] {
        refused(&args, &["model.safetensors"]);
    }
    // A config that is not TOML, and one from another architecture.
    std::fs::write(&model, &bytes).unwrap();
    let config = ckpt.join("config.toml");
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, good.replace("d_model = 16", "d_model = 24")).unwrap();
    refused(
        &["inspect", "--checkpoint", &c, "--token-ids", "1"],
        &["shape"],
    );
    std::fs::write(&config, "not toml [").unwrap();
    refused(
        &["inspect", "--checkpoint", &c, "--token-ids", "1"],
        &["config.toml"],
    );
}

#[test]
fn damaged_hugging_face_directories_are_named() {
    let dir = scratch("hf");
    let hf = dir.join("mixtral");
    copy_dir(Path::new(&mixtral()), &hf);
    let h = hf.to_string_lossy().into_owned();
    let config = hf.join("config.json");
    let good: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    let with = |changes: &[(&str, serde_json::Value)]| {
        let mut c = good.clone();
        for (key, v) in changes {
            c[*key] = v.clone();
        }
        std::fs::write(&config, serde_json::to_string(&c).unwrap()).unwrap();
    };
    use serde_json::json;
    with(&[("model_type", json!(7))]);
    refused(&["info", "--hf", &h], &["model_type"]);
    let qwen: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/hf-qwen2moe-tiny/config.json"))
            .unwrap(),
    )
    .unwrap();
    let mut bad_qwen = qwen.clone();
    bad_qwen["mlp_only_layers"] = json!([0, "one"]);
    std::fs::write(&config, serde_json::to_string(&bad_qwen).unwrap()).unwrap();
    refused(&["info", "--hf", &h], &["mlp_only_layers"]);
    bad_qwen["mlp_only_layers"] = json!(2);
    std::fs::write(&config, serde_json::to_string(&bad_qwen).unwrap()).unwrap();
    refused(&["info", "--hf", &h], &["mlp_only_layers"]);
    with(&[("num_local_experts", json!(-4))]);
    refused(&["info", "--hf", &h], &["num_local_experts"]);
    // Sized by before the model's checks ran: an allocation that aborted.
    with(&[("num_hidden_layers", json!(1_000_000_000_000u64))]);
    refused(&["info", "--hf", &h], &["model.n_layers", "at most"]);
    with(&[("tie_word_embeddings", json!("no"))]);
    refused(&["info", "--hf", &h], &["tie_word_embeddings"]);
    with(&[("hidden_act", json!(["silu"]))]);
    refused(&["info", "--hf", &h], &["hidden_act"]);
    std::fs::write(&config, "{ not json").unwrap();
    refused(&["info", "--hf", &h], &["config.json"]);

    std::fs::write(&config, serde_json::to_string(&good).unwrap()).unwrap();
    let model = hf.join("model.safetensors");
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&model, &bytes[..bytes.len() / 3]).unwrap();
    refused(&["info", "--hf", &h], &["model.safetensors"]);
    std::fs::remove_file(&model).unwrap();
    refused(&["info", "--hf", &h], &["model.safetensors"]);
}

#[test]
fn bad_sweep_files_are_named() {
    let dir = scratch("sweep");
    let runs = dir.join("runs");
    let r = runs.to_str().unwrap();
    let cases: [(&str, &[&str]); 6] = [
        ("base = \"configs/tiny.toml\"\nname = [", &["sweep"]),
        (
            "base = \"configs/tiny.toml\"\nname = \"s\"\ncolour = 1\n",
            &["colour"],
        ),
        (
            "base = \"configs/tiny.toml\"\nname = \"s\"\n[grid]\n\"moe.top_k\" = []\n",
            &["moe.top_k", "empty"],
        ),
        (
            "base = \"/no/such/base.toml\"\nname = \"s\"\n[grid]\n\"moe.top_k\" = [1]\n",
            &["/no/such/base.toml"],
        ),
        (
            "base = \"configs/tiny.toml\"\nname = \"s\"\n[grid]\n\"moe.topk\" = [1, 2]\n",
            &["moe.topk"],
        ),
        (
            "base = \"configs/tiny.toml\"\nname = \"s\"\n[grid]\n\"moe.aux_loss_coef\" = { log = [0, 1], count = 3 }\n",
            &["moe.aux_loss_coef", "positive"],
        ),
    ];
    for (i, (text, needles)) in cases.iter().enumerate() {
        let f = dir.join(format!("sweep{i}.toml"));
        std::fs::write(&f, text).unwrap();
        refused(
            &["sweep", "--config", f.to_str().unwrap(), "--runs-dir", r],
            needles,
        );
    }
    let f = root().join("configs/sweep-moe-vs-dense.toml");
    let f = f.to_str().unwrap();
    refused(
        &["sweep", "--config", f, "--runs-dir", r, "--jobs", "0"],
        &["--jobs must be at least 1"],
    );
}

#[test]
fn bad_plan_experts_arguments_are_named() {
    let dir = trained_run().to_str().unwrap().to_string();
    refused(
        &["plan-experts", "--run", "/no/such/run", "--devices", "2"],
        &["/no/such/run", "not a run directory"],
    );
    refused(
        &["plan-experts", "--run", &dir, "--devices", "0"],
        &["--devices"],
    );
    refused(
        &["plan-experts", "--run", &dir, "--devices", "4"],
        &["4 devices for 2 experts"],
    );
    refused(
        &[
            "plan-experts",
            "--run",
            &dir,
            "--devices",
            "2",
            "--link-gbps",
            "0",
        ],
        &["--link-gbps"],
    );
    for flag in ["--link-gbps=nan", "--intra-node-gbps=-1", "--flops=inf"] {
        let name = flag.split('=').next().unwrap();
        refused(
            &["plan-experts", "--run", &dir, "--devices", "2", flag],
            &[name, "finite number > 0"],
        );
    }
    let (ok, text) = run(&["plan-experts", "--run", &dir, "--devices", "2"]);
    assert!(ok, "{text}");
    assert!(text.contains("| balanced |"), "{text}");
}

/// Launched by mpirun as one of several processes, a build without MPI
/// says how to get one instead of training alone N times.
#[cfg(not(feature = "mpi"))]
#[test]
fn several_processes_need_the_mpi_build() {
    let dir = scratch("mpi");
    let cfg = dir.join("tiny.toml");
    std::fs::write(&cfg, TINY).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["train", "--config", cfg.to_str().unwrap(), "--runs-dir"])
        .arg(dir.join("runs"))
        .current_dir(root())
        .env("OMPI_COMM_WORLD_SIZE", "2")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(!text.contains("panicked at"), "{text}");
    assert!(
        text.contains("one of 2") && text.contains("--features mpi"),
        "{text}"
    );
    assert!(!dir.join("runs").exists(), "nothing is written");
}

#[test]
fn bad_upcycle_flags_are_named() {
    let llama = root().join("../shared/fixtures/hf-llama-tiny");
    let llama = llama.to_str().unwrap();
    let out = scratch("upcycle");
    let out = out.join("run");
    let out = out.to_str().unwrap();
    let up = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = ["upcycle", "--from", llama, "--out", out]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let cases: [(&[&str], &[&str]); 5] = [
        (
            &[
                "--experts",
                "7",
                "--top-k",
                "1",
                "--granularity",
                "4",
                "--shared-experts",
                "1",
            ],
            &["--experts", "multiple of"],
        ),
        (
            &["--experts", "5", "--top-k", "1", "--granularity", "5"],
            &["--granularity", "d_ff = 96"],
        ),
        (&["--experts", "4", "--top-k", "5"], &["--top-k"]),
        (
            &["--experts", "4", "--top-k", "1", "--layers", "0,9"],
            &["--layers", "block 9"],
        ),
        (&["--experts", "4", "--top-k", "-1"], &["--top-k"]),
    ];
    for (extra, needles) in cases {
        let args = up(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        refused(&args, needles);
    }
    // An MoE source, and an output that already holds a run.
    refused(
        &[
            "upcycle",
            "--from",
            &mixtral(),
            "--experts",
            "4",
            "--top-k",
            "1",
            "--out",
            out,
        ],
        &["already has MoE blocks"],
    );
    let (ok, text) = run(&up(&["--experts", "4", "--top-k", "2"])
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    assert!(ok, "{text}");
    refused(
        &up(&["--experts", "4", "--top-k", "2"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        &["already holds a run"],
    );
}

/// `eval` reads a Hugging Face directory too: the export of a run gives the
/// run's loss on the same files; without a corpus or a tokenizer it says
/// which flag is missing.
#[test]
fn eval_reads_a_hugging_face_directory() {
    let run_dir = trained_run().to_str().unwrap().to_string();
    let scratch_dir = scratch("eval-hf");
    let out = scratch_dir.join("hf");
    let out = out.to_str().unwrap();
    let (ok, text) = run(&["export", "--checkpoint", &run_dir, "--out", out]);
    assert!(ok, "{text}");
    let data = "data/shakespeare/shakespeare_complete_works.txt";
    let loss = |checkpoint: &str, batches: &str| -> String {
        let (ok, text) = run(&[
            "eval",
            "--checkpoint",
            checkpoint,
            "--data",
            data,
            "--max-batches",
            batches,
        ]);
        assert!(ok, "{text}");
        let at = text.find("loss ").unwrap_or_else(|| panic!("{text}"));
        text[at..].split_whitespace().nth(1).unwrap().to_string()
    };
    // The same 8 windows: the run's 4 batches of 2, one of the default 8.
    // The run evaluates with its capacity, which at factor 2 for top-1 of
    // two experts holds every token, as the export's dropless routing does.
    assert_eq!(loss(out, "1"), loss(&run_dir, "4"));
    refused(&["eval", "--checkpoint", out], &["--data"]);
    let bare = scratch("eval-hf-bare");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(Path::new(out).join(f), bare.join(f)).unwrap();
    }
    refused(
        &[
            "eval",
            "--checkpoint",
            bare.to_str().unwrap(),
            "--data",
            data,
        ],
        &["--tokenizer"],
    );
}
