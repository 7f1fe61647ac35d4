//! Data and expert parallelism under `mpirun -np 2` (built with
//! `--features mpi`): two ranks with half the batch each are one process
//! with the whole batch; the ranks' parameters stay identical; a resume at
//! the same world size is bit-identical; a resume at another world size
//! carries on; two ranks holding half the experts each compute what two
//! data-parallel ranks compute, with drops and dropless, with dead experts
//! revived, and with a placement from the planner that replicates the
//! busiest expert, and resume at another expert-parallel degree.

#![cfg(feature = "mpi")]

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

mod common;
use common::{here, scratch};

/// mpirun runs are heavy on two cores: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// A small model on the bundled corpus, under the settings where two ranks
/// with B/2 each compute the function of one process with B: dropless
/// routing (capacity would be per rank), balance statistics over the
/// global batch, no routing noise (the defaults), and each rank's rows cut
/// from the one global stream (`data.sharding = "rows"`).
const CONFIG: &str = r#"
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
balance_scope = "global_batch"
aux_loss_coef = 0.01
z_loss_coef = 0.001
[data]
tokenizer = "data/tokenizer.json"
shuffle_buffer = 16
[[data.sources]]
paths = ["data/shakespeare/shakespeare_complete_works.txt"]
blank_lines = 2
[train]
steps = 10
eval_every = 0
checkpoint_every = 5
keep_checkpoints = 5
[optim]
lr = 3e-3
warmup_steps = 2
# Adam divides by sqrt(v) + eps: with eps = 1e-8, a gradient element near
# 1e-8 turns the last-bit differences of another summation order into a
# visible share of a step (up to 3e-5 here after one step). 1e-6 keeps the
# two runs within f32 rounding of each other.
eps = 1e-6
[log]
progress = "lines"
"#;

fn write_config(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join("dp.toml");
    std::fs::write(&p, CONFIG).unwrap();
    p
}

/// `switchyard train` on `ranks` processes (`mpirun` when more than one).
fn launch(ranks: usize, config: &Path, runs: &Path, extra: &[&str]) -> Output {
    launch_with(ranks, config, runs, extra, &[])
}

/// [`launch`] with environment variables `vars` (`NAME=value`) set in every
/// rank.
fn launch_with(ranks: usize, config: &Path, runs: &Path, extra: &[&str], vars: &[&str]) -> Output {
    let exe = env!("CARGO_BIN_EXE_switchyard");
    let mut cmd = if ranks > 1 {
        let mut c = Command::new("mpirun");
        c.args(["--allow-run-as-root", "--oversubscribe", "-np"])
            .arg(ranks.to_string())
            .args(["-x", "RAYON_NUM_THREADS=1"]);
        for v in vars {
            c.args(["-x", v]);
        }
        c.arg(exe);
        c
    } else {
        let mut c = Command::new(exe);
        for (k, v) in vars.iter().filter_map(|v| v.split_once('=')) {
            c.env(k, v);
        }
        c
    };
    cmd.arg("train")
        .arg("--config")
        .arg(config)
        .arg("--runs-dir")
        .arg(runs)
        .args(extra)
        .current_dir(here("."))
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .expect("mpirun (Open MPI's openmpi-bin) is installed")
}

/// Train run `name` on `ranks` processes; panics with the output on failure.
fn train(ranks: usize, config: &Path, runs: &Path, name: &str, extra: &[&str]) -> String {
    train_with(ranks, config, runs, name, extra, &[])
}

/// [`train`] with environment variables `vars` (`NAME=value`) set in every
/// rank.
fn train_with(
    ranks: usize,
    config: &Path,
    runs: &Path,
    name: &str,
    extra: &[&str],
    vars: &[&str],
) -> String {
    let out = launch_with(
        ranks,
        config,
        runs,
        &[&["--name", name], extra].concat(),
        vars,
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{ranks} rank(s) failed:\n{text}");
    text
}

/// Two processes refuse to train, with a message holding every needle.
fn refused(config: &Path, runs: &Path, extra: &[&str], needles: &[&str]) {
    let out = launch(2, config, runs, extra);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{extra:?} trained");
    assert!(!text.contains("panicked at"), "{text}");
    for n in needles {
        assert!(text.contains(n), "{extra:?}: no `{n}` in\n{text}");
    }
}

/// `switchyard plan-experts` for 2 devices, one per node, over a run's 10
/// steps: its plan file, read back.
fn plan_experts(run: &Path, out: &Path, extra: &[&str]) -> Value {
    let status = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["plan-experts", "--devices", "2", "--per-node", "1"])
        .args(["--steps", "10"])
        .args(extra)
        .arg("--run")
        .arg(run)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(text.contains("| contiguous |"), "{text}");
    serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap()
}

