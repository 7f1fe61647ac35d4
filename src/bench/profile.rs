//! The per-phase breakdown of `switchyard bench --profile`: each component
//! of the step timed alone, forward and backward, on block 0's modules.

use super::{synthetic_batch, time_median, BenchOptions, PhaseTime};
use crate::config::RunConfig;
use crate::data::stream::SplitMix64;
use crate::model::block::Ffn;
use crate::model::LanguageModel;
use crate::moe::{dispatch, losses, policy, Phase};
use crate::train::optim::{clip_scale, grad_sq_norm, AdamW};
use crate::train::step;
use anyhow::Result;
use burn::prelude::*;
use burn::tensor::Distribution;

/// Time each phase of the step alone, forward and backward, on block 0's
/// modules, and scale by the number of layers that have it.
pub(super) fn profile_phases(
    model: &LanguageModel,
    cfg: &RunConfig,
    adam: &AdamW,
    device: &Device,
    opts: &BenchOptions,
    step_s: f64,
) -> Result<Vec<PhaseTime>> {
    let base = device.clone().inner();
    let (b, s, d) = (cfg.train.batch_size, cfg.model.seq_len, cfg.model.d_model);
    let t = b * s;
    let reps = opts.steps.max(3);
    // Inputs are drawn once, outside the timed windows; each repetition
    // makes a fresh gradient leaf of them.
    let h0 = Tensor::<3>::random([b, s, d], Distribution::Normal(0.0, 1.0), device);
    let hidden = || h0.clone().require_grad();
    let time = |f: &mut dyn FnMut()| time_median(&base, reps, || (), |()| f());
    let mut out = Vec::new();
    let n_layers = model.layers.len();
    let block = &model.layers[0];

    let attn = time(&mut || {
        let y = block.self_attn.forward(hidden(), &model.rope);
        let _ = y.sum().backward();
    })?;
    out.push(("attention", attn * n_layers as f64));

    let n_moe = model.moe_layers().count();
    if let Some(moe) = model.moe_layers().next() {
        let mcfg = moe.config();
        let (e, k) = (mcfg.num_experts, mcfg.top_k);
        let valid = Tensor::<1>::ones([t], device);
        let router = time(&mut || {
            let x = hidden().reshape([t, d]);
            let dec = moe.router.forward(x, moe.config(), Phase::Train);
            let loss = losses::switch_load_balancing_loss(
                dec.probs.clone(),
                dec.routing_map.clone(),
                valid.clone(),
                k,
            ) + losses::router_z_loss(dec.logits.clone(), valid.clone())
                + dec.topk_weights.sum();
            let _ = loss.backward();
        })?;
        out.push(("router", router * n_moe as f64));

        // Dispatch and combine around identity experts, for one fixed decision.
        let decision = moe.router.forward(
            hidden().reshape([t, d]).detach(),
            moe.config(),
            Phase::Train,
        );
        let capacity = mcfg.capacity(t, mcfg.capacity_factor);
        let plan = || policy::plan(&decision, valid.clone(), capacity, policy::overflow(mcfg));
        let weights = decision.topk_weights.clone().detach();
        // In the layer's own layout (grouped rows or capacity buffers).
        let dc = time(&mut || {
            let x = hidden().reshape([t, d]);
            let y = dispatch::Dispatched::new(x, plan(), e).combine(weights.clone());
            let _ = y.sum().backward();
        })?;
        out.push(("dispatch/combine", dc * n_moe as f64));

        let x0 = Tensor::<2>::random([t, d], Distribution::Normal(0.0, 1.0), device);
        let inputs = dispatch::Dispatched::new(x0, plan(), e);
        let experts = time(&mut || {
            let x = inputs.clone().require_grad();
            let _ = x.through(&moe.experts).sum().backward();
        })?;
        out.push(("expert matmuls", experts * n_moe as f64));
        if let Some(shared) = &moe.shared_expert {
            let sh = time(&mut || {
                let _ = shared.forward(hidden()).sum().backward();
            })?;
            out.push(("shared experts", sh * n_moe as f64));
        }
    }
    let dense: Vec<_> = model
        .layers
        .iter()
        .filter_map(|bl| match &bl.mlp {
            Ffn::Dense(m) => Some(m),
            Ffn::Moe(_) => None,
        })
        .collect();
    if let Some(mlp) = dense.first() {
        let ffn = time(&mut || {
            let _ = mlp.forward(hidden()).sum().backward();
        })?;
        out.push(("dense FFN", ffn * dense.len() as f64));
    }

    let mut rng = SplitMix64(7);
    let batch = synthetic_batch(&mut rng, b, s, cfg.model.vocab_size, device);
    let head = time(&mut || {
        let _ = model
            .head_loss(hidden(), batch.targets.clone(), batch.mask.clone())
            .backward();
    })?;
    out.push(("LM head + loss", head));

    // The optimizer on real gradients of one step (computed untimed); the
    // model it returns is dropped, so every repetition updates the same weights.
    let optim = time_median(
        &base,
        reps,
        || step::backward(model, &batch, cfg, &mut Default::default()).0,
        |grads| {
            let sq = grad_sq_norm(model, &grads, &base);
            let clip = clip_scale(sq, cfg.optim.grad_clip);
            let _ = adam
                .clone()
                .step(&cfg.optim, cfg.optim.lr, model.clone(), grads, clip);
        },
    )?;
    out.push(("optimizer", optim));

    let sum: f64 = out.iter().map(|(_, s)| s).sum();
    let mut phases: Vec<PhaseTime> = out
        .into_iter()
        .map(|(n, s)| PhaseTime {
            name: n.to_string(),
            seconds: s,
        })
        .collect();
    phases.push(PhaseTime {
        name: "other (embedding, norms, residuals, stats)".into(),
        seconds: step_s - sum,
    });
    Ok(phases)
}
