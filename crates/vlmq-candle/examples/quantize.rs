//! Quantize a Llama-family checkpoint (HF directory or GGUF file) end to end:
//! load, tokenize a text file into windows, evaluate the full-precision
//! model, quantize with a vlmq method, evaluate again (perplexity and KL vs
//! the full-precision model), write a GPTQ checkpoint in the model's HF
//! layout, read it back through `PackedLinear` and check it reproduces the
//! quantized model.
//!
//! ```text
//! cargo run --release -p vlmq-candle --example quantize -- --model PATH --calib FILE \
//!     --method gptq --bits 4 --group 128 --out DIR [--windows 32] [--window-len 256] \
//!     [--seed 0] [--eval-windows 16] [--asym] [--gar] [--json results.jsonl] [--one-forward]
//! cargo run --release -p vlmq-candle --example quantize -- --model LLAVA_DIR \
//!     --images DIR_OR_FILES --prompts FILE --method vlmq --bits 4 --group 128 \
//!     [--eval-windows N] [--all-blocks] [--out DIR] [--json results.jsonl]
//! ```
//!
//! A directory whose `config.json` says `model_type: llava` takes the
//! vision-language branch (`quantize_vlm/mod.rs`): calibration samples are
//! the prompts with their images, the LM alone is quantized unless
//! `--all-blocks`, and the checkpoint keeps the LLaVA layout.
//!
//! Windows: the text is tokenized once and cut into consecutive
//! non-overlapping windows of `--window-len` tokens; the LAST
//! `--eval-windows` windows are the held-out set (the same for every seed);
//! `--windows` calibration windows are drawn without replacement from the
//! others by a seeded shuffle.

mod cli;
mod quantize_vlm;

use std::path::PathBuf;
use std::time::Instant;

use cli::{emit, Flags, Quant};
use vlmq::QuantMethod;
use vlmq_candle::candle_core::{DType, Device};
use vlmq_candle::eval::{evaluate, windows};
use vlmq_candle::export::{load_gptq_into, write_gptq};
use vlmq_candle::{encode, load_model, TextSample};

struct Args {
    model: PathBuf,
    calib: PathBuf,
    quant: Quant,
    out: Option<PathBuf>,
    windows: usize,
    window_len: usize,
    seed: u64,
    eval_windows: Option<usize>,
    json: Option<PathBuf>,
    one_forward: bool,
    images: Option<String>,
    prompts: Option<PathBuf>,
    all_blocks: bool,
}

