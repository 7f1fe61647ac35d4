//! `switchyard routing-report`: a checkpoint evaluated on named corpora,
//! one domain each, written as `report.md` (per domain: loss, perplexity,
//! drop rate, max/mean load, the experts above twice their fair share; per
//! layer: the specialisation score and the expert × domain heat map) beside
//! `report.json` and one PNG per MoE layer. It is the check to run before a
//! fine-tune ships: routers that fail on one domain show it here.

use super::domains::{heatmap_png, DomainReport};
use crate::config::{DropPolicy, RunConfig, SourceConfig, SourceKind};
use anyhow::{bail, Context, Result};
use std::fmt::Write as _;
use std::path::Path;

/// `NAME=PATH` → (name, path), refusing empty parts and repeated names.
pub fn parse_named(args: &[String]) -> Result<Vec<(String, String)>> {
    let mut out: Vec<(String, String)> = Vec::new();
    for a in args {
        let Some((name, path)) = a.split_once('=') else {
            bail!("--data {a}: expected NAME=PATH, e.g. code=data/rust-std");
        };
        let (name, path) = (name.trim(), path.trim());
        if name.is_empty() || path.is_empty() {
            bail!("--data {a}: both NAME and PATH must be given (NAME=PATH)");
        }
        if out.iter().any(|(n, _)| n == name) {
            bail!("--data: the domain name \"{name}\" is given twice");
        }
        out.push((name.to_string(), path.to_string()));
    }
    Ok(out)
}

/// One source per named corpus: JSONL for `.jsonl`/`.json`, parquet for
/// `.parquet`, text otherwise (a run of `blank_lines` blank lines ends a
/// document); `text_field` names the JSONL/parquet field.
pub fn domain_sources(
    named: &[(String, String)],
    blank_lines: usize,
    text_field: &str,
) -> Vec<SourceConfig> {
    named
        .iter()
        .map(|(name, path)| {
            let lower = path.to_ascii_lowercase();
            let kind = if lower.ends_with(".jsonl") || lower.ends_with(".json") {
                SourceKind::Jsonl
            } else if lower.ends_with(".parquet") {
                SourceKind::Parquet
            } else {
                SourceKind::Text
            };
            SourceConfig {
                name: Some(name.clone()),
                kind,
                paths: vec![path.clone()],
                text_field: text_field.to_string(),
                blank_lines,
                ..SourceConfig::default()
            }
        })
        .collect()
}

/// Turn a checkpoint's config into the report's: the named corpora as the
/// sources (every document evaluated) and, with
/// `capacity_factor`, capacity-limited evaluation routing at that factor
/// (the drop policy, or reroute when the checkpoint reroutes). Returns a
/// description of the routing.
pub fn prepare(
    cfg: &mut RunConfig,
    sources: Vec<SourceConfig>,
    capacity_factor: Option<f64>,
) -> Result<String> {
    cfg.data.sources = sources;
    cfg.data.val_fraction = 1.0 - f64::EPSILON;
    cfg.data.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Some(cf) = capacity_factor {
        if !(cf > 0.0 && cf.is_finite()) {
            bail!("--capacity-factor must be a finite number > 0, got {cf}");
        }
        cfg.moe.eval_capacity_factor = cf;
        if cfg.moe.drop_policy == DropPolicy::Dropless {
            cfg.moe.drop_policy = DropPolicy::Drop;
        }
    }
    Ok(match cfg.moe.drop_policy {
        DropPolicy::Dropless => "dropless (every assignment computed)".to_string(),
        DropPolicy::Drop => format!("capacity factor {} (drop)", cfg.moe.eval_capacity_factor),
        DropPolicy::Reroute => {
            format!("capacity factor {} (reroute)", cfg.moe.eval_capacity_factor)
        }
    })
}

/// One report from the reports of single domains (each evaluated on its
/// own stream, so that every domain gets its share of batches).
pub fn merge(parts: Vec<DomainReport>) -> DomainReport {
    let mut out = DomainReport {
        names: Vec::new(),
        loss_sum: Vec::new(),
        tokens: Vec::new(),
        layers: Vec::new(),
    };
    for p in parts {
        out.names.extend(p.names);
        out.loss_sum.extend(p.loss_sum);
        out.tokens.extend(p.tokens);
        if out.layers.is_empty() {
            out.layers = p.layers;
        } else {
            for (acc, l) in out.layers.iter_mut().zip(p.layers) {
                acc.routed.extend(l.routed);
                acc.kept.extend(l.kept);
            }
        }
    }
    out
}

/// Write `report.md`, `report.json` and `layer{i}.png` into `dir`.
pub fn write(dir: &Path, checkpoint: &str, routing: &str, report: &DomainReport) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut md = String::new();
    let _ = writeln!(md, "# Routing report\n");
    let _ = writeln!(md, "- checkpoint: `{checkpoint}`");
    let _ = writeln!(md, "- routing: {routing}");
    let _ = writeln!(md, "- MoE layers: {}\n", report.layers.len());
    let _ = writeln!(md, "| domain | tokens | loss | perplexity |");
    let _ = writeln!(md, "|---|---|---|---|");
    for ((name, n), loss) in report.names.iter().zip(&report.tokens).zip(report.losses()) {
        match loss {
            Some(l) => {
                let _ = writeln!(md, "| {name} | {n:.0} | {l:.4} | {:.2} |", l.exp());
            }
            None => {
                let _ = writeln!(md, "| {name} | 0 | | |");
            }
        }
    }
    for (i, map) in report.layers.iter().enumerate() {
        let _ = writeln!(md, "\n## MoE layer {i}\n");
        match map.specialisation() {
            Some(s) => {
                let _ = writeln!(
                    md,
                    "Specialisation (I(expert; domain) / H(domain)): **{s:.3}** \
                     (0: routing ignores the domain, 1: the domain decides the expert).\n"
                );
            }
            None => {
                let _ = writeln!(md, "Specialisation: needs two domains with tokens.\n");
            }
        }
        let _ = writeln!(
            md,
            "| domain | drop rate | max/mean load | experts above 2× their fair share |"
        );
        let _ = writeln!(md, "|---|---|---|---|");
        let (drops, ratios, hot, shares) = (
            map.drop_rates(),
            map.max_over_mean(),
            map.hot_experts(),
            map.shares(),
        );
        for (d, name) in report.names.iter().enumerate() {
            if report.tokens[d] == 0.0 {
                continue;
            }
            let hot: Vec<String> = hot[d]
                .iter()
                .map(|&e| format!("{e} ({:.0}%)", shares[d][e] * 100.0))
                .collect();
            let _ = writeln!(
                md,
                "| {name} | {:.2}% | {:.2} | {} |",
                drops[d] * 100.0,
                ratios[d],
                if hot.is_empty() {
                    "none".to_string()
                } else {
                    hot.join(", ")
                }
            );
        }
        let png = format!("layer{i}.png");
        heatmap_png(
            &dir.join(&png),
            &format!("MoE layer {i}: each domain's share per expert"),
            &report.names,
            map,
        )?;
        let _ = writeln!(md, "\n![MoE layer {i}]({png})");
    }
    std::fs::write(dir.join("report.md"), md).context("writing report.md")?;
    let json = serde_json::json!({
        "checkpoint": checkpoint,
        "routing": routing,
        "domains": report,
    });
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(&json)?,
    )
    .context("writing report.json")?;
    Ok(())
}
