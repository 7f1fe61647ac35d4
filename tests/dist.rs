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

#[test]
fn ranks_stay_identical_and_a_resume_at_the_same_world_size_is_bit_identical() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("dist", "resume");
    let cfg = write_config(&dir);
    // Each rank reads its own shard of the documents (the default), with
    // capacity drops: not one process's function, but the ranks must agree.
    let drops = [
        "--set",
        "moe.drop_policy=\"drop\"",
        "--set",
        "train.batch_size=4",
    ];
    let text = train(2, &cfg, &dir, "straight", &drops);
    assert!(text.contains("2 ranks, 8 sequences per step"), "{text}");
    train(
        2,
        &cfg,
        &dir,
        "split",
        &[&drops[..], &["--stop-after", "5"]].concat(),
    );
    train(
        2,
        &cfg,
        &dir,
        "split",
        &[&drops[..], &["--resume"]].concat(),
    );

    let straight = checksums(&dir.join("straight"));
    assert_eq!(straight.iter().map(|c| c.0).collect::<Vec<_>>(), [5, 10]);
    let experts = checksums_of(&dir.join("straight"), "expert_checksums");
    assert_eq!(experts.len(), 2);
    for (step, sums) in straight.iter().chain(&experts) {
        assert_eq!(sums.len(), 2, "step {step}");
        assert_eq!(sums[0], sums[1], "step {step}: the ranks differ");
    }
    // Bit-identical: the same losses after the resume and the same weights.
    let (a, b) = (losses(&dir.join("straight")), losses(&dir.join("split")));
    assert_eq!(a, b);
    assert_eq!(checksums(&dir.join("split")).last(), straight.last());
    // The checkpoint holds both ranks' cursors, each for its own shard.
    let ckpt = newest(&dir.join("straight"));
    let (state, _) = switchyard::checkpoint::read_state(&ckpt).unwrap();
    assert_eq!(state.rank_cursors.len(), 1);
    assert_eq!((state.cursor.shard.index, state.cursor.shard.count), (0, 2));
    assert_eq!(state.rank_cursors[0].shard.index, 1);
    assert_ne!(state.cursor.sources, state.rank_cursors[0].sources);
    // Traffic is logged: at least every gradient, in f32, each step.
    let first = &lines(&dir.join("straight"))[0];
    let bytes = first["comm/allreduce_bytes"].as_f64().unwrap();
    let params = weights(&dir.join("straight"))
        .iter()
        .map(|(_, v)| v.len())
        .sum::<usize>() as f64;
    assert!(
        bytes >= 4.0 * (params - 64.0),
        "{bytes} bytes for {params} parameters"
    );
    assert!(
        bytes < 4.0 * params + 4096.0,
        "{bytes} bytes for {params} parameters"
    );
}

#[test]
fn a_run_resumes_at_another_world_size() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("dist", "reshape");
    let cfg = write_config(&dir);
    let b = ["--set", "train.batch_size=4"];
    // Two ranks, then one process, then two again.
    train(
        2,
        &cfg,
        &dir,
        "r",
        &[&b[..], &["--stop-after", "4"]].concat(),
    );
    let text = train(
        1,
        &cfg,
        &dir,
        "r",
        &[&b[..], &["--resume", "--stop-after", "3"]].concat(),
    );
    assert!(text.contains("steps 5..10"), "{text}");
    let ckpt = newest(&dir.join("r"));
    let (state, _) = switchyard::checkpoint::read_state(&ckpt).unwrap();
    assert_eq!(state.step, 7);
    assert!(state.rank_cursors.is_empty());
    train(2, &cfg, &dir, "r", &[&b[..], &["--resume"]].concat());
    let l = losses(&dir.join("r"));
    assert_eq!(
        l.iter().map(|x| x.0).collect::<Vec<_>>(),
        (1..=10).collect::<Vec<_>>()
    );
    assert!(l.iter().all(|x| x.1.is_finite()));
    let sums = checksums(&dir.join("r"));
    let (_, last) = sums.last().unwrap();
    assert_eq!(last.len(), 2);
    assert_eq!(last[0], last[1]);
}

