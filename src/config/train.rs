//! The `[optim]`, `[train]` and `[log]` sections.

use super::{at_most, err, limit, ConfigError};
use serde::{Deserialize, Serialize};

/// AdamW with linear warmup and cosine decay (Loshchilov & Hutter 2019).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    /// Peak learning rate. Default 3e-3.
    pub lr: f64,
    /// Learning rate at the end of the cosine decay. Default 3e-4.
    pub min_lr: f64,
    /// Linear warmup from 0 to `lr`, in optimizer steps. Default 50.
    pub warmup_steps: u64,
    /// Adam beta1. Default 0.9.
    pub beta1: f64,
    /// Adam beta2. Default 0.95.
    pub beta2: f64,
    /// Adam epsilon. Default 1e-8.
    pub eps: f64,
    /// Decoupled weight decay for matrices; norms, biases and the router's
    /// selection bias (every rank-1 parameter) are never decayed. Default 0.1.
    pub weight_decay: f64,
    /// Clip the global gradient norm to this value; 0 disables. Default 1.0.
    pub grad_clip: f64,
    /// Multiplies the learning rate (peak and floor) of the routers' weights.
    /// Default 1.0.
    pub router_lr_scale: f64,
    /// Multiplies the learning rate (peak and floor) of every FFN weight:
    /// dense MLPs, shared experts and routed experts. Set the same value in
    /// an MoE config and its dense twin to keep them comparable. Default 1.0.
    pub ffn_lr_scale: f64,
    /// Multiplies the learning rate of the routed experts' weights again, on
    /// top of `ffn_lr_scale`. Default 1.0.
    pub expert_lr_scale: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            lr: 3e-3,
            min_lr: 3e-4,
            warmup_steps: 50,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            grad_clip: 1.0,
            router_lr_scale: 1.0,
            ffn_lr_scale: 1.0,
            expert_lr_scale: 1.0,
        }
    }
}

impl OptimConfig {
    /// Check every field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(err("optim.lr", "must be a finite number > 0"));
        }
        if !(self.min_lr >= 0.0 && self.min_lr <= self.lr) {
            return Err(err("optim.min_lr", "must be in [0, optim.lr]"));
        }
        for (k, v) in [("optim.beta1", self.beta1), ("optim.beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return Err(err(k, format!("must be in [0, 1), got {v}")));
            }
        }
        if !(self.eps > 0.0 && self.eps.is_finite()) {
            return Err(err("optim.eps", "must be a finite number > 0"));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return Err(err("optim.weight_decay", "must be a finite number >= 0"));
        }
        if !(self.grad_clip >= 0.0) {
            return Err(err("optim.grad_clip", "must be >= 0 (0 disables clipping)"));
        }
        for (k, v) in [
            ("optim.router_lr_scale", self.router_lr_scale),
            ("optim.ffn_lr_scale", self.ffn_lr_scale),
            ("optim.expert_lr_scale", self.expert_lr_scale),
        ] {
            if !(v > 0.0 && v.is_finite()) {
                return Err(err(k, format!("must be a finite number > 0, got {v}")));
            }
        }
        Ok(())
    }
}

/// What to do when the loss or the gradient norm is NaN or infinite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NonFinitePolicy {
    /// Skip the update, count it, and go on (up to `train.max_bad_steps` in a row).
    Skip,
    /// Stop with a message naming the step.
    Stop,
}

/// The dtype the model computes in. Parameters, optimizer state, the
/// router and the loss stay f32 either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// Everything in f32.
    #[default]
    F32,
    /// Activations and matmuls in bf16 (weights cast from their f32 master
    /// copies each step); norms, the router, softmax statistics of the loss
    /// and all parameters in f32. Meant for GPUs; the CPU backend runs bf16
    /// matmuls through f32 and gains nothing.
    Bf16,
}

