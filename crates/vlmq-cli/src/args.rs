//! The command line: subcommands and their flags.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Post-training quantization (GPTQ, GPTAQ, VLMQ) of Llama-family models and
/// vision-language models (LLaVA, Qwen2-VL, SmolVLM), written as GPTQ
/// checkpoints.
#[derive(Parser, Debug)]
#[command(name = "vlmq", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
// Parsed once per process: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Quantize MODEL (a Hugging Face directory or a .gguf file) into a GPTQ checkpoint.
    Quantize(QuantizeArgs),
    /// Perplexity of a model or checkpoint on a text, and its KL divergence from a reference.
    Eval(EvalArgs),
    /// Format, grid and layers of a GPTQ checkpoint, with every tensor digest checked.
    Inspect(InspectArgs),
}

/// `vlmq quantize`: every recipe setting as a flag; a flag overrides the
/// `--recipe` file, which overrides the defaults.
#[derive(Args, Debug)]
pub struct QuantizeArgs {
    /// Hugging Face model directory or .gguf file.
    pub model: PathBuf,
    /// Output directory of the checkpoint (a GGUF format: a .gguf file, or
    /// a directory that gets model.gguf).
    #[arg(long)]
    pub out: PathBuf,
    /// gptq, or gguf:q4_0, gguf:q4_1, gguf:q5_0, gguf:q8_0, gguf:q4_k,
    /// gguf:q6_k (one GGUF file; Llama-family models) [default: gptq].
    #[arg(long)]
    pub format: Option<String>,
    /// Calibration data: a text file (cut into --seq-len windows), JSONL
    /// records {"text": ..., "images": [...]}, or JSONL conversations
    /// {"messages": [...]} (rendered with the model's chat template; images
    /// as {"type": "image", "path": ...} parts).
    #[arg(long)]
    pub calib: PathBuf,
    /// TOML recipe with any of the settings below, per-layer grids and dense layers.
    #[arg(long)]
    pub recipe: Option<PathBuf>,
    /// rtn, gptq, gptaq, vlmq or vlmq+gptaq [default: gptq].
    #[arg(long)]
    pub method: Option<String>,
    /// Bit width: 2, 3, 4 or 8 [default: 4].
    #[arg(long)]
    pub bits: Option<u32>,
    /// Columns per group, or -1 for one scale per output channel [default: 128].
    #[arg(long, allow_negative_numbers = true)]
    pub group: Option<i64>,
    /// Asymmetric grid (zero point fitted per group) [default: symmetric].
    #[arg(long)]
    pub asym: bool,
    /// Act-order: columns in order of decreasing Hessian diagonal.
    #[arg(long)]
    pub act_order: bool,
    /// Static groups, fitted before any update (with --act-order).
    #[arg(long)]
    pub static_groups: bool,
    /// Group-aware activation ordering (GAR, GPTQModel's act_group_aware):
    /// groups walked by their largest Hessian diagonal entry; no g_idx needed.
    #[arg(long)]
    pub gar: bool,
    /// Relative damping of the Hessian diagonal [default: 0.01].
    #[arg(long)]
    pub damping: Option<f64>,
    /// Capture every linear group of a block in one forward (faster, usually
    /// slightly worse) instead of true-sequential capture.
    #[arg(long)]
    pub one_forward: bool,
    /// Calibration samples [default: 128].
    #[arg(long)]
    pub samples: Option<usize>,
    /// Tokens per calibration window [default: 512].
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Seed of the draw of calibration windows [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Calibration tokens whose layer inputs are held at once while a
    /// block's statistics are gathered (memory only) [default: 8192].
    #[arg(long)]
    pub capture_tokens: Option<usize>,
    /// MiB of layer inputs held at once while a block's statistics are
    /// gathered: wide inputs are captured in fewer tokens (memory only)
    /// [default: 128].
    #[arg(long, value_name = "MIB")]
    pub capture_mb: Option<usize>,
    /// MiB of hidden states VLMQ's importance pass holds at once: less
    /// memory, fewer samples in parallel, the same result [default: 1024].
    #[arg(long, value_name = "MIB")]
    pub importance_mb: Option<usize>,
    /// Keep the run's state here after each block; a rerun with the same
    /// directory, model, data and recipe resumes.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// After quantizing, the perplexity and KL divergence on this text file.
    #[arg(long, value_name = "TEXT_FILE")]
    pub eval: Option<PathBuf>,
    /// Where to compute: cpu, cuda or cuda:N (cuda needs a build with the cuda feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute dtype of the model's blocks: f32, f16, bf16 or f64.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Print the recipe in effect (TOML) and exit.
    #[arg(long)]
    pub print_recipe: bool,
    /// Cancel after this many layers, as Ctrl-C would (for tests of resuming).
    #[arg(long, hide = true)]
    pub stop_after_layers: Option<usize>,
}

/// `vlmq eval`.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Hugging Face model directory, .gguf file or GPTQ checkpoint directory.
    pub model: PathBuf,
    /// Text file to evaluate on.
    #[arg(long)]
    pub data: PathBuf,
    /// Full-precision model for the KL divergence.
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// Tokens per window.
    #[arg(long, default_value_t = vlmq_candle::Recipe::DEFAULT_SEQ_LEN)]
    pub seq_len: usize,
    /// Windows evaluated (the first ones of the text); 0 = all.
    #[arg(long, default_value_t = 0)]
    pub windows: usize,
    /// Where to compute: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute dtype: f32, f16, bf16 or f64.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

/// `vlmq inspect`.
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// GPTQ checkpoint directory.
    pub checkpoint: PathBuf,
}
