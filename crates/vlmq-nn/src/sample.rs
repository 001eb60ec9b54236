//! One sample of a [`SequenceModel`](super::SequenceModel): vision input,
//! text token ids, padding mask and task-loss targets.

use ndarray::Array2;

/// The vision input of a sample.
#[derive(Debug, Clone)]
pub enum Vision {
    /// Flattened image patches `[P, patch_dim]`, embedded by the model's [`PatchEmbedding`](super::PatchEmbedding).
    Patches(Array2<f32>),
    /// Precomputed vision embeddings `[P, d]` at the first block's width.
    Embeddings(Array2<f32>),
}

/// One sample: optional vision input, text token ids, padding mask and targets.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// Text token ids (appended after the vision tokens).
    pub tokens: Vec<usize>,
    /// Vision input, if any.
    pub vision: Option<Vision>,
    /// Validity of each position of `[vision; text]` (`None`: all valid).
    /// Invalid positions are never attended to.
    pub valid: Option<Vec<bool>>,
    /// `(position, target token id)` pairs of the task loss (cross-entropy
    /// averaged over them); positions index `[vision; text]`.
    pub targets: Vec<(usize, usize)>,
}

impl Sample {
    /// A text-only sample.
    pub fn text(tokens: Vec<usize>) -> Self {
        Sample {
            tokens,
            ..Sample::default()
        }
    }

    /// Sets the vision input.
    pub fn with_vision(mut self, vision: Vision) -> Self {
        self.vision = Some(vision);
        self
    }

    /// Sets the targets.
    pub fn with_targets(mut self, targets: Vec<(usize, usize)>) -> Self {
        self.targets = targets;
        self
    }

    /// Sets the padding mask.
    pub fn with_valid(mut self, valid: Vec<bool>) -> Self {
        self.valid = Some(valid);
        self
    }

    /// Number of vision rows.
    pub fn vision_len(&self) -> usize {
        match &self.vision {
            Some(Vision::Patches(p)) | Some(Vision::Embeddings(p)) => p.nrows(),
            None => 0,
        }
    }

    /// Length of the language-model sequence `[vision; text]`.
    pub fn len(&self) -> usize {
        self.vision_len() + self.tokens.len()
    }

    /// Whether the sample has no tokens at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
