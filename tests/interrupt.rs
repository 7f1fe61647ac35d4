//! Ctrl-C (SIGINT), SIGTERM or SIGHUP stops a training run after the step
//! under way, with a checkpoint of that step, and `--resume` continues from
//! it; so does the death of the sweep that started it.
#![cfg(unix)]

mod common;

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A run far too long to end by itself, with no checkpoint before the end
/// and one JSON line per step.
const CONFIG: &str = r#"
[model]
vocab_size = 4096
d_model = 16
n_layers = 1
n_heads = 2
n_kv_heads = 1
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
steps = 1000000
batch_size = 2
eval_every = 0
checkpoint_every = 0
[log]
progress = "json"
"#;

/// `switchyard` with SIGINT, SIGTERM and SIGHUP at their default actions, whatever
/// the test process inherited (a job started in the background by a
/// non-interactive shell ignores SIGINT, and the binary keeps an ignored
/// signal ignored).
fn switchyard() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchyard"));
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            libc::signal(libc::SIGTERM, libc::SIG_DFL);
            libc::signal(libc::SIGHUP, libc::SIG_DFL);
            Ok(())
        });
    }
    cmd.current_dir(common::here("")).env("RUST_BACKTRACE", "0");
    cmd
}

/// A `switchyard` process with its output piped, under a watchdog that
/// kills it if it is still running after two minutes, so that a run the
/// signal did not stop fails the test instead of hanging it.
struct Running {
    child: Child,
    stdout: BufReader<ChildStdout>,
    done: Arc<AtomicBool>,
}

