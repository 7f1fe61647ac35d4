//! Expert parallelism inside one MoE layer (GShard, Lepikhin et al. 2020;
//! Megatron-Core's all-to-all dispatcher): the N ranks of an expert-parallel
//! group each hold some of the layer's experts (E / N consecutive ones, or
//! where `train.expert_placement` puts them). After routing and the drop
//! decisions (made by each rank for its own tokens, so capacity is per
//! rank, exactly as under data parallelism), each rank sends every kept
//! assignment's row to the rank holding its expert (the counts per expert
//! first, then the rows), runs its experts over what it received, and sends
//! the results back; the origin combines them. The backward pass mirrors
//! both exchanges ([`crate::dist::exchange`]).
//!
//! An expert may live on several ranks of the group (a placement that
//! replicates a hot expert): each origin then cuts that expert's rows by
//! the placement's shares, in row order, and sends each part to one
//! holder. The holders' gradients for it are summed over the group
//! ([`ExpertShard::sum_replica_grads`]), so every copy takes the same
//! update and stays identical.

use super::dispatch::Dispatched;
use super::experts::Experts;
use crate::dist::exchange::{exchange_rows, RowLink, RowRoute};
use burn::optim::GradientsParams;
use burn::prelude::*;

/// This rank's share of one layer's experts.
#[derive(Debug, Clone)]
pub struct ExpertShard {
    /// The experts of each rank of the group (global indices, ascending:
    /// the order of that rank's stack).
    pub by_rank: Vec<Vec<usize>>,
    /// Each expert's holders (ranks of the group) and the share of every
    /// origin's rows for that expert each one computes (summing to 1).
    pub homes: Vec<Vec<(usize, f64)>>,
    /// This rank's place in the group.
    pub slot: usize,
    /// The expert-parallel group.
    pub link: RowLink,
}

impl ExpertShard {
    /// The shard of the rank at `slot` when expert e lives on the ranks of
    /// `homes[e]` of `link`'s group, each with its share of e's rows.
    pub fn new(homes: &[Vec<(usize, f64)>], slot: usize, link: RowLink) -> Self {
        let n = link.world().size;
        let by_rank = (0..n)
            .map(|j| {
                (0..homes.len())
                    .filter(|&e| homes[e].iter().any(|h| h.0 == j))
                    .collect()
            })
            .collect();
        Self {
            by_rank,
            homes: homes.to_vec(),
            slot,
            link,
        }
    }

    /// The experts held here, in stack order.
    pub fn held(&self) -> &[usize] {
        &self.by_rank[self.slot]
    }

    /// Where global expert `x` sits in this rank's stack, if it is held here.
    pub fn local(&self, x: usize) -> Option<usize> {
        self.held().iter().position(|&h| h == x)
    }

    /// The first rank of the group holding expert `x` (the one that counts
    /// it in the gradient norm and sends it when another rank needs it).
    pub fn first_holder(&self, x: usize) -> usize {
        self.homes[x].iter().map(|h| h.0).min().unwrap_or(0)
    }

    /// The experts held by more than one rank, ascending.
    pub fn replicated(&self) -> Vec<usize> {
        (0..self.homes.len())
            .filter(|&x| self.homes[x].len() > 1)
            .collect()
    }

    /// How `count` rows of expert `x` from one origin are cut among its
    /// holders: `(rank, rows)` in the placement's order, in row order.
    fn cut(&self, x: usize, count: usize) -> Vec<(usize, usize)> {
        let (mut parts, mut cum, mut done) = (Vec::new(), 0.0, 0usize);
        let homes = &self.homes[x];
        for (i, &(rank, share)) in homes.iter().enumerate() {
            cum += share;
            let end = if i + 1 == homes.len() {
                count
            } else {
                ((count as f64 * cum).round() as usize).clamp(done, count)
            };
            parts.push((rank, end - done));
            done = end;
        }
        parts
    }

