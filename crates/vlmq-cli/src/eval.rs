//! `vlmq eval`: perplexity on a text and KL divergence from a reference.

use std::path::Path;

use vlmq::{Error, Result};
use vlmq_candle::eval::{evaluate, windows, EvalReport};
use vlmq_candle::tokenizers::Tokenizer;
use vlmq_candle::{
    device_from_name, dtype_from_name, encode, is_gptq_dir, load_gptq_dir, load_model_with,
    tokenizer_from_file, LlamaModel, LoadOptions,
};

use crate::args::EvalArgs;
use crate::progress::bar;

/// A model directory, GGUF file or GPTQ checkpoint, with its tokenizer.
fn load(path: &Path, opts: &LoadOptions) -> Result<(LlamaModel, Tokenizer)> {
    if is_gptq_dir(path) {
        let m = load_gptq_dir(path, opts.dtype(), opts.device())?;
        Ok((m, tokenizer_from_file(path.join("tokenizer.json"))?))
    } else if path.extension().is_some_and(|e| e == "gguf") || path.join("config.json").is_file() {
        load_model_with(path, opts)
    } else {
        Err(Error::field(
            path,
            "config.json",
            "is missing: MODEL is a Hugging Face model directory, a GPTQ checkpoint or a .gguf file",
        ))
    }
}

/// Evaluates `m` (and its KL from `reference`) on the first `max` windows
/// (0 = all) of `seq_len` tokens of the text file `data`.
pub fn eval_text(
    m: &LlamaModel,
    reference: Option<&LlamaModel>,
    tk: &Tokenizer,
    data: &Path,
    seq_len: usize,
    max: usize,
) -> Result<EvalReport> {
    let text = std::fs::read_to_string(data).map_err(|e| Error::io(data, e))?;
    let mut w = windows(&encode(tk, &text)?, seq_len);
    if w.is_empty() {
        return Err(Error::field(
            data,
            "text",
            format!("gives no window of {seq_len} tokens"),
        ));
    }
    if max > 0 {
        w.truncate(max);
    }
    let pb = bar("evaluate", w.len());
    let r = evaluate(m, reference, &w, 1, &mut |d, _| pb.set_position(d as u64))?;
    pb.finish();
    Ok(r)
}

/// Prints perplexity, NLL and (when measured) KL on standard output.
pub fn print_report(r: &EvalReport) {
    print!(
        "perplexity {:.4}  nll {:.5} nats/token  tokens {}",
        r.perplexity, r.nll, r.tokens
    );
    if let Some(kl) = r.kl {
        print!("  kl {kl:.6} nats/token");
    }
    println!();
}

/// Runs `vlmq eval`.
pub fn run(a: EvalArgs) -> Result<()> {
    let opts = LoadOptions::default()
        .with_device(device_from_name(&a.device)?)
        .with_dtype(dtype_from_name(&a.dtype)?);
    let (m, tk) = load(&a.model, &opts)?;
    let reference = a.reference.as_deref().map(|r| load(r, &opts)).transpose()?;
    let r = eval_text(
        &m,
        reference.as_ref().map(|(r, _)| r),
        &tk,
        &a.data,
        a.seq_len,
        a.windows,
    )?;
    print_report(&r);
    Ok(())
}
