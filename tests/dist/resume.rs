//! Ranks stay identical, and a run resumes at the same or another world size.

use super::*;

#[test]
fn ranks_stay_identical_and_a_resume_at_the_same_world_size_is_bit_identical() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("dist", "resume");
    let cfg = write_config(&dir);
    // Each rank reads its own shard of the documents (the default), with
    // capacity drops: not one process's function, but the ranks must agree.
    let drops = [
        "--set",
        "moe.drop_policy=\"drop\"",
        "--set",
        "train.batch_size=4",
    ];
    let text = train(2, &cfg, &dir, "straight", &drops);
    assert!(text.contains("2 ranks, 8 sequences per step"), "{text}");
    train(
        2,
        &cfg,
        &dir,
        "split",
        &[&drops[..], &["--stop-after", "5"]].concat(),
    );
    train(
        2,
        &cfg,
        &dir,
        "split",
        &[&drops[..], &["--resume"]].concat(),
    );

    let straight = checksums(&dir.join("straight"));
    assert_eq!(straight.iter().map(|c| c.0).collect::<Vec<_>>(), [5, 10]);
    let experts = checksums_of(&dir.join("straight"), "expert_checksums");
    assert_eq!(experts.len(), 2);
    for (step, sums) in straight.iter().chain(&experts) {
        assert_eq!(sums.len(), 2, "step {step}");
        assert_eq!(sums[0], sums[1], "step {step}: the ranks differ");
    }
    // Bit-identical: the same losses after the resume and the same weights.
    let (a, b) = (losses(&dir.join("straight")), losses(&dir.join("split")));
    assert_eq!(a, b);
    assert_eq!(checksums(&dir.join("split")).last(), straight.last());
    // The checkpoint holds both ranks' cursors, each for its own shard.
    let ckpt = newest(&dir.join("straight"));
    let (state, _) = switchyard::checkpoint::read_state(&ckpt).unwrap();
    assert_eq!(state.rank_cursors.len(), 1);
    assert_eq!((state.cursor.shard.index, state.cursor.shard.count), (0, 2));
    assert_eq!(state.rank_cursors[0].shard.index, 1);
    assert_ne!(state.cursor.sources, state.rank_cursors[0].sources);
    // Traffic is logged: at least every gradient, in f32, each step.
    let first = &lines(&dir.join("straight"))[0];
    let bytes = first["comm/allreduce_bytes"].as_f64().unwrap();
    let params = weights(&dir.join("straight"))
        .iter()
        .map(|(_, v)| v.len())
        .sum::<usize>() as f64;
    assert!(
        bytes >= 4.0 * (params - 64.0),
        "{bytes} bytes for {params} parameters"
    );
    assert!(
        bytes < 4.0 * params + 4096.0,
        "{bytes} bytes for {params} parameters"
    );
}

#[test]
fn a_run_resumes_at_another_world_size() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("dist", "reshape");
    let cfg = write_config(&dir);
    let b = ["--set", "train.batch_size=4"];
    // Two ranks, then one process, then two again.
    train(
        2,
        &cfg,
        &dir,
        "r",
        &[&b[..], &["--stop-after", "4"]].concat(),
    );
    let text = train(
        1,
        &cfg,
        &dir,
        "r",
        &[&b[..], &["--resume", "--stop-after", "3"]].concat(),
    );
    assert!(text.contains("steps 5..10"), "{text}");
    let ckpt = newest(&dir.join("r"));
    let (state, _) = switchyard::checkpoint::read_state(&ckpt).unwrap();
    assert_eq!(state.step, 7);
    assert!(state.rank_cursors.is_empty());
    train(2, &cfg, &dir, "r", &[&b[..], &["--resume"]].concat());
    let l = losses(&dir.join("r"));
    assert_eq!(
        l.iter().map(|x| x.0).collect::<Vec<_>>(),
        (1..=10).collect::<Vec<_>>()
    );
    assert!(l.iter().all(|x| x.1.is_finite()));
    let sums = checksums(&dir.join("r"));
    let (_, last) = sums.last().unwrap();
    assert_eq!(last.len(), 2);
    assert_eq!(last[0], last[1]);
}
