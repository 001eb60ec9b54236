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
//! Another crate implements [`QuantizableModel`] for its own tensors (enough
//! for RTN, GPTQ and GPTAQ) and, for VLMQ's gradient-driven importance,
//! [`GradientModel`]; the only `vlmq` types it touches are the small ones in
//! this module and [`ndarray`] views for the rows (`tokens x features`) it shows.

mod stage;
mod token;

pub use stage::{StageCarry, StageOutput};
pub use token::{Modality, TokenInfo};

use ndarray::{Array2, ArrayView2};

use crate::error::Result;

/// Maps a linear's name and weight to a perturbed copy (block-local importance).
pub type WeightPerturbation<'a> =
    dyn Fn(&str, ArrayView2<'_, f32>) -> Result<Array2<f32>> + Sync + 'a;

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

/// A model `vlmq` can quantize block by block: everything RTN, GPTQ and
/// GPTAQ need (forward with input capture, weights, token info).
///
/// Methods take `&self` (except weight replacement) and must be safe to call
/// from several threads at once for different samples; the pipeline
/// parallelizes over samples and merges in a fixed order, so results do not
/// depend on the thread count as long as each call is deterministic.
///
/// VLMQ's gradient-driven importance needs more: implement
/// [`GradientModel`] too and return `Some(self)` from
/// [`gradients`](Self::gradients).
///
/// # Example
///
/// A model of one block with one linear `y = x W^T`, quantized with GPTQ:
///
/// ```
/// use vlmq::ndarray::{array, Array2, ArrayView2};
/// use vlmq::{
///     quantize_model, Bits, GptqConfig, LinearInfo, Modality, PipelineConfig, QuantMethod,
///     QuantScheme, QuantizableModel, Result, RowSink, TokenInfo,
/// };
///
/// struct OneLinear {
///     weight: Array2<f32>,
/// }
///
/// impl QuantizableModel for OneLinear {
///     type Sample = Array2<f32>; // tokens x 4 features
///     type Hidden = Array2<f32>;
///
///     fn num_blocks(&self) -> usize {
///         1
///     }
///     fn linear_groups(&self, _block: usize) -> Vec<Vec<LinearInfo>> {
///         vec![vec![LinearInfo::new("proj", 4, 2)]]
///     }
///     fn token_info(&self, _block: usize, sample: &Array2<f32>) -> TokenInfo {
///         TokenInfo::uniform(Modality::Text, sample.nrows())
///     }
///     fn embed(&self, sample: &Array2<f32>) -> Result<Array2<f32>> {
///         Ok(sample.clone())
///     }
///     fn block_forward(
///         &self,
///         _block: usize,
///         input: &Array2<f32>,
///         _sample: &Array2<f32>,
///         sink: Option<&mut dyn RowSink>,
///     ) -> Result<Array2<f32>> {
///         if let Some(sink) = sink {
///             sink.rows("proj", input.view()); // show the linear's input rows
///         }
///         Ok(input.dot(&self.weight.t()))
///     }
///     fn linear_weight(&self, _block: usize, _layer: &str) -> Result<Array2<f32>> {
///         Ok(self.weight.clone())
///     }
///     fn set_linear_weight(
///         &mut self,
///         _block: usize,
///         _layer: &str,
///         weight: ArrayView2<'_, f32>,
///     ) -> Result<()> {
///         self.weight.assign(&weight);
///         Ok(())
///     }
/// }
///
/// # fn main() -> Result<()> {
/// let mut model = OneLinear {
///     weight: array![[0.3, -0.7, 0.1, 0.9], [-0.2, 0.5, 0.8, -0.4]],
/// };
/// let samples: Vec<Array2<f32>> = (0..4)
///     .map(|s| Array2::from_shape_fn((6, 4), |(t, f)| ((s * 7 + t * 3 + f) % 5) as f32 - 2.0))
///     .collect();
/// let solver = GptqConfig::new(QuantScheme::new(Bits::new(3)?));
/// let cfg = PipelineConfig::new(QuantMethod::Gptq, solver);
/// let result = quantize_model(&mut model, &samples, &cfg, |_| {})?;
/// assert_eq!(result.report.layers.len(), 1);
/// // The model now holds the dequantized weight: at most 2^3 levels per row.
/// assert_eq!(model.weight, result.weights[&(0, "proj".to_string())].dequantize());
/// # Ok(())
/// # }
/// ```
pub trait QuantizableModel: Sync {
    /// One calibration sample (token ids, pixels, targets: whatever the model needs).
    type Sample: Sync;
    /// The hidden state passed between blocks for one sample.
    type Hidden: Send + Sync + Clone;

    /// Number of blocks.
    fn num_blocks(&self) -> usize;

    /// A human-readable block name (e.g. `"lm.2"`), used in reports, errors,
    /// layer overrides and block selection by prefix.
    fn block_name(&self, block: usize) -> String {
        format!("block.{block}")
    }

    /// The block's quantizable linears in true-sequential groups; the linears
    /// of one group share the same input, and the pipeline quantizes group
    /// `k` before it captures the input of group `k + 1`.
    fn linear_groups(&self, block: usize) -> Vec<Vec<LinearInfo>>;

    /// Modality and validity of each token (row) at the block's input, for one sample.
    fn token_info(&self, block: usize, sample: &Self::Sample) -> TokenInfo;

    /// The first block's input for a sample.
    fn embed(&self, sample: &Self::Sample) -> Result<Self::Hidden>;

    /// Runs one block forward; calls `sink` with every quantizable linear's
    /// input rows (`tokens x in_features`, tokens in the order of
    /// [`token_info`](Self::token_info)) when given.
    fn block_forward(
        &self,
        block: usize,
        input: &Self::Hidden,
        sample: &Self::Sample,
        sink: Option<&mut dyn RowSink>,
    ) -> Result<Self::Hidden>;

    /// One stage of the block's staged forward, which true-sequential
    /// capture runs instead of one [`block_forward`](Self::block_forward)
    /// per group.
    ///
    /// With `G` groups (from [`linear_groups`](Self::linear_groups)), stage
    /// `k < G` shows group `k`'s input rows to `sink` and returns
    /// [`StageOutput::Carry`]; stage `G` returns [`StageOutput::Output`], the
    /// block's output. Stage `k` reads `carry`, what stage `k - 1` returned
    /// for the same sample (`None` for stage 0), and computes with the
    /// block's weights as they are when it runs: the pipeline quantizes group
    /// `k - 1` between stages `k - 1` and `k`, so the rows of group `k` and
    /// the block's output come from the already quantized earlier groups,
    /// exactly as a full `block_forward` at that moment would give them.
    ///
    /// Contract: the rows each stage shows for its group and the output of
    /// stage `G` are bit for bit those of `block_forward` on the same weights
    /// (the pipeline's true-sequential results do not depend on whether a
    /// backend overrides this method). Like `block_forward`, it must be safe
    /// to call from several threads at once for different samples.
    ///
    /// The default runs `block_forward` for every stage (`G + 1` forwards
    /// per block, what true-sequential capture cost before stages existed);
    /// a backend overrides it to run each part of the block once.
    fn block_stage(
        &self,
        block: usize,
        stage: usize,
        input: &Self::Hidden,
        sample: &Self::Sample,
        carry: Option<StageCarry>,
        sink: &mut dyn RowSink,
    ) -> Result<StageOutput<Self::Hidden>> {
        let _ = carry;
        if stage < self.linear_groups(block).len() {
            self.block_forward(block, input, sample, Some(sink))?;
            Ok(StageOutput::Carry(Box::new(())))
        } else {
            Ok(StageOutput::Output(
                self.block_forward(block, input, sample, None)?,
            ))
        }
    }

    /// The current weight `[out, in]` of a linear.
    fn linear_weight(&self, block: usize, layer: &str) -> Result<Array2<f32>>;

    /// The current weight `[out, in]` of a linear the pipeline is about to
    /// solve and replace with [`set_linear_weight`](Self::set_linear_weight),
    /// when it will not need the original again (no layer objectives, no
    /// full-precision stream). A backend that materializes its blocks on
    /// demand may hand over its own copy and hold none until the new weight
    /// arrives (if the solve fails, the run stops with the error and the
    /// block is not used again); the default copies, as
    /// [`linear_weight`](Self::linear_weight).
    fn take_linear_weight(&mut self, block: usize, layer: &str) -> Result<Array2<f32>> {
        self.linear_weight(block, layer)
    }

    /// Replaces a linear's weight (`[out, in]`), e.g. with its dequantized form.
    fn set_linear_weight(
        &mut self,
        block: usize,
        layer: &str,
        weight: ArrayView2<'_, f32>,
    ) -> Result<()>;

    /// Called by [`quantize_model_streaming`](crate::quantize_model_streaming)
    /// (and so by [`quantize_model`](crate::quantize_model)) once `block` is
    /// final: its layers are solved and written back, the next block's
    /// inputs are computed and the block sink has its results. The pipeline
    /// does not run the block again. A backend that materializes a block's
    /// weights on demand (e.g. from a checkpoint on disk) can release them
    /// here; the default does nothing.
    fn release_block(&mut self, block: usize) -> Result<()> {
        let _ = block;
        Ok(())
    }

    /// Called by a true-sequential run after stage `stage` of `block` ran
    /// on every sample, when the run has no full-precision stream (GPTQ and
    /// VLMQ, not the GPTAQ methods): from then on the pipeline runs only
    /// stages after `stage` of this block, and reads no weight of the input
    /// groups before `stage` again (their codes are already in the run's
    /// results). A backend that materializes its blocks on demand may free
    /// what only stages up to `stage` read, for a streamed Llama block the
    /// projections of group `stage - 1`: when the down projection is
    /// solved, the block's six other projections are gone. The default
    /// keeps everything, as a backend whose model is the run's in-memory
    /// result must.
    fn stage_finished(&mut self, block: usize, stage: usize) -> Result<()> {
        let _ = (block, stage);
        Ok(())
    }

    /// The gradient extension when the backend implements it (return
    /// `Some(self)`); `None` (the default) limits the backend to methods and
    /// importance scorers that need no gradients.
    ///
    /// (This accessor replaces a `where Self: GradientModel` bound, which
    /// the pipeline could not test for at run time.)
    fn gradients(
        &self,
    ) -> Option<&dyn GradientModel<Sample = Self::Sample, Hidden = Self::Hidden>> {
        None
    }
}

/// The gradient extension of a [`QuantizableModel`]: what VLMQ's
/// gradient-driven importance needs (the task loss and its gradient, a
/// block's backward pass, the rows of a gradient), plus the optional
/// block-local importance pass.
///
/// A backend that implements it returns `Some(self)` from
/// [`QuantizableModel::gradients`]:
///
/// ```ignore
/// fn gradients(&self) -> Option<&dyn GradientModel<Sample = Self::Sample, Hidden = Self::Hidden>> {
///     Some(self)
/// }
/// ```
pub trait GradientModel: QuantizableModel {
    /// Task loss of a sample from the last block's output, and its gradient
    /// with respect to that output. `None` when the sample has no targets.
    fn loss_and_grad(
        &self,
        output: &Self::Hidden,
        sample: &Self::Sample,
    ) -> Result<Option<(f32, Self::Hidden)>>;

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

    /// Rows (`tokens x features`) of a gradient with respect to a hidden
    /// state, in the order of [`token_info`](QuantizableModel::token_info)
    /// for the block it enters. Per-block importance factors
    /// (`per_block` in the importance options) score tokens by the norm of
    /// each row of the gradient at the block output. For a block whose input
    /// and output have the same number of rows, that number must be the
    /// block's `token_info` length; the task-loss pass returns an
    /// [`Error::Backend`](crate::Error::Backend) naming `hidden_rows` when it
    /// is not.
    fn hidden_rows(&self, hidden: &Self::Hidden) -> Result<Array2<f32>>;

    /// Block-local perturbation pass (the alternative importance source):
    /// with `perturb` mapping each linear's weight to a perturbed copy (e.g.
    /// rounded to the nearest grid point), backpropagates
    /// `L = 1/2 sum_t ||B~(x)_t - B(x)_t||^2` through the perturbed block only
    /// and calls `sink` with the gradient at each linear's output. The default
    /// returns [`Error::Unsupported`](crate::Error::Unsupported).
    fn block_local_backward(
        &self,
        block: usize,
        input: &Self::Hidden,
        sample: &Self::Sample,
        perturb: &WeightPerturbation<'_>,
        sink: &mut dyn RowSink,
    ) -> Result<()> {
        let _ = (block, input, sample, perturb, sink);
        Err(crate::error::Error::Unsupported {
            what: "the block-local importance source".into(),
            remedy: "implement GradientModel::block_local_backward for this backend, \
                     or use the task-loss source"
                .into(),
        })
    }
}
