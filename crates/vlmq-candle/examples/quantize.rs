//! A measured `vlmq quantize` run on a Llama-family checkpoint (HF directory
//! or GGUF file), for the comparison scripts: the same one-call API as the
//! command ([`Quantizer`] with a [`Recipe`]), plus a held-out evaluation
//! (perplexity and KL vs the full-precision model) before and after, an
//! optional checkpoint read back through `PackedLinear`, and one JSON line
//! with the numbers. For everyday use run the command instead
//! (`vlmq quantize MODEL --calib FILE --out DIR [--eval FILE]`); VLMs too go
//! through the command.
//!
//! ```text
//! cargo run --release -p vlmq-candle --example quantize -- --model PATH --calib FILE \
//!     --method gptq --bits 4 --group 128 [--out DIR] [--windows 32] [--window-len 256] \
//!     [--seed 0] [--eval-windows 16] [--asym] [--gar] [--json results.jsonl] [--one-forward]
//! ```
//!
//! Windows: the text is tokenized once and cut into consecutive
//! non-overlapping windows of `--window-len` tokens; the LAST
//! `--eval-windows` windows are the held-out set (the same for every seed);
//! the others go to the quantizer as token samples, of which it draws
//! `--windows` by the seed ([`vlmq::sample_indices`], as the command does).

mod cli;
mod text_windows;

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

use cli::{emit, Flags, Quant};
use vlmq::QuantMethod;
use vlmq_candle::eval::evaluate;
use vlmq_candle::export::load_gptq_into;
use vlmq_candle::{encode, Calibration, LoadedModel, Quantizer, Recipe};

struct Args {
    model: PathBuf,
    calib: PathBuf,
    quant: Quant,
    out: Option<PathBuf>,
    windows: usize,
    window_len: usize,
    seed: u64,
    eval_windows: usize,
    json: Option<PathBuf>,
    one_forward: bool,
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
            "--json",
        ],
        &["--asym", "--gar", "--one-forward"],
    )?;
    let a = Args {
        model: f.path("--model").unwrap_or_default(),
        calib: f.path("--calib").unwrap_or_default(),
        quant: Quant::from_flags(&f, QuantMethod::Gptq)?,
        out: f.path("--out"),
        windows: f.or("--windows", 32)?,
        window_len: f.or("--window-len", 256)?,
        seed: f.or("--seed", 0)?,
        eval_windows: f.or("--eval-windows", 16)?,
        json: f.path("--json"),
        one_forward: f.switch("--one-forward"),
    };
    if a.model.as_os_str().is_empty() || a.calib.as_os_str().is_empty() {
        return Err("--model and --calib are required".into());
    }
    Ok(a)
}

/// The Llama-family model of a loaded or quantized run.
fn llama(m: &LoadedModel) -> Result<&vlmq_candle::LlamaModel, String> {
    match m {
        LoadedModel::Llama(m) => Ok(m),
        other => Err(format!(
            "a {} model: this example evaluates Llama-family models; run `vlmq quantize` for VLMs",
            other.family()
        )),
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    vlmq_candle::prefer_sample_parallelism();
    let a =
        parse().map_err(|e| format!("{e}\nusage: see the doc comment of examples/quantize.rs"))?;
    let recipe = Recipe {
        samples: a.windows,
        seq_len: a.window_len,
        seed: a.seed,
        ..a.quant.recipe(a.one_forward)
    }
    .check("command line".as_ref())?;
    let t0 = Instant::now();
    let q = Quantizer::from_pretrained(&a.model)?;
    let reference = llama(q.model())?.clone();
    eprintln!(
        "loaded {:?} in {:.1}s: {:?}",
        a.model,
        t0.elapsed().as_secs_f64(),
        reference.config()
    );

    let text = std::fs::read_to_string(&a.calib)?;
    let tokens = encode(q.tokenizer(), &text)?;
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

    let mut prog = |d: usize, n: usize| eprint!("\r  eval {d}/{n}   ");
    let base = evaluate(&reference, None, &eval_set, 2, &mut prog)?;
    eprintln!(
        "\nfull precision: ppl {:.4} ({} tokens, {:.1}s)",
        base.perplexity, base.tokens, base.seconds
    );

    let tq = Instant::now();
    let done = q
        .calibrate(Calibration::Tokens(all[..pool].to_vec()), &a.calib)?
        .quantize(&recipe, |e| {
            eprint!(
                "\r  {} {}/{} {}      ",
                e.stage.name(),
                e.done,
                e.total,
                e.item
            );
            ControlFlow::Continue(())
        })?;
    let quant_s = tq.elapsed().as_secs_f64();
    let report = done.report();
    eprintln!(
        "\n{} done in {quant_s:.1}s (importance pass {:.1}s, CPU {:.0}% of {} cores)",
        a.quant.method,
        report.importance_seconds,
        100.0 * report.cpu_utilization().unwrap_or(f64::NAN),
        report.cores
    );

    let model = llama(done.model())?;
    let after = evaluate(model, Some(&reference), &eval_set, 2, &mut prog)?;
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
        done.save(out)?;
        let mut back = reference.clone();
        let n = load_gptq_into(&mut back, out)?;
        let probe = &eval_set[..1];
        let e1 = evaluate(model, None, probe, 1, &mut |_, _| {})?;
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
        "kl": after.kl, "quant_seconds": quant_s, "importance_seconds": report.importance_seconds, "true_sequential": !a.one_forward,
        "cpu_seconds": report.cpu_seconds, "cores": report.cores, "cpu_utilization": report.cpu_utilization(),
        "eval_tokens": after.tokens, "readback_nll": readback,
    });
    Ok(emit(&line, a.json.as_deref())?)
}
