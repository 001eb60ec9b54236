//! [`SmolVlmModel`]: SigLIP tower, pixel-shuffle connector, Llama LM.
//!
//! Forward pass (as transformers' `SmolVLMForConditionalGeneration`):
//! 1. the tower runs on the batch's real frames `[N, C, S, S]` (padding
//!    frames, entirely 0.0, are dropped first: [`SmolVlmModel::real_frames`]),
//!    then `post_layernorm`;
//! 2. the connector maps each frame's patches to `tokens_per_frame` features;
//! 3. the features replace the `<image>` embeddings in order over the
//!    flattened batch (a count mismatch is an error);
//! 4. the Llama decoder runs with positions `0..T`.

use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use vlmq::{Error, Result};

use super::config::SmolVlmConfig;
use crate::error::CandleResultExt;
use crate::models::idefics3::{connector_forward, Connector};
use crate::models::llama::forward::Hooks;
use crate::models::llama::model::LlamaModel;
use crate::models::siglip::{siglip_embed, siglip_layer_forward, siglip_post_norm, SiglipWeights};

/// How a SmolVLM checkpoint spells its tensor prefixes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmolVlmNaming {
    /// The vision tower, e.g. `model.vision_model.`.
    pub vision: String,
    /// The connector, e.g. `model.connector.`.
    pub connector: String,
    /// What replaces the decoder's `model.`, e.g. `model.text_model.`.
    pub lm: String,
    /// An untied LM head's name (`lm_head.weight`).
    pub lm_head: String,
}

/// A SmolVLM model.
#[derive(Debug, Clone)]
pub struct SmolVlmModel {
    pub(crate) cfg: SmolVlmConfig,
    pub(crate) vision: SiglipWeights,
    pub(crate) connector: Connector,
    pub(crate) lm: LlamaModel,
    pub(crate) naming: SmolVlmNaming,
    pub(crate) raw_config: Value,
}

/// The tower's intermediates for one set of frames.
#[derive(Debug, Clone)]
pub struct SmolVlmTrace {
    /// The input of every encoder layer `[N, patches, d]` (layer 0's is the
    /// patch embeddings plus positions).
    pub block_inputs: Vec<Tensor>,
    /// The last layer's output after `post_layernorm` `[N, patches, d]`.
    pub last_hidden: Tensor,
    /// Connector output `[N * tokens_per_frame, text hidden]`, frames in order.
    pub features: Tensor,
}

