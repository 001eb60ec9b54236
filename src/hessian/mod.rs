//! Streaming accumulation of the (importance-weighted) layer Hessian and of
//! GPTAQ's asymmetric cross term.

mod accumulate;
mod stats;

pub use accumulate::HessianAccumulator;
pub use stats::LayerStatistics;

/// The element types a [`HessianAccumulator`] can hold (`f32`, `f64`).
pub use crate::linalg::Scalar;
