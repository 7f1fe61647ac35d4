//! The training loop. [`Trainer::start`] sets a run up: config → run
//! directory → model and optimizer (fresh, from `init_from`, or from the
//! newest intact checkpoint) → tokenizer → data stream → sinks.
//! [`Trainer::run`] then repeats, top to bottom: one optimizer step
//! ([`step::train_step`]: micro-batches, backward, norm, one host read,
//! update) → the non-finite policy → evaluation → TensorBoard / JSONL /
//! console / alerts → checkpoint.
//!
//! In a run of several processes (`mpirun`, see [`crate::dist`]) every rank
//! runs this same loop on its own part of the data; the step averages the
//! gradients over the ranks, rank 0 alone evaluates and writes logs and
//! checkpoints, and every checkpoint checks that the ranks' parameters are
//! still identical.

mod device;
mod device_limits;
pub mod eval;
pub mod interrupt;
mod memory;
pub mod optim;
mod parallel;
mod reading;
pub mod revive;
mod saving;
mod setup;
mod start;
pub mod step;

pub use device::{check_precision, parse_device};
pub use device_limits::check_memory;
pub use memory::step_memory_floor;

use crate::checkpoint::TrainState;
use crate::config::{NonFinitePolicy, RunConfig};
use crate::data::ranks::RankStream;
use crate::dist::{Collective, ExpertParallel, Single, World};
use crate::metrics::console::{self, format_secs, Progress};
use crate::metrics::domains::write_maps;
use crate::metrics::tensorboard::text;
use crate::metrics::tensorboard::EventWriter;
use crate::metrics::{JsonlWriter, StepReport};
use crate::model::LanguageModel;
use anyhow::{bail, Context, Result};
use burn::module::Module;
use burn::prelude::*;
use optim::{learning_rate, AdamW};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use step::BatchTensors;
use tokenizers::Tokenizer;

/// How `switchyard train` was invoked.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The TOML config.
    pub config: PathBuf,
    /// `--set key=value` overrides.
    pub overrides: Vec<String>,
    /// Run name; default: the config file's stem (with a numeric suffix if taken).
    pub name: Option<String>,
    /// Continue the named run from its last checkpoint.
    pub resume: bool,
    /// `flex`, `wgpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// Parent of run directories.
    pub runs_dir: PathBuf,
    /// Stop after this many steps in this invocation (with a checkpoint),
    /// leaving the schedule as if the run continued: for time-sliced jobs.
    pub stop_after: Option<u64>,
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// The run directory.
    pub run_dir: PathBuf,
    /// Last optimizer step.
    pub final_step: u64,
    /// Total loss of every step run by this invocation, in order.
    pub losses: Vec<f64>,
    /// Last validation loss.
    pub eval_loss: Option<f64>,
}

/// Run (or resume) training in this process alone.
pub fn run(opts: &RunOptions) -> Result<RunOutcome> {
    run_in(opts, &mut Single)
}

/// Run (or resume) training as one rank of `comm`'s world.
pub fn run_in(opts: &RunOptions, comm: &mut dyn Collective) -> Result<RunOutcome> {
    Trainer::start(opts, comm)?.run()
}

/// Where the writing rank logs: JSONL, TensorBoard and the console.
struct Sinks {
    jsonl: JsonlWriter,
    tb: EventWriter,
    progress: Progress,
}

/// A run in progress: the model, its optimizer and loop state, the data,
/// and the sinks the loop writes to.
pub struct Trainer<'c> {
    cfg: RunConfig,
    /// The other ranks of the run (a world of one for a single process).
    comm: &'c mut dyn Collective,
    world: World,
    /// Under `train.expert_parallel` > 1: this rank's expert group.
    ep: Option<ExpertParallel>,
    run_dir: PathBuf,
    runs_dir: PathBuf,
    /// The autodiff device the model lives on.
    device: Device,
    /// The same device without autodiff (evaluation).
    base_device: Device,
    /// Taken out for the length of each update, which consumes it.
    model: Option<LanguageModel>,
    adam: AdamW,
    state: TrainState,
    tok: Arc<Tokenizer>,
    tok_path: PathBuf,
    train_stream: RankStream,
    /// Rank 0's; none on the other ranks.
    sinks: Option<Sinks>,
    /// Last step of this invocation (`--stop-after`), at most train.steps.
    stop_at: u64,
    first_step: u64,
    losses: Vec<f64>,
    eval_loss: Option<f64>,
    started: Instant,
}