#[test]
fn two_ranks_holding_half_the_experts_each_equal_two_data_parallel_ranks() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("dist", "ep");
    let cfg = write_config(&dir);
    for policy in ["dropless", "drop"] {
        let set_policy = format!("moe.drop_policy=\"{policy}\"");
        let base = [
            "--set",
            "train.batch_size=4",
            "--set",
            &set_policy,
            "--set",
            "moe.capacity_factor=1.0",
            "--set",
            "train.eval_every=5",
        ];
        let (dp, ep) = (format!("dp-{policy}"), format!("ep-{policy}"));
        train(2, &cfg, &dir, &dp, &base);
        let ep_args = [&base[..], &["--set", "train.expert_parallel=2"]].concat();
        train(2, &cfg, &dir, &ep, &ep_args);
        let (dp, ep) = (dir.join(dp), dir.join(ep));
        same_losses(&losses(&dp), &losses(&ep));
        // Evaluated by every rank together, to the same loss.
        let (de, ee) = (series(&dp, "eval/loss"), series(&ep, "eval/loss"));
        assert_eq!(de.len(), 2);
        assert_eq!(ee.len(), 2);
        for (a, b) in de.iter().zip(&ee) {
            assert!(rel(*a, *b) < 1e-5, "eval loss {a} vs {b}");
        }
        // The checkpoint holds every expert, gathered in order.
        same_weights(&dp, &ep);
        let drops = series(&ep, "moe/layer0/drop_rate");
        if policy == "drop" {
            assert!(drops.iter().any(|&d| d > 0.05), "{drops:?}");
        } else {
            assert!(drops.iter().all(|&d| d == 0.0), "{drops:?}");
        }
        // Both ranks hold the same shared weights and different experts.
        for (step, sums) in checksums(&ep) {
            assert_eq!(sums[0], sums[1], "step {step}");
        }
        for (step, sums) in checksums_of(&ep, "expert_checksums") {
            assert_ne!(
                sums[0], sums[1],
                "step {step}: the ranks hold the same experts"
            );
        }
        // Rows travel only under expert parallelism.
        assert!(series(&dp, "comm/alltoall_bytes").iter().all(|&b| b == 0.0));
        assert!(series(&ep, "comm/alltoall_bytes").iter().all(|&b| b > 0.0));
    }
}

#[test]
fn an_expert_parallel_run_resumes_at_another_degree() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("dist", "ep-resume");
    let cfg = write_config(&dir);
    let b = ["--set", "train.batch_size=4"];
    let ep = [&b[..], &["--set", "train.expert_parallel=2"]].concat();
    train(2, &cfg, &dir, "straight", &ep);
    train(
        2,
        &cfg,
        &dir,
        "split",
        &[&ep[..], &["--stop-after", "5"]].concat(),
    );
    // Resumed with every expert on every rank: the same function.
    train(2, &cfg, &dir, "split", &[&b[..], &["--resume"]].concat());
    same_losses(&losses(&dir.join("straight")), &losses(&dir.join("split")));
    same_weights(&dir.join("straight"), &dir.join("split"));
}

#[test]
fn dead_experts_revive_across_an_expert_parallel_group_as_under_data_parallelism() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("dist", "ep-revive");
    let cfg = write_config(&dir);
    // No balance loss and a wide router init: experts starve within a few
    // steps, and are revived two steps after they do.
    for from in ["busiest", "init"] {
        let set_from = format!("moe.revive_from=\"{from}\"");
        let base = [
            "--set",
            "train.batch_size=4",
            "--set",
            "moe.aux_loss_coef=0.0",
            "--set",
            "moe.router_init_std=0.5",
            "--set",
            "moe.revive_dead_experts=true",
            "--set",
            &set_from,
            "--set",
            "log.dead_expert_steps=2",
            "--set",
            "optim.lr=1e-2",
        ];
        let (dp, ep) = (format!("dp-{from}"), format!("ep-{from}"));
        train(2, &cfg, &dir, &dp, &base);
        let ep_args = [&base[..], &["--set", "train.expert_parallel=2"]].concat();
        train(2, &cfg, &dir, &ep, &ep_args);
        let (dp, ep) = (dir.join(dp), dir.join(ep));
        let revivals = |run: &Path| -> Vec<(u64, u64, u64, u64)> {
            lines(run)
                .iter()
                .filter(|v| v["event"] == "revival")
                .map(|v| {
                    let n = |k: &str| v[k].as_u64().unwrap();
                    (n("step"), n("layer"), n("expert"), n("donor"))
                })
                .collect()
        };
        let (a, b) = (revivals(&dp), revivals(&ep));
        assert_eq!(a, b);
        // At least one revival copies an expert held by the other rank
        // (experts 0, 1 on rank 0; 2, 3 on rank 1).
        assert!(a.iter().any(|r| (r.2 < 2) != (r.3 < 2)), "{a:?}");
        same_losses(&losses(&dp), &losses(&ep));
        same_weights(&dp, &ep);
    }
}

