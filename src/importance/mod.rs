//! Per-token importance factors (VLMQ).
//!
//! A [`TokenImportance`] scorer turns one calibration sample's signals (its
//! [`TokenInfo`] and, for gradient-driven scorers, the per-token squared
//! norms of the output gradients of the layers being quantized) into one
//! factor `alpha_t >= 0` per token. The factors go to
//! [`HessianAccumulator::add`](crate::hessian::HessianAccumulator::add) and
//! [`add_paired`](crate::hessian::HessianAccumulator::add_paired), which build
//! the enhanced Hessian `H = 2 sum_t alpha_t x_t x_t^T / sum_t alpha_t`.
//!
//! Scorers:
//! - [`Uniform`]: every valid token 1 (plain GPTQ / GPTAQ);
//! - [`ModalityWeights`]: one constant per modality;
//! - [`PilotScorer`]: the paper's pilot study, a chosen fraction of the vision
//!   tokens gets a low weight (picked at random or by lowest saliency);
//! - [`GradientSaliency`]: the crate's default VLMQ scorer, squared (or plain)
//!   gradient norms normalized per sample by [`Normalization`].
//!
//! [`ImportanceDiagnostics`] reports how weighting moves the Hessian trace
//! between modalities and how the factors are distributed.
//!
//! Padding tokens (`valid == false`) always get 0, so they never enter a
//! Hessian. Every scorer is deterministic: the same signals give the same
//! factors whatever the thread count or the order samples are scored in.

mod diagnostics;
mod modality;
mod normalize;
mod pilot;
mod saliency;
mod uniform;

pub use diagnostics::{AlphaStats, ImportanceDiagnostics, ModalityReport};
pub use modality::ModalityWeights;
pub use normalize::Normalization;
pub use pilot::{PilotScorer, PilotSelection};
pub use saliency::{grad_sq_norms, raw_saliency, GradientSaliency, SaliencyPower};
pub use uniform::Uniform;

use ndarray::{Array1, ArrayView1};

use crate::backend::TokenInfo;
use crate::error::{Error, Result};

/// What a scorer sees of one calibration sample.
///
/// `grad_sq_norms` holds, per token (in [`TokenInfo`] order), the squared
/// norm `||g_t||^2` of the token's gradient: summed over the outputs of
/// every linear of one input group (per-layer factors), or the gradient at a
/// block's output (per-block factors). [`grad_sq_norms`] computes it from
/// gradient rows. Scorers that do not use gradients ignore it.
#[derive(Debug, Clone, Copy)]
pub struct SampleSignals<'a> {
    /// Modality and validity of each token.
    pub tokens: &'a TokenInfo,
    /// Per-token squared gradient norms; `None` when none were computed.
    pub grad_sq_norms: Option<ArrayView1<'a, f32>>,
    /// Index of the sample in the calibration set. Randomized scorers derive
    /// their stream from it (and their own seed), so a sample's factors do
    /// not depend on which thread scores it or in which order.
    pub sample_index: u64,
}

impl<'a> SampleSignals<'a> {
    /// Signals without gradients.
    pub fn new(tokens: &'a TokenInfo, sample_index: u64) -> Self {
        SampleSignals {
            tokens,
            grad_sq_norms: None,
            sample_index,
        }
    }

    /// Attaches per-token squared gradient norms.
    pub fn with_grad_sq_norms(mut self, grad_sq_norms: ArrayView1<'a, f32>) -> Self {
        self.grad_sq_norms = Some(grad_sq_norms);
        self
    }
}

/// A rule that gives every token of a calibration sample an importance factor.
///
/// Implementations are small, immutable and shareable across threads, so a
/// pipeline can hold a `Box<dyn TokenImportance>`.
///
/// ```
/// use vlmq::importance::{ModalityWeights, SampleSignals, TokenImportance};
/// use vlmq::{Modality, TokenInfo};
///
/// let tokens = TokenInfo::new(vec![Modality::Vision, Modality::Text, Modality::Text])
///     .with_valid(vec![true, true, false])?;
/// let scorer: Box<dyn TokenImportance> = Box::new(ModalityWeights::new(0.25, 1.0, 1.0)?);
/// let alpha = scorer.factors(&SampleSignals::new(&tokens, 0))?;
/// assert_eq!(alpha.to_vec(), vec![0.25, 1.0, 0.0]);
/// # Ok::<(), vlmq::Error>(())
/// ```
pub trait TokenImportance: Send + Sync + std::fmt::Debug {
    /// A short name for reports (e.g. `"gradient-saliency(p=2)"`).
    fn name(&self) -> &str;

    /// Whether [`factors`](Self::factors) needs
    /// [`SampleSignals::grad_sq_norms`]; a pipeline runs the backward pass
    /// only when its scorer says so.
    fn needs_gradients(&self) -> bool;

    /// A stable text naming the rule and every parameter, so that two
    /// scorers with the same description give the same factors. The
    /// pipeline's resume fingerprint includes it (a state written with
    /// another scorer is refused). The default is the `Debug` text.
    fn description(&self) -> String {
        format!("{self:?}")
    }

    /// One factor per token: finite, `>= 0`, and `0` for padding.
    fn factors(&self, sample: &SampleSignals<'_>) -> Result<Array1<f32>>;
}

/// Checks that `tokens` is consistent (as many validity flags as
/// modalities): guaranteed by [`TokenInfo`]'s constructors, checked again
/// because the scorers index both by token.
pub(crate) fn check_tokens(tokens: &TokenInfo) -> Result<()> {
    if tokens.valid().len() != tokens.modality().len() {
        return Err(Error::shape(
            "token validity mask",
            &[tokens.modality().len()],
            &[tokens.valid().len()],
        ));
    }
    Ok(())
}

/// Checks that a weight given by the caller is finite and `>= 0`.
pub(crate) fn check_weight(field: &'static str, value: f32) -> Result<()> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(Error::InvalidConfig {
            field,
            value: value.to_string(),
            reason: "must be finite and >= 0",
        })
    }
}

#[cfg(test)]
mod tests;
