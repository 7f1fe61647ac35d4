//! The subcommands that read a trained model (a switchyard checkpoint or
//! a Hugging Face directory): `inspect`, `generate`, `eval` and
//! `routing-report`.

use anyhow::{Context, Result};
use std::path::PathBuf;
use switchyard::checkpoint::{self, Location};
use switchyard::cli::*;
use switchyard::data::{tokenizer, SourceConfig};

/// The tokenizer to use: an explicit one, else the checkpoint's; it must
/// fit the model's vocabulary.
fn pick_tokenizer(
    explicit: Option<PathBuf>,
    found: Option<PathBuf>,
    vocab_size: usize,
) -> Result<tokenizers::Tokenizer> {
    let path = explicit.or(found).ok_or_else(|| {
        anyhow::anyhow!(
            "the checkpoint has no tokenizer.json: pass --tokenizer PATH (or use --token-ids)"
        )
    })?;
    let tok = tokenizer::load(&path)?;
    tokenizer::check_fits(&tok, &path, vocab_size)?;
    Ok(tok)
}

/// The model inference runs: without capacity unless `capacity` asks for
/// the checkpoint's evaluation-time routing.
fn for_inference(
    model: switchyard::model::LanguageModel,
    capacity: bool,
) -> switchyard::model::LanguageModel {
    if capacity {
        model
    } else {
        model.without_capacity()
    }
}

pub(crate) fn inspect(args: InspectArgs) -> Result<()> {
    let device = burn::prelude::Device::flex();
    let (model, tok_path) = checkpoint::load_any(&args.checkpoint, &device)?;
    let model = for_inference(model, args.capacity);
    let (ids, pieces) = match (args.token_ids, args.text) {
        (Some(ids), _) => {
            let pieces: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
            (ids, pieces)
        }
        (None, Some(text)) => {
            let tok = pick_tokenizer(args.tokenizer, tok_path, model.config().vocab_size)?;
            let ids = tokenizer::encode(&tok, &text)?;
            let pieces: Vec<String> = ids
                .iter()
                .map(|&i| tok.decode(&[i], false).unwrap_or_default())
                .collect();
            (ids, pieces)
        }
        (None, None) => unreachable!("clap requires one of --text, --token-ids"),
    };
    let trace = switchyard::inspect::trace(&model, &ids, &device)?;
    print!("{}", trace.describe(&pieces));
    if let Some(out) = args.out {
        trace
            .save(&out)
            .with_context(|| format!("writing {}", out.display()))?;
        println!("wrote {}", out.display());
    }
    Ok(())
}

pub(crate) fn generate(args: GenerateArgs) -> Result<()> {
    let device = burn::prelude::Device::flex();
    let (model, tok_path) = checkpoint::load_any(&args.checkpoint, &device)?;
    let model = for_inference(model, args.capacity);
    let tok = pick_tokenizer(args.tokenizer, tok_path, model.config().vocab_size)?;
    let eos = tok.token_to_id("<|endoftext|>");
    let mut prompt = tokenizer::encode(&tok, &args.prompt)?;
    if prompt.is_empty() {
        // An empty prompt starts a new document: sample after end-of-text.
        prompt.push(eos.ok_or_else(|| {
            anyhow::anyhow!(
                "--prompt is empty and the tokenizer has no <|endoftext|> token to start from: \
                 give a prompt"
            )
        })?);
    }
    let opts = switchyard::generate::SampleOptions {
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        seed: args.seed,
        stop: eos,
    };
    let out = switchyard::generate::generate(&model, &prompt, &opts, &device)?;
    let text = tok
        .decode(&out, true)
        .map_err(|e| anyhow::anyhow!("decoding: {e}"))?;
    println!("{}{}", args.prompt, text);
    Ok(())
}

