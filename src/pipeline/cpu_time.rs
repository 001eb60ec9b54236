//! Process CPU time, read around a run to report how busy the cores were.
//!
//! `getrusage(RUSAGE_SELF)` sums user and system time over every thread of
//! the process (rayon's workers and candle's included), to the microsecond.
//! It is read through the `libc` crate on Unix; elsewhere there is no
//! reading and the report says so (`None`).

/// User + system CPU seconds this process has used so far, summed over all
/// its threads; `None` where the platform gives no reading.
pub(crate) fn process_cpu_seconds() -> Option<f64> {
    imp::process_cpu_seconds()
}

#[cfg(unix)]
mod imp {
    pub(super) fn process_cpu_seconds() -> Option<f64> {
        // SAFETY: `rusage` is a plain C struct for which all-zero bytes are a
        // valid value, and `getrusage` only writes into the one we pass.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: a valid `who` and a pointer to a live, writable `rusage`.
        let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
        if rc != 0 {
            return None;
        }
        let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
        Some(secs(usage.ru_utime) + secs(usage.ru_stime))
    }
}

#[cfg(not(unix))]
mod imp {
    pub(super) fn process_cpu_seconds() -> Option<f64> {
        None
    }
}

/// CPU time and the cores it could have used, between two points of a run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuClock {
    start: Option<f64>,
}

impl CpuClock {
    /// Starts counting from the process's CPU time now.
    pub(crate) fn start() -> Self {
        Self {
            start: process_cpu_seconds(),
        }
    }

    /// CPU seconds used by the process since [`start`](Self::start).
    pub(crate) fn seconds(&self) -> Option<f64> {
        Some(process_cpu_seconds()? - self.start?)
    }
}

/// The cores this process may run on (`std::thread::available_parallelism`,
/// which honours CPU affinity and cgroup quotas on Linux); 1 when unknown.
pub(crate) fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn busy_work_shows_up_as_cpu_time() {
        // Spin until the process clock shows 50 ms of CPU time. On a loaded
        // machine that can take many times as long in wall time, so the
        // only limit is generous; a reading that never advances fails there.
        let clock = CpuClock::start();
        let t = std::time::Instant::now();
        let mut x = 1u64;
        loop {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
            let cpu = clock.seconds().expect("getrusage works on unix");
            if cpu >= 0.05 {
                break;
            }
            assert!(t.elapsed().as_secs_f64() < 60.0, "CPU time stuck at {cpu}");
        }
    }
}
