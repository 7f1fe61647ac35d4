//! The answer at the end of a sweep: one row per point, read from each run's
//! `metrics.jsonl`, ranked by final validation loss, as `summary.csv` and
//! `summary.md`.

use super::Point;
use anyhow::Result;
use serde_json::Value;
use std::path::Path;

/// How a point ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    /// Trained all its steps.
    Finished,
    /// Stopped early by the search (successive halving) at this step.
    Stopped(u64),
    /// Failed; the reason.
    Failed(String),
}

/// One point's numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct PointResult {
    /// The point.
    pub id: String,
    /// Its swept values, in axis order.
    pub values: Vec<(String, toml::Value)>,
    /// How it ended.
    pub status: Status,
    /// Steps trained.
    pub steps: u64,
    /// Last validation loss.
    pub final_eval_loss: Option<f64>,
    /// Lowest validation loss.
    pub best_eval_loss: Option<f64>,
    /// Median training tokens/s.
    pub tokens_per_s: Option<f64>,
    /// Drop rate averaged over steps and MoE layers.
    pub mean_drop_rate: Option<f64>,
    /// Mean over steps and layers of the share of assignments rerouted.
    pub mean_reroute_rate: Option<f64>,
    /// Max/mean expert load averaged over steps and layers.
    pub mean_max_over_mean: Option<f64>,
    /// Worst max/mean load of any layer at any step.
    pub worst_max_over_mean: Option<f64>,
    /// Dead experts (all layers) at the last step.
    pub dead_experts: Option<f64>,
    /// Experts revived (`moe.revive_dead_experts`).
    pub revivals: u64,
    /// Router entropy averaged over steps and layers.
    pub mean_router_entropy: Option<f64>,
    /// A dead-expert alert fired, or experts were dead at the end.
    pub collapse: bool,
    /// Per step: token share of each expert, averaged over MoE layers.
    pub share_history: Vec<(u64, Vec<f64>)>,
    /// Validation loss at each step it was measured.
    pub eval_history: Vec<(u64, f64)>,
}

impl PointResult {
    /// A point with no numbers yet (its run wrote no metrics).
    pub fn empty(id: &str, values: Vec<(String, toml::Value)>, status: Status) -> Self {
        Self {
            id: id.into(),
            values,
            status,
            steps: 0,
            final_eval_loss: None,
            best_eval_loss: None,
            tokens_per_s: None,
            mean_drop_rate: None,
            mean_reroute_rate: None,
            mean_max_over_mean: None,
            worst_max_over_mean: None,
            dead_experts: None,
            revivals: 0,
            mean_router_entropy: None,
            collapse: false,
            share_history: Vec::new(),
            eval_history: Vec::new(),
        }
    }
}

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// Values of every key matching `moe/layer{i}/{suffix}` in one record.
fn per_layer(rec: &serde_json::Map<String, Value>, suffix: &str) -> Vec<f64> {
    rec.iter()
        .filter(|(k, _)| {
            k.starts_with("moe/layer") && k.ends_with(suffix) && k.matches('/').count() == 2
        })
        .filter_map(|(_, v)| v.as_f64())
        .collect()
}

/// Summarise one run directory.
pub fn read_point(point: &Point, run_dir: &Path, status: Status) -> Result<PointResult> {
    let mut r = PointResult::empty(&point.id, point.values.clone(), status);
    let Ok(text) = std::fs::read_to_string(run_dir.join("metrics.jsonl")) else {
        return Ok(r);
    };
    let (mut drops, mut ratios, mut entropies, mut speeds, mut evals) =
        (vec![], vec![], vec![], vec![], vec![]);
    let mut reroutes = vec![];
    let mut last_dead = None;
    for line in text.lines() {
        let Ok(Value::Object(rec)) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if rec.get("alert").and_then(Value::as_str) == Some("dead_expert") {
            r.collapse = true;
        }
        if rec.get("event").and_then(Value::as_str) == Some("revival") {
            r.revivals += 1;
        }
        let Some(step) = rec.get("step").and_then(Value::as_u64) else {
            continue;
        };
        if rec.get("loss/total").is_none() {
            continue;
        }
        r.steps = r.steps.max(step);
        if let Some(e) = rec.get("eval/loss").and_then(Value::as_f64) {
            evals.push(e);
            r.eval_history.push((step, e));
        }
        if let Some(t) = rec.get("throughput/tokens_per_s").and_then(Value::as_f64) {
            speeds.push(t);
        }
        drops.extend(per_layer(&rec, "/drop_rate"));
        reroutes.extend(per_layer(&rec, "/reroute_rate"));
        let step_ratios = per_layer(&rec, "/max_over_mean_load");
        ratios.extend(step_ratios.iter().copied());
        entropies.extend(per_layer(&rec, "/router_entropy"));
        // + 0.0: an empty float sum is -0.0, which would print as "-0".
        last_dead = Some(per_layer(&rec, "/dead_experts").iter().sum::<f64>() + 0.0);
        // Token shares averaged over layers: moe/layer{i}/expert{e}/token_share.
        let mut shares: Vec<(usize, f64, usize)> = Vec::new();
        for (k, v) in &rec {
            let Some(rest) = k.strip_prefix("moe/layer") else {
                continue;
            };
            let Some(e) = rest
                .split('/')
                .nth(1)
                .and_then(|s| s.strip_prefix("expert"))
            else {
                continue;
            };
            if !k.ends_with("/token_share") {
                continue;
            }
            let (Ok(e), Some(v)) = (e.parse::<usize>(), v.as_f64()) else {
                continue;
            };
            match shares.iter_mut().find(|s| s.0 == e) {
                Some(s) => {
                    s.1 += v;
                    s.2 += 1;
                }
                None => shares.push((e, v, 1)),
            }
        }
        shares.sort_by_key(|s| s.0);
        if !shares.is_empty() {
            r.share_history
                .push((step, shares.iter().map(|s| s.1 / s.2 as f64).collect()));
        }
    }
    r.final_eval_loss = evals.last().copied();
    r.best_eval_loss = evals.iter().copied().reduce(f64::min);
    speeds.sort_by(f64::total_cmp);
    r.tokens_per_s = speeds.get(speeds.len() / 2).copied();
    r.mean_drop_rate = mean(&drops);
    r.mean_reroute_rate = mean(&reroutes);
    r.mean_max_over_mean = mean(&ratios);
    r.worst_max_over_mean = ratios.iter().copied().reduce(f64::max);
    r.mean_router_entropy = mean(&entropies);
    r.dead_experts = last_dead;
    r.collapse |= last_dead.is_some_and(|d| d > 0.0);
    Ok(r)
}

