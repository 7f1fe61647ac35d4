//! Data parallelism: every rank holds the whole model and runs it on its own
//! batch; after the backward pass the gradients are averaged over the ranks
//! (in buckets, one all-reduce each), so every rank applies the same update
//! and the parameters stay identical. The step's losses and routing
//! statistics are reduced the same way, so the logs show the global batch.
//!
//! Averaging the per-rank gradients equals the gradient of the mean of the
//! per-rank losses: with equal real tokens per rank, the gradient one process
//! would compute on the concatenated batch.

use super::Collective;
use crate::metrics::LayerReport;
use crate::params::PathStack;
use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::DType;
use std::collections::HashMap;

/// Whether the parameter at `path` is a routed expert stack, which expert
/// parallelism shards.
pub fn is_expert_param(path: &str) -> bool {
    path.contains(".mlp.experts.")
}

/// Where a gradient sits in the flat buffers: (expert stack?, offset,
/// shape, dtype).
type Spans = HashMap<ParamId, (bool, usize, Vec<usize>, DType)>;

/// Average `grads` over every rank, `bucket_bytes` of f32 per all-reduce.
/// Under expert parallelism (`replicas`: the ranks holding the same
/// experts), each expert stack's gradient is summed over those ranks only;
/// every rank's tokens already reached it through the exchanges, so the
/// sum over the world's W ranks' losses is complete and divided by W like
/// the rest. With one rank, `grads` come back untouched.
pub fn average_grads<M: Module>(
    module: &M,
    mut grads: GradientsParams,
    comm: &mut dyn Collective,
    replicas: Option<&mut dyn Collective>,
    bucket_bytes: usize,
) -> GradientsParams {
    let size = comm.world().size;
    if size == 1 {
        return grads;
    }
    // Every gradient, flattened end to end in the module's parameter order
    // (the same on every rank): shared parameters in one buffer, expert
    // stacks in the other when they are sharded.
    struct Gather<'a> {
        grads: &'a GradientsParams,
        path: PathStack,
        sharded: bool,
        flat: [Vec<f32>; 2],
        spans: Spans,
    }
    impl ModuleVisitor for Gather<'_> {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.path.enter(name, container_type);
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.exit();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.get::<D>(param.id) {
                let expert = self.sharded && is_expert_param(&self.path.path());
                let flat = &mut self.flat[expert as usize];
                let (dims, dtype) = (g.dims().to_vec(), g.dtype());
                let start = flat.len();
                let data = g.into_data().convert::<f32>();
                flat.extend(data.iter::<f32>());
                self.spans.insert(param.id, (expert, start, dims, dtype));
            }
        }
    }
    let mut gather = Gather {
        grads: &grads,
        path: PathStack::default(),
        sharded: replicas.is_some(),
        flat: [Vec::new(), Vec::new()],
        spans: HashMap::new(),
    };
    module.visit(&mut gather);
    let ([mut shared, mut experts], spans) = (gather.flat, gather.spans);
    let bucket = (bucket_bytes / 4).max(1);
    for chunk in shared.chunks_mut(bucket) {
        comm.all_reduce_sum(chunk);
    }
    if let Some(replicas) = replicas {
        if replicas.world().size > 1 {
            for chunk in experts.chunks_mut(bucket) {
                replicas.all_reduce_sum(chunk);
            }
        }
    }
    let inv = 1.0 / size as f32;
    shared
        .iter_mut()
        .chain(&mut experts)
        .for_each(|x| *x *= inv);

    struct Scatter<'a> {
        grads: &'a mut GradientsParams,
        flat: [&'a [f32]; 2],
        spans: &'a Spans,
    }
    impl ModuleVisitor for Scatter<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let Some((expert, start, dims, dtype)) = self.spans.get(&param.id) else {
                return;
            };
            let Some(old) = self.grads.remove::<D>(param.id) else {
                return;
            };
            let n: usize = dims.iter().product();
            let values = self.flat[*expert as usize][*start..start + n].to_vec();
            let g = Tensor::<D>::from_data(TensorData::new(values, dims.clone()), &old.device())
                .cast(*dtype);
            self.grads.register(param.id, g);
        }
    }
    module.visit(&mut Scatter {
        grads: &mut grads,
        flat: [&shared, &experts],
        spans: &spans,
    });
    grads
}

/// The sums of squares of the gradients held here (host, f64): of every
/// parameter but the routed expert stacks, and of those.
pub fn sq_norms<M: Module>(module: &M, grads: &GradientsParams) -> [f64; 2] {
    let mut sum = [0.0; 2];
    for (path, g) in crate::params::grads(module, grads) {
        let g = g.convert::<f32>();
        sum[is_expert_param(&path) as usize] += g
            .iter::<f32>()
            .map(|x| (x as f64) * (x as f64))
            .sum::<f64>();
    }
    sum
}