fn parse() -> Result<Args, String> {
    let f = Flags::parse(
        &[
            "--model",
            "--calib",
            "--method",
            "--bits",
            "--group",
            "--out",
            "--windows",
            "--window-len",
            "--seed",
            "--eval-windows",
            "--images",
            "--prompts",
            "--json",
        ],
        &["--asym", "--gar", "--all-blocks", "--one-forward"],
    )?;
    let a = Args {
        model: f.path("--model").unwrap_or_default(),
        calib: f.path("--calib").unwrap_or_default(),
        quant: Quant::from_flags(&f, QuantMethod::Gptq)?,
        out: f.path("--out"),
        windows: f.or("--windows", 32)?,
        window_len: f.or("--window-len", 256)?,
        seed: f.or("--seed", 0)?,
        eval_windows: f.parsed("--eval-windows")?,
        json: f.path("--json"),
        one_forward: f.switch("--one-forward"),
        images: f.parsed("--images")?,
        prompts: f.path("--prompts"),
        all_blocks: f.switch("--all-blocks"),
    };
    let vlm = a.images.is_some() || a.prompts.is_some();
    if vlm && (a.images.is_none() || a.prompts.is_none()) {
        return Err("--images and --prompts go together".into());
    }
    if a.model.as_os_str().is_empty() || (!vlm && a.calib.as_os_str().is_empty()) {
        return Err("--model and --calib (or --images and --prompts) are required".into());
    }
    Ok(a)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    vlmq_candle::prefer_sample_parallelism();
    let a =
        parse().map_err(|e| format!("{e}\nusage: see the doc comment of examples/quantize.rs"))?;
    let scheme = a.quant.scheme()?;
    if let (Some(images), Some(prompts)) = (&a.images, &a.prompts) {
        if !quantize_vlm::is_llava(&a.model) {
            return Err(format!(
                "{:?} is not a LLaVA directory (config.json model_type)",
                a.model
            )
            .into());
        }
        let line = quantize_vlm::run(&quantize_vlm::VlmArgs {
            model: &a.model,
            prompts,
            images,
            method: a.quant.method,
            scheme,
            eval: a.eval_windows.unwrap_or(0),
            all_blocks: a.all_blocks,
            out: a.out.as_deref(),
        })?;
        return Ok(emit(&line, a.json.as_deref())?);
    }
    let eval_windows = a.eval_windows.unwrap_or(16);
    let dev = Device::Cpu;
    let t0 = Instant::now();
    let (mut model, tk) = load_model(&a.model, DType::F32, &dev)?;
    eprintln!(
        "loaded {:?} in {:.1}s: {:?}",
        a.model,
        t0.elapsed().as_secs_f64(),
        model.config()
    );

    let text = std::fs::read_to_string(&a.calib)?;
    let tokens = encode(&tk, &text)?;
    let all = windows(&tokens, a.window_len);
    if all.len() < eval_windows + a.windows {
        return Err(format!(
            "{} tokens give {} windows of {}, fewer than {} eval + {} calibration",
            tokens.len(),
            all.len(),
            a.window_len,
            eval_windows,
            a.windows
        )
        .into());
    }
    let pool = all.len() - eval_windows;
    let eval_set: Vec<Vec<u32>> = all[pool..].to_vec();
    let calib_idx = vlmq::sample_indices(pool, a.windows, a.seed);
    eprintln!(
        "text {:?}: {} chars, {} tokens, {} windows of {}; eval = windows {}..{}; calibration (seed {}) = {:?}",
        a.calib, text.len(), tokens.len(), all.len(), a.window_len, pool, all.len(), a.seed, calib_idx
    );
    let samples: Vec<TextSample> = calib_idx
        .iter()
        .map(|&i| TextSample::causal(all[i].clone()))
        .collect();

    let reference = model.clone();
    let mut prog = |d: usize, n: usize| eprint!("\r  eval {d}/{n}   ");
    let base = evaluate(&reference, None, &eval_set, 2, &mut prog)?;
    eprintln!(
        "\nfull precision: ppl {:.4} ({} tokens, {:.1}s)",
        base.perplexity, base.tokens, base.seconds
    );

    let cfg = a.quant.pipeline(a.one_forward)?;
    let tq = Instant::now();
    let q = vlmq::quantize_model(&mut model, &samples, &cfg, |p| eprint!("\r  {p}      "))?;
    let quant_s = tq.elapsed().as_secs_f64();
    eprintln!(
        "\n{} done in {quant_s:.1}s (importance pass {:.1}s, CPU {:.0}% of {} cores)",
        a.quant.method,
        q.report.importance_seconds,
        100.0 * q.report.cpu_utilization().unwrap_or(f64::NAN),
        q.report.cores
    );

    let after = evaluate(&model, Some(&reference), &eval_set, 2, &mut prog)?;
    eprintln!(
        "\n{} W{} g{}: ppl {:.4} (fp {:.4}), KL {:.5} nats/token",
        a.quant.method,
        a.quant.bits,
        a.quant.group,
        after.perplexity,
        base.perplexity,
        after.kl.unwrap_or(f64::NAN)
    );

    let mut readback = None;
    if let Some(out) = &a.out {
        write_gptq(&model, &q, Some(&tk), out)?;
        let mut back = reference.clone();
        let n = load_gptq_into(&mut back, out)?;
        let probe = &eval_set[..1];
        let e1 = evaluate(&model, None, probe, 1, &mut |_, _| {})?;
        let e2 = evaluate(&back, None, probe, 1, &mut |_, _| {})?;
        eprintln!(
            "checkpoint {out:?}: {n} packed linears read back; NLL on one eval window {:.6} (in memory) vs {:.6} (from checkpoint)",
            e1.nll, e2.nll
        );
        readback = Some((e1.nll, e2.nll));
    }

    let line = serde_json::json!({
        "model": a.model, "method": a.quant.method.name(), "bits": a.quant.bits, "group": a.quant.group,
        "symmetric": a.quant.symmetric, "gar": a.quant.gar, "seed": a.seed, "calib_windows": calib_idx, "window_len": a.window_len,
        "eval_windows": [pool, all.len()], "ppl_fp": base.perplexity, "ppl": after.perplexity,
        "kl": after.kl, "quant_seconds": quant_s, "importance_seconds": q.report.importance_seconds, "true_sequential": !a.one_forward,
        "cpu_seconds": q.report.cpu_seconds, "cores": q.report.cores, "cpu_utilization": q.report.cpu_utilization(),
        "eval_tokens": after.tokens, "readback_nll": readback,
    });
    Ok(emit(&line, a.json.as_deref())?)
}