    /// Run the kept assignments through the experts wherever they live.
    /// `dispatched` holds this rank's rows grouped by global expert; the
    /// result holds their outputs in the same rows.
    pub fn through(&self, dispatched: Dispatched, experts: &Experts) -> Dispatched {
        let Dispatched::Rows(x, grouping) = dispatched else {
            unreachable!(
                "expert parallelism runs where the experts take grouped rows (checked at setup)"
            )
        };
        let [_, d] = x.dims();
        let device = x.device();
        let n = self.link.world().size;
        let l = self.held().len();
        // Every rank's chunk of the count exchange is as long as the
        // longest stack of the group.
        let m = self.by_rank.iter().map(Vec::len).max().unwrap_or(0);
        let ints = |v: Vec<i64>| {
            let len = v.len();
            Tensor::<1, Int>::from_data(TensorData::new(v, [len]), &device)
        };
        // Where each expert's rows go: per destination rank, per expert of
        // its stack, the range of this rank's rows.
        let offsets = &grouping.offsets; // E + 1
        let mut ranges = vec![Vec::new(); n];
        for e in 0..self.homes.len() {
            let mut at = offsets[e];
            for (rank, rows) in self.cut(e, offsets[e + 1] - offsets[e]) {
                ranges[rank].push((e, at..at + rows));
                at += rows;
            }
        }
        // This rank's rows in the order of their destination ranks' stacks,
        // and the count per expert each destination gets.
        let (mut order, mut per_expert, mut send) = (Vec::new(), vec![0u64; n * m], vec![0; n]);
        for (j, experts) in self.by_rank.iter().enumerate() {
            for (k, &e) in experts.iter().enumerate() {
                let Some((_, rows)) = ranges[j].iter().find(|r| r.0 == e) else {
                    continue;
                };
                order.extend(rows.clone().map(|r| r as i64));
                per_expert[j * m + k] = rows.len() as u64;
                send[j] += rows.len();
            }
        }
        let in_place = order.iter().enumerate().all(|(i, &r)| r == i as i64);
        let outgoing = if in_place {
            x
        } else {
            x.select(0, ints(order.clone()))
        };
        // What each source rank sends for each of this rank's experts. [N · m]
        let got = self.link.counts(&per_expert);
        let recv: Vec<usize> = got
            .chunks(m.max(1))
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
        // start[i] + Σ_{e' < e} got[i·m + e'].
        let mut start = vec![0usize; n];
        for i in 1..n {
            start[i] = start[i - 1] + recv[i - 1];
        }
        let mut by_expert = Vec::with_capacity(arrived.dims()[0]);
        let mut local_offsets = vec![0usize; l + 1];
        for e in 0..l {
            for i in 0..n {
                let before: u64 = got[i * m..i * m + e].iter().sum();
                let from = start[i] + before as usize;
                by_expert.extend((from..from + got[i * m + e] as usize).map(|r| r as i64));
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

    /// Sum the gradient of every replicated expert over the group (each
    /// holder computed it for its part of the rows), so that every copy
    /// takes the same update. Every rank of the group calls it.
    pub fn sum_replica_grads(&self, experts: &Experts, grads: &mut GradientsParams) {
        let replicated = self.replicated();
        if replicated.is_empty() {
            return;
        }
        for param in [&experts.gate_proj, &experts.up_proj, &experts.down_proj] {
            let [l, a, b] = param.val().dims();
            let per = a * b;
            let (mut host, device, dtype) = match grads.remove::<3>(param.id) {
                Some(g) => {
                    let (device, dtype) = (g.device(), g.dtype());
                    let v = g.into_data().convert::<f32>().try_to_vec::<f32>();
                    (v.unwrap_or_else(|_| vec![0.0; l * per]), device, dtype)
                }
                None => (
                    vec![0.0; l * per],
                    param.val().device(),
                    param.val().dtype(),
                ),
            };
            let mut buf = vec![0f32; replicated.len() * per];
            for (k, &x) in replicated.iter().enumerate() {
                if let Some(i) = self.local(x) {
                    buf[k * per..(k + 1) * per].copy_from_slice(&host[i * per..(i + 1) * per]);
                }
            }
            self.link.all_reduce_sum(&mut buf);
            for (k, &x) in replicated.iter().enumerate() {
                if let Some(i) = self.local(x) {
                    host[i * per..(i + 1) * per].copy_from_slice(&buf[k * per..(k + 1) * per]);
                }
            }
            let g = Tensor::<3>::from_data(TensorData::new(host, [l, a, b]), &device).cast(dtype);
            grads.register(param.id, g);
        }
    }

    /// The sum of squares of the gradients of the experts this rank holds
    /// as a second copy (a replicated expert whose first holder is another
    /// rank), which the gradient norm must not count twice.
    pub fn copies_sq_norm(&self, experts: &Experts, grads: &GradientsParams) -> f64 {
        let seconds: Vec<usize> = self
            .replicated()
            .into_iter()
            .filter(|&x| self.first_holder(x) != self.slot)
            .filter_map(|x| self.local(x))
            .collect();
        if seconds.is_empty() {
            return 0.0;
        }
        let mut sum = 0.0;
        for param in [&experts.gate_proj, &experts.up_proj, &experts.down_proj] {
            let Some(g) = grads.get::<3>(param.id) else {
                continue;
            };
            let [l, a, b] = g.dims();
            let per = a * b;
            let host = g
                .into_data()
                .convert::<f32>()
                .try_to_vec::<f32>()
                .unwrap_or_default();
            if host.len() != l * per {
                continue;
            }
            for &i in &seconds {
                sum += host[i * per..(i + 1) * per]
                    .iter()
                    .map(|&v| (v as f64) * (v as f64))
                    .sum::<f64>();
            }
        }
        sum
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
