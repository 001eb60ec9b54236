//! Turning raw saliency into per-token importance factors.

use ndarray::{Array1, ArrayView1};

use crate::backend::TokenInfo;
use crate::error::{Error, Result};

/// Produces the importance factor of every token of one calibration sample.
///
/// Factors are finite and `>= 0`, one per token, 0 for padding.
pub trait FactorSource: Send + Sync {
    /// Factors for sample `sample` with token metadata `info` and, when the
    /// source uses gradients, the sample's raw saliency (`None` when the
    /// sample has no targets).
    fn factors(
        &self,
        info: &TokenInfo,
        saliency: Option<ArrayView1<'_, f32>>,
        sample: usize,
    ) -> Result<Array1<f32>>;
}

/// Every valid token weighs 1 (plain GPTQ); padding 0.
#[derive(Debug, Clone, Copy, Default)]
pub struct UniformFactors;

impl FactorSource for UniformFactors {
    fn factors(
        &self,
        info: &TokenInfo,
        _: Option<ArrayView1<'_, f32>>,
        _: usize,
    ) -> Result<Array1<f32>> {
        Ok(info
            .valid
            .iter()
            .map(|&v| if v { 1.0 } else { 0.0 })
            .collect())
    }
}

/// Saliency normalized to mean 1 over the sample's valid tokens, then
/// clamped to `[floor, cap]`; padding gets 0. A sample without saliency (no
/// targets) or with zero total saliency gets uniform factors.
#[derive(Debug, Clone, Copy)]
pub struct SaliencyFactors {
    /// Smallest factor of a valid token.
    pub floor: f32,
    /// Largest factor, if any.
    pub cap: Option<f32>,
}

impl FactorSource for SaliencyFactors {
    fn factors(
        &self,
        info: &TokenInfo,
        saliency: Option<ArrayView1<'_, f32>>,
        _: usize,
    ) -> Result<Array1<f32>> {
        let Some(s) = saliency else {
            return UniformFactors.factors(info, None, 0);
        };
        if s.len() != info.len() {
            return Err(Error::shape("token saliency", &[info.len()], &[s.len()]));
        }
        let valid = info.valid_count();
        let total: f64 = s
            .iter()
            .zip(&info.valid)
            .filter(|(_, &v)| v)
            .map(|(&x, _)| f64::from(x))
            .sum();
        if valid == 0 || !(total > 0.0 && total.is_finite()) {
            return UniformFactors.factors(info, None, 0);
        }
        let mean = total / valid as f64;
        let cap = self.cap.unwrap_or(f32::INFINITY);
        Ok(s.iter()
            .zip(&info.valid)
            .map(|(&x, &v)| {
                if v {
                    ((f64::from(x) / mean) as f32).max(self.floor).min(cap)
                } else {
                    0.0
                }
            })
            .collect())
    }
}
