//! Where the Hessian's mass comes from, per modality, before and after weighting.

use std::fmt;

use ndarray::{ArrayView1, ArrayView2};

use crate::backend::{Modality, TokenInfo};
use crate::error::{Error, Result};
use crate::validate::check_finite;

const MODALITIES: [Modality; 3] = [Modality::Vision, Modality::Text, Modality::Other];

fn slot(m: Modality) -> usize {
    match m {
        Modality::Vision => 0,
        Modality::Text => 1,
        Modality::Other => 2,
    }
}

/// Distribution of the factors of one modality's valid tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AlphaStats {
    /// Mean factor.
    pub mean: f64,
    /// Smallest factor.
    pub min: f32,
    /// 10th percentile (nearest rank).
    pub p10: f32,
    /// Median (nearest rank).
    pub p50: f32,
    /// 90th percentile (nearest rank).
    pub p90: f32,
    /// Largest factor.
    pub max: f32,
}

impl AlphaStats {
    /// Statistics of `values`, or `None` when there are none.
    pub fn from_values(values: &[f32]) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        let mut v = values.to_vec();
        v.sort_by(f32::total_cmp);
        let rank = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Some(AlphaStats {
            mean: v.iter().map(|&a| f64::from(a)).sum::<f64>() / v.len() as f64,
            min: v[0],
            p10: rank(0.1),
            p50: rank(0.5),
            p90: rank(0.9),
            max: v[v.len() - 1],
        })
    }
}

/// One modality's line of an [`ImportanceDiagnostics`] report.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModalityReport {
    /// The modality.
    pub modality: Modality,
    /// Valid tokens of this modality.
    pub tokens: usize,
    /// Its share of `tr H` with every valid token weighted 1 (GPTQ).
    pub trace_share_before: f64,
    /// Its share of `tr H_alpha` under the importance factors.
    pub trace_share_after: f64,
    /// The factors' distribution.
    pub alpha: Option<AlphaStats>,
}

/// Per-layer diagnostics of importance weighting, accumulated sample by sample.
///
/// Token `t` contributes `alpha_t ||x_t||^2` to the (unnormalized) trace of
/// the weighted Hessian, so the trace shares need only the layer inputs, never
/// `H` itself. Shares are fractions of the total over valid tokens; padding
/// is counted but contributes nothing.
///
/// ```
/// use ndarray::array;
/// use vlmq::importance::ImportanceDiagnostics;
/// use vlmq::{Modality, TokenInfo};
///
/// let x = array![[1.0f32, 0.0], [0.0, 1.0], [1.0, 1.0]];
/// let tokens = TokenInfo::new(vec![Modality::Vision, Modality::Vision, Modality::Text]);
/// let mut diag = ImportanceDiagnostics::new();
/// diag.add(x.view(), &tokens, array![0.5f32, 0.5, 2.0].view())?;
/// assert_eq!(diag.trace_share_before(Modality::Vision), 0.5); // 2 of 4
/// assert_eq!(diag.trace_share_after(Modality::Text), 0.8); // 4 of 5
/// # Ok::<(), vlmq::Error>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImportanceDiagnostics {
    before: [f64; 3],
    after: [f64; 3],
    alphas: [Vec<f32>; 3],
    padding: usize,
}

impl ImportanceDiagnostics {
    /// Empty diagnostics.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one sample: its layer inputs `x` (`[tokens, features]`), token
    /// info and factors.
    pub fn add(
        &mut self,
        x: ArrayView2<'_, f32>,
        tokens: &TokenInfo,
        alpha: ArrayView1<'_, f32>,
    ) -> Result<()> {
        super::check_tokens(tokens)?;
        let n = tokens.len();
        if x.nrows() != n {
            return Err(Error::shape("layer inputs", &[n, x.ncols()], x.shape()));
        }
        if alpha.len() != n {
            return Err(Error::shape("importance factors", &[n], &[alpha.len()]));
        }
        check_finite("layer inputs", x)?;
        if let Some((token, &value)) = alpha
            .iter()
            .enumerate()
            .find(|(_, a)| !(a.is_finite() && **a >= 0.0))
        {
            return Err(Error::InvalidImportance { token, value });
        }
        for (t, row) in x.rows().into_iter().enumerate() {
            if !tokens.valid()[t] {
                self.padding += 1;
                continue;
            }
            let s = slot(tokens.modality()[t]);
            let sq: f64 = row.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
            self.before[s] += sq;
            self.after[s] += f64::from(alpha[t]) * sq;
            self.alphas[s].push(alpha[t]);
        }
        Ok(())
    }

    /// Adds another layer-sample set's diagnostics (e.g. from another thread).
    pub fn merge(&mut self, other: &ImportanceDiagnostics) {
        for s in 0..3 {
            self.before[s] += other.before[s];
            self.after[s] += other.after[s];
            self.alphas[s].extend_from_slice(&other.alphas[s]);
        }
        self.padding += other.padding;
    }

    /// Share of the unweighted trace from `modality` (0 when the trace is 0).
    pub fn trace_share_before(&self, modality: Modality) -> f64 {
        share(&self.before, slot(modality))
    }

    /// Share of the weighted trace from `modality` (0 when the trace is 0).
    pub fn trace_share_after(&self, modality: Modality) -> f64 {
        share(&self.after, slot(modality))
    }

    /// Padding tokens seen.
    pub fn padding_tokens(&self) -> usize {
        self.padding
    }

    /// One line per modality that had valid tokens, in the order vision, text, other.
    pub fn report(&self) -> Vec<ModalityReport> {
        MODALITIES
            .iter()
            .filter(|&&m| !self.alphas[slot(m)].is_empty())
            .map(|&m| ModalityReport {
                modality: m,
                tokens: self.alphas[slot(m)].len(),
                trace_share_before: self.trace_share_before(m),
                trace_share_after: self.trace_share_after(m),
                alpha: AlphaStats::from_values(&self.alphas[slot(m)]),
            })
            .collect()
    }
}

fn share(sums: &[f64; 3], s: usize) -> f64 {
    let total: f64 = sums.iter().sum();
    if total > 0.0 {
        sums[s] / total
    } else {
        0.0
    }
}

impl fmt::Display for ImportanceDiagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<8} {:>7} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8}",
            "modality",
            "tokens",
            "tr before",
            "tr after",
            "a mean",
            "a min",
            "a p50",
            "a p90",
            "a max"
        )?;
        for r in self.report() {
            let Some(a) = r.alpha else { continue };
            writeln!(
                f,
                "{:<8} {:>7} {:>8.1}% {:>8.1}% {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3}",
                format!("{:?}", r.modality).to_lowercase(),
                r.tokens,
                100.0 * r.trace_share_before,
                100.0 * r.trace_share_after,
                a.mean,
                a.min,
                a.p50,
                a.p90,
                a.max
            )?;
        }
        Ok(())
    }
}