impl<'c> Trainer<'c> {
    /// Train to the last step of this invocation.
    pub fn run(mut self) -> Result<RunOutcome> {
        let signals = (self.world.size == 1).then(interrupt::StopOnSignal::install);
        if signals.is_some() {
            interrupt::survive_closed_output();
        }
        let mut interrupted = false;
        while self.state.step < self.stop_at {
            let mut report = self.train_one_step()?;
            if signals.is_some() && interrupt::requested() && self.state.step < self.stop_at {
                // Ctrl-C or SIGTERM: this step is the last, checkpointed
                // below, without the evaluation it may have been due (a
                // signal during the last step lets the run end as usual).
                interrupted = true;
                self.stop_at = self.state.step;
            }
            // Rank 0 evaluates; under expert parallelism every rank takes
            // part (the experts are spread over them) and rank 0 logs.
            if !interrupted && self.eval_due() && (self.world.is_writer() || self.ep.is_some()) {
                let eval = self.evaluate()?;
                if let Some(ep) = &self.ep {
                    // The comm/ counters are the training step's.
                    ep.link.take_traffic();
                }
                report.eval_loss = Some(eval.loss);
                report.eval_experts = eval.experts;
                if eval.domains.names.len() >= 2 {
                    report.eval_domains = Some(eval.domains);
                }
            }
            self.log(&report)?;
            if signals.is_some()
                && self
                    .sinks
                    .as_ref()
                    .is_some_and(|s| s.progress.output_lost())
            {
                // stdout's reader is gone: stop after the next step, as
                // for a signal.
                interrupt::request();
            }
            if self.checkpoint_due() {
                self.save_checkpoint()?;
            }
        }
        let outcome = if interrupted {
            let stopped = interrupt::stopped(self.state.step, self.cfg.train.steps, &self.run_dir);
            self.finish().and(Err(stopped))
        } else {
            self.finish()
        };
        drop(signals);
        outcome
    }

    fn model(&self) -> &LanguageModel {
        self.model
            .as_ref()
            .expect("the model is back after each update")
    }

    /// One optimizer step on the next `grad_accum` batches, and what the
    /// non-finite policy says about it.
    fn train_one_step(&mut self) -> Result<StepReport> {
        let clock = Instant::now();
        let step = self.state.step; // 0-based index of this step
        let lr = learning_rate(&self.cfg.optim, step, self.cfg.train.steps);
        let mut batches = Vec::with_capacity(self.cfg.train.grad_accum);
        let mut tokens = 0usize;
        for _ in 0..self.cfg.train.grad_accum {
            let batch = self
                .train_stream
                .next_batch()?
                .context("the training stream ended")?;
            tokens += batch.num_tokens();
            batches.push(BatchTensors::new(&batch, &self.device));
        }
        let mut model = self
            .model
            .take()
            .expect("the model is back after each update");
        for r in std::mem::take(&mut self.state.pending_revivals) {
            model = revive::apply(model, &mut self.adam, &self.cfg, step, &r, &self.device);
            revive::forget_dead_run(&mut self.state.monitor, &r);
            self.state.revivals += 1;
            let what = r.describe(self.cfg.moe.revive_from);
            if let Some(s) = &mut self.sinks {
                s.progress
                    .println(&format!("revival (step {}): {what}", step + 1));
                s.jsonl.write(&r.json(step + 1))?;
                s.tb.write_summary(step as i64 + 1, vec![text("moe/revivals", &what)])?;
            }
        }
        let (model, outcome) = step::train_step(
            model,
            &mut self.adam,
            &self.cfg,
            step,
            lr,
            &batches,
            &mut *self.comm,
            self.ep.as_mut(),
        );
        self.model = Some(model);
        let (tokens, comm) = if self.world.size > 1 {
            let mut n = [tokens as f64];
            self.comm.all_reduce_sum_f64(&mut n);
            let mut traffic = self.comm.take_traffic();
            if let Some(ep) = &mut self.ep {
                traffic += ep.link.take_traffic();
                traffic += ep.replicas.take_traffic();
            }
            (n[0] as usize, Some(traffic))
        } else {
            (tokens, None)
        };
        let r = outcome.reading;
        if outcome.applied {
            self.state.consecutive_bad = 0;
        } else {
            self.state.bad_steps += 1;
            self.state.consecutive_bad += 1;
            let what = format!(
                "non-finite loss or gradient norm at step {} (loss {}, grad norm {})",
                step + 1,
                r.total,
                r.grad_norm
            );
            match self.cfg.train.on_nonfinite {
                NonFinitePolicy::Stop => bail!("{what}; stopping (train.on_nonfinite = \"stop\")"),
                NonFinitePolicy::Skip
                    if self.state.consecutive_bad >= self.cfg.train.max_bad_steps =>
                {
                    bail!(
                        "{what}: {} consecutive bad steps (train.max_bad_steps); stopping",
                        self.state.consecutive_bad
                    )
                }
                NonFinitePolicy::Skip => {
                    if let Some(s) = &self.sinks {
                        s.progress
                            .println(&format!("warning: {what}; update skipped"))
                    }
                }
            }
        }
        self.state.step += 1;
        self.state.adam_t = self.adam.t;
        self.state.tokens_seen += tokens as u64;
        self.losses.push(r.total);
        Ok(StepReport {
            step: self.state.step,
            loss_total: r.total,
            loss_lm: r.lm,
            loss_aux: r.aux,
            loss_seq_aux: r.seq_aux,
            loss_z: r.z,
            lr,
            grad_norm: r.grad_norm,
            tokens_per_s: tokens as f64 / clock.elapsed().as_secs_f64(),
            skipped: !outcome.applied,
            layers: r.layers,
            eval_loss: None,
            eval_experts: Vec::new(),
            eval_domains: None,
            comm,
        })
    }

