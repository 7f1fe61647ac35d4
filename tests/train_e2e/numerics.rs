//! Imported logits, refused runs, the fused head's loss, bf16, seeds and loading.

use super::*;

#[test]
fn inspect_on_hf_fixtures_gives_their_logits() {
    for name in ["hf-mixtral-tiny", "hf-qwen2moe-tiny"] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name);
        let device = Device::flex();
        let (model, _) = checkpoint::load_any(&dir, &device).unwrap();
        let expected = hf::read_safetensors(&dir.join("expected.safetensors")).unwrap();
        let ids: Vec<i64> = expected["input_ids"].try_to_vec().unwrap();
        let row: Vec<u32> = ids[..16].iter().map(|&i| i as u32).collect();
        let trace = switchyard::inspect::trace(&model, &row, &device).unwrap();
        let dir = scratch(name);
        let out = dir.join("trace.safetensors");
        trace.save(&out).unwrap();
        let back = hf::read_safetensors(&out).unwrap();
        let got: Vec<f32> = back["logits"].try_to_vec().unwrap();
        let want: Vec<f32> = expected["logits"].try_to_vec().unwrap();
        assert_eq!(back["logits"].shape().to_vec(), vec![16, 256]);
        let diff = got
            .iter()
            .zip(&want[..16 * 256])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(diff < 1e-4, "{name}: inspect logits differ by {diff}");
        for i in 0..2 {
            let rl: Vec<f32> = back[&format!("router_logits.{i}")].try_to_vec().unwrap();
            let want: Vec<f32> = expected[&format!("router_logits.{i}")]
                .try_to_vec()
                .unwrap();
            let d = rl
                .iter()
                .zip(&want[..rl.len()])
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(d < 1e-4, "{name}: router logits {i} differ by {d}");
            assert_eq!(
                back[&format!("topk_experts.{i}")].shape().to_vec(),
                vec![16, 2]
            );
        }
    }
}

