//! Running a sweep: every point is an ordinary `switchyard train` in its own
//! process (`runs/<sweep>/<point-id>/`), so points cannot disturb each
//! other's seeded randomness, and a crash fails one point, not the sweep.
//! `--jobs N` runs N at a time and divides the cores among them
//! (`RAYON_NUM_THREADS` and `data.workers`).
//!
//! `--search halving` is successive halving (Jamieson & Talwalkar 2016):
//! every point trains to a first budget, the better half by validation loss
//! continues to twice the budget, and so on until one point trains in full.
//! The learning-rate schedule is that of the full run throughout, so a
//! survivor's curve is exactly the one a full run would have drawn.
//!
//! Ctrl-C or SIGTERM stops the sweep: no point starts after it, each point
//! under way is passed a SIGTERM (it gets the terminal's Ctrl-C itself) and
//! stops after its current step with a checkpoint, and `--resume` carries
//! on from there.

pub use super::halving::{halve, halving_budgets};
use super::points::{pass_on_stop, stop_with_parent};
use super::summary::{self, PointResult, Status};
use super::{Point, Sweep};
use crate::checkpoint;
use crate::train::interrupt::{self, StopOnSignal};
use anyhow::{bail, Context, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

/// Grid (every point in full) or successive halving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Search {
    /// Train every point for all its steps.
    Grid,
    /// Successive halving over the points.
    Halving,
}

/// How a sweep is run.
#[derive(Debug, Clone)]
pub struct SweepOptions {
    /// The sweep file.
    pub file: PathBuf,
    /// Points run at once.
    pub jobs: usize,
    /// Skip finished points and continue unfinished ones.
    pub resume: bool,
    /// Grid or halving.
    pub search: Search,
    /// The `switchyard` executable that trains each point.
    pub exe: PathBuf,
    /// Parent of run directories.
    pub runs_dir: PathBuf,
    /// Draw progress bars (else plain lines).
    pub bars: bool,
}

/// What a finished sweep reports.
#[derive(Debug, Clone)]
pub struct SweepOutcome {
    /// `runs/<sweep>`.
    pub dir: PathBuf,
    /// Rows, ranked by final eval loss.
    pub rows: Vec<PointResult>,
    /// PNG files written.
    pub plots: Vec<PathBuf>,
}

struct Runner<'a> {
    sweep: &'a Sweep,
    opts: &'a SweepOptions,
    dir: PathBuf,
    threads: usize,
    multi: MultiProgress,
    overall: ProgressBar,
    log: Mutex<()>,
}

