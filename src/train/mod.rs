//! The training loop, top to bottom:
//!
//! config → run directory → tokenizer, model, optimizer (fresh, from
//! `init_from`, or from the last checkpoint) → for each step: micro-batches
//! (forward, loss, backward, accumulate) → global grad norm → one batched
//! host read → non-finite check → AdamW update → aux-free bias update →
//! evaluation → TensorBoard / JSONL / console / alerts → checkpoint.

pub mod eval;
pub mod optim;
mod setup;
pub mod step;

pub use setup::{check_precision, parse_device};
use setup::{hparams, init_from, pick_run_dir, step_seed};

use crate::checkpoint::{self, Checkpoint, SaveOptions, TrainState};
use crate::config::{NonFinitePolicy, RunConfig};
use crate::data::stream::{DataStream, Split, StreamOptions};
use crate::data::tokenizer;
use crate::metrics::console::{format_secs, Progress};
use crate::metrics::tensorboard::EventWriter;
use crate::metrics::{CollapseMonitor, JsonlWriter, StepReport};
use crate::model::LanguageModel;
use anyhow::{bail, Context, Result};
use burn::module::Module;
use burn::optim::GradientsAccumulator;
use burn::prelude::*;
use optim::{grad_sq_norm, learning_rate, AdamW};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use step::BatchTensors;

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

