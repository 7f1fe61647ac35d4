//! Checkpoints: `runs/<name>/checkpoints/step-XXXXXXX/` holding
//! `model.safetensors` (parameters by path, the aux-free biases included),
//! `optimizer.safetensors` (AdamW moments), `state.json` (step, optimizer
//! step, data cursor, monitor state), `config.toml` (the resolved config)
//! and `tokenizer.json`.
//!
//! Writes are atomic: everything goes into a hidden temporary directory,
//! each file and the directory are fsynced, and one rename publishes it. A
//! crash at any moment leaves either the previous checkpoint or the new one,
//! never a torn one; leftovers of an interrupted write are removed on resume.
//! Reading one back is in `load.rs`.

mod load;

pub use load::{
    check_moments, decode_optimizer, encode_optimizer, load_any, load_model, load_weights, locate,
    read_config, read_state, Location, Moments,
};

use crate::config::RunConfig;
use crate::data::stream::{Cursor, Split, SplitMix64};
use crate::metrics::CollapseMonitor;
use crate::tensorfile;
use anyhow::{bail, Context, Result};
use burn::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Everything in `state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps completed.
    pub step: u64,
    /// AdamW update count (differs from `step` by skipped steps).
    pub adam_t: u64,
    /// The training stream's cursor after the last batch used (rank 0's in
    /// a run of several processes).
    pub cursor: Cursor,
    /// The cursors of ranks 1, 2, … when each rank reads its own shard
    /// (`data.sharding = "documents"` with several processes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rank_cursors: Vec<Cursor>,
    /// Collapse-alert state.
    pub monitor: CollapseMonitor,
    /// Steps skipped for non-finite values, in total and in the current run of them.
    pub bad_steps: u64,
    /// Consecutive skipped steps at save time.
    pub consecutive_bad: u64,
    /// Training tokens consumed.
    pub tokens_seen: u64,
    /// Dead experts to revive before the next step (`moe.revive_dead_experts`).
    #[serde(default)]
    pub pending_revivals: Vec<crate::train::revive::Revival>,
    /// Experts revived so far.
    #[serde(default)]
    pub revivals: u64,
    /// Size and CRC-32C of every other file of the checkpoint, written at
    /// save and checked before a resume ([`verify`]). Empty in checkpoints
    /// written before checksums were kept.
    #[serde(default)]
    pub files: BTreeMap<String, FileCheck>,
}

impl TrainState {
    /// The loop state of a run that starts now.
    pub fn fresh(cfg: &RunConfig) -> Self {
        TrainState {
            step: 0,
            adam_t: 0,
            cursor: Cursor {
                seq_len: cfg.model.seq_len,
                split: Split::Train,
                sources: Vec::new(),
                active: None,
                window: Vec::new(),
                window_sources: Vec::new(),
                shuffle: Vec::new(),
                rng: SplitMix64(cfg.train.seed),
                batches: 0,
                shard: Default::default(),
            },
            rank_cursors: Vec::new(),
            monitor: CollapseMonitor::default(),
            bad_steps: 0,
            consecutive_bad: 0,
            tokens_seen: 0,
            pending_revivals: Vec::new(),
            revivals: 0,
            files: BTreeMap::new(),
        }
    }
}

/// What a checkpoint file must still be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileCheck {
    /// Length in bytes.
    pub bytes: u64,
    /// CRC-32C (Castagnoli) of the contents.
    pub crc32c: u32,
}

/// What a checkpoint holds, in memory.
pub struct Checkpoint {
    /// Model parameters by path.
    pub model: BTreeMap<String, TensorData>,
    /// Optimizer tensors (`m.<path>`, `v.<path>`).
    pub optimizer: BTreeMap<String, TensorData>,
    /// Loop state.
    pub state: TrainState,
    /// The resolved config.
    pub config: RunConfig,
    /// The tokenizer file to copy in.
    pub tokenizer: Option<PathBuf>,
}

/// Save options.
#[derive(Debug, Clone, Default)]
pub struct SaveOptions {
    /// Keep this many checkpoints (oldest removed); 0 keeps all.
    pub keep: usize,
    /// Stop with an error after writing this many files, leaving the
    /// temporary directory behind as a crash would (for testing recovery).
    pub fail_after_files: Option<usize>,
}

/// Directory name of the checkpoint for `step`.
pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:07}")
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)?.sync_all()?;
    Ok(())
}

/// Write a checkpoint atomically under `run_dir/checkpoints/`; returns its path.
pub fn save(run_dir: &Path, ckpt: &Checkpoint, opts: &SaveOptions) -> Result<PathBuf> {
    let root = run_dir.join("checkpoints");
    std::fs::create_dir_all(&root)?;
    let name = step_dir_name(ckpt.state.step);
    let tmp = root.join(format!(".tmp-{name}-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir(&tmp)?;
    let mut files: Vec<(&str, Vec<u8>)> = vec![
        (
            "model.safetensors",
            tensorfile::to_bytes(&ckpt.model, None)?,
        ),
        (
            "optimizer.safetensors",
            tensorfile::to_bytes(&ckpt.optimizer, None)?,
        ),
        ("config.toml", ckpt.config.to_toml().into_bytes()),
    ];
    if let Some(tok) = &ckpt.tokenizer {
        files.push((
            "tokenizer.json",
            std::fs::read(tok).with_context(|| format!("reading {}", tok.display()))?,
        ));
    }
    // state.json last: its presence marks a complete directory, and it
    // carries the checksum of every file before it.
    let mut state = ckpt.state.clone();
    state.files = files
        .iter()
        .map(|(name, bytes)| {
            let check = FileCheck {
                bytes: bytes.len() as u64,
                crc32c: crc32c::crc32c(bytes),
            };
            (name.to_string(), check)
        })
        .collect();
    files.push(("state.json", serde_json::to_vec(&state)?));
    for (i, (file, bytes)) in files.iter().enumerate() {
        if opts.fail_after_files == Some(i) {
            bail!("checkpoint write interrupted after {i} file(s) (simulated)");
        }
        write_synced(&tmp.join(file), bytes)?;
    }
    sync_dir(&tmp)?;
    let dest = root.join(&name);
    if dest.exists() {
        // Rewriting the same step (e.g. the final checkpoint): move the old one aside first.
        let old = root.join(format!(".old-{name}-{}", std::process::id()));
        std::fs::rename(&dest, &old)?;
        std::fs::rename(&tmp, &dest)?;
        std::fs::remove_dir_all(&old)?;
    } else {
        std::fs::rename(&tmp, &dest)?;
    }
    sync_dir(&root)?;
    if opts.keep > 0 {
        let all = list(run_dir)?;
        for (_, old) in all.iter().take(all.len().saturating_sub(opts.keep)) {
            std::fs::remove_dir_all(old)?;
        }
    }
    Ok(dest)
}

/// Complete checkpoints of a run, oldest first, as (step, path).
pub fn list(run_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let root = run_dir.join("checkpoints");
    if !root.is_dir() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&root)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if let Some(step) = name.strip_prefix("step-").and_then(|s| s.parse().ok()) {
            if path.join("state.json").exists() {
                out.push((step, path));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Remove temporary directories left by interrupted writes.
pub fn clean_interrupted(run_dir: &Path) -> Result<usize> {
    let root = run_dir.join("checkpoints");
    let mut n = 0;
    if root.is_dir() {
        for entry in std::fs::read_dir(&root)? {
            let path = entry?.path();
            let hidden = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(".tmp-") || n.starts_with(".old-"));
            if hidden {
                std::fs::remove_dir_all(&path)?;
                n += 1;
            }
        }
    }
    Ok(n)
}

/// Check every file of checkpoint `dir` against the sizes and checksums in
/// its `state.json`; the error names the first damaged file. A checkpoint
/// written before checksums were kept passes if its state parses.
pub fn verify(dir: &Path) -> Result<()> {
    let state = read_state_file(dir)?;
    for (name, want) in &state.files {
        let path = dir.join(name);
        let got = file_check(&path)?;
        if got.bytes != want.bytes {
            bail!(
                "{}: damaged ({} bytes, {} when written)",
                path.display(),
                got.bytes,
                want.bytes
            );
        }
        if got.crc32c != want.crc32c {
            bail!(
                "{}: damaged (checksum {:08x}, {:08x} when written)",
                path.display(),
                got.crc32c,
                want.crc32c
            );
        }
    }
    Ok(())
}

/// A checkpoint's `state.json`.
fn read_state_file(dir: &Path) -> Result<TrainState> {
    let path = dir.join("state.json");
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes)
        .with_context(|| format!("{}: damaged (not a valid state file)", path.display()))
}

/// Size and CRC-32C of a file, read in 8 MiB pieces.
fn file_check(path: &Path) -> Result<FileCheck> {
    use std::io::Read;
    let mut f = File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut buf = vec![0u8; 8 << 20];
    let (mut crc, mut bytes) = (0u32, 0u64);
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        bytes += n as u64;
    }
    Ok(FileCheck { bytes, crc32c: crc })
}

/// The newest checkpoint of a run that passes [`verify`], with a warning
/// for each newer one that does not. `None` when the run has no
/// checkpoint; an error naming every damage when none is intact.
pub fn newest_intact(run_dir: &Path) -> Result<Option<(PathBuf, Vec<String>)>> {
    let all = list(run_dir)?;
    if all.is_empty() {
        return Ok(None);
    }
    let mut warnings = Vec::new();
    for (_, dir) in all.iter().rev() {
        match verify(dir) {
            Ok(()) => return Ok(Some((dir.clone(), warnings))),
            Err(e) => warnings.push(format!(
                "checkpoint {} is damaged and was skipped: {e:#}",
                dir.display()
            )),
        }
    }
    bail!(
        "{}: every checkpoint is damaged:\n  {}",
        run_dir.display(),
        warnings.join("\n  ")
    )
}
