//! Sparse upcycling (Komatsuzaki et al. 2022): each chosen dense SwiGLU
//! MLP becomes a routed-expert layer that computes the same function at
//! step 0, so continued training starts from the dense model's loss.
//!
//! The MLP's hidden width F is cut into `granularity` slices of F/G units
//! (granular upcycling, He et al. 2024, "Upcycling Large Language Models
//! into Mixture of Experts"; Megatron-Core's `--moe-upcycling-granularity`).
//! A SwiGLU MLP is a sum over its hidden units, so it is exactly the sum of
//! its slices. The first `shared_experts` slices become one always-on
//! shared expert; the other n = G − S slices are copied E/n times, each
//! copy c made of n routed experts (expert e = c·n + j holds slice S + j).
//!
//! Why the function is unchanged:
//! - The router gives all n experts of a copy the same column, drawn once
//!   per copy, so they score alike and top-(k·n) selects k whole copies.
//! - Renormalised softmax weights give the experts of copy c the weight
//!   p_c / (n · Σ p) each. Scaling every routed `down_proj` by n makes copy
//!   c contribute (p_c / Σ p) · (routed slices of the MLP), and the chosen
//!   copies' weights sum to 1.
//! - The shared slices are added with weight 1.
//!
//! So the upcycled layer equals the MLP for every token, up to rounding,
//! when every assignment is computed (`drop_policy = "dropless"`; capacity
//! drops change it). `noise` perturbs the routed experts, which breaks the
//! copies' symmetry and changes the function.

use crate::config::{DropPolicy, MoeConfig, RouterScore, TopkOrder, UpcycleConfig};
use crate::data::stream::SplitMix64;
use crate::model::LanguageModel;
use anyhow::{bail, Context, Result};
use burn::prelude::*;
use std::collections::BTreeMap;

/// The MoE configuration an upcycled model of `d_ff`-wide MLPs gets.
pub fn moe_config(up: &UpcycleConfig, d_ff: usize, layers: Vec<usize>) -> Result<MoeConfig> {
    up.validate()?;
    let g = up.granularity;
    if !d_ff.is_multiple_of(g) {
        bail!("upcycle.granularity = {g} does not divide the dense MLP's width d_ff = {d_ff}");
    }
    Ok(MoeConfig {
        num_experts: up.experts,
        top_k: up.top_k * up.routed_slices(),
        d_expert: d_ff / g,
        layers: Some(layers),
        score: RouterScore::Softmax,
        topk_order: TopkOrder::SoftmaxThenTopk,
        normalize_topk: true,
        num_shared_experts: up.shared_experts,
        d_shared_expert: Some(d_ff / g),
        shared_expert_gate: false,
        drop_policy: DropPolicy::Dropless,
        ..MoeConfig::default()
    })
}

