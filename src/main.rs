//! The `switchyard` command line: one match over subcommands.

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "switchyard",
    version,
    about = "Mixture-of-Experts language-model training on Burn"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load a Hugging Face Mixtral or Qwen2-MoE directory and describe the model.
    Info {
        /// Directory holding config.json and model.safetensors.
        #[arg(long)]
        hf: PathBuf,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Info { hf } => info(&hf),
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
