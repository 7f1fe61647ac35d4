//! [`Trainer::start`]: config → run directory → model and optimizer
//! (fresh, from `init_from`, or from the newest intact checkpoint; this
//! rank's experts under expert parallelism) → tokenizer → this rank's data
//! stream → sinks (rank 0).

use super::device::{check_precision, parse_device};
use super::device_limits::check_memory;
use super::optim::AdamW;
use super::parallel;
use super::setup::{hparams, init_from, resume_point, stream_options};
use super::{RunOptions, Sinks, Trainer};
use crate::checkpoint::{self, TrainState};
use crate::config::RunConfig;
use crate::data::ranks::RankStream;
use crate::data::stream::{DataStream, Split};
use crate::data::tokenizer;
use crate::dist::Collective;
use crate::metrics::console::Progress;
use crate::metrics::tensorboard::EventWriter;
use crate::metrics::JsonlWriter;
use crate::model::LanguageModel;
use anyhow::{bail, Context, Result};
use burn::module::Module;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

impl<'c> Trainer<'c> {
    /// Set a run up from its options, fresh or resumed.
    pub fn start(opts: &RunOptions, comm: &'c mut dyn Collective) -> Result<Self> {
        let world = comm.world();
        let mut cfg = RunConfig::load(&opts.config, &opts.overrides)?;
        let run_dir = parallel::agree_run_dir(opts, comm)?;
        // Several ranks on one node with a GPU each: rank r takes cuda:{local rank}.
        let device_spec = match opts.device.as_str() {
            "cuda" if world.size > 1 => format!("cuda:{}", world.local_rank),
            other => other.to_string(),
        };
        let base_device = parse_device(&device_spec)?;
        check_precision(&base_device, &device_spec, cfg.train.precision)?;
        crate::kernels::use_gpu_kernels(cfg.train.gpu_kernels);
        crate::kernels::use_fused_swiglu(cfg.train.gpu_fused_swiglu);
        let device = base_device.clone().autodiff();

        let resume = if opts.resume {
            Some(resume_point(&run_dir, &mut cfg)?)
        } else {
            None
        };
        // Before the run directory is made. The architecture is known here,
        // except when a fresh run takes it from init_from's source
        // checkpoint (checked once that is read).
        let from_source = resume.is_none() && cfg.train.init_from.is_some();
        if !from_source {
            warn_memory(&device_spec, &cfg, world.is_writer())?;
        }
        if world.is_writer() {
            std::fs::create_dir_all(&run_dir)
                .with_context(|| format!("creating {}", run_dir.display()))?;
        }
        device.seed(cfg.train.seed);
        let mut notes = Vec::new();
        let model = match (&resume, cfg.train.init_from.clone()) {
            // Architecture from the checkpoint, routing knobs from this invocation.
            (Some(dir), _) => checkpoint::load_weights(
                dir,
                LanguageModel::unloaded(&cfg.model, &cfg.moe, &device),
            )?,
            (None, Some(src)) => {
                let text = std::fs::read_to_string(&opts.config).unwrap_or_default();
                let explicit = RunConfig::explicit_keys(&text, &opts.overrides);
                let (model, lines) = init_from(&mut cfg, Path::new(&src), &device, &explicit)?;
                notes = lines;
                model
            }
            (None, None) => LanguageModel::new(&cfg.model, &cfg.moe, cfg.train.seed, &device),
        }
        .with_precision(cfg.train.precision);
        if from_source {
            warn_memory(&device_spec, &cfg, world.is_writer())?;
        }
        // The resolved config; a comment header records what init_from
        // took (kept as it is on a resume).
        let config_path = run_dir.join("config.toml");
        let header: String = match &resume {
            Some(_) => std::fs::read_to_string(&config_path)
                .unwrap_or_default()
                .lines()
                .take_while(|l| l.starts_with('#'))
                .map(|l| format!("{l}\n"))
                .collect(),
            None => notes.iter().map(|n| format!("# {n}\n")).collect(),
        };
        if world.is_writer() {
            std::fs::write(&config_path, header + &cfg.to_toml())?;
        }

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

        let (state, adam) = match &resume {
            Some(dir) => {
                let (state, tensors) = checkpoint::read_state(dir)?;
                for r in &state.pending_revivals {
                    r.check(&cfg)?;
                }
                let (m, v) = checkpoint::decode_optimizer(tensors, &base_device)?;
                checkpoint::check_moments(&crate::params::shapes(&model), &m, &v)
                    .with_context(|| format!("resuming from {}", dir.display()))?;
                let adam = AdamW {
                    t: state.adam_t,
                    m,
                    v,
                };
                (state, adam)
            }
            None => (TrainState::fresh(&cfg), AdamW::default()),
        };
        let (mut model, mut adam) = (model, adam);
        let ep = parallel::shard_experts(&mut model, &mut adam, &cfg, &mut *comm, &device)?;
        let saved_cursors = resume.as_ref().map(|_| {
            let mut all = vec![state.cursor.clone()];
            all.extend(state.rank_cursors.iter().cloned());
            all
        });
        let train_stream = RankStream::open(
            &cfg.data,
            tok.clone(),
            stream_options(&cfg, Split::Train),
            world,
            saved_cursors,
        )?;

        // An empty validation split fails now, not at the first
        // evaluation after steps that would be lost with it.
        if cfg.train.eval_every > 0 && (world.is_writer() || ep.is_some()) {
            let mut val = DataStream::open(
                &cfg.data,
                tok.clone(),
                stream_options(&cfg, Split::Validation),
                None,
            )?;
            val.next_batch()?;
        }

        let (total, first_step) = (cfg.train.steps, state.step);
        let sinks = if world.is_writer() {
            // On resume, metrics of steps after the checkpoint are dropped, so
            // the JSONL holds each step once.
            let jsonl_path = run_dir.join("metrics.jsonl");
            let jsonl = match resume {
                Some(_) => JsonlWriter::resume_at(&jsonl_path, state.step)?,
                None => JsonlWriter::open(&jsonl_path)?,
            };
            let mut tb = EventWriter::create(&run_dir)?;
            tb.write_hparams(hparams(&cfg), "")?;
            println!(
                "run {} | {} parameters | {} MoE layers | steps {}..{} | device {}{}",
                run_dir.display(),
                model.num_params(),
                model.moe_layers().count(),
                first_step + 1,
                total,
                opts.device,
                if world.size > 1 {
                    format!(
                        " | {} ranks, {} sequences per step",
                        world.size,
                        world.size * cfg.train.batch_size * cfg.train.grad_accum
                    )
                } else {
                    String::new()
                }
            );
            let progress = Progress::new(cfg.log.progress, total, first_step, cfg.log.print_every);
            Some(Sinks {
                jsonl,
                tb,
                progress,
            })
        } else {
            None
        };
        let stop_at = opts
            .stop_after
            .map_or(total, |n| (first_step + n).min(total));
        Ok(Self {
            cfg,
            comm,
            world,
            ep,
            run_dir,
            runs_dir: opts.runs_dir.clone(),
            device,
            base_device,
            model: Some(model),
            adam,
            state,
            tok,
            tok_path,
            train_stream,
            sinks,
            stop_at,
            first_step,
            losses: Vec::new(),
            eval_loss: None,
            started: Instant::now(),
        })
    }
}

/// [`check_memory`], its warning printed by the writing rank.
fn warn_memory(spec: &str, cfg: &RunConfig, writer: bool) -> Result<()> {
    if let Some(warning) = check_memory(spec, cfg)? {
        if writer {
            eprintln!("{warning}");
        }
    }
    Ok(())
}
