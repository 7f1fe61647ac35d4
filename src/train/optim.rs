//! AdamW (Loshchilov & Hutter 2019) over named parameters, global-norm
//! gradient clipping, and the warmup-cosine learning-rate schedule.
//!
//! Written here rather than taken from burn-optim for three reasons: weight
//! decay must skip norms, biases and the router bias (burn's AdamW decays
//! every parameter); Burn's `GradientClippingConfig::Norm` clips each tensor
//! separately, not the global norm; and the moment estimates are keyed by
//! parameter path, so a checkpoint stores them in safetensors and a resume
//! restores them bit for bit.

use crate::config::OptimConfig;
use crate::kernels::{adamw_update, sum_squares, AdamWStep};
use crate::params::PathStack;
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use std::collections::BTreeMap;

/// Learning rate at optimizer step `step` (0-based) of `total`: linear
/// warmup from lr/warmup to lr over `warmup_steps`, then cosine decay to
/// `min_lr` at the last step.
pub fn learning_rate(cfg: &OptimConfig, step: u64, total: u64) -> f64 {
    if step < cfg.warmup_steps {
        return cfg.lr * (step + 1) as f64 / cfg.warmup_steps as f64;
    }
    let span = total.saturating_sub(cfg.warmup_steps).max(1) as f64;
    let progress = ((step - cfg.warmup_steps) as f64 / span).min(1.0);
    cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// Sum of squared gradient entries over every parameter, on the device. `[1]`
pub fn grad_sq_norm<M: Module>(module: &M, grads: &GradientsParams, device: &Device) -> Tensor<1> {
    struct V<'a> {
        grads: &'a GradientsParams,
        acc: Tensor<1>,
    }
    impl ModuleVisitor for V<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.get::<D>(param.id) {
                self.acc = self.acc.clone() + sum_squares(g);
            }
        }
    }
    let mut v = V {
        grads,
        acc: Tensor::zeros([1], device),
    };
    module.visit(&mut v);
    v.acc
}

/// AdamW state: step count and first/second moments per parameter path.
#[derive(Debug, Clone, Default)]
pub struct AdamW {
    /// Updates applied so far.
    pub t: u64,
    /// First moments, flattened. Keyed by parameter path.
    pub m: BTreeMap<String, Tensor<1>>,
    /// Second moments, flattened.
    pub v: BTreeMap<String, Tensor<1>>,
}

struct Update<'a> {
    path: PathStack,
    grads: &'a mut GradientsParams,
    state: &'a mut AdamW,
    cfg: &'a OptimConfig,
    lr: f64,
    /// Gradient multiplier from global-norm clipping (1 when not clipped). `[1]`
    scale: Tensor<1>,
}

impl ModuleMapper for Update<'_> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Some(grad) = self.grads.remove::<D>(param.id) else {
            return param;
        };
        let path = self.path.path();
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let t = self.state.t as i32;
        // Norms, biases and the router bias (all rank 1) are not decayed.
        let decay = if D >= 2 { self.cfg.weight_decay } else { 0.0 };
        let lr = self.lr * lr_scale(self.cfg, &path);
        let (eps, scale) = (self.cfg.eps, self.scale.clone());
        let (m_old, v_old) = (self.state.m.remove(&path), self.state.v.remove(&path));
        let mut new_m = None;
        let mut new_v = None;
        let param = param.map(|p| {
            let shape = p.shape();
            let n = shape.num_elements();
            let require_grad = p.is_require_grad();
            let x = p.inner().reshape([n]); // [n]
            let device = x.device();
            let g = grad.reshape([n]);
            let scale = scale.to_device(&device);
            let m = m_old.unwrap_or_else(|| Tensor::zeros([n], &device));
            let v = v_old.unwrap_or_else(|| Tensor::zeros([n], &device));
            let step = AdamWStep {
                lr,
                beta1: b1,
                beta2: b2,
                eps,
                weight_decay: decay,
                bias_correction: (1.0 - b1.powi(t), 1.0 - b2.powi(t)),
            };
            let (x, m, v) = adamw_update(x, g, m, v, scale, &step);
            new_m = Some(m);
            new_v = Some(v);
            let x = Tensor::<D>::from_inner(x.reshape(shape));
            if require_grad {
                x.require_grad()
            } else {
                x
            }
        });
        self.state.m.insert(path.clone(), new_m.unwrap());
        self.state.v.insert(path, new_v.unwrap());
        param
    }
}

