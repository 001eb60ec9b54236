//! Progress of a pipeline run, reported through a callback.

use std::time::Duration;

/// One progress event: a layer has been quantized.
#[derive(Debug, Clone)]
pub struct Progress {
    /// Layers done so far (1-based after the event).
    pub layers_done: usize,
    /// Layers to quantize in the run.
    pub layers_total: usize,
    /// Block index of the layer.
    pub block: usize,
    /// Block name.
    pub block_name: String,
    /// Layer name.
    pub layer: String,
    /// Wall time since the run started.
    pub elapsed: Duration,
    /// Estimated time to finish (linear in layers done).
    pub remaining: Duration,
}

impl std::fmt::Display for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "[{}/{}] {}/{}  elapsed {:.1}s  remaining ~{:.1}s",
            self.layers_done,
            self.layers_total,
            self.block_name,
            self.layer,
            self.elapsed.as_secs_f64(),
            self.remaining.as_secs_f64()
        )
    }
}

/// What a progress callback returns: `()` (the run goes on) or a
/// [`ControlFlow`](std::ops::ControlFlow) whose `Break(())` cancels the run
/// with [`Error::Cancelled`](crate::Error::Cancelled).
///
/// ```
/// use std::ops::ControlFlow;
/// use vlmq::pipeline::ProgressControl;
/// assert!(!().cancels());
/// assert!(ControlFlow::Break(()).cancels());
/// ```
pub trait ProgressControl {
    /// Whether the run must stop now.
    fn cancels(self) -> bool;
}

impl ProgressControl for () {
    fn cancels(self) -> bool {
        false
    }
}

impl ProgressControl for std::ops::ControlFlow<()> {
    fn cancels(self) -> bool {
        self.is_break()
    }
}
