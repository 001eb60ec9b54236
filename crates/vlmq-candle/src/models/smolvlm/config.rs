//! [`SmolVlmConfig`]: the fields of a SmolVLM / Idefics3 `config.json`.

use std::path::Path;

use serde_json::Value;
use vlmq::{Error, Result};

use crate::models::llama::config::LlamaConfig;
use crate::models::siglip::SiglipVisionConfig;
use crate::models::sizes::addressable;

/// A SmolVLM model's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct SmolVlmConfig {
    /// The SigLIP tower (`vision_config`).
    pub vision: SiglipVisionConfig,
    /// The Llama language model (`text_config`; the top-level
    /// `tie_word_embeddings` wins when present).
    pub text: LlamaConfig,
    /// Id of the `<image>` token (`image_token_id`).
    pub image_token_id: u32,
    /// Pixel-shuffle scale (`scale_factor`).
    pub scale_factor: usize,
}

impl SmolVlmConfig {
    /// Reads a `config.json` object (`path` names the file in errors).
    pub fn from_hf_json(v: &Value, path: &Path) -> Result<Self> {
        let vc = v
            .get("vision_config")
            .ok_or_else(|| Error::field(path, "vision_config", "missing object"))?;
        let vision = SiglipVisionConfig::from_hf_json(vc, path)?;
        let tc = v
            .get("text_config")
            .ok_or_else(|| Error::field(path, "text_config", "missing object"))?;
        let mut text = LlamaConfig::from_hf_json(tc, path)?;
        if let Some(tie) = v.get("tie_word_embeddings").and_then(Value::as_bool) {
            text.tie_embeddings = tie;
        }
        let image_token_id = v
            .get("image_token_id")
            .and_then(Value::as_u64)
            .filter(|&id| (id as usize) < text.vocab_size)
            .ok_or_else(|| {
                Error::field(
                    path,
                    "image_token_id",
                    "missing or outside the text vocabulary",
                )
            })? as u32;
        let scale_factor = v.get("scale_factor").and_then(Value::as_u64).unwrap_or(2) as usize;
        // The connector's weight is [text hidden, scale^2 * vision hidden].
        let connector = [
            scale_factor,
            scale_factor,
            vision.hidden_size,
            text.hidden_size,
        ];
        if scale_factor == 0
            || !vision.grid().is_multiple_of(scale_factor)
            || !addressable(&connector)
        {
            return Err(Error::field(
                path,
                "scale_factor",
                format!(
                    "{scale_factor} must divide the {} patches per side (and the connector's \
                     weight {connector:?} fit in memory)",
                    vision.grid()
                ),
            ));
        }
        Ok(SmolVlmConfig {
            vision,
            text,
            image_token_id,
            scale_factor,
        })
    }

    /// Image features (= `<image>` tokens) per frame.
    pub fn tokens_per_frame(&self) -> usize {
        let g = self.vision.grid() / self.scale_factor;
        g * g
    }

    /// Width of the connector's input (`scale^2 * vision hidden`).
    pub fn connector_in(&self) -> usize {
        self.scale_factor * self.scale_factor * self.vision.hidden_size
    }
}
