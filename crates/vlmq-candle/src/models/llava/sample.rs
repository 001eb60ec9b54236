//! The calibration sample and hidden state of the LLaVA backend.

use candle_core::Tensor;

use crate::process::chat_template::TokenRole;

/// One calibration sample of a VLM: token ids (with `tokens_per_image`
/// `<image>` tokens per image), which tokens are prediction targets, how
/// many leading tokens are real (the rest is right padding), and the images.
#[derive(Debug, Clone)]
pub struct VlmSample {
    /// Token ids.
    pub tokens: Vec<u32>,
    /// Per token: its prediction from the tokens before counts in the loss.
    pub targets: Vec<bool>,
    /// Tokens `>= valid_len` are padding (invalid, never targets). Padding
    /// must be at the end: attention is causal, so it cannot reach real tokens.
    pub valid_len: usize,
    /// `pixel_values: [N, 3, H, W]`, in `<image>` order; `None` for text only.
    pub pixels: Option<Tensor>,
}

impl VlmSample {
    /// Every token a target (as transformers' `labels = input_ids`), no padding.
    pub fn causal(tokens: Vec<u32>, pixels: Option<Tensor>) -> Self {
        let n = tokens.len();
        VlmSample {
            targets: vec![true; n],
            valid_len: n,
            tokens,
            pixels,
        }
    }

    /// Drops the `<image>` positions from the targets (transformers' `-100` labels there).
    pub fn without_image_targets(mut self, image_token_id: u32) -> Self {
        for (t, &id) in self.targets.iter_mut().zip(&self.tokens) {
            if id == image_token_id {
                *t = false;
            }
        }
        self
    }

    /// A sample whose targets are the answer tokens only (VLMQ's
    /// answer-only task loss), from the roles the chat template gives (one
    /// per token); no padding.
    pub fn answer_only(
        tokens: Vec<u32>,
        roles: &[TokenRole],
        pixels: Option<Tensor>,
    ) -> vlmq::Result<Self> {
        if roles.len() != tokens.len() {
            return Err(vlmq::Error::shape(
                "token roles (one per token)",
                &[tokens.len()],
                &[roles.len()],
            ));
        }
        Ok(VlmSample {
            targets: roles.iter().map(|r| *r == TokenRole::Answer).collect(),
            valid_len: tokens.len(),
            tokens,
            pixels,
        })
    }

    /// Appends `n` padding tokens `pad` (invalid, not targets).
    pub fn padded(mut self, n: usize, pad: u32) -> Self {
        self.tokens.extend(std::iter::repeat_n(pad, n));
        self.targets.extend(std::iter::repeat_n(false, n));
        self
    }
}

/// The hidden state between blocks: the vision stream (`[N, S, d_vision]`,
/// `None` without images) up to the projector, the LM stream `[1, T, d]` after.
#[derive(Debug, Clone)]
pub enum VlmHidden {
    /// Vision tokens of the sample's images.
    Vision(Option<Tensor>),
    /// The LM's hidden state.
    Text(Tensor),
}

impl VlmSample {
    /// Number of images.
    pub(crate) fn image_count(&self) -> usize {
        self.pixels.as_ref().map_or(0, |p| p.dims()[0])
    }

    /// Checks that there is one target flag per token and that the real
    /// length does not exceed the token count.
    pub(crate) fn check_lengths(&self) -> vlmq::Result<()> {
        if self.targets.len() != self.tokens.len() {
            return Err(vlmq::Error::shape(
                "sample targets",
                &[self.tokens.len()],
                &[self.targets.len()],
            ));
        }
        if self.valid_len > self.tokens.len() {
            return Err(vlmq::Error::shape(
                "sample valid_len",
                &[self.tokens.len()],
                &[self.valid_len],
            ));
        }
        Ok(())
    }
}
