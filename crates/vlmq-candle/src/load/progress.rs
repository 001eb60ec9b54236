//! Counted progress of a load: bytes of the model's weight files read so
//! far, out of their total, reported to a callback that may cancel.

use std::path::Path;

use vlmq::{Error, Result};

/// Sees `(done, total)` bytes after each tensor read; an error (e.g.
/// [`Error::Cancelled`]) stops the load.
pub(crate) type LoadTick<'a> = &'a mut dyn FnMut(u64, u64) -> Result<()>;

/// A tick that ignores the counts (the loaders without a caller watching).
pub(crate) fn ignore(_: u64, _: u64) -> Result<()> {
    Ok(())
}

/// The summed sizes of `files` (the total a load counts towards).
pub(crate) fn total_bytes<'a>(files: impl IntoIterator<Item = &'a Path>) -> Result<u64> {
    let mut total = 0u64;
    for f in files {
        let len = std::fs::metadata(f).map_err(|e| Error::io(f, e))?.len();
        total = total.saturating_add(len);
    }
    Ok(total)
}
