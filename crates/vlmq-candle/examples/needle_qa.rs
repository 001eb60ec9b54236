//! VLMQ's premise on real weights: calibration prompts that are mostly
//! irrelevant context (see `needle/mod.rs` beside this example), the task loss on the
//! answer tokens only. Quantizes with one method and reports, before and
//! after, the held-out answer NLL and exact match, the plain-text
//! perplexity, and the share of the layers' Hessian traces carried by the
//! context tokens with uniform and with the run's weights.
//!
//! ```text
//! cargo run --release -p vlmq-candle --example needle_qa -- --model PATH --text FILE \
//!     --method vlmq --bits 3 --group 128 [--seed 0] [--calib 16] [--eval 64] \
//!     [--context-tokens 320] [--eval-windows 8] [--window-len 256] [--json results.jsonl] \
//!     [--one-forward] [--fp-cache FILE] [--asym]
//! ```
//!
//! Calibration prompts come from the first 80% of the text's sentences with
//! the given seed; held-out prompts from the last 20% with a fixed seed, so
//! every run is scored on the same prompts. Perplexity is measured on the
//! last `--eval-windows` windows of `--window-len` tokens of the text.

mod cli;
mod needle;

use std::path::PathBuf;
use std::time::Instant;

use cli::{emit, Flags, Quant};
use needle::{needle_prompts, score_answers, NeedleOptions, NeedlePrompt, NeedleScore, ProseSplit};
use vlmq::QuantMethod;
use vlmq_candle::candle_core::{DType, Device};
use vlmq_candle::eval::{evaluate, windows};
use vlmq_candle::{encode, load_model};

/// Seed of the held-out prompt set (the same for every run).
const HELD_OUT_SEED: u64 = 0x4E45_4544_4C45;

struct Args {
    model: PathBuf,
    text: PathBuf,
    quant: Quant,
    seed: u64,
    calib: usize,
    eval: usize,
    context_tokens: usize,
    eval_windows: usize,
    window_len: usize,
    json: Option<PathBuf>,
    one_forward: bool,
    fp_cache: Option<PathBuf>,
}

fn parse() -> Result<Args, String> {
    let f = Flags::parse(
        &[
            "--model",
            "--text",
            "--method",
            "--bits",
            "--group",
            "--seed",
            "--calib",
            "--eval",
            "--context-tokens",
            "--eval-windows",
            "--window-len",
            "--json",
            "--fp-cache",
        ],
        &["--asym", "--gar", "--one-forward"],
    )?;
    let a = Args {
        model: f.path("--model").unwrap_or_default(),
        text: f.path("--text").unwrap_or_default(),
        quant: Quant::from_flags(&f, QuantMethod::Vlmq)?,
        seed: f.or("--seed", 0)?,
        calib: f.or("--calib", 16)?,
        eval: f.or("--eval", 64)?,
        context_tokens: f.or("--context-tokens", NeedleOptions::default().context_tokens)?,
        eval_windows: f.or("--eval-windows", 8)?,
        window_len: f.or("--window-len", 256)?,
        json: f.path("--json"),
        one_forward: f.switch("--one-forward"),
        fp_cache: f.path("--fp-cache"),
    };
    if a.model.as_os_str().is_empty() || a.text.as_os_str().is_empty() {
        return Err("--model and --text are required".into());
    }
    Ok(a)
}

