//! The parts of a run that differ with several processes: agreeing on the
//! run directory, spreading the experts over an expert-parallel group,
//! gathering them (and every rank's data cursor) for a checkpoint, and
//! checking that the ranks are still in step.

use super::optim::AdamW;
use super::setup::pick_run_dir;
use super::RunOptions;
use crate::config::RunConfig;
use crate::data::stream::Cursor;
use crate::dist::dp::{is_expert_param, param_checksums};
use crate::dist::{Collective, ExpertParallel};
use crate::kernels::{served_on, Op};
use crate::model::LanguageModel;
use anyhow::{bail, Context, Result};
use burn::prelude::*;
use burn::tensor::DType;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The run directory every rank uses: rank 0's choice.
pub(super) fn agree_run_dir(opts: &RunOptions, comm: &mut dyn Collective) -> Result<PathBuf> {
    let world = comm.world();
    if world.size == 1 {
        return pick_run_dir(opts);
    }
    let mut bytes = if world.is_writer() {
        pick_run_dir(opts)?
            .to_str()
            .context("the run directory's path is not UTF-8")?
            .as_bytes()
            .to_vec()
    } else {
        Vec::new()
    };
    comm.broadcast(&mut bytes, 0);
    Ok(PathBuf::from(String::from_utf8(bytes)?))
}

/// Set expert parallelism up when `train.expert_parallel` > 1: check what
/// it needs, then keep this rank's experts of every MoE layer (and their
/// AdamW moments, on a resume).
pub(super) fn shard_experts(
    model: &mut LanguageModel,
    adam: &mut AdamW,
    cfg: &RunConfig,
    comm: &mut dyn Collective,
    device: &Device,
) -> Result<Option<ExpertParallel>> {
    let n = cfg.train.expert_parallel;
    if n == 1 {
        return Ok(None);
    }
    let size = comm.world().size;
    if !size.is_multiple_of(n) {
        bail!("train.expert_parallel = {n} must divide the number of processes ({size})");
    }
    let grouped = served_on(Op::GroupedSwiglu, device, DType::F32);
    if !grouped || cfg.train.precision != crate::config::Precision::F32 {
        bail!(
            "train.expert_parallel = {n}: expert parallelism runs the experts over rows \
             grouped by expert, in f32 (train.precision = \"f32\"): on the CPU backend \
             (--device flex), or on a GPU with train.gpu_kernels = true"
        );
    }
    let experts: Vec<usize> = model.moe_layers().map(|l| l.config().num_experts).collect();
    if experts.is_empty() {
        bail!("train.expert_parallel = {n}: the model has no MoE layer");
    }
    if let Some(e) = experts.iter().find(|&&e| e % n != 0) {
        bail!("train.expert_parallel = {n} must divide moe.num_experts ({e})");
    }
    let homes: Vec<crate::dist::plan::Layout> = match &cfg.train.expert_placement {
        Some(spec) => crate::dist::plan::read_placement(spec, n, &experts)?,
        None => experts
            .iter()
            .map(|&e| (0..e).map(|x| vec![(x / (e / n), 1.0)]).collect())
            .collect(),
    };
    let mut ep = ExpertParallel::new(comm, n)?;
    let indices = model.moe_layer_indices();
    for ((layer, homes), index) in model.moe_layers_mut().zip(&homes).zip(indices) {
        layer.shard_experts(homes, ep.slot, ep.link.clone());
        let by_rank = layer.expert_ranks().unwrap_or_default().to_vec();
        ep.layers.insert(index, by_rank);
    }
    // Each expert's moments are a contiguous run of the flat vector: keep
    // the runs of the experts held here, in stack order.
    for moments in [&mut adam.m, &mut adam.v] {
        for (path, t) in moments.iter_mut() {
            let Some(by_rank) = layer_of(path).and_then(|i| ep.layers.get(&i)) else {
                continue;
            };
            if !is_expert_param(path) {
                continue;
            }
            let held = &by_rank[ep.slot];
            let e = experts_of(by_rank);
            let per = t.dims()[0] / e;
            let index: Vec<i64> = held.iter().map(|&x| x as i64).collect();
            let index =
                Tensor::<1, Int>::from_data(TensorData::new(index, [held.len()]), &t.device());
            *t = t
                .clone()
                .reshape([e, per])
                .select(0, index)
                .reshape([held.len() * per]);
        }
    }
    Ok(Some(ep))
}

