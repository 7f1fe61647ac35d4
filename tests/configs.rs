//! Every shipped config parses and validates, and the documented key names
//! exist.

use switchyard::config::RunConfig;

#[test]
fn every_config_file_loads_and_validates() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        // Sweep files have their own format: they name a base run config.
        if text.lines().any(|l| l.trim_start().starts_with("base =")) {
            let sweep = switchyard::sweep::Sweep::load(&path)
                .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            for p in &sweep.points {
                sweep
                    .point_config(p)
                    .unwrap_or_else(|e| panic!("{}: point {}: {e}", path.display(), p.id));
            }
            seen.push(path.file_name().unwrap().to_string_lossy().into_owned());
            continue;
        }
        let cfg = RunConfig::load(&path, &[]).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // The resolved form round-trips.
        assert_eq!(
            RunConfig::from_toml_str(&cfg.to_toml(), &[]).unwrap(),
            cfg,
            "{}",
            path.display()
        );
        seen.push(path.file_name().unwrap().to_string_lossy().into_owned());
    }
    seen.sort();
    for want in [
        "tiny.toml",
        "small.toml",
        "dense-baseline.toml",
        "continue-domain.toml",
        "mixtral-shaped.toml",
        "qwen2moe-shaped.toml",
        "two-domain.toml",
        "sweep-routing.toml",
    ] {
        assert!(seen.iter().any(|s| s == want), "configs/{want} is missing");
    }
}

#[test]
fn interface_keys_exist_and_are_type_checked() {
    let keys = [
        ("train.steps", "7"),
        ("train.seed", "3"),
        ("train.eval_every", "5"),
        ("train.checkpoint_every", "5"),
        ("train.batch_size", "2"),
        ("model.seq_len", "64"),
        ("moe.num_experts", "4"),
        ("moe.top_k", "1"),
        ("moe.capacity_factor", "1.5"),
        ("moe.eval_capacity_factor", "3.0"),
        ("moe.aux_loss_coef", "0.02"),
        ("moe.z_loss_coef", "0.002"),
        ("moe.expert_dropout", "0.1"),
    ];
    let set: Vec<String> = keys.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let cfg = RunConfig::from_toml_str("", &set).unwrap();
    let resolved: toml::Table = toml::from_str(&cfg.to_toml()).unwrap();
    for (k, v) in keys {
        let (section, key) = k.split_once('.').unwrap();
        let got = &resolved[section][key];
        assert_eq!(got.to_string(), v, "{k}");
        // A value of the wrong type names the key.
        let err = RunConfig::from_toml_str("", &[format!("{k}=\"text\"")]).unwrap_err();
        assert_eq!(err.key, k, "{err}");
    }
}
