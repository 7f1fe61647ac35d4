//! The one device-to-host read of a training step: the losses, the
//! gradient norm and every MoE layer's routing statistics in one batched
//! transaction, and, with several processes, their reduction to the
//! global batch's.

use crate::dist::{dp, Collective};
use crate::metrics::LayerReport;
use crate::model::LanguageModel;
use crate::moe::RoutingStats;
use burn::prelude::*;
use burn::tensor::Transaction;

/// The loss terms of one pass. Each `[1]`.
pub struct LossTerms {
    /// `lm + aux_coef·aux + seq_aux_coef·seq_aux + z_coef·z`.
    pub total: Tensor<1>,
    /// Next-token cross-entropy over masked positions.
    pub lm: Tensor<1>,
    /// Σ over MoE layers of the Switch loss.
    pub aux: Tensor<1>,
    /// Σ over MoE layers of the sequence-level loss.
    pub seq_aux: Tensor<1>,
    /// Σ over MoE layers of the z-loss.
    pub z: Tensor<1>,
}

/// What the host learns about one optimizer step.
pub struct StepReading {
    /// Mean over micro-batches of each loss term.
    pub total: f64,
    pub lm: f64,
    pub aux: f64,
    pub seq_aux: f64,
    pub z: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Per MoE layer: token histograms, router entropy, expert bias.
    pub layers: Vec<LayerReport>,
    /// Per MoE layer, routed assignments per expert, still on the device
    /// (for the aux-free bias update). `[E]` each
    pub routed_per_expert: Vec<Tensor<1>>,
}

/// Tensors queued for one batched device-to-host read; each registration
/// returns the handle its values are read back by.
#[derive(Default)]
struct HostRead {
    tx: Transaction,
    queued: usize,
}

/// Where one queued tensor's values come back.
#[derive(Clone, Copy)]
struct Handle(usize);

impl HostRead {
    fn queue(&mut self, t: Tensor<1>) -> Handle {
        self.tx = std::mem::take(&mut self.tx).register(t);
        self.queued += 1;
        Handle(self.queued - 1)
    }

    /// Run the read: the values of every queued tensor, by handle.
    fn execute(self) -> ReadBack {
        ReadBack(self.tx.execute())
    }
}

struct ReadBack(Vec<TensorData>);

impl ReadBack {
    fn scalar(&self, h: Handle) -> f64 {
        self.0[h.0].iter::<f32>().next().unwrap_or(f32::NAN) as f64
    }
    fn vec(&self, h: Handle) -> Vec<f64> {
        self.0[h.0].iter::<f32>().map(|v| v as f64).collect()
    }
}

/// Read the step's losses, gradient norm and routing statistics back to the
/// host in one transaction: the only device-to-host transfer of a step.
pub fn read_step(
    model: &LanguageModel,
    terms: &[LossTerms],
    stats: &[Vec<RoutingStats>],
    sq_norm: Tensor<1>,
) -> StepReading {
    let mean = |f: fn(&LossTerms) -> Tensor<1>| {
        terms
            .iter()
            .map(|t| f(t).inner())
            .reduce(|a, b| a + b)
            .unwrap()
            .div_scalar(terms.len() as f64)
    };
    let mut read = HostRead::default();
    let total = read.queue(mean(|t| t.total.clone()));
    let lm = read.queue(mean(|t| t.lm.clone()));
    let aux = read.queue(mean(|t| t.aux.clone()));
    let seq_aux = read.queue(mean(|t| t.seq_aux.clone()));
    let z = read.queue(mean(|t| t.z.clone()));
    let sq_norm = read.queue(sq_norm);

    /// One MoE layer's handles.
    struct LayerReads {
        routed: Handle,
        kept: Handle,
        rerouted: Handle,
        entropy: Handle,
        bias: Option<Handle>,
        mean_input: Option<Handle>,
    }
    let n_layers = stats.first().map_or(0, |s| s.len());
    let biases: Vec<Option<Tensor<1>>> = model
        .moe_layers()
        .map(|m| m.router.expert_bias.as_ref().map(|b| b.val().inner()))
        .collect();
    let mut routed_per_expert = Vec::new();
    let mut layer_reads = Vec::new();
    for (l, bias) in biases.into_iter().enumerate().take(n_layers) {
        let sum = |f: fn(&RoutingStats) -> Tensor<1>| {
            stats
                .iter()
                .map(|s| f(&s[l]).inner())
                .reduce(|a, b| a + b)
                .unwrap()
        };
        let routed = sum(|s| s.routed_per_expert.clone());
        routed_per_expert.push(routed.clone());
        layer_reads.push(LayerReads {
            routed: read.queue(routed),
            kept: read.queue(sum(|s| s.kept_per_expert.clone())),
            rerouted: read.queue(sum(|s| s.rerouted.clone())),
            entropy: read.queue(sum(|s| s.router_entropy.clone()).div_scalar(stats.len() as f64)),
            bias: bias.map(|b| read.queue(b)),
            mean_input: stats[0][l].mean_input.is_some().then(|| {
                let inputs = stats.iter().filter_map(|s| s[l].mean_input.clone());
                let total = inputs.map(|t| t.inner()).reduce(|a, b| a + b).unwrap();
                read.queue(total.div_scalar(stats.len() as f64))
            }),
        });
    }
    let data = read.execute();
    StepReading {
        total: data.scalar(total),
        lm: data.scalar(lm),
        aux: data.scalar(aux),
        seq_aux: data.scalar(seq_aux),
        z: data.scalar(z),
        grad_norm: data.scalar(sq_norm).sqrt(),
        layers: layer_reads
            .iter()
            .map(|r| LayerReport {
                routed_per_expert: data.vec(r.routed),
                kept_per_expert: data.vec(r.kept),
                rerouted: data.scalar(r.rerouted),
                router_entropy: data.scalar(r.entropy),
                expert_bias: r.bias.map(|b| data.vec(b)),
                mean_input: r.mean_input.map(|h| data.vec(h)),
                kept_by_rank: None,
            })
            .collect(),
        routed_per_expert,
    }
}

/// Make `reading` that of the global batch: the mean loss terms over the
/// ranks, the summed expert counts (which the aux-free bias update also
/// takes), the mean router entropy and input.
pub(crate) fn reduce_reading(
    reading: &mut StepReading,
    comm: &mut dyn Collective,
    device: &Device,
) {
    let r = reading;
    let mut losses = [r.total, r.lm, r.aux, r.seq_aux, r.z];
    dp::reduce_step_values(&mut losses, &mut r.layers, comm);
    [r.total, r.lm, r.aux, r.seq_aux, r.z] = losses;
    r.routed_per_expert = r
        .layers
        .iter()
        .map(|l| {
            let counts: Vec<f32> = l.routed_per_expert.iter().map(|&c| c as f32).collect();
            let e = counts.len();
            Tensor::from_data(TensorData::new(counts, [e]), device)
        })
        .collect();
}
