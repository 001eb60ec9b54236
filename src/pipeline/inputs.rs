//! Statistics of the full-precision inputs of every quantizable linear, for
//! analysis: how many directions they span, or how large a quantized layer's
//! output error is on one kind of token.

use ndarray::{Array1, ArrayView2};

use crate::backend::{LinearInfo, QuantizableModel, TokenInfo};
use crate::error::{Error, Result};
use crate::hessian::{HessianAccumulator, LayerStatistics};

/// The input statistics of one group of linears that share their input.
#[derive(Debug, Clone)]
pub struct GroupStatistics {
    /// Block index.
    pub block: usize,
    /// The linears of the group, in the model's true-sequential order.
    pub layers: Vec<LinearInfo>,
    /// Statistics of the group's input rows, weighted as asked; `None` when no
    /// token of this block had positive weight (e.g. text tokens in a vision
    /// encoder block).
    pub stats: Option<LayerStatistics>,
}

/// Runs `samples` through the unquantized `model` block by block and returns
/// the statistics ([`LayerStatistics`], accumulated in `f64`) of every linear
/// group's input rows, in block and group order.
///
/// `weight` gives each token's weight from its [`TokenInfo`] at that block
/// (`None`: all ones); padding tokens always get 0. A 0/1 mask per modality
/// gives one modality's Hessian, so
/// `hessian_objective(W, Q, text.hessian)` is the layer's mean output error on
/// the text tokens alone. Samples run one after another, so the result does not
/// depend on the thread count.
pub fn input_statistics<M: QuantizableModel>(
    model: &M,
    samples: &[M::Sample],
    weight: &dyn Fn(&TokenInfo) -> Option<Array1<f32>>,
) -> Result<Vec<GroupStatistics>> {
    let mut hidden = samples
        .iter()
        .map(|s| model.embed(s))
        .collect::<Result<Vec<_>>>()?;
    let mut out = Vec::new();
    for block in 0..model.num_blocks() {
        let groups = model.linear_groups(block);
        let mut accumulators: Vec<HessianAccumulator<f64>> = groups
            .iter()
            .map(|g| HessianAccumulator::new(g.first().map_or(0, |l| l.in_features)))
            .collect();
        for (h, sample) in hidden.iter_mut().zip(samples) {
            let info = model.token_info(block, sample);
            let mut alpha = weight(&info).unwrap_or_else(|| Array1::ones(info.len()));
            for (a, &valid) in alpha.iter_mut().zip(info.valid()) {
                if !valid {
                    *a = 0.0;
                }
            }
            let mut failure = None;
            let mut sink = |layer: &str, rows: ArrayView2<'_, f32>| {
                let group = groups
                    .iter()
                    .position(|g| g.first().is_some_and(|l| l.name == layer));
                if let Some(g) = group {
                    if let Err(e) = accumulators[g].add(rows, Some(alpha.view())) {
                        failure.get_or_insert(e);
                    }
                }
            };
            *h = model.block_forward(block, h, sample, Some(&mut sink))?;
            if let Some(e) = failure {
                return Err(e);
            }
        }
        for (layers, acc) in groups.into_iter().zip(&accumulators) {
            let stats = match acc.finish() {
                Ok(stats) => Some(stats),
                Err(Error::Empty { .. }) => None,
                Err(e) => return Err(e),
            };
            out.push(GroupStatistics {
                block,
                layers,
                stats,
            });
        }
    }
    Ok(out)
}
