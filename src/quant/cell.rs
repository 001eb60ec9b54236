//! What the column walk needs from a grid, so one walk serves GPTQ's
//! integer grid and the GGUF block formats alike.

use super::grid::{GridFit, GridParams};

/// One output row's grid over one group of columns: which code a value
/// gets and which value a code stands for.
pub trait CellGrid: Copy + Send + Sync {
    /// The code of `w` (clamped to `0..=max_code`).
    fn code(&self, w: f32, max_code: u32) -> u8;
    /// The value `code` decodes to.
    fn value(&self, code: u8) -> f32;
}

/// Fits one output row's grids over a span of consecutive columns (one
/// group for GPTQ's grid, a whole super-block of groups for the GGUF
/// K-quants, whose group scales are quantized together).
pub(crate) trait RowFit: Sync {
    /// The grid of one group.
    type Grid: CellGrid;
    /// The largest code.
    fn max_code(&self) -> u32;
    /// A grid to fill arrays with before fitting.
    fn placeholder(&self) -> Self::Grid;
    /// Fits `out.len()` consecutive groups to `values` (the span's columns,
    /// as they stand when it is fitted); `importance` holds one
    /// non-negative weight per column (the Hessian diagonal).
    fn fit_span(&self, values: &[f32], importance: &[f32], out: &mut [Self::Grid]);
}

impl CellGrid for GridParams {
    #[inline]
    fn code(&self, w: f32, max_code: u32) -> u8 {
        GridParams::code(self, w, max_code)
    }

    #[inline]
    fn value(&self, code: u8) -> f32 {
        GridParams::value(self, code)
    }
}

impl RowFit for GridFit {
    type Grid = GridParams;

    fn max_code(&self) -> u32 {
        GridFit::max_code(self)
    }

    fn placeholder(&self) -> GridParams {
        GridParams {
            scale: 1.0,
            zero: 0,
        }
    }

    /// GPTQ's grid spans one group: `out` has one element, fitted without
    /// importance weights (as the reference does).
    fn fit_span(&self, values: &[f32], _importance: &[f32], out: &mut [GridParams]) {
        let fitted = self.fit(values);
        out.fill(fitted);
    }
}
