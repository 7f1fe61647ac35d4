//! Run configuration: one TOML file with `[model]`, `[moe]`, `[data]`,
//! `[optim]`, `[train]` and `[log]` sections, plus `--set section.key=value`
//! overrides. Raw input is parsed and validated once into a [`RunConfig`];
//! every error names the key's full path and what is allowed.

mod architecture;
mod data;
mod model;
mod moe;
mod train;
mod upcycle;

pub use architecture::{Adopted, Architecture, MoeArchitecture, FUNCTION_KEYS};
pub use model::{ModelConfig, QkNorm};
pub use moe::{BalanceScope, DropPolicy, MoeConfig, ReviveFrom, RouterScore, TopkOrder};
pub use train::{LogConfig, NonFinitePolicy, OptimConfig, Precision, ProgressMode, TrainConfig};
pub use upcycle::UpcycleConfig;

pub use data::{DataConfig, OnBadRecord, Sharding, SourceConfig, SourceKind};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::Path;

/// A configuration error that names the key at fault.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    /// Dotted path of the key, e.g. `moe.top_k`.
    pub key: String,
    /// What is wrong and what is allowed.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid config key `{}`: {}", self.key, self.message)
    }
}

impl std::error::Error for ConfigError {}

/// The ceilings of the size keys: far above any model or batch this trainer
/// can hold, and low enough that no product of sizes it computes leaves 64
/// bits (in a release build such a product would wrap silently).
pub(crate) mod limit {
    /// Widths: `model.d_model`, `model.d_ff`, `model.head_dim`,
    /// `moe.d_expert`, `moe.d_shared_expert`.
    pub const WIDTH: usize = 1 << 20;
    /// `model.vocab_size`.
    pub const VOCAB: usize = 1 << 24;
    /// `model.n_layers`, `model.n_heads`, `model.n_kv_heads`.
    pub const COUNT: usize = 1 << 12;
    /// `model.seq_len`.
    pub const SEQ_LEN: usize = 1 << 22;
    /// `moe.num_experts`.
    pub const EXPERTS: usize = 1 << 16;
    /// `moe.num_shared_experts`.
    pub const SHARED: usize = 1 << 10;
    /// `train.batch_size`, `train.grad_accum`.
    pub const BATCH: usize = 1 << 16;
    /// `data.shuffle_buffer` (windows held on the host).
    pub const SHUFFLE: usize = 1 << 20;
    /// `data.workers` (tokenizer threads).
    pub const WORKERS: usize = 1 << 10;
}

/// Refuse a size key above its ceiling in [`limit`].
pub(crate) fn at_most(key: &str, value: usize, max: usize) -> Result<(), ConfigError> {
    if value > max {
        return Err(err(key, format!("must be at most {max}, got {value}")));
    }
    Ok(())
}

pub(crate) fn err(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.to_string(),
        message: message.into(),
    }
}

/// Everything a training run needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// The transformer.
    pub model: ModelConfig,
    /// The routed-expert layers.
    pub moe: MoeConfig,
    /// Corpus, tokenizer and stream.
    pub data: DataConfig,
    /// Optimizer and learning-rate schedule.
    pub optim: OptimConfig,
    /// Steps, batches, evaluation, checkpoints.
    pub train: TrainConfig,
    /// Monitoring and alerts.
    pub log: LogConfig,
    /// Upcycle the dense `train.init_from` model into an MoE before training.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upcycle: Option<UpcycleConfig>,
}

/// A deserialisation path in the form `--set` takes: list elements by
/// index after a dot (`data.sources.0.weight`, not `data.sources[0].weight`).
fn override_key(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    path.iter()
        .filter_map(|s| match s {
            Segment::Seq { index } => Some(index.to_string()),
            Segment::Map { key } => Some(key.clone()),
            Segment::Enum { variant } => Some(variant.clone()),
            Segment::Unknown => None,
        })
        .collect::<Vec<_>>()
        .join(".")
}

