//! The `switchyard` command line: one match over subcommands.

use anyhow::Result;
use clap::Parser;
use std::io::IsTerminal;
use switchyard::cli::{Cli, Command, InputKind, TokenizerCommand, TrainTokenizer};
use switchyard::data::{sources, tokenizer, SourceConfig, SourceKind};

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Info { hf } => info(&hf),
        Command::Tokenizer(TokenizerCommand::Train(args)) => train_tokenizer(args),
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
    let files = sources::resolve_files(&src, 0)?;
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