/// Run (or resume) training.
pub fn run(opts: &RunOptions) -> Result<RunOutcome> {
    let mut cfg = RunConfig::load(&opts.config, &opts.overrides)?;
    let run_dir = pick_run_dir(opts)?;
    let base_device = parse_device(&opts.device)?;
    check_precision(&base_device, &opts.device, cfg.train.precision)?;
    let device = base_device.clone().autodiff();

    // Resume state, if any.
    let resume = if opts.resume {
        // The newest checkpoint whose files still match their checksums.
        let Some((dir, damaged)) = checkpoint::newest_intact(&run_dir)? else {
            bail!(
                "--resume: {} has no complete checkpoint to resume from",
                run_dir.display()
            );
        };
        for warning in damaged {
            eprintln!("warning: {warning}");
        }
        let removed = checkpoint::clean_interrupted(&run_dir)?;
        if removed > 0 {
            println!("removed {removed} unfinished checkpoint write(s)");
        }
        let saved = checkpoint::read_config(&dir)?;
        let diff = saved.architecture_diff(&cfg);
        if !diff.is_empty() && cfg.train.init_from.is_none() {
            bail!(
                "cannot resume {}: architecture keys differ from the checkpoint:\n  {}",
                run_dir.display(),
                diff.join("\n  ")
            );
        }
        // Keep the checkpoint's resolved architecture (e.g. one adopted from init_from).
        cfg.model = saved.model.clone();
        cfg.data.tokenizer = saved.data.tokenizer.clone();
        Some(dir)
    } else {
        None
    };

    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    device.seed(cfg.train.seed);
    let mut model = match (&resume, cfg.train.init_from.clone()) {
        // Architecture from the checkpoint, routing knobs from this invocation.
        (Some(dir), _) => {
            checkpoint::load_weights(dir, LanguageModel::unloaded(&cfg.model, &cfg.moe, &device))?
        }
        (None, Some(src)) => init_from(&mut cfg, Path::new(&src), &device)?,
        (None, None) => LanguageModel::new(&cfg.model, &cfg.moe, cfg.train.seed, &device),
    }
    .with_precision(cfg.train.precision);
    std::fs::write(run_dir.join("config.toml"), cfg.to_toml())?;

    let tok_path = PathBuf::from(&cfg.data.tokenizer);
    let tok = Arc::new(tokenizer::load(&tok_path)?);
    let vocab = tok.get_vocab_size(true);
    if vocab > cfg.model.vocab_size {
        bail!(
            "the tokenizer {} has {vocab} tokens but model.vocab_size is {}: raise model.vocab_size",
            tok_path.display(),
            cfg.model.vocab_size
        );
    }

    let (mut state, mut adam) = match &resume {
        Some(dir) => {
            let (state, tensors) = checkpoint::read_state(dir)?;
            let mut adam = AdamW {
                t: state.adam_t,
                ..AdamW::default()
            };
            for (name, data) in tensors {
                let n = data.num_elements();
                let t = Tensor::<1>::from_data(
                    TensorData::new(
                        data.try_to_vec::<f32>()
                            .map_err(|e| anyhow::anyhow!("{name}: {e:?}"))?,
                        [n],
                    ),
                    &base_device,
                );
                if let Some(p) = name.strip_prefix("m.") {
                    adam.m.insert(p.to_string(), t);
                } else if let Some(p) = name.strip_prefix("v.") {
                    adam.v.insert(p.to_string(), t);
                }
            }
            (state, adam)
        }
        None => (
            TrainState {
                step: 0,
                adam_t: 0,
                cursor: crate::data::stream::Cursor {
                    seq_len: cfg.model.seq_len,
                    split: Split::Train,
                    sources: Vec::new(),
                    active: None,
                    window: Vec::new(),
                    shuffle: Vec::new(),
                    rng: crate::data::stream::SplitMix64(cfg.train.seed),
                    batches: 0,
                },
                monitor: CollapseMonitor::default(),
                bad_steps: 0,
                consecutive_bad: 0,
                tokens_seen: 0,
                files: BTreeMap::new(),
            },
            AdamW::default(),
        ),
    };
    let stream_opts = |split| StreamOptions {
        seq_len: cfg.model.seq_len,
        batch_size: cfg.train.batch_size,
        split,
        seed: cfg.train.seed,
    };
    let mut train_stream = DataStream::open(
        &cfg.data,
        tok.clone(),
        stream_opts(Split::Train),
        resume.as_ref().map(|_| state.cursor.clone()),
    )?;

    // Sinks. On resume, metrics after the checkpoint are dropped from the JSONL
    // so the file holds each step once.
    let jsonl_path = run_dir.join("metrics.jsonl");
    if resume.is_some() && jsonl_path.exists() {
        let kept: Vec<String> = std::fs::read_to_string(&jsonl_path)?
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                    .is_some_and(|s| s <= state.step)
            })
            .map(String::from)
            .collect();
        std::fs::write(
            &jsonl_path,
            kept.iter().map(|l| format!("{l}\n")).collect::<String>(),
        )?;
    }
    let mut jsonl = JsonlWriter::open(&jsonl_path)?;
    let mut tb = EventWriter::create(&run_dir)?;
    tb.write_hparams(hparams(&cfg), "")?;

    let total_steps = cfg.train.steps;
    let first = state.step;
    println!(
        "run {} | {} parameters | {} MoE layers | steps {}..{} | device {}",
        run_dir.display(),
        model.num_params(),
        model.moe_layers().count(),
        first + 1,
        total_steps,
        opts.device
    );
    let mut progress = Progress::new(cfg.log.progress, total_steps, first, cfg.log.print_every);
    let mut losses = Vec::new();
    let mut eval_loss = None;
    let started = Instant::now();

    let stop_at = opts
        .stop_after
        .map_or(total_steps, |n| (first + n).min(total_steps));
    while state.step < stop_at {
        let step_start = Instant::now();
        let step = state.step; // 0-based index of this step
        let lr = learning_rate(&cfg.optim, step, total_steps);

        // Micro-batches: forward, loss, backward, accumulate.
        let mut acc = GradientsAccumulator::new();
        let mut terms = Vec::new();
        let mut stats = Vec::new();
        let mut tokens = 0usize;
        for micro in 0..cfg.train.grad_accum {
            let batch = train_stream
                .next_batch()?
                .context("the training stream ended")?;
            tokens += batch.num_tokens();
            let bt = BatchTensors::new(&batch, &device);
            device.seed(step_seed(cfg.train.seed, step, micro));
            let (grads, loss, micro_stats) = step::backward(&model, &bt, &cfg);
            acc.accumulate(&model, grads);
            stats.push(micro_stats);
            terms.push(loss);
        }
        let grads = acc.grads();
        let sq_norm = grad_sq_norm(&model, &grads, &base_device);
        // The one host read of this step.
        let reading = step::read_step(&model, &terms, &stats, sq_norm.clone());
        let (total, grad_norm) = (reading.total, reading.grad_norm);
        let layers = reading.layers;
        let layer_tpe = reading.routed_per_expert;

        // Non-finite values are never silent.
        let finite = total.is_finite() && grad_norm.is_finite();
        if finite {
            state.consecutive_bad = 0;
            model = step::apply_update(model, &mut adam, &cfg, lr, grads, sq_norm, layer_tpe);
        } else {
            state.bad_steps += 1;
            state.consecutive_bad += 1;
            let what = format!(
                "non-finite loss or gradient norm at step {} (loss {total}, grad norm {grad_norm})",
                step + 1
            );
            match cfg.train.on_nonfinite {
                NonFinitePolicy::Stop => bail!("{what}; stopping (train.on_nonfinite = \"stop\")"),
                NonFinitePolicy::Skip if state.consecutive_bad >= cfg.train.max_bad_steps => {
                    bail!(
                        "{what}: {} consecutive bad steps (train.max_bad_steps); stopping",
                        state.consecutive_bad
                    )
                }
                NonFinitePolicy::Skip => {
                    progress.println(&format!("warning: {what}; update skipped"))
                }
            }
        }
        state.step += 1;
        state.adam_t = adam.t;
        state.tokens_seen += tokens as u64;

        let is_last = state.step == total_steps;
        // Also at a --stop-after boundary, so a search can rank partial runs.
        let eval_now = cfg.train.eval_every > 0
            && (state.step % cfg.train.eval_every == 0 || is_last || state.step == stop_at);
        let this_eval = if eval_now {
            let loss = eval::evaluate(
                &model.valid(),
                &cfg,
                tok.clone(),
                &base_device,
                cfg.train.eval_batches,
            )?;
            eval_loss = Some(loss);
            Some(loss)
        } else {
            None
        };

        let report = StepReport {
            step: state.step,
            loss_total: total,
            loss_lm: reading.lm,
            loss_aux: reading.aux,
            loss_seq_aux: reading.seq_aux,
            loss_z: reading.z,
            lr,
            grad_norm,
            tokens_per_s: tokens as f64 / step_start.elapsed().as_secs_f64(),
            skipped: !finite,
            layers,
            eval_loss: this_eval,
        };
        losses.push(total);
        tb.write_summary(state.step as i64, report.summary_values(&cfg.log))?;
        jsonl.write(&report.json(&cfg.log))?;
        for alert in state.monitor.update(&report, &cfg.log) {
            progress.println(&format!("alert (step {}): {}", alert.step, alert.message));
            jsonl.write(&alert.json())?;
        }
        if let Some(l) = this_eval {
            progress.println(&format!(
                "step {} | eval loss {l:.4} | ppl {:.2}",
                state.step,
                l.exp()
            ));
        }
        progress.step(&report);

        let ckpt_now = is_last
            || state.step == stop_at
            || (cfg.train.checkpoint_every > 0 && state.step % cfg.train.checkpoint_every == 0);
        if ckpt_now {
            jsonl.flush()?;
            tb.flush()?;
            state.cursor = train_stream.cursor();
            let mut optimizer = BTreeMap::new();
            for (k, v) in adam.m.iter() {
                optimizer.insert(format!("m.{k}"), v.clone().into_data());
            }
            for (k, v) in adam.v.iter() {
                optimizer.insert(format!("v.{k}"), v.clone().into_data());
            }
            checkpoint::save(
                &run_dir,
                &Checkpoint {
                    model: crate::params::collect(&model),
                    optimizer,
                    state: state.clone(),
                    config: cfg.clone(),
                    tokenizer: Some(tok_path.clone()),
                },
                &SaveOptions {
                    keep: cfg.train.keep_checkpoints,
                    fail_after_files: None,
                },
            )?;
        }
    }
    progress.finish();
    jsonl.flush()?;
    if state.step == total_steps {
        tb.write_hparams_end(true)?;
    }
    let skipped = train_stream.bad_records_skipped();
    println!(
        "done: {} steps in {} | final loss {:.4}{}{}{}",
        state.step - first,
        format_secs(started.elapsed().as_secs_f64()),
        losses.last().copied().unwrap_or(f64::NAN),
        eval_loss
            .map(|l| format!(" | eval loss {l:.4} (ppl {:.2})", l.exp()))
            .unwrap_or_default(),
        if state.bad_steps > 0 {
            format!(" | {} non-finite steps skipped", state.bad_steps)
        } else {
            String::new()
        },
        if skipped > 0 {
            format!(" | {skipped} bad corpus records skipped")
        } else {
            String::new()
        },
    );
    println!("logs: tensorboard --logdir {}", opts.runs_dir.display());
    Ok(RunOutcome {
        run_dir,
        final_step: state.step,
        losses,
        eval_loss,
    })
}