impl RunConfig {
    /// Parse TOML text, apply `key=value` overrides, deserialize and validate.
    pub fn from_toml_str(text: &str, overrides: &[String]) -> Result<Self, ConfigError> {
        let mut table: toml::Table =
            toml::from_str(text).map_err(|e| err("<file>", format!("not valid TOML: {e}")))?;
        for o in overrides {
            apply_override(&mut table, o)?;
        }
        let cfg: RunConfig =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
                let key = override_key(e.path());
                err(
                    if key.is_empty() { "<root>" } else { &key },
                    e.into_inner().to_string(),
                )
            })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Read a TOML file, apply overrides, validate.
    pub fn load(path: &Path, overrides: &[String]) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading config {}: {e}", path.display()))?;
        Self::from_toml_str(&text, overrides)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    /// All cross-field checks, naming the offending key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.model.validate()?;
        self.moe.validate(&self.model)?;
        self.data.validate()?;
        self.optim.validate()?;
        self.train.validate()?;
        self.log.validate()?;
        if self.data.val_fraction == 0.0 && self.train.eval_every > 0 {
            return Err(err(
                "data.val_fraction",
                format!(
                    "is 0, so no document is held out for the evaluations every \
                     train.eval_every = {} steps: set data.val_fraction above 0 (e.g. 0.05), \
                     or train.eval_every = 0",
                    self.train.eval_every
                ),
            ));
        }
        if let Some(up) = &self.upcycle {
            up.validate()?;
            if self.train.init_from.is_none() {
                return Err(err(
                    "upcycle",
                    "needs train.init_from: the dense model to upcycle",
                ));
            }
        }
        Ok(())
    }

    /// The `section.key` paths a config text and its overrides set
    /// explicitly (as opposed to defaults), for the sections `[model]` and
    /// `[moe]`.
    pub fn explicit_keys(text: &str, overrides: &[String]) -> Vec<String> {
        let mut out = Vec::new();
        if let Ok(t) = text.parse::<toml::Table>() {
            for section in ["model", "moe"] {
                if let Some(toml::Value::Table(s)) = t.get(section) {
                    out.extend(s.keys().map(|k| format!("{section}.{k}")));
                }
            }
        }
        for o in overrides {
            if let Some((k, _)) = o.split_once('=') {
                out.push(k.trim().to_string());
            }
        }
        out
    }

    /// The weights of block `layer`'s matrices a token passes through when
    /// `routed` of the routed experts take it: the attention projections,
    /// and the dense MLP or the shared experts and `routed` routed experts
    /// (norms and router left out). `top_k` counts the active weights,
    /// `num_experts` all of them.
    /// Saturates instead of overflowing, so that the memory check refuses
    /// an absurd config rather than wrapping around.
    pub fn block_weights(&self, layer: usize, routed: usize) -> usize {
        let (m, moe) = (&self.model, &self.moe);
        let product = |xs: &[usize]| xs.iter().fold(1, |p: usize, &x| p.saturating_mul(x));
        let (d, hd) = (m.d_model, m.head_dim());
        let attention = product(&[2, d, hd, m.n_heads.saturating_add(m.n_kv_heads)]);
        let ffn = if moe.is_moe_layer(layer) {
            let width = product(&[routed, moe.d_expert]).saturating_add(moe.shared_width());
            product(&[3, d, width])
        } else {
            product(&[3, d, m.d_ff])
        };
        attention.saturating_add(ffn)
    }

    /// The resolved config as TOML, every key written out.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("config serialises")
    }

    /// The keys that shape this run's parameters.
    pub fn architecture(&self) -> Architecture {
        Architecture {
            model: self.model.clone(),
            moe: self.moe.architecture(),
        }
    }

    /// Adopt `arch` as a unit (resume, `init_from`), keeping every other
    /// key of this config.
    pub fn set_architecture(&mut self, arch: Architecture) {
        self.model = arch.model;
        self.moe.set_architecture(arch.moe);
    }

    /// Architecture keys that differ between `self` and `other`, as
    /// `key: old -> new` lines.
    pub fn architecture_diff(&self, other: &RunConfig) -> Vec<String> {
        self.architecture().diff(&other.architecture())
    }
}

fn show(v: Option<&toml::Value>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "(unset)".into())
}

/// A config section as a TOML table.
fn table<T: Serialize>(section: &T) -> toml::Table {
    toml::Table::try_from(section).expect("config sections serialise to tables")
}

