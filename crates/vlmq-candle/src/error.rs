//! Mapping candle's errors onto [`vlmq::Error`] (the crate has no error type of its own).

use std::path::Path;

use vlmq::Error;

/// A candle failure while running block `block` (optionally in one layer).
pub(crate) fn backend(block: usize, layer: Option<&str>, e: candle_core::Error) -> Error {
    Error::Backend {
        block,
        layer: layer.map(str::to_string),
        reason: e.to_string(),
    }
}

/// A candle failure outside any block (embedding, head, evaluation).
pub(crate) fn model(e: candle_core::Error) -> Error {
    Error::Backend {
        block: usize::MAX,
        layer: None,
        reason: format!("model end: {e}"),
    }
}

/// A candle failure while reading a checkpoint file.
pub(crate) fn file(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::CorruptCheckpoint {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Extension: attach a block to a candle result.
pub(crate) trait CandleResultExt<T> {
    /// Maps the error with [`backend`].
    fn in_block(self, block: usize) -> vlmq::Result<T>;
    /// Maps the error with [`model`].
    fn at_model(self) -> vlmq::Result<T>;
}

impl<T> CandleResultExt<T> for candle_core::Result<T> {
    fn in_block(self, block: usize) -> vlmq::Result<T> {
        self.map_err(|e| backend(block, None, e))
    }
    fn at_model(self) -> vlmq::Result<T> {
        self.map_err(model)
    }
}
