//! Progress bars (one per stage, with rate and ETA) and Ctrl-C.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use vlmq_candle::{Event, Stage};

/// A spinner for a stage without a count (loading, writing).
pub fn spinner(msg: &str) -> ProgressBar {
    let pb = ProgressBar::new_spinner();
    pb.set_style(
        ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    pb.set_message(msg.to_string());
    pb.enable_steady_tick(Duration::from_millis(200));
    pb
}

/// A bar of `total` units named `stage`.
pub fn bar(stage: &str, total: usize) -> ProgressBar {
    let pb = ProgressBar::new(total as u64);
    pb.set_style(
        ProgressStyle::with_template(
            "{prefix:>10} [{bar:30}] {pos}/{len} {per_sec} ETA {eta} {wide_msg}",
        )
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
            self.current = Some((e.stage, bar(e.stage.name(), e.total)));
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
