//! The GGUF rows of docs/RESULTS-REAL.md: a Llama-family GGUF file
//! re-quantized onto llama.cpp's block types, each written as a GGUF file,
//! read back, run through candle's quantized matmul (`QMatMul`, as
//! candle-transformers' quantized Llama runs it) and scored against the
//! source in f32 on held-out windows; one JSON line per file.
//!
//! ```text
//! cargo run --release -p vlmq-candle --example gguf_table -- --model FILE.gguf --calib FILE \
//!     --gguf q4_0,q4_1,q4_k,q6_k (--method gptq | --method vlmq | --candle-rtn) \
//!     [--work DIR] [--keep] [--windows 16] [--window-len 512] [--eval-windows 8] [--seed 0] \
//!     [--one-forward] [--json results.jsonl]
//! ```
//!
//! `--candle-rtn`: candle's own quantizer (round to nearest, no
//! calibration), plus one line for the source file itself. `--method`:
//! vlmq's solve onto each type's grid with `--windows` calibration windows
//! drawn by `--seed`. Windows are cut as in the `quantize` example: the last
//! `--eval-windows` windows of the tokenized text are held out, the
//! calibration windows are drawn from the others with
//! [`vlmq::sample_indices`], as the `vlmq` command draws them. The JSON
//! lines name the model by its file name only.

mod cli;
mod gguf_files;
mod text_windows;

use std::path::PathBuf;
use std::time::Instant;

use cli::{emit, Flags, Quant};
use vlmq::QuantMethod;
use vlmq_candle::candle_core::{DType, Device};
use vlmq_candle::{encode, load_model, Recipe, TextSample};

struct Args {
    model: PathBuf,
    calib: PathBuf,
    quant: Quant,
    types: String,
    candle_rtn: bool,
    windows: usize,
    window_len: usize,
    seed: u64,
    eval_windows: usize,
    one_forward: bool,
    work: Option<PathBuf>,
    keep: bool,
    json: Option<PathBuf>,
}

fn parse() -> Result<Args, String> {
    let f = Flags::parse(
        &[
            "--model",
            "--calib",
            "--gguf",
            "--method",
            "--windows",
            "--window-len",
            "--seed",
            "--eval-windows",
            "--work",
            "--json",
        ],
        &["--candle-rtn", "--one-forward", "--keep"],
    )?;
    let a = Args {
        model: f.path("--model").unwrap_or_default(),
        calib: f.path("--calib").unwrap_or_default(),
        quant: Quant::from_flags(&f, QuantMethod::Gptq)?,
        types: f.parsed("--gguf")?.unwrap_or_default(),
        candle_rtn: f.switch("--candle-rtn"),
        windows: f.or("--windows", 16)?,
        window_len: f.or("--window-len", 512)?,
        seed: f.or("--seed", 0)?,
        eval_windows: f.or("--eval-windows", 8)?,
        one_forward: f.switch("--one-forward"),
        work: f.path("--work"),
        keep: f.switch("--keep"),
        json: f.path("--json"),
    };
    if a.model.as_os_str().is_empty() || a.calib.as_os_str().is_empty() || a.types.is_empty() {
        return Err("--model, --calib and --gguf are required".into());
    }
    Ok(a)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    vlmq_candle::prefer_sample_parallelism();
    let a = parse()
        .map_err(|e| format!("{e}\nusage: see the doc comment of examples/gguf_table.rs"))?;
    let pipeline = Recipe {
        samples: a.windows,
        seq_len: a.window_len,
        seed: a.seed,
        ..a.quant.recipe(a.one_forward)
    }
    .check("command line".as_ref())?
    .pipeline()
    .clone();
    let t0 = Instant::now();
    let (model, tk) = load_model(&a.model, DType::F32, &Device::Cpu)?;
    eprintln!(
        "loaded {:?} in {:.1}s: {:?}",
        a.model,
        t0.elapsed().as_secs_f64(),
        model.config()
    );

    let text = std::fs::read_to_string(&a.calib)?;
    let tokens = encode(&tk, &text)?;
    let text_windows::TextWindows {
        all,
        pool,
        eval_set,
        calib_idx,
    } = text_windows::split(
        &a.calib,
        &tokens,
        a.window_len,
        a.windows,
        a.eval_windows,
        a.seed,
    )?;
    let samples: Vec<TextSample> = calib_idx
        .iter()
        .map(|&i| TextSample::causal(all[i].clone()))
        .collect();

    let args = gguf_files::GgufArgs {
        source: &a.model,
        types: gguf_files::parse_types(&a.types)?,
        candle_rtn: a.candle_rtn,
        quant: &a.quant,
        pipeline,
        seed: a.seed,
        work: a.work.clone().unwrap_or_else(std::env::temp_dir),
        keep: a.keep,
    };
    let model_name = a
        .model
        .file_name()
        .map(|n| n.to_string_lossy().into_owned());
    let common = serde_json::json!({
        "model": model_name, "seed": a.seed, "calib_windows": calib_idx, "window_len": a.window_len,
        "eval_windows": [pool, all.len()], "true_sequential": !a.one_forward,
    });
    let json = a.json.as_deref();
    let mut out = |line: &serde_json::Value| emit(line, json);
    gguf_files::run(&args, &model, &samples, &eval_set, common, &mut out)
}
