//! Run setup: the device, the run directory, HParams, starting weights
//! from `train.init_from`, the checkpoint a resume continues from, and the
//! loop state and data stream of a fresh run.

use super::RunOptions;
use crate::checkpoint;
use crate::config::{Architecture, Precision, RunConfig};
use crate::data::stream::{Split, StreamOptions};
use crate::metrics::tensorboard::{ProtoKind, ProtoValue};
use crate::model::LanguageModel;
use anyhow::{bail, Context, Result};
use burn::prelude::*;
use burn::tensor::DType;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The backend device named by `spec`.
pub fn parse_device(spec: &str) -> Result<Device> {
    let (kind, index) = match spec.split_once(':') {
        Some((k, i)) => (
            k,
            Some(
                i.parse::<usize>()
                    .with_context(|| format!("bad device index in `{spec}`"))?,
            ),
        ),
        None => (spec, None),
    };
    match kind {
        "flex" | "cpu" => Ok(Device::flex()),
        #[cfg(feature = "cuda")]
        "cuda" => {
            let index = index.unwrap_or(0);
            check_cuda(spec, index)?;
            Ok(Device::cuda(index))
        }
        #[cfg(feature = "wgpu")]
        "wgpu" => Ok(Device::wgpu(Default::default())),
        #[cfg(not(feature = "cuda"))]
        "cuda" => bail!("--device cuda: this build has no CUDA support; rebuild with `cargo build --release --features cuda`"),
        #[cfg(not(feature = "wgpu"))]
        "wgpu" => bail!("--device wgpu: this build has no wgpu support; rebuild with `cargo build --release --features wgpu`"),
        other => {
            let _ = index;
            bail!("unknown device `{other}` (allowed: flex, wgpu, cuda, cuda:N)")
        }
    }
}

/// Refuse `--device cuda[:N]` with the reason, where the CUDA backend
/// would otherwise panic on its device thread at the first tensor: no
/// NVIDIA driver library, no NVRTC (which compiles the kernels) or no
/// CUDA headers for it, a driver that does not start, or no device `index`.
#[cfg(feature = "cuda")]
fn check_cuda(spec: &str, index: usize) -> Result<()> {
    use cudarc::driver::result as driver;
    // SAFETY: each only tries to open the library by its usual names.
    let (has_driver, has_nvrtc) = unsafe {
        (
            cudarc::driver::sys::is_culib_present(),
            cudarc::nvrtc::sys::is_culib_present(),
        )
    };
    if !has_driver {
        bail!(
            "--device {spec}: the NVIDIA driver library (libcuda.so) is not on this machine; \
             CUDA needs an NVIDIA GPU and its driver (use --device flex on the CPU)"
        );
    }
    if !has_nvrtc {
        bail!(
            "--device {spec}: NVRTC (libnvrtc.so), which compiles switchyard's CUDA kernels, was \
             not found; put its folder on LD_LIBRARY_PATH (scripts/cuda-libs.sh finds it in the \
             CUDA toolkit or a Python package such as nvidia-cuda-nvrtc)"
        );
    }
    // CubeCL hands NVRTC the toolkit's include folder (for the f16/bf16 and
    // matrix headers) and panics where it finds no toolkit.
    match cubecl_cuda::install::cuda_path() {
        Some(root) if root.join("include").is_dir() => {}
        found => bail!(
            "--device {spec}: no CUDA headers{}; NVRTC compiles switchyard's kernels against \
             them: set CUDA_PATH to a CUDA toolkit (the folder holding include/cuda_bf16.h; \
             scripts/cuda-libs.sh also looks in the Python packages)",
            found.map_or(String::new(), |r| format!(
                " in {}",
                r.join("include").display()
            ))
        ),
    }
    driver::init()
        .map_err(|e| anyhow::anyhow!("--device {spec}: the CUDA driver did not start: {e}"))?;
    let count = driver::device::get_count()
        .map_err(|e| anyhow::anyhow!("--device {spec}: could not count CUDA devices: {e}"))?;
    if index >= count.max(0) as usize {
        bail!("--device {spec}: this machine has {count} CUDA device(s), numbered from 0");
    }
    Ok(())
}

