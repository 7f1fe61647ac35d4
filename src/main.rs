//! The `switchyard` command line: one match over subcommands.

use anyhow::Result;
use clap::Parser;
use std::io::IsTerminal;
use switchyard::checkpoint::{self, Location};
use switchyard::cli::*;
use switchyard::data::{files, tokenizer, SourceConfig, SourceKind};
use switchyard::export::{ExportDtype, ExportFormat};
use switchyard::hf::HfArch;

mod read_commands;
use read_commands::{eval, generate, inspect, routing_report};

fn main() -> Result<()> {
    switchyard::quiet_broken_pipe();
    switchyard::keep_freed_memory();
    match Cli::parse().command {
        Command::Train(args) => train(args),
        Command::Info { hf } => info(&hf),
        Command::Tokenizer(TokenizerCommand::Train(args)) => train_tokenizer(args),
        Command::Export(args) => export(args),
        Command::Inspect(args) => inspect(args),
        Command::Generate(args) => generate(args),
        Command::Eval(args) => eval(args),
        Command::RoutingReport(args) => routing_report(args),
        Command::Sweep(args) => sweep(args),
        Command::Bench(args) => bench(args),
        Command::Upcycle(args) => upcycle(args),
        Command::PlanExperts(args) => plan_experts(args),
    }
}

fn plan_experts(args: PlanExpertsArgs) -> Result<()> {
    use switchyard::dist::plan;
    let cfg_path = args.run.join("config.toml");
    anyhow::ensure!(
        cfg_path.is_file(),
        "{} is not a run directory (no config.toml)",
        args.run.display()
    );
    let cfg = switchyard::config::RunConfig::load(&cfg_path, &[])?;
    let opts = plan::PlanOptions {
        devices: args.devices,
        per_node: args.per_node,
        link_gbps: args.link_gbps,
        intra_node_gbps: args.intra_node_gbps,
        flops: args.flops,
        steps: args.steps,
        replicate_hottest: args.replicate_hottest,
    };
    let counts = plan::read_counts(&args.run, opts.steps)?;
    let plans = plan::plan(&cfg, &counts, &opts)?;
    print!("{}", plan::render(&plans, &counts, &opts));
    if let Some(out) = &args.out {
        let json = plan::to_json(&plans);
        std::fs::write(out, serde_json::to_string_pretty(&json)?)
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", out.display()))?;
    }
    Ok(())
}

fn train(args: TrainArgs) -> Result<()> {
    let mut overrides = args.set;
    if let Some(dir) = args.init_from {
        overrides.push(format!("train.init_from={}", toml::Value::String(dir)));
    }
    let opts = switchyard::train::RunOptions {
        config: args.config,
        overrides,
        name: args.name,
        resume: args.resume,
        device: args.device,
        runs_dir: args.runs_dir,
        stop_after: args.stop_after,
    };
    // Under mpirun, this process is one rank of the run.
    let mut comm = switchyard::dist::init(&opts.device)?;
    let world = comm.world();
    match switchyard::train::run_in(&opts, comm.as_mut()) {
        Ok(_) => Ok(()),
        // The other ranks would wait for this one forever: stop them all.
        Err(e) if world.size > 1 => {
            eprintln!("rank {} of {}: error: {e:?}", world.rank, world.size);
            comm.abort(1)
        }
        Err(e) => Err(e),
    }
}

fn info(dir: &std::path::Path) -> Result<()> {
    use burn::module::Module;
    let device = burn::prelude::Device::flex();
    let (arch, model) = switchyard::hf::load(dir, &device)?;
    println!("architecture: {arch:?}");
    println!("parameters:   {}", model.num_params());
    println!("moe layers:   {}", model.moe_layers().count());
    println!("[model]\n{}", toml::to_string(model.config())?);
    println!("[moe]\n{}", toml::to_string(model.moe_config())?);
    Ok(())
}