/// The full-precision model's answer scores and perplexity, read from
/// `--fp-cache` when it holds them for the same settings (they cost as much
/// as the rest of a run and are the same for every method and seed).
fn full_precision_scores(
    a: &Args,
    reference: &vlmq_candle::LlamaModel,
    held_out: &[NeedlePrompt],
    ppl_set: &[Vec<u32>],
) -> Result<(NeedleScore, f64), Box<dyn std::error::Error>> {
    let key = format!(
        "{:?} eval {} context {} windows {}x{}",
        a.model, a.eval, a.context_tokens, a.eval_windows, a.window_len
    );
    if let Some(path) = &a.fp_cache {
        if let Ok(text) = std::fs::read_to_string(path) {
            let v: serde_json::Value = serde_json::from_str(&text)?;
            if v["key"] == key.as_str() {
                let f = |k: &str| v[k].as_f64().ok_or(format!("{path:?}: no {k}"));
                let score = NeedleScore {
                    answer_nll: f("answer_nll")?,
                    exact_match: f("exact_match")?,
                    prompts: held_out.len(),
                };
                return Ok((score, f("ppl")?));
            }
        }
    }
    let mut prog = |d: usize, n: usize| eprint!("\r  eval {d}/{n}   ");
    let qa = score_answers(reference, held_out, &mut prog)?;
    let ppl = evaluate(reference, None, ppl_set, 2, &mut prog)?.perplexity;
    if let Some(path) = &a.fp_cache {
        let v = serde_json::json!({"key": key, "answer_nll": qa.answer_nll,
            "exact_match": qa.exact_match, "ppl": ppl});
        std::fs::write(path, v.to_string())?;
    }
    Ok((qa, ppl))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a =
        parse().map_err(|e| format!("{e}\nusage: see the doc comment of examples/needle_qa.rs"))?;
    let (mut model, tk) = load_model(&a.model, DType::F32, &Device::Cpu)?;
    let text = std::fs::read_to_string(&a.text)?;
    let opts = NeedleOptions {
        context_tokens: a.context_tokens,
        ..NeedleOptions::default()
    };
    let calib = needle_prompts(&tk, &text, ProseSplit::Calibration, a.calib, a.seed, opts)?;
    let held_out = needle_prompts(&tk, &text, ProseSplit::HeldOut, a.eval, HELD_OUT_SEED, opts)?;
    let mean_len = |p: &[NeedlePrompt]| {
        p.iter().map(|p| p.sample.tokens.len()).sum::<usize>() as f64 / p.len() as f64
    };
    eprintln!(
        "{} calibration prompts (mean {:.0} tokens, seed {}), {} held-out prompts (mean {:.0} tokens); e.g. {:?} -> {:?}",
        calib.len(),
        mean_len(&calib),
        a.seed,
        held_out.len(),
        mean_len(&held_out),
        held_out[0].question,
        held_out[0].answer_text
    );
    let tokens = encode(&tk, &text)?;
    let all = windows(&tokens, a.window_len);
    let ppl_set = &all[all.len().saturating_sub(a.eval_windows)..];

    let reference = model.clone();
    let mut prog = |d: usize, n: usize| eprint!("\r  eval {d}/{n}   ");
    let (qa_fp, ppl_fp) = full_precision_scores(&a, &reference, &held_out, ppl_set)?;
    eprintln!(
        "\nfull precision: answer NLL {:.4}, exact match {:.3}, ppl {:.4}",
        qa_fp.answer_nll, qa_fp.exact_match, ppl_fp
    );

    // The needle samples carry answer-only targets, which the recipe's
    // calibration forms do not: the recipe gives the settings, the samples
    // go to the pipeline directly.
    let recipe = a
        .quant
        .recipe(a.one_forward)
        .check("command line".as_ref())?;
    let cfg = recipe.pipeline();
    let samples: Vec<_> = calib.iter().map(|p| p.sample.clone()).collect();
    let t0 = Instant::now();
    let q = vlmq::quantize_model(&mut model, &samples, cfg, |p| eprint!("\r  {p}      "))?;
    let quant_s = t0.elapsed().as_secs_f64();
    let qa = score_answers(&model, &held_out, &mut prog)?;
    let ppl = evaluate(&model, Some(&reference), ppl_set, 2, &mut prog)?;
    // Context tokens are tagged `Other`: their share is what text and
    // vision (absent here) leave. RTN gathers no statistics: no shares.
    let with_stats: Vec<_> = q.report.layers.iter().filter(|l| l.tokens > 0).collect();
    let share = |after: bool| -> Option<f64> {
        if with_stats.is_empty() {
            return None;
        }
        let sum: f64 = with_stats
            .iter()
            .map(|l| {
                let s = &l.shares;
                if after {
                    1.0 - s.text_after - s.vision_after
                } else {
                    1.0 - s.text_before - s.vision_before
                }
            })
            .sum();
        Some(sum / with_stats.len() as f64)
    };
    let (context_before, context_after) = (share(false), share(true));
    eprintln!(
        "\n{} W{} g{} ({quant_s:.1}s): answer NLL {:.4} (fp {:.4}), exact match {:.3} (fp {:.3}), ppl {:.4} (fp {:.4}), KL {:.4}; context share of the Hessian trace {:?} -> {:?}",
        a.quant.method,
        a.quant.bits,
        a.quant.group,
        qa.answer_nll,
        qa_fp.answer_nll,
        qa.exact_match,
        qa_fp.exact_match,
        ppl.perplexity,
        ppl_fp,
        ppl.kl.unwrap_or(f64::NAN),
        context_before,
        context_after
    );
    let line = serde_json::json!({
        "task": "needle_qa", "model": a.model, "method": a.quant.method.name(), "bits": a.quant.bits,
        "group": a.quant.group, "symmetric": a.quant.symmetric, "seed": a.seed, "calib_prompts": a.calib, "eval_prompts": a.eval,
        "context_tokens": a.context_tokens, "answer_nll_fp": qa_fp.answer_nll,
        "answer_nll": qa.answer_nll, "exact_match_fp": qa_fp.exact_match,
        "exact_match": qa.exact_match, "ppl_fp": ppl_fp, "ppl": ppl.perplexity,
        "kl": ppl.kl, "context_share_before": context_before,
        "context_share_after": context_after, "quant_seconds": quant_s,
        "importance_seconds": q.report.importance_seconds, "true_sequential": !a.one_forward,
    });
    Ok(emit(&line, a.json.as_deref())?)
}
