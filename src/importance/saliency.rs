//! Gradient saliency: the crate's default VLMQ scorer.

use ndarray::{Array1, ArrayView1, ArrayView2};

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

/// Per-token squared gradient norms `||g_t||^2` from gradient rows
/// `[tokens, features]`; the views are one concatenation along the feature
/// axis (e.g. the output gradients of `q`, `k` and `v`). Sums are taken in f64.
///
/// ```
/// use ndarray::array;
/// use vlmq::importance::grad_sq_norms;
/// let q = array![[3.0f32], [0.0]];
/// let k = array![[4.0f32], [1.0]];
/// assert_eq!(grad_sq_norms(&[q.view(), k.view()])?.to_vec(), vec![25.0, 1.0]);
/// # Ok::<(), vlmq::Error>(())
/// ```
pub fn grad_sq_norms(gradients: &[ArrayView2<'_, f32>]) -> Result<Array1<f32>> {
    let Some(first) = gradients.first() else {
        return Err(Error::Empty {
            what: "per-token gradients".into(),
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
    Ok(acc.into_iter().map(|s| s as f32).collect())
}

/// Raw saliency of every token from its squared gradient norm `s_t`:
/// `s_t` itself for [`SaliencyPower::Two`], `sqrt(s_t)` for
/// [`SaliencyPower::One`]. Norms must be finite and `>= 0`.
///
/// ```
/// use ndarray::array;
/// use vlmq::importance::{raw_saliency, SaliencyPower};
/// let s = raw_saliency(array![25.0f32, 1.0].view(), SaliencyPower::One)?;
/// assert_eq!(s.to_vec(), vec![5.0, 1.0]);
/// # Ok::<(), vlmq::Error>(())
/// ```
pub fn raw_saliency(
    grad_sq_norms: ArrayView1<'_, f32>,
    power: SaliencyPower,
) -> Result<Array1<f32>> {
    if let Some((t, &v)) = grad_sq_norms
        .indexed_iter()
        .find(|(_, v)| !(v.is_finite() && **v >= 0.0))
    {
        return Err(if v.is_finite() {
            Error::InvalidImportance { token: t, value: v }
        } else {
            Error::NonFinite {
                what: "per-token squared gradient norms".into(),
                index: vec![t],
            }
        });
    }
    Ok(match power {
        SaliencyPower::Two => grad_sq_norms.to_owned(),
        SaliencyPower::One => grad_sq_norms.mapv(f32::sqrt),
    })
}

/// VLMQ's gradient-driven factors: [`raw_saliency`] of the sample's gradient
/// rows, then [`Normalization`] (mean 1 over valid tokens, floor, optional
/// cap, padding 0).
///
/// Feed it the per-token squared gradient norms at the outputs of the
/// linears of one input group for per-layer factors, or at the block output
/// for per-block factors.
///
/// ```
/// use ndarray::array;
/// use vlmq::importance::{grad_sq_norms, GradientSaliency, SampleSignals, TokenImportance};
/// use vlmq::{Modality, TokenInfo};
///
/// let tokens = TokenInfo::uniform(Modality::Text, 3);
/// let g = array![[1.0f32, 1.0], [2.0, 0.0], [0.0, 0.0]];
/// let norms = grad_sq_norms(&[g.view()])?;
/// let scorer = GradientSaliency::default();
/// let alpha = scorer.factors(&SampleSignals::new(&tokens, 0).with_grad_sq_norms(norms.view()))?;
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
        let raw = raw_saliency(signal_norms(sample)?, self.power)?;
        self.normalization.apply(raw.view(), sample.tokens)
    }
}

/// The sample's squared gradient norms, one per token.
pub(crate) fn signal_norms<'a>(sample: &SampleSignals<'a>) -> Result<ArrayView1<'a, f32>> {
    let Some(norms) = sample.grad_sq_norms else {
        return Err(Error::Empty {
            what: "per-token squared gradient norms (this scorer needs gradients)".into(),
        });
    };
    if norms.len() != sample.tokens.len() {
        return Err(Error::shape(
            "per-token squared gradient norms (one per token)",
            &[sample.tokens.len()],
            &[norms.len()],
        ));
    }
    Ok(norms)
}