/// The config and model that `eval` and `routing-report` read: a switchyard
/// checkpoint's own, or for a Hugging Face directory the default config
/// around its model. The tokenizer is `explicit`, else the checkpoint's.
fn load_for_eval(
    arg: &std::path::Path,
    explicit: Option<PathBuf>,
    has_data: bool,
    device: &burn::prelude::Device,
) -> Result<(
    PathBuf,
    switchyard::config::RunConfig,
    switchyard::model::LanguageModel,
)> {
    let (dir, mut cfg, model, hf) = match checkpoint::locate(arg)? {
        Location::Switchyard(dir) => {
            let (cfg, model) = checkpoint::load_model(&dir, device)?;
            (dir, cfg, model, false)
        }
        Location::HuggingFace(dir) => {
            if !has_data {
                anyhow::bail!(
                    "{}: a Hugging Face directory names no corpus: pass --data",
                    dir.display()
                );
            }
            let (_, model) = switchyard::hf::load(&dir, device)?;
            let cfg = switchyard::config::RunConfig {
                model: model.config().clone(),
                moe: model.moe_config().clone(),
                ..Default::default()
            };
            (dir, cfg, model, true)
        }
    };
    let tok_file = dir.join("tokenizer.json");
    match explicit {
        Some(t) => cfg.data.tokenizer = t.to_string_lossy().into_owned(),
        None if tok_file.exists() => cfg.data.tokenizer = tok_file.to_string_lossy().into_owned(),
        None if hf => anyhow::bail!(
            "{}: no tokenizer.json: pass --tokenizer PATH",
            dir.display()
        ),
        None => {}
    }
    Ok((dir, cfg, model))
}

pub(crate) fn eval(args: EvalArgs) -> Result<()> {
    anyhow::ensure!(args.max_batches >= 1, "--max-batches must be at least 1");
    let device = burn::prelude::Device::flex();
    let (dir, mut cfg, model) = load_for_eval(
        &args.checkpoint,
        args.tokenizer,
        !args.data.is_empty(),
        &device,
    )?;
    if !args.data.is_empty() {
        cfg.data.sources = vec![SourceConfig {
            paths: args.data.clone(),
            blank_lines: args.blank_lines,
            ..SourceConfig::default()
        }];
        // Every document of the given files is evaluated.
        cfg.data.val_fraction = 1.0 - f64::EPSILON;
    }
    let tok_path = PathBuf::from(&cfg.data.tokenizer);
    let tok = tokenizer::load(&tok_path)?;
    tokenizer::check_fits(&tok, &tok_path, cfg.model.vocab_size)?;
    let tok = std::sync::Arc::new(tok);
    let report = switchyard::train::eval::evaluate(&model, &cfg, tok, &device, args.max_batches)?;
    let loss = report.loss;
    println!(
        "{}: loss {loss:.4} | perplexity {:.2}",
        dir.display(),
        loss.exp()
    );
    let domains = &report.domains;
    if domains.names.len() >= 2 {
        for ((name, l), n) in domains
            .names
            .iter()
            .zip(domains.losses())
            .zip(&domains.tokens)
        {
            if let Some(l) = l {
                println!(
                    "  {name}: {n:.0} tokens | loss {l:.4} | perplexity {:.2}",
                    l.exp()
                );
            }
        }
    }
    Ok(())
}

pub(crate) fn routing_report(args: RoutingReportArgs) -> Result<()> {
    use switchyard::metrics::routing_report as report;
    anyhow::ensure!(args.max_batches >= 1, "--max-batches must be at least 1");
    let named = report::parse_named(&args.data)?;
    let device = burn::prelude::Device::flex();
    let (dir, mut cfg, model) = load_for_eval(&args.checkpoint, args.tokenizer, true, &device)?;
    let sources = report::domain_sources(&named, args.blank_lines, &args.text_field);
    let routing = report::prepare(&mut cfg, sources, args.capacity_factor)?;
    let mut model = model;
    for layer in model.moe_layers_mut() {
        layer.set_eval_routing(cfg.moe.drop_policy, cfg.moe.eval_capacity_factor);
    }
    let tok_path = PathBuf::from(&cfg.data.tokenizer);
    let tok = tokenizer::load(&tok_path)?;
    tokenizer::check_fits(&tok, &tok_path, cfg.model.vocab_size)?;
    let tok = std::sync::Arc::new(tok);
    // Each domain on its own stream, up to --max-batches each.
    let mut parts = Vec::new();
    for source in &cfg.data.sources {
        let mut one = cfg.clone();
        one.data.sources = vec![source.clone()];
        let r = switchyard::train::eval::evaluate(
            &model,
            &one,
            tok.clone(),
            &device,
            args.max_batches,
        )?;
        parts.push(r.domains);
    }
    let domains = report::merge(parts);
    report::write(&args.out, &dir.display().to_string(), &routing, &domains)?;
    for ((name, loss), n) in domains
        .names
        .iter()
        .zip(domains.losses())
        .zip(&domains.tokens)
    {
        match loss {
            Some(l) => println!(
                "{name}: {n:.0} tokens | loss {l:.4} | perplexity {:.2}",
                l.exp()
            ),
            None => println!("{name}: no tokens"),
        }
    }
    println!("report: {}", args.out.join("report.md").display());
    Ok(())
}
