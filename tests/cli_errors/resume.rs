//! Refusals around resuming, tokenizer training, the machine's memory and the validation split.

use super::*;

/// A training state edited by hand (or damaged without breaking its JSON,
/// which no checksum covers) is refused on resume with what does not fit:
/// a pending revival of an expert the model does not have, a data cursor
/// naming a source it does not have, optimizer moments of another model.
#[test]
fn a_training_state_that_does_not_fit_is_refused_on_resume() {
    let dir = scratch("state");
    copy_dir(trained_run(), &dir.join("run"));
    let state = dir.join("run/checkpoints/step-0000002/state.json");
    let good: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    let config = dir.join("run/config.toml");
    let (c, r) = (config.to_str().unwrap(), dir.to_str().unwrap());
    let resume = |needle: &str| {
        let args = [
            "train",
            "--config",
            c,
            "--runs-dir",
            r,
            "--name",
            "run",
            "--resume",
        ];
        refused(
            &[&args[..], &["--set", "train.steps=3"]].concat(),
            &[needle],
        )
    };
    for (field, value, needle) in [
        (
            "pending_revivals",
            serde_json::json!([{"layer": 0, "expert": 9, "donor": 0}]),
            "pending revival",
        ),
        (
            "pending_revivals",
            serde_json::json!([{"layer": 0, "expert": 1, "donor": 0, "mean_input": [1.0]}]),
            "width 1",
        ),
        ("cursor", serde_json::json!(9), "active source 9"),
    ] {
        let mut edited = good.clone();
        if field == "cursor" {
            edited["cursor"]["active"] = value;
        } else {
            edited[field] = value;
        }
        std::fs::write(&state, serde_json::to_string(&edited).unwrap()).unwrap();
        let text = resume(needle);
        assert!(!text.contains("step 3/3"), "{text}");
    }
    // AdamW moments of another model, in a checkpoint whose state keeps no
    // checksums (as those written before checksums were kept).
    let mut no_sums = good.clone();
    no_sums["files"] = serde_json::json!({});
    std::fs::write(&state, serde_json::to_string(&no_sums).unwrap()).unwrap();
    let optimizer = dir.join("run/checkpoints/step-0000002/optimizer.safetensors");
    for (name, needle) in [
        ("m.embed_tokens.weight", "holds 3 values"),
        ("v.no.such.weight", "does not have"),
    ] {
        let header = format!(r#"{{"{name}":{{"dtype":"F32","shape":[3],"data_offsets":[0,12]}}}}"#);
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend(header.as_bytes());
        bytes.extend([0u8; 12]);
        std::fs::write(&optimizer, bytes).unwrap();
        resume(needle);
    }
}

/// `tokenizer train` refuses a vocabulary it cannot build (below the byte
/// tokens and the EOS token, or past the ceiling: that one panicked in the
/// trainer's hash table), an empty EOS token, and an input with no text.
#[test]
fn tokenizer_training_refuses_what_it_cannot_build() {
    let dir = scratch("tok");
    let corpus = dir.join("c.txt");
    std::fs::write(&corpus, "the cat sat on the mat.\n\nthe dog sat.\n").unwrap();
    let empty = dir.join("empty.txt");
    std::fs::write(&empty, "\n").unwrap();
    let out = dir.join("tok.json");
    let (c, e, o) = (
        corpus.to_str().unwrap(),
        empty.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    let train = ["tokenizer", "train", "--out", o, "--input"];
    for (extra, needle) in [
        (vec![c, "--vocab-size", "0"], "--vocab-size"),
        (
            vec![c, "--vocab-size", "9223372036854775807"],
            "--vocab-size",
        ),
        (vec![c, "--eos-token", ""], "--eos-token"),
        (vec![e, "--vocab-size", "300"], "no documents"),
    ] {
        refused(&[&train[..], &extra[..]].concat(), &[needle]);
        assert!(!out.exists());
    }
    let (ok, text) = run(&[&train[..], &[c, "--vocab-size", "257"]].concat());
    assert!(ok && out.exists(), "{text}");
}

/// A step larger than the machine's memory is refused with what it needs
/// and the keys to lower, before anything is allocated: an allocation that
/// large would abort the process instead of returning an error.
#[test]
fn a_step_too_large_for_the_machine_is_refused() {
    let dir = scratch("mem");
    let cfg = dir.join("tiny.toml");
    std::fs::write(&cfg, TINY).unwrap();
    let c = cfg.to_str().unwrap();
    let r = dir.join("runs");
    let r = r.to_str().unwrap();
    // 1 layer × 2 rows × 2 heads × (10^6)² × 4 bytes: 14.6 TiB of attention.
    let needles = ["needs at least", "model.seq_len", "train.batch_size"];
    let set = "model.seq_len=1000000";
    let text = refused(
        &["train", "--config", c, "--runs-dir", r, "--set", set],
        &needles,
    );
    assert!(text.contains("14901.2 GiB"), "{text}");
    // Refused before the run directory is made.
    assert!(!dir.join("runs/tiny").exists());
    refused(
        &["bench", "--config", c, "--set", set, "--steps", "1"],
        &needles,
    );
    // The embedding table (and its gradient and moments) counts too: at the
    // vocabulary's ceiling, 2 tables × 2^24 × 1,024 × 16 bytes = 512 GiB.
    let set = "model.vocab_size=16777216";
    refused(
        &[
            "train",
            "--config",
            c,
            "--runs-dir",
            r,
            "--set",
            set,
            "--set",
            "model.d_model=1024",
        ],
        &["needs at least", "model.vocab_size"],
    );
}

/// Evaluations with no validation split are refused before the first
/// step: at 0 by the config check, and when no document falls in a tiny
/// share by a look at the split at start, so no training is lost to it.
#[test]
fn an_empty_validation_split_is_refused_before_training() {
    let dir = scratch("val");
    let cfg = dir.join("tiny.toml");
    std::fs::write(&cfg, TINY).unwrap();
    let c = cfg.to_str().unwrap();
    let runs = dir.join("runs");
    let r = runs.to_str().unwrap();
    let every = "train.eval_every=1";
    refused(
        &[
            "train",
            "--config",
            c,
            "--runs-dir",
            r,
            "--set",
            every,
            "--set",
            "data.val_fraction=0",
        ],
        &["data.val_fraction", "train.eval_every"],
    );
    // The first evaluation would come after step 2, and step 1 would have
    // written a checkpoint (checkpoint_every = 1): none may be there.
    let text = refused(
        &[
            "train",
            "--config",
            c,
            "--runs-dir",
            r,
            "--name",
            "tiny-share",
            "--set",
            "train.eval_every=2",
            "--set",
            "data.val_fraction=1e-12",
        ],
        &["no tokens for the validation split", "data.val_fraction"],
    );
    assert!(!runs.join("tiny-share/checkpoints").exists(), "{text}");
    // Without evaluations a run needs no validation split.
    let (ok, text) = run(&[
        "train",
        "--config",
        c,
        "--runs-dir",
        r,
        "--name",
        "no-eval",
        "--set",
        "train.eval_every=0",
        "--set",
        "data.val_fraction=0",
    ]);
    assert!(ok, "{text}");
}
