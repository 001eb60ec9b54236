//! The calibration sample of the Qwen2-VL backend.

use candle_core::Tensor;
use vlmq::{Error, Result};

use super::grid::ImageGrid;
use crate::process::chat_template::TokenRole;

/// One calibration sample of a Qwen2-VL-family model: token ids (each image
/// already expanded to one `<|image_pad|>` per merged patch), which tokens
/// are prediction targets, and the images as the processor gives them.
#[derive(Debug, Clone)]
pub struct QwenVlSample {
    /// Token ids.
    pub tokens: Vec<u32>,
    /// Per token: its prediction from the tokens before counts in the loss.
    pub targets: Vec<bool>,
    /// `pixel_values: [patches, values]` of every image, in token order;
    /// `None` for text only.
    pub pixels: Option<Tensor>,
    /// One grid per image, in the same order.
    pub grids: Vec<ImageGrid>,
}

impl QwenVlSample {
    /// Every token a target (as transformers' `labels = input_ids`).
    pub fn causal(tokens: Vec<u32>, pixels: Option<Tensor>, grids: Vec<ImageGrid>) -> Self {
        QwenVlSample {
            targets: vec![true; tokens.len()],
            tokens,
            pixels,
            grids,
        }
    }

    /// Drops the image-token positions from the targets (transformers'
    /// `-100` labels there).
    pub fn without_image_targets(mut self, image_token_id: u32) -> Self {
        for (t, &id) in self.targets.iter_mut().zip(&self.tokens) {
            if id == image_token_id {
                *t = false;
            }
        }
        self
    }

    /// A sample whose targets are the answer tokens only (VLMQ's
    /// answer-only task loss), from the roles the chat template gives
    /// (one per token).
    pub fn answer_only(
        tokens: Vec<u32>,
        roles: &[TokenRole],
        pixels: Option<Tensor>,
        grids: Vec<ImageGrid>,
    ) -> Result<Self> {
        if roles.len() != tokens.len() {
            return Err(Error::shape(
                "token roles (one per token)",
                &[tokens.len()],
                &[roles.len()],
            ));
        }
        let targets = roles.iter().map(|r| *r == TokenRole::Answer).collect();
        Ok(QwenVlSample {
            tokens,
            targets,
            pixels,
            grids,
        })
    }
}
