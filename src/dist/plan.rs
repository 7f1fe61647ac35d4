//! `switchyard plan-experts`: where to put the experts of a run's MoE
//! layers on N devices, judged by the per-expert token counts the run
//! logged. Each placement is scored by a stated model:
//!
//! - device j's load is the assignments its experts compute per step;
//! - rows travel by four all-to-alls per MoE layer and step (the forward's
//!   dispatch and return, and their two mirrors in the backward), each
//!   moving `d_model` f32 values per row; a device's bytes are what it
//!   sends to other devices plus what it receives from them, split into
//!   intra- and inter-node by `--per-node`;
//! - device j's time in a layer is its experts' FLOPs (18·d_model·d_expert
//!   per assignment: 6 forward, 12 backward) at the measured rate, plus its
//!   bytes over the link's bandwidth; every layer's all-to-all waits for
//!   the slowest device, so the step's MoE time is the sum over layers of
//!   each layer's slowest device.
//!
//! Where the tokens come from: when the run logged each rank's counts
//! (`kept_by_rank`, a run of several processes) and had as many ranks as
//! there are devices, device i sends what rank i's tokens asked for, and
//! the bytes are exactly what an expert-parallel run of that placement
//! counts. Otherwise every device is assumed to route 1/N of the logged
//! counts.

pub use super::plan_files::{read_counts, read_placement, Counts};
pub use super::Layout;
use crate::config::RunConfig;
use anyhow::{bail, Result};

/// One way of putting experts on devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Device j holds experts `j·E/N ..` (what `train.expert_parallel` does).
    Contiguous,
    /// Expert e on device `e mod N`.
    RoundRobin,
    /// Greedy bin-packing by measured load (largest first onto the least
    /// loaded device with room), E/N experts per device.
    Balanced,
}

impl Strategy {
    /// Its name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Self::Contiguous => "contiguous",
            Self::RoundRobin => "round-robin",
            Self::Balanced => "balanced",
        }
    }
}

/// The planner's inputs beyond the run.
#[derive(Debug, Clone)]
pub struct PlanOptions {
    /// Devices the experts are spread over.
    pub devices: usize,
    /// Devices per node.
    pub per_node: usize,
    /// Inter-node bandwidth, Gbit/s per device.
    pub link_gbps: f64,
    /// Intra-node bandwidth, Gbit/s per device.
    pub intra_node_gbps: f64,
    /// Expert FLOP/s per device; `None`: the run's measured rate.
    pub flops: Option<f64>,
    /// Average the counts over this many last logged steps.
    pub steps: usize,
    /// Split each layer's busiest expert over two devices.
    pub replicate_hottest: bool,
}

/// Place one layer's `load.len()` experts on `n` devices.
pub fn place(strategy: Strategy, load: &[f64], n: usize, replicate_hottest: bool) -> Layout {
    let e = load.len();
    let per = e.div_ceil(n);
    match strategy {
        Strategy::Contiguous => (0..e).map(|x| vec![(x / per, 1.0)]).collect(),
        Strategy::RoundRobin => (0..e).map(|x| vec![(x % n, 1.0)]).collect(),
        Strategy::Balanced => {
            // Items: (expert, share); the hottest expert split in two.
            let hottest = (0..e).max_by(|&a, &b| load[a].total_cmp(&load[b]));
            let mut items: Vec<(usize, f64)> = Vec::new();
            for x in 0..e {
                if replicate_hottest && Some(x) == hottest && n > 1 {
                    items.extend([(x, 0.5), (x, 0.5)]);
                } else {
                    items.push((x, 1.0));
                }
            }
            items.sort_by(|a, b| {
                (load[b.0] * b.1)
                    .total_cmp(&(load[a.0] * a.1))
                    .then(a.0.cmp(&b.0))
            });
            let room = items.len().div_ceil(n);
            let (mut dev_load, mut dev_items) = (vec![0.0f64; n], vec![0usize; n]);
            let mut layout: Layout = vec![Vec::new(); e];
            for (x, share) in items {
                // The least loaded device with room that does not hold x yet.
                let j = (0..n)
                    .filter(|&j| dev_items[j] < room && !layout[x].iter().any(|p| p.0 == j))
                    .min_by(|&a, &b| dev_load[a].total_cmp(&dev_load[b]).then(a.cmp(&b)))
                    .unwrap_or(0);
                dev_load[j] += load[x] * share;
                dev_items[j] += 1;
                layout[x].push((j, share));
            }
            layout
        }
    }
}