/// The values of one step that every rank must agree on, summed or
/// averaged over the ranks: the mean of each loss term, and per MoE layer
/// the summed expert counts, the mean router entropy and the mean router
/// input (one all-reduce), and each rank's own kept counts (one
/// all-gather, whose sum is the kept count).
pub fn reduce_step_values(
    losses: &mut [f64],
    layers: &mut [LayerReport],
    comm: &mut dyn Collective,
) {
    let size = comm.world().size;
    if size == 1 {
        return;
    }
    // Each rank's own kept counts, before they are summed.
    let mine: Vec<u8> = layers
        .iter()
        .flat_map(|l| &l.kept_per_expert)
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let all = comm.all_gather(&mine);
    let mut at = 0;
    for l in layers.iter_mut() {
        let e = l.kept_per_expert.len();
        let by_rank = all
            .iter()
            .map(|b| {
                (at..at + e)
                    .map(|i| {
                        b.get(8 * i..8 * i + 8).map_or(f64::NAN, |w| {
                            f64::from_le_bytes(w.try_into().unwrap_or_default())
                        })
                    })
                    .collect()
            })
            .collect::<Vec<Vec<f64>>>();
        // Counts are whole numbers: the sum is exact in any order.
        l.kept_per_expert = (0..e).map(|x| by_rank.iter().map(|r| r[x]).sum()).collect();
        l.kept_by_rank = Some(by_rank);
        at += e;
    }
    let mut buf: Vec<f64> = losses.to_vec();
    for l in layers.iter() {
        buf.extend(&l.routed_per_expert);
        buf.push(l.rerouted);
        buf.push(l.router_entropy);
        if let Some(m) = &l.mean_input {
            buf.extend(m);
        }
    }
    comm.all_reduce_sum_f64(&mut buf);
    let w = size as f64;
    let mut it = buf.into_iter();
    for x in losses.iter_mut() {
        *x = it.next().unwrap_or(f64::NAN) / w;
    }
    let mut take = |v: &mut [f64], div: f64| {
        for x in v.iter_mut() {
            *x = it.next().unwrap_or(f64::NAN) / div;
        }
    };
    for l in layers.iter_mut() {
        take(&mut l.routed_per_expert, 1.0);
        take(std::slice::from_mut(&mut l.rerouted), 1.0);
        take(std::slice::from_mut(&mut l.router_entropy), w);
        if let Some(m) = &mut l.mean_input {
            take(m, w);
        }
    }
}

/// Sum each MoE layer's assignments per expert `[E]` and real tokens `[1]`
/// over every rank (global balance statistics): one host read and one
/// all-reduce for all layers. With one rank, the tensors come back as they
/// are.
pub fn sum_counts(
    counts: Vec<(Tensor<1>, Tensor<1>)>,
    comm: &mut dyn Collective,
) -> Vec<(Tensor<1>, Tensor<1>)> {
    if comm.world().size == 1 || counts.is_empty() {
        return counts;
    }
    let device = counts[0].0.device();
    let mut sizes = Vec::with_capacity(counts.len());
    let mut buf = Vec::new();
    // Host sync: the global balance loss needs every rank's counts.
    for (routed, tokens) in &counts {
        let r: Vec<f64> = routed.to_data().iter::<f32>().map(f64::from).collect();
        sizes.push(r.len());
        buf.extend(r);
        buf.extend(tokens.to_data().iter::<f32>().map(f64::from));
    }
    comm.all_reduce_sum_f64(&mut buf);
    let mut at = 0;
    sizes
        .into_iter()
        .map(|e| {
            let routed: Vec<f32> = buf[at..at + e].iter().map(|&x| x as f32).collect();
            let tokens = buf[at + e] as f32;
            at += e + 1;
            (
                Tensor::from_data(TensorData::new(routed, [e]), &device),
                Tensor::from_data(TensorData::new(vec![tokens], [1]), &device),
            )
        })
        .collect()
}

/// CRC-32C of the float parameters' bytes, in path order: of every
/// parameter but the routed expert stacks, and of those. Every rank holds the same
/// other parameters, and every rank of a slot the same experts, while the
/// ranks stay in step.
pub fn param_checksums<M: Module>(module: &M) -> [u32; 2] {
    let mut crc = [0u32; 2];
    for (path, data) in crate::params::collect(module) {
        let i = is_expert_param(&path) as usize;
        crc[i] = crc32c::crc32c_append(crc[i], data.as_bytes());
    }
    crc
}
