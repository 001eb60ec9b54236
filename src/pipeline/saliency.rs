//! Per-token saliency maps, and the block-local source that computes them
//! block by block (the task-loss source is in `task_loss`).

use std::collections::HashMap;

use ndarray::{Array1, Array2, ArrayView1, ArrayView2};
use rayon::prelude::*;

use super::context::in_block;
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
    pub(crate) fn append(&mut self, later: SaliencyMaps) {
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

    /// Maps of every block: `groups[block][group][sample]` and
    /// `blocks[block][sample]`.
    pub(crate) fn from_parts(
        groups: Vec<Vec<Vec<Option<Array1<f32>>>>>,
        blocks: Vec<Vec<Option<Array1<f32>>>>,
    ) -> Self {
        SaliencyMaps { groups, blocks }
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
