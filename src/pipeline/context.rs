//! Where an error happened: wrapping errors in their block, layer and sample.

use crate::error::Error;

/// Wraps an error in [`Error::InBlock`] unless it already carries a block
/// context (the innermost context is the most precise one).
pub(crate) fn in_block<'a>(
    block: usize,
    block_name: &'a str,
    layer: Option<&'a str>,
    sample: Option<usize>,
) -> impl FnOnce(Error) -> Error + 'a {
    move |e| match e {
        e @ Error::InBlock { .. } => e,
        other => Error::InBlock {
            block,
            block_name: block_name.to_string(),
            layer: layer.map(str::to_string),
            sample,
            source: Box::new(other),
        },
    }
}

/// Wraps an error of one sample outside the blocks (embedding, task loss).
pub(crate) fn in_sample(sample: usize, stage: &'static str) -> impl FnOnce(Error) -> Error {
    move |e| match e {
        e @ (Error::InBlock { .. } | Error::InSample { .. }) => e,
        other => Error::InSample {
            sample,
            stage,
            source: Box::new(other),
        },
    }
}
