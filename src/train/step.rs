//! One training or evaluation pass over a batch: tensors in, loss terms and
//! routing statistics out, all still on the device.

use crate::config::{BalanceScope, RunConfig};
use crate::data::stream::Batch;
use crate::dist::{dp, Collective, ExpertParallel};
use crate::model::LanguageModel;
use crate::moe::{losses, MoeAux, Phase, RoutingStats};
use crate::train::optim::{clip_scale, grad_sq_norm, AdamW};
use crate::train::reading::reduce_reading;
pub use crate::train::reading::{read_step, LossTerms, StepReading};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::prelude::*;

/// A batch on the device.
pub struct BatchTensors {
    /// `[B, T]`
    pub inputs: Tensor<2, Int>,
    /// `[B, T]`
    pub targets: Tensor<2, Int>,
    /// `[B, T]`, 1.0 where the target counts.
    pub mask: Tensor<2>,
}

impl BatchTensors {
    /// Upload a host batch.
    pub fn new(batch: &Batch, device: &Device) -> Self {
        let (b, t) = (batch.rows, batch.seq_len);
        let ids: Vec<i64> = batch.tokens.iter().map(|&x| x as i64).collect();
        let all = Tensor::<2, Int>::from_data(TensorData::new(ids, [b, t + 1]), device);
        Self {
            inputs: all.clone().slice([0..b, 0..t]),
            targets: all.slice([0..b, 1..t + 1]),
            mask: Tensor::from_data(TensorData::new(batch.mask.clone(), [b, t]), device),
        }
    }
}

/// The assignments per expert and the real tokens of the micro-batches of
/// one optimizer step so far, per MoE layer, still on the device: under
/// `moe.balance_scope = "global_batch"` the Switch loss of each micro-batch
/// takes its `f_e` from them (see [`crate::moe::losses::balance_loss`]).
/// With a collective, each micro-batch's counts are first summed over the
/// ranks, so `f_e` is that of the global batch.
#[derive(Default)]
pub struct BalanceCounts<'c> {
    /// Per MoE layer: (assignments per expert `[E]`, real tokens `[1]`).
    layers: Vec<(Tensor<1>, Tensor<1>)>,
    /// The ranks whose counts join this rank's.
    comm: Option<&'c mut dyn Collective>,
}

impl<'c> BalanceCounts<'c> {
    /// Counts summed over the ranks of `comm`.
    pub fn across(comm: &'c mut dyn Collective) -> Self {
        Self {
            layers: Vec::new(),
            comm: Some(comm),
        }
    }

    /// This micro-batch's counts of every layer, summed over the ranks.
    fn this_batch(&mut self, moe: &[MoeAux]) -> Vec<(Tensor<1>, Tensor<1>)> {
        let local = moe
            .iter()
            .map(|a| {
                (
                    a.stats.routed_per_expert.clone().detach(),
                    a.stats.num_tokens.clone().detach(),
                )
            })
            .collect();
        match self.comm.as_deref_mut() {
            Some(comm) => dp::sum_counts(local, comm),
            None => local,
        }
    }

    /// Add layer `l`'s counts of this micro-batch and return its Switch
    /// loss over every micro-batch counted so far.
    fn add(
        &mut self,
        l: usize,
        (mut routed, mut tokens): (Tensor<1>, Tensor<1>),
        aux: &MoeAux,
        top_k: usize,
    ) -> Tensor<1> {
        if let Some((r, n)) = self.layers.get(l) {
            routed = routed + r.clone();
            tokens = tokens + n.clone();
        } else {
            debug_assert_eq!(l, self.layers.len(), "layers are counted in order");
        }
        let loss = losses::balance_loss(
            routed.clone(),
            tokens.clone(),
            aux.losses.mean_probs.clone(),
            top_k,
        );
        if l < self.layers.len() {
            self.layers[l] = (routed, tokens);
        } else {
            self.layers.push((routed, tokens));
        }
        loss
    }
}

/// Forward a batch and combine the losses with the configured coefficients;
/// also returns each MoE layer's auxiliary outputs. Each micro-batch is
/// balanced on its own; [`forward_in_step`] counts across micro-batches.
pub fn forward(
    model: &LanguageModel,
    batch: &BatchTensors,
    cfg: &RunConfig,
    phase: Phase,
) -> (LossTerms, Vec<MoeAux>) {
    forward_in_step(model, batch, cfg, phase, &mut BalanceCounts::default())
}