    /// Every `eval_every` steps, at the last step, and at a `--stop-after`
    /// boundary (so a search can rank partial runs).
    fn eval_due(&self) -> bool {
        let step = self.state.step;
        self.cfg.train.eval_every > 0
            && (step.is_multiple_of(self.cfg.train.eval_every)
                || step == self.cfg.train.steps
                || step == self.stop_at)
    }

    /// The validation loss of the current weights.
    fn evaluate(&mut self) -> Result<eval::EvalReport> {
        let report = eval::evaluate(
            &self.model().valid(),
            &self.cfg,
            self.tok.clone(),
            &self.base_device,
            self.cfg.train.eval_batches,
        )?;
        self.eval_loss = Some(report.loss);
        Ok(report)
    }

    /// One step to every sink: TensorBoard, JSONL, collapse alerts, console.
    /// Every rank keeps the collapse monitor (revivals must agree); rank 0
    /// writes.
    fn log(&mut self, report: &StepReport) -> Result<()> {
        let log = &self.cfg.log;
        let alerts = self.state.monitor.update(report, log);
        if self.cfg.moe.revive_dead_experts {
            self.state.pending_revivals = revive::decide(&self.state.monitor, report, log);
        }
        let Some(s) = &mut self.sinks else {
            return Ok(());
        };
        if let Some(domains) = &report.eval_domains {
            let images = write_maps(&self.run_dir.join("domains"), report.step, domains)?;
            s.tb.write_summary(report.step as i64, images)?;
        }
        s.tb.write_summary(report.step as i64, report.summary_values(log))?;
        s.jsonl.write(&report.json(log))?;
        for alert in alerts {
            s.progress
                .println(&format!("alert (step {}): {}", alert.step, alert.message));
            s.jsonl.write(&alert.json())?;
        }
        if let Some(l) = report.eval_loss {
            s.progress.println(&format!(
                "step {} | eval loss {l:.4} | ppl {:.2}",
                report.step,
                l.exp()
            ));
        }
        s.progress.step(report);
        Ok(())
    }

    /// Close the sinks and report.
    fn finish(mut self) -> Result<RunOutcome> {
        let Some(s) = &mut self.sinks else {
            return Ok(RunOutcome {
                run_dir: self.run_dir,
                final_step: self.state.step,
                losses: self.losses,
                eval_loss: None,
            });
        };
        s.progress.finish();
        s.jsonl.flush()?;
        if self.state.step == self.cfg.train.steps {
            s.tb.write_hparams_end(true)?;
        }
        let skipped = self.train_stream.bad_records_skipped();
        console::say(&format!(
            "done: {} steps in {} | final loss {:.4}{}{}{}",
            self.state.step - self.first_step,
            format_secs(self.started.elapsed().as_secs_f64()),
            self.losses.last().copied().unwrap_or(f64::NAN),
            self.eval_loss
                .map(|l| format!(" | eval loss {l:.4} (ppl {:.2})", l.exp()))
                .unwrap_or_default(),
            if self.state.bad_steps > 0 {
                format!(" | {} non-finite steps skipped", self.state.bad_steps)
            } else {
                String::new()
            },
            if skipped > 0 {
                format!(" | {skipped} bad corpus records skipped")
            } else {
                String::new()
            },
        ));
        console::say(&format!(
            "logs: tensorboard --logdir {}",
            self.runs_dir.display()
        ));
        Ok(RunOutcome {
            run_dir: self.run_dir,
            final_step: self.state.step,
            losses: self.losses,
            eval_loss: self.eval_loss,
        })
    }
}
