//! Starting from another run's weights, resuming bit-identically, and checkpoints damaged or cut short.

use super::*;

#[test]
fn init_from_starts_at_the_source_weights() {
    let _g = lock();
    let dir = scratch("init");
    let cfg = write_config(&dir, TINY);
    let src = train(&options(
        &dir,
        &cfg,
        "src",
        &["train.steps=25", "train.eval_every=0"],
    ));
    let source_loss = src.losses[20..].iter().sum::<f64>() / 5.0;
    let init = format!("train.init_from=\"{}\"", src.run_dir.display());
    let out = train(&options(
        &dir,
        &cfg,
        "continued",
        &["train.steps=2", "train.eval_every=0", &init],
    ));
    // A fresh model starts near ln(4096) = 8.3; the continued one where the source ended.
    assert!(
        out.losses[0] < source_loss + 0.5,
        "{} vs source {source_loss}",
        out.losses[0]
    );
    assert!(out.losses[0] < 7.5, "{}", out.losses[0]);
}

#[test]
fn resume_is_bit_identical() {
    let _g = lock();
    let dir = scratch("resume");
    let cfg = write_config(&dir, TINY);
    let set = [
        "train.steps=12",
        "train.eval_every=0",
        "train.checkpoint_every=0",
    ];
    let straight = train(&options(&dir, &cfg, "straight", &set));

    let mut first = options(&dir, &cfg, "split", &set);
    first.stop_after = Some(6);
    let a = train(&first);
    assert_eq!(a.final_step, 6);
    let mut second = options(&dir, &cfg, "split", &set);
    second.resume = true;
    let b = train(&second);
    assert_eq!(b.final_step, 12);
    let joined: Vec<f64> = a.losses.iter().chain(&b.losses).copied().collect();
    assert_eq!(joined, straight.losses, "resumed run diverged");

    // The JSONL of the resumed run holds each step once.
    let steps: Vec<u64> = std::fs::read_to_string(b.run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()?
                .get("loss/total")
                .and(Some(l.to_string()))
        })
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(&l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, (1..=12).collect::<Vec<_>>());

    // Changing an architecture key is refused, naming the key.
    let mut changed = options(&dir, &cfg, "split", &["train.steps=14", "model.d_model=48"]);
    changed.resume = true;
    let err = run(&changed).unwrap_err().to_string();
    assert!(err.contains("model.d_model: 32 -> 48"), "{err}");
}

/// A checkpoint damaged on disk after it was written (a flipped byte, a
/// truncated file) is caught by its checksum; `--resume` falls back to the
/// newest intact checkpoint and continues exactly as an undamaged run.
#[test]
fn resume_skips_a_damaged_checkpoint_for_the_newest_intact_one() {
    let _g = lock();
    let dir = scratch("damaged");
    let cfg = write_config(&dir, TINY);
    let set = [
        "train.steps=8",
        "train.eval_every=0",
        "train.checkpoint_every=2",
        "train.keep_checkpoints=5",
    ];
    let straight = train(&options(&dir, &cfg, "straight", &set));
    let mut first = options(&dir, &cfg, "r", &set);
    first.stop_after = Some(6);
    let a = train(&first);
    let ckpts = checkpoint::list(&a.run_dir).unwrap();
    assert_eq!(ckpts.iter().map(|c| c.0).collect::<Vec<_>>(), [2, 4, 6]);
    for (_, c) in &ckpts {
        checkpoint::verify(c).unwrap();
    }

    // Step 6: one byte of the weights flipped; step 4: the optimizer state cut short.
    let model6 = ckpts[2].1.join("model.safetensors");
    let mut bytes = std::fs::read(&model6).unwrap();
    let at = bytes.len() - 10;
    bytes[at] ^= 0x40;
    std::fs::write(&model6, &bytes).unwrap();
    let opt4 = ckpts[1].1.join("optimizer.safetensors");
    let bytes = std::fs::read(&opt4).unwrap();
    std::fs::write(&opt4, &bytes[..bytes.len() - 100]).unwrap();
    let e = checkpoint::verify(&ckpts[2].1).unwrap_err().to_string();
    assert!(
        e.contains("model.safetensors") && e.contains("checksum"),
        "{e}"
    );
    let e = checkpoint::verify(&ckpts[1].1).unwrap_err().to_string();
    assert!(
        e.contains("optimizer.safetensors") && e.contains("bytes"),
        "{e}"
    );

    // The resume starts from step 2 and ends where the straight run ended.
    let (found, warnings) = checkpoint::newest_intact(&a.run_dir).unwrap().unwrap();
    assert_eq!(found, ckpts[0].1);
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(warnings[0].contains("step-0000006"), "{warnings:?}");
    let mut again = options(&dir, &cfg, "r", &set);
    again.resume = true;
    let b = train(&again);
    assert_eq!((b.losses.len(), b.final_step), (6, 8));
    assert_eq!(b.losses[..], straight.losses[2..], "resumed run diverged");

    // With every checkpoint damaged, the resume is refused, naming each.
    let model2 = ckpts[0].1.join("model.safetensors");
    for (_, c) in checkpoint::list(&a.run_dir).unwrap() {
        let f = c.join("model.safetensors");
        let bytes = std::fs::read(&f).unwrap();
        std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    }
    let mut doomed = options(&dir, &cfg, "r", &["train.steps=10", "train.eval_every=0"]);
    doomed.resume = true;
    let e = format!("{:#}", run(&doomed).unwrap_err());
    assert!(e.contains("every checkpoint is damaged"), "{e}");
    assert!(model2.exists());
}

#[test]
fn interrupted_checkpoint_write_leaves_the_previous_one() {
    let _g = lock();
    let dir = scratch("crash");
    let cfg = write_config(&dir, TINY);
    let set = ["train.steps=6", "train.eval_every=0"];
    let mut first = options(&dir, &cfg, "c", &set);
    first.stop_after = Some(4);
    let out = train(&first);
    let ckpt = checkpoint::list(&out.run_dir).unwrap().pop().unwrap().1;
    let (cfg_saved, model) = checkpoint::load_model(&ckpt, &Device::flex()).unwrap();
    let (state, optimizer) = checkpoint::read_state(&ckpt).unwrap();

    // A write of step 5 dies after two of its files.
    let mut state5 = state.clone();
    state5.step = 5;
    let crash = checkpoint::save(
        &out.run_dir,
        &checkpoint::Checkpoint {
            model: switchyard::params::collect(&model),
            optimizer,
            state: state5,
            config: cfg_saved,
            tokenizer: None,
        },
        &checkpoint::SaveOptions {
            keep: 3,
            fail_after_files: Some(2),
        },
    );
    assert!(crash.is_err());
    let leftovers: Vec<_> = std::fs::read_dir(out.run_dir.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        leftovers.iter().any(|n| n.starts_with(".tmp-step-0000005")),
        "{leftovers:?}"
    );

    // The last complete checkpoint is still the one found and it loads.
    assert_eq!(
        checkpoint::locate(&out.run_dir).unwrap(),
        checkpoint::Location::Switchyard(ckpt.clone())
    );
    checkpoint::load_model(&ckpt, &Device::flex()).unwrap();

    // Resuming continues from step 4 and clears the debris.
    let mut again = options(&dir, &cfg, "c", &set);
    again.resume = true;
    let resumed = train(&again);
    assert_eq!((resumed.losses.len(), resumed.final_step), (2, 6));
    let names: BTreeSet<String> = std::fs::read_dir(out.run_dir.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| n.starts_with("step-")), "{names:?}");
}