#[test]
fn bad_runs_are_refused_with_the_reason() {
    let _g = lock();
    let dir = scratch("bad");
    let cfg = write_config(&dir, TINY);
    let err = |set: &[&str]| run(&options(&dir, &cfg, "b", set)).unwrap_err().to_string();

    let e = err(&["model.vocab_size=100", "train.steps=1"]);
    assert!(e.contains("model.vocab_size") && e.contains("4096"), "{e}");
    let e = err(&["moe.nope=1"]);
    assert!(e.contains("nope") && e.contains("capacity_factor"), "{e}");
    let e = err(&["train.steps=abc"]);
    assert!(e.contains("train.steps"), "{e}");
    let e = err(&["data.val_fraction=1.5"]);
    assert!(e.contains("data.val_fraction"), "{e}");

    let mut opts = options(&dir, &cfg, "b", &["train.steps=1"]);
    opts.device = "tpu".into();
    let e = run(&opts).unwrap_err().to_string();
    assert!(e.contains("tpu") && e.contains("flex"), "{e}");
    let mut opts = options(&dir, &cfg, "never-ran", &[]);
    opts.resume = true;
    let e = run(&opts).unwrap_err().to_string();
    assert!(e.contains("no complete checkpoint"), "{e}");

    // An existing run is not overwritten.
    train(&options(
        &dir,
        &cfg,
        "taken",
        &["train.steps=1", "train.eval_every=0"],
    ));
    let e = run(&options(&dir, &cfg, "taken", &["train.steps=1"]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("--resume"), "{e}");

    // Non-finite losses: stop names the step; skip gives up after max_bad_steps.
    // A learning rate of 1e30 sends the weights to infinity after the first update.
    let blowup = [
        "optim.lr=1e30",
        "optim.min_lr=1e30",
        "optim.warmup_steps=0",
        "train.steps=10",
        "train.eval_every=0",
    ];
    let e = err(&[&blowup[..], &["train.on_nonfinite=stop"]].concat());
    assert!(e.contains("non-finite") && e.contains("at step 2"), "{e}");
    let mut o = options(
        &dir,
        &cfg,
        "skip",
        &[&blowup[..], &["train.max_bad_steps=3"]].concat(),
    );
    o.name = Some("skip".into());
    let e = run(&o).unwrap_err().to_string();
    assert!(e.contains("3 consecutive"), "{e}");
}

/// Deterministic `[b, s]` input tokens and their next-token targets.
fn token_batch(b: usize, s: usize, device: &Device) -> (Tensor<2, Int>, Tensor<2, Int>) {
    let ids: Vec<i64> = (0..b * (s + 1))
        .map(|i| ((i * 7919 + 5) % 4000) as i64)
        .collect();
    let all = Tensor::<2, Int>::from_data(TensorData::new(ids, [b, s + 1]), device);
    (all.clone().slice([0..b, 0..s]), all.slice([0..b, 1..s + 1]))
}

/// The training-phase loss of `model` on two deterministic rows, the device
/// reseeded first so that router noise, jitter and expert dropout draw the
/// same numbers each call.
fn seeded_train_loss(model: &LanguageModel, device: &Device) -> Tensor<1> {
    let (b, s) = (2, model.config().seq_len);
    let (inputs, targets) = token_batch(b, s, device);
    let mask = Tensor::<2>::ones([b, s], device);
    device.seed(5);
    model.forward_loss(inputs, targets, mask, Phase::Train).0
}

/// The training loss (LM head and cross-entropy fused on the CPU, never
/// holding the logits) equals the logits of `forward` put through
/// `cross_entropy`, in value and in the gradients of the head, the
/// embedding and a block weight, with an untied and a tied head and a mask
/// that drops positions.
#[test]
fn fused_head_loss_matches_logits_then_cross_entropy() {
    use switchyard::model::cross_entropy;
    let _g = lock();
    let device = Device::flex().autodiff();
    for tied in [false, true] {
        device.seed(11);
        let tie = format!("model.tie_embeddings={tied}");
        let cfg = RunConfig::from_toml_str(TINY, &[tie]).unwrap();
        let model = LanguageModel::new(&cfg.model, &cfg.moe, 11, &device);
        assert_eq!(model.lm_head.is_none(), tied);
        let (b, s) = (2, cfg.model.seq_len);
        let (inputs, targets) = token_batch(b, s, &device);
        let mask: Vec<f32> = (0..b * s)
            .map(|i| if i % 7 == 3 { 0.0 } else { 1.0 })
            .collect();
        let mask = Tensor::<2>::from_data(TensorData::new(mask, [b, s]), &device);

        // Evaluation routing: no router noise or expert dropout, so both
        // passes route alike.
        let (fused, _) =
            model.forward_loss(inputs.clone(), targets.clone(), mask.clone(), Phase::Eval);
        let logits = model
            .forward(inputs, Some(mask.clone()), Phase::Eval)
            .logits;
        let want = cross_entropy(logits, targets, mask);
        let (a, w) = (
            fused.clone().into_scalar::<f32>(),
            want.clone().into_scalar::<f32>(),
        );
        assert!((a - w).abs() < 1e-5 * w, "tied {tied}: loss {a} vs {w}");

        let (g1, g2) = (fused.backward(), want.backward());
        let mut weights = vec![
            ("embedding", model.embed_tokens.weight.clone()),
            ("q_proj", model.layers[0].self_attn.q_proj.weight.clone()),
        ];
        if let Some(head) = &model.lm_head {
            weights.push(("lm_head", head.weight.clone()));
        }
        for (name, p) in weights {
            let (a, b) = (p.grad(&g1).unwrap(), p.grad(&g2).unwrap());
            let scale = b.clone().abs().max().into_scalar::<f32>();
            let d = (a - b).abs().max().into_scalar::<f32>() / scale;
            assert!(
                d < 1e-4,
                "tied {tied}: gradient of {name} differs by {d} of {scale}"
            );
        }
    }
}

/// Mixed precision: the same weights computing in bf16 give nearly the f32
/// loss and gradients; the router and the logits stay f32, the gradients
/// reach the f32 parameters in f32; and a bf16 run trains.
#[test]
fn bf16_mixed_precision_tracks_f32_and_trains() {
    use switchyard::config::Precision;
    use switchyard::model::cross_entropy;
    let _g = lock();
    let device = Device::flex().autodiff();
    device.seed(5);
    let cfg = RunConfig::from_toml_str(TINY, &[]).unwrap();
    let f32_model = LanguageModel::new(&cfg.model, &cfg.moe, 5, &device);
    let bf16_model = f32_model.clone().with_precision(Precision::Bf16);
    assert_eq!(bf16_model.compute_dtype(), burn::tensor::DType::BF16);
    let (b, s) = (2, cfg.model.seq_len);
    let ids: Vec<i64> = (0..b * (s + 1))
        .map(|i| ((i * 7919) % 4000) as i64)
        .collect();
    let all = Tensor::<2, Int>::from_data(TensorData::new(ids, [b, s + 1]), &device);
    let (inputs, targets) = (all.clone().slice([0..b, 0..s]), all.slice([0..b, 1..s + 1]));
    let mask = Tensor::<2>::ones([b, s], &device);

    let run = |m: &LanguageModel| {
        let out = m.forward(inputs.clone(), None, Phase::Eval);
        assert_eq!(out.logits.dtype(), burn::tensor::DType::F32);
        for aux in &out.moe {
            assert_eq!(aux.router_logits.dtype(), burn::tensor::DType::F32);
        }
        let loss = cross_entropy(out.logits, targets.clone(), mask.clone());
        let value = loss.clone().into_scalar::<f32>();
        let grads = loss.backward();
        let g = m.layers[0].self_attn.q_proj.weight.grad(&grads).unwrap();
        assert_eq!(g.dtype(), burn::tensor::DType::F32);
        (value, g.into_data().try_to_vec::<f32>().unwrap())
    };
    let (l32, g32) = run(&f32_model);
    let (l16, g16) = run(&bf16_model);
    assert!(
        (l16 - l32).abs() < 0.02 * l32,
        "bf16 loss {l16} vs f32 {l32}"
    );
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let diff: Vec<f32> = g16.iter().zip(&g32).map(|(a, b)| a - b).collect();
    let rel = norm(&diff) / norm(&g32);
    assert!(
        rel < 0.1,
        "bf16 gradient differs from f32 by {rel} (relative norm)"
    );

    let dir = scratch("bf16");
    let cfgp = write_config(&dir, TINY);
    let out = train(&options(
        &dir,
        &cfgp,
        "r",
        &["train.steps=20", "train.precision=bf16"],
    ));
    let first: f64 = out.losses[..4].iter().sum::<f64>() / 4.0;
    let last: f64 = out.losses[16..].iter().sum::<f64>() / 4.0;
    assert!(
        last < first - 0.5,
        "bf16 loss did not fall: {first} -> {last}"
    );
}

/// A seed fixes the initial weights whatever else draws from the random
/// stream afterwards, and, reseeded, a training-phase forward (router noise,
/// input jitter, expert dropout) repeats exactly, the model's first forward
/// included.
#[test]
fn seed_fixes_weights_and_training_noise() {
    let _g = lock();
    let device = Device::flex().autodiff();
    let cfg = RunConfig::from_toml_str(TINY, &[]).unwrap();
    assert!(cfg.moe.logit_noise_std > 0.0 && cfg.moe.expert_dropout > 0.0);
    let train_loss = |model: &LanguageModel| seeded_train_loss(model, &device).into_scalar::<f32>();

    device.seed(3);
    let first = LanguageModel::new(&cfg.model, &cfg.moe, 3, &device);
    let losses = [train_loss(&first), train_loss(&first), train_loss(&first)];
    assert_eq!(losses[0], losses[1], "first forward draws differently");
    assert_eq!(losses[1], losses[2]);

    // The same seed, whatever the device's random stream holds and with
    // another draw in between, gives the same weights as the model above
    // had before its forwards.
    device.seed(99);
    let second = LanguageModel::new(&cfg.model, &cfg.moe, 3, &device);
    let _ = Tensor::<2>::random([64, 64], burn::tensor::Distribution::Default, &device);
    let (w1, w2) = (
        switchyard::params::collect(&first),
        switchyard::params::collect(&second),
    );
    assert!(w1.len() > 10);
    for (name, w) in &w1 {
        assert_eq!(w, &w2[name], "{name} differs between same-seed models");
    }
    // And it is not the same under another seed.
    device.seed(4);
    let other = switchyard::params::collect(&LanguageModel::new(&cfg.model, &cfg.moe, 4, &device));
    assert_ne!(w1["embed_tokens.weight"], other["embed_tokens.weight"]);
    assert_eq!(train_loss(&second), losses[0]);
}

/// A model built for loading takes its weights from the load alone: it holds
/// exactly the loaded values, trains (every parameter gets a gradient) the
/// same as the model the values came from, and draws nothing from the random
/// stream, which a model built with `new` would.
#[test]
fn a_model_built_for_loading_draws_nothing_and_loads_exactly() {
    let _g = lock();
    let device = Device::flex().autodiff();
    let cfg = RunConfig::from_toml_str(TINY, &[]).unwrap();
    let draw = || {
        Tensor::<1>::random([16], burn::tensor::Distribution::Default, &device)
            .into_data()
            .try_into_vec::<f32>()
            .unwrap()
    };
    device.seed(11);
    let source = LanguageModel::new(&cfg.model, &cfg.moe, 11, &device);
    let values = switchyard::params::collect(&source);

    device.seed(12);
    let fresh_draw = draw();
    device.seed(12);
    let loaded = switchyard::params::load(
        LanguageModel::unloaded(&cfg.model, &cfg.moe, &device),
        &values,
    )
    .unwrap();
    assert_eq!(
        draw(),
        fresh_draw,
        "building and loading drew random numbers"
    );
    device.seed(12);
    let _ = LanguageModel::new(&cfg.model, &cfg.moe, 12, &device);
    assert_ne!(draw(), fresh_draw, "`new` should have drawn the weights");

    let got = switchyard::params::collect(&loaded);
    assert_eq!(got.len(), values.len());
    for (name, w) in &values {
        assert_eq!(w, &got[name], "{name} not loaded exactly");
    }
    let loss_and_grads = |model: &LanguageModel| {
        let loss = seeded_train_loss(model, &device);
        let value = loss.clone().into_scalar::<f32>();
        let grads = burn::optim::GradientsParams::from_grads(loss.backward(), model);
        (value, grads.len())
    };
    let (want, n_grads) = loss_and_grads(&source);
    assert_eq!(loss_and_grads(&loaded), (want, n_grads));
    // Everything trains but the aux-loss-free selection biases.
    let trained = values
        .keys()
        .filter(|k| !k.ends_with("expert_bias"))
        .count();
    assert_eq!(n_grads, trained, "a loaded parameter does not train");
}
