//! Arguments of the commands that read a trained model: `inspect`,
//! `generate`, `eval` and `routing-report` (run by `read_commands.rs`).

use super::non_negative_number;
use clap::Args;
use std::path::PathBuf;

/// Arguments of `switchyard inspect`.
#[derive(Args)]
pub struct InspectArgs {
    /// A run directory, a checkpoint directory, or a Hugging Face model directory.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Text to tokenize and route.
    #[arg(
        long,
        conflicts_with = "token_ids",
        required_unless_present = "token_ids"
    )]
    pub text: Option<String>,
    /// Comma-separated token ids.
    #[arg(long, value_delimiter = ',')]
    pub token_ids: Option<Vec<u32>>,
    /// Write logits, router_logits.{i} and topk_experts.{i} to this safetensors file.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Tokenizer, when the checkpoint has none.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Route with the checkpoint's capacity (`moe.eval_capacity_factor` and
    /// `moe.drop_policy`), as the evaluations during training did, instead
    /// of sending every token to all its k experts.
    #[arg(long)]
    pub capacity: bool,
}

/// Arguments of `switchyard generate`.
#[derive(Args)]
pub struct GenerateArgs {
    /// A run directory, a checkpoint directory, or a Hugging Face model directory.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The text to continue.
    #[arg(long)]
    pub prompt: String,
    /// Tokens to generate.
    #[arg(long, default_value_t = 200)]
    pub max_tokens: usize,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.8, value_parser = non_negative_number)]
    pub temperature: f64,
    /// Sample among the k most likely tokens (0: all).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// RNG seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Tokenizer, when the checkpoint has none.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Route with the checkpoint's capacity (`moe.eval_capacity_factor` and
    /// `moe.drop_policy`), as the evaluations during training did, instead
    /// of sending every token to all its k experts.
    #[arg(long)]
    pub capacity: bool,
}

/// Arguments of `switchyard eval`.
#[derive(Args)]
pub struct EvalArgs {
    /// A run directory, a checkpoint directory, or a Hugging Face model
    /// directory (then --data is needed).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Text files, directories or globs to evaluate on (default: the run's validation split).
    #[arg(long, num_args = 1..)]
    pub data: Vec<String>,
    /// Tokenizer, when the checkpoint has none (a Hugging Face directory
    /// without tokenizer.json).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Text: a run of this many blank lines ends a document (with --data).
    #[arg(long, default_value_t = 2)]
    pub blank_lines: usize,
    /// At most this many batches.
    #[arg(long, default_value_t = 50)]
    pub max_batches: usize,
}

/// Arguments of `switchyard routing-report`.
#[derive(Args)]
pub struct RoutingReportArgs {
    /// A run directory, a checkpoint directory, or a Hugging Face model directory.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Tokenizer, when the checkpoint has none.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// One domain per corpus, as NAME=PATH: a text file, a .jsonl or
    /// .parquet file, a directory or a glob.
    #[arg(long, num_args = 1.., required = true)]
    pub data: Vec<String>,
    /// Route with capacity at this factor (drop policy) instead of the
    /// checkpoint's evaluation routing.
    #[arg(long, allow_hyphen_values = true)]
    pub capacity_factor: Option<f64>,
    /// Text: a run of this many blank lines ends a document.
    #[arg(long, default_value_t = 2)]
    pub blank_lines: usize,
    /// JSONL and parquet: the field holding the text.
    #[arg(long, default_value = "text")]
    pub text_field: String,
    /// At most this many batches per domain.
    #[arg(long, default_value_t = 50)]
    pub max_batches: usize,
    /// Directory for report.md, report.json and the heat maps.
    #[arg(long)]
    pub out: PathBuf,
}
