//! Sweep plots as PNG: eval loss and load imbalance against each swept axis
//! (a heat map when there are two axes), and the per-expert token share over
//! training for the best point and the worst-balanced one.
//!
//! Text uses the DejaVu Sans font shipped in `assets/` through plotters'
//! pure-Rust `ab_glyph` renderer, so no system font library is needed.

mod draw;

use super::show_value;
use super::summary::PointResult;
use anyhow::Result;
use draw::{heatmap, line_chart, share_chart};
pub(crate) use draw::{init_font, label_at};
use std::path::{Path, PathBuf};

/// Every plot of a sweep; returns the files written.
pub fn write_all(dir: &Path, axes: &[String], rows: &[PointResult]) -> Result<Vec<PathBuf>> {
    init_font();
    let mut out = Vec::new();
    for axis in axes {
        // x: this axis's values in order of appearance; one line per combination of the others.
        let mut xs: Vec<String> = Vec::new();
        let mut groups: Vec<String> = Vec::new();
        for r in rows {
            let x = axis_value(r, axis);
            if !xs.contains(&x) {
                xs.push(x);
            }
            let g = group_name(r, axis);
            if !groups.contains(&g) {
                groups.push(g);
            }
        }
        for (metric, file, ylabel) in [
            (
                "eval",
                format!("eval_loss_vs_{}.png", slug(axis)),
                "final eval loss",
            ),
            (
                "imbalance",
                format!("imbalance_vs_{}.png", slug(axis)),
                "mean max/mean expert load",
            ),
        ] {
            let series: Vec<(String, Vec<Option<f64>>)> = groups
                .iter()
                .map(|g| {
                    let ys = xs
                        .iter()
                        .map(|x| {
                            rows.iter()
                                .find(|r| group_name(r, axis) == *g && axis_value(r, axis) == *x)
                                .and_then(|r| {
                                    if metric == "eval" {
                                        r.final_eval_loss
                                    } else {
                                        r.mean_max_over_mean
                                    }
                                })
                        })
                        .collect();
                    (g.clone(), ys)
                })
                .collect();
            let path = dir.join(&file);
            line_chart(
                &path,
                &format!("{ylabel} vs {axis}"),
                axis,
                &xs,
                ylabel,
                &series,
            )?;
            if path.exists() {
                out.push(path);
            }
        }
    }
    // Validation loss against steps, one line per point (the seeds of one
    // variant in one colour): how the gaps open or close with training.
    let mut steps: Vec<u64> = rows
        .iter()
        .flat_map(|r| r.eval_history.iter().map(|e| e.0))
        .collect();
    steps.sort_unstable();
    steps.dedup();
    if !steps.is_empty() {
        let series: Vec<(String, Vec<Option<f64>>)> = rows
            .iter()
            .filter(|r| !r.eval_history.is_empty())
            .map(|r| {
                let ys = steps
                    .iter()
                    .map(|s| r.eval_history.iter().find(|e| e.0 == *s).map(|e| e.1))
                    .collect();
                (group_name(r, "train.seed"), ys)
            })
            .collect();
        let labels: Vec<String> = steps.iter().map(|s| s.to_string()).collect();
        let path = dir.join("eval_loss_curves.png");
        line_chart(
            &path,
            "eval loss over training (one colour per variant, one line per seed)",
            "step",
            &labels,
            "eval loss",
            &series,
        )?;
        if path.exists() {
            out.push(path);
        }
    }
    if axes.len() == 2 {
        let path = dir.join("eval_loss_heatmap.png");
        heatmap(&path, axes, rows)?;
        if path.exists() {
            out.push(path);
        }
    }
    let ok: Vec<&PointResult> = rows
        .iter()
        .filter(|r| !r.share_history.is_empty())
        .collect();
    if let Some(best) = ok
        .iter()
        .find(|r| r.final_eval_loss.is_some())
        .or(ok.first())
    {
        let path = dir.join("token_share_best.png");
        share_chart(
            &path,
            &format!("token share per expert: best point {}", best.id),
            &best.share_history,
        )?;
        out.push(path);
    }
    // Worst-balanced by the mean load ratio: the single worst step saturates
    // at E/k early in almost every run, so it does not tell points apart.
    if let Some(worst) = ok.iter().max_by(|a, b| {
        let key = |r: &PointResult| r.mean_max_over_mean.unwrap_or(0.0);
        key(a).total_cmp(&key(b))
    }) {
        let path = dir.join("token_share_worst_balanced.png");
        share_chart(
            &path,
            &format!("token share per expert: worst-balanced point {}", worst.id),
            &worst.share_history,
        )?;
        out.push(path);
    }
    Ok(out)
}

/// The point's value on `axis`, shown; "-" where an explicit point does
/// not set that axis (points of a `[[points]]` sweep may set different keys).
fn axis_value(r: &PointResult, axis: &str) -> String {
    r.values
        .iter()
        .find(|(k, _)| k == axis)
        .map(|(_, v)| show_value(v))
        .unwrap_or_else(|| "-".into())
}

/// A name for the point's values on every axis but the one plotted.
/// A point's swept values without `skip`: the name of its variant.
pub(super) fn group_name(r: &PointResult, skip: &str) -> String {
    r.values
        .iter()
        .filter(|(k, _)| k != skip)
        .map(|(k, v)| format!("{}={}", k.rsplit('.').next().unwrap_or(k), show_value(v)))
        .collect::<Vec<_>>()
        .join(",")
}

fn slug(axis: &str) -> String {
    axis.replace('.', "_")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sweep::summary::Status;

    fn point(id: &str, values: &[(&str, i64)], evals: &[(u64, f64)]) -> PointResult {
        PointResult {
            steps: 300,
            final_eval_loss: evals.last().map(|e| e.1),
            mean_max_over_mean: Some(1.2),
            eval_history: evals.to_vec(),
            ..PointResult::empty(
                id,
                values
                    .iter()
                    .map(|(k, v)| (k.to_string(), toml::Value::Integer(*v)))
                    .collect(),
                Status::Finished,
            )
        }
    }

    /// Explicit points may set different keys (a dense point sets no
    /// expert width): every plot is still drawn, with "-" for an unset axis.
    #[test]
    fn points_that_set_different_keys_are_plotted() {
        let dir = std::env::temp_dir().join(format!("sy-plots-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let axes: Vec<String> = [
            "moe.num_experts",
            "model.d_ff",
            "moe.d_expert",
            "train.seed",
        ]
        .map(String::from)
        .to_vec();
        let rows = [
            point(
                "dense",
                &[
                    ("moe.num_experts", 0),
                    ("model.d_ff", 256),
                    ("train.seed", 1),
                ],
                &[(100, 5.6), (200, 5.2), (300, 5.1)],
            ),
            point(
                "moe",
                &[
                    ("moe.num_experts", 8),
                    ("moe.d_expert", 128),
                    ("train.seed", 1),
                ],
                &[(100, 5.5), (200, 5.2), (300, 5.0)],
            ),
        ];
        let written = write_all(&dir, &axes, &rows).unwrap();
        for name in ["eval_loss_vs_moe_d_expert.png", "eval_loss_curves.png"] {
            let path = dir.join(name);
            assert!(written.contains(&path), "{name} not written: {written:?}");
            assert_eq!(&std::fs::read(&path).unwrap()[1..4], b"PNG");
        }
        assert_eq!(axis_value(&rows[0], "moe.d_expert"), "-");
        assert_eq!(
            group_name(&rows[1], "train.seed"),
            "num_experts=8,d_expert=128"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
