//! Sweeps: many training runs that differ in a few config keys, one command.
//!
//! A sweep file names a base run config, overrides for every point, and the
//! axes: a full grid (`[grid]`) or explicit points (`[[points]]`). An axis is
//! any config key with a list of values or a `{ log = [a, b], count = n }` /
//! `{ linear = [a, b], count = n }` range. `seeds = [...]` repeats each point.
//!
//! ```toml
//! base = "configs/tiny.toml"
//! name = "aux-capacity"
//! [set]
//! "train.steps" = 300
//! [grid]
//! "moe.aux_loss_coef" = [0.0, 0.001, 0.01, 0.1]
//! "moe.capacity_factor" = [1.0, 1.25, 2.0]
//! ```

mod halving;
pub mod plots;
mod points;
pub mod run;
pub mod seeds;
pub mod summary;

use crate::config::RunConfig;
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// The sweep file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepFile {
    /// The run config every point starts from (relative to the working directory).
    pub base: String,
    /// Runs go to `runs/<name>/<point-id>/`.
    pub name: String,
    /// Overrides applied to every point.
    #[serde(default)]
    pub set: toml::Table,
    /// Axes of a full Cartesian grid, in order (the first varies slowest).
    #[serde(default)]
    pub grid: toml::Table,
    /// Explicit points, instead of a grid.
    #[serde(default)]
    pub points: Vec<toml::Table>,
    /// Repeat every point with each of these `train.seed` values.
    #[serde(default)]
    pub seeds: Vec<u64>,
}

/// One run of the sweep.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// Readable id, also the run directory name: `aux=0.01,cf=1.25`.
    pub id: String,
    /// The swept keys and their values, in axis order.
    pub values: Vec<(String, toml::Value)>,
}

impl Point {
    /// `--set` overrides for this point (after the sweep's `[set]`).
    pub fn overrides(&self) -> Vec<String> {
        self.values
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect()
    }
}

/// A parsed, expanded sweep.
#[derive(Debug, Clone)]
pub struct Sweep {
    /// The file as written.
    pub file: SweepFile,
    /// The base config path.
    pub base: PathBuf,
    /// Overrides for every point.
    pub common: Vec<String>,
    /// The swept keys, in axis order.
    pub axes: Vec<String>,
    /// Every point.
    pub points: Vec<Point>,
}

/// Short names for the keys people sweep most; others use their last segment.
fn short_key(key: &str) -> String {
    let known = [
        ("moe.aux_loss_coef", "aux"),
        ("moe.seq_aux_loss_coef", "seqaux"),
        ("moe.z_loss_coef", "z"),
        ("moe.capacity_factor", "cf"),
        ("moe.eval_capacity_factor", "evalcf"),
        ("moe.top_k", "k"),
        ("moe.num_experts", "E"),
        ("moe.expert_dropout", "edrop"),
        ("moe.logit_noise_std", "noise"),
        ("moe.jitter_eps", "jitter"),
        ("moe.bias_update_rate", "bias_rate"),
        ("optim.lr", "lr"),
        ("train.seed", "seed"),
    ];
    known
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, s)| s.to_string())
        .unwrap_or_else(|| key.rsplit('.').next().unwrap_or(key).to_string())
}

pub(crate) fn show_value(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Float(f) => format!("{f}"),
        other => other.to_string(),
    }
}