/// The learning-rate multiplier of the parameter at `path`: the routers'
/// weights and the FFN weights (`layers.{i}.mlp.*`: dense MLPs, shared and
/// routed experts) have their own.
fn lr_scale(cfg: &OptimConfig, path: &str) -> f64 {
    let mut parts = path.split('.').skip_while(|&p| p != "mlp").skip(1);
    match parts.next() {
        Some("router") => cfg.router_lr_scale,
        Some("experts") => cfg.ffn_lr_scale * cfg.expert_lr_scale,
        Some("gate_proj" | "up_proj" | "down_proj" | "shared_expert") => cfg.ffn_lr_scale,
        _ => 1.0,
    }
}

impl AdamW {
    /// Apply one update with learning rate `lr`, scaling every gradient by
    /// `scale` (the clipping factor, on the device).
    pub fn step<M: Module>(
        &mut self,
        cfg: &OptimConfig,
        lr: f64,
        module: M,
        mut grads: GradientsParams,
        scale: Tensor<1>,
    ) -> M {
        self.t += 1;
        let mut u = Update {
            path: PathStack::default(),
            grads: &mut grads,
            state: self,
            cfg,
            lr,
            scale,
        };
        module.map(&mut u)
    }
}

/// The clipping factor min(1, max_norm / norm) as a device tensor; 1 when
/// clipping is off. `[1]`
pub fn clip_scale(sq_norm: Tensor<1>, max_norm: f64) -> Tensor<1> {
    if max_norm <= 0.0 {
        return sq_norm.ones_like();
    }
    (sq_norm.sqrt().add_scalar(1e-6).recip() * max_norm).clamp_max(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_min() {
        let cfg = OptimConfig {
            lr: 1.0,
            min_lr: 0.1,
            warmup_steps: 10,
            ..OptimConfig::default()
        };
        assert!((learning_rate(&cfg, 0, 110) - 0.1).abs() < 1e-12);
        assert!((learning_rate(&cfg, 9, 110) - 1.0).abs() < 1e-12);
        assert!((learning_rate(&cfg, 10, 110) - 1.0).abs() < 1e-12);
        // Halfway through the decay: (1 + 0.1) / 2.
        assert!((learning_rate(&cfg, 60, 110) - 0.55).abs() < 1e-12);
        assert!((learning_rate(&cfg, 110, 110) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn adamw_matches_hand_computed_first_step() {
        // One scalar-ish parameter per group: w (rank 2, decayed), b (rank 1, not).
        #[derive(Module, Debug)]
        struct Tiny {
            w: Param<Tensor<2>>,
            b: Param<Tensor<1>>,
        }
        let device = Device::flex().autodiff();
        let tiny = Tiny {
            w: Param::from_tensor(Tensor::from_data(
                TensorData::new(vec![2.0f32], [1, 1]),
                &device,
            )),
            b: Param::from_tensor(Tensor::from_data(
                TensorData::new(vec![2.0f32], [1]),
                &device,
            )),
        };
        // loss = 3w + 4b → grads 3 and 4; global norm 5; clip to 1 → 0.6, 0.8.
        let loss = tiny.w.val().sum().mul_scalar(3.0) + tiny.b.val().sum().mul_scalar(4.0);
        let grads = GradientsParams::from_grads(loss.backward(), &tiny);
        let sq = grad_sq_norm(&tiny, &grads, &device.clone().inner());
        assert!((sq.clone().into_scalar::<f32>() - 25.0).abs() < 1e-4);
        let cfg = OptimConfig {
            weight_decay: 0.5,
            eps: 1e-8,
            ..OptimConfig::default()
        };
        let mut opt = AdamW::default();
        let tiny = opt.step(&cfg, 0.1, tiny, grads, clip_scale(sq, 1.0));
        // Step 1: m_hat = g, v_hat = g² → update = lr · sign(g) = 0.1.
        // w: 2 · (1 − 0.1 · 0.5) − 0.1 = 1.8; b: 2 − 0.1 = 1.9 (no decay).
        let w = tiny.w.val().into_data().try_to_vec::<f32>().unwrap()[0];
        let b = tiny.b.val().into_data().try_to_vec::<f32>().unwrap()[0];
        assert!((w - 1.8).abs() < 1e-5, "{w}");
        assert!((b - 1.9).abs() < 1e-5, "{b}");
        // Moments keep the clipped gradient: m = (1 − β1) · 0.6.
        let m = opt.m["w"].clone().into_data().try_to_vec::<f32>().unwrap()[0];
        assert!((m - 0.1 * 0.6).abs() < 1e-6, "{m}");
        assert!(tiny.w.val().is_require_grad());
    }

    #[test]
    fn router_and_ffn_weights_take_their_own_learning_rate() {
        // Each parameter has gradient 1, so Adam's first step moves it by
        // exactly its learning rate.
        #[derive(Module, Debug)]
        struct Router {
            weight: Param<Tensor<2>>,
        }
        #[derive(Module, Debug)]
        struct Experts {
            gate_proj: Param<Tensor<3>>,
        }
        #[derive(Module, Debug)]
        struct Dense {
            down_proj: Param<Tensor<2>>,
        }
        #[derive(Module, Debug)]
        struct Mlp {
            router: Router,
            experts: Experts,
            shared_expert: Dense,
        }
        #[derive(Module, Debug)]
        struct Block {
            mlp: Mlp,
            w: Param<Tensor<2>>,
        }
        #[derive(Module, Debug)]
        struct DenseBlock {
            mlp: Dense,
        }
        #[derive(Module, Debug)]
        struct Model {
            a: Block,
            b: DenseBlock,
        }
        let device = Device::flex().autodiff();
        let one = || Param::from_tensor(Tensor::<2>::ones([1, 1], &device));
        let model = Model {
            a: Block {
                mlp: Mlp {
                    router: Router { weight: one() },
                    experts: Experts {
                        gate_proj: Param::from_tensor(Tensor::<3>::ones([1, 1, 1], &device)),
                    },
                    shared_expert: Dense { down_proj: one() },
                },
                w: one(),
            },
            b: DenseBlock {
                mlp: Dense { down_proj: one() },
            },
        };
        let loss = model.a.mlp.router.weight.val().sum()
            + model.a.mlp.experts.gate_proj.val().sum()
            + model.a.mlp.shared_expert.down_proj.val().sum()
            + model.a.w.val().sum()
            + model.b.mlp.down_proj.val().sum();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let cfg = OptimConfig {
            weight_decay: 0.0,
            router_lr_scale: 0.5,
            ffn_lr_scale: 2.0,
            expert_lr_scale: 1.5,
            ..OptimConfig::default()
        };
        let scale = Tensor::<1>::ones([1], &device.clone().inner());
        let model = AdamW::default().step(&cfg, 0.1, model, grads, scale);
        let first = |t: Tensor<2>| t.into_data().try_to_vec::<f32>().unwrap()[0];
        let moved = [
            ("router", first(model.a.mlp.router.weight.val()), 0.05),
            (
                "routed expert",
                first(model.a.mlp.experts.gate_proj.val().reshape([1, 1])),
                0.3,
            ),
            (
                "shared expert",
                first(model.a.mlp.shared_expert.down_proj.val()),
                0.2,
            ),
            ("dense MLP", first(model.b.mlp.down_proj.val()), 0.2),
            ("other", first(model.a.w.val()), 0.1),
        ];
        for (name, value, step) in moved {
            assert!((value - (1.0 - step)).abs() < 1e-6, "{name}: {value}");
        }
    }
}
