//! Per-token saliency from one block-wise backward pass.

use std::collections::HashMap;

use ndarray::{Array1, Array2, ArrayView1, ArrayView2};
use rayon::prelude::*;

use super::capture::sample_chunks;
use super::context::{in_block, in_sample};
use crate::backend::{GradientModel, QuantizableModel, RowSink};
use crate::config::QuantScheme;
use crate::error::{Error, Result};
use crate::quant::quantize_rtn;

/// Per-token squared gradient norms of every calibration sample, per block
/// and input group (summed over the gradients at the group's linear
/// outputs) and per block (the gradient at the block output). `None` for
/// samples without targets. Storing `sum g^2` keeps one float per token
/// whatever power a scorer applies later.
#[derive(Debug, Clone, Default)]
pub struct SaliencyMaps {
    groups: Vec<Vec<Vec<Option<Array1<f32>>>>>,
    blocks: Vec<Vec<Option<Array1<f32>>>>,
}

impl SaliencyMaps {
    /// Saliency of `sample` for input group `group` of `block`.
    pub fn group(&self, block: usize, group: usize, sample: usize) -> Option<ArrayView1<'_, f32>> {
        self.groups
            .get(block)?
            .get(group)?
            .get(sample)?
            .as_ref()
            .map(|a| a.view())
    }

    /// Saliency of `sample` at the output of `block`.
    pub fn block(&self, block: usize, sample: usize) -> Option<ArrayView1<'_, f32>> {
        self.blocks
            .get(block)?
            .get(sample)?
            .as_ref()
            .map(|a| a.view())
    }

    /// Appends the samples of `later` (a following chunk of the calibration
    /// set) after this map's samples, block by block and group by group.
    fn append(&mut self, later: SaliencyMaps) {
        if self.groups.is_empty() {
            *self = later;
            return;
        }
        for (mine, theirs) in self.groups.iter_mut().zip(later.groups) {
            for (g, t) in mine.iter_mut().zip(theirs) {
                g.extend(t);
            }
        }
        for (mine, theirs) in self.blocks.iter_mut().zip(later.blocks) {
            mine.extend(theirs);
        }
    }

    /// Maps for one block only (the block-local source computes them block by block).
    pub(crate) fn single_block(
        groups: Vec<Vec<Option<Array1<f32>>>>,
        blocks: Vec<Option<Array1<f32>>>,
    ) -> Self {
        SaliencyMaps {
            groups: vec![groups],
            blocks: vec![blocks],
        }
    }
}

/// Collects one sample's per-group saliency from the gradient rows a block
/// shows, checking each against the layer it names (listed, `tokens x
/// out_features`).
pub(crate) struct GroupSink<'a> {
    layers: &'a HashMap<String, LayerSlot>,
    tokens: usize,
    sums: Vec<Option<Array1<f32>>>,
    error: Option<Error>,
}

/// Where a layer's gradient goes: its input group and its output width.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LayerSlot {
    group: usize,
    out_features: usize,
}

impl<'a> GroupSink<'a> {
    /// A sink for one sample with `tokens` tokens at the block input.
    pub(crate) fn new(
        layers: &'a HashMap<String, LayerSlot>,
        groups: usize,
        tokens: usize,
    ) -> Self {
        GroupSink {
            layers,
            tokens,
            sums: vec![None; groups],
            error: None,
        }
    }

    pub(crate) fn finish(self, block: usize) -> Result<Vec<Option<Array1<f32>>>> {
        match self.error {
            Some(Error::Backend { layer, reason, .. }) => Err(Error::Backend {
                block,
                layer,
                reason,
            }),
            Some(e) => Err(e),
            None => Ok(self.sums),
        }
    }
}

impl RowSink for GroupSink<'_> {
    fn rows(&mut self, layer: &str, rows: ArrayView2<'_, f32>) {
        if self.error.is_some() {
            return;
        }
        let Some(&slot) = self.layers.get(layer) else {
            self.error = Some(Error::Backend {
                block: 0,
                layer: Some(layer.to_string()),
                reason: "the block showed a gradient for a layer it does not list".into(),
            });
            return;
        };
        if rows.dim() != (self.tokens, slot.out_features) {
            self.error = Some(Error::shape(
                format!(
                    "gradient at the output of layer {layer} shown by block_backward \
                     (tokens from token_info x out_features)"
                ),
                &[self.tokens, slot.out_features],
                rows.shape(),
            ));
            return;
        }
        let sq = rows.map_axis(ndarray::Axis(1), |r| r.iter().map(|v| v * v).sum::<f32>());
        match &mut self.sums[slot.group] {
            Some(acc) => *acc += &sq,
            entry => *entry = Some(sq),
        }
    }
}

/// Layer name -> input group and output width, for a block.
pub(crate) fn group_index<M: QuantizableModel + ?Sized>(
    model: &M,
    block: usize,
) -> HashMap<String, LayerSlot> {
    model
        .linear_groups(block)
        .iter()
        .enumerate()
        .flat_map(|(group, layers)| {
            layers.iter().map(move |l| {
                (
                    l.name.clone(),
                    LayerSlot {
                        group,
                        out_features: l.out_features,
                    },
                )
            })
        })
        .collect()
}

