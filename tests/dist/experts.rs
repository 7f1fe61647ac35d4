//! Expert parallelism: against data parallelism, resumed at another degree, revival, the GPU path, refused settings and the planner's byte counts.

use super::*;

#[test]
fn two_ranks_holding_half_the_experts_each_equal_two_data_parallel_ranks() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("dist", "ep");
    let cfg = write_config(&dir);
    for policy in ["dropless", "drop"] {
        let set_policy = format!("moe.drop_policy=\"{policy}\"");
        let base = [
            "--set",
            "train.batch_size=4",
            "--set",
            &set_policy,
            "--set",
            "moe.capacity_factor=1.0",
            "--set",
            "train.eval_every=5",
        ];
        let (dp, ep) = (format!("dp-{policy}"), format!("ep-{policy}"));
        train(2, &cfg, &dir, &dp, &base);
        let ep_args = [&base[..], &["--set", "train.expert_parallel=2"]].concat();
        train(2, &cfg, &dir, &ep, &ep_args);
        let (dp, ep) = (dir.join(dp), dir.join(ep));
        same_losses(&losses(&dp), &losses(&ep));
        // Evaluated by every rank together, to the same loss.
        let (de, ee) = (series(&dp, "eval/loss"), series(&ep, "eval/loss"));
        assert_eq!(de.len(), 2);
        assert_eq!(ee.len(), 2);
        for (a, b) in de.iter().zip(&ee) {
            assert!(rel(*a, *b) < 1e-5, "eval loss {a} vs {b}");
        }
        // The checkpoint holds every expert, gathered in order.
        same_weights(&dp, &ep);
        let drops = series(&ep, "moe/layer0/drop_rate");
        if policy == "drop" {
            assert!(drops.iter().any(|&d| d > 0.05), "{drops:?}");
        } else {
            assert!(drops.iter().all(|&d| d == 0.0), "{drops:?}");
        }
        // Both ranks hold the same shared weights and different experts.
        for (step, sums) in checksums(&ep) {
            assert_eq!(sums[0], sums[1], "step {step}");
        }
        for (step, sums) in checksums_of(&ep, "expert_checksums") {
            assert_ne!(
                sums[0], sums[1],
                "step {step}: the ranks hold the same experts"
            );
        }
        // Rows travel only under expert parallelism.
        assert!(series(&dp, "comm/alltoall_bytes").iter().all(|&b| b == 0.0));
        assert!(series(&ep, "comm/alltoall_bytes").iter().all(|&b| b > 0.0));
    }
}

#[test]
fn an_expert_parallel_run_resumes_at_another_degree() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("dist", "ep-resume");
    let cfg = write_config(&dir);
    let b = ["--set", "train.batch_size=4"];
    let ep = [&b[..], &["--set", "train.expert_parallel=2"]].concat();
    train(2, &cfg, &dir, "straight", &ep);
    train(
        2,
        &cfg,
        &dir,
        "split",
        &[&ep[..], &["--stop-after", "5"]].concat(),
    );
    // Resumed with every expert on every rank: the same function.
    train(2, &cfg, &dir, "split", &[&b[..], &["--resume"]].concat());
    same_losses(&losses(&dir.join("straight")), &losses(&dir.join("split")));
    same_weights(&dir.join("straight"), &dir.join("split"));
}