impl Runner<'_> {
    fn say(&self, line: &str) {
        let _g = self.log.lock();
        if self.opts.bars {
            self.multi.println(line).ok();
        } else {
            println!("{line}");
        }
    }

    /// Train one point up to `until` steps (None: all), resuming if it has a checkpoint.
    fn train_point(&self, p: &Point, steps: u64, until: Option<u64>) -> Result<(), String> {
        let run_dir = self.dir.join(&p.id);
        let done = checkpoint::list(&run_dir)
            .map_err(|e| e.to_string())?
            .last()
            .map_or(0, |c| c.0);
        let target = until.unwrap_or(steps).min(steps);
        if done >= target {
            return Ok(());
        }
        let mut cmd = Command::new(&self.opts.exe);
        cmd.arg("train")
            .arg("--config")
            .arg(&self.sweep.base)
            .arg("--name")
            .arg(&p.id)
            .arg("--runs-dir")
            .arg(&self.dir);
        for o in self.sweep.common.iter().chain(p.overrides().iter()) {
            cmd.arg("--set").arg(o);
        }
        cmd.arg("--set")
            .arg(format!("data.workers={}", self.threads));
        // One JSON object per step on stdout drives the point's bar.
        cmd.arg("--set").arg("log.progress=\"json\"");
        if done > 0 {
            cmd.arg("--resume");
        }
        if target < steps {
            cmd.arg("--stop-after").arg((target - done).to_string());
        }
        cmd.env("RAYON_NUM_THREADS", self.threads.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        stop_with_parent(&mut cmd);
        std::fs::create_dir_all(&run_dir).map_err(|e| e.to_string())?;
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("starting {}: {e}", self.opts.exe.display()))?;
        let bar = self.multi.add(ProgressBar::new(target));
        bar.set_style(
            ProgressStyle::with_template("  {prefix:30!} [{bar:25}] {pos}/{len} {msg}")
                .unwrap()
                .progress_chars("=> "),
        );
        bar.set_prefix(p.id.clone());
        bar.set_position(done);
        if !self.opts.bars {
            bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(run_dir.join("train.log"))
            .map_err(|e| e.to_string())?;
        let stderr = child.stderr.take().unwrap();
        let err_thread = std::thread::spawn(move || {
            BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
                .collect::<Vec<_>>()
        });
        let mut passed_on = false;
        for line in BufReader::new(child.stdout.take().unwrap())
            .lines()
            .map_while(Result::ok)
        {
            if interrupt::requested() && !passed_on {
                // A SIGTERM sent to the sweep alone reaches the point this
                // way; the point checkpoints its step and stops.
                pass_on_stop(&child);
                passed_on = true;
            }
            let _ = writeln!(log, "{line}");
            // {"step": 12, "loss": ...} lines drive the point's bar.
            let Ok(serde_json::Value::Object(p)) = serde_json::from_str(&line) else {
                continue;
            };
            if let Some(n) = p.get("step").and_then(|v| v.as_u64()) {
                bar.set_position(n);
            }
            if let Some(loss) = p.get("loss").and_then(|v| v.as_f64()) {
                bar.set_message(format!("loss {loss:.4}"));
            }
        }
        let status = child.wait().map_err(|e| e.to_string())?;
        let errors = err_thread.join().unwrap_or_default();
        for l in &errors {
            let _ = writeln!(log, "{l}");
        }
        bar.finish_and_clear();
        if status.success() {
            Ok(())
        } else {
            let why = errors
                .iter()
                .rev()
                .find(|l| l.starts_with("Error:"))
                .or(errors.iter().rev().find(|l| !l.trim().is_empty()))
                .cloned()
                .unwrap_or_else(|| format!("exited with {status}"));
            Err(why.trim_start_matches("Error:").trim().to_string())
        }
    }

    /// Train `points` (indices) up to `until`, N at a time; returns failures.
    fn run_all(&self, idx: &[usize], steps: &[u64], until: Option<u64>) -> Vec<(usize, String)> {
        let next = Mutex::new(idx.iter().copied());
        let failed = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for _ in 0..self.opts.jobs.min(idx.len()).max(1) {
                s.spawn(|| loop {
                    if interrupt::requested() {
                        break;
                    }
                    let Some(i) = next.lock().unwrap().next() else {
                        break;
                    };
                    let p = &self.sweep.points[i];
                    match self.train_point(p, steps[i], until) {
                        Ok(()) => self.say(&format!("point {} done", p.id)),
                        Err(why) => {
                            self.say(&format!("point {} failed: {why}", p.id));
                            failed.lock().unwrap().push((i, why));
                        }
                    }
                    if until.is_none() {
                        self.overall.inc(1);
                    }
                });
            }
        });
        failed.into_inner().unwrap()
    }
}

/// The error a stopped sweep ends with.
fn interrupted(opts: &SweepOptions) -> anyhow::Error {
    anyhow::anyhow!(
        "interrupted: the points under way stopped after their current step with a \
         checkpoint; continue with `switchyard sweep --config {} --runs-dir {} --resume`",
        opts.file.display(),
        opts.runs_dir.display()
    )
}

/// Last validation loss in a run's metrics, if any.
fn last_eval(run_dir: &Path) -> Option<f64> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .ok()?
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v.get("eval/loss").and_then(|e| e.as_f64()))
        .next_back()
}

