//! Per-domain expert maps: how each MoE layer routes the tokens of each data
//! source (domain) at evaluation, and how much the domain decides the expert.
//!
//! The counts are assignments (a token counts once per chosen expert) of
//! real tokens whose source is known. The specialisation score is the
//! mutual information between expert choice and domain, over the domain
//! entropy:
//!
//! ```text
//! S = I(expert; domain) / H(domain)
//!   = Σ_{d,e} p(d,e) · ln(p(d,e) / (p(d) · p(e)))  /  −Σ_d p(d) · ln p(d)
//! ```
//!
//! with p(d, e) the share of assignments from domain d to expert e. S is 0
//! when every domain is spread over the experts alike and 1 when the
//! domain can be read off the expert; it is undefined (reported as none)
//! with fewer than two domains present.

use super::tensorboard::{png_image, SummaryValue};
use crate::sweep::plots::label_at;
use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One MoE layer's routing by domain, on the host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DomainMap {
    /// Assignments from each domain to each expert, before capacity. `[D][E]`
    pub routed: Vec<Vec<f64>>,
    /// Of those, the assignments an expert computed. `[D][E]`
    pub kept: Vec<Vec<f64>>,
}

impl DomainMap {
    /// Each domain's share of assignments per expert (each row sums to 1;
    /// all zero for a domain with no tokens).
    pub fn shares(&self) -> Vec<Vec<f64>> {
        self.routed
            .iter()
            .map(|row| {
                let n: f64 = row.iter().sum();
                row.iter()
                    .map(|&c| if n > 0.0 { c / n } else { 0.0 })
                    .collect()
            })
            .collect()
    }

    /// I(expert; domain) / H(domain); `None` with fewer than two domains
    /// that have tokens.
    pub fn specialisation(&self) -> Option<f64> {
        let total: f64 = self.routed.iter().flatten().sum();
        let p_d: Vec<f64> = self
            .routed
            .iter()
            .map(|r| r.iter().sum::<f64>() / total.max(1e-300))
            .collect();
        if p_d.iter().filter(|&&p| p > 0.0).count() < 2 {
            return None;
        }
        let e = self.routed.first().map_or(0, |r| r.len());
        let p_e: Vec<f64> = (0..e)
            .map(|j| self.routed.iter().map(|r| r[j]).sum::<f64>() / total)
            .collect();
        let mut mi = 0.0;
        for (d, row) in self.routed.iter().enumerate() {
            for (j, &c) in row.iter().enumerate() {
                if c > 0.0 {
                    let p = c / total;
                    mi += p * (p / (p_d[d] * p_e[j])).ln();
                }
            }
        }
        let h: f64 = p_d.iter().filter(|&&p| p > 0.0).map(|&p| -p * p.ln()).sum();
        Some((mi / h).clamp(0.0, 1.0))
    }

    /// Share of each domain's assignments dropped for lack of capacity.
    pub fn drop_rates(&self) -> Vec<f64> {
        self.routed
            .iter()
            .zip(&self.kept)
            .map(|(r, k)| {
                let n: f64 = r.iter().sum();
                if n > 0.0 {
                    1.0 - k.iter().sum::<f64>() / n
                } else {
                    0.0
                }
            })
            .collect()
    }

    /// Max over mean of each domain's assignments per expert (1.0 when
    /// even, E when one expert takes all).
    pub fn max_over_mean(&self) -> Vec<f64> {
        self.routed
            .iter()
            .map(|r| {
                let mean = r.iter().sum::<f64>() / r.len().max(1) as f64;
                let max = r.iter().copied().fold(0.0, f64::max);
                if mean > 0.0 {
                    max / mean
                } else {
                    0.0
                }
            })
            .collect()
    }

    /// The experts that take more than twice their fair share (1/E) of a
    /// domain's assignments, per domain.
    pub fn hot_experts(&self) -> Vec<Vec<usize>> {
        self.shares()
            .iter()
            .map(|row| {
                let fair = 1.0 / row.len().max(1) as f64;
                (0..row.len()).filter(|&e| row[e] > 2.0 * fair).collect()
            })
            .collect()
    }
}

/// Everything an evaluation measured per domain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DomainReport {
    /// Domain names, in `data.sources` order.
    pub names: Vec<String>,
    /// Σ loss over each domain's real tokens.
    pub loss_sum: Vec<f64>,
    /// Each domain's real tokens.
    pub tokens: Vec<f64>,
    /// Per MoE layer, in order.
    pub layers: Vec<DomainMap>,
}

impl DomainReport {
    /// Each domain's mean loss; `None` for a domain with no tokens.
    pub fn losses(&self) -> Vec<Option<f64>> {
        self.loss_sum
            .iter()
            .zip(&self.tokens)
            .map(|(&l, &n)| (n > 0.0).then(|| l / n))
            .collect()
    }

    /// The tagged scalars of this report (`eval/domain/...`, and per layer
    /// `moe/layer{i}/specialisation` and `moe/layer{i}/domain/...`).
    pub fn scalars(&self) -> Vec<(String, f64)> {
        let mut v = Vec::new();
        for (name, loss) in self.names.iter().zip(self.losses()) {
            if let Some(l) = loss {
                v.push((format!("eval/domain/{name}/loss"), l));
            }
        }
        for (i, map) in self.layers.iter().enumerate() {
            if let Some(s) = map.specialisation() {
                v.push((format!("moe/layer{i}/specialisation"), s));
            }
            let (drops, ratios, shares) = (map.drop_rates(), map.max_over_mean(), map.shares());
            for (d, name) in self.names.iter().enumerate() {
                if self.tokens[d] == 0.0 {
                    continue;
                }
                let tag = |what: &str| format!("moe/layer{i}/domain/{name}/{what}");
                v.push((tag("drop_rate"), drops[d]));
                v.push((tag("max_over_mean_load"), ratios[d]));
                for (e, s) in shares[d].iter().enumerate() {
                    v.push((tag(&format!("expert{e}/share")), *s));
                }
            }
        }
        v
    }
}

