//! Test-only pause points for the kill tests (issue 25): a run can be made
//! to stop at a named point so that a parent process kills it there with
//! SIGKILL, deterministically.
//!
//! The environment variable `VLMQ_TEST_KILL_AT=<point>:<n>` (for tests
//! only; never set it in production) makes the process pause the `n`-th
//! time (from 1) it reaches `<point>`: it prints one line
//! `vlmq test kill point <point>:<n> reached` to stderr and sleeps,
//! waiting for its parent's SIGKILL; if none comes within a minute it
//! aborts, so a forgotten variable never hangs a process for ever. Without
//! the variable (or with a value that does not parse) every point is a
//! no-op costing one load of a cached value.
//!
//! The points, each reached on the calling thread outside any parallel
//! section (so `n` counts the same events in every run):
//!
//! | point | where |
//! |---|---|
//! | `importance` | the task-loss importance pass, before each block's backward step |
//! | `capture` | a capture pass, after each chunk of samples went into the accumulators (a chunk holds at least one sample per thread, so with a token or byte bound below that the count follows the thread count) |
//! | `solve` | after each layer's solve, before its quantized weight is installed |
//! | `file-half` | [`write_atomic`](crate::fsutil::write_atomic): half the bytes are in the temporary file (state files: manifest, block tensors, block reports) |
//! | `file-written` | [`write_atomic_with`](crate::fsutil::write_atomic_with): the temporary file is complete and flushed, not yet renamed |
//! | `dir-before`, `dir-half`, `dir-after` | [`write_dir_atomic`](crate::fsutil::write_dir_atomic): before a file of the new directory is created, with half its bytes written, after it is flushed |
//! | `dir-moved-aside` | the old directory is renamed aside, the new one not yet in place |
//! | `dir-swapped` | the new directory is in place, the parent directory not yet flushed |
//! | `dir-removing-old` | the new directory is in place and flushed, the old one not yet removed |

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use crate::fsutil::Step;

/// The name of the environment variable.
const VAR: &str = "VLMQ_TEST_KILL_AT";

/// How long a paused process waits for its SIGKILL before aborting.
const WAIT: Duration = Duration::from_secs(60);

/// The configured point and occurrence, read once.
fn target() -> Option<&'static (String, usize)> {
    static TARGET: OnceLock<Option<(String, usize)>> = OnceLock::new();
    TARGET
        .get_or_init(|| {
            let value = std::env::var(VAR).ok()?;
            let (point, n) = value.rsplit_once(':')?;
            Some((point.to_string(), n.parse().ok()?))
        })
        .as_ref()
}

/// Marks that the run reached `point`; pauses for the kill when this is the
/// configured occurrence.
pub(crate) fn reached(point: &str) {
    static SEEN: AtomicUsize = AtomicUsize::new(0);
    let Some((want, n)) = target() else {
        return;
    };
    if want != point || SEEN.fetch_add(1, Ordering::SeqCst) + 1 != *n {
        return;
    }
    eprintln!("vlmq test kill point {point}:{n} reached");
    std::thread::sleep(WAIT);
    std::process::abort();
}

/// [`reached`] for a step of the directory replacement.
pub(crate) fn dir_step(step: Step<'_>) {
    reached(match step {
        Step::Before(_) => "dir-before",
        Step::During(_) => "dir-half",
        Step::After(_) => "dir-after",
        Step::MovedAside => "dir-moved-aside",
        Step::Swapped => "dir-swapped",
        Step::RemovingOld => "dir-removing-old",
    });
}