/// One device's share of a placement, per step.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DeviceCost {
    /// Assignments its experts compute.
    pub load: f64,
    /// All-to-all bytes to and from devices of its node.
    pub intra_bytes: f64,
    /// All-to-all bytes to and from other nodes.
    pub inter_bytes: f64,
    /// Seconds of its own work: expert FLOPs plus bytes over bandwidth.
    pub seconds: f64,
}

/// The cost of one layer's `layout` on `n` devices to every device, with
/// `origin[i][e]` the assignments device i's tokens make of expert e (one
/// row: split evenly over the devices).
pub fn layer_cost(
    layout: &Layout,
    origin: &[Vec<f64>],
    n: usize,
    per_node: usize,
    d_model: usize,
) -> Vec<DeviceCost> {
    let from = |i: usize, e: usize| match origin.len() {
        1 => origin[0][e] / n as f64,
        _ => origin.get(i).map_or(0.0, |o| o[e]),
    };
    // rows[i][j]: rows device i sends device j per exchange.
    let mut rows = vec![vec![0.0; n]; n];
    for (e, homes) in layout.iter().enumerate() {
        for (i, row) in rows.iter_mut().enumerate() {
            for &(j, share) in homes {
                row[j] += from(i, e) * share;
            }
        }
    }
    let row_bytes = 4.0 * d_model as f64;
    (0..n)
        .map(|i| {
            let mut c = DeviceCost {
                load: (0..n).map(|src| rows[src][i]).sum(),
                ..Default::default()
            };
            for j in (0..n).filter(|&j| j != i) {
                // Four exchanges, each both ways.
                let bytes = 4.0 * row_bytes * (rows[i][j] + rows[j][i]);
                if i / per_node.max(1) == j / per_node.max(1) {
                    c.intra_bytes += bytes;
                } else {
                    c.inter_bytes += bytes;
                }
            }
            c
        })
        .collect()
}

/// One placement of every layer, and what it costs each device per step.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Which strategy.
    pub strategy: Strategy,
    /// Per MoE layer.
    pub layouts: Vec<Layout>,
    /// Per device, summed over layers.
    pub devices: Vec<DeviceCost>,
    /// Σ over layers of the busiest device's load, over Σ of the mean load
    /// (1.0: every layer balanced).
    pub imbalance: f64,
    /// Predicted MoE seconds per step: Σ over layers of the slowest device.
    pub seconds: f64,
}