/// [`forward`] for one micro-batch of an optimizer step: under
/// `moe.balance_scope = "global_batch"` the Switch loss counts the
/// assignments of every micro-batch of the step so far, kept in `counts`.
pub fn forward_in_step(
    model: &LanguageModel,
    batch: &BatchTensors,
    cfg: &RunConfig,
    phase: Phase,
    counts: &mut BalanceCounts<'_>,
) -> (LossTerms, Vec<MoeAux>) {
    let device = batch.mask.device();
    let (lm, moe) = model.forward_loss(
        batch.inputs.clone(),
        batch.targets.clone(),
        batch.mask.clone(),
        phase,
    );
    let zero = || Tensor::<1>::zeros([1], &device);
    let (mut aux, mut seq_aux, mut z) = (zero(), zero(), zero());
    let global = phase == Phase::Train && cfg.moe.balance_scope == BalanceScope::GlobalBatch;
    let mut batch_counts = if global {
        counts.this_batch(&moe)
    } else {
        Vec::new()
    }
    .into_iter();
    for (l, layer) in moe.iter().enumerate() {
        aux = aux
            + match batch_counts.next() {
                Some(c) => counts.add(l, c, layer, cfg.moe.top_k),
                None => layer.losses.load_balancing.clone(),
            };
        seq_aux = seq_aux + layer.losses.seq_load_balancing.clone();
        z = z + layer.losses.z_loss.clone();
    }
    // A term with a zero coefficient is logged but left out of the total,
    // so the backward pass never runs through it.
    let m = &cfg.moe;
    let mut total = lm.clone();
    for (term, coef) in [
        (&aux, m.aux_loss_coef),
        (&seq_aux, m.seq_aux_loss_coef),
        (&z, m.z_loss_coef),
    ] {
        if coef != 0.0 {
            total = total + term.clone().mul_scalar(coef);
        }
    }
    (
        LossTerms {
            total,
            lm,
            aux,
            seq_aux,
            z,
        },
        moe,
    )
}

/// Forward and backward one training micro-batch, its loss scaled by
/// 1 / grad_accum. Returns the gradients, the loss terms and each MoE
/// layer's routing statistics (all on the device).
///
/// `counts` carries the balance counts from the step's earlier micro-batches
/// (a fresh [`BalanceCounts`] for the first).
pub fn backward(
    model: &LanguageModel,
    batch: &BatchTensors,
    cfg: &RunConfig,
    counts: &mut BalanceCounts<'_>,
) -> (GradientsParams, LossTerms, Vec<RoutingStats>) {
    let (loss, moe) = forward_in_step(model, batch, cfg, Phase::Train, counts);
    let grads = loss
        .total
        .clone()
        .div_scalar(cfg.train.grad_accum as f64)
        .backward();
    let grads = GradientsParams::from_grads(grads, model);
    (grads, loss, moe.into_iter().map(|a| a.stats).collect())
}

/// What one optimizer step did.
pub struct StepOutcome {
    /// The step's losses, gradient norm and routing statistics.
    pub reading: StepReading,
    /// Whether the update was applied: false when the loss or the gradient
    /// norm was not finite, in which case the model is unchanged.
    pub applied: bool,
}

