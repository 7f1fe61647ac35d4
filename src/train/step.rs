//! One training or evaluation pass over a batch: tensors in, loss terms and
//! routing statistics out, all still on the device.

use crate::config::RunConfig;
use crate::data::stream::Batch;
use crate::model::{cross_entropy, LanguageModel, ModelOutput};
use crate::moe::Phase;
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

/// Forward a batch and combine the losses with the configured coefficients.
pub fn forward(
    model: &LanguageModel,
    batch: &BatchTensors,
    cfg: &RunConfig,
    phase: Phase,
) -> (LossTerms, ModelOutput) {
    let device = batch.mask.device();
    let out = model.forward(batch.inputs.clone(), Some(batch.mask.clone()), phase);
    let lm = cross_entropy(
        out.logits.clone(),
        batch.targets.clone(),
        batch.mask.clone(),
    );
    let zero = || Tensor::<1>::zeros([1], &device);
    let (mut aux, mut seq_aux, mut z) = (zero(), zero(), zero());
    for layer in &out.moe {
        aux = aux + layer.losses.load_balancing.clone();
        seq_aux = seq_aux + layer.losses.seq_load_balancing.clone();
        z = z + layer.losses.z_loss.clone();
    }
    let m = &cfg.moe;
    let total = lm.clone()
        + aux.clone().mul_scalar(m.aux_loss_coef)
        + seq_aux.clone().mul_scalar(m.seq_aux_loss_coef)
        + z.clone().mul_scalar(m.z_loss_coef);
    (
        LossTerms {
            total,
            lm,
            aux,
            seq_aux,
            z,
        },
        out,
    )
}
