//! Backend traits: how `vlmq` sees a model without knowing its tensor type.
//!
//! A model is a sequence of blocks. Each block names its quantizable linear
//! layers in true-sequential groups (layers in one group share one input,
//! e.g. `q/k/v`, then `o`, then `gate/up`, then `down`), runs forward on one
//! calibration sample while showing each linear's input, runs its backward
//! pass (a vector-Jacobian product recomputed from the stored block input)
//! while showing the gradient at each linear's output, and takes quantized
//! weights back. The model end embeds a sample into the first block's input
//! and provides the task loss and its gradient at the last block's output.
//!
//! Another crate implements [`QuantizableModel`] for its own tensors; the
//! only `vlmq` types it touches are the small ones in this module and
//! [`ndarray`] views for the rows (`tokens x features`) it shows.

mod token;

pub use token::{Modality, TokenInfo};

use ndarray::{Array2, ArrayView2};

use crate::error::Result;

/// One quantizable linear layer: `y = x W^T (+ b)` with `W` of shape
/// `[out_features, in_features]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LinearInfo {
    /// Name, unique within its block (e.g. `"attn.q"`).
    pub name: String,
    /// Input features (columns of W).
    pub in_features: usize,
    /// Output features (rows of W).
    pub out_features: usize,
}

impl LinearInfo {
    /// Builds the description of one linear.
    pub fn new(name: impl Into<String>, in_features: usize, out_features: usize) -> Self {
        LinearInfo {
            name: name.into(),
            in_features,
            out_features,
        }
    }
}

/// Receives the rows a block shows while it runs: a linear's input during
/// forward, or the gradient at a linear's output during backward. Rows are
/// tokens of the current sample, in the order of [`QuantizableModel::token_info`].
pub trait RowSink {
    /// Called once per linear per sample. `rows` is `tokens x features`.
    fn rows(&mut self, layer: &str, rows: ArrayView2<'_, f32>);
}

impl<F: FnMut(&str, ArrayView2<'_, f32>)> RowSink for F {
    fn rows(&mut self, layer: &str, rows: ArrayView2<'_, f32>) {
        self(layer, rows)
    }
}

/// A model `vlmq` can quantize block by block.
///
/// Methods take `&self` (except weight replacement) and must be safe to call
/// from several threads at once for different samples; the pipeline
/// parallelizes over samples and merges in a fixed order, so results do not
/// depend on the thread count as long as each call is deterministic.
pub trait QuantizableModel: Sync {
    /// One calibration sample (token ids, pixels, targets: whatever the model needs).
    type Sample: Sync;
    /// The hidden state passed between blocks for one sample.
    type Hidden: Send + Sync + Clone;

    /// Number of blocks.
    fn num_blocks(&self) -> usize;

    /// A human-readable block name (e.g. `"lm.2"`), used in reports and errors.
    fn block_name(&self, block: usize) -> String {
        format!("block.{block}")
    }

    /// The block's quantizable linears in true-sequential groups; the linears
    /// of one group share the same input.
    fn linear_groups(&self, block: usize) -> Vec<Vec<LinearInfo>>;

    /// Modality and validity of each token (row) at the block's input, for one sample.
    fn token_info(&self, block: usize, sample: &Self::Sample) -> TokenInfo;

    /// The first block's input for a sample.
    fn embed(&self, sample: &Self::Sample) -> Result<Self::Hidden>;

    /// Runs one block forward; calls `sink` with every quantizable linear's
    /// input rows (`tokens x in_features`) when given.
    fn block_forward(
        &self,
        block: usize,
        input: &Self::Hidden,
        sample: &Self::Sample,
        sink: Option<&mut dyn RowSink>,
    ) -> Result<Self::Hidden>;

    /// Backward pass of one block: given the block input and the gradient of
    /// the loss at the block output, returns the gradient at the block input.
    /// Calls `sink` with the gradient at every quantizable linear's output
    /// (`tokens x out_features`) when given. Implementations recompute the
    /// block's forward from `input`, so only one block's internals live at once.
    fn block_backward(
        &self,
        block: usize,
        input: &Self::Hidden,
        sample: &Self::Sample,
        grad_output: &Self::Hidden,
        sink: Option<&mut dyn RowSink>,
    ) -> Result<Self::Hidden>;

    /// The rows (`tokens x features`) of a hidden state or of a gradient with
    /// respect to one, in the order of [`token_info`](Self::token_info) for
    /// the block it enters.
    fn hidden_rows(&self, hidden: &Self::Hidden) -> Array2<f32>;

    /// Task loss of a sample from the last block's output, and its gradient
    /// with respect to that output. `None` when the sample has no targets.
    fn loss_and_grad(
        &self,
        output: &Self::Hidden,
        sample: &Self::Sample,
    ) -> Result<Option<(f32, Self::Hidden)>>;

    /// The current weight `[out, in]` of a linear.
    fn linear_weight(&self, block: usize, layer: &str) -> Result<Array2<f32>>;

    /// Replaces a linear's weight (`[out, in]`), e.g. with its dequantized form.
    fn set_linear_weight(
        &mut self,
        block: usize,
        layer: &str,
        weight: ArrayView2<'_, f32>,
    ) -> Result<()>;
}
