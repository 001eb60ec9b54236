//! The finished statistics of one layer's calibration inputs.

use ndarray::Array2;

/// What a solver needs from the calibration data of one layer.
///
/// `hessian = 2 * sum_t alpha_t x~_t x~_t^T / sum_t alpha_t` and, for GPTAQ,
/// `cross = 2 * sum_t alpha_t (x_t - x~_t) x~_t^T / sum_t alpha_t`, where `x~`
/// are inputs on the quantized path and `x` those of the full-precision model.
/// With every `alpha_t = 1` the normalizer is the token count `N`, which is
/// the GPTQ Hessian `(2/N) X X^T`.
#[derive(Debug, Clone)]
pub struct LayerStatistics {
    /// The symmetric Hessian `[n, n]`.
    pub hessian: Array2<f32>,
    /// GPTAQ's cross term `[n, n]`, when paired inputs were accumulated.
    pub cross: Option<Array2<f32>>,
    /// Number of tokens seen (including tokens of weight 0).
    pub tokens: usize,
    /// Sum of the importance weights (the normalizer).
    pub weight_sum: f64,
}

impl LayerStatistics {
    /// Statistics of an explicit Hessian (no cross term), e.g. one computed elsewhere.
    pub fn from_hessian(hessian: Array2<f32>) -> Self {
        LayerStatistics {
            hessian,
            cross: None,
            tokens: 0,
            weight_sum: 0.0,
        }
    }

    /// Input features.
    pub fn dim(&self) -> usize {
        self.hessian.nrows()
    }
}
