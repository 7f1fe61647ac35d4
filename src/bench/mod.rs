//! `switchyard bench`: whole training steps on synthetic token ids.
//!
//! A step here is exactly a training step of `switchyard train` with one
//! micro-batch: forward, losses, backward, global gradient norm, the one
//! host read of losses and routing statistics, clipping and AdamW. Only the
//! data source differs (uniform random ids, so the corpus pipeline is not
//! timed). Steps are timed wall-clock with a device sync at each end; the
//! report gives the median after warm-up.
//!
//! The per-phase breakdown (`--profile`) times each component of the step
//! alone, forward plus backward, on the shapes the step gives it:
//! attention, router (with its losses), dispatch/combine, expert matmuls,
//! dense FFN, LM head with the loss, and the optimizer. What the whole step
//! takes beyond their sum (embedding, norms, residuals, statistics, graph
//! bookkeeping) is reported as "other".

mod profile;

use crate::config::{ModelConfig, MoeConfig, Precision, RunConfig};
use crate::data::stream::{Batch, SplitMix64};
use crate::model::LanguageModel;
use crate::train::optim::AdamW;
use crate::train::step::{self, BatchTensors};
use anyhow::{Context, Result};
use burn::module::Module;
use burn::prelude::*;
use burn::tensor::Distribution;
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

/// How `switchyard bench` was invoked.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// The TOML config giving the model and batch shape.
    pub config: PathBuf,
    /// `--set key=value` overrides.
    pub overrides: Vec<String>,
    /// `flex`, `wgpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// Untimed steps first.
    pub warmup: usize,
    /// Timed steps (the median is reported).
    pub steps: usize,
    /// Also time each phase of the step on its own.
    pub profile: bool,
    /// Also measure the backend's f32 matmul throughput (the sgemm ceiling).
    pub sgemm: bool,
}

/// One phase of the breakdown.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseTime {
    /// Name of the phase.
    pub name: String,
    /// Median seconds per training step spent in it (all layers).
    pub seconds: f64,
}

/// What `switchyard bench` measures.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Config file and overrides.
    pub config: String,
    /// The device spec.
    pub device: String,
    /// The model as the config resolved it, defaults filled in (so that a
    /// reference implementation can be built at the same shape).
    pub model: ModelConfig,
    /// The routed-expert settings, resolved likewise.
    pub moe: MoeConfig,
    /// Sequences per step.
    pub batch_size: usize,
    /// Training precision.
    pub precision: Precision,
    /// Rayon threads of the CPU backend.
    pub threads: usize,
    /// All parameters.
    pub params: usize,
    /// Parameters one token passes through, embedding excluded.
    pub active_params: usize,
    /// Tokens per step (batch × sequence).
    pub tokens_per_step: usize,
    /// Seconds of each timed step.
    pub step_seconds: Vec<f64>,
    /// Median step time.
    pub median_step_s: f64,
    /// Tokens per second at the median step time.
    pub tokens_per_s: f64,
    /// Model FLOPs of one step: 6 per active weight per token plus attention.
    pub flops_per_step: f64,
    /// Model FLOPs per second at the median step time, in GFLOP/s.
    pub achieved_gflops: f64,
    /// f32 matmul throughput of the backend on a large square product, in GFLOP/s.
    pub sgemm_gflops: Option<f64>,
    /// Peak resident memory of the process, MiB.
    pub peak_rss_mb: f64,
    /// Memory the device's allocator had reserved, MiB: the most seen at the
    /// end of a step, warm-up included. `None` where the backend keeps no
    /// device pool (flex, whose memory is the process's, in `peak_rss_mb`).
    pub device_reserved_mb: Option<f64>,
    /// Per-phase breakdown (with `--profile`).
    pub phases: Vec<PhaseTime>,
}