/// The training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Optimizer steps. Default 300.
    pub steps: u64,
    /// Sequences per micro-batch. Default 8.
    pub batch_size: usize,
    /// Micro-batches per optimizer step. Default 1.
    pub grad_accum: usize,
    /// Seed of the weights, the data shuffle and the router noise. Default 1337.
    pub seed: u64,
    /// Evaluate on the validation split every this many steps (and at the end); 0 disables. Default 100.
    pub eval_every: u64,
    /// Batches per evaluation (at most). Default 8.
    pub eval_batches: usize,
    /// Write a checkpoint every this many steps (and at the end); 0: only at the end. Default 100.
    pub checkpoint_every: u64,
    /// Checkpoints kept (oldest deleted first). Default 3.
    pub keep_checkpoints: usize,
    /// "skip" or "stop". Default "skip".
    pub on_nonfinite: NonFinitePolicy,
    /// Stop after this many consecutive non-finite steps. Default 5.
    pub max_bad_steps: u64,
    /// Start from these weights (a run, checkpoint or Hugging Face directory)
    /// with a fresh optimizer. Default none.
    pub init_from: Option<String>,
    /// "f32" or "bf16" (mixed precision, router and master weights in f32).
    /// Default "f32".
    pub precision: Precision,
    /// On a GPU backend, run switchyard's CubeCL kernels for the operations
    /// that have one (causal attention so far); false keeps Burn's composed
    /// path everywhere, for comparison. No effect on the CPU. Default true.
    pub gpu_kernels: bool,
    /// On a GPU backend with `gpu_kernels`, run the grouped experts' SwiGLU
    /// in the epilogue of switchyard's own tiled matmul (gate and up
    /// projections in one kernel, and in the backward the gradient through
    /// the down projection with the SwiGLU's derivative) instead of
    /// CubeCL's matmuls with a separate SwiGLU pass. No effect on the CPU.
    /// Default false.
    pub gpu_fused_swiglu: bool,
    /// In a run of several processes, the gradients are averaged in
    /// all-reduces of at most this many megabytes (10^6 bytes) each.
    /// Default 25.
    pub allreduce_bucket_mb: f64,
    /// Expert parallelism: the experts of every MoE layer are spread over
    /// groups of this many consecutive ranks (it must divide the number of
    /// processes and `moe.num_experts`); 1 keeps every expert on every
    /// rank. Default 1.
    pub expert_parallel: usize,
    /// Under expert parallelism, where the experts live: a plan file
    /// written by `switchyard plan-experts --out`, as "FILE" (its balanced
    /// placement) or "FILE:contiguous", "FILE:round-robin",
    /// "FILE:balanced". Default none: consecutive blocks.
    pub expert_placement: Option<String>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 300,
            batch_size: 8,
            grad_accum: 1,
            seed: 1337,
            eval_every: 100,
            eval_batches: 8,
            checkpoint_every: 100,
            keep_checkpoints: 3,
            on_nonfinite: NonFinitePolicy::Skip,
            max_bad_steps: 5,
            init_from: None,
            precision: Precision::F32,
            gpu_kernels: true,
            gpu_fused_swiglu: false,
            allreduce_bucket_mb: 25.0,
            expert_parallel: 1,
            expert_placement: None,
        }
    }
}

impl TrainConfig {
    /// Check every field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (k, v) in [
            ("train.steps", self.steps as usize),
            ("train.batch_size", self.batch_size),
            ("train.grad_accum", self.grad_accum),
            ("train.keep_checkpoints", self.keep_checkpoints),
            ("train.max_bad_steps", self.max_bad_steps as usize),
            ("train.expert_parallel", self.expert_parallel),
        ] {
            if v == 0 {
                return Err(err(k, "must be a positive integer"));
            }
        }
        at_most("train.batch_size", self.batch_size, limit::BATCH)?;
        at_most("train.grad_accum", self.grad_accum, limit::BATCH)?;
        if !(self.allreduce_bucket_mb.is_finite() && self.allreduce_bucket_mb >= 1e-6) {
            return Err(err(
                "train.allreduce_bucket_mb",
                "must be a positive number of megabytes",
            ));
        }
        if self.eval_every > 0 && self.eval_batches == 0 {
            return Err(err(
                "train.eval_batches",
                "must be positive when train.eval_every > 0",
            ));
        }
        Ok(())
    }
}

/// Monitoring and collapse alerts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// An expert whose token share is below this fraction of the uniform
    /// share 1/E counts as dead for that step. Default 0.1.
    pub dead_expert_share: f64,
    /// Alert when an expert stays dead this many consecutive steps. Default 20.
    pub dead_expert_steps: u64,
    /// Alert when a layer's max/mean expert load exceeds this. Default 3.0.
    pub max_over_mean_alert: f64,
    /// Progress display: "auto" (bar on a terminal, lines otherwise), "bar",
    /// "lines", or "json" (one JSON object per step on stdout, for programs
    /// that follow a run, such as `switchyard sweep`). Default "auto".
    pub progress: ProgressMode,
    /// Print a plain progress line every this many steps when not drawing a bar. Default 10.
    pub print_every: u64,
}

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProgressMode {
    /// A bar when stdout is a terminal, plain lines otherwise.
    Auto,
    /// Always a bar.
    Bar,
    /// Always plain lines.
    Lines,
    /// One JSON object per step on stdout: `{"step", "steps", "loss",
    /// "lm", "aux", "z", "drop_rate", "lr", "tokens_per_s"}`; other
    /// messages stay plain text lines.
    Json,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            dead_expert_share: 0.1,
            dead_expert_steps: 20,
            max_over_mean_alert: 3.0,
            progress: ProgressMode::Auto,
            print_every: 10,
        }
    }
}

impl LogConfig {
    /// Check every field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(0.0..1.0).contains(&self.dead_expert_share) {
            return Err(err("log.dead_expert_share", "must be in [0, 1)"));
        }
        if self.dead_expert_steps == 0 {
            return Err(err("log.dead_expert_steps", "must be a positive integer"));
        }
        if !(self.max_over_mean_alert >= 1.0) {
            return Err(err("log.max_over_mean_alert", "must be >= 1"));
        }
        if self.print_every == 0 {
            return Err(err("log.print_every", "must be a positive integer"));
        }
        Ok(())
    }
}
