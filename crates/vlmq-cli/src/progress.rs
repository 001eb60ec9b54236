//! Progress bars (one per stage, with rate and ETA: loading in bytes, the
//! other stages in their units) and Ctrl-C.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use indicatif::{ProgressBar, ProgressStyle};
use vlmq_candle::{Event, Stage};

/// A bar of `total` units named `stage`.
pub fn bar(stage: &str, total: usize) -> ProgressBar {
    counted_bar(stage, total, "{pos}/{len} {per_sec}")
}

/// A bar of `total` bytes named `stage`.
fn byte_bar(stage: &str, total: usize) -> ProgressBar {
    counted_bar(stage, total, "{bytes}/{total_bytes} {bytes_per_sec}")
}

/// A bar named `stage` whose counts and rate are shown by `counts`.
fn counted_bar(stage: &str, total: usize, counts: &str) -> ProgressBar {
    let pb = ProgressBar::new(total as u64);
    let template = format!("{{prefix:>10}} [{{bar:30}}] {counts} ETA {{eta}} {{wide_msg}}");
    pb.set_style(
        ProgressStyle::with_template(&template)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_prefix(stage.to_string());
    pb
}

/// Whether Ctrl-C was pressed; installs the handler once.
pub fn interrupt_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    // A second handler cannot be installed; the run then only stops on a
    // second, default-handled Ctrl-C, which is acceptable.
    let _ = ctrlc::set_handler(move || f.store(true, Ordering::SeqCst));
    flag
}

/// Shows the events of a run as one bar per stage; breaks on Ctrl-C or
/// after `stop_after` quantized layers.
pub struct EventBars {
    current: Option<(Stage, ProgressBar)>,
    interrupted: Arc<AtomicBool>,
    stop_after: Option<usize>,
}

impl EventBars {
    /// Bars that stop the run when `interrupted` is set.
    pub fn new(interrupted: Arc<AtomicBool>, stop_after: Option<usize>) -> Self {
        EventBars {
            current: None,
            interrupted,
            stop_after,
        }
    }

    /// Shows one event; `Break` cancels the run.
    pub fn on_event(&mut self, e: &Event) -> ControlFlow<()> {
        if self.current.as_ref().is_none_or(|(s, _)| *s != e.stage) {
            self.finish();
            let pb = match e.stage {
                Stage::Load => byte_bar(e.stage.name(), e.total),
                _ => bar(e.stage.name(), e.total),
            };
            self.current = Some((e.stage, pb));
        }
        if let Some((_, pb)) = &self.current {
            pb.set_length(e.total as u64);
            pb.set_position(e.done as u64);
            pb.set_message(e.item.clone());
        }
        let stop = self.interrupted.load(Ordering::SeqCst)
            || (e.stage == Stage::Quantize && self.stop_after.is_some_and(|n| e.done >= n));
        if stop {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }

    /// Ends the current bar.
    pub fn finish(&mut self) {
        if let Some((_, pb)) = self.current.take() {
            pb.finish();
        }
    }
}