/// A standard normal draw (Box–Muller).
fn normal(rng: &mut SplitMix64) -> f32 {
    let u = |r: &mut SplitMix64| ((r.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    let (a, b) = (u(rng), u(rng));
    ((-2.0 * a.ln()).sqrt() * (2.0 * std::f64::consts::PI * b).cos()) as f32
}

/// `v` plus Gaussian noise of `rel` times its standard deviation.
fn perturb(v: &mut [f32], rel: f64, rng: &mut SplitMix64) {
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    let std = (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
    let scale = (rel * std) as f32;
    for x in v {
        *x += scale * normal(rng);
    }
}

/// Columns `from..from + w` of a row-major `[rows, cols]` matrix, as `[rows, w]`.
fn columns(v: &[f32], rows: usize, cols: usize, from: usize, w: usize) -> Vec<f32> {
    (0..rows)
        .flat_map(|r| v[r * cols + from..r * cols + from + w].iter().copied())
        .collect()
}

/// Upcycle `dense` (a model without MoE blocks) as `up` says; `seed` draws
/// the router and the noise.
pub fn upcycle(dense: &LanguageModel, up: &UpcycleConfig, seed: u64) -> Result<LanguageModel> {
    let m = dense.config().clone();
    if dense.moe_layers().count() > 0 {
        bail!("upcycle: the source already has MoE blocks; upcycling takes a dense model");
    }
    let layers = up
        .layers
        .clone()
        .unwrap_or_else(|| (0..m.n_layers).collect());
    if layers.is_empty() {
        bail!("upcycle.layers: empty; name at least one block");
    }
    if let Some(&l) = layers.iter().find(|&&l| l >= m.n_layers) {
        bail!(
            "upcycle.layers: block {l} does not exist (the model has {} blocks)",
            m.n_layers
        );
    }
    let moe = moe_config(up, m.d_ff, layers.clone())?;
    moe.validate(&m)?;
    let (d, f, w) = (m.d_model, m.d_ff, moe.d_expert);
    let (n, s) = (up.routed_slices(), up.shared_experts);
    let copies = up.experts / n;
    let router_std = moe.router_init_std.unwrap_or(m.init_std);
    let mut rng = SplitMix64(seed ^ 0x7570_6379_636c_6531);
    let mut params = crate::params::collect(dense);
    let mut take = |name: String| -> Result<Vec<f32>> {
        let t = params
            .remove(&name)
            .with_context(|| format!("upcycle: the source has no parameter `{name}`"))?;
        crate::hf::f32s(&name, &t)
    };
    let mut out: BTreeMap<String, TensorData> = BTreeMap::new();
    for &l in &layers {
        let pre = format!("layers.{l}.mlp");
        let gate = take(format!("{pre}.gate_proj.weight"))?; // [d, F]
        let upw = take(format!("{pre}.up_proj.weight"))?; // [d, F]
        let down = take(format!("{pre}.down_proj.weight"))?; // [F, d]
        let (mut eg, mut eu, mut ed) = (Vec::new(), Vec::new(), Vec::new());
        for e in 0..up.experts {
            let slice = s + e % n;
            let mut g = columns(&gate, d, f, slice * w, w);
            let mut u = columns(&upw, d, f, slice * w, w);
            let mut dn: Vec<f32> = down[slice * w * d..(slice + 1) * w * d]
                .iter()
                .map(|&x| x * n as f32)
                .collect();
            if up.noise > 0.0 {
                for v in [&mut g, &mut u, &mut dn] {
                    perturb(v, up.noise, &mut rng);
                }
            }
            eg.extend(g);
            eu.extend(u);
            ed.extend(dn);
        }
        let e = up.experts;
        out.insert(
            format!("{pre}.experts.gate_proj"),
            TensorData::new(eg, [e, d, w]),
        );
        out.insert(
            format!("{pre}.experts.up_proj"),
            TensorData::new(eu, [e, d, w]),
        );
        out.insert(
            format!("{pre}.experts.down_proj"),
            TensorData::new(ed, [e, w, d]),
        );
        // One column per copy, repeated for its n experts: [d, E].
        let per_copy: Vec<f32> = (0..d * copies)
            .map(|_| normal(&mut rng) * router_std as f32)
            .collect();
        let router: Vec<f32> = (0..d)
            .flat_map(|r| (0..e).map(move |x| (r, x / n)))
            .map(|(r, c)| per_copy[r * copies + c])
            .collect();
        out.insert(
            format!("{pre}.router.weight"),
            TensorData::new(router, [d, e]),
        );
        if s > 0 {
            let sw = s * w;
            let sh = format!("{pre}.shared_expert");
            out.insert(
                format!("{sh}.gate_proj.weight"),
                TensorData::new(columns(&gate, d, f, 0, sw), [d, sw]),
            );
            out.insert(
                format!("{sh}.up_proj.weight"),
                TensorData::new(columns(&upw, d, f, 0, sw), [d, sw]),
            );
            out.insert(
                format!("{sh}.down_proj.weight"),
                TensorData::new(down[..sw * d].to_vec(), [sw, d]),
            );
        }
    }
    params.extend(out);
    let device = dense.embed_tokens.weight.device();
    let model = LanguageModel::unloaded(&m, &moe, &device);
    crate::params::load(model, &params).context("upcycle: building the MoE model")
}

/// One line saying what an upcycled model is.
pub fn describe(model: &LanguageModel) -> String {
    let moe = model.moe_config();
    let shared = match moe.shared_width() {
        0 => String::new(),
        w => format!(", a shared expert of width {w}"),
    };
    format!(
        "upcycled {} block(s) into {} experts of width {} (top-{}{shared})",
        model.moe_layers().count(),
        moe.num_experts,
        moe.d_expert,
        moe.top_k
    )
}

/// `switchyard upcycle`: upcycle the dense model at `from` and write it to
/// `out` as a run directory holding one step-0 checkpoint, which
/// `train.init_from`, `eval`, `inspect`, `generate` and `export` read. A
/// switchyard source's config (data, optimizer, ...) is kept.
pub fn write_run(
    from: &std::path::Path,
    up: &UpcycleConfig,
    seed: u64,
    out: &std::path::Path,
) -> Result<LanguageModel> {
    use crate::checkpoint::{self, Checkpoint, Location, SaveOptions};
    let device = Device::flex();
    let (mut cfg, dense, dir) = match checkpoint::locate(from)? {
        Location::Switchyard(dir) => {
            let (cfg, model) = checkpoint::load_model(&dir, &device)?;
            (cfg, model, dir)
        }
        Location::HuggingFace(dir) => {
            let (_, model) = crate::hf::load(&dir, &device)?;
            (crate::config::RunConfig::default(), model, dir)
        }
    };
    let tok = Some(dir.join("tokenizer.json")).filter(|t| t.exists());
    let model = upcycle(&dense, up, seed)?;
    cfg.model = model.config().clone();
    cfg.moe = model.moe_config().clone();
    cfg.train.seed = seed;
    if let Some(t) = &tok {
        cfg.data.tokenizer = t.to_string_lossy().into_owned();
    }
    if out.join("checkpoints").exists() {
        bail!(
            "--out {}: already holds a run; choose a new directory",
            out.display()
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let ckpt = Checkpoint {
        model: crate::params::collect(&model),
        optimizer: BTreeMap::new(),
        state: checkpoint::TrainState::fresh(&cfg),
        config: cfg.clone(),
        tokenizer: tok,
    };
    checkpoint::save(out, &ckpt, &SaveOptions::default())?;
    std::fs::write(out.join("config.toml"), cfg.to_toml())?;
    Ok(model)
}