#[test]
fn dead_experts_revive_across_an_expert_parallel_group_as_under_data_parallelism() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("dist", "ep-revive");
    let cfg = write_config(&dir);
    // No balance loss and a wide router init: experts starve within a few
    // steps, and are revived two steps after they do.
    for from in ["busiest", "init"] {
        let set_from = format!("moe.revive_from=\"{from}\"");
        let base = [
            "--set",
            "train.batch_size=4",
            "--set",
            "moe.aux_loss_coef=0.0",
            "--set",
            "moe.router_init_std=0.5",
            "--set",
            "moe.revive_dead_experts=true",
            "--set",
            &set_from,
            "--set",
            "log.dead_expert_steps=2",
            "--set",
            "optim.lr=1e-2",
        ];
        let (dp, ep) = (format!("dp-{from}"), format!("ep-{from}"));
        train(2, &cfg, &dir, &dp, &base);
        let ep_args = [&base[..], &["--set", "train.expert_parallel=2"]].concat();
        train(2, &cfg, &dir, &ep, &ep_args);
        let (dp, ep) = (dir.join(dp), dir.join(ep));
        let revivals = |run: &Path| -> Vec<(u64, u64, u64, u64)> {
            lines(run)
                .iter()
                .filter(|v| v["event"] == "revival")
                .map(|v| {
                    let n = |k: &str| v[k].as_u64().unwrap();
                    (n("step"), n("layer"), n("expert"), n("donor"))
                })
                .collect()
        };
        let (a, b) = (revivals(&dp), revivals(&ep));
        assert_eq!(a, b);
        // At least one revival copies an expert held by the other rank
        // (experts 0, 1 on rank 0; 2, 3 on rank 1).
        assert!(a.iter().any(|r| (r.2 < 2) != (r.3 < 2)), "{a:?}");
        same_losses(&losses(&dp), &losses(&ep));
        same_weights(&dp, &ep);
    }
}

/// The GPU path (the `wgpu` feature; without a GPU, Mesa's llvmpipe runs
/// it on the CPU): the rows pass through host memory between the ranks'
/// devices, and degree 2 computes what data parallelism on the same
/// devices computes.
#[cfg(feature = "wgpu")]
#[test]
fn expert_parallelism_on_the_gpu_path_equals_data_parallelism_there() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("dist", "ep-gpu");
    let cfg = write_config(&dir);
    let base = [
        "--device",
        "wgpu",
        "--set",
        "train.batch_size=4",
        "--set",
        "train.steps=4",
        "--set",
        "train.checkpoint_every=4",
    ];
    // Each rank keeps CubeCL's cache database (autotune results) in an
    // environment of its own: two ranks writing one database at once can
    // crash CubeCL.
    let env = format!("sy-dist-test-{}", std::process::id());
    let var = format!("CUBECL_ENVIRONMENT={env}");
    train_with(2, &cfg, &dir, "dp", &base, &[&var]);
    let dbs = here("target/environment");
    let made: Vec<bool> = (0..2)
        .map(|rank| dbs.join(format!("{env}-rank{rank}.db")).exists())
        .collect();
    for f in std::fs::read_dir(&dbs).into_iter().flatten().flatten() {
        if f.file_name().to_string_lossy().starts_with(&env) {
            let _ = std::fs::remove_file(f.path());
        }
    }
    assert_eq!(
        made,
        [true, true],
        "one database per rank in {}",
        dbs.display()
    );
    let ep_args = [&base[..], &["--set", "train.expert_parallel=2"]].concat();
    let text = train(2, &cfg, &dir, "ep", &ep_args);
    assert!(text.contains("device wgpu"), "{text}");
    let (dp, ep) = (dir.join("dp"), dir.join("ep"));
    assert_eq!(losses(&dp).len(), 4);
    same_losses(&losses(&dp), &losses(&ep));
    same_weights(&dp, &ep);
    assert!(series(&ep, "comm/alltoall_bytes").iter().all(|&b| b > 0.0));
}

#[test]
fn expert_parallel_settings_that_cannot_work_are_named() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("dist", "ep-bad");
    let cfg = write_config(&dir);
    for (set, needle) in [
        (
            "train.expert_parallel=3",
            "must divide the number of processes",
        ),
        ("moe.num_experts=3", "must divide moe.num_experts"),
    ] {
        let extra = ["--set", "train.expert_parallel=2", "--set", "moe.top_k=1"];
        refused(
            &cfg,
            &dir,
            &[&extra[..], &["--set", set]].concat(),
            &[needle],
        );
    }
}