/// The values of one axis: a list, or a log/linear range.
fn axis_values(key: &str, spec: &toml::Value) -> Result<Vec<toml::Value>> {
    match spec {
        toml::Value::Array(a) if !a.is_empty() => Ok(a.clone()),
        toml::Value::Array(_) => bail!("sweep axis `{key}`: the list of values is empty"),
        toml::Value::Table(t) => {
            let count = t
                .get("count")
                .and_then(|c| c.as_integer())
                .filter(|&c| c >= 1)
                .with_context(|| format!("sweep axis `{key}`: a range needs `count` >= 1"))?
                as usize;
            let (kind, ends) = match (t.get("log"), t.get("linear")) {
                (Some(e), None) => ("log", e),
                (None, Some(e)) => ("linear", e),
                _ => bail!("sweep axis `{key}`: a range is {{ log = [a, b], count = n }} or {{ linear = [a, b], count = n }}"),
            };
            let unknown: Vec<&String> = t
                .keys()
                .filter(|k| !["count", "log", "linear"].contains(&k.as_str()))
                .collect();
            if !unknown.is_empty() {
                bail!("sweep axis `{key}`: unknown range field(s) {unknown:?} (allowed: log, linear, count)");
            }
            let ends = ends.as_array().filter(|a| a.len() == 2).with_context(|| {
                format!("sweep axis `{key}`: `{kind}` takes two numbers [start, end]")
            })?;
            let num = |v: &toml::Value| v.as_float().or_else(|| v.as_integer().map(|i| i as f64));
            let (a, b) = match (num(&ends[0]), num(&ends[1])) {
                (Some(a), Some(b)) => (a, b),
                _ => bail!("sweep axis `{key}`: range ends must be numbers"),
            };
            let ints = ends.iter().all(|v| v.is_integer());
            if kind == "log" && (a <= 0.0 || b <= 0.0) {
                bail!("sweep axis `{key}`: a log range needs positive ends");
            }
            Ok((0..count)
                .map(|i| {
                    let t = if count == 1 {
                        0.0
                    } else {
                        i as f64 / (count - 1) as f64
                    };
                    let x = if kind == "log" {
                        (a.ln() + t * (b.ln() - a.ln())).exp()
                    } else {
                        a + t * (b - a)
                    };
                    if ints {
                        toml::Value::Integer(x.round() as i64)
                    } else {
                        // Six significant digits keep ids readable.
                        toml::Value::Float(format!("{x:.6e}").parse().unwrap())
                    }
                })
                .collect())
        }
        _ => bail!("sweep axis `{key}`: expected a list of values or a range table"),
    }
}

fn make_point(values: Vec<(String, toml::Value)>) -> Point {
    let id = values
        .iter()
        .map(|(k, v)| format!("{}={}", short_key(k), show_value(v)))
        .collect::<Vec<_>>()
        .join(",");
    Point {
        id: if id.is_empty() { "base".into() } else { id },
        values,
    }
}

impl Sweep {
    /// Parse sweep TOML; paths in it are relative to the working directory.
    pub fn parse(text: &str) -> Result<Self> {
        let file: SweepFile = toml::from_str(text).context("invalid sweep file")?;
        if file.name.is_empty()
            || file.name.contains(['/', '\\'])
            || file.name == "."
            || file.name == ".."
        {
            bail!(
                "sweep `name` must be a plain directory name, got {:?}",
                file.name
            );
        }
        if !file.grid.is_empty() && !file.points.is_empty() {
            bail!("a sweep has either [grid] or [[points]], not both");
        }
        let common: Vec<String> = file.set.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut axes: Vec<String> = Vec::new();
        let mut points: Vec<Point> = vec![make_point(Vec::new())];
        if !file.grid.is_empty() {
            for (key, spec) in &file.grid {
                let values = axis_values(key, spec)?;
                axes.push(key.clone());
                points = points
                    .into_iter()
                    .flat_map(|p| {
                        values.iter().map(move |v| {
                            let mut vals = p.values.clone();
                            vals.push((key.clone(), v.clone()));
                            make_point(vals)
                        })
                    })
                    .collect();
            }
        } else if !file.points.is_empty() {
            for p in &file.points {
                for k in p.keys() {
                    if !axes.contains(k) {
                        axes.push(k.clone());
                    }
                }
            }
            points = file
                .points
                .iter()
                .map(|p| make_point(p.iter().map(|(k, v)| (k.clone(), v.clone())).collect()))
                .collect();
        }
        if !file.seeds.is_empty() {
            axes.push("train.seed".into());
            points = points
                .into_iter()
                .flat_map(|p| {
                    file.seeds.iter().map(move |s| {
                        let mut vals = p.values.clone();
                        vals.push(("train.seed".into(), toml::Value::Integer(*s as i64)));
                        make_point(vals)
                    })
                })
                .collect();
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = points.iter().find(|p| !seen.insert(p.id.clone())) {
            bail!(
                "two sweep points share the id `{}`: make the axis values distinct",
                dup.id
            );
        }
        Ok(Self {
            base: PathBuf::from(&file.base),
            common,
            axes,
            points,
            file,
        })
    }

    /// Read a sweep file and check every key against the base config.
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let sweep = Self::parse(&text).with_context(|| format!("in {}", path.display()))?;
        sweep.check_keys()?;
        Ok(sweep)
    }

