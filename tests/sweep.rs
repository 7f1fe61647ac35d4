//! `switchyard sweep` end to end: a 2×2 grid with 2 jobs, the summary against
//! each run's metrics, the plots, resume, a failing point, halving, and
//! variants compared across seeds.

mod common;

use std::path::{Path, PathBuf};
use switchyard::sweep::run::{run_sweep, Search, SweepOptions};
use switchyard::sweep::summary::Status;

const BASE: &str = r#"
[model]
vocab_size = 4096
d_model = 32
n_layers = 2
n_heads = 2
n_kv_heads = 1
seq_len = 32
[moe]
num_experts = 4
top_k = 2
d_expert = 32
[data]
tokenizer = "TOKENIZER"
shuffle_buffer = 8
[[data.sources]]
paths = ["CORPUS"]
blank_lines = 2
[train]
batch_size = 4
eval_batches = 2
"#;

fn scratch(name: &str) -> common::Scratch {
    common::Scratch::new("sweep", name)
}

/// Write the base config and a sweep file into `dir`; returns the sweep path.
fn setup(dir: &Path, sweep_body: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let base = BASE
        .replace(
            "TOKENIZER",
            &root.join("data/tokenizer.json").to_string_lossy(),
        )
        .replace(
            "CORPUS",
            &root
                .join("data/shakespeare/shakespeare_complete_works.txt")
                .to_string_lossy(),
        );
    std::fs::write(dir.join("base.toml"), base).unwrap();
    let sweep = dir.join("sweep.toml");
    std::fs::write(
        &sweep,
        format!(
            "base = \"{}\"\n{sweep_body}",
            dir.join("base.toml").display()
        ),
    )
    .unwrap();
    sweep
}

fn options(dir: &Path, file: &Path, search: Search, resume: bool) -> SweepOptions {
    SweepOptions {
        file: file.to_path_buf(),
        jobs: 2,
        resume,
        search,
        exe: PathBuf::from(env!("CARGO_BIN_EXE_switchyard")),
        runs_dir: dir.join("runs"),
        bars: false,
    }
}

fn jsonl_eval_losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["eval/loss"].as_f64())
        .collect()
}

