//! Where finished blocks go: the per-block completion hook of a run.

use crate::error::Result;
use crate::quant::QuantizedWeight;
use crate::solver::GgufSolution;

/// One block whose layers are final: quantized, saved to the state
/// directory (when there is one) and written back into the model.
#[derive(Debug)]
pub struct FinishedBlock {
    /// Block index.
    pub index: usize,
    /// Block name ([`QuantizableModel::block_name`](crate::QuantizableModel::block_name)).
    pub name: String,
    /// The block's quantized layers in solve order (empty for a block the
    /// run does not quantize).
    pub layers: Vec<(String, QuantizedWeight)>,
    /// The block's layers solved onto a GGUF block type, in solve order
    /// (only in a run with [`PipelineConfig::with_gguf_type`](crate::PipelineConfig::with_gguf_type);
    /// `layers` is then empty).
    pub gguf: Vec<(String, GgufSolution)>,
}

/// Receives every block of a run once it is final, in block order (see
/// [`quantize_model_streaming`](crate::pipeline::quantize_model_streaming)).
///
/// A resumed run hands the blocks restored from the state directory to the
/// sink again, so a sink that writes an output from scratch sees the whole
/// model. An error stops the run and comes back from the driver as is.
pub trait BlockSink {
    /// Takes one finished block.
    fn block_finished(&mut self, block: FinishedBlock) -> Result<()>;
}

impl<F: FnMut(FinishedBlock) -> Result<()>> BlockSink for F {
    fn block_finished(&mut self, block: FinishedBlock) -> Result<()> {
        self(block)
    }
}
