//! Progress of a pipeline run, reported through a callback.

use std::ops::Range;
use std::time::Duration;

/// Which part of a run a [`Progress`] event reports.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Stage {
    /// The task-loss importance pass (VLMQ with a gradient scorer), before
    /// the first block is quantized. `done` and `total` count block passes:
    /// one block's forward or backward over one chunk of samples.
    Importance {
        /// Whether the pass just finished was the block's backward.
        backward: bool,
        /// The calibration samples of the chunk (indices into the set).
        samples: Range<usize>,
    },
    /// Quantizing layers; `done` and `total` count layers (the same as
    /// `layers_done` and `layers_total`).
    Quantize,
}

/// One progress event: a step of the importance pass, or a layer quantized.
#[derive(Debug, Clone)]
pub struct Progress {
    /// The stage the step belongs to.
    pub stage: Stage,
    /// Steps of the stage done (1-based after the event).
    pub done: usize,
    /// Steps in the stage.
    pub total: usize,
    /// Layers quantized so far (0 during the importance pass).
    pub layers_done: usize,
    /// Layers to quantize in the run.
    pub layers_total: usize,
    /// Block index of the step.
    pub block: usize,
    /// Block name.
    pub block_name: String,
    /// Layer name (empty for importance steps, which cover a whole block).
    pub layer: String,
    /// Wall time since the run started.
    pub elapsed: Duration,
    /// Estimated time to finish the stage (linear in steps done; for
    /// [`Stage::Quantize`], the rest of the run).
    pub remaining: Duration,
}

impl Progress {
    /// `remaining` for `done` of `total` steps taking `spent` so far.
    pub(crate) fn estimate(spent: Duration, done: usize, total: usize) -> Duration {
        Duration::from_secs_f64(
            spent.as_secs_f64() / done.max(1) as f64 * total.saturating_sub(done) as f64,
        )
    }
}

impl std::fmt::Display for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let times = format!(
            "elapsed {:.1}s  remaining ~{:.1}s",
            self.elapsed.as_secs_f64(),
            self.remaining.as_secs_f64()
        );
        match &self.stage {
            Stage::Importance { backward, samples } => write!(
                f,
                "[importance {}/{}] {} {}, samples {}..{}  {times}",
                self.done,
                self.total,
                self.block_name,
                if *backward { "backward" } else { "forward" },
                samples.start,
                samples.end
            ),
            Stage::Quantize => write!(
                f,
                "[{}/{}] {}/{}  {times}",
                self.done, self.total, self.block_name, self.layer
            ),
        }
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