/// Checks that a gradient returned by the backend has the shape (rows of
/// [`GradientModel::hidden_rows`]) of the value it is the gradient of.
fn check_gradient<M: GradientModel + ?Sized>(
    model: &M,
    what: &str,
    grad: &M::Hidden,
    value: &M::Hidden,
) -> Result<()> {
    let g = model.hidden_rows(grad)?.dim();
    let v = model.hidden_rows(value)?.dim();
    if g != v {
        return Err(Error::shape(
            format!("{what} (rows of the value it is the gradient of)"),
            &[v.0, v.1],
            &[g.0, g.1],
        ));
    }
    Ok(())
}

/// Checks the rows of the gradient at a block's output (`out_rows`, the
/// length of its per-block factors) against the `tokens` of the block's
/// linears. They may differ only in a block that changes its token count (a
/// projector appending text or dropping the class token), where the
/// per-block factors fall back to the group factors; in a block whose input
/// has as many rows as its output, a difference means
/// [`GradientModel::hidden_rows`] disagrees with
/// [`token_info`](QuantizableModel::token_info), and per-block importance
/// would silently use the per-layer factors.
fn check_block_rows<M: GradientModel + ?Sized>(
    model: &M,
    block: usize,
    input: &M::Hidden,
    out_rows: usize,
    tokens: usize,
) -> Result<()> {
    if out_rows == tokens {
        return Ok(());
    }
    let in_rows = model.hidden_rows(input)?.nrows();
    if in_rows != out_rows {
        return Ok(());
    }
    Err(Error::Backend {
        block,
        layer: None,
        reason: format!(
            "hidden_rows gives {out_rows} rows for both the block's input and the gradient at \
             its output, but token_info counts {tokens} tokens for the block's linears; \
             per-block importance factors would not line up with the block's rows"
        ),
    })
}

fn row_saliency<M: GradientModel + ?Sized>(model: &M, grad: &M::Hidden) -> Result<Array1<f32>> {
    let rows = model.hidden_rows(grad)?;
    Ok(rows.map_axis(ndarray::Axis(1), |r| r.iter().map(|v| v * v).sum::<f32>()))
}

/// One sample's backward result: input gradient, group saliencies, block saliency.
type BackwardOut<H> = (Option<H>, Vec<Option<Array1<f32>>>, Option<Array1<f32>>);

/// The task-loss source: forward through the full-precision model keeping
/// each block's input, then walk the blocks in reverse applying each block's
/// backward (recomputed from its stored input) and recording saliencies.
///
/// Samples go through the whole stack in consecutive chunks of at most
/// `max_tokens` tokens (by the first block's token info; a longer sample
/// alone), so memory holds one hidden state per block for one chunk only.
/// Every sample's result is computed on its own, so the chunking changes no
/// bit of the maps.
pub(crate) fn task_loss_saliency<M: GradientModel + ?Sized>(
    model: &M,
    samples: &[M::Sample],
    max_tokens: usize,
) -> Result<SaliencyMaps> {
    let infos: Vec<_> = samples.iter().map(|s| model.token_info(0, s)).collect();
    let mut maps = SaliencyMaps::default();
    let mut with_targets = false;
    for chunk in sample_chunks(&infos, max_tokens) {
        let (part, any) = chunk_saliency(model, &samples[chunk.clone()], chunk.start)?;
        with_targets |= any;
        maps.append(part);
    }
    if !with_targets {
        return Err(Error::Empty {
            what: "calibration samples with targets (the task-loss importance needs at least one)"
                .into(),
        });
    }
    Ok(maps)
}