/// Run the benchmark.
pub fn run(opts: &BenchOptions) -> Result<BenchReport> {
    let cfg = RunConfig::load(&opts.config, &opts.overrides)?;
    let base = crate::train::parse_device(&opts.device)?;
    crate::train::check_precision(&base, &opts.device, cfg.train.precision)?;
    if let Some(warning) = crate::train::check_memory(&opts.device, &cfg)? {
        eprintln!("{warning}");
    }
    crate::kernels::use_gpu_kernels(cfg.train.gpu_kernels);
    crate::kernels::use_fused_swiglu(cfg.train.gpu_fused_swiglu);
    let device = base.clone().autodiff();
    base.seed(cfg.train.seed);
    let (b, s, v) = (
        cfg.train.batch_size,
        cfg.model.seq_len,
        cfg.model.vocab_size,
    );
    let mut model = LanguageModel::new(&cfg.model, &cfg.moe, cfg.train.seed, &device)
        .with_precision(cfg.train.precision);
    let mut adam = AdamW::default();
    let mut rng = SplitMix64(cfg.train.seed);

    let sync = |d: &Device| d.sync().context("device sync failed");
    let mut times = Vec::new();
    let mut device_reserved_mb: Option<f64> = None;
    for i in 0..opts.warmup + opts.steps {
        let batch = synthetic_batch(&mut rng, b, s, v, &device);
        sync(&base)?;
        let t0 = Instant::now();
        model = train_step(model, &mut adam, &cfg, i as u64, batch)?;
        sync(&base)?;
        let secs = t0.elapsed().as_secs_f64();
        if let Some(mb) = device_reserved(&base) {
            device_reserved_mb = Some(device_reserved_mb.map_or(mb, |m| m.max(mb)));
        }
        let what = if i < opts.warmup { "warm-up" } else { "timed" };
        eprintln!(
            "step {}/{} ({what}): {secs:.4} s",
            i + 1,
            opts.warmup + opts.steps
        );
        if i >= opts.warmup {
            times.push(secs);
        }
    }
    let median_step_s = median(&times);

    let phases = if opts.profile {
        eprintln!("timing each phase on its own...");
        profile::profile_phases(&model, &cfg, &adam, &device, opts, median_step_s)?
    } else {
        Vec::new()
    };
    let sgemm_gflops = if opts.sgemm {
        Some(sgemm(&base, 1024)?)
    } else {
        None
    };
    let tokens = b * s;
    let active = active_params(&cfg);
    let flops = model_flops(&cfg, active, tokens);
    let mut config = opts.config.display().to_string();
    for o in &opts.overrides {
        config.push_str(&format!(" --set {o}"));
    }
    Ok(BenchReport {
        config,
        device: opts.device.clone(),
        model: cfg.model.clone(),
        moe: cfg.moe.clone(),
        batch_size: b,
        precision: cfg.train.precision,
        threads: rayon::current_num_threads(),
        params: model.num_params(),
        active_params: active,
        tokens_per_step: tokens,
        step_seconds: times,
        median_step_s,
        tokens_per_s: tokens as f64 / median_step_s,
        flops_per_step: flops,
        achieved_gflops: flops / median_step_s / 1e9,
        sgemm_gflops,
        peak_rss_mb: peak_rss_mb(),
        device_reserved_mb,
        phases,
    })
}

/// One optimizer step with a single micro-batch, through the training
/// loop's own [`step::train_step`].
fn train_step(
    model: LanguageModel,
    adam: &mut AdamW,
    cfg: &RunConfig,
    step: u64,
    batch: BatchTensors,
) -> Result<LanguageModel> {
    let (model, outcome) = step::train_step(
        model,
        adam,
        cfg,
        step,
        cfg.optim.lr,
        &[batch],
        &mut crate::dist::Single,
        None,
    );
    anyhow::ensure!(
        outcome.applied,
        "non-finite loss {} in a benchmark step",
        outcome.reading.total
    );
    Ok(model)
}

/// Uniform random token ids, no padding.
pub(crate) fn synthetic_batch(
    rng: &mut SplitMix64,
    b: usize,
    s: usize,
    vocab: usize,
    device: &Device,
) -> BatchTensors {
    let batch = Batch {
        tokens: (0..b * (s + 1))
            .map(|_| (rng.next_u64() % vocab as u64) as u32)
            .collect(),
        mask: vec![1.0; b * s],
        rows: b,
        seq_len: s,
        sources: Vec::new(),
    };
    BatchTensors::new(&batch, device)
}

/// f32 matmul throughput of `n × n × n` products, GFLOP/s (median of 5).
pub fn sgemm(device: &Device, n: usize) -> Result<f64> {
    let a = Tensor::<2>::random([n, n], Distribution::Normal(0.0, 1.0), device);
    let b = Tensor::<2>::random([n, n], Distribution::Normal(0.0, 1.0), device);
    let secs = time_median(
        device,
        5,
        || (),
        |()| {
            let _ = a.clone().matmul(b.clone());
        },
    )?;
    Ok(2.0 * (n as f64).powi(3) / secs / 1e9)
}

