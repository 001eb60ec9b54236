//! The finished statistics of one layer's calibration inputs.

use ndarray::Array2;

use crate::error::{Error, Result};

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

    /// Fails with [`Error::NonFinite`] when the Hessian or the cross term
    /// holds a NaN or an infinity, which finite inputs produce when their
    /// squares (or weighted squares) overflow f32 (values around 1e19 and
    /// above, or importance factors near `f32::MAX`).
    pub fn check_finite(&self) -> Result<()> {
        let parts = [
            ("Hessian", Some(&self.hessian)),
            ("GPTAQ cross term", self.cross.as_ref()),
        ];
        for (what, m) in parts {
            let Some(m) = m else { continue };
            if let Some(((i, j), _)) = m.indexed_iter().find(|(_, v)| !v.is_finite()) {
                return Err(Error::NonFinite {
                    what: format!("{what} (the inputs' products overflow f32)"),
                    index: vec![i, j],
                });
            }
        }
        Ok(())
    }

    /// Input features.
    pub fn dim(&self) -> usize {
        self.hessian.nrows()
    }

    /// How many input directions the calibration data effectively spans: the
    /// participation ratio `tr(H)^2 / ||H||_F^2 = (sum_i l_i)^2 / sum_i l_i^2`
    /// over the eigenvalues `l_i` of the Hessian. It is `dim()` for isotropic
    /// inputs and 1 when every input is a multiple of one vector; 0 for an all-zero
    /// Hessian. GPTQ's error compensation has the most room when it is small.
    ///
    /// ```
    /// use ndarray::Array2;
    /// use vlmq::hessian::LayerStatistics;
    ///
    /// let isotropic = LayerStatistics::from_hessian(Array2::eye(8));
    /// assert!((isotropic.participation_ratio() - 8.0).abs() < 1e-9);
    /// ```
    pub fn participation_ratio(&self) -> f64 {
        let trace: f64 = self.hessian.diag().iter().map(|&v| f64::from(v)).sum();
        let frobenius2: f64 = self.hessian.iter().map(|&v| f64::from(v).powi(2)).sum();
        if frobenius2 > 0.0 {
            trace * trace / frobenius2
        } else {
            0.0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn participation_ratio_counts_spanned_directions() {
        // Rank one: x x^T.
        let x = [1.0f32, -2.0, 0.5, 3.0];
        let rank_one = Array2::from_shape_fn((4, 4), |(i, j)| x[i] * x[j]);
        let pr = LayerStatistics::from_hessian(rank_one).participation_ratio();
        assert!((pr - 1.0).abs() < 1e-6, "{pr}");
        // Two equal directions out of four.
        let two = Array2::from_diag(&ndarray::arr1(&[3.0f32, 3.0, 0.0, 0.0]));
        let pr = LayerStatistics::from_hessian(two).participation_ratio();
        assert!((pr - 2.0).abs() < 1e-9, "{pr}");
        // Unequal eigenvalues count less than their number: (4 + 1)^2 / 17.
        let skewed = Array2::from_diag(&ndarray::arr1(&[4.0f32, 1.0]));
        let pr = LayerStatistics::from_hessian(skewed).participation_ratio();
        assert!((pr - 25.0 / 17.0).abs() < 1e-9, "{pr}");
        let zero = LayerStatistics::from_hessian(Array2::zeros((3, 3)));
        assert_eq!(zero.participation_ratio(), 0.0);
    }
}
