//! The integer grid: fitting scales and zero points, quantizing values,
//! round-to-nearest (RTN) as the baseline, and the [`QuantizedWeight`] that
//! every solver returns.

pub(crate) mod cell;
pub mod gguf;
pub(crate) mod grid;
mod rtn;
mod weight;

pub use cell::CellGrid;
pub use grid::{GridFit, GridParams};
pub use rtn::quantize_rtn;
pub use weight::QuantizedWeight;