#[test]
fn the_planner_predicts_the_bytes_an_expert_parallel_run_counts() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("dist", "plan");
    let cfg = write_config(&dir);
    // With evaluations, which every rank takes part in and which the
    // counters leave out.
    let args = [
        "--set",
        "train.batch_size=4",
        "--set",
        "train.expert_parallel=2",
        "--set",
        "train.eval_every=5",
    ];
    let text = train(2, &cfg, &dir, "ep", &args);
    assert!(text.contains("step 10 | eval loss"), "{text}");
    let run = dir.join("ep");
    let out = dir.join("plan.json");
    let plan = plan_experts(&run, &out, &[]);
    // The run placed its experts contiguously; rank 0 logged its bytes.
    let predicted = plan["contiguous"]["devices"][0]["inter_bytes"]
        .as_f64()
        .unwrap();
    let counted = counted_bytes(&run);
    assert!(
        rel(predicted, counted) < 1e-12,
        "predicted {predicted}, counted {counted}"
    );
    // Its layout is the run's: experts 0, 1 on device 0 and 2, 3 on device 1.
    let homes = |strategy: &str| -> Vec<u64> {
        let layer0 = &plan[strategy]["layers"][0];
        (0..4).map(|e| layer0[e][0][0].as_u64().unwrap()).collect()
    };
    assert_eq!(homes("contiguous"), [0, 0, 1, 1]);
    assert_eq!(homes("round-robin"), [0, 1, 0, 1]);

    // Trained with the round-robin placement: the same function, and the
    // bytes it counts are the planner's for that placement.
    let placement = format!("train.expert_placement=\"{}:round-robin\"", out.display());
    train(
        2,
        &cfg,
        &dir,
        "rr",
        &[&args[..], &["--set", &placement]].concat(),
    );
    let rr = dir.join("rr");
    same_losses(&losses(&run), &losses(&rr));
    same_weights(&run, &rr);
    let plan = plan_experts(&rr, &dir.join("plan-rr.json"), &[]);
    let predicted = plan["round-robin"]["devices"][0]["inter_bytes"]
        .as_f64()
        .unwrap();
    let counted = counted_bytes(&rr);
    assert!(
        rel(predicted, counted) < 1e-12,
        "predicted {predicted}, counted {counted}"
    );

    // The balanced placement with the busiest expert on both devices:
    // one rank holds three experts and the other two, and each origin's
    // rows for the busiest one are cut in half between its two copies.
    // Still the same function, with the bytes the planner predicts up to
    // the rounding of each cut (half a row per origin, replicated expert,
    // layer and exchange, each way).
    let replicated = dir.join("plan-replicated.json");
    let plan = plan_experts(&run, &replicated, &["--replicate-hottest"]);
    let layer0 = plan["balanced"]["layers"][0].as_array().unwrap();
    let copies = layer0
        .iter()
        .filter(|h| h.as_array().unwrap().len() == 2)
        .count();
    assert_eq!(copies, 1, "{layer0:?}");
    let placement = format!(
        "train.expert_placement=\"{}:balanced\"",
        replicated.display()
    );
    train(
        2,
        &cfg,
        &dir,
        "rep",
        &[&args[..], &["--set", &placement]].concat(),
    );
    let rep = dir.join("rep");
    same_losses(&losses(&run), &losses(&rep));
    same_weights(&run, &rep);
    let plan = plan_experts(&rep, &dir.join("plan-rep.json"), &["--replicate-hottest"]);
    let predicted = plan["balanced"]["devices"][0]["inter_bytes"]
        .as_f64()
        .unwrap();
    let counted = counted_bytes(&rep);
    let (layers, exchanges, row_bytes) = (2.0, 4.0, 32.0 * 4.0);
    let rounding = layers * exchanges * (0.5 + 0.5) * row_bytes;
    assert!(
        (predicted - counted).abs() <= rounding,
        "predicted {predicted}, counted {counted}"
    );

    // Placements training cannot use are refused by name.
    let bad = dir.join("plan-bad.json");
    let mut broken: Value =
        serde_json::from_str(&std::fs::read_to_string(&replicated).unwrap()).unwrap();
    let hottest = broken["balanced"]["layers"][0]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|h| h.as_array().unwrap().len() == 2)
        .unwrap();
    hottest[0][1] = serde_json::json!(0.7);
    std::fs::write(&bad, broken.to_string()).unwrap();
    for (spec, needle) in [
        (format!("{}:balanced", bad.display()), "shares sum to"),
        ("/no/such/plan.json".to_string(), "/no/such/plan.json"),
    ] {
        let set = format!("train.expert_placement=\"{spec}\"");
        let extra = [&args[..], &["--set", &set]].concat();
        refused(&cfg, &dir, &extra, &["train.expert_placement", needle]);
    }
}
