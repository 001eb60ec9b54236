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

/// Names `path` in an error about a model's tensors or configuration that
/// does not name a file yet (a missing tensor, a shape against the config,
/// a configuration value the model refuses): the field is the tensor, the
/// configuration field, or what the error describes. Errors that carry a
/// path pass unchanged.
pub(crate) fn in_model_file(path: &Path) -> impl Fn(Error) -> Error + '_ {
    move |e| match e {
        Error::MissingTensor { name } => {
            Error::field(path, name, "is missing (the configuration needs it)")
        }
        Error::InvalidConfig {
            field,
            value,
            reason,
        } => Error::field(path, field, format!("{value}: {reason}")),
        e @ (Error::ShapeMismatch { .. } | Error::DtypeMismatch { .. }) => {
            Error::field(path, "tensors", e)
        }
        e => e,
    }
}