impl Running {
    fn start(cmd: &mut Command) -> Self {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let done = Arc::new(AtomicBool::new(false));
        let (flag, pid) = (done.clone(), child.id() as i32);
        std::thread::spawn(move || {
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(120) {
                if flag.load(Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if !flag.load(Ordering::SeqCst) {
                // SAFETY: kills a child process of this test that has not
                // been waited for.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        });
        Self {
            child,
            stdout,
            done,
        }
    }

    /// Send `signal`, then read the rest of stdout and all of stderr, and
    /// wait for the process.
    fn stop(mut self, signal: libc::c_int) -> (ExitStatus, String, String) {
        // SAFETY: signals a child process this test started.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, signal) }, 0);
        let (mut out, mut err) = (String::new(), String::new());
        self.stdout.read_to_string(&mut out).unwrap();
        let mut stderr = self.child.stderr.take().unwrap();
        stderr.read_to_string(&mut err).unwrap();
        let status = self.child.wait().unwrap();
        self.done.store(true, Ordering::SeqCst);
        (status, out, err)
    }
}

/// The step of a JSON progress line.
fn step_of(line: &str) -> Option<u64> {
    serde_json::from_str::<serde_json::Value>(line)
        .ok()?
        .get("step")?
        .as_u64()
}

/// The steps a run has checkpointed.
fn checkpoints(run: &Path) -> Vec<u64> {
    let list = switchyard::checkpoint::list(run).unwrap();
    list.into_iter().map(|(step, _)| step).collect()
}

/// `switchyard train` of the endless run, its config written in `dir`, its
/// run directory `dir/runs/{name}`, on one thread.
fn endless_train(dir: &Path, name: &str) -> Command {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = dir.join("long.toml");
    std::fs::write(&cfg, CONFIG).unwrap();
    let mut cmd = switchyard();
    cmd.args(["train", "--config"])
        .arg(&cfg)
        .arg("--runs-dir")
        .arg(dir.join("runs"))
        .args(["--name", name])
        .env("RAYON_NUM_THREADS", "1");
    cmd
}

/// Read a run's progress lines until it has printed step 3 or more; the
/// last step read.
fn wait_for_steps(running: &mut Running) -> u64 {
    let mut seen = 0;
    let mut line = String::new();
    while seen < 3 && running.stdout.read_line(&mut line).unwrap() > 0 {
        seen = step_of(&line).unwrap_or(seen);
        line.clear();
    }
    assert!(seen >= 3, "the run printed no step");
    seen
}

#[test]
fn a_signal_stops_the_run_with_a_checkpoint_that_resumes() {
    let dir = common::scratch("interrupt", "run");
    let runs = dir.join("runs");
    for (signal, name) in [
        (libc::SIGINT, "int"),
        (libc::SIGTERM, "term"),
        (libc::SIGHUP, "hup"),
    ] {
        let train = |extra: &[&str]| {
            let mut cmd = endless_train(&dir, name);
            cmd.args(extra);
            cmd
        };
        let mut running = Running::start(&mut train(&[]));
        // Signal once the run has made a few steps.
        let seen = wait_for_steps(&mut running);
        let (status, out, err) = running.stop(signal);
        // An error exit, not death by the signal.
        assert_eq!(status.code(), Some(1), "{name}: {status:?}\n{err}");
        let last = out.lines().filter_map(step_of).max().unwrap_or(seen);
        assert!(
            err.contains(&format!("stopped after step {last} of 1000000"))
                && err.contains(&format!("--name {name} --resume")),
            "{name}: {err}"
        );
        let run = runs.join(name);
        assert_eq!(checkpoints(&run), [last], "{name}");

        let out = train(&["--resume", "--stop-after", "2"]).output().unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            checkpoints(&run).contains(&(last + 2)),
            "{name}: {:?}",
            checkpoints(&run)
        );
    }
}

/// A run whose stdout reader goes away (`switchyard train | head`) stops
/// after its next step with a checkpoint, instead of dying on SIGPIPE.
#[test]
fn a_closed_output_pipe_stops_the_run_with_a_checkpoint() {
    let dir = common::scratch("interrupt", "pipe");
    let mut running = Running::start(&mut endless_train(&dir, "pipe"));
    let seen = wait_for_steps(&mut running);
    // Close the read end, as `head` does when it has its lines.
    let Running {
        mut child,
        stdout,
        done,
    } = running;
    drop(stdout);
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = child.wait().unwrap();
    done.store(true, Ordering::SeqCst);
    assert_eq!(status.code(), Some(1), "{status:?}\n{err}");
    let saved = checkpoints(&dir.join("runs").join("pipe"));
    assert_eq!(saved.len(), 1, "{saved:?}\n{err}");
    assert!(saved[0] > seen, "{saved:?} after {seen}");
    assert!(
        err.contains(&format!("stopped after step {} of 1000000", saved[0])),
        "{err}"
    );
}

/// The step numbers of the JSON progress lines a sweep point logged.
fn logged_steps(train_log: &Path) -> Vec<u64> {
    std::fs::read_to_string(train_log)
        .unwrap_or_default()
        .lines()
        .filter_map(step_of)
        .collect()
}

/// A two-point sweep of the endless run, started, with the directory of
/// the first point once it has logged a few steps.
fn start_sweep(dir: &Path) -> (Running, PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let base = dir.join("long.toml");
    std::fs::write(&base, CONFIG).unwrap();
    let file = dir.join("sweep.toml");
    std::fs::write(
        &file,
        format!(
            "base = \"{}\"\nname = \"stop\"\n[grid]\n\"train.seed\" = [1, 2]\n",
            base.display()
        ),
    )
    .unwrap();
    let runs = dir.join("runs");
    let mut sweep = switchyard();
    sweep
        .args(["sweep", "--config"])
        .arg(&file)
        .arg("--runs-dir")
        .arg(&runs);
    let running = Running::start(&mut sweep);
    // Wait for the first point to log a few steps.
    let sweep_dir = runs.join("stop");
    let started = Instant::now();
    let point = loop {
        let logs: Vec<PathBuf> = std::fs::read_dir(&sweep_dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.path().join("train.log"))
                    .collect()
            })
            .unwrap_or_default();
        if let Some(l) = logs.iter().find(|l| logged_steps(l).len() >= 3) {
            break l.parent().unwrap().to_path_buf();
        }
        assert!(started.elapsed().as_secs() < 120, "no point logged a step");
        std::thread::sleep(Duration::from_millis(50));
    };
    (running, sweep_dir, point)
}

/// A SIGTERM sent to a sweep alone reaches the point under way, which
/// stops after its step with a checkpoint of it; no point starts after it.
#[test]
fn a_signal_stops_a_sweep_and_its_point() {
    let dir = common::scratch("interrupt", "sweep");
    let (running, sweep_dir, point) = start_sweep(&dir);
    let (status, out, err) = running.stop(libc::SIGTERM);
    assert_eq!(status.code(), Some(1), "{status:?}\n{out}\n{err}");
    assert!(
        err.contains("interrupted") && err.contains("--resume"),
        "{err}"
    );
    let last = *logged_steps(&point.join("train.log")).last().unwrap();
    assert!(last < 1_000_000);
    assert_eq!(checkpoints(&point), [last]);
    // The other point never started.
    let started_points = std::fs::read_dir(&sweep_dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("train.log").exists())
        .count();
    assert_eq!(started_points, 1, "{out}");
}

/// The processes whose command line mentions `needle`.
#[cfg(target_os = "linux")]
fn processes_naming(needle: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            text.contains(needle).then_some(pid)
        })
        .collect()
}

/// A sweep killed outright (SIGKILL: no handler runs) leaves no point
/// training on unwatched: the point under way checkpoints a step and ends.
#[cfg(target_os = "linux")]
#[test]
fn a_killed_sweep_leaves_its_point_checkpointed_and_stopped() {
    let dir = common::scratch("interrupt", "killed-sweep");
    let (running, _, point) = start_sweep(&dir);
    let needle = point.parent().unwrap().display().to_string();
    assert_eq!(processes_naming(&needle).len(), 1, "one point is running");
    let (status, _, _) = running.stop(libc::SIGKILL);
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    let logged = *logged_steps(&point.join("train.log")).last().unwrap();
    let started = Instant::now();
    while !processes_naming(&needle).is_empty() {
        assert!(
            started.elapsed().as_secs() < 60,
            "the point still runs a minute after its sweep was killed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // It stopped after a step at least as late as the last one the sweep
    // saw (the pipe to the sweep may have held a few more lines).
    let saved = checkpoints(&point);
    assert_eq!(saved.len(), 1, "{saved:?}");
    assert!(saved[0] >= logged, "{saved:?} after {logged}");
}