/// Refuse a compute precision the device cannot hold, before anything is
/// built: `train.precision = "bf16"` needs bf16 tensors, which the CPU
/// backend and CUDA have and wgpu (WGSL has no bf16 type) has not.
pub fn check_precision(device: &Device, spec: &str, precision: Precision) -> Result<()> {
    if precision == Precision::Bf16 && !device.supports_dtype(DType::BF16) {
        bail!(
            "train.precision = \"bf16\": device `{spec}` has no bf16 tensors; \
             use train.precision = \"f32\" there, or bf16 on `cuda` or `flex`"
        );
    }
    Ok(())
}

/// The least host memory a training step takes on the CPU backend, in
/// bytes, by its two parts that grow without bound with the config:
/// `(weights, attention)`. The weights are the embedding, the head, and
/// each block's attention and FFN matrices (norms and routers left out),
/// four times over: the values, their gradients and AdamW's two moments.
/// The attention part is the probabilities each layer keeps for the
/// backward, `n_layers × batch × heads × seq_len² × 4` bytes. Everything
/// else a step holds comes on top, so a run above this cannot fit.
pub fn step_memory_floor(cfg: &RunConfig) -> (f64, f64) {
    let m = &cfg.model;
    let f32_bytes = 4.0;
    let tables = if m.tie_embeddings { 1.0 } else { 2.0 };
    let values = tables * m.vocab_size as f64 * m.d_model as f64
        + (0..m.n_layers)
            .map(|l| cfg.block_weights(l, cfg.moe.num_experts) as f64)
            .sum::<f64>();
    let weights = 4.0 * f32_bytes * values;
    let s = m.seq_len as f64;
    let attention =
        f32_bytes * m.n_layers as f64 * cfg.train.batch_size as f64 * m.n_heads as f64 * s * s;
    (weights, attention)
}

/// This machine's memory in bytes, `(total with swap, available)`, from
/// `/proc/meminfo`; none where that file does not exist.
fn host_memory() -> Option<(f64, f64)> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<f64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        let kib: f64 = line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib * 1024.0)
    };
    let total = field("MemTotal:")? + field("SwapTotal:").unwrap_or(0.0);
    Some((total, field("MemAvailable:").unwrap_or(total)))
}

fn gib(bytes: f64) -> String {
    let mib = bytes / (1u64 << 20) as f64;
    if mib < 1024.0 {
        format!("{mib:.0} MiB")
    } else {
        format!("{:.1} GiB", mib / 1024.0)
    }
}

/// Refuse, before anything is allocated, a run on the CPU backend whose
/// step cannot fit in this machine's memory (an allocation that large
/// would abort the process, not return an error); say so when it exceeds
/// the memory free now. Returns the warning, if any.
pub fn check_host_memory(spec: &str, cfg: &RunConfig) -> Result<Option<String>> {
    if spec != "flex" {
        return Ok(None);
    }
    let Some((total, available)) = host_memory() else {
        return Ok(None);
    };
    let (weights, attention) = step_memory_floor(cfg);
    let need = weights + attention;
    let what = format!(
        "a training step needs at least {} ({} for the attention probabilities kept for \
         the backward: model.n_layers × train.batch_size × model.n_heads × model.seq_len² \
         × 4 bytes; {} for the weights, their gradients and their AdamW moments)",
        gib(need),
        gib(attention),
        gib(weights)
    );
    if need > total {
        bail!(
            "{what}, and this machine has {} with swap: lower model.seq_len or \
             train.batch_size (train.grad_accum keeps the tokens per step), or the \
             model's widths (model.vocab_size, model.d_model, model.d_ff, \
             moe.num_experts, moe.d_expert); on a GPU with its kernels \
             (--device cuda) attention keeps no seq_len² buffer",
            gib(total)
        );
    }
    Ok((need > available).then(|| format!("warning: {what}; {} is free now", gib(available))))
}