/// Parameters one token passes through, the embedding excluded.
pub fn active_params(cfg: &RunConfig) -> usize {
    let (m, moe) = (&cfg.model, &cfg.moe);
    let mut total = m.d_model * m.vocab_size; // LM head (tied or not, it is a matmul)
    for l in 0..m.n_layers {
        total += cfg.block_weights(l, moe.top_k);
        if moe.is_moe_layer(l) {
            total += m.d_model * moe.num_experts; // router
        }
    }
    total
}

/// Model FLOPs of one training step: 6 per active weight per token (forward
/// 2, backward 4), plus attention scores and weighted values, 12 · layers ·
/// seq · d_model per token (the causal half not subtracted, as is usual).
pub fn model_flops(cfg: &RunConfig, active: usize, tokens: usize) -> f64 {
    let m = &cfg.model;
    let per_token = 6.0 * active as f64 + 12.0 * (m.n_layers * m.seq_len * m.d_model) as f64;
    per_token * tokens as f64
}

/// Peak resident set size of this process (VmHWM), MiB; 0 where unknown.
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Bytes the device's memory pools reserve, MiB; `None` on a backend
/// without pools. The pools keep freed pages for reuse and give back only
/// pages idle for a while, so read after a step this is close to what the
/// step held at its peak (PyTorch's `max_memory_reserved` is the like figure).
fn device_reserved(device: &Device) -> Option<f64> {
    let usage = device.memory_pool_usage()?;
    Some(usage.bytes_reserved as f64 / (1024.0 * 1024.0))
}

/// Median seconds of `run` over `reps` repetitions after 2 untimed ones.
/// `setup` prepares each repetition's input outside the timed window; the
/// device is synced at both ends of it.
pub(crate) fn time_median<T>(
    device: &Device,
    reps: usize,
    mut setup: impl FnMut() -> T,
    mut run: impl FnMut(T),
) -> Result<f64> {
    let mut ts = Vec::new();
    for i in 0..reps + 2 {
        let input = setup();
        device.sync()?;
        let t0 = Instant::now();
        run(input);
        device.sync()?;
        if i >= 2 {
            ts.push(t0.elapsed().as_secs_f64());
        }
    }
    Ok(median(&ts))
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => 0.5 * (v[n / 2 - 1] + v[n / 2]),
    }
}

impl BenchReport {
    /// The human-readable report.
    pub fn render(&self) -> String {
        let mut o = String::new();
        o.push_str(&format!("config      {}\n", self.config));
        o.push_str(&format!(
            "device      {} ({} CPU threads)\n",
            self.device, self.threads
        ));
        o.push_str(&format!(
            "params      {:.2}M total, {:.2}M active per token\n",
            self.params as f64 / 1e6,
            self.active_params as f64 / 1e6
        ));
        o.push_str(&format!(
            "step        median {:.4} s over {} steps (min {:.4}, max {:.4})\n",
            self.median_step_s,
            self.step_seconds.len(),
            self.step_seconds
                .iter()
                .cloned()
                .fold(f64::INFINITY, f64::min),
            self.step_seconds.iter().cloned().fold(0.0, f64::max),
        ));
        o.push_str(&format!(
            "throughput  {:.0} tokens/s, {:.2} GFLOP/s of model FLOPs\n",
            self.tokens_per_s, self.achieved_gflops
        ));
        if let Some(g) = self.sgemm_gflops {
            o.push_str(&format!(
                "sgemm       {g:.2} GFLOP/s (1024³ f32 matmul): step runs at {:.0}% of it\n",
                100.0 * self.achieved_gflops / g
            ));
        }
        o.push_str(&format!("peak RSS    {:.0} MiB\n", self.peak_rss_mb));
        if let Some(mb) = self.device_reserved_mb {
            o.push_str(&format!(
                "device mem  {mb:.0} MiB reserved by the allocator (most after a step)\n"
            ));
        }
        if !self.phases.is_empty() {
            o.push_str("phases (each alone, forward + backward, all layers):\n");
            for p in &self.phases {
                o.push_str(&format!(
                    "  {:<44} {:>8.2} ms  {:>5.1}%\n",
                    p.name,
                    p.seconds * 1e3,
                    100.0 * p.seconds / self.median_step_s
                ));
            }
        }
        o
    }
}
