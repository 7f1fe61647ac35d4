//! Run setup: the run directory, HParams, starting weights
//! from `train.init_from`, the checkpoint a resume continues from, and the
//! loop state and data stream of a fresh run.

use super::RunOptions;
use crate::checkpoint;
use crate::config::{Architecture, RunConfig};
use crate::data::stream::{Split, StreamOptions};
use crate::metrics::tensorboard::{ProtoKind, ProtoValue};
use crate::model::LanguageModel;
use anyhow::{bail, Context, Result};
use burn::prelude::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Refuse a run name that would put the run outside the runs directory or
/// on top of it: empty, absolute, or with a `.` or `..` component. A
/// relative path such as `ablations/lr-3e-3` nests the run.
fn check_run_name(name: &str) -> Result<()> {
    use std::path::Component;
    let path = Path::new(name);
    let inside = path.components().next().is_some()
        && path.components().all(|c| matches!(c, Component::Normal(_)))
        && !name
            .split(['/', '\\'])
            .any(|part| part == "." || part == "..");
    if !inside {
        bail!(
            "--name {name:?}: a run name is a folder under the runs directory (--runs-dir): \
             not empty, not absolute, and without `.` or `..` parts"
        );
    }
    Ok(())
}

pub(crate) fn pick_run_dir(opts: &RunOptions) -> Result<PathBuf> {
    let stem = opts
        .config
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("run")
        .to_string();
    if let Some(name) = &opts.name {
        check_run_name(name)?;
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
