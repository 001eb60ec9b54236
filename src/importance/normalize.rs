//! Per-sample normalization of raw saliency into importance factors.

use ndarray::{Array1, ArrayView1};

use crate::backend::TokenInfo;
use crate::error::{Error, Result};

/// Turns raw per-token saliency into factors: divide by the mean over the
/// sample's valid tokens (so the average valid token weighs 1), then clamp to
/// `[floor, cap]`; padding gets 0.
///
/// The mean is taken before clamping, so after clamping it is close to but
/// not exactly 1. Where every valid token has saliency 0 (a sample without
/// targets, say), all valid tokens get 1: with no signal the sample counts
/// as in GPTQ.
///
/// The default floor is 0.05 and there is no cap. Why 0.05: with every valid
/// factor at least `floor` and a mean near 1, the weighted Hessian dominates
/// `floor` times the unweighted one (`H_alpha >= ~floor * H`), so weighting
/// can shrink no direction of the Hessian by more than about 20x and no
/// Hessian loses rank because a sample's weight sat on a handful of tokens;
/// yet a redundant token still counts 20x less than an average one, which
/// leaves the informative tokens in charge.
///
/// ```
/// use ndarray::array;
/// use vlmq::importance::Normalization;
/// use vlmq::{Modality, TokenInfo};
///
/// let tokens = TokenInfo::uniform(Modality::Vision, 4).with_valid(vec![true, true, true, false])?;
/// let alpha = Normalization::new(0.1, None)?.apply(array![0.0f32, 1.0, 2.0, 9.0].view(), &tokens)?;
/// assert_eq!(alpha.to_vec(), vec![0.1, 1.0, 2.0, 0.0]);
/// # Ok::<(), vlmq::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Normalization {
    floor: f32,
    cap: Option<f32>,
}

impl Default for Normalization {
    fn default() -> Self {
        Normalization {
            floor: Self::DEFAULT_FLOOR,
            cap: None,
        }
    }
}

impl Normalization {
    /// The default floor (see the type's documentation).
    pub const DEFAULT_FLOOR: f32 = 0.05;

    /// A floor in `[0, 1]` and an optional cap `>= max(1, floor)` (both in
    /// units of the sample's mean saliency).
    pub fn new(floor: f32, cap: Option<f32>) -> Result<Self> {
        if !(floor.is_finite() && (0.0..=1.0).contains(&floor)) {
            return Err(Error::InvalidConfig {
                field: "importance.floor",
                value: floor.to_string(),
                reason: "must be in [0, 1]",
            });
        }
        if let Some(c) = cap {
            if !(c.is_finite() && c >= 1.0) {
                return Err(Error::InvalidConfig {
                    field: "importance.cap",
                    value: c.to_string(),
                    reason: "must be finite and >= 1 (the mean factor)",
                });
            }
        }
        Ok(Normalization { floor, cap })
    }

    /// The floor.
    pub fn floor(&self) -> f32 {
        self.floor
    }

    /// The cap, if any.
    pub fn cap(&self) -> Option<f32> {
        self.cap
    }

    /// Factors from raw saliency `raw` (one value per token, finite and
    /// `>= 0` on valid tokens; values on padding are ignored).
    pub fn apply(&self, raw: ArrayView1<'_, f32>, tokens: &TokenInfo) -> Result<Array1<f32>> {
        super::check_tokens(tokens)?;
        if raw.len() != tokens.len() {
            return Err(Error::shape("raw saliency", &[tokens.len()], &[raw.len()]));
        }
        let mut sum = 0.0f64;
        let mut count = 0usize;
        for (t, (&s, &valid)) in raw.iter().zip(tokens.valid()).enumerate() {
            if !valid {
                continue;
            }
            if !(s.is_finite() && s >= 0.0) {
                return Err(Error::InvalidImportance { token: t, value: s });
            }
            sum += f64::from(s);
            count += 1;
        }
        if count == 0 {
            return Ok(Array1::zeros(raw.len()));
        }
        let mean = sum / count as f64;
        let cap = self.cap.unwrap_or(f32::INFINITY);
        Ok(raw
            .iter()
            .zip(tokens.valid())
            .map(|(&s, &valid)| {
                if !valid {
                    0.0
                } else if mean > 0.0 {
                    ((f64::from(s) / mean) as f32).max(self.floor).min(cap)
                } else {
                    1.0
                }
            })
            .collect())
    }
}
