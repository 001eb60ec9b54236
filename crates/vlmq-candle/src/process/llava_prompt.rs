//! Building LLaVA calibration samples from prompts and images, and the task
//! loss of a sample.
//!
//! A prompt holds one `<image>` marker per image (as LLaVA's chat format,
//! e.g. `"USER: <image>\nWhat is shown? ASSISTANT: a cat"`). As
//! transformers' `LlavaProcessor` does, each marker is replaced by
//! `tokens_per_image` copies before tokenizing, so the ids carry one
//! `<image>` token per image feature.

use candle_core::Tensor;
use vlmq::{Error, GradientModel, QuantizableModel, Result};

use crate::models::llava::model::LlavaModel;
use crate::models::llava::sample::VlmSample;

/// The marker of an image in a prompt.
pub const IMAGE_MARKER: &str = "<image>";

impl LlavaModel {
    /// Token ids of `prompt` with each `<image>` expanded to
    /// `tokens_per_image` image tokens. The tokenizer must map `<image>` to
    /// the configured image token id (checked: a count mismatch is an error).
    pub fn encode_prompt(&self, tk: &tokenizers::Tokenizer, prompt: &str) -> Result<Vec<u32>> {
        let n = prompt.matches(IMAGE_MARKER).count();
        let expanded = prompt.replace(
            IMAGE_MARKER,
            &IMAGE_MARKER.repeat(self.cfg.tokens_per_image()),
        );
        let ids = crate::process::tokenizer::encode(tk, &expanded)?;
        let have = ids
            .iter()
            .filter(|&&t| t == self.cfg.image_token_id)
            .count();
        if have != n * self.cfg.tokens_per_image() {
            return Err(Error::InvalidConfig {
                field: "<image> token",
                value: format!(
                    "{have} image tokens (id {}) for {n} markers",
                    self.cfg.image_token_id
                ),
                reason: "the tokenizer must encode <image> as the configured image token",
            });
        }
        Ok(ids)
    }

    /// A calibration sample from a prompt and its images (`pixels: [N, 3, H, W]`
    /// with `N` = the prompt's `<image>` count): every text token is a
    /// target, image tokens are not.
    pub fn prompt_sample(
        &self,
        tk: &tokenizers::Tokenizer,
        prompt: &str,
        pixels: Option<Tensor>,
    ) -> Result<VlmSample> {
        let ids = self.encode_prompt(tk, prompt)?;
        let s = VlmSample::causal(ids, pixels).without_image_targets(self.cfg.image_token_id);
        self.check_sample(&s)?;
        Ok(s)
    }

    /// Mean task loss of a sample (next-token cross-entropy over its
    /// targets) and the number of target tokens; `None` without targets.
    pub fn sample_loss(&self, s: &VlmSample) -> Result<Option<(f32, usize)>> {
        let mut h = self.embed(s)?;
        for b in 0..self.num_blocks() {
            h = self.block_forward(b, &h, s, None)?;
        }
        let n = s
            .targets
            .iter()
            .enumerate()
            .skip(1)
            .filter(|&(t, &b)| b && t < s.valid_len)
            .count();
        Ok(self.loss_and_grad(&h, s)?.map(|(l, _)| (l, n)))
    }
}
