//! Checked configuration types.
//!
//! Every value here is validated when it is built, so a solver never sees an
//! out-of-range bit width, a zero group or block size, a damping outside
//! (0, 1), or group-aware ordering mixed with act-order or static groups:
//! fields are private, constructors and setters that can fail return an
//! [`Error::InvalidConfig`] naming the field, and getters read the values.
//! Properties that depend on a layer's shape (a layer must have inputs) are
//! checked by [`GroupSize::groups_for`] when the layer is known.

mod grid;
mod solve;

pub use grid::{Bits, GroupSize, MseClip, QuantScheme, ScalePrecision};
pub use solve::{Damping, GptqConfig, GroupFit};

use crate::error::Error;

fn invalid(field: &'static str, value: impl std::fmt::Display, reason: &'static str) -> Error {
    Error::InvalidConfig {
        field,
        value: value.to_string(),
        reason,
    }
}
