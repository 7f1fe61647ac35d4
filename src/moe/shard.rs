//! Expert parallelism inside one MoE layer (GShard, Lepikhin et al. 2020;
//! Megatron-Core's all-to-all dispatcher): the N ranks of an expert-parallel
//! group each hold E / N consecutive experts. After routing and the drop
//! decisions (made by each rank for its own tokens, so capacity is per
//! rank, exactly as under data parallelism), each rank sends every kept
//! assignment's row to the rank holding its expert (the counts per expert
//! first, then the rows), runs its experts over what it received, and sends
//! the results back; the origin combines them. The backward pass mirrors
//! both exchanges ([`crate::dist::exchange`]).

use super::dispatch::{host_ints, Dispatched};
use super::experts::Experts;
use crate::dist::exchange::{exchange_rows, RowLink, RowRoute};
use burn::prelude::*;

/// This rank's share of one layer's experts.
#[derive(Debug, Clone)]
pub struct ExpertShard {
    /// Global index of the first expert held here.
    pub first: usize,
    /// Experts held here (E / N).
    pub count: usize,
    /// The expert-parallel group; rank j holds experts `j·count ..`.
    pub link: RowLink,
}

impl ExpertShard {
    /// Run the kept assignments through the experts wherever they live.
    /// `dispatched` holds this rank's rows grouped by global expert; the
    /// result holds their outputs in the same rows.
    pub fn through(&self, dispatched: Dispatched, experts: &Experts) -> Dispatched {
        let Dispatched::Rows(x, grouping) = dispatched else {
            unreachable!("expert parallelism runs on the CPU backend in f32 (checked at setup)")
        };
        let [_, d] = x.dims();
        let device = x.device();
        let (n, l) = (self.link.world().size, self.count);
        // Rows per global expert, and so per destination rank.
        let offsets = host_ints(grouping.offsets.clone()); // [E + 1]
        let per_expert: Vec<u64> = offsets.windows(2).map(|w| (w[1] - w[0]) as u64).collect();
        let send: Vec<usize> = per_expert
            .chunks(l)
            .map(|c| c.iter().sum::<u64>() as usize)
            .collect();
        // What each source rank sends for each of this rank's experts. [N · L]
        let got = self.link.counts(&per_expert);
        let recv: Vec<usize> = got
            .chunks(l)
            .map(|c| c.iter().sum::<u64>() as usize)
            .collect();
        let route = RowRoute {
            send,
            recv: recv.clone(),
            width: d,
            link: self.link.clone(),
        };
        let arrived = exchange_rows(x, route.clone()); // [Σ recv, d], by source rank

        // Regroup by local expert: source i's rows for expert e sit at
        // start[i] + Σ_{e' < e} got[i·L + e'].
        let mut start = vec![0usize; n];
        for i in 1..n {
            start[i] = start[i - 1] + recv[i - 1];
        }
        let mut order = Vec::with_capacity(arrived.dims()[0]);
        let mut local_offsets = vec![0i64; l + 1];
        for e in 0..l {
            for i in 0..n {
                let before: u64 = got[i * l..i * l + e].iter().sum();
                let from = start[i] + before as usize;
                order.extend((from..from + got[i * l + e] as usize).map(|r| r as i64));
            }
            local_offsets[e + 1] = order.len() as i64;
        }
        let mut inverse = vec![0i64; order.len()];
        for (pos, &r) in order.iter().enumerate() {
            inverse[r as usize] = pos as i64;
        }
        let ints = |v: Vec<i64>| {
            let len = v.len();
            Tensor::<1, Int>::from_data(TensorData::new(v, [len]), &device)
        };
        let grouped = arrived.select(0, ints(order)); // [Σ recv, d], by local expert
        let out = experts.forward_grouped(grouped, ints(local_offsets));
        let out = out.select(0, ints(inverse)); // by source rank again
        let back = exchange_rows(out, route.reversed()); // [rows, d], this rank's order
        Dispatched::Rows(back, grouping)
    }
}

/// Experts `first .. first + count` of a stack of E, as new leaves.
pub fn slice_experts(experts: Experts, first: usize, count: usize) -> Experts {
    let cut = |p: burn::module::Param<Tensor<3>>| {
        p.map(|t| {
            let grad = t.is_require_grad();
            let t = Tensor::<3>::from_inner(t.inner().slice([first..first + count]));
            if grad {
                t.require_grad()
            } else {
                t
            }
        })
    };
    Experts {
        gate_proj: cut(experts.gate_proj),
        up_proj: cut(experts.up_proj),
        down_proj: cut(experts.down_proj),
    }
}
