//! Evaluation: perplexity over token windows and the KL divergence of the
//! next-token distributions from a reference (full-precision) model.

use std::time::Instant;

use candle_core::{DType, Tensor, D};
use vlmq::{Error, Result};

use crate::error::CandleResultExt;
use crate::models::llama::model::LlamaModel;
use crate::models::quantized_llama::QuantizedLlama;

/// A model that gives next-token logits for a batch of token rows: vlmq's
/// [`LlamaModel`], or a GGUF file run through candle's quantized matmul
/// ([`QuantizedLlama`]).
pub trait TokenLogits {
    /// Logits `[B, T, vocab]` of equal-length token rows.
    fn logits(&self, batch: &[&[u32]]) -> Result<Tensor>;
}

impl TokenLogits for LlamaModel {
    fn logits(&self, batch: &[&[u32]]) -> Result<Tensor> {
        LlamaModel::logits(self, batch)
    }
}

impl TokenLogits for QuantizedLlama {
    fn logits(&self, batch: &[&[u32]]) -> Result<Tensor> {
        QuantizedLlama::logits(self, batch)
    }
}

/// Perplexity and (with a reference) KL divergence over a set of windows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalReport {
    /// `exp(mean NLL)` over every predicted token (positions 1.. of each window).
    pub perplexity: f64,
    /// Mean next-token NLL in nats.
    pub nll: f64,
    /// Mean over predicted positions of `KL(reference || model)` in nats, when a reference was given.
    pub kl: Option<f64>,
    /// Predicted tokens counted.
    pub tokens: usize,
    /// Wall time of the evaluation.
    pub seconds: f64,
}

/// Sum of NLL of next tokens and the log-probabilities `[B, T-1, V]` (f32).
fn nll_and_logprobs(model: &dyn TokenLogits, batch: &[&[u32]]) -> Result<(f64, Tensor)> {
    let logits = model.logits(batch)?;
    let run = || -> candle_core::Result<(f64, Tensor)> {
        let (b, t, _) = logits.dims3()?;
        let lp = candle_nn::ops::log_softmax(
            &logits.narrow(1, 0, t - 1)?.to_dtype(DType::F32)?,
            D::Minus1,
        )?;
        let next: Vec<u32> = batch.iter().flat_map(|r| r[1..].iter().copied()).collect();
        let next = Tensor::from_vec(next, (b, t - 1, 1), logits.device())?;
        let nll = lp
            .gather(&next, 2)?
            .to_dtype(DType::F64)?
            .sum_all()?
            .to_scalar::<f64>()?;
        Ok((-nll, lp))
    };
    run().at_model()
}

/// Evaluates `model` on equal-length `windows` (at least 2 tokens each), `batch`
/// windows per forward pass; `progress(done, total)` after each batch.
pub fn evaluate(
    model: &LlamaModel,
    reference: Option<&LlamaModel>,
    windows: &[Vec<u32>],
    batch: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<EvalReport> {
    let reference = reference.map(|r| r as &dyn TokenLogits);
    evaluate_with(model, reference, windows, batch, progress)
}

/// [`evaluate`] for any [`TokenLogits`] model and reference (a GGUF file
/// through candle's quantized matmul against vlmq's f32 model, say).
pub fn evaluate_with(
    model: &dyn TokenLogits,
    reference: Option<&dyn TokenLogits>,
    windows: &[Vec<u32>],
    batch: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<EvalReport> {
    let start = Instant::now();
    if windows.is_empty() {
        return Err(Error::Empty {
            what: "evaluation windows".into(),
        });
    }
    if windows[0].len() < 2 {
        return Err(Error::InvalidConfig {
            field: "window length",
            value: windows[0].len().to_string(),
            reason: "evaluation windows need at least 2 tokens",
        });
    }
    let batch = batch.max(1);
    let (mut nll, mut kl, mut count) = (0.0f64, 0.0f64, 0usize);
    for (i, chunk) in windows.chunks(batch).enumerate() {
        let rows: Vec<&[u32]> = chunk.iter().map(Vec::as_slice).collect();
        let (n, lp) = nll_and_logprobs(model, &rows)?;
        nll += n;
        count += rows.len() * (rows[0].len() - 1);
        if let Some(r) = reference {
            let (_, rlp) = nll_and_logprobs(r, &rows)?;
            let k = (|| -> candle_core::Result<f64> {
                (rlp.exp()? * (&rlp - &lp)?)?
                    .to_dtype(DType::F64)?
                    .sum_all()?
                    .to_scalar::<f64>()
            })()
            .at_model()?;
            kl += k;
        }
        progress(((i + 1) * batch).min(windows.len()), windows.len());
    }
    let mean = nll / count as f64;
    Ok(EvalReport {
        perplexity: mean.exp(),
        nll: mean,
        kl: reference.map(|_| kl / count as f64),
        tokens: count,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Cuts `tokens` into consecutive non-overlapping windows of `len` tokens
/// (the tail shorter than `len` is dropped).
pub fn windows(tokens: &[u32], len: usize) -> Vec<Vec<u32>> {
    if len == 0 {
        return Vec::new();
    }
    tokens.chunks_exact(len).map(<[u32]>::to_vec).collect()
}
