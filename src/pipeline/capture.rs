//! Capturing a group's input rows, chunking the samples and turning
//! importance into factors.

use std::ops::Range;

use ndarray::{Array1, Array2, ArrayView1, ArrayView2};
use rayon::prelude::*;

use super::context::in_block;
use crate::backend::{LinearInfo, QuantizableModel, RowSink, TokenInfo};
use crate::error::{Error, Result};
use crate::importance::{SampleSignals, TokenImportance};

/// Captures the input rows of the named layers while running one block.
pub(crate) struct Capture<'a> {
    names: &'a [String],
    rows: Vec<Option<Array2<f32>>>,
}

impl<'a> Capture<'a> {
    /// A sink that keeps the rows of `names` (nothing captured yet).
    pub(crate) fn new(names: &'a [String]) -> Self {
        Capture {
            names,
            rows: vec![None; names.len()],
        }
    }

    /// The captured rows, one slot per name.
    pub(crate) fn into_rows(self) -> Vec<Option<Array2<f32>>> {
        self.rows
    }
}

impl RowSink for Capture<'_> {
    fn rows(&mut self, layer: &str, rows: ArrayView2<'_, f32>) {
        if let Some(i) = self.names.iter().position(|n| n == layer) {
            self.rows[i] = Some(rows.to_owned());
        }
    }
}

/// Per sample, the captured rows of each named layer; and the block outputs
/// when asked for.
pub(crate) type Captured<H> = (Vec<Vec<Option<Array2<f32>>>>, Vec<H>);

/// Runs block `b` on every sample, capturing the input rows of `names`.
pub(crate) fn capture<M: QuantizableModel + ?Sized>(
    model: &M,
    b: usize,
    block_name: &str,
    inputs: &[M::Hidden],
    samples: &[M::Sample],
    names: &[String],
    keep_output: bool,
) -> Result<Captured<M::Hidden>> {
    type PerSample<H> = (Vec<Option<Array2<f32>>>, Option<H>);
    let per_sample: Vec<PerSample<M::Hidden>> = inputs
        .par_iter()
        .zip(samples.par_iter())
        .enumerate()
        .map(|(i, (h, s))| {
            let mut sink = Capture::new(names);
            let out = model
                .block_forward(b, h, s, Some(&mut sink))
                .map_err(in_block(b, block_name, None, Some(i)))?;
            Ok((sink.into_rows(), keep_output.then_some(out)))
        })
        .collect::<Vec<Result<_>>>()
        .into_iter()
        .collect::<Result<_>>()?; // the first error in sample order
    let mut caps = Vec::with_capacity(per_sample.len());
    let mut outs = Vec::with_capacity(per_sample.len());
    for (c, o) in per_sample {
        caps.push(c);
        if let Some(o) = o {
            outs.push(o);
        }
    }
    Ok((caps, outs))
}

/// Consecutive ranges of samples holding at most `max_tokens` tokens each
/// (a longer sample gets a range of its own). Depends only on the token
/// counts, never on the thread count.
pub(crate) fn sample_chunks(infos: &[TokenInfo], max_tokens: usize) -> Vec<Range<usize>> {
    sample_chunks_of_at_least(infos, max_tokens, 1)
}

/// [`sample_chunks`], with every range but the last holding at least
/// `min_samples` samples even past `max_tokens`.
pub(crate) fn sample_chunks_of_at_least(
    infos: &[TokenInfo],
    max_tokens: usize,
    min_samples: usize,
) -> Vec<Range<usize>> {
    let mut chunks = Vec::new();
    let (mut start, mut tokens) = (0, 0);
    for (i, info) in infos.iter().enumerate() {
        if i >= start + min_samples.max(1) && tokens + info.len() > max_tokens {
            chunks.push(start..i);
            (start, tokens) = (i, 0);
        }
        tokens += info.len();
    }
    if start < infos.len() {
        chunks.push(start..infos.len());
    }
    chunks
}