#[test]
fn grid_sweep_runs_summarises_plots_and_resumes() {
    let dir = scratch("grid");
    let file = setup(
        &dir,
        "name = \"aux-cf\"\n[set]\n\"train.steps\" = 4\n\"train.eval_every\" = 2\n[grid]\n\"moe.aux_loss_coef\" = [0.0, 0.1]\n\"moe.capacity_factor\" = [1.0, 2.0]\n",
    );
    let out = run_sweep(&options(&dir, &file, Search::Grid, false)).unwrap();
    let ids = ["aux=0,cf=1", "aux=0,cf=2", "aux=0.1,cf=1", "aux=0.1,cf=2"];
    for id in ids {
        assert!(out.dir.join(id).join("metrics.jsonl").exists(), "{id}");
        assert!(
            switchyard::metrics::tensorboard::event_files(&out.dir.join(id))
                .unwrap()
                .len()
                == 1
        );
    }
    assert_eq!(out.rows.len(), 4);
    // Each row's numbers are those of its run's metrics.jsonl.
    for r in &out.rows {
        assert_eq!(r.status, Status::Finished, "{}", r.id);
        assert_eq!(r.steps, 4);
        let evals = jsonl_eval_losses(&out.dir.join(&r.id));
        assert_eq!(evals.len(), 2, "{}", r.id);
        assert_eq!(r.final_eval_loss, evals.last().copied());
        assert_eq!(r.best_eval_loss, evals.iter().copied().reduce(f64::min));
    }
    // Ranked by final eval loss.
    let losses: Vec<f64> = out
        .rows
        .iter()
        .map(|r| r.final_eval_loss.unwrap())
        .collect();
    assert!(losses.windows(2).all(|w| w[0] <= w[1]), "{losses:?}");
    let csv = std::fs::read_to_string(out.dir.join("summary.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 5);
    assert!(lines[0].starts_with("rank,point,moe.aux_loss_coef,moe.capacity_factor,status"));
    assert!(
        lines[1].starts_with(&format!("1,\"{}\"", out.rows[0].id)),
        "{}",
        lines[1]
    );
    let md = std::fs::read_to_string(out.dir.join("summary.md")).unwrap();
    assert!(
        md.contains(&format!("Best point: `{}`", out.rows[0].id)),
        "{md}"
    );
    for png in [
        "eval_loss_vs_moe_aux_loss_coef.png",
        "eval_loss_vs_moe_capacity_factor.png",
        "imbalance_vs_moe_aux_loss_coef.png",
        "eval_loss_heatmap.png",
        "eval_loss_curves.png",
        "token_share_best.png",
        "token_share_worst_balanced.png",
    ] {
        let bytes = std::fs::read(out.dir.join(png)).unwrap_or_else(|_| panic!("{png} missing"));
        assert_eq!(&bytes[1..4], b"PNG", "{png}");
    }

    // A second run without --resume is refused; with --resume the finished
    // points are skipped and a removed point is trained again.
    assert!(run_sweep(&options(&dir, &file, Search::Grid, false)).is_err());
    let kept = out.dir.join("aux=0,cf=1/metrics.jsonl");
    let before = std::fs::read(&kept).unwrap();
    let modified = std::fs::metadata(&kept).unwrap().modified().unwrap();
    std::fs::remove_dir_all(out.dir.join("aux=0.1,cf=2")).unwrap();
    let again = run_sweep(&options(&dir, &file, Search::Grid, true)).unwrap();
    assert_eq!(std::fs::read(&kept).unwrap(), before);
    assert_eq!(
        std::fs::metadata(&kept).unwrap().modified().unwrap(),
        modified
    );
    let redone = again.rows.iter().find(|r| r.id == "aux=0.1,cf=2").unwrap();
    assert_eq!((redone.status.clone(), redone.steps), (Status::Finished, 4));
}

/// With seeds, the summary adds one row per variant: its mean final eval
/// loss over the seeds and, seed by seed, its difference from the first
/// variant, each worked here from the runs' own metrics.jsonl.
#[test]
fn seeded_sweeps_compare_variants_across_seeds() {
    let dir = scratch("seeds");
    let file = setup(
        &dir,
        "name = \"seeded\"\nseeds = [3, 4]\n[set]\n\"train.steps\" = 3\n\"train.eval_every\" = 3\n[[points]]\n\"moe.num_experts\" = 0\n\"model.d_ff\" = 64\n[[points]]\n\"moe.num_experts\" = 4\n",
    );
    let out = run_sweep(&options(&dir, &file, Search::Grid, false)).unwrap();
    let loss = |id: &str| *jsonl_eval_losses(&out.dir.join(id)).last().unwrap();
    let dense = [loss("E=0,d_ff=64,seed=3"), loss("E=0,d_ff=64,seed=4")];
    let moe = [loss("E=4,seed=3"), loss("E=4,seed=4")];
    let mean = |v: [f64; 2]| (v[0] + v[1]) / 2.0;
    let diffs = [moe[0] - dense[0], moe[1] - dense[1]];
    let sd = |v: [f64; 2]| (v[0] - v[1]).abs() / std::f64::consts::SQRT_2;
    let lower = diffs.iter().filter(|d| **d < 0.0).count();
    let (first, second) = if mean(moe) < mean(dense) {
        ("num_experts=4", "num_experts=0,d_ff=64")
    } else {
        ("num_experts=0,d_ff=64", "num_experts=4")
    };

    let md = std::fs::read_to_string(out.dir.join("summary.md")).unwrap();
    let section = md
        .split("## Across seeds")
        .nth(1)
        .expect("no seeds section");
    let rows: Vec<&str> = section.lines().filter(|l| l.starts_with("| ")).collect();
    assert_eq!(rows.len(), 3, "{section}");
    assert!(
        rows[1].starts_with(&format!("| 1 | {first} | 2 |")),
        "{section}"
    );
    assert!(
        rows[2].starts_with(&format!("| 2 | {second} | 2 |")),
        "{section}"
    );
    let moe_row = rows
        .iter()
        .find(|r| r.contains("| num_experts=4 |"))
        .unwrap();
    let want = format!(
        "| {:.4} | {:.4} | {:+.4} | {:.4} | {lower} of 2 |",
        mean(moe),
        sd(moe),
        mean(diffs),
        sd(diffs)
    );
    assert!(
        moe_row.ends_with(&want),
        "{moe_row} does not end with {want}"
    );
    let dense_row = rows
        .iter()
        .find(|r| r.contains("| num_experts=0,d_ff=64 |"))
        .unwrap();
    assert!(
        dense_row.ends_with(&format!(
            "| {:.4} | {:.4} | (first) |  |  |",
            mean(dense),
            sd(dense)
        )),
        "{dense_row}"
    );
    let csv = std::fs::read_to_string(out.dir.join("summary_seeds.csv")).unwrap();
    assert_eq!(csv.lines().count(), 3, "{csv}");
}

#[test]
fn unfinished_points_resume_from_their_checkpoints() {
    let dir = scratch("partial");
    let file = setup(&dir, "name = \"p\"\n[set]\n\"train.steps\" = 6\n\"train.eval_every\" = 3\n[grid]\n\"moe.top_k\" = [1, 2]\n");
    // A point interrupted after 3 of its 6 steps (as after a kill).
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["train", "--config"])
        .arg(dir.join("base.toml"))
        .args(["--name", "k=1", "--runs-dir"])
        .arg(dir.join("runs/p"))
        .args([
            "--set",
            "train.steps=6",
            "--set",
            "train.eval_every=3",
            "--set",
            "moe.top_k=1",
            "--stop-after",
            "3",
        ])
        .args(["--set", "log.progress=\"lines\""])
        .status()
        .unwrap();
    assert!(status.success());
    let out = run_sweep(&options(&dir, &file, Search::Grid, true)).unwrap();
    let steps: Vec<u64> = std::fs::read_to_string(out.dir.join("k=1/metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("loss/total").is_some())
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=6).collect::<Vec<_>>(), "resumed, not restarted");
    assert!(out
        .rows
        .iter()
        .all(|r| r.status == Status::Finished && r.steps == 6));
}

#[test]
fn a_failing_point_is_reported_and_the_others_run() {
    let dir = scratch("fail");
    // top_k = 9 > num_experts = 4 fails validation.
    let file = setup(&dir, "name = \"f\"\n[set]\n\"train.steps\" = 2\n\"train.eval_every\" = 2\n[grid]\n\"moe.top_k\" = [1, 9, 2]\n");
    let out = run_sweep(&options(&dir, &file, Search::Grid, false)).unwrap();
    let bad = out.rows.iter().find(|r| r.id == "k=9").unwrap();
    match &bad.status {
        Status::Failed(why) => assert!(why.contains("moe.top_k"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        out.rows.last().unwrap().id,
        "k=9",
        "failed points rank last"
    );
    for id in ["k=1", "k=2"] {
        let r = out.rows.iter().find(|r| r.id == id).unwrap();
        assert_eq!((r.status.clone(), r.steps), (Status::Finished, 2), "{id}");
    }
    let csv = std::fs::read_to_string(out.dir.join("summary.csv")).unwrap();
    assert!(csv.contains("failed: "), "{csv}");

    // An unknown key stops the whole sweep at once, naming it.
    let file = setup(&dir, "name = \"g\"\n[grid]\n\"moe.top_kk\" = [1, 2]\n");
    let e = format!(
        "{:#}",
        run_sweep(&options(&dir, &file, Search::Grid, false)).unwrap_err()
    );
    assert!(e.contains("top_kk"), "{e}");
}

#[test]
fn halving_keeps_the_better_points() {
    let dir = scratch("halving");
    // Learning rates 1e-9 cannot move the weights; 1e-2 learns fast. After
    // the first budget the two high-lr points must be the survivors.
    let file = setup(
        &dir,
        "name = \"h\"\n[set]\n\"train.steps\" = 8\n\"train.eval_every\" = 100\n\"optim.warmup_steps\" = 0\n\"optim.min_lr\" = 0.0\n[grid]\n\"optim.lr\" = [1e-9, 1e-2, 2e-9, 5e-3]\n",
    );
    let out = run_sweep(&options(&dir, &file, Search::Halving, false)).unwrap();
    let status = |id: &str| out.rows.iter().find(|r| r.id == id).unwrap().clone();
    for slow in ["lr=0.000000001", "lr=0.000000002"] {
        let r = status(slow);
        assert_eq!(r.status, Status::Stopped(2), "{slow}");
        assert_eq!(r.steps, 2);
    }
    let fast = [status("lr=0.01"), status("lr=0.005")];
    let finished: Vec<_> = fast
        .iter()
        .filter(|r| r.status == Status::Finished)
        .collect();
    assert_eq!(finished.len(), 1, "one point trains in full");
    assert_eq!(finished[0].steps, 8);
    assert!(fast.iter().any(|r| r.status == Status::Stopped(4)));
    assert_eq!(
        out.rows[0].status,
        Status::Finished,
        "the full run ranks first"
    );
}
