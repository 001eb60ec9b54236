//! Resident-set tracing for the memory examples: a sampler thread reads
//! `VmRSS` of `/proc/self/status` (Linux) every few milliseconds and keeps
//! the largest value seen since the last mark, so each progress event can
//! say how high memory went during the step that just ended.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// A `/proc/self/status` field (`VmRSS:`, `VmHWM:`) in MB.
pub fn status_mb(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// The sampler: the largest `VmRSS` (kB) since the last [`RssTrace::mark`].
pub struct RssTrace {
    max_kb: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl RssTrace {
    /// Starts sampling every `every`.
    pub fn start(every: Duration) -> Self {
        let max_kb = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (m, s) = (max_kb.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Some(mb) = status_mb("VmRSS:") {
                    m.fetch_max((mb * 1024.0) as u64, Ordering::Relaxed);
                }
                std::thread::sleep(every);
            }
        });
        RssTrace {
            max_kb,
            stop,
            thread: Some(thread),
        }
    }

    /// The largest resident set (MB) sampled since the previous mark, and
    /// the current one; starts a new interval.
    pub fn mark(&self) -> (f64, f64) {
        let now = status_mb("VmRSS:").unwrap_or(f64::NAN);
        let max = self.max_kb.swap(0, Ordering::Relaxed) as f64 / 1024.0;
        (max.max(now), now)
    }
}

impl Drop for RssTrace {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