/// Each MoE layer's heat map as `dir/layer{i}.png` (overwritten at each
/// evaluation, so the files show the latest) and as TensorBoard images
/// (`moe/layer{i}/expert_domain_map`), returned for the caller to write.
pub fn write_maps(dir: &Path, step: u64, report: &DomainReport) -> Result<Vec<SummaryValue>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut images = Vec::new();
    for (i, map) in report.layers.iter().enumerate() {
        let path = dir.join(format!("layer{i}.png"));
        let title = format!("MoE layer {i}, step {step}: each domain's share per expert");
        heatmap_png(&path, &title, &report.names, map)?;
        let png = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        images.extend(png_image(format!("moe/layer{i}/expert_domain_map"), png));
    }
    Ok(images)
}

/// Draw a layer's expert × domain heat map (each cell the domain's share
/// of assignments to that expert, written in it) as a PNG at `path`.
pub fn heatmap_png(path: &Path, title: &str, names: &[String], map: &DomainMap) -> Result<()> {
    crate::sweep::plots::init_font();
    let err = |e: &dyn std::fmt::Debug| anyhow!("plotting {}: {e:?}", path.display());
    let shares = map.shares();
    let (d, e) = (names.len(), shares.first().map_or(0, |r| r.len()));
    let width = (160 + 70 * e).max(560) as u32;
    let height = (120 + 50 * d) as u32;
    let root = BitMapBackend::new(path, (width, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| err(&x))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(120)
        .build_cartesian_2d(0.0..e as f64, 0.0..d as f64)
        .map_err(|x| err(&x))?;
    let label = |list: Vec<String>| move |v: &f64| label_at(&list, *v);
    let experts: Vec<String> = (0..e).map(|i| format!("e{i}")).collect();
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("expert")
        .x_labels(e * 2 + 1)
        .y_labels(d * 2 + 1)
        .x_label_formatter(&label(experts))
        .y_label_formatter(&label(names.to_vec()))
        .draw()
        .map_err(|x| err(&x))?;
    for (row, cells) in shares.iter().enumerate() {
        for (col, &s) in cells.iter().enumerate() {
            // White for 0, deep blue for a whole domain on one expert.
            let t = s.clamp(0.0, 1.0);
            let shade = |c: f64| (255.0 - t * (255.0 - c)) as u8;
            let color = RGBColor(shade(20.0), shade(60.0), shade(160.0));
            let (x, y) = (col as f64, row as f64);
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(x, y), (x + 1.0, y + 1.0)],
                    color.filled(),
                )))
                .map_err(|x| err(&x))?;
            let ink = if t > 0.5 { WHITE } else { BLACK };
            chart
                .draw_series(std::iter::once(Text::new(
                    format!("{:.0}%", s * 100.0),
                    (x + 0.25, y + 0.6),
                    ("sans-serif", 14).into_font().color(&ink),
                )))
                .map_err(|x| err(&x))?;
        }
    }
    root.present().map_err(|x| err(&x))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disjoint_domains_specialise_fully_and_shared_ones_not_at_all() {
        // Domain 0 only on experts 0 and 1, domain 1 only on 2 and 3.
        let split = DomainMap {
            routed: vec![vec![30.0, 10.0, 0.0, 0.0], vec![0.0, 0.0, 5.0, 15.0]],
            kept: vec![vec![30.0, 10.0, 0.0, 0.0], vec![0.0, 0.0, 5.0, 10.0]],
        };
        assert!((split.specialisation().unwrap() - 1.0).abs() < 1e-12);
        // Both domains spread alike: no information.
        let same = DomainMap {
            routed: vec![vec![10.0, 20.0, 30.0, 40.0], vec![1.0, 2.0, 3.0, 4.0]],
            kept: vec![vec![0.0; 4], vec![0.0; 4]],
        };
        assert!(same.specialisation().unwrap().abs() < 1e-12);
        // One domain: undefined.
        let one = DomainMap {
            routed: vec![vec![1.0, 2.0], vec![0.0, 0.0]],
            kept: vec![vec![1.0, 2.0], vec![0.0, 0.0]],
        };
        assert_eq!(one.specialisation(), None);
        // By hand: 2 domains × 2 experts, p = [[0.4, 0.1], [0.1, 0.4]].
        // p(d) = p(e) = 1/2; I = 2·0.4·ln(1.6) + 2·0.1·ln(0.4); H = ln 2.
        let half = DomainMap {
            routed: vec![vec![4.0, 1.0], vec![1.0, 4.0]],
            kept: vec![vec![4.0, 1.0], vec![1.0, 4.0]],
        };
        let want = (0.8 * 1.6f64.ln() + 0.2 * 0.4f64.ln()) / 2f64.ln();
        assert!((half.specialisation().unwrap() - want).abs() < 1e-12);
        // Drop rates, loads and hot experts of the split map.
        assert_eq!(split.drop_rates(), vec![0.0, 0.25]);
        assert_eq!(split.max_over_mean(), vec![3.0, 3.0]);
        assert_eq!(split.hot_experts(), vec![vec![0], vec![3]]);
        assert_eq!(split.shares()[1], vec![0.0, 0.0, 0.25, 0.75]);
    }
}
