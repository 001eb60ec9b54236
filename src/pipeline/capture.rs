//! Capturing a group's input rows and turning importance into factors.

use ndarray::{concatenate, Array1, Array2, ArrayView1, ArrayView2, Axis};
use rayon::prelude::*;

use super::context::in_block;
use crate::backend::{LinearInfo, QuantizableModel, RowSink, TokenInfo};
use crate::error::{Error, Result};
use crate::importance::{SampleSignals, TokenImportance};

/// Captures the input rows of the named layers while running one block.
struct Capture<'a> {
    names: &'a [String],
    rows: Vec<Option<Array2<f32>>>,
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
            let mut sink = Capture {
                names,
                rows: vec![None; names.len()],
            };
            let out = model
                .block_forward(b, h, s, Some(&mut sink))
                .map_err(in_block(b, block_name, None, Some(i)))?;
            Ok((sink.rows, keep_output.then_some(out)))
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

/// Stacks one layer's captured rows of every sample, checking them.
pub(crate) fn stack_rows<'a>(
    b: usize,
    block_name: &str,
    layer: &LinearInfo,
    caps: impl Iterator<Item = Option<&'a Array2<f32>>>,
    infos: &[TokenInfo],
) -> Result<Array2<f32>> {
    let mut views = Vec::with_capacity(infos.len());
    for (i, (c, info)) in caps.zip(infos).enumerate() {
        let at = in_block(b, block_name, Some(&layer.name), Some(i));
        let c = c.ok_or_else(|| {
            at(Error::Backend {
                block: b,
                layer: Some(layer.name.clone()),
                reason: "block_forward never showed this layer's input rows to the sink".into(),
            })
        })?;
        check_rows(c.view(), layer, info).map_err(in_block(
            b,
            block_name,
            Some(&layer.name),
            Some(i),
        ))?;
        views.push(c.view());
    }
    concatenate(Axis(0), &views).map_err(|e| {
        in_block(b, block_name, Some(&layer.name), None)(Error::Backend {
            block: b,
            layer: Some(layer.name.clone()),
            reason: e.to_string(),
        })
    })
}

/// One sample's rows: `tokens x in_features`, finite, consistent token info.
fn check_rows(c: ArrayView2<'_, f32>, layer: &LinearInfo, info: &TokenInfo) -> Result<()> {
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
    Ok(())
}

/// Concatenated factors of every sample, checked. `saliency(i)` is sample
/// `i`'s per-token squared gradient norms, when there are some. Errors are
/// wrapped in block `b`, the group's first `layer` and the sample.
pub(crate) fn sample_factors<'s>(
    (b, block_name, layer): (usize, &str, &str),
    scorer: &dyn TokenImportance,
    infos: &[TokenInfo],
    saliency: impl Fn(usize) -> Option<ArrayView1<'s, f32>>,
) -> Result<Array1<f32>> {
    let mut all = Vec::new();
    let zeros: Vec<Array1<f32>> = if scorer.needs_gradients() {
        infos.iter().map(|info| Array1::zeros(info.len())).collect()
    } else {
        Vec::new()
    };
    for (i, info) in infos.iter().enumerate() {
        let mut signals = SampleSignals::new(info, i as u64);
        if scorer.needs_gradients() {
            // A sample without targets has no gradient: every token scores 0.
            signals = signals.with_grad_sq_norms(saliency(i).unwrap_or(zeros[i].view()));
        }
        let at = in_block(b, block_name, Some(layer), Some(i));
        let f = match scorer.factors(&signals) {
            Ok(f) if f.len() == info.len() => f,
            Ok(f) => {
                return Err(at(Error::shape(
                    "importance factors (one per token)",
                    &[info.len()],
                    &[f.len()],
                )))
            }
            Err(e) => return Err(at(e)),
        };
        all.extend(f.iter().copied());
    }
    Ok(Array1::from(all))
}