pub(crate) fn pick_run_dir(opts: &RunOptions) -> Result<PathBuf> {
    let stem = opts
        .config
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("run")
        .to_string();
    if let Some(name) = &opts.name {
        let dir = opts.runs_dir.join(name);
        if !opts.resume && !checkpoint::list(&dir)?.is_empty() {
            bail!(
                "{} already holds a run: pass --resume to continue it, or --name to start another",
                dir.display()
            );
        }
        return Ok(dir);
    }
    if opts.resume {
        return Ok(opts.runs_dir.join(stem));
    }
    let mut dir = opts.runs_dir.join(&stem);
    let mut n = 1;
    while dir.exists() {
        n += 1;
        dir = opts.runs_dir.join(format!("{stem}-{n}"));
    }
    Ok(dir)
}

/// Flatten the config's scalar values into HParams entries.
pub(crate) fn hparams(cfg: &RunConfig) -> BTreeMap<String, ProtoValue> {
    fn walk(prefix: &str, v: &toml::Value, out: &mut BTreeMap<String, ProtoValue>) {
        let kind = match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
                return;
            }
            toml::Value::Integer(i) => ProtoKind::Number(*i as f64),
            toml::Value::Float(f) => ProtoKind::Number(*f),
            toml::Value::Boolean(b) => ProtoKind::Bool(*b),
            toml::Value::String(s) => ProtoKind::Text(s.clone()),
            other => ProtoKind::Text(other.to_string()),
        };
        out.insert(prefix.to_string(), ProtoValue { kind: Some(kind) });
    }
    let mut out = BTreeMap::new();
    walk(
        "",
        &toml::Value::try_from(cfg).expect("config serialises"),
        &mut out,
    );
    out
}

/// Starting weights from `train.init_from`: the source's architecture replaces
/// the config's, its routing keys that decide what the model computes
/// ([`crate::config::FUNCTION_KEYS`]) replace the config's unless `explicit`
/// (the `section.key` paths the config sets) names them, and its tokenizer
/// (if it ships one) replaces `data.tokenizer`. Returns the model and the
/// lines saying what came from the source.
pub(crate) fn init_from(
    cfg: &mut RunConfig,
    src: &Path,
    device: &Device,
    explicit: &[String],
) -> Result<(LanguageModel, Vec<String>)> {
    let (model, tok) = checkpoint::load_any(src, device)
        .with_context(|| format!("train.init_from = {}", src.display()))?;
    let model = match &cfg.upcycle {
        Some(up) => {
            let moe = crate::upcycle::upcycle(&model, up, cfg.train.seed)
                .with_context(|| format!("upcycling train.init_from = {}", src.display()))?;
            println!("{}", crate::upcycle::describe(&moe));
            moe
        }
        None => model,
    };
    let before = cfg.clone();
    cfg.set_architecture(Architecture {
        model: model.config().clone(),
        moe: model.moe_config().architecture(),
    });
    let mut diff = before.architecture_diff(cfg);
    let adopted = cfg.moe.adopt_function(model.moe_config(), explicit);
    diff.extend(adopted.taken);
    if !diff.is_empty() {
        println!(
            "init_from {}: taken from the source:\n  {}",
            src.display(),
            diff.join("\n  ")
        );
    }
    for warning in &adopted.overridden {
        eprintln!("warning: init_from {}: {warning}", src.display());
    }
    if let Some(tok) = tok {
        cfg.data.tokenizer = tok.to_string_lossy().into_owned();
    }
    cfg.validate()?;
    // Rebuild with this config (routing knobs from the run, weights from the source).
    let fresh = LanguageModel::unloaded(&cfg.model, &cfg.moe, device);
    let model = crate::params::load(fresh, &crate::params::collect(&model))?;
    let mut notes = vec![format!("train.init_from = {}", src.display())];
    notes.extend(diff.iter().map(|d| format!("from the source: {d}")));
    notes.extend(adopted.overridden.iter().map(|w| format!("kept: {w}")));
    Ok((model, notes))
}