/// The mean bytes per step a run counted in all-to-alls.
fn counted_bytes(run: &Path) -> f64 {
    let counted = series(run, "comm/alltoall_bytes");
    assert_eq!(counted.len(), 10);
    counted.iter().sum::<f64>() / counted.len() as f64
}

/// Every JSONL line of a run.
fn lines(run: &Path) -> Vec<Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// (step, total loss, grad norm) of each logged step.
fn losses(run: &Path) -> Vec<(u64, f64, f64)> {
    lines(run)
        .iter()
        .filter(|v| v.get("loss/total").is_some())
        .map(|v| {
            (
                v["step"].as_u64().unwrap(),
                v["loss/total"].as_f64().unwrap(),
                v["grad_norm"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// The checksums each checkpoint logged under `key` ("param_checksums":
/// all but the expert stacks; "expert_checksums"), one per rank.
fn checksums_of(run: &Path, key: &str) -> Vec<(u64, Vec<u64>)> {
    lines(run)
        .iter()
        .filter_map(|v| {
            let c = v.get(key)?.as_array()?;
            Some((
                v["step"].as_u64()?,
                c.iter().map(|x| x.as_u64().unwrap()).collect(),
            ))
        })
        .collect()
}

fn checksums(run: &Path) -> Vec<(u64, Vec<u64>)> {
    checksums_of(run, "param_checksums")
}

/// A run's newest checkpoint.
fn newest(run: &Path) -> PathBuf {
    switchyard::checkpoint::list(run)
        .unwrap()
        .last()
        .unwrap()
        .1
        .clone()
}

/// The weights of a run's newest checkpoint, by name.
fn weights(run: &Path) -> Vec<(String, Vec<f32>)> {
    let ckpt = newest(run);
    let device = burn::prelude::Device::flex();
    let (_, model) = switchyard::checkpoint::load_model(&ckpt, &device).unwrap();
    switchyard::params::collect(&model)
        .into_iter()
        .map(|(k, v)| (k, v.convert::<f32>().try_into_vec::<f32>().unwrap()))
        .collect()
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / a.abs().max(b.abs()).max(1e-12)
}

#[test]
fn two_ranks_with_half_the_batch_each_are_one_process_with_the_whole_batch() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("dist", "equal");
    let cfg = write_config(&dir);
    let sharding = ["--set", "data.sharding=\"rows\""];
    train(
        1,
        &cfg,
        &dir,
        "one",
        &[&sharding[..], &["--set", "train.batch_size=8"]].concat(),
    );
    train(
        2,
        &cfg,
        &dir,
        "two",
        &[&sharding[..], &["--set", "train.batch_size=4"]].concat(),
    );
    let (one, two) = (losses(&dir.join("one")), losses(&dir.join("two")));
    assert_eq!(one.len(), 10);
    same_losses(&one, &two);
    // The losses moved: ten updates happened.
    assert!(one[9].1 < one[0].1 - 0.1, "{one:?}");
    same_weights(&dir.join("one"), &dir.join("two"));
}

/// Two runs' newest checkpoints hold the same weights, each tensor to 1e-5
/// of its norm.
fn same_weights(a: &Path, b: &Path) {
    let (wa, wb) = (weights(a), weights(b));
    assert_eq!(wa.len(), wb.len());
    for ((ka, a), (kb, b)) in wa.iter().zip(&wb) {
        assert_eq!(ka, kb);
        assert_eq!(a.len(), b.len(), "{ka}");
        let norm = a.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        let diff = a
            .iter()
            .zip(b)
            .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!(
            diff <= 1e-5 * norm.max(1e-6),
            "{ka}: |a - b| = {diff}, |a| = {norm}"
        );
    }
}

/// Two runs logged the same losses and gradient norms, to 1e-5 relative.
fn same_losses(a: &[(u64, f64, f64)], b: &[(u64, f64, f64)]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.0, y.0);
        assert!(
            rel(x.1, y.1) < 1e-5,
            "step {}: loss {} vs {}",
            x.0,
            x.1,
            y.1
        );
        assert!(
            rel(x.2, y.2) < 1e-5,
            "step {}: grad norm {} vs {}",
            x.0,
            x.2,
            y.2
        );
    }
}

/// The value of `key` at every logged step.
fn series(run: &Path, key: &str) -> Vec<f64> {
    lines(run)
        .iter()
        .filter_map(|v| v.get(key)?.as_f64())
        .collect()
}

#[path = "dist/resume.rs"]
mod resume;

#[path = "dist/experts.rs"]
mod experts;
