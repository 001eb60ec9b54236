//! Peak memory and time per block of a quantization run whose decoder
//! layers stay on disk ([`Residency::Disk`]) or are all loaded
//! (`--resident`). Each finished block is written to `--out` as a shard of
//! a GPTQ checkpoint ([`ShardedGptqWriter`]) as soon as it is done, or
//! dropped without `--out`.
//!
//! ```text
//! cargo run --release -p vlmq-candle --example memory_run -- \
//!     --model DIR_OR_GGUF [--calib TEXT | --random-tokens] [--method gptq|vlmq] \
//!     [--bits 4] [--group 128] [--windows 16] [--window-len 512] [--resident] \
//!     [--out GPTQ_DIR] [--json OUT] [--capture-tokens N] [--capture-mb MB] \
//!     [--importance-mb MB] [--trace-rss]
//! ```
//!
//! `--trace-rss` prints, after every progress event (each step of the
//! importance pass, each quantized layer), the largest resident set sampled
//! during the step and the resident set at its end: where a peak arises.
//!
//! With `--random-tokens` the calibration windows are pseudo-random token
//! ids (for a random-weight model without a tokenizer). The peak resident
//! set is the kernel's high-water mark (`VmHWM` of `/proc/self/status`,
//! Linux only), read at the end of the run.

mod cli;
mod rss;

use std::path::PathBuf;
use std::time::Instant;

use cli::{emit, Flags, Quant};
use vlmq::{quantize_model_streaming, BlockSink, FinishedBlock, QuantMethod};
use vlmq_candle::eval::windows;
use vlmq_candle::export::ShardedGptqWriter;
use vlmq_candle::{encode, load_hf_dir_with, load_model_with, LoadOptions, Residency, TextSample};

/// The kernel's high-water mark of this process's resident set, in MB.
fn peak_rss_mb() -> Option<f64> {
    rss::status_mb("VmHWM:")
}

fn random_windows(vocab: usize, n: usize, len: usize) -> Vec<Vec<u32>> {
    let mut rng = vlmq::__private::SplitMix64::from_state(0x6d65_6d6f_7279);
    (0..n)
        .map(|_| {
            (0..len)
                .map(|_| (rng.next_u64() % vocab as u64) as u32)
                .collect()
        })
        .collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let f = Flags::parse(
        &[
            "--model",
            "--calib",
            "--method",
            "--bits",
            "--group",
            "--windows",
            "--window-len",
            "--out",
            "--json",
            "--capture-tokens",
            "--capture-mb",
            "--importance-mb",
        ],
        &[
            "--asym",
            "--gar",
            "--random-tokens",
            "--resident",
            "--trace-rss",
        ],
    )?;
    let model_path: PathBuf = f.path("--model").ok_or("--model is required")?;
    let quant = Quant::from_flags(&f, QuantMethod::Gptq)?;
    let n: usize = f.or("--windows", 16)?;
    let len: usize = f.or("--window-len", 512)?;
    let residency = if f.switch("--resident") {
        Residency::Memory
    } else {
        Residency::Disk
    };
    let t0 = Instant::now();
    let opts = LoadOptions::default().with_residency(residency);
    let random = f.switch("--random-tokens");
    // A random-weight directory has no tokenizer: load the model alone.
    let (mut model, tk) = if random && model_path.is_dir() {
        (load_hf_dir_with(&model_path, &opts)?, None)
    } else {
        let (m, tk) = load_model_with(&model_path, &opts)?;
        (m, Some(tk))
    };
    let load_s = t0.elapsed().as_secs_f64();
    let rss_loaded = peak_rss_mb();
    let wins = match (&tk, random) {
        (Some(tk), false) => {
            let calib = f
                .path("--calib")
                .ok_or("--calib or --random-tokens is required")?;
            let tokens = encode(tk, &std::fs::read_to_string(&calib)?)?;
            let all = windows(&tokens, len);
            if all.len() < n {
                return Err(
                    format!("{} windows of {len} tokens, fewer than {n}", all.len()).into(),
                );
            }
            all.into_iter().take(n).collect()
        }
        _ => random_windows(model.config().vocab_size, n, len),
    };
    let samples: Vec<TextSample> = wins.into_iter().map(TextSample::causal).collect();
    let mut cfg = quant
        .recipe(false)
        .check("command line".as_ref())?
        .pipeline()
        .clone();
    if let Some(t) = f.parsed::<usize>("--capture-tokens")? {
        cfg = cfg.with_capture_tokens(t);
    }
    if let Some(mb) = f.parsed::<usize>("--capture-mb")? {
        cfg = cfg.with_capture_memory(mb << 20);
    }
    if let Some(mb) = f.parsed::<usize>("--importance-mb")? {
        cfg = cfg.with_importance_memory(mb << 20);
    }
    let trace = f
        .switch("--trace-rss")
        .then(|| rss::RssTrace::start(std::time::Duration::from_millis(20)));
    if let Some(t) = &trace {
        let (max, now) = t.mark();
        eprintln!("loaded: max RSS {max:.0} MB, now {now:.0} MB");
    }
    let run_start = Instant::now();
    let mut block_seconds = Vec::new();
    let mut last = Instant::now();
    let out_dir = f.path("--out");
    let mut writer = match &out_dir {
        Some(d) => Some(ShardedGptqWriter::new(&model, d)?),
        None => None,
    };
    let mut sink = |b: FinishedBlock| -> vlmq::Result<()> {
        let layers = b.layers.len();
        let index = b.index;
        if let Some(w) = writer.as_mut() {
            w.block_finished(b)?;
        }
        block_seconds.push(last.elapsed().as_secs_f64());
        eprintln!(
            "block {} done: {} layers, {:.1} s, peak RSS so far {:.0} MB",
            index,
            layers,
            last.elapsed().as_secs_f64(),
            peak_rss_mb().unwrap_or(f64::NAN)
        );
        last = Instant::now();
        Ok(())
    };
    let out = quantize_model_streaming(&mut model, &samples, &cfg, &mut sink, |p| {
        if let Some(t) = &trace {
            let (max, now) = t.mark();
            eprintln!("{p}  | step max RSS {max:.0} MB, after {now:.0} MB");
        }
    })?;
    if let Some(w) = writer {
        w.finish(tk.as_ref())?;
    }
    // The first block's time includes the importance pass; report it apart.
    if let Some(first) = block_seconds.first_mut() {
        *first -= out.report.importance_seconds;
    }
    let line = serde_json::json!({
        "model": model_path.file_name().map(|s| s.to_string_lossy().to_string()),
        "residency": format!("{residency:?}"),
        "method": quant.method.to_string(),
        "bits": quant.bits,
        "group": quant.group,
        "windows": n,
        "window_len": len,
        "blocks": model.config().num_layers,
        "hidden": model.config().hidden_size,
        "load_seconds": load_s,
        "peak_rss_after_load_mb": rss_loaded,
        "importance_seconds": out.report.importance_seconds,
        "block_seconds": block_seconds,
        "total_seconds": run_start.elapsed().as_secs_f64(),
        "capture_tokens": cfg.capture_tokens(),
        "capture_mb": cfg.capture_memory() >> 20,
        "importance_mb": cfg.importance_memory() >> 20,
        "peak_rss_mb": peak_rss_mb(),
    });
    Ok(emit(&line, f.path("--json").as_deref())?)
}