fn train_tokenizer(args: TrainTokenizer) -> Result<()> {
    let src = SourceConfig {
        kind: match args.kind {
            InputKind::Text => SourceKind::Text,
            InputKind::Jsonl => SourceKind::Jsonl,
            InputKind::Parquet => SourceKind::Parquet,
        },
        paths: args.input,
        text_field: args.text_field,
        blank_lines: args.blank_lines,
        ..SourceConfig::default()
    };
    let files = files::resolve_files(&src, 0)?;
    let opts = tokenizer::TrainOptions {
        vocab_size: args.vocab_size,
        min_frequency: args.min_frequency,
        special_tokens: vec![args.eos_token],
        progress: std::io::stderr().is_terminal(),
    };
    let start = std::time::Instant::now();
    let tok = tokenizer::train_bpe(files, &opts, &args.out)?;
    println!(
        "wrote {} ({} tokens) in {:.1}s",
        args.out.display(),
        tok.get_vocab_size(true),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn export(args: ExportArgs) -> Result<()> {
    let dir = match checkpoint::locate(&args.checkpoint)? {
        Location::Switchyard(dir) => dir,
        Location::HuggingFace(dir) => {
            anyhow::bail!("{} is already a Hugging Face directory", dir.display())
        }
    };
    let device = burn::prelude::Device::flex();
    let (_, model) = checkpoint::load_model(&dir, &device)?;
    let tok = dir.join("tokenizer.json");
    let format = match args.format {
        FormatArg::Auto => ExportFormat::Auto,
        FormatArg::Mixtral => ExportFormat::Family(HfArch::Mixtral),
        FormatArg::Qwen2Moe => ExportFormat::Family(HfArch::Qwen2Moe),
        FormatArg::Qwen3Moe => ExportFormat::Family(HfArch::Qwen3Moe),
        FormatArg::Olmoe => ExportFormat::Family(HfArch::Olmoe),
        FormatArg::Glm4Moe => ExportFormat::Family(HfArch::Glm4Moe),
        FormatArg::Granitemoe => ExportFormat::Family(HfArch::GraniteMoe),
        FormatArg::Llama => ExportFormat::Family(HfArch::Llama),
        FormatArg::Mistral => ExportFormat::Family(HfArch::Mistral),
        FormatArg::Qwen2 => ExportFormat::Family(HfArch::Qwen2),
        FormatArg::Qwen3 => ExportFormat::Family(HfArch::Qwen3),
    };
    let dtype = match args.dtype {
        DtypeArg::F32 => ExportDtype::F32,
        DtypeArg::Bf16 => ExportDtype::Bf16,
    };
    let arch = switchyard::export::export(
        &model,
        tok.exists().then_some(tok.as_path()),
        &args.out,
        format,
        dtype,
    )?;
    println!(
        "wrote {} as {arch:?} from {}",
        args.out.display(),
        dir.display()
    );
    Ok(())
}

fn sweep(args: SweepArgs) -> Result<()> {
    use switchyard::sweep::run::{run_sweep, Search, SweepOptions};
    anyhow::ensure!(args.jobs >= 1, "--jobs must be at least 1");
    let out = run_sweep(&SweepOptions {
        file: args.config,
        jobs: args.jobs,
        resume: args.resume,
        search: match args.search {
            SearchArg::Grid => Search::Grid,
            SearchArg::Halving => Search::Halving,
        },
        exe: std::env::current_exe()?,
        runs_dir: args.runs_dir,
        bars: std::io::stdout().is_terminal(),
    })?;
    let md = std::fs::read_to_string(out.dir.join("summary.md"))?;
    println!("{md}");
    println!(
        "wrote {}/summary.csv, summary.md and {} plot(s); compare runs with: tensorboard --logdir {}",
        out.dir.display(),
        out.plots.len(),
        out.dir.display()
    );
    Ok(())
}

fn bench(args: BenchArgs) -> Result<()> {
    use switchyard::bench::{run, BenchOptions};
    anyhow::ensure!(args.steps >= 1, "--steps must be at least 1");
    let report = run(&BenchOptions {
        config: args.config,
        overrides: args.overrides,
        device: args.device,
        warmup: args.warmup,
        steps: args.steps,
        profile: args.profile,
        sgemm: !args.no_sgemm,
    })?;
    print!("{}", report.render());
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&report)? + "\n")
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    }
    Ok(())
}

fn upcycle(args: switchyard::cli::UpcycleArgs) -> Result<()> {
    let up = switchyard::config::UpcycleConfig {
        experts: args.experts,
        top_k: args.top_k,
        granularity: args.granularity,
        layers: args.layers,
        shared_experts: args.shared_experts,
        noise: args.noise,
    };
    // Config errors name `upcycle.<key>`; here the flags are the keys.
    let model =
        switchyard::upcycle::write_run(&args.from, &up, args.seed, &args.out).map_err(|e| {
            let mut text = format!("{e:#}");
            for (key, flag) in [
                ("upcycle.experts", "--experts"),
                ("upcycle.top_k", "--top-k"),
                ("upcycle.granularity", "--granularity"),
                ("upcycle.layers", "--layers"),
                ("upcycle.shared_experts", "--shared-experts"),
                ("upcycle.noise", "--noise"),
            ] {
                text = text
                    .replace(&format!("invalid config key `{key}`"), flag)
                    .replace(key, flag);
            }
            anyhow::anyhow!(text)
        })?;
    println!(
        "{}; wrote {}",
        switchyard::upcycle::describe(&model),
        args.out.display()
    );
    Ok(())
}
