//! Ctrl-C (SIGINT) or SIGTERM stops a training run after the step under
//! way, with a checkpoint of that step, and `--resume` continues from it.
#![cfg(unix)]

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

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

/// `switchyard` with SIGINT and SIGTERM at their default actions, whatever
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
            Ok(())
        });
    }
    cmd.current_dir(root()).env("RUST_BACKTRACE", "0");
    cmd
}

/// Kill `pid` if it is still running after two minutes, so that a run the
/// signal did not stop fails the test instead of hanging it; set the flag
/// once the process has been waited for.
fn watchdog(pid: u32) -> Arc<AtomicBool> {
    let done = Arc::new(AtomicBool::new(false));
    let flag = done.clone();
    std::thread::spawn(move || {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(120) {
            if flag.load(Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if !flag.load(Ordering::SeqCst) {
            // SAFETY: kills a child process of this test that has not been
            // waited for.
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
        }
    });
    done
}

fn checkpoints(run: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("step-"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn a_signal_stops_the_run_with_a_checkpoint_that_resumes() {
    let dir = std::env::temp_dir().join(format!("sy-interrupt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("long.toml");
    std::fs::write(&cfg, CONFIG).unwrap();
    let runs = dir.join("runs");
    for (signal, name) in [(libc::SIGINT, "int"), (libc::SIGTERM, "term")] {
        let train = |extra: &[&str]| {
            let mut cmd = switchyard();
            cmd.args(["train", "--config"])
                .arg(&cfg)
                .arg("--runs-dir")
                .arg(&runs)
                .args(["--name", name])
                .args(extra)
                .env("RAYON_NUM_THREADS", "1");
            cmd
        };
        let mut child = train(&[])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let done = watchdog(child.id());
        // Signal once the run has made a few steps.
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut seen = 0;
        for line in lines.by_ref() {
            let line = line.unwrap();
            if let Ok(serde_json::Value::Object(p)) = serde_json::from_str(&line) {
                seen = p["step"].as_u64().unwrap();
                if seen >= 3 {
                    break;
                }
            }
        }
        assert!(seen >= 3, "the run printed no step");
        // SAFETY: signals a child process this test started.
        assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
        let rest: Vec<String> = lines.map_while(Result::ok).collect();
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        let status = child.wait().unwrap();
        done.store(true, Ordering::SeqCst);
        // An error exit, not death by the signal.
        assert_eq!(status.code(), Some(1), "{name}: {status:?}\n{err}");
        let last = rest
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|p| p.get("step").and_then(|s| s.as_u64()))
            .max()
            .unwrap_or(seen);
        assert!(
            err.contains(&format!("stopped after step {last} of 1000000"))
                && err.contains(&format!("--name {name} --resume")),
            "{name}: {err}"
        );
        let run = runs.join(name);
        assert_eq!(checkpoints(&run), [format!("step-{last:07}")], "{name}");

        let out = train(&["--resume", "--stop-after", "2"]).output().unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            checkpoints(&run).contains(&format!("step-{:07}", last + 2)),
            "{name}: {:?}",
            checkpoints(&run)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The step numbers of the JSON progress lines a sweep point logged.
fn logged_steps(train_log: &std::path::Path) -> Vec<u64> {
    std::fs::read_to_string(train_log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|p| p.get("step").and_then(|s| s.as_u64()))
        .collect()
}

/// A SIGTERM sent to a sweep alone reaches the point under way, which
/// stops after its step with a checkpoint of it; no point starts after it.
#[test]
fn a_signal_stops_a_sweep_and_its_point() {
    let dir = std::env::temp_dir().join(format!("sy-interrupt-sweep-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
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
    let mut child = switchyard()
        .args(["sweep", "--config"])
        .arg(&file)
        .arg("--runs-dir")
        .arg(&runs)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let done = watchdog(child.id());
    // Wait for the first point to log a few steps.
    let sweep_dir = runs.join("stop");
    let started = std::time::Instant::now();
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
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    // SAFETY: signals a child process this test started.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = child.wait().unwrap();
    done.store(true, Ordering::SeqCst);
    assert_eq!(status.code(), Some(1), "{status:?}\n{out}\n{err}");
    assert!(
        err.contains("interrupted") && err.contains("--resume"),
        "{err}"
    );
    let last = *logged_steps(&point.join("train.log")).last().unwrap();
    assert!(last < 1_000_000);
    assert_eq!(checkpoints(&point), [format!("step-{last:07}")]);
    // The other point never started.
    let started_points = std::fs::read_dir(&sweep_dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("train.log").exists())
        .count();
    assert_eq!(started_points, 1, "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}
