//! Dead-expert revival (`moe.revive_dead_experts`): an expert that the
//! router has starved is given new weights, either a noisy copy of the
//! layer's busiest expert or fresh draws, and the busiest expert's router
//! column is split in two: w + δ for the revived expert, w − δ for the
//! busiest, so that the two share the tokens the busiest one had.
//!
//! δ is random but orthogonal to the mean router input μ of the last step.
//! Were it not, δ·x would be dominated by δ·μ, the same sign for nearly
//! every token, and the revived expert would take all of the busiest
//! expert's tokens or none of them; orthogonal to μ, the split follows
//! how the tokens differ from each other.

use super::shard::ExpertShard;
use super::MoeLayer;
use crate::config::ReviveFrom;
use burn::module::Param;
use burn::prelude::*;
use burn::tensor::Distribution;

/// `x + ε · rms(x) · N(0, 1)`: a copy of `x` with noise of relative size `rel`.
fn perturbed<const D: usize>(x: Tensor<D>, rel: f64) -> Tensor<D> {
    if rel == 0.0 {
        return x;
    }
    let rms = x.clone().square().mean().sqrt().mul_scalar(rel); // [1]
    let noise = x.random_like(Distribution::Normal(0.0, 1.0));
    let dims = [1; D];
    x + noise * rms.reshape(dims)
}

/// Map a parameter's inner value, keeping whether it requires a gradient.
fn rewrite<const D: usize>(
    param: Param<Tensor<D>>,
    f: impl FnOnce(Tensor<D>) -> Tensor<D>,
) -> Param<Tensor<D>> {
    param.map(|p| {
        let require_grad = p.is_require_grad();
        let x = Tensor::<D>::from_inner(f(p.inner()));
        if require_grad {
            x.require_grad()
        } else {
            x
        }
    })
}

/// Expert `e` of a stacked `[E, a, b]` weight, rewritten from expert
/// `donor`. Under expert parallelism (`shard`) the stack holds this rank's
/// experts only: the donor's weights come from the rank that holds it, the
/// noise is drawn on every rank (so that the random stream stays the same
/// everywhere), and the new weights are written where `e` is held.
fn expert_slice(
    param: Param<Tensor<3>>,
    (e, donor): (usize, usize),
    shard: Option<&ExpertShard>,
    from: ReviveFrom,
    rel: f64,
    init_std: f64,
) -> Param<Tensor<3>> {
    rewrite(param, |w| {
        let [_, a, b] = w.dims();
        let new = match from {
            ReviveFrom::Busiest => perturbed(expert_weights(&w, donor, shard), rel),
            ReviveFrom::Init => {
                Tensor::random([1, a, b], Distribution::Normal(0.0, init_std), &w.device())
            }
        };
        let at = match shard {
            Some(s) => s.local(e),
            None => Some(e),
        };
        match at {
            Some(i) => w.slice_assign([i..i + 1, 0..a, 0..b], new),
            None => w,
        }
    })
}

/// Expert `x`'s slice `[1, a, b]` of a stack: read here, or, under expert
/// parallelism, sent by the first rank of the group that holds it (every
/// rank of the group calls this).
fn expert_weights(w: &Tensor<3>, x: usize, shard: Option<&ExpertShard>) -> Tensor<3> {
    let [_, a, b] = w.dims();
    let Some(s) = shard else {
        return w.clone().slice([x..x + 1, 0..a, 0..b]);
    };
    let owner = s.first_holder(x);
    let mine = match s.local(x).filter(|_| owner == s.slot) {
        Some(i) => w
            .clone()
            .slice([i..i + 1, 0..a, 0..b])
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .unwrap_or_default(),
        None => Vec::new(),
    };
    let values = s.link.all_gather_f32(&mine).swap_remove(owner);
    Tensor::<3>::from_data(TensorData::new(values, [1, a, b]), &w.device()).cast(w.dtype())
}

/// δ for splitting a router column `w` (`[d, 1]`): Gaussian, with the
/// component along `center` removed, scaled to `rel · rms(w) · √d` in norm
/// (the size of the noise [`perturbed`] adds).
fn split_direction(w: Tensor<2>, center: Option<Tensor<1>>, rel: f64) -> Tensor<2> {
    let [d, _] = w.dims();
    let device = w.device();
    let mut n = Tensor::<2>::random([d, 1], Distribution::Normal(0.0, 1.0), &device);
    if let Some(mu) = center {
        let mu = mu.to_device(&device).reshape([d, 1]);
        let norm2 = mu.clone().square().sum().clamp_min(1e-30); // [1]
        let along = (n.clone() * mu.clone()).sum() / norm2; // [1]
        n = n - mu * along.reshape([1, 1]);
    }
    let target = w.square().mean().sqrt().mul_scalar(rel * (d as f64).sqrt()); // [1]
    let norm = n.clone().square().sum().sqrt().clamp_min(1e-30);
    n * (target / norm).reshape([1, 1])
}

impl MoeLayer {
    /// Give expert `e` new weights (`from` the busiest expert `donor` or
    /// fresh draws of standard deviation `init_std`), its router column
    /// the donor's plus noise, and its selection bias, if any, the donor's.
    /// Noise is drawn from the device's random stream, relative size
    /// `moe.revive_noise`; `center` is the mean router input μ (`[d_model]`)
    /// the router split is made orthogonal to.
    pub fn revive_expert(
        &mut self,
        e: usize,
        donor: usize,
        from: ReviveFrom,
        init_std: f64,
        center: Option<Tensor<1>>,
    ) {
        let rel = self.cfg.revive_noise;
        let (ex, shard) = (&mut self.experts, self.shard.as_ref());
        let pair = (e, donor);
        ex.gate_proj = expert_slice(ex.gate_proj.clone(), pair, shard, from, rel, init_std);
        ex.up_proj = expert_slice(ex.up_proj.clone(), pair, shard, from, rel, init_std);
        ex.down_proj = expert_slice(ex.down_proj.clone(), pair, shard, from, rel, init_std);
        self.router.weight = rewrite(self.router.weight.clone(), |w| {
            let [d, _] = w.dims();
            let column = w.clone().slice([0..d, donor..donor + 1]); // [d, 1]
            let delta = split_direction(column.clone(), center, rel);
            w.slice_assign([0..d, e..e + 1], column.clone() + delta.clone())
                .slice_assign([0..d, donor..donor + 1], column - delta)
        });
        if let Some(bias) = self.router.expert_bias.take() {
            self.router.expert_bias = Some(rewrite(bias, |b| {
                let v = b.clone().slice([donor..donor + 1]);
                b.slice_assign([e..e + 1], v)
            }));
        }
    }
}