impl SmolVlmModel {
    /// Assembles a model from checked parts; `raw_config` is the
    /// `config.json` object (written back unchanged by the exporter).
    pub fn new(
        cfg: SmolVlmConfig,
        vision: SiglipWeights,
        connector: Connector,
        lm: LlamaModel,
        naming: SmolVlmNaming,
        raw_config: Value,
    ) -> Result<Self> {
        if vision.layers.len() != cfg.vision.num_layers {
            return Err(Error::shape(
                "vision encoder layers",
                &[cfg.vision.num_layers],
                &[vision.layers.len()],
            ));
        }
        if lm.config() != &cfg.text {
            return Err(Error::InvalidConfig {
                field: "text_config",
                value: format!("{:?}", lm.config()),
                reason: "the language model must follow the configuration's text part",
            });
        }
        Ok(SmolVlmModel {
            cfg,
            vision,
            connector,
            lm,
            naming,
            raw_config,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &SmolVlmConfig {
        &self.cfg
    }

    /// The vision tower's parameters.
    pub fn vision_weights(&self) -> &SiglipWeights {
        &self.vision
    }

    /// The connector's parameters.
    pub fn connector(&self) -> &Connector {
        &self.connector
    }

    /// The language model.
    pub fn language_model(&self) -> &LlamaModel {
        &self.lm
    }

    /// How this checkpoint spells its tensor names.
    pub fn naming(&self) -> &SmolVlmNaming {
        &self.naming
    }

    /// The `config.json` object the model was loaded from.
    pub fn raw_config(&self) -> &Value {
        &self.raw_config
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.lm.dtype()
    }

    /// The device.
    pub fn device(&self) -> &Device {
        self.lm.device()
    }

    /// The real frames of a processor batch `pixel_values: [B, F, C, S, S]`
    /// as `[N, C, S, S]`, in order: frames that are entirely 0.0 are
    /// padding and dropped, as transformers does. `None` when no frame is real.
    pub fn real_frames(pixel_values: &Tensor) -> Result<Option<Tensor>> {
        let d = pixel_values.dims();
        if d.len() != 5 {
            return Err(Error::shape(
                "pixel_values [B, frames, C, S, S]",
                &[1, 1, 3, 1, 1],
                d,
            ));
        }
        let run = || -> candle_core::Result<Option<Tensor>> {
            let frames = pixel_values.flatten_to(1)?; // [B*F, C, S, S]
            let nonzero = frames
                .ne(0f64)?
                .to_dtype(DType::F32)?
                .flatten_from(1)?
                .sum(1)?
                .to_vec1::<f32>()?;
            let keep: Vec<u32> = (0..nonzero.len() as u32)
                .filter(|&i| nonzero[i as usize] > 0.0)
                .collect();
            if keep.is_empty() {
                return Ok(None);
            }
            let idx = Tensor::from_vec(keep.clone(), keep.len(), frames.device())?;
            frames.index_select(&idx, 0).map(Some)
        };
        run().at_model()
    }

    /// Checks full frames `pixels: [N, C, S, S]` against the vision config.
    pub(crate) fn check_frames(&self, pixels: &Tensor) -> Result<()> {
        let v = &self.cfg.vision;
        let want = [v.num_channels, v.image_size, v.image_size];
        let d = pixels.dims();
        if d.len() != 4 || d[1..] != want || d[0] == 0 {
            let mut exp = vec![d.first().copied().unwrap_or(1).max(1)];
            exp.extend_from_slice(&want);
            return Err(Error::shape("frames [N, C, S, S]", &exp, d));
        }
        Ok(())
    }

    /// Runs the tower and connector on frames `[N, C, S, S]`, keeping every
    /// encoder layer's input.
    // Reached by the tests that compare the tower with transformers'.
    #[doc(hidden)]
    pub fn vision_trace(&self, pixels: &Tensor) -> Result<SmolVlmTrace> {
        self.check_frames(pixels)?;
        let v = &self.cfg.vision;
        let mut x =
            siglip_embed(v, &self.vision, &pixels.to_dtype(self.dtype()).at_model()?).at_model()?;
        let mut block_inputs = Vec::with_capacity(v.num_layers);
        for (i, l) in self.vision.layers.iter().enumerate() {
            block_inputs.push(x.clone());
            x = siglip_layer_forward(v, l, &x, None, None).in_block(i)?;
        }
        let last_hidden = siglip_post_norm(v, &self.vision, &x).in_block(v.num_layers)?;
        let features = connector_forward(
            &self.connector,
            &last_hidden,
            self.cfg.scale_factor,
            None,
            None,
        )
        .and_then(|f| f.flatten_to(1))
        .in_block(v.num_layers)?;
        Ok(SmolVlmTrace {
            block_inputs,
            last_hidden,
            features,
        })
    }

    /// Image features `[N * tokens_per_frame, text hidden]` of frames `[N, C, S, S]`.
    pub fn image_features(&self, pixels: &Tensor) -> Result<Tensor> {
        Ok(self.vision_trace(pixels)?.features)
    }

    /// Positions (flattened over the batch) of the `<image>` tokens.
    pub fn image_positions(&self, batch: &[&[u32]]) -> Vec<usize> {
        let id = self.cfg.image_token_id;
        batch
            .iter()
            .flat_map(|r| r.iter())
            .enumerate()
            .filter(|(_, &t)| t == id)
            .map(|(i, _)| i)
            .collect()
    }

    /// Input embeddings `[B, T, hidden]` with `features` (one row per
    /// `<image>` token over the flattened batch, in order) in their place.
    pub fn merge_embeddings(&self, batch: &[&[u32]], features: Option<&Tensor>) -> Result<Tensor> {
        let e = self.lm.embed_batch(batch)?;
        let (b, t, d) = e.dims3().at_model()?;
        let slots = self.image_positions(batch);
        let have = features.map_or(Ok(0), |f| f.dim(0)).at_model()?;
        if have != slots.len() {
            return Err(Error::InvalidConfig {
                field: "<image> tokens",
                value: format!("{} <image> tokens for {have} image features", slots.len()),
                reason: "the ids must hold exactly one <image> token per image feature \
                         (tokens_per_frame per frame)",
            });
        }
        let Some(f) = features else {
            return Ok(e);
        };
        let mut index: Vec<u32> = (0..(b * t) as u32).collect();
        for (k, &p) in slots.iter().enumerate() {
            index[p] = (b * t + k) as u32;
        }
        let run = || -> candle_core::Result<Tensor> {
            // Gather from [text rows; feature rows] (differentiable in both).
            let table = Tensor::cat(&[&e.reshape((b * t, d))?, &f.to_dtype(e.dtype())?], 0)?;
            let idx = Tensor::from_vec(index, b * t, e.device())?;
            table.index_select(&idx, 0)?.reshape((b, t, d))
        };
        run().at_model()
    }

    /// Hidden states: the merged embeddings, then every decoder layer's
    /// output (the last before the final norm). `frames` holds the batch's
    /// real frames in `<image>` order.
    pub fn hidden_states(&self, batch: &[&[u32]], frames: Option<&Tensor>) -> Result<Vec<Tensor>> {
        let feats = frames.map(|p| self.image_features(p)).transpose()?;
        let mut h = self.merge_embeddings(batch, feats.as_ref())?;
        let pos = self.lm.positional(h.dim(1).at_model()?)?;
        let mut out = vec![h.clone()];
        for i in 0..self.cfg.text.num_layers {
            h = self.lm.layer(i, &h, &pos, &mut Hooks::none())?;
            out.push(h.clone());
        }
        Ok(out)
    }

    /// Logits `[B, T, vocab]`.
    pub fn logits(&self, batch: &[&[u32]], frames: Option<&Tensor>) -> Result<Tensor> {
        let hs = self.hidden_states(batch, frames)?;
        let last = hs.last().ok_or(Error::Empty {
            what: "decoder layers".into(),
        })?;
        self.lm.head_logits(last, false)
    }
}
