//! Command-line definitions. Raw values are turned into resolved settings by
//! the subcommand functions in `main.rs`.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// switchyard: Mixture-of-Experts language-model training on Burn.
#[derive(Parser)]
#[command(name = "switchyard", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand)]
pub enum Command {
    /// Load a Hugging Face Mixtral or Qwen2-MoE directory and describe the model.
    Info {
        /// Directory holding config.json and model.safetensors.
        #[arg(long)]
        hf: PathBuf,
    },
    /// Tokenizer tools.
    #[command(subcommand)]
    Tokenizer(TokenizerCommand),
}

/// `switchyard tokenizer ...`
#[derive(Subcommand)]
pub enum TokenizerCommand {
    /// Train a byte-level BPE tokenizer on a corpus and save it as tokenizer.json.
    Train(TrainTokenizer),
}

/// How input files are read.
#[derive(Clone, Copy, ValueEnum)]
pub enum InputKind {
    /// Plain text; documents separated by blank lines.
    Text,
    /// JSON lines with a text field.
    Jsonl,
    /// Parquet with a text column.
    Parquet,
}

/// Arguments of `switchyard tokenizer train`.
#[derive(Args)]
pub struct TrainTokenizer {
    /// Files, directories or glob patterns to learn from (streamed, never loaded whole).
    #[arg(long, required = true, num_args = 1..)]
    pub input: Vec<String>,
    /// Vocabulary size, special tokens included.
    #[arg(long, default_value_t = 4096)]
    pub vocab_size: usize,
    /// Where to write tokenizer.json.
    #[arg(long)]
    pub out: PathBuf,
    /// Input format.
    #[arg(long, value_enum, default_value_t = InputKind::Text)]
    pub kind: InputKind,
    /// JSONL field / parquet column with the text.
    #[arg(long, default_value = "text")]
    pub text_field: String,
    /// Text: a run of this many blank lines ends a document (0: whole files).
    #[arg(long, default_value_t = 1)]
    pub blank_lines: usize,
    /// Pairs seen fewer times are not merged.
    #[arg(long, default_value_t = 2)]
    pub min_frequency: u64,
    /// End-of-document token (id 0).
    #[arg(long, default_value = "<|endoftext|>")]
    pub eos_token: String,
}