/// The GPU path (the `wgpu` feature; without a GPU, Mesa's llvmpipe runs
/// it on the CPU): the rows pass through host memory between the ranks'
/// devices, and degree 2 computes what data parallelism on the same
/// devices computes.
#[cfg(feature = "wgpu")]
#[test]
fn expert_parallelism_on_the_gpu_path_equals_data_parallelism_there() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("dist", "ep-gpu");
    let cfg = write_config(&dir);
    let base = [
        "--device",
        "wgpu",
        "--set",
        "train.batch_size=4",
        "--set",
        "train.steps=4",
        "--set",
        "train.checkpoint_every=4",
    ];
    // Each rank keeps CubeCL's cache database (autotune results) in an
    // environment of its own: two ranks writing one database at once can
    // crash CubeCL.
    let env = format!("sy-dist-test-{}", std::process::id());
    let var = format!("CUBECL_ENVIRONMENT={env}");
    train_with(2, &cfg, &dir, "dp", &base, &[&var]);
    let dbs = here("target/environment");
    let made: Vec<bool> = (0..2)
        .map(|rank| dbs.join(format!("{env}-rank{rank}.db")).exists())
        .collect();
    for f in std::fs::read_dir(&dbs).into_iter().flatten().flatten() {
        if f.file_name().to_string_lossy().starts_with(&env) {
            let _ = std::fs::remove_file(f.path());
        }
    }
    assert_eq!(
        made,
        [true, true],
        "one database per rank in {}",
        dbs.display()
    );
    let ep_args = [&base[..], &["--set", "train.expert_parallel=2"]].concat();
    let text = train(2, &cfg, &dir, "ep", &ep_args);
    assert!(text.contains("device wgpu"), "{text}");
    let (dp, ep) = (dir.join("dp"), dir.join("ep"));
    assert_eq!(losses(&dp).len(), 4);
    same_losses(&losses(&dp), &losses(&ep));
    same_weights(&dp, &ep);
    assert!(series(&ep, "comm/alltoall_bytes").iter().all(|&b| b > 0.0));
}

#[test]
fn expert_parallel_settings_that_cannot_work_are_named() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("dist", "ep-bad");
    let cfg = write_config(&dir);
    for (set, needle) in [
        (
            "train.expert_parallel=3",
            "must divide the number of processes",
        ),
        ("moe.num_experts=3", "must divide moe.num_experts"),
    ] {
        let extra = ["--set", "train.expert_parallel=2", "--set", "moe.top_k=1"];
        refused(
            &cfg,
            &dir,
            &[&extra[..], &["--set", set]].concat(),
            &[needle],
        );
    }
}