/// Run a sweep to the end and write its summary and plots.
pub fn run_sweep(opts: &SweepOptions) -> Result<SweepOutcome> {
    let sweep = Sweep::load(&opts.file)?;
    let dir = opts.runs_dir.join(&sweep.file.name);
    if dir.exists() && !opts.resume && sweep.points.iter().any(|p| dir.join(&p.id).exists()) {
        bail!(
            "{} already holds this sweep: pass --resume to continue it",
            dir.display()
        );
    }
    std::fs::create_dir_all(&dir)?;
    std::fs::copy(&opts.file, dir.join("sweep.toml")).context("copying the sweep file")?;
    let _signals = StopOnSignal::install();

    // Validate every point up front; an invalid one is a failed point, not a stopped sweep.
    let mut failures: Vec<Option<String>> = vec![None; sweep.points.len()];
    let mut steps = vec![0u64; sweep.points.len()];
    for (i, p) in sweep.points.iter().enumerate() {
        match sweep.point_config(p) {
            Ok(cfg) => steps[i] = cfg.train.steps,
            Err(why) => failures[i] = Some(why),
        }
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let jobs = opts.jobs.max(1);
    let multi = MultiProgress::new();
    if !opts.bars {
        multi.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let overall = multi.add(ProgressBar::new(sweep.points.len() as u64));
    overall.set_style(
        ProgressStyle::with_template("sweep {msg} [{bar:30}] {pos}/{len} points (eta {eta})")
            .unwrap(),
    );
    overall.set_message(sweep.file.name.clone());
    let runner = Runner {
        sweep: &sweep,
        opts,
        dir: dir.clone(),
        threads: (cores / jobs).max(1),
        multi,
        overall,
        log: Mutex::new(()),
    };
    runner.say(&format!(
        "sweep {}: {} points, {} at a time, {} thread(s) each -> {}",
        sweep.file.name,
        sweep.points.len(),
        jobs,
        runner.threads,
        dir.display()
    ));
    for (i, f) in failures.iter().enumerate() {
        if let Some(why) = f {
            runner.say(&format!("point {} is invalid: {why}", sweep.points[i].id));
            runner.overall.inc(1);
        }
    }
    let valid: Vec<usize> = (0..sweep.points.len())
        .filter(|&i| failures[i].is_none())
        .collect();
    let mut stopped: Vec<Option<u64>> = vec![None; sweep.points.len()];
    match opts.search {
        Search::Grid => {
            for (i, why) in runner.run_all(&valid, &steps, None) {
                failures[i] = Some(why);
            }
            if interrupt::requested() {
                return Err(interrupted(opts));
            }
        }
        Search::Halving => {
            let total = valid.iter().map(|&i| steps[i]).max().unwrap_or(0);
            let mut alive = valid.clone();
            let budgets = halving_budgets(alive.len(), total);
            for (r, &budget) in budgets.iter().enumerate() {
                let last = r + 1 == budgets.len();
                runner.say(&format!(
                    "halving rung {}: {} point(s) to step {budget}",
                    r + 1,
                    alive.len()
                ));
                for (i, why) in runner.run_all(&alive, &steps, (!last).then_some(budget)) {
                    failures[i] = Some(why);
                }
                if interrupt::requested() {
                    return Err(interrupted(opts));
                }
                alive.retain(|&i| failures[i].is_none());
                if last {
                    break;
                }
                let scores: Vec<(usize, Option<f64>)> = alive
                    .iter()
                    .map(|&i| (i, last_eval(&dir.join(&sweep.points[i].id))))
                    .collect();
                let keep = halve(&scores);
                for &i in &alive {
                    if !keep.contains(&i) {
                        stopped[i] = Some(budget);
                        runner.overall.inc(1);
                        runner.say(&format!(
                            "point {} stops at step {budget}",
                            sweep.points[i].id
                        ));
                    }
                }
                alive = keep;
            }
        }
    }
    runner.overall.finish_and_clear();

    let mut rows = Vec::new();
    for (i, p) in sweep.points.iter().enumerate() {
        let status = match (&failures[i], stopped[i]) {
            (Some(why), _) => Status::Failed(why.clone()),
            (None, Some(step)) => Status::Stopped(step),
            (None, None) => Status::Finished,
        };
        rows.push(summary::read_point(p, &dir.join(&p.id), status)?);
    }
    let plots = super::plots::write_all(&dir, &sweep.axes, &rows)?;
    let across_seeds = super::seeds::write(&dir, &super::seeds::across_seeds(&rows))?;
    summary::rank(&mut rows);
    summary::write(&dir, &sweep.axes, &rows, &across_seeds)?;
    Ok(SweepOutcome { dir, rows, plots })
}
