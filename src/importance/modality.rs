//! Constant weights per modality.

use ndarray::Array1;

use super::{check_tokens, check_weight, SampleSignals, TokenImportance};
use crate::backend::Modality;
use crate::error::Result;

/// One constant factor per [`Modality`]; padding gets 0.
///
/// The constants are used as given (no per-sample normalization): only their
/// ratios matter within one sample, and across samples a sample with more
/// text tokens then weighs more, which is the intent of up-weighting text.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModalityWeights {
    vision: f32,
    text: f32,
    other: f32,
}

impl ModalityWeights {
    /// Factors for vision, text and other tokens; each finite and `>= 0`.
    pub fn new(vision: f32, text: f32, other: f32) -> Result<Self> {
        check_weight("importance.vision", vision)?;
        check_weight("importance.text", text)?;
        check_weight("importance.other", other)?;
        Ok(ModalityWeights {
            vision,
            text,
            other,
        })
    }

    /// The factor of one modality.
    pub fn weight(&self, modality: Modality) -> f32 {
        match modality {
            Modality::Vision => self.vision,
            Modality::Text => self.text,
            Modality::Other => self.other,
        }
    }
}

impl TokenImportance for ModalityWeights {
    fn name(&self) -> &str {
        "modality-weights"
    }

    fn needs_gradients(&self) -> bool {
        false
    }

    fn factors(&self, sample: &SampleSignals<'_>) -> Result<Array1<f32>> {
        check_tokens(sample.tokens)?;
        Ok(sample
            .tokens
            .modality()
            .iter()
            .zip(sample.tokens.valid())
            .map(|(&m, &v)| if v { self.weight(m) } else { 0.0 })
            .collect())
    }
}
