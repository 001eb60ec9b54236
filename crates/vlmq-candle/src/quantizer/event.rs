//! Progress of a [`Quantizer`](super::Quantizer) run, as events.

/// A stage of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Stage {
    /// Tokenizing and preprocessing the calibration samples.
    Calibrate,
    /// The task-loss importance pass (VLMQ); `done` and `total` count
    /// block passes (one block's forward or backward over one chunk of
    /// samples).
    Importance,
    /// Quantizing the layers (capture, importance weighting and solve per
    /// block); `done` and `total` count layers.
    Quantize,
    /// Writing the checkpoint; `done` and `total` count files.
    Write,
}

impl Stage {
    /// A short name for displays.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Calibrate => "calibrate",
            Stage::Importance => "importance",
            Stage::Quantize => "quantize",
            Stage::Write => "write",
        }
    }
}

/// One step of progress: `done` of `total` units of `stage`, and what was
/// just finished (a layer as `block/layer`, a sample number, a file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The stage.
    pub stage: Stage,
    /// Units finished so far.
    pub done: usize,
    /// Units in the stage.
    pub total: usize,
    /// What was just finished.
    pub item: String,
}