/// Apply one `section.key=value` override. The value is read as a TOML value
/// (number, bool, array, quoted string) and, failing that, as a bare string.
/// Array elements are addressed by index: `data.sources.0.weight=2`.
fn apply_override(table: &mut toml::Table, spec: &str) -> Result<(), ConfigError> {
    let (key, raw) = spec
        .split_once('=')
        .ok_or_else(|| err(spec, "an override must look like section.key=value"))?;
    let key = key.trim();
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.trim().to_string()));
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(err(key, "empty key segment"));
    }
    let mut node = table;
    for (i, part) in parts[..parts.len() - 1].iter().enumerate() {
        let here = parts[..=i].join(".");
        let entry = node
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        node = match entry {
            toml::Value::Table(t) => t,
            toml::Value::Array(items) => {
                let idx: usize =
                    parts
                        .get(i + 1)
                        .and_then(|s| s.parse().ok())
                        .ok_or_else(|| {
                            err(
                            &here,
                            "is a list: address an element by index, e.g. data.sources.0.weight",
                        )
                        })?;
                let len = items.len();
                let item = items.get_mut(idx).ok_or_else(|| {
                    err(
                        &here,
                        format!("has {len} element(s); index {idx} is out of range"),
                    )
                })?;
                let rest = parts[i + 2..].join(".");
                let toml::Value::Table(t) = item else {
                    return Err(err(&here, "elements are not tables"));
                };
                let mut sub = std::mem::take(t);
                let r = apply_override(&mut sub, &format!("{rest}={raw}"));
                *t = sub;
                return r.map_err(|e| err(&format!("{here}.{idx}.{}", e.key), e.message));
            }
            _ => return Err(err(&here, "is a value, not a section")),
        };
    }
    node.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let cfg = RunConfig::from_toml_str("", &[]).unwrap();
        assert_eq!(cfg, RunConfig::default());
    }

    #[test]
    fn unknown_keys_name_their_path_and_the_allowed_keys() {
        let e = RunConfig::from_toml_str("[moe]\ntopk = 2\n", &[]).unwrap_err();
        assert!(e.key.starts_with("moe"), "{e}");
        assert!(
            e.message.contains("topk") && e.message.contains("top_k"),
            "{e}"
        );
        let e = RunConfig::from_toml_str("[trian]\nsteps = 2\n", &[]).unwrap_err();
        assert!(
            e.message.contains("trian") && e.message.contains("train"),
            "{e}"
        );
        let e = RunConfig::from_toml_str("[moe]\ndrop_policy = \"sometimes\"\n", &[]).unwrap_err();
        assert_eq!(e.key, "moe.drop_policy");
        assert!(e.message.contains("dropless"), "{e}");
    }

    #[test]
    fn overrides_are_type_checked() {
        let cfg = RunConfig::from_toml_str(
            "[train]\nsteps = 10\n",
            &["train.steps=20".into(), "moe.capacity_factor=1.5".into()],
        )
        .unwrap();
        assert_eq!(cfg.train.steps, 20);
        assert_eq!(cfg.moe.capacity_factor, 1.5);
        let cfg = RunConfig::from_toml_str(
            "[[data.sources]]\npaths = [\"a\"]\n",
            &["data.sources.0.weight=2".into(), "moe.score=sigmoid".into()],
        )
        .unwrap();
        assert_eq!(cfg.data.sources[0].weight, 2.0);
        assert_eq!(cfg.moe.score, RouterScore::Sigmoid);

        let e = RunConfig::from_toml_str("", &["train.steps=many".into()]).unwrap_err();
        assert_eq!(e.key, "train.steps");
        let e = RunConfig::from_toml_str("", &["moe.top_k=9".into()]).unwrap_err();
        assert_eq!(e.key, "moe.top_k");
        let e = RunConfig::from_toml_str("", &["moe.nope=1".into()]).unwrap_err();
        assert!(e.message.contains("nope"), "{e}");
        let e = RunConfig::from_toml_str("", &["steps".into()]).unwrap_err();
        assert!(e.message.contains("section.key=value"), "{e}");
    }

    /// The key an error names is the key `--set` takes to fix it.
    #[test]
    fn error_keys_are_override_keys() {
        let text = "[[data.sources]]\npaths = [\"a\"]\nweight = \"heavy\"\n";
        let e = RunConfig::from_toml_str(text, &[]).unwrap_err();
        assert_eq!(e.key, "data.sources.0.weight", "{e}");
        let fixed = format!("{}=2.0", e.key);
        let cfg = RunConfig::from_toml_str(text, &[fixed]).unwrap();
        assert_eq!(cfg.data.sources[0].weight, 2.0);
        let text = "[[data.sources]]\npaths = [\"a\"]\nweight = -1.0\n";
        let e = RunConfig::from_toml_str(text, &[]).unwrap_err();
        assert_eq!(e.key, "data.sources.0.weight", "{e}");
    }

    #[test]
    fn resolved_config_round_trips() {
        let cfg = RunConfig::from_toml_str("[moe]\nnum_experts = 4\n", &[]).unwrap();
        let again = RunConfig::from_toml_str(&cfg.to_toml(), &[]).unwrap();
        assert_eq!(cfg, again);
    }

    #[test]
    fn architecture_diff_lists_changed_keys() {
        let a = RunConfig::default();
        let mut b = a.clone();
        b.model.d_model = 256;
        b.moe.num_experts = 4;
        b.moe.capacity_factor = 3.0; // a routing knob, not architecture
        b.train.steps = 5;
        let d = a.architecture_diff(&b);
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(d[0].starts_with("model.d_model: 128 -> 256"), "{d:?}");
        assert!(d[1].starts_with("moe.num_experts: 8 -> 4"), "{d:?}");
    }
}