/// [`task_loss_saliency`] for one chunk of samples (the first at index
/// `offset` of the calibration set); also says whether any sample had
/// targets.
fn chunk_saliency<M: GradientModel + ?Sized>(
    model: &M,
    samples: &[M::Sample],
    offset: usize,
) -> Result<(SaliencyMaps, bool)> {
    let nb = model.num_blocks();
    let names: Vec<String> = (0..nb).map(|b| model.block_name(b)).collect();
    let mut hidden: Vec<M::Hidden> = samples
        .par_iter()
        .enumerate()
        .map(|(i, s)| model.embed(s).map_err(in_sample(offset + i, "embedding")))
        .collect::<Vec<Result<_>>>()
        .into_iter()
        .collect::<Result<_>>()?; // the first error in sample order
    let mut inputs: Vec<Vec<M::Hidden>> = Vec::with_capacity(nb);
    for (b, name) in names.iter().enumerate() {
        let next: Vec<M::Hidden> = hidden
            .par_iter()
            .zip(samples.par_iter())
            .enumerate()
            .map(|(i, (h, s))| {
                model.block_forward(b, h, s, None).map_err(in_block(
                    b,
                    name,
                    None,
                    Some(offset + i),
                ))
            })
            .collect::<Vec<Result<_>>>()
            .into_iter()
            .collect::<Result<_>>()?; // the first error in sample order
        inputs.push(std::mem::replace(&mut hidden, next));
    }
    let mut grads: Vec<Option<M::Hidden>> = hidden
        .par_iter()
        .zip(samples.par_iter())
        .enumerate()
        .map(|(i, (h, s))| {
            let out = model
                .loss_and_grad(h, s)
                .map_err(in_sample(offset + i, "task loss"))?;
            if let (Some((_, g)), Some(last)) = (&out, nb.checked_sub(1)) {
                check_gradient(model, "gradient returned by loss_and_grad", g, h)
                    .map_err(in_block(last, &names[last], None, Some(offset + i)))?;
            }
            Ok(out.map(|(_, g)| g))
        })
        .collect::<Vec<Result<_>>>()
        .into_iter()
        .collect::<Result<_>>()?; // the first error in sample order
    let any_targets = grads.iter().any(Option::is_some);
    let mut groups = vec![Vec::new(); nb];
    let mut blocks = vec![Vec::new(); nb];
    for b in (0..nb).rev() {
        let Some(block_inputs) = inputs.pop() else {
            break; // one stored input per block: not reached
        };
        let group_of = group_index(model, b);
        let n_groups = model.linear_groups(b).len();
        let name = &names[b];
        let results: Vec<BackwardOut<M::Hidden>> = grads
            .par_iter()
            .zip(block_inputs.par_iter())
            .zip(samples.par_iter())
            .enumerate()
            .map(|(i, ((g, x), s))| {
                let Some(g) = g else {
                    return Ok((None, vec![None; n_groups], None));
                };
                let at = || in_block(b, name, None, Some(offset + i));
                let out_sal = row_saliency(model, g).map_err(at())?;
                let tokens = model.token_info(b, s).len();
                check_block_rows(model, b, x, out_sal.len(), tokens).map_err(at())?;
                let mut sink = GroupSink::new(&group_of, n_groups, tokens);
                let gin = model
                    .block_backward(b, x, s, g, Some(&mut sink))
                    .map_err(at())?;
                // Checked against the block input only: token_info counts
                // the rows of the block's linears, which a block that drops
                // or adds tokens (a projector dropping the class token) does
                // not share with its input.
                check_gradient(model, "input gradient returned by block_backward", &gin, x)
                    .map_err(at())?;
                Ok((Some(gin), sink.finish(b).map_err(at())?, Some(out_sal)))
            })
            .collect::<Vec<Result<_>>>()
            .into_iter()
            .collect::<Result<_>>()?; // the first error in sample order
        let mut per_group = vec![Vec::with_capacity(samples.len()); n_groups];
        let mut per_block = Vec::with_capacity(samples.len());
        grads = Vec::with_capacity(samples.len());
        for (gin, gs, bs) in results {
            grads.push(gin);
            for (k, v) in gs.into_iter().enumerate() {
                per_group[k].push(v);
            }
            per_block.push(bs);
        }
        groups[b] = per_group;
        blocks[b] = per_block;
    }
    Ok((SaliencyMaps { groups, blocks }, any_targets))
}

/// The block-local source for one block: saliency from the gradients of
/// `1/2 ||B~(x) - B(x)||^2` with the block's weights rounded to nearest on
/// each layer's grid (`scheme_for`; `None` keeps a layer unperturbed).
pub(crate) fn block_local_saliency<M: GradientModel + ?Sized>(
    model: &M,
    b: usize,
    block_name: &str,
    inputs: &[M::Hidden],
    samples: &[M::Sample],
    scheme_for: impl Fn(&str) -> Option<QuantScheme> + Sync,
) -> Result<SaliencyMaps> {
    let group_of = group_index(model, b);
    let n_groups = model.linear_groups(b).len();
    let perturb = |layer: &str, w: ArrayView2<'_, f32>| -> Result<Array2<f32>> {
        match scheme_for(layer) {
            Some(scheme) => Ok(quantize_rtn(w, &scheme)?.dequantize()),
            None => Ok(w.to_owned()),
        }
    };
    let per_sample: Vec<Vec<Option<Array1<f32>>>> = inputs
        .par_iter()
        .zip(samples.par_iter())
        .enumerate()
        .map(|(i, (h, s))| {
            let mut sink = GroupSink::new(&group_of, n_groups, model.token_info(b, s).len());
            let at = || in_block(b, block_name, None, Some(i));
            model
                .block_local_backward(b, h, s, &perturb, &mut sink)
                .map_err(at())?;
            sink.finish(b).map_err(at())
        })
        .collect::<Vec<Result<_>>>()
        .into_iter()
        .collect::<Result<_>>()?; // the first error in sample order
    let mut groups = vec![Vec::with_capacity(samples.len()); n_groups];
    for s in per_sample {
        for (k, v) in s.into_iter().enumerate() {
            groups[k].push(v);
        }
    }
    // Per-block factors from the block-local loss: sum over the block's groups.
    let blocks = (0..samples.len())
        .map(|i| {
            groups.iter().filter_map(|g| g[i].clone()).reduce(|a, b| {
                if a.len() == b.len() {
                    a + b
                } else {
                    a
                }
            })
        })
        .collect();
    Ok(SaliencyMaps::single_block(groups, blocks))
}
