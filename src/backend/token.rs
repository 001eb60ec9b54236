//! Per-token metadata of calibration samples: modality and validity.

use ndarray::Array1;

use crate::error::{Error, Result};

/// The modality of one token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Modality {
    /// An image patch / vision token.
    Vision,
    /// A text token.
    Text,
    /// Anything else (special tokens, registers, ...).
    Other,
}

/// Modality and validity of every token of one sample (one entry per row).
///
/// Invalid tokens (padding) never enter a Hessian: their importance is 0.
/// The fields are private so that there is always exactly one validity flag
/// per token (checked in [`with_valid`](Self::with_valid), the one place a
/// mask of another length could come in).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TokenInfo {
    modality: Vec<Modality>,
    valid: Vec<bool>,
}

impl TokenInfo {
    /// All tokens valid, with the given modalities.
    pub fn new(modality: Vec<Modality>) -> Self {
        let valid = vec![true; modality.len()];
        TokenInfo { modality, valid }
    }

    /// `n` valid tokens of one modality.
    pub fn uniform(modality: Modality, n: usize) -> Self {
        TokenInfo::new(vec![modality; n])
    }

    /// Tokens given one by one as `(modality, valid)`.
    ///
    /// ```
    /// use vlmq::{Modality, TokenInfo};
    /// let info = TokenInfo::from_tokens([(Modality::Vision, true), (Modality::Text, false)]);
    /// assert_eq!(info.valid(), &[true, false]);
    /// ```
    pub fn from_tokens(tokens: impl IntoIterator<Item = (Modality, bool)>) -> Self {
        let (modality, valid) = tokens.into_iter().unzip();
        TokenInfo { modality, valid }
    }

    /// Sets the validity mask (`false` for padding): one flag per token, or
    /// [`Error::ShapeMismatch`](crate::Error::ShapeMismatch).
    pub fn with_valid(mut self, valid: Vec<bool>) -> Result<Self> {
        if valid.len() != self.modality.len() {
            return Err(Error::shape(
                "token validity mask (one flag per token)",
                &[self.modality.len()],
                &[valid.len()],
            ));
        }
        self.valid = valid;
        Ok(self)
    }

    /// The modality of each token.
    pub fn modality(&self) -> &[Modality] {
        &self.modality
    }

    /// Whether each token is valid (`false` for padding).
    pub fn valid(&self) -> &[bool] {
        &self.valid
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.modality.len()
    }

    /// Whether there are no tokens.
    pub fn is_empty(&self) -> bool {
        self.modality.is_empty()
    }

    /// Number of valid tokens.
    pub fn valid_count(&self) -> usize {
        self.valid.iter().filter(|&&v| v).count()
    }

    /// Token weights that keep one modality: 1 for every valid token of
    /// `modality`, 0 for the others and for padding. With
    /// [`input_statistics`](crate::pipeline::input_statistics) this gives one
    /// modality's Hessian.
    ///
    /// ```
    /// use vlmq::{Modality, TokenInfo};
    /// let info = TokenInfo::new(vec![Modality::Vision, Modality::Text, Modality::Text])
    ///     .with_valid(vec![true, true, false])?;
    /// assert_eq!(info.mask(Modality::Text).to_vec(), vec![0.0, 1.0, 0.0]);
    /// # Ok::<(), vlmq::Error>(())
    /// ```
    pub fn mask(&self, modality: Modality) -> Array1<f32> {
        self.modality
            .iter()
            .zip(&self.valid)
            .map(|(&m, &valid)| if valid && m == modality { 1.0 } else { 0.0 })
            .collect()
    }

    /// Appends another sample's tokens (used when stacking samples).
    pub fn extend(&mut self, other: &TokenInfo) {
        self.modality.extend_from_slice(&other.modality);
        self.valid.extend_from_slice(&other.valid);
    }
}
