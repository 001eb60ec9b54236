//! The staged block forward: a block's true-sequential groups run as stages
//! in order, so that true-sequential capture costs one forward per block.

use std::any::Any;

/// What a stage leaves for the next one: the backend's own intermediate
/// values (e.g. the attention context, the MLP's hidden activations), opaque
/// to the pipeline. The backend that made it downcasts it.
pub type StageCarry = Box<dyn Any + Send + Sync>;

/// The result of one stage of [`QuantizableModel::block_stage`](super::QuantizableModel::block_stage).
pub enum StageOutput<H> {
    /// A group's stage ran: what the next stage reads.
    Carry(StageCarry),
    /// The stage after the last group ran: the block's output.
    Output(H),
}

impl<H> std::fmt::Debug for StageOutput<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StageOutput::Carry(_) => f.write_str("StageOutput::Carry(..)"),
            StageOutput::Output(_) => f.write_str("StageOutput::Output(..)"),
        }
    }
}