#[test]
fn the_planner_predicts_the_bytes_an_expert_parallel_run_counts() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("dist", "plan");
    let cfg = write_config(&dir);
    // With evaluations, which every rank takes part in and which the
    // counters leave out.
    let args = [
        "--set",
        "train.batch_size=4",
        "--set",
        "train.expert_parallel=2",
        "--set",
        "train.eval_every=5",
    ];
    let text = train(2, &cfg, &dir, "ep", &args);
    assert!(text.contains("step 10 | eval loss"), "{text}");
    let run = dir.join("ep");
    let out = dir.join("plan.json");
    let plan = plan_experts(&run, &out, &[]);
    // The run placed its experts contiguously; rank 0 logged its bytes.
    let predicted = plan["contiguous"]["devices"][0]["inter_bytes"]
        .as_f64()
        .unwrap();
    let counted = counted_bytes(&run);
    assert!(
        rel(predicted, counted) < 1e-12,
        "predicted {predicted}, counted {counted}"
    );
    // Its layout is the run's: experts 0, 1 on device 0 and 2, 3 on device 1.
    let homes = |strategy: &str| -> Vec<u64> {
        let layer0 = &plan[strategy]["layers"][0];
        (0..4).map(|e| layer0[e][0][0].as_u64().unwrap()).collect()
    };
    assert_eq!(homes("contiguous"), [0, 0, 1, 1]);
    assert_eq!(homes("round-robin"), [0, 1, 0, 1]);

    // Trained with the round-robin placement: the same function, and the
    // bytes it counts are the planner's for that placement.
    let placement = format!("train.expert_placement=\"{}:round-robin\"", out.display());
    train(
        2,
        &cfg,
        &dir,
        "rr",
        &[&args[..], &["--set", &placement]].concat(),
    );
    let rr = dir.join("rr");
    same_losses(&losses(&run), &losses(&rr));
    same_weights(&run, &rr);
    let plan = plan_experts(&rr, &dir.join("plan-rr.json"), &[]);
    let predicted = plan["round-robin"]["devices"][0]["inter_bytes"]
        .as_f64()
        .unwrap();
    let counted = counted_bytes(&rr);
    assert!(
        rel(predicted, counted) < 1e-12,
        "predicted {predicted}, counted {counted}"
    );

    // The balanced placement with the busiest expert on both devices:
    // one rank holds three experts and the other two, and each origin's
    // rows for the busiest one are cut in half between its two copies.
    // Still the same function, with the bytes the planner predicts up to
    // the rounding of each cut (half a row per origin, replicated expert,
    // layer and exchange, each way).
    let replicated = dir.join("plan-replicated.json");
    let plan = plan_experts(&run, &replicated, &["--replicate-hottest"]);
    let layer0 = plan["balanced"]["layers"][0].as_array().unwrap();
    let copies = layer0
        .iter()
        .filter(|h| h.as_array().unwrap().len() == 2)
        .count();
    assert_eq!(copies, 1, "{layer0:?}");
    let placement = format!(
        "train.expert_placement=\"{}:balanced\"",
        replicated.display()
    );
    train(
        2,
        &cfg,
        &dir,
        "rep",
        &[&args[..], &["--set", &placement]].concat(),
    );
    let rep = dir.join("rep");
    same_losses(&losses(&run), &losses(&rep));
    same_weights(&run, &rep);
    let plan = plan_experts(&rep, &dir.join("plan-rep.json"), &["--replicate-hottest"]);
    let predicted = plan["balanced"]["devices"][0]["inter_bytes"]
        .as_f64()
        .unwrap();
    let counted = counted_bytes(&rep);
    let (layers, exchanges, row_bytes) = (2.0, 4.0, 32.0 * 4.0);
    let rounding = layers * exchanges * (0.5 + 0.5) * row_bytes;
    assert!(
        (predicted - counted).abs() <= rounding,
        "predicted {predicted}, counted {counted}"
    );

    // Placements training cannot use are refused by name.
    let bad = dir.join("plan-bad.json");
    let mut broken: Value =
        serde_json::from_str(&std::fs::read_to_string(&replicated).unwrap()).unwrap();
    let hottest = broken["balanced"]["layers"][0]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|h| h.as_array().unwrap().len() == 2)
        .unwrap();
    hottest[0][1] = serde_json::json!(0.7);
    std::fs::write(&bad, broken.to_string()).unwrap();
    for (spec, needle) in [
        (format!("{}:balanced", bad.display()), "shares sum to"),
        ("/no/such/plan.json".to_string(), "/no/such/plan.json"),
    ] {
        let set = format!("train.expert_placement=\"{spec}\"");
        let extra = [&args[..], &["--set", &set]].concat();
        refused(&cfg, &dir, &extra, &["train.expert_placement", needle]);
    }
}
