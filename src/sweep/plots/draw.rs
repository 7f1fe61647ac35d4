//! Drawing: the line, share and heat-map charts the sweep plots are made
//! of, in one house layout, and the embedded font their text uses.

use super::super::show_value;
use super::super::summary::PointResult;
use anyhow::{anyhow, Result};
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};
use std::path::Path;
use std::sync::Once;

static FONT: Once = Once::new();

/// Register the embedded font (once per process).
pub(crate) fn init_font() {
    FONT.call_once(|| {
        let bytes: &'static [u8] = include_bytes!("../../../assets/DejaVuSans.ttf");
        // The embedded font is valid; a failure would only lose the labels.
        let _ = register_font("sans-serif", FontStyle::Normal, bytes);
    });
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("plotting: {e:?}")
}

type Chart<'a, 'b> = ChartContext<
    'a,
    BitMapBackend<'b>,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

/// A titled chart with numeric axes over `x` × `y`, in the house layout.
fn frame<'a, 'b>(
    root: &'a DrawingArea<BitMapBackend<'b>, plotters::coord::Shift>,
    title: &str,
    x: std::ops::Range<f64>,
    y: std::ops::Range<f64>,
    y_label_area: u32,
) -> Result<Chart<'a, 'b>> {
    ChartBuilder::on(root)
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(y_label_area)
        .build_cartesian_2d(x, y)
        .map_err(err)
}

const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// A categorical x axis (the axis values in order), one line per series.
pub(super) fn line_chart(
    path: &Path,
    title: &str,
    x_name: &str,
    x_labels: &[String],
    y_name: &str,
    series: &[(String, Vec<Option<f64>>)],
) -> Result<()> {
    let Some((lo, hi)) = finite_range(series.iter().flat_map(|s| s.1.iter().flatten().copied()))
    else {
        return Ok(());
    };
    let pad = ((hi - lo) * 0.1).max(1e-3);
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let n = x_labels.len();
    let mut chart = frame(
        &root,
        title,
        -0.5..(n as f64 - 0.5),
        (lo - pad)..(hi + pad),
        64,
    )?;
    let labels = x_labels.to_vec();
    chart
        .configure_mesh()
        .x_desc(x_name)
        .y_desc(y_name)
        .x_labels(n.max(2))
        .x_label_formatter(&move |x| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < labels.len() {
                labels[i as usize].clone()
            } else {
                String::new()
            }
        })
        .draw()
        .map_err(err)?;
    // Series of the same name (one variant under several seeds) share a
    // colour and one legend entry.
    let mut names: Vec<&str> = Vec::new();
    for (name, vals) in series {
        let first = !names.contains(&name.as_str());
        if first {
            names.push(name);
        }
        let ci = names.iter().position(|n| *n == name).unwrap_or(0);
        let color = PALETTE[ci % PALETTE.len()];
        let pts: Vec<(f64, f64)> = vals
            .iter()
            .enumerate()
            .filter_map(|(i, v)| v.filter(|v| v.is_finite()).map(|v| (i as f64, v)))
            .collect();
        let drawn = chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(err)?;
        if first {
            drawn.label(name.clone()).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        }
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))
            .map_err(err)?;
    }
    if series.len() > 1 || !series[0].0.is_empty() {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

/// Per-expert token share over training steps.
pub(super) fn share_chart(path: &Path, title: &str, history: &[(u64, Vec<f64>)]) -> Result<()> {
    let Some(e) = history.first().map(|h| h.1.len()) else {
        return Ok(());
    };
    let last = history.last().unwrap().0 as f64;
    let top = history
        .iter()
        .flat_map(|h| h.1.iter().copied())
        .fold(0.0, f64::max)
        * 1.1;
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = frame(&root, title, 0.0..last.max(1.0), 0.0..top.max(1e-3), 64)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("token share (mean over MoE layers)")
        .draw()
        .map_err(err)?;
    let fair = 1.0 / e as f64;
    chart
        .draw_series(LineSeries::new(
            vec![(0.0, fair), (last, fair)],
            BLACK.mix(0.5).stroke_width(1),
        ))
        .map_err(err)?
        .label("fair share 1/E")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK.mix(0.5)));
    for ex in 0..e {
        let color = PALETTE[ex % PALETTE.len()];
        let pts: Vec<(f64, f64)> = history.iter().map(|(s, v)| (*s as f64, v[ex])).collect();
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(err)?
            .label(format!("expert {ex}"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

/// Two axes: a grid of cells coloured by final eval loss (darker is lower).
pub(super) fn heatmap(path: &Path, axes: &[String], rows: &[PointResult]) -> Result<()> {
    let vals = |a: &str| -> Vec<String> {
        let mut v: Vec<String> = Vec::new();
        for r in rows {
            if let Some((_, x)) = r.values.iter().find(|(k, _)| k == a) {
                let s = show_value(x);
                if !v.contains(&s) {
                    v.push(s);
                }
            }
        }
        v
    };
    let (xs, ys) = (vals(&axes[0]), vals(&axes[1]));
    let Some((lo, hi)) = finite_range(rows.iter().filter_map(|r| r.final_eval_loss)) else {
        return Ok(());
    };
    let root = BitMapBackend::new(path, (900, 620)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = frame(
        &root,
        "final eval loss",
        0.0..xs.len() as f64,
        0.0..ys.len() as f64,
        80,
    )?;
    let (xl, yl) = (xs.clone(), ys.clone());
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc(axes[0].as_str())
        .y_desc(axes[1].as_str())
        .x_labels(xs.len() * 2 + 1)
        .y_labels(ys.len() * 2 + 1)
        .x_label_formatter(&move |x| label_at(&xl, *x))
        .y_label_formatter(&move |y| label_at(&yl, *y))
        .draw()
        .map_err(err)?;
    for r in rows {
        let pos = |a: &str, list: &[String]| {
            r.values
                .iter()
                .find(|(k, _)| k == a)
                .and_then(|(_, v)| list.iter().position(|s| *s == show_value(v)))
        };
        let (Some(i), Some(j)) = (pos(&axes[0], &xs), pos(&axes[1], &ys)) else {
            continue;
        };
        let (color, text) = match r.final_eval_loss.filter(|l| l.is_finite()) {
            Some(l) => {
                let t = if hi > lo { (l - lo) / (hi - lo) } else { 0.0 };
                let shade = (40.0 + 200.0 * t) as u8;
                (RGBColor(shade / 3, shade, shade / 2), format!("{l:.3}"))
            }
            None => (RGBColor(200, 200, 200), "failed".into()),
        };
        let (x, y) = (i as f64, j as f64);
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(x, y), (x + 1.0, y + 1.0)],
                color.filled(),
            )))
            .map_err(err)?;
        chart
            .draw_series(std::iter::once(Text::new(
                text,
                (x + 0.35, y + 0.55),
                ("sans-serif", 18).into_font().color(&WHITE),
            )))
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

/// The name of cell `floor(v)` at its centre (`v` = i + 0.5), else nothing:
/// category labels on a numeric axis.
pub(crate) fn label_at(list: &[String], v: f64) -> String {
    let f = v - v.floor();
    if (f - 0.5).abs() < 1e-6 && v >= 0.0 && (v.floor() as usize) < list.len() {
        list[v.floor() as usize].clone()
    } else {
        String::new()
    }
}

/// Smallest and largest finite value; `None` when there is none.
fn finite_range(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    values
        .filter(|v| v.is_finite())
        .fold(None, |range, v| match range {
            None => Some((v, v)),
            Some((lo, hi)) => Some((f64::min(lo, v), f64::max(hi, v))),
        })
}
