//! Command-line definitions. Raw values are turned into resolved settings by
//! the subcommand functions in `main.rs` and `read_commands.rs`; the
//! arguments of the commands that read a model are in `read.rs`.

mod read;

pub use read::{EvalArgs, GenerateArgs, InspectArgs, RoutingReportArgs};

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
    /// Train a model from a TOML config.
    Train(TrainArgs),
    /// Load a Hugging Face directory (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, GLM-4.5, Llama, Mistral, Qwen2, Qwen3) and describe the model.
    Info {
        /// Directory holding config.json and model.safetensors.
        #[arg(long)]
        hf: PathBuf,
    },
    /// Tokenizer tools.
    #[command(subcommand)]
    Tokenizer(TokenizerCommand),
    /// Write a checkpoint as a Hugging Face directory (config.json + model.safetensors).
    Export(ExportArgs),
    /// Show which experts each token is routed to; optionally write a trace file.
    Inspect(InspectArgs),
    /// Sample text from a checkpoint.
    Generate(GenerateArgs),
    /// Report loss and perplexity of a checkpoint on a corpus.
    Eval(EvalArgs),
    /// Evaluate a checkpoint on named corpora and report, per domain, how
    /// its routers treat them (report.md, heat maps).
    RoutingReport(RoutingReportArgs),
    /// Train many configs that differ in a few keys, and compare them.
    Sweep(SweepArgs),
    /// Time whole training steps on synthetic tokens: tokens/s, phases, memory.
    Bench(BenchArgs),
    /// Turn a dense model's MLPs into routed experts that compute the same
    /// function (sparse upcycling), written as a run directory.
    Upcycle(UpcycleArgs),
    /// Compare placements of a run's experts on N devices (expert
    /// parallelism): load balance, all-to-all bytes, predicted step time.
    PlanExperts(PlanExpertsArgs),
}

