//! Across seeds. A sweep with `seeds = [...]` trains each variant (a point
//! without its seed) once per seed. A single run cannot tell a small gain
//! from the spread between seeds, so the summary adds one row per variant:
//! the mean and standard deviation of its final eval losses, and the paired
//! comparison with the sweep's first variant, seed by seed. Runs under one
//! seed read the same batches and draw every shared weight alike, so the
//! paired difference is the sharper measure.

use super::summary::{num, PointResult, Status};
use anyhow::Result;
use std::path::Path;

/// A mean, the sample standard deviation (none under two values) and the count.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    /// The values' mean.
    pub mean: f64,
    /// The sample standard deviation (n − 1); none for a single value.
    pub sd: Option<f64>,
    /// How many values.
    pub n: usize,
}

impl Spread {
    fn of(v: &[f64]) -> Option<Self> {
        if v.is_empty() {
            return None;
        }
        let n = v.len();
        let mean = v.iter().sum::<f64>() / n as f64;
        let sd = (n > 1)
            .then(|| (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt());
        Some(Self { mean, sd, n })
    }
}

/// One variant over its seeds.
#[derive(Debug, Clone, PartialEq)]
pub struct Variant {
    /// The point's swept values without the seed (`num_experts=8,d_expert=128`).
    pub name: String,
    /// Points of this variant in the sweep, finished or not.
    pub runs: usize,
    /// Final eval loss over the finished runs.
    pub loss: Option<Spread>,
    /// This variant's loss minus the first variant's, under each seed both
    /// finished; none for the first variant itself.
    pub vs_first: Option<Spread>,
    /// Under how many of those seeds this variant ended lower.
    pub lower: usize,
}

fn seed_of(r: &PointResult) -> Option<i64> {
    r.values
        .iter()
        .find(|(k, _)| k == "train.seed")
        .and_then(|(_, v)| v.as_integer())
}

/// The final eval loss of a run that trained all its steps.
fn final_loss(r: &PointResult) -> Option<f64> {
    matches!(r.status, Status::Finished)
        .then_some(r.final_eval_loss)
        .flatten()
        .filter(|l| l.is_finite())
}

/// Group `rows` (in the sweep's order) by variant, first-seen order. Empty
/// unless the sweep has a seed axis and some variant ran under two seeds.
pub fn across_seeds(rows: &[PointResult]) -> Vec<Variant> {
    let mut groups: Vec<(String, Vec<&PointResult>)> = Vec::new();
    for r in rows.iter().filter(|r| seed_of(r).is_some()) {
        let name = super::plots::group_name(r, "train.seed");
        match groups.iter_mut().find(|(n, _)| *n == name) {
            Some((_, g)) => g.push(r),
            None => groups.push((name, vec![r])),
        }
    }
    if groups.iter().all(|(_, g)| g.len() < 2) {
        return Vec::new();
    }
    let first = groups[0].1.clone();
    groups
        .iter()
        .enumerate()
        .map(|(i, (name, runs))| {
            let losses: Vec<f64> = runs.iter().filter_map(|r| final_loss(r)).collect();
            let diffs: Vec<f64> = runs
                .iter()
                .filter_map(|r| {
                    let base = first.iter().find(|b| seed_of(b) == seed_of(r))?;
                    Some(final_loss(r)? - final_loss(base)?)
                })
                .collect();
            Variant {
                name: name.clone(),
                runs: runs.len(),
                loss: Spread::of(&losses),
                vs_first: if i == 0 { None } else { Spread::of(&diffs) },
                lower: diffs.iter().filter(|d| **d < 0.0).count(),
            }
        })
        .collect()
}

/// Write `summary_seeds.csv` into `dir` and return the markdown section for
/// `summary.md`; neither when there is nothing to compare.
pub fn write(dir: &Path, variants: &[Variant]) -> Result<String> {
    if variants.is_empty() {
        return Ok(String::new());
    }
    std::fs::write(dir.join("summary_seeds.csv"), csv(variants))?;
    Ok(markdown(variants))
}

/// The variants ranked by mean final eval loss (unfinished last), as a
/// markdown section; empty when there is nothing to compare.
pub fn markdown(variants: &[Variant]) -> String {
    let Some(first) = variants.first() else {
        return String::new();
    };
    let mut ranked: Vec<&Variant> = variants.iter().collect();
    ranked.sort_by(|a, b| {
        let key = |v: &Variant| v.loss.map(|l| l.mean).unwrap_or(f64::INFINITY);
        key(a).total_cmp(&key(b))
    });
    let mut md = format!(
        "## Across seeds\n\nEach variant's final eval loss over its seeds (mean and standard \
         deviation), ranked by the mean, and its difference from `{}`, the sweep's first \
         variant, taken seed by seed (negative: lower than it).\n\n\
         | rank | variant | seeds | mean final eval loss | sd | vs first: mean difference | sd | lower under |\n\
         |---|---|---|---|---|---|---|---|\n",
        first.name
    );
    for (i, v) in ranked.iter().enumerate() {
        let seeds = match v.loss {
            Some(l) if l.n == v.runs => l.n.to_string(),
            Some(l) => format!("{} of {}", l.n, v.runs),
            None => format!("0 of {}", v.runs),
        };
        let (diff, diff_sd, lower) = match v.vs_first {
            Some(d) => (
                format!("{:+.4}", d.mean),
                num(d.sd),
                format!("{} of {}", v.lower, d.n),
            ),
            None if std::ptr::eq(*v, first) => ("(first)".into(), String::new(), String::new()),
            None => Default::default(),
        };
        md += &format!(
            "| {} | {} | {seeds} | {} | {} | {diff} | {diff_sd} | {lower} |\n",
            i + 1,
            v.name.replace('|', "\\|"),
            num(v.loss.map(|l| l.mean)),
            num(v.loss.and_then(|l| l.sd)),
        );
    }
    md
}

/// The same rows as CSV, in the sweep's order (`summary_seeds.csv`).
pub fn csv(variants: &[Variant]) -> String {
    let mut out = String::from(
        "variant,runs,finished,mean_final_eval_loss,sd,vs_first_mean_difference,vs_first_sd,paired_seeds,lower_under\n",
    );
    for v in variants {
        let d = v.vs_first;
        out += &format!(
            "\"{}\",{},{},{},{},{},{},{},{}\n",
            v.name.replace('"', "\"\""),
            v.runs,
            v.loss.map(|l| l.n).unwrap_or(0),
            num(v.loss.map(|l| l.mean)),
            num(v.loss.and_then(|l| l.sd)),
            num(d.map(|d| d.mean)),
            num(d.and_then(|d| d.sd)),
            d.map(|d| d.n.to_string()).unwrap_or_default(),
            d.map(|_| v.lower.to_string()).unwrap_or_default(),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(name_value: i64, seed: i64, loss: Option<f64>, status: Status) -> PointResult {
        PointResult {
            steps: 10,
            final_eval_loss: loss,
            ..PointResult::empty(
                &format!("e={name_value},seed={seed}"),
                vec![
                    ("moe.num_experts".into(), toml::Value::Integer(name_value)),
                    ("train.seed".into(), toml::Value::Integer(seed)),
                ],
                status,
            )
        }
    }

    /// Worked by hand. Dense (first) under seeds 1, 2, 3: 5.0, 5.2, 5.1;
    /// mean 5.1, sd 0.1. MoE: 4.9, 5.1, 5.2; mean 5.0667; differences −0.1,
    /// −0.1, +0.1: mean −0.0333, sd √((2·0.0667² + 0.1333²)/2) = 0.11547,
    /// lower under 2 of 3. A third variant failed under seed 2 and was
    /// stopped early under seed 3: only seed 1 counts, paired with 5.0.
    #[test]
    fn variants_are_summarised_and_paired_by_seed() {
        let ok = || Status::Finished;
        let rows = [
            run(0, 1, Some(5.0), ok()),
            run(0, 2, Some(5.2), ok()),
            run(0, 3, Some(5.1), ok()),
            run(8, 1, Some(4.9), ok()),
            run(8, 2, Some(5.1), ok()),
            run(8, 3, Some(5.2), ok()),
            run(16, 1, Some(5.3), ok()),
            run(16, 2, None, Status::Failed("diverged".into())),
            run(16, 3, Some(4.0), Status::Stopped(5)),
        ];
        let v = across_seeds(&rows);
        assert_eq!(v.len(), 3);
        assert_eq!(v[0].name, "num_experts=0");
        let dense = v[0].loss.unwrap();
        assert!((dense.mean - 5.1).abs() < 1e-12 && (dense.sd.unwrap() - 0.1).abs() < 1e-12);
        assert!(v[0].vs_first.is_none());
        let moe = v[1].vs_first.unwrap();
        assert!((v[1].loss.unwrap().mean - 15.2 / 3.0).abs() < 1e-12);
        assert!((moe.mean + 0.1 / 3.0).abs() < 1e-12, "{moe:?}");
        assert!((moe.sd.unwrap() - 0.115470).abs() < 1e-6, "{moe:?}");
        assert_eq!((moe.n, v[1].lower), (3, 2));
        let third = &v[2];
        assert_eq!((third.runs, third.loss.unwrap().n), (3, 1));
        let d = third.vs_first.unwrap();
        assert!((d.mean - 0.3).abs() < 1e-12 && d.sd.is_none() && third.lower == 0);

        let md = markdown(&v);
        let lines: Vec<&str> = md.lines().filter(|l| l.starts_with("| ")).collect();
        assert_eq!(
            lines[1],
            "| 1 | num_experts=8 | 3 | 5.0667 | 0.1528 | -0.0333 | 0.1155 | 2 of 3 |"
        );
        assert_eq!(
            lines[2],
            "| 2 | num_experts=0 | 3 | 5.1000 | 0.1000 | (first) |  |  |"
        );
        assert_eq!(
            lines[3],
            "| 3 | num_experts=16 | 1 of 3 | 5.3000 |  | +0.3000 |  | 0 of 1 |"
        );
        let csv = csv(&v);
        let rows: Vec<&str> = csv.lines().collect();
        assert_eq!(rows[1], "\"num_experts=0\",3,3,5.1000,0.1000,,,,");
        assert_eq!(
            rows[2],
            "\"num_experts=8\",3,3,5.0667,0.1528,-0.0333,0.1155,3,2"
        );
    }

    /// One seed per variant (or no seed axis) has nothing to add.
    #[test]
    fn single_seed_sweeps_have_no_section() {
        let rows = [
            run(0, 1, Some(5.0), Status::Finished),
            run(8, 1, Some(4.9), Status::Finished),
        ];
        assert!(across_seeds(&rows).is_empty());
        assert_eq!(markdown(&[]), "");
    }
}