/// The token bound of a capture pass over groups whose inputs are
/// `widths` wide (`streams` copies of each: 2 with a full-precision
/// stream): the configured token bound, lowered so the chunk's captured
/// rows stay within the byte bound, at least one token.
pub(crate) fn capture_token_bound(
    max_tokens: usize,
    max_bytes: usize,
    widths: impl IntoIterator<Item = usize>,
    streams: usize,
) -> usize {
    let per_token: usize = widths.into_iter().sum::<usize>() * streams * size_of::<f32>();
    max_tokens.min(max_bytes / per_token.max(1)).max(1)
}

/// One sample's captured rows of `layer`, checked: present,
/// `tokens x in_features`, finite, with consistent token info.
pub(crate) fn check_rows<'a>(
    b: usize,
    layer: &LinearInfo,
    rows: Option<&'a Array2<f32>>,
    info: &TokenInfo,
) -> Result<ArrayView2<'a, f32>> {
    let c = rows.ok_or_else(|| Error::Backend {
        block: b,
        layer: Some(layer.name.clone()),
        reason: "block_forward never showed this layer's input rows to the sink".into(),
    })?;
    if c.dim() != (info.len(), layer.in_features) {
        return Err(Error::shape(
            "input rows (tokens from token_info x in_features)",
            &[info.len(), layer.in_features],
            c.shape(),
        ));
    }
    if let Some(pos) = c.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite {
            what: "input rows (token, feature)".into(),
            index: vec![pos / c.ncols(), pos % c.ncols()],
        });
    }
    Ok(c.view())
}

/// Sample `i`'s importance factors, checked (one per token). A gradient
/// scorer without saliency for the sample (no targets) sees zeros.
pub(crate) fn sample_factors(
    scorer: &dyn TokenImportance,
    info: &TokenInfo,
    i: usize,
    saliency: Option<ArrayView1<'_, f32>>,
) -> Result<Array1<f32>> {
    let zeros;
    let mut signals = SampleSignals::new(info, i as u64);
    if scorer.needs_gradients() {
        let s = match saliency {
            Some(s) => s,
            None => {
                zeros = Array1::zeros(info.len());
                zeros.view()
            }
        };
        signals = signals.with_grad_sq_norms(s);
    }
    let f = scorer.factors(&signals)?;
    if f.len() != info.len() {
        return Err(Error::shape(
            "importance factors (one per token)",
            &[info.len()],
            &[f.len()],
        ));
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Modality;

    fn infos(lens: &[usize]) -> Vec<TokenInfo> {
        lens.iter()
            .map(|&n| TokenInfo::uniform(Modality::Text, n))
            .collect()
    }

    #[test]
    fn chunks_hold_the_bound_or_the_minimum_of_samples() {
        let i = infos(&[3, 3, 3, 3, 3]);
        assert_eq!(sample_chunks(&i, 7), vec![0..2, 2..4, 4..5]);
        assert_eq!(sample_chunks(&i, 1), vec![0..1, 1..2, 2..3, 3..4, 4..5]);
        // At least three samples a chunk, past the token bound.
        assert_eq!(sample_chunks_of_at_least(&i, 1, 3), vec![0..3, 3..5]);
        assert_eq!(sample_chunks_of_at_least(&i, 7, 3), vec![0..3, 3..5]);
        assert_eq!(sample_chunks_of_at_least(&i, 100, 3), vec![0..5]);
    }

    #[test]
    fn the_byte_bound_lowers_the_token_bound_for_wide_inputs() {
        let mib = 1 << 20;
        // 11008 f32 inputs are 44,032 bytes a token: 128 MiB hold 3,048.
        assert_eq!(capture_token_bound(8192, 128 * mib, [11008], 1), 3048);
        assert_eq!(capture_token_bound(8192, 128 * mib, [11008], 2), 1524);
        // Narrow inputs keep the token bound.
        assert_eq!(capture_token_bound(8192, 128 * mib, [4096], 1), 8192);
        assert_eq!(capture_token_bound(8192, 128 * mib, [576, 576], 1), 8192);
        // Widths add up when one pass captures several groups.
        assert_eq!(
            capture_token_bound(8192, 128 * mib, [4096, 4096, 4096], 1),
            2730
        );
        assert_eq!(capture_token_bound(8192, 1, [64], 1), 1);
    }
}