    /// Unknown keys anywhere in the sweep stop it at once, naming the key;
    /// a value that a single point's validation rejects only fails that point.
    pub fn check_keys(&self) -> Result<()> {
        let base = std::fs::read_to_string(&self.base)
            .with_context(|| format!("sweep base config {}", self.base.display()))?;
        RunConfig::from_toml_str(&base, &self.common)
            .map_err(|e| anyhow::anyhow!("sweep [set] with base {}: {e}", self.base.display()))?;
        for p in &self.points {
            for o in p.overrides() {
                if let Err(e) = RunConfig::from_toml_str(
                    &base,
                    &[self.common.clone(), vec![o.clone()]].concat(),
                ) {
                    if e.message.contains("unknown field") || e.message.contains("not a section") {
                        bail!("sweep axis `{o}`: {e}");
                    }
                }
            }
        }
        Ok(())
    }

    /// The resolved config of one point, or why it is invalid.
    pub fn point_config(&self, p: &Point) -> Result<RunConfig, String> {
        let mut overrides = self.common.clone();
        overrides.extend(p.overrides());
        RunConfig::load(&self.base, &overrides).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_expands_to_the_cartesian_product() {
        let s = Sweep::parse(
            "base = \"b.toml\"\nname = \"s\"\n[set]\n\"train.steps\" = 3\n[grid]\n\"moe.aux_loss_coef\" = [0.0, 0.01]\n\"moe.capacity_factor\" = [1.0, 1.25, 2.0]\n",
        )
        .unwrap();
        let ids: Vec<&str> = s.points.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "aux=0,cf=1",
                "aux=0,cf=1.25",
                "aux=0,cf=2",
                "aux=0.01,cf=1",
                "aux=0.01,cf=1.25",
                "aux=0.01,cf=2"
            ]
        );
        assert_eq!(s.common, vec!["train.steps=3"]);
        assert_eq!(
            s.points[4].overrides(),
            vec!["moe.aux_loss_coef=0.01", "moe.capacity_factor=1.25"]
        );
        assert_eq!(s.axes, vec!["moe.aux_loss_coef", "moe.capacity_factor"]);
    }

    #[test]
    fn ranges_points_and_seeds() {
        let s = Sweep::parse(
            "base = \"b\"\nname = \"r\"\n[grid]\n\"optim.lr\" = { log = [1e-4, 1e-2], count = 3 }\n\"moe.top_k\" = { linear = [1, 3], count = 3 }\n",
        )
        .unwrap();
        let ids: Vec<&str> = s.points.iter().map(|p| p.id.as_str()).take(4).collect();
        assert_eq!(
            ids,
            [
                "lr=0.0001,k=1",
                "lr=0.0001,k=2",
                "lr=0.0001,k=3",
                "lr=0.001,k=1"
            ]
        );
        assert_eq!(s.points.len(), 9);
        assert_eq!(s.points[8].id, "lr=0.01,k=3");

        let s = Sweep::parse(
            "base = \"b\"\nname = \"p\"\nseeds = [1, 2]\n[[points]]\n\"moe.top_k\" = 1\n[[points]]\n\"moe.top_k\" = 2\n\"moe.capacity_factor\" = 1.5\n",
        )
        .unwrap();
        let ids: Vec<&str> = s.points.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "k=1,seed=1",
                "k=1,seed=2",
                "k=2,cf=1.5,seed=1",
                "k=2,cf=1.5,seed=2"
            ]
        );
    }

    #[test]
    fn malformed_sweeps_are_refused() {
        for (text, needle) in [
            ("base = \"b\"\nname = \"x\"\nbogus = 1\n", "bogus"),
            (
                "base = \"b\"\nname = \"x\"\n[grid]\na = [1]\n[[points]]\nb = 1\n",
                "not both",
            ),
            (
                "base = \"b\"\nname = \"x\"\n[grid]\n\"optim.lr\" = { log = [0, 1], count = 2 }\n",
                "positive",
            ),
            (
                "base = \"b\"\nname = \"x\"\n[grid]\n\"optim.lr\" = { exp = [1, 2], count = 2 }\n",
                "range",
            ),
            (
                "base = \"b\"\nname = \"x\"\n[grid]\n\"optim.lr\" = []\n",
                "empty",
            ),
            ("base = \"b\"\nname = \"a/b\"\n", "plain directory"),
        ] {
            let e = format!("{:#}", Sweep::parse(text).unwrap_err());
            assert!(e.contains(needle), "{text:?}: {e}");
        }
    }
}