/// The checkpoint `--resume` continues from: the newest intact one, its
/// architecture adopted into `cfg` (which must not change it).
pub(crate) fn resume_point(run_dir: &Path, cfg: &mut RunConfig) -> Result<PathBuf> {
    // The newest checkpoint whose files still match their checksums.
    let Some((dir, damaged)) = checkpoint::newest_intact(run_dir)? else {
        bail!(
            "--resume: {} has no complete checkpoint to resume from",
            run_dir.display()
        );
    };
    for warning in damaged {
        eprintln!("warning: {warning}");
    }
    let removed = checkpoint::clean_interrupted(run_dir)?;
    if removed > 0 {
        println!("removed {removed} unfinished checkpoint write(s)");
    }
    let saved = checkpoint::read_config(&dir)?;
    let diff = saved.architecture_diff(cfg);
    if !diff.is_empty() && cfg.train.init_from.is_none() {
        bail!(
            "cannot resume {}: architecture keys differ from the checkpoint:\n  {}",
            run_dir.display(),
            diff.join("\n  ")
        );
    }
    // Keep the checkpoint's resolved architecture (e.g. one adopted from init_from).
    cfg.set_architecture(saved.architecture());
    cfg.data.tokenizer = saved.data.tokenizer.clone();
    Ok(dir)
}

/// The stream of `split` for this config.
pub(crate) fn stream_options(cfg: &RunConfig, split: Split) -> StreamOptions {
    StreamOptions {
        seq_len: cfg.model.seq_len,
        batch_size: cfg.train.batch_size,
        split,
        seed: cfg.train.seed,
        shard: crate::data::stream::Shard::WHOLE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tiny config's floor by hand. Weights: embedding and head 2 ×
    /// 4,096 × 128; per layer q and o 2 × 128 × 128, k and v 2 × 128 × 64,
    /// 8 experts of 3 × 128 × 128; 4 layers; four copies of 4 bytes.
    /// Attention: 4 layers × 16 rows × 4 heads × 128² probabilities.
    #[test]
    fn the_memory_floor_of_the_tiny_config() {
        let mut cfg = RunConfig::default();
        cfg.model.vocab_size = 4096;
        cfg.model.d_model = 128;
        cfg.model.n_layers = 4;
        cfg.model.n_heads = 4;
        cfg.model.n_kv_heads = 2;
        cfg.model.head_dim = None;
        cfg.model.tie_embeddings = false;
        cfg.model.seq_len = 128;
        cfg.moe.num_experts = 8;
        cfg.moe.d_expert = 128;
        cfg.moe.num_shared_experts = 0;
        cfg.moe.layers = None;
        cfg.moe.first_k_dense = 0;
        cfg.moe.every_n_layers = 1;
        cfg.train.batch_size = 16;
        let (weights, attention) = step_memory_floor(&cfg);
        let per_layer = 2.0 * 16_384.0 + 2.0 * 8_192.0 + 8.0 * 3.0 * 16_384.0;
        assert_eq!(weights, 16.0 * (2.0 * 524_288.0 + 4.0 * per_layer)); // 40.8 MiB
        assert_eq!(attention, 4.0 * 4.0 * 16.0 * 4.0 * 16_384.0); // 16 MiB
        assert_eq!(gib(attention), "16 MiB");
        assert_eq!(gib(3.0 * (1u64 << 30) as f64), "3.0 GiB");
    }

    /// The weights counted are the model's parameters less its norms and
    /// routers: never more, and within 1% of them, with a dense first
    /// block, shared experts and a tied head too.
    #[test]
    fn the_floor_counts_the_models_own_weights() {
        use burn::module::Module;
        let mut cfg = RunConfig::default();
        cfg.model.d_model = 64;
        cfg.model.n_layers = 3;
        for (tied, first_dense, shared) in [(false, 0, 0), (true, 1, 1)] {
            cfg.model.tie_embeddings = tied;
            cfg.moe.first_k_dense = first_dense;
            cfg.moe.num_shared_experts = shared;
            let device = Device::flex();
            let model = LanguageModel::new(&cfg.model, &cfg.moe, 1, &device);
            let params = model.num_params() as f64;
            let counted = step_memory_floor(&cfg).0 / 16.0;
            assert!(
                counted <= params && counted > 0.99 * params,
                "tied {tied}, dense {first_dense}, shared {shared}: {counted} of {params}"
            );
        }
    }
}
