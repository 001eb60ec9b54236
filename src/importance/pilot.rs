//! The paper's pilot study: down-weight a fraction of the vision tokens.

use ndarray::Array1;

use super::{
    check_tokens, check_weight, raw_saliency, saliency::signal_norms, SaliencyPower, SampleSignals,
    TokenImportance,
};
use crate::backend::Modality;
use crate::error::{Error, Result};
use crate::rng::SplitMix64;

/// Which vision tokens a [`PilotScorer`] down-weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PilotSelection {
    /// A uniformly random subset, drawn from a SplitMix64 stream seeded by
    /// `(seed, sample index)`: deterministic and independent of scheduling.
    Random {
        /// Seed of the draw.
        seed: u64,
    },
    /// The vision tokens with the lowest gradient saliency (power 2; ties
    /// go to the earlier token). Needs gradients.
    LowestSaliency,
}

/// Gives `round(fraction * V)` of a sample's `V` valid vision tokens the
/// factor `low_weight` and every other valid token 1; padding gets 0.
///
/// The published pilot study found accuracy peaked with about half of the
/// vision tokens down-weighted; this scorer reproduces that experiment.
///
/// ```
/// use vlmq::importance::{PilotScorer, PilotSelection, SampleSignals, TokenImportance};
/// use vlmq::{Modality, TokenInfo};
///
/// let tokens = TokenInfo::uniform(Modality::Vision, 8);
/// let pilot = PilotScorer::new(0.5, 0.1, PilotSelection::Random { seed: 7 })?;
/// let alpha = pilot.factors(&SampleSignals::new(&tokens, 3))?;
/// assert_eq!(alpha.iter().filter(|&&a| a == 0.1).count(), 4);
/// assert_eq!(alpha, pilot.factors(&SampleSignals::new(&tokens, 3))?); // deterministic
/// # Ok::<(), vlmq::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PilotScorer {
    fraction: f32,
    low_weight: f32,
    selection: PilotSelection,
}

impl PilotScorer {
    /// `fraction` in `[0, 1]`, `low_weight` finite and `>= 0`.
    pub fn new(fraction: f32, low_weight: f32, selection: PilotSelection) -> Result<Self> {
        if !(fraction.is_finite() && (0.0..=1.0).contains(&fraction)) {
            return Err(Error::InvalidConfig {
                field: "importance.pilot.fraction",
                value: fraction.to_string(),
                reason: "must be in [0, 1]",
            });
        }
        check_weight("importance.pilot.low_weight", low_weight)?;
        Ok(PilotScorer {
            fraction,
            low_weight,
            selection,
        })
    }

    /// Indices of the valid vision tokens to down-weight.
    fn chosen(&self, sample: &SampleSignals<'_>, vision: &[usize]) -> Result<Vec<usize>> {
        let k =
            ((f64::from(self.fraction) * vision.len() as f64).round() as usize).min(vision.len());
        match self.selection {
            PilotSelection::Random { seed } => {
                let mut pool = vision.to_vec();
                let mut rng = SplitMix64::for_stream(seed, sample.sample_index);
                for i in 0..k {
                    let j = i + rng.below(pool.len() - i);
                    pool.swap(i, j);
                }
                pool.truncate(k);
                Ok(pool)
            }
            PilotSelection::LowestSaliency => {
                let raw = raw_saliency(signal_norms(sample)?, SaliencyPower::Two)?;
                let mut order = vision.to_vec();
                order.sort_by(|&a, &b| raw[a].total_cmp(&raw[b]).then(a.cmp(&b)));
                order.truncate(k);
                Ok(order)
            }
        }
    }
}

impl TokenImportance for PilotScorer {
    fn name(&self) -> &str {
        match self.selection {
            PilotSelection::Random { .. } => "pilot(random)",
            PilotSelection::LowestSaliency => "pilot(lowest-saliency)",
        }
    }

    fn needs_gradients(&self) -> bool {
        self.selection == PilotSelection::LowestSaliency
    }

    fn factors(&self, sample: &SampleSignals<'_>) -> Result<Array1<f32>> {
        let tokens = sample.tokens;
        check_tokens(tokens)?;
        let vision: Vec<usize> = (0..tokens.len())
            .filter(|&t| tokens.valid()[t] && tokens.modality()[t] == Modality::Vision)
            .collect();
        let mut alpha: Array1<f32> = tokens
            .valid()
            .iter()
            .map(|&v| if v { 1.0 } else { 0.0 })
            .collect();
        for t in self.chosen(sample, &vision)? {
            alpha[t] = self.low_weight;
        }
        Ok(alpha)
    }
}