/// How many experts a layer has, from the experts each rank holds.
fn experts_of(by_rank: &[Vec<usize>]) -> usize {
    by_rank.iter().flatten().max().map_or(0, |&x| x + 1)
}

/// The block index in a parameter path `…layers.{i}.…`.
fn layer_of(path: &str) -> Option<usize> {
    let rest = &path[path.find("layers.")? + "layers.".len()..];
    rest.split('.').next()?.parse().ok()
}

/// Put the whole expert stacks back together in a checkpoint's tensors:
/// every entry of an expert stack (weights `[E/N, ..]`, flat moments) is
/// gathered from the group's ranks and each expert's run put back at its
/// index. Every rank calls it.
pub(super) fn gather_experts(tensors: &mut BTreeMap<String, TensorData>, ep: &ExpertParallel) {
    for (name, data) in tensors.iter_mut() {
        let Some(by_rank) = layer_of(name).and_then(|i| ep.layers.get(&i)) else {
            continue;
        };
        if !is_expert_param(name) {
            continue;
        }
        let local = data.clone().convert::<f32>();
        let parts = ep
            .link
            .all_gather_f32(local.as_slice::<f32>().unwrap_or_default());
        let e = experts_of(by_rank);
        let per = local.num_elements() / by_rank[ep.slot].len().max(1);
        let mut values = vec![0f32; e * per];
        for (part, experts) in parts.iter().zip(by_rank) {
            for (k, &x) in experts.iter().enumerate() {
                values[x * per..(x + 1) * per].copy_from_slice(&part[k * per..(k + 1) * per]);
            }
        }
        let mut shape = data.shape().to_vec();
        shape[0] = shape[0] / by_rank[ep.slot].len().max(1) * e;
        *data = TensorData::new(values, shape).convert_dtype(data.dtype());
    }
}

/// Every rank's data cursor, on rank 0 (rank order); `None` on the others.
pub(super) fn gather_cursors(
    comm: &mut dyn Collective,
    mine: &Cursor,
) -> Result<Option<Vec<Cursor>>> {
    let all = comm.all_gather(&serde_json::to_vec(mine)?);
    if !comm.world().is_writer() {
        return Ok(None);
    }
    let cursors = all
        .iter()
        .enumerate()
        .map(|(r, bytes)| {
            serde_json::from_slice(bytes).with_context(|| format!("reading rank {r}'s data cursor"))
        })
        .collect::<Result<_>>()?;
    Ok(Some(cursors))
}

/// Stop with an error unless the ranks are in step: every rank holds the
/// same non-expert parameters, and every rank of a slot the same experts.
/// Returns each rank's two checksums (see [`param_checksums`]).
pub(super) fn check_ranks_agree(
    model: &LanguageModel,
    comm: &mut dyn Collective,
    slots: usize,
    step: u64,
) -> Result<Vec<[u32; 2]>> {
    let [shared, experts] = param_checksums(model);
    let mine: Vec<u8> = [shared, experts]
        .iter()
        .flat_map(|c| c.to_le_bytes())
        .collect();
    let all: Vec<[u32; 2]> = comm
        .all_gather(&mine)
        .iter()
        .map(|b| {
            let word = |i: usize| {
                b.get(4 * i..4 * i + 4)
                    .map_or(0, |w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
            };
            [word(0), word(1)]
        })
        .collect();
    let shared_differ = all.iter().any(|c| c[0] != all[0][0]);
    let experts_differ = all
        .iter()
        .enumerate()
        .any(|(r, c)| c[1] != all[r % slots][1]);
    if shared_differ || experts_differ {
        bail!(
            "the ranks' parameters differ at step {step} (CRC-32C per rank, \
             shared and experts: {all:08x?}): the ranks are no longer in step"
        );
    }
    Ok(all)
}