/// Arguments of `switchyard plan-experts`.
#[derive(Args)]
pub struct PlanExpertsArgs {
    /// A run directory (its config.toml and metrics.jsonl).
    #[arg(long)]
    pub run: PathBuf,
    /// Devices the experts are spread over.
    #[arg(long)]
    pub devices: usize,
    /// Devices per node.
    #[arg(long, default_value_t = 8)]
    pub per_node: usize,
    /// Inter-node bandwidth per device, Gbit/s.
    #[arg(long, default_value_t = 100.0, value_parser = positive_number)]
    pub link_gbps: f64,
    /// Intra-node bandwidth per device, Gbit/s.
    #[arg(long, default_value_t = 900.0, value_parser = positive_number)]
    pub intra_node_gbps: f64,
    /// Expert FLOP/s per device (default: the rate the run reached).
    #[arg(long, value_parser = positive_number)]
    pub flops: Option<f64>,
    /// Average the logged counts over this many last steps.
    #[arg(long, default_value_t = 100)]
    pub steps: usize,
    /// Split each layer's busiest expert over two devices (balanced placement).
    #[arg(long)]
    pub replicate_hottest: bool,
    /// Also write every placement, per layer and expert, as JSON here.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Arguments of `switchyard upcycle`.
#[derive(Args)]
pub struct UpcycleArgs {
    /// The dense model: a Hugging Face directory (Llama, Mistral, Qwen2,
    /// Qwen3), a switchyard run or a checkpoint directory.
    #[arg(long)]
    pub from: PathBuf,
    /// Routed experts per upcycled block.
    #[arg(long)]
    pub experts: usize,
    /// Copies of the MLP each token is routed to (the layer's top-k is
    /// this times granularity - shared experts).
    #[arg(long)]
    pub top_k: usize,
    /// Split each MLP into this many slices, one per routed expert.
    #[arg(long, default_value_t = 1)]
    pub granularity: usize,
    /// Blocks to upcycle, comma-separated (default: all).
    #[arg(long, value_delimiter = ',')]
    pub layers: Option<Vec<usize>>,
    /// Slices of the MLP that become one always-on shared expert.
    #[arg(long, default_value_t = 0)]
    pub shared_experts: usize,
    /// Noise added to the routed experts, relative to each weight
    /// matrix's std; breaks the copies' symmetry and changes the function.
    #[arg(long, default_value_t = 0.0)]
    pub noise: f64,
    /// Seed of the router draw and the noise.
    #[arg(long, default_value_t = 1337)]
    pub seed: u64,
    /// The run directory to write.
    #[arg(long)]
    pub out: PathBuf,
}

/// Arguments of `switchyard bench`.
#[derive(Args)]
pub struct BenchArgs {
    /// The config giving the model and batch shape (e.g. configs/bench-moe.toml).
    #[arg(long)]
    pub config: PathBuf,
    /// Override a config key, e.g. `--set moe.drop_policy=dropless` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// flex (CPU), wgpu, cuda or cuda:N.
    #[arg(long, default_value = "flex")]
    pub device: String,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Timed steps; the median is reported.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Also time each phase (attention, router, dispatch/combine, experts, LM head, optimizer).
    #[arg(long)]
    pub profile: bool,
    /// Skip measuring the backend's f32 matmul ceiling.
    #[arg(long)]
    pub no_sgemm: bool,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// How a sweep searches.
#[derive(Clone, Copy, ValueEnum)]
pub enum SearchArg {
    /// Train every point in full.
    Grid,
    /// Successive halving: the worse half stops at each budget.
    Halving,
}

/// Arguments of `switchyard sweep`.
#[derive(Args)]
pub struct SweepArgs {
    /// The sweep file (base config, [set], [grid] or [[points]]).
    #[arg(long)]
    pub config: PathBuf,
    /// Points trained at once; the cores are shared among them.
    #[arg(long, default_value_t = 1)]
    pub jobs: usize,
    /// Skip finished points and resume unfinished ones from their checkpoints.
    #[arg(long)]
    pub resume: bool,
    /// grid (every point in full) or halving (successive halving).
    #[arg(long, value_enum, default_value_t = SearchArg::Grid)]
    pub search: SearchArg,
    /// Directory that holds runs.
    #[arg(long, default_value = "runs")]
    pub runs_dir: PathBuf,
}

/// Export format.
#[derive(Clone, Copy, ValueEnum)]
pub enum FormatArg {
    /// The simplest family that expresses the model exactly.
    Auto,
    /// MixtralForCausalLM.
    Mixtral,
    /// Qwen2MoeForCausalLM.
    #[value(name = "qwen2-moe")]
    Qwen2Moe,
    /// Qwen3MoeForCausalLM.
    #[value(name = "qwen3-moe")]
    Qwen3Moe,
    /// OlmoeForCausalLM.
    Olmoe,
    /// Glm4MoeForCausalLM (GLM-4.5).
    #[value(name = "glm4-moe")]
    Glm4Moe,
    /// GraniteMoeForCausalLM.
    Granitemoe,
    /// LlamaForCausalLM (dense).
    Llama,
    /// MistralForCausalLM (dense).
    Mistral,
    /// Qwen2ForCausalLM (dense).
    Qwen2,
    /// Qwen3ForCausalLM (dense).
    Qwen3,
}

/// Export dtype.
#[derive(Clone, Copy, ValueEnum)]
pub enum DtypeArg {
    /// float32
    F32,
    /// bfloat16
    Bf16,
}

/// Arguments of `switchyard export`.
#[derive(Args)]
pub struct ExportArgs {
    /// A run directory (its latest checkpoint) or a checkpoint directory.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Target family.
    #[arg(long, value_enum, default_value_t = FormatArg::Auto)]
    pub format: FormatArg,
    /// Weight dtype.
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    pub dtype: DtypeArg,
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

/// Arguments of `switchyard train`.
#[derive(Args)]
pub struct TrainArgs {
    /// The run config (TOML with [model], [moe], [data], [optim], [train], [log]).
    #[arg(long)]
    pub config: PathBuf,
    /// Override a config key, e.g. `--set train.steps=100`; repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Run name: the run goes to runs/NAME (default: the config's file name); a
    /// relative path such as `ablations/lr-3e-3` nests it.
    #[arg(long)]
    pub name: Option<String>,
    /// Continue the run from its last checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Backend: flex (CPU), wgpu, cuda or cuda:N (GPU backends need the matching cargo feature).
    #[arg(long, default_value = "flex")]
    pub device: String,
    /// Directory that holds runs.
    #[arg(long, default_value = "runs")]
    pub runs_dir: PathBuf,
    /// Stop after this many steps (checkpointing), to continue later with --resume.
    #[arg(long)]
    pub stop_after: Option<u64>,
    /// Start from these weights (a run, checkpoint or Hugging Face directory)
    /// with a fresh optimizer; the same as `--set train.init_from=DIR`.
    #[arg(long, value_name = "DIR")]
    pub init_from: Option<String>,
}

/// A flag's value that must be a finite number > 0.
fn positive_number(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("must be a finite number > 0, got `{text}`")),
    }
}

/// A flag's value that must be a finite number >= 0.
fn non_negative_number(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("must be a finite number >= 0, got `{text}`")),
    }
}
