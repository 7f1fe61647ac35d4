//! The files of expert placement: the per-expert counts a run logged
//! (what `plan-experts` reads) and the placement a plan file holds (what
//! `train.expert_placement` reads; [`super::plan::to_json`] writes it).

use super::Layout;
use anyhow::{bail, Context, Result};
use std::path::Path;

/// What the run logged: per MoE layer, the assignments per step each
/// origin rank's tokens made of each expert (`[layer][rank][expert]`).
#[derive(Debug, Clone)]
pub struct Counts {
    /// `[layer][rank][expert]`, mean per step.
    pub by_rank: Vec<Vec<Vec<f64>>>,
    /// Whether `by_rank` holds the ranks' own counts (else one row, the
    /// global counts).
    pub per_rank: bool,
    /// Mean logged tokens per second (all ranks).
    pub tokens_per_s: f64,
    /// Steps averaged.
    pub steps: usize,
}

/// Read the last `steps` logged steps of `metrics.jsonl`.
pub fn read_counts(run: &Path, steps: usize) -> Result<Counts> {
    let path = run.join("metrics.jsonl");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let rows: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("moe/layer0/kept_per_expert").is_some())
        .collect();
    if rows.is_empty() {
        bail!(
            "{} logs no per-expert counts (a run of a model with MoE layers?)",
            path.display()
        );
    }
    let rows = &rows[rows.len().saturating_sub(steps.max(1))..];
    let floats = |v: &serde_json::Value| -> Vec<f64> {
        v.as_array()
            .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
            .unwrap_or_default()
    };
    let n_layers = (0..)
        .take_while(|l| {
            rows[0]
                .get(format!("moe/layer{l}/kept_per_expert"))
                .is_some()
        })
        .count();
    let per_rank = rows
        .iter()
        .all(|r| r.get("moe/layer0/kept_by_rank").is_some());
    let mut by_rank = Vec::with_capacity(n_layers);
    for l in 0..n_layers {
        let mut sum: Vec<Vec<f64>> = Vec::new();
        for r in rows {
            let each: Vec<Vec<f64>> = if per_rank {
                r[format!("moe/layer{l}/kept_by_rank")]
                    .as_array()
                    .map(|a| a.iter().map(floats).collect())
                    .unwrap_or_default()
            } else {
                vec![floats(&r[format!("moe/layer{l}/kept_per_expert")])]
            };
            if sum.is_empty() {
                sum = each.iter().map(|v| vec![0.0; v.len()]).collect();
            }
            if each.len() != sum.len() || each.iter().zip(&sum).any(|(a, b)| a.len() != b.len()) {
                bail!(
                    "{}: layer {l}'s counts change shape between steps",
                    path.display()
                );
            }
            for (s, v) in sum.iter_mut().zip(&each) {
                s.iter_mut().zip(v).for_each(|(a, b)| *a += b);
            }
        }
        let n = rows.len() as f64;
        by_rank.push(
            sum.into_iter()
                .map(|v| v.into_iter().map(|x| x / n).collect())
                .collect(),
        );
    }
    let tps: Vec<f64> = rows
        .iter()
        .filter_map(|r| r.get("throughput/tokens_per_s")?.as_f64())
        .collect();
    Ok(Counts {
        by_rank,
        per_rank,
        tokens_per_s: tps.iter().sum::<f64>() / tps.len().max(1) as f64,
        steps: rows.len(),
    })
}

/// The ranks of the group each expert lives on, per MoE layer, from
/// `train.expert_placement`: "FILE" (its balanced placement) or
/// "FILE:STRATEGY", a plan `plan-experts --out` wrote for `devices`
/// devices; `experts` holds each MoE layer's expert count. Per layer and
/// expert: the devices holding it, each with its share of the expert's rows
/// (one device with share 1, or several for a replicated expert).
pub fn read_placement(spec: &str, devices: usize, experts: &[usize]) -> Result<Vec<Layout>> {
    let key = "train.expert_placement";
    let (file, name) = match spec.rsplit_once(':') {
        Some((f, n)) if ["contiguous", "round-robin", "balanced"].contains(&n) => (f, n),
        _ => (spec, "balanced"),
    };
    let text = std::fs::read_to_string(file).with_context(|| format!("{key}: reading {file}"))?;
    let plan: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{key}: {file} is not JSON"))?;
    let Some(layers) = plan
        .get(name)
        .and_then(|p| p.get("layers"))
        .and_then(|l| l.as_array())
    else {
        bail!("{key}: {file} holds no `{name}` placement (written by `switchyard plan-experts --out`?)");
    };
    if layers.len() != experts.len() {
        bail!(
            "{key}: {file} places {} MoE layers; the model has {}",
            layers.len(),
            experts.len()
        );
    }
    let mut out = Vec::new();
    for (l, (layer, &e)) in layers.iter().zip(experts).enumerate() {
        let homes: Vec<Vec<(u64, f64)>> = layer
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|h| {
                        h.as_array()
                            .map(|ps| {
                                ps.iter()
                                    .filter_map(|p| {
                                        Some((p.get(0)?.as_u64()?, p.get(1)?.as_f64()?))
                                    })
                                    .collect()
                            })
                            .unwrap_or_default()
                    })
                    .collect()
            })
            .unwrap_or_default();
        if homes.len() != e {
            bail!(
                "{key}: {file} places {} experts in MoE layer {l}; it has {e}",
                homes.len()
            );
        }
        for (x, h) in homes.iter().enumerate() {
            let what = format!("{key}: {file}: expert {x} of MoE layer {l}");
            if h.is_empty() {
                bail!("{what} has no device");
            }
            if let Some((d, _)) = h.iter().find(|(d, _)| *d as usize >= devices) {
                bail!("{what} is put on device {d}; train.expert_parallel is {devices}");
            }
            if h.iter().any(|(_, s)| !(*s > 0.0 && s.is_finite())) {
                bail!("{what} has a share that is not a positive number");
            }
            let total: f64 = h.iter().map(|p| p.1).sum();
            if (total - 1.0).abs() > 1e-9 {
                bail!("{what}: its shares sum to {total}, not 1");
            }
            let mut devs: Vec<u64> = h.iter().map(|p| p.0).collect();
            devs.sort_unstable();
            devs.dedup();
            if devs.len() != h.len() {
                bail!("{what} is put twice on one device");
            }
        }
        let layer_homes: Layout = homes
            .iter()
            .map(|h| h.iter().map(|&(d, s)| (d as usize, s)).collect())
            .collect();
        for dev in 0..devices {
            if !layer_homes.iter().any(|h| h.iter().any(|p| p.0 == dev)) {
                bail!("{key}: {file} gives device {dev} none of MoE layer {l}'s experts");
            }
        }
        out.push(layer_homes);
    }
    Ok(out)
}
