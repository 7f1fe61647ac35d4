//! Damaged checkpoints and Hugging Face directories, sweep files, and the flags of plan-experts, several processes and upcycling, each named.

use super::*;

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
