//! Expert parallelism inside one MoE layer (GShard, Lepikhin et al. 2020;
//! Megatron-Core's all-to-all dispatcher): the N ranks of an expert-parallel
//! group each hold E / N experts (consecutive ones, or where
//! `train.expert_placement` puts them). After routing and the drop
//! decisions (made by each rank for its own tokens, so capacity is per
//! rank, exactly as under data parallelism), each rank sends every kept
//! assignment's row to the rank holding its expert (the counts per expert
//! first, then the rows), runs its experts over what it received, and sends
//! the results back; the origin combines them. The backward pass mirrors
//! both exchanges ([`crate::dist::exchange`]).

use super::dispatch::Dispatched;
use super::experts::Experts;
use crate::dist::exchange::{exchange_rows, RowLink, RowRoute};
use burn::prelude::*;

/// This rank's share of one layer's experts.
#[derive(Debug, Clone)]
pub struct ExpertShard {
    /// The experts of each rank of the group (global indices, in the order
    /// of that rank's stack); every rank holds as many.
    pub by_rank: Vec<Vec<usize>>,
    /// This rank's place in the group.
    pub slot: usize,
    /// The expert-parallel group.
    pub link: RowLink,
}

impl ExpertShard {
    /// The shard of the rank at `slot` when expert e lives on rank
    /// `homes[e]` of `link`'s group.
    pub fn new(homes: &[usize], slot: usize, link: RowLink) -> Self {
        let n = link.world().size;
        let by_rank = (0..n)
            .map(|j| (0..homes.len()).filter(|&e| homes[e] == j).collect())
            .collect();
        Self {
            by_rank,
            slot,
            link,
        }
    }

    /// The experts held here, in stack order.
    pub fn held(&self) -> &[usize] {
        &self.by_rank[self.slot]
    }

    /// Run the kept assignments through the experts wherever they live.
    /// `dispatched` holds this rank's rows grouped by global expert; the
    /// result holds their outputs in the same rows.
    pub fn through(&self, dispatched: Dispatched, experts: &Experts) -> Dispatched {
        let Dispatched::Rows(x, grouping) = dispatched else {
            unreachable!("expert parallelism runs on the CPU backend in f32 (checked at setup)")
        };
        let [_, d] = x.dims();
        let device = x.device();
        let (n, l) = (self.link.world().size, self.held().len());
        let ints = |v: Vec<i64>| {
            let len = v.len();
            Tensor::<1, Int>::from_data(TensorData::new(v, [len]), &device)
        };
        // This rank's rows in the order of their destination ranks' stacks,
        // and the count per expert each destination gets.
        let offsets = &grouping.offsets; // E + 1
        let (mut order, mut per_expert, mut send) = (Vec::new(), Vec::new(), vec![0usize; n]);
        for (j, experts) in self.by_rank.iter().enumerate() {
            for &e in experts {
                order.extend((offsets[e]..offsets[e + 1]).map(|r| r as i64));
                per_expert.push((offsets[e + 1] - offsets[e]) as u64);
                send[j] += offsets[e + 1] - offsets[e];
            }
        }
        let in_place = order.iter().enumerate().all(|(i, &r)| r == i as i64);
        let outgoing = if in_place {
            x
        } else {
            x.select(0, ints(order.clone()))
        };
        // What each source rank sends for each of this rank's experts. [N · L]
        let got = self.link.counts(&per_expert);
        let recv: Vec<usize> = got
            .chunks(l.max(1))
            .map(|c| c.iter().sum::<u64>() as usize)
            .collect();
        let route = RowRoute {
            send,
            recv: recv.clone(),
            width: d,
            link: self.link.clone(),
        };
        let arrived = exchange_rows(outgoing, route.clone()); // [Σ recv, d], by source rank

        // Regroup by local expert: source i's rows for expert e sit at
        // start[i] + Σ_{e' < e} got[i·L + e'].
        let mut start = vec![0usize; n];
        for i in 1..n {
            start[i] = start[i - 1] + recv[i - 1];
        }
        let mut by_expert = Vec::with_capacity(arrived.dims()[0]);
        let mut local_offsets = vec![0usize; l + 1];
        for e in 0..l {
            for i in 0..n {
                let before: u64 = got[i * l..i * l + e].iter().sum();
                let from = start[i] + before as usize;
                by_expert.extend((from..from + got[i * l + e] as usize).map(|r| r as i64));
            }
            local_offsets[e + 1] = by_expert.len();
        }
        let grouped = arrived.select(0, ints(by_expert.clone())); // [Σ recv, d], by local expert
        let out = experts.forward_grouped(grouped, local_offsets);
        let out = out.select(0, ints(inverse(&by_expert))); // by source rank again
        let back = exchange_rows(out, route.reversed()); // in `order`
        let back = if in_place {
            back
        } else {
            back.select(0, ints(inverse(&order)))
        };
        Dispatched::Rows(back, grouping)
    }
}

/// The inverse of a permutation of `0..p.len()`.
fn inverse(p: &[i64]) -> Vec<i64> {
    let mut inv = vec![0i64; p.len()];
    for (pos, &r) in p.iter().enumerate() {
        inv[r as usize] = pos as i64;
    }
    inv
}

/// The experts `held` (global indices) of a stack, in that order, as new
/// leaves.
pub fn select_experts(experts: &Experts, held: &[usize]) -> Experts {
    let cut = |p: &burn::module::Param<Tensor<3>>| {
        let p = p.clone();
        p.map(|t| {
            let grad = t.is_require_grad();
            let device = t.device();
            let index: Vec<i64> = held.iter().map(|&e| e as i64).collect();
            let index = Tensor::<1, Int>::from_data(TensorData::new(index, [held.len()]), &device);
            let t = Tensor::<3>::from_inner(t.inner().select(0, index.inner()));
            if grad {
                t.require_grad()
            } else {
                t
            }
        })
    };
    Experts {
        gate_proj: cut(&experts.gate_proj),
        up_proj: cut(&experts.up_proj),
        down_proj: cut(&experts.down_proj),
    }
}
