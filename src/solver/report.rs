//! What a solve returns.

use std::time::Duration;

use ndarray::Array2;

use crate::quant::QuantizedWeight;

/// Facts about one layer's solve.
#[derive(Debug, Clone, PartialEq)]
pub struct SolveReport {
    /// Sum over weights of `(w - q)^2 / U_ii^2`: the objective increase the
    /// column walk predicted on the damped Hessian (free to compute).
    pub obs_loss: f64,
    /// `tr((W - Q) H (W - Q)^T)` on the undamped Hessian, when requested.
    pub objective: Option<f64>,
    /// Relative damping actually used (fraction of the mean diagonal).
    pub damp_percent: f64,
    /// Absolute damping added to the diagonal.
    pub damp_absolute: f64,
    /// Factorization attempts (1 when the first damping worked).
    pub attempts: u32,
    /// Input columns whose Hessian diagonal was 0 (never activated).
    pub dead_columns: usize,
    /// Wall time of the solve.
    pub elapsed: Duration,
}

/// A quantized layer: codes and grid, the dense weight they stand for, and the report.
#[derive(Debug, Clone)]
pub struct LayerSolution {
    /// Codes, scales, zero points and `g_idx`.
    pub weight: QuantizedWeight,
    /// `weight.dequantize()`, kept because every caller needs it.
    pub dequantized: Array2<f32>,
    /// Facts about the solve.
    pub report: SolveReport,
}