/// Score every strategy for `counts` of a model shaped by `cfg`.
pub fn plan(cfg: &RunConfig, counts: &Counts, opts: &PlanOptions) -> Result<Vec<Plan>> {
    let n = opts.devices;
    if n == 0 {
        bail!("--devices must be at least 1");
    }
    if opts.per_node == 0 || opts.link_gbps <= 0.0 || opts.intra_node_gbps <= 0.0 {
        bail!("--per-node, --link-gbps and --intra-node-gbps must be positive");
    }
    let e = cfg.moe.num_experts;
    if e < n {
        bail!("{n} devices for {e} experts: at most one device per expert");
    }
    let (d, f) = (cfg.model.d_model, cfg.moe.d_expert);
    let rate = match opts.flops {
        Some(r) if r > 0.0 => r,
        Some(_) => bail!("--flops must be positive"),
        None => measured_rate(cfg, counts)?,
    };
    // Exact origins only when the run had one rank per device.
    let exact = counts.per_rank && counts.by_rank.first().is_some_and(|l| l.len() == n);
    let mut plans = Vec::new();
    let seconds_of = |c: &DeviceCost| {
        c.load * 18.0 * (d * f) as f64 / rate
            + 8.0 * c.inter_bytes / (opts.link_gbps * 1e9)
            + 8.0 * c.intra_bytes / (opts.intra_node_gbps * 1e9)
    };
    for strategy in [
        Strategy::Contiguous,
        Strategy::RoundRobin,
        Strategy::Balanced,
    ] {
        let mut devices = vec![DeviceCost::default(); n];
        let mut layouts = Vec::new();
        let (mut busiest, mut mean, mut seconds) = (0.0, 0.0, 0.0);
        for by_rank in &counts.by_rank {
            let total: Vec<f64> = (0..e)
                .map(|x| {
                    by_rank
                        .iter()
                        .map(|r| r.get(x).copied().unwrap_or(0.0))
                        .sum()
                })
                .collect();
            let replicate = opts.replicate_hottest && strategy == Strategy::Balanced;
            let layout = place(strategy, &total, n, replicate);
            let origin: Vec<Vec<f64>> = if exact { by_rank.clone() } else { vec![total] };
            let costs = layer_cost(&layout, &origin, n, opts.per_node, d);
            busiest += costs.iter().map(|c| c.load).fold(0.0, f64::max);
            mean += costs.iter().map(|c| c.load).sum::<f64>() / n as f64;
            seconds += costs.iter().map(seconds_of).fold(0.0, f64::max);
            for (dev, c) in devices.iter_mut().zip(costs) {
                dev.load += c.load;
                dev.intra_bytes += c.intra_bytes;
                dev.inter_bytes += c.inter_bytes;
                dev.seconds += seconds_of(&c);
            }
            layouts.push(layout);
        }
        plans.push(Plan {
            strategy,
            layouts,
            devices,
            imbalance: busiest / f64::max(mean, 1e-12),
            seconds,
        });
    }
    Ok(plans)
}

/// FLOP/s per process the run reached: its tokens per second times
/// 6 × the matmul parameters one token uses, over the processes.
fn measured_rate(cfg: &RunConfig, counts: &Counts) -> Result<f64> {
    let m = &cfg.model;
    let hd = m.head_dim();
    let attention = m.d_model * hd * (2 * m.n_heads + 2 * m.n_kv_heads);
    let moe_layers = counts.by_rank.len();
    let expert = 3 * m.d_model * cfg.moe.d_expert * cfg.moe.top_k
        + 3 * m.d_model * cfg.moe.shared_width()
        + m.d_model * cfg.moe.num_experts;
    let dense = 3 * m.d_model * m.d_ff;
    let params = m.n_layers * attention
        + moe_layers * expert
        + m.n_layers.saturating_sub(moe_layers) * dense
        + m.d_model * m.vocab_size;
    let ranks = counts.by_rank.first().map_or(1, |l| l.len()).max(1) as f64;
    let rate = counts.tokens_per_s * 6.0 * params as f64 / ranks;
    if !(rate.is_finite() && rate > 0.0) {
        bail!("the run logged no throughput: pass --flops");
    }
    Ok(rate)
}

/// The report: one row per strategy.
pub fn render(plans: &[Plan], counts: &Counts, opts: &PlanOptions) -> String {
    let mut out = format!(
        "{} devices ({} per node); counts: mean of the last {} logged steps{}\n\n",
        opts.devices,
        opts.per_node,
        counts.steps,
        if counts.per_rank { ", per rank" } else { "" }
    );
    out += "| placement | busiest/mean load | all-to-all MB/step/device (max): intra | inter | predicted MoE step (ms) |\n";
    out += "|---|---|---|---|---|\n";
    for p in plans {
        let max = |f: fn(&DeviceCost) -> f64| p.devices.iter().map(f).fold(0.0, f64::max);
        out += &format!(
            "| {} | {:.3} | {:.3} | {:.3} | {:.3} |\n",
            p.strategy.name(),
            p.imbalance,
            max(|d| d.intra_bytes) / 1e6,
            max(|d| d.inter_bytes) / 1e6,
            p.seconds * 1e3,
        );
    }
    out
}