/// Order by final validation loss, points without one (failed, or no eval) last.
pub fn rank(rows: &mut [PointResult]) {
    rows.sort_by(|a, b| {
        let key = |r: &PointResult| {
            r.final_eval_loss
                .filter(|l| l.is_finite())
                .unwrap_or(f64::INFINITY)
        };
        key(a).total_cmp(&key(b))
    });
}

/// A loss or rate as the summaries print it: four decimals, blank for none.
pub(super) fn num(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.4}")).unwrap_or_default()
}

fn status_text(s: &Status) -> String {
    match s {
        Status::Finished => "finished".into(),
        Status::Stopped(step) => format!("stopped at step {step}"),
        Status::Failed(why) => format!("failed: {why}"),
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Write `summary.csv` and `summary.md` (rows already ranked), the
/// markdown followed by `appendix` (the "Across seeds" section, or empty).
pub fn write(dir: &Path, axes: &[String], rows: &[PointResult], appendix: &str) -> Result<()> {
    let header = [
        vec!["rank".to_string(), "point".into()],
        axes.to_vec(),
        [
            "status",
            "steps",
            "final_eval_loss",
            "best_eval_loss",
            "tokens_per_s",
            "mean_drop_rate",
            "mean_reroute_rate",
            "mean_max_over_mean",
            "worst_max_over_mean",
            "dead_experts",
            "revivals",
            "mean_router_entropy",
            "collapse",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
    ]
    .concat();
    let cells = |i: usize, r: &PointResult| -> Vec<String> {
        let mut c = vec![(i + 1).to_string(), r.id.clone()];
        for a in axes {
            c.push(
                r.values
                    .iter()
                    .find(|(k, _)| k == a)
                    .map(|(_, v)| super::show_value(v))
                    .unwrap_or_default(),
            );
        }
        c.extend([
            status_text(&r.status),
            r.steps.to_string(),
            num(r.final_eval_loss),
            num(r.best_eval_loss),
            r.tokens_per_s
                .map(|t| format!("{t:.0}"))
                .unwrap_or_default(),
            num(r.mean_drop_rate),
            num(r.mean_reroute_rate),
            num(r.mean_max_over_mean),
            num(r.worst_max_over_mean),
            r.dead_experts
                .map(|d| format!("{d:.0}"))
                .unwrap_or_default(),
            r.revivals.to_string(),
            num(r.mean_router_entropy),
            r.collapse.to_string(),
        ]);
        c
    };
    let mut csv = header
        .iter()
        .map(|h| csv_field(h))
        .collect::<Vec<_>>()
        .join(",")
        + "\n";
    let mut md = format!(
        "| {} |\n|{}|\n",
        header.join(" | "),
        vec!["---"; header.len()].join("|")
    );
    for (i, r) in rows.iter().enumerate() {
        let c = cells(i, r);
        csv += &(c.iter().map(|s| csv_field(s)).collect::<Vec<_>>().join(",") + "\n");
        md += &format!(
            "| {} |\n",
            c.iter()
                .map(|s| s.replace('|', "\\|"))
                .collect::<Vec<_>>()
                .join(" | ")
        );
    }
    let best = rows
        .iter()
        .find(|r| r.final_eval_loss.is_some() && !matches!(r.status, Status::Failed(_)));
    let title = match best {
        Some(b) => format!(
            "# Sweep summary\n\n**Best point: `{}`**: final eval loss {}.\n\n",
            b.id,
            num(b.final_eval_loss)
        ),
        None => "# Sweep summary\n\nNo point produced an evaluation loss.\n\n".into(),
    };
    let mut md = title + &md;
    if !appendix.is_empty() {
        md += &format!("\n{appendix}");
    }
    std::fs::write(dir.join("summary.csv"), csv)?;
    std::fs::write(dir.join("summary.md"), md)?;
    Ok(())
}
