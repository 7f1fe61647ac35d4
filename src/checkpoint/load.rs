//! Reading checkpoints back: where a `--checkpoint` argument points, the
//! model a checkpoint describes with its weights, and the optimizer state
//! a resume continues from.

use super::{list, read_state_file, TrainState};
use crate::config::RunConfig;
use crate::model::LanguageModel;
use crate::tensorfile::{self, TensorFile};
use anyhow::{bail, Context, Result};
use burn::prelude::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Where a `--checkpoint` argument points.
#[derive(Debug, Clone, PartialEq)]
pub enum Location {
    /// A switchyard checkpoint directory.
    Switchyard(PathBuf),
    /// A Hugging Face model directory.
    HuggingFace(PathBuf),
}

/// Resolve a run directory (its latest checkpoint), a checkpoint directory,
/// or a Hugging Face model directory.
pub fn locate(arg: &Path) -> Result<Location> {
    if arg.join("state.json").exists() && arg.join("model.safetensors").exists() {
        return Ok(Location::Switchyard(arg.to_path_buf()));
    }
    if crate::hf::is_hf_dir(arg) {
        return Ok(Location::HuggingFace(arg.to_path_buf()));
    }
    if arg.join("checkpoints").is_dir() {
        return match list(arg)?.pop() {
            Some((_, p)) => Ok(Location::Switchyard(p)),
            None => bail!("{}: the run has no complete checkpoint yet", arg.display()),
        };
    }
    bail!(
        "{}: not a run directory, a checkpoint directory (state.json + model.safetensors) \
         or a Hugging Face model directory (config.json + model.safetensors)",
        arg.display()
    )
}

/// The resolved config stored in a checkpoint.
pub fn read_config(dir: &Path) -> Result<RunConfig> {
    RunConfig::load(&dir.join("config.toml"), &[])
}

/// Load a checkpoint's weights into `model`, which must have its
/// architecture. The file is read through a memory map one tensor at a
/// time, so the host holds little more than the weights themselves.
pub fn load_weights(dir: &Path, model: LanguageModel) -> Result<LanguageModel> {
    let file = TensorFile::open(&dir.join("model.safetensors"))?;
    let read = file.reader()?;
    crate::params::load_from(model, file.names().to_vec(), read)
        .with_context(|| format!("loading {}", dir.display()))
}

/// Build the model a checkpoint describes and load its weights.
pub fn load_model(dir: &Path, device: &Device) -> Result<(RunConfig, LanguageModel)> {
    let cfg = read_config(dir)?;
    let model = load_weights(dir, LanguageModel::unloaded(&cfg.model, &cfg.moe, device))?;
    Ok((cfg, model))
}

/// Load any `--checkpoint` location (switchyard or Hugging Face) for inference.
/// Returns the model and the tokenizer file, if the location has one.
pub fn load_any(arg: &Path, device: &Device) -> Result<(LanguageModel, Option<PathBuf>)> {
    match locate(arg)? {
        Location::Switchyard(dir) => {
            let (_, model) = load_model(&dir, device)?;
            let tok = dir.join("tokenizer.json");
            Ok((model, tok.exists().then_some(tok)))
        }
        Location::HuggingFace(dir) => {
            let (_, model) = crate::hf::load(&dir, device)?;
            let tok = dir.join("tokenizer.json");
            Ok((model, tok.exists().then_some(tok)))
        }
    }
}

/// An optimizer's per-parameter moments, keyed by parameter path.
pub type Moments = BTreeMap<String, Tensor<1>>;

/// The AdamW moments as a checkpoint stores them: `m.<path>` and
/// `v.<path>`, flat.
pub fn encode_optimizer(m: &Moments, v: &Moments) -> BTreeMap<String, TensorData> {
    [("m", m), ("v", v)]
        .into_iter()
        .flat_map(|(prefix, map)| {
            map.iter()
                .map(move |(k, t)| (format!("{prefix}.{k}"), t.clone().into_data()))
        })
        .collect()
}

/// The AdamW moments `(m, v)` a checkpoint stored, placed on `device`.
pub fn decode_optimizer(
    tensors: BTreeMap<String, TensorData>,
    device: &Device,
) -> Result<(Moments, Moments)> {
    let (mut m, mut v) = (Moments::new(), Moments::new());
    for (name, data) in tensors {
        let n = data.num_elements();
        let values = data
            .convert::<f32>()
            .try_into_vec::<f32>()
            .map_err(|e| anyhow::anyhow!("optimizer tensor `{name}`: {e:?}"))?;
        let tensor = Tensor::<1>::from_data(TensorData::new(values, [n]), device);
        match name.split_once('.') {
            Some(("m", p)) => m.insert(p.to_string(), tensor),
            Some(("v", p)) => v.insert(p.to_string(), tensor),
            _ => bail!("optimizer tensor `{name}`: expected m.<path> or v.<path>"),
        };
    }
    Ok((m, v))
}

/// Refuse AdamW moments that do not belong to a model with these parameter
/// `shapes` (from `params::shapes`): a moment of a parameter the model does
/// not have, or of another size. A parameter with no moments starts from
/// zero ones, as in a fresh run.
pub fn check_moments(
    shapes: &BTreeMap<String, Vec<usize>>,
    m: &Moments,
    v: &Moments,
) -> Result<()> {
    for (which, moments) in [("m", m), ("v", v)] {
        for (path, t) in moments {
            let Some(shape) = shapes.get(path) else {
                bail!(
                    "optimizer.safetensors holds moments (`{which}.{path}`) of a parameter this \
                     model does not have: the optimizer state belongs to another model"
                );
            };
            let want: usize = shape.iter().product();
            let got = t.dims()[0];
            if got != want {
                bail!(
                    "optimizer.safetensors: `{which}.{path}` holds {got} values for a parameter \
                     of {want} ({shape:?}): the optimizer state belongs to another model"
                );
            }
        }
    }
    Ok(())
}

/// Read the loop state and optimizer tensors of a checkpoint.
pub fn read_state(dir: &Path) -> Result<(TrainState, BTreeMap<String, TensorData>)> {
    let state = read_state_file(dir)?;
    let opt = tensorfile::read(&dir.join("optimizer.safetensors"))?;
    Ok((state, opt.into_iter().collect()))
}