/// Every plan as JSON (`plan-experts --out`): per strategy, its layouts
/// (per layer and expert, `[device, share]` pairs, which
/// `train.expert_placement` reads), per-device costs, load and time.
pub fn to_json(plans: &[Plan]) -> serde_json::Value {
    plans
        .iter()
        .map(|p| {
            let devices: Vec<serde_json::Value> = p
                .devices
                .iter()
                .map(|d| {
                    serde_json::json!({
                        "load": d.load,
                        "intra_bytes": d.intra_bytes,
                        "inter_bytes": d.inter_bytes,
                        "seconds": d.seconds,
                    })
                })
                .collect();
            let plan = serde_json::json!({
                "layers": p.layouts,
                "devices": devices,
                "busiest_over_mean_load": p.imbalance,
                "predicted_moe_seconds": p.seconds,
            });
            (p.strategy.name().to_string(), plan)
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devices_of(layout: &Layout) -> Vec<Vec<usize>> {
        layout
            .iter()
            .map(|h| h.iter().map(|p| p.0).collect())
            .collect()
    }

    #[test]
    fn the_three_placements_put_experts_where_they_say() {
        let load = [10.0, 1.0, 1.0, 8.0];
        assert_eq!(
            devices_of(&place(Strategy::Contiguous, &load, 2, false)),
            [[0], [0], [1], [1]]
        );
        assert_eq!(
            devices_of(&place(Strategy::RoundRobin, &load, 2, false)),
            [[0], [1], [0], [1]]
        );
        // Largest first onto the lighter device: 10 → 0, 8 → 1, 1 → 1, 1 → 0.
        let balanced = place(Strategy::Balanced, &load, 2, false);
        assert_eq!(devices_of(&balanced), [[0], [1], [0], [1]]);
        // Replicating the hottest: its halves (5, 5) land on both devices.
        let mut rep = place(Strategy::Balanced, &load, 2, true);
        rep[0].sort_by_key(|p| p.0);
        assert_eq!(rep[0], [(0, 0.5), (1, 0.5)]);
        assert_eq!(rep.iter().map(Vec::len).sum::<usize>(), 5);
    }

    #[test]
    fn loads_and_bytes_match_a_hand_count() {
        // Two devices, contiguous: experts 0, 1 on device 0; 2, 3 on 1.
        // Device 0's tokens ask (1, 2, 3, 4) of the experts, device 1's
        // (5, 6, 7, 8).
        let layout = place(Strategy::Contiguous, &[0.0; 4], 2, false);
        let origin = vec![vec![1.0, 2.0, 3.0, 4.0], vec![5.0, 6.0, 7.0, 8.0]];
        let c = layer_cost(&layout, &origin, 2, 1, 10);
        // Loads: device 0 computes 1 + 2 + 5 + 6; device 1, 3 + 4 + 7 + 8.
        assert_eq!((c[0].load, c[1].load), (14.0, 22.0));
        // Device 0 sends 3 + 4 = 7 rows and receives 5 + 6 = 11, per
        // exchange; 4 exchanges of 40-byte rows: 4 · 40 · 18 = 2880 bytes,
        // all between nodes (one device per node). Device 1: the same rows.
        assert_eq!((c[0].inter_bytes, c[0].intra_bytes), (2880.0, 0.0));
        assert_eq!(c[1].inter_bytes, 2880.0);
        // On one node the same bytes are intra-node.
        let c = layer_cost(&layout, &origin, 2, 2, 10);
        assert_eq!((c[0].inter_bytes, c[0].intra_bytes), (0.0, 2880.0));
        // Global counts only: each device sends half of them.
        let global = vec![vec![6.0, 8.0, 10.0, 12.0]];
        let c = layer_cost(&layout, &global, 2, 1, 10);
        // Device 0 sends (10 + 12) / 2 = 11 and receives (6 + 8) / 2 = 7.
        assert_eq!((c[0].load, c[0].inter_bytes), (14.0, 2880.0));
    }
}
