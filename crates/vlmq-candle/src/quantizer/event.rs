//! Progress of a [`Quantizer`](super::Quantizer) run, as events.

use std::ops::ControlFlow;

use vlmq::{Error, Result};

/// A stage of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Stage {
    /// Reading the model's weights
    /// ([`Quantizer::from_pretrained_with_events`](super::Quantizer::from_pretrained_with_events));
    /// `done` and `total` count bytes of its weight files (safetensors
    /// files, or the GGUF file). With [`Residency::Disk`](crate::Residency)
    /// only the headers and the final norm are read at load time, so the
    /// count jumps to the end when they are in.
    Load,
    /// Tokenizing and preprocessing the calibration samples.
    Calibrate,
    /// The task-loss importance pass (VLMQ); `done` and `total` count
    /// block passes (one block's forward or backward over one chunk of
    /// samples).
    Importance,
    /// Quantizing the layers (capture, importance weighting and solve per
    /// block); `done` and `total` count layers.
    Quantize,
    /// Writing the checkpoint
    /// ([`Quantized::save_with_events`](super::Quantized::save_with_events));
    /// `done` and `total` count the GPTQ checkpoint's tensors, plus one for
    /// writing the encoded files to disk (a GGUF output counts its one file).
    Write,
}

impl Stage {
    /// A short name for displays.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Load => "load",
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

/// Shows `on_event` one event; its `Break` becomes [`Error::Cancelled`].
pub(crate) fn send(
    on_event: &mut impl FnMut(&Event) -> ControlFlow<()>,
    stage: Stage,
    done: usize,
    total: usize,
    item: &str,
) -> Result<()> {
    let e = Event {
        stage,
        done,
        total,
        item: item.to_string(),
    };
    match on_event(&e) {
        ControlFlow::Continue(()) => Ok(()),
        ControlFlow::Break(()) => Err(Error::Cancelled),
    }
}
