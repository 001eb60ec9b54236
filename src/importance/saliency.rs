//! Gradient saliency: the crate's default VLMQ scorer.

use ndarray::{Array1, ArrayView2};

use super::{check_tokens, Normalization, SampleSignals, TokenImportance};
use crate::error::{Error, Result};
use crate::validate::check_finite;

/// How a token's gradient row becomes its raw saliency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SaliencyPower {
    /// `||g_t||_2`: the L2 norm of the token's gradient row.
    One,
    /// `||g_t||_2^2 = sum_j g_tj^2` (Fisher-style; the default).
    #[default]
    Two,
}

/// Raw saliency of every token from gradient rows `[tokens, features]`; the
/// views are one concatenation along the feature axis (e.g. the output
/// gradients of `q`, `k` and `v`), so `s_t = sum over all views of sum_j
/// g_tj^2` for [`SaliencyPower::Two`] and its square root for
/// [`SaliencyPower::One`]. Sums are taken in f64.
///
/// ```
/// use ndarray::array;
/// use vlmq::importance::{raw_saliency, SaliencyPower};
/// let q = array![[3.0f32], [0.0]];
/// let k = array![[4.0f32], [1.0]];
/// let s = raw_saliency(&[q.view(), k.view()], SaliencyPower::One)?;
/// assert_eq!(s.to_vec(), vec![5.0, 1.0]);
/// # Ok::<(), vlmq::Error>(())
/// ```
pub fn raw_saliency(
    gradients: &[ArrayView2<'_, f32>],
    power: SaliencyPower,
) -> Result<Array1<f32>> {
    let Some(first) = gradients.first() else {
        return Err(Error::Empty {
            what: "per-token gradients for gradient saliency".into(),
        });
    };
    let tokens = first.nrows();
    let mut acc = vec![0.0f64; tokens];
    for g in gradients {
        if g.nrows() != tokens {
            return Err(Error::shape(
                "per-token gradient rows",
                &[tokens, g.ncols()],
                g.shape(),
            ));
        }
        check_finite("per-token gradients", *g)?;
        for (a, row) in acc.iter_mut().zip(g.rows()) {
            *a += row
                .iter()
                .map(|&v| f64::from(v) * f64::from(v))
                .sum::<f64>();
        }
    }
    Ok(acc
        .into_iter()
        .map(|s| match power {
            SaliencyPower::Two => s as f32,
            SaliencyPower::One => s.sqrt() as f32,
        })
        .collect())
}

/// VLMQ's gradient-driven factors: [`raw_saliency`] of the sample's gradient
/// rows, then [`Normalization`] (mean 1 over valid tokens, floor, optional
/// cap, padding 0).
///
/// Feed it the per-token gradients at the outputs of the linears of one input
/// group for per-layer factors, or the gradient at the block output for
/// per-block factors (DESIGN section 3).
///
/// ```
/// use ndarray::array;
/// use vlmq::importance::{GradientSaliency, SampleSignals, TokenImportance};
/// use vlmq::{Modality, TokenInfo};
///
/// let tokens = TokenInfo::uniform(Modality::Text, 3);
/// let g = array![[1.0f32, 1.0], [2.0, 0.0], [0.0, 0.0]];
/// let views = [g.view()];
/// let scorer = GradientSaliency::default();
/// let alpha = scorer.factors(&SampleSignals::new(&tokens, 0).with_gradients(&views))?;
/// assert_eq!(alpha.to_vec(), vec![1.0, 2.0, 0.05]); // raw 2, 4, 0; mean 2; floor 0.05
/// # Ok::<(), vlmq::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct GradientSaliency {
    power: SaliencyPower,
    normalization: Normalization,
    name: String,
}

impl Default for GradientSaliency {
    fn default() -> Self {
        GradientSaliency::new(SaliencyPower::Two, Normalization::default())
    }
}

impl GradientSaliency {
    /// A scorer with the given power and normalization.
    pub fn new(power: SaliencyPower, normalization: Normalization) -> Self {
        let p = match power {
            SaliencyPower::One => 1,
            SaliencyPower::Two => 2,
        };
        GradientSaliency {
            power,
            normalization,
            name: format!("gradient-saliency(p={p})"),
        }
    }

    /// The power.
    pub fn power(&self) -> SaliencyPower {
        self.power
    }

    /// The normalization.
    pub fn normalization(&self) -> Normalization {
        self.normalization
    }
}

impl TokenImportance for GradientSaliency {
    fn name(&self) -> &str {
        &self.name
    }

    fn needs_gradients(&self) -> bool {
        true
    }

    fn factors(&self, sample: &SampleSignals<'_>) -> Result<Array1<f32>> {
        check_tokens(sample.tokens)?;
        let raw = raw_saliency(sample.gradients, self.power)?;
        self.normalization.apply(raw.view(), sample.tokens)
    }
}
