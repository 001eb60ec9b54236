//! The uniform scorer: plain GPTQ.

use ndarray::Array1;

use super::{check_tokens, SampleSignals, TokenImportance};
use crate::error::Result;

/// Every valid token gets 1, padding 0: accumulating with these factors gives
/// bit for bit the Hessian of unweighted accumulation over the valid tokens,
/// so solving with it is plain GPTQ (or GPTAQ).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Uniform;

impl TokenImportance for Uniform {
    fn name(&self) -> &str {
        "uniform"
    }

    fn needs_gradients(&self) -> bool {
        false
    }

    fn factors(&self, sample: &SampleSignals<'_>) -> Result<Array1<f32>> {
        check_tokens(sample.tokens)?;
        Ok(sample
            .tokens
            .valid()
            .iter()
            .map(|&v| if v { 1.0 } else { 0.0 })
            .collect())
    }
}