/// One optimizer step, the whole of it: for each micro-batch, reseed the
/// device for this step's noise, forward, backward (loss / grad_accum) and
/// accumulate; the global gradient norm; one batched host read; then, if
/// every value is finite, the AdamW update with global-norm clipping and the
/// aux-free bias update. The training loop and the benchmark both call it.
///
/// `step` is the 0-based optimizer step (it seeds each micro-batch's
/// routing noise), `lr` its learning rate. In a run of several processes
/// every rank calls it on its own micro-batches: the gradients are averaged
/// over the ranks before the norm, and the reading holds the global batch's
/// losses and counts, so every rank takes the same decision and update.
/// Under expert parallelism (`ep`) each rank's experts are its slice of
/// every MoE layer; the gradient norm counts every slice once.
#[allow(clippy::too_many_arguments)]
pub fn train_step(
    model: LanguageModel,
    adam: &mut AdamW,
    cfg: &RunConfig,
    step: u64,
    lr: f64,
    micro_batches: &[BatchTensors],
    comm: &mut dyn Collective,
    mut ep: Option<&mut ExpertParallel>,
) -> (LanguageModel, StepOutcome) {
    let Some(first) = micro_batches.first() else {
        unreachable!("a step has at least one micro-batch (train.grad_accum >= 1)")
    };
    let device = first.mask.device();
    let world = comm.world();
    let mut acc = GradientsAccumulator::new();
    let (mut terms, mut stats) = (Vec::new(), Vec::new());
    {
        let mut counts = if world.size > 1 {
            BalanceCounts::across(&mut *comm)
        } else {
            BalanceCounts::default()
        };
        for (micro, batch) in micro_batches.iter().enumerate() {
            // Each rank's micro-batches draw their own noise.
            let index = world.rank * micro_batches.len() + micro;
            device.seed(step_seed(cfg.train.seed, step, index));
            let (grads, loss, micro_stats) = backward(&model, batch, cfg, &mut counts);
            acc.accumulate(&model, grads);
            terms.push(loss);
            stats.push(micro_stats);
        }
    }
    let bucket = (cfg.train.allreduce_bucket_mb * 1e6) as usize;
    let replicas = ep
        .as_deref_mut()
        .map(|e| e.replicas.as_mut() as &mut dyn Collective);
    let mut grads = acc.grads();
    if replicas.is_some() {
        // An expert held by several ranks of the group: sum its copies'
        // gradients, so that the copies stay identical.
        for layer in model.moe_layers() {
            layer.sum_replica_grads(&mut grads);
        }
    }
    let grads = dp::average_grads(&model, grads, comm, replicas, bucket);
    let sq_norm = match ep.filter(|e| e.degree > 1) {
        // The group's ranks hold the experts' slices: sum theirs, so that
        // every rank gets the same norm to the last bit.
        Some(ep) => {
            let [shared, mine] = dp::sq_norms(&model, &grads);
            // A replicated expert counts once, on its first holder.
            let copies: f64 = model.moe_layers().map(|l| l.copies_sq_norm(&grads)).sum();
            let mut experts = [mine - copies];
            ep.link.all_reduce_sum_f64(&mut experts);
            let total = (shared + experts[0]) as f32;
            Tensor::from_data(TensorData::new(vec![total], [1]), &device.clone().inner())
        }
        None => grad_sq_norm(&model, &grads, &device.clone().inner()),
    };
    // The one host read of this step.
    let mut reading = read_step(&model, &terms, &stats, sq_norm.clone());
    if world.size > 1 {
        reduce_reading(&mut reading, comm, &device.clone().inner());
    }
    let applied = reading.total.is_finite() && reading.grad_norm.is_finite();
    let model = if applied {
        let routed = reading.routed_per_expert.clone();
        apply_update(model, adam, cfg, lr, grads, sq_norm, routed)
    } else {
        model
    };
    (model, StepOutcome { reading, applied })
}

/// The RNG seed of micro-batch `micro` of optimizer step `step`, so that a
/// resumed run draws the same routing noise as an uninterrupted one.
pub fn step_seed(seed: u64, step: u64, micro: usize) -> u64 {
    let mut x = crate::data::stream::SplitMix64(
        seed ^ step.wrapping_mul(0x9e37_79b9) ^ (micro as u64) << 48,
    );
    x.next_u64()
}

/// Apply one optimizer step: AdamW with the global-norm clipping factor from
/// `sq_norm`, then the aux-free bias update of each MoE layer from its
/// routed counts (`StepReading::routed_per_expert`).
pub fn apply_update(
    model: LanguageModel,
    adam: &mut AdamW,
    cfg: &RunConfig,
    lr: f64,
    grads: GradientsParams,
    sq_norm: Tensor<1>,
    routed_per_expert: Vec<Tensor<1>>,
) -> LanguageModel {
    let clip = clip_scale(sq_norm, cfg.optim.grad_clip);
    let mut model = adam.step(&cfg.optim, lr, model, grads, clip);
    for (layer, tpe) in model.moe_layers_mut().zip(routed_per_expert) {
        let rate = layer.config().bias_update_rate;
        layer.router.update_expert_bias(tpe, rate);
    }
    model
}
