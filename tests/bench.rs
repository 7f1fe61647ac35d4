//! `switchyard bench`: the FLOP and parameter counts it reports, and a short
//! run that produces every part of the report.

use std::path::PathBuf;
use switchyard::bench::{active_params, model_flops, run, BenchOptions};
use switchyard::config::RunConfig;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn active_parameters_and_flops_of_the_bench_shapes_match_hand_counts() {
    let moe = RunConfig::load(&root().join("configs/bench-moe.toml"), &[]).unwrap();
    // Per layer: q, o 256·256; k, v 256·128 (4 of 8 heads); router 256·8;
    // two active SwiGLU experts 2 · 3 · 256 · 512. Plus the LM head 256 · 4096.
    let per_layer = 2 * 256 * 256 + 2 * 256 * 128 + 256 * 8 + 2 * 3 * 256 * 512;
    let want = 4 * per_layer + 256 * 4096;
    assert_eq!(want, 4_988_928);
    assert_eq!(active_params(&moe), want);
    // 6 per weight per token, plus 12 · layers · seq · d_model for attention.
    let per_token = 6.0 * want as f64 + 12.0 * (4 * 256 * 256) as f64;
    assert_eq!(model_flops(&moe, want, 2048), per_token * 2048.0);

    // The dense twin has the same active parameters but the router's.
    let dense = RunConfig::load(&root().join("configs/bench-dense.toml"), &[]).unwrap();
    assert_eq!(active_params(&dense), want - 4 * 256 * 8);
}

#[test]
fn a_short_bench_reports_steps_phases_and_memory() {
    let report = run(&BenchOptions {
        config: root().join("configs/tiny.toml"),
        overrides: vec![
            "train.batch_size=2".into(),
            "model.seq_len=32".into(),
            "model.n_layers=2".into(),
        ],
        device: "flex".into(),
        warmup: 1,
        steps: 2,
        profile: true,
        sgemm: true,
    })
    .unwrap();
    assert_eq!(report.tokens_per_step, 64);
    assert_eq!(report.step_seconds.len(), 2);
    assert!(report.median_step_s > 0.0);
    assert!((report.tokens_per_s - 64.0 / report.median_step_s).abs() < 1e-6);
    assert!(report.sgemm_gflops.unwrap() > 0.0);
    assert!(report.peak_rss_mb > 0.0);
    let names: Vec<&str> = report.phases.iter().map(|p| p.name.as_str()).collect();
    for want in [
        "attention",
        "router",
        "dispatch/combine",
        "expert matmuls",
        "LM head + loss",
        "optimizer",
    ] {
        assert!(names.contains(&want), "no phase {want} in {names:?}");
    }
    assert!(report.render().contains("tokens/s"));
}
