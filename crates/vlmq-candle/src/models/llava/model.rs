//! [`LlavaModel`]: a LLaVA-style vision-language model, i.e. a CLIP vision
//! tower, a 2-layer GELU projector and a Llama-family language model.
//!
//! Forward pass (as transformers' `LlavaForConditionalGeneration`):
//! 1. the tower runs on `pixel_values: [N, 3, H, W]` up to the configured
//!    feature layer (`vision_feature_layer`, e.g. -2 = output of the
//!    second-to-last encoder layer; the post-LayerNorm is never applied);
//! 2. strategy `"default"` drops the class token (`"full"` keeps it);
//! 3. the projector maps each feature to the LM width:
//!    `linear_2(gelu(linear_1(f)))` (exact erf GELU);
//! 4. the token ids must already hold one `<image>` token per feature: the
//!    features replace those tokens' embeddings in order over the flattened
//!    batch (image 0 fills the first `<image>` slots); a count mismatch is an
//!    error, never a silent truncation;
//! 5. the LM runs on the result.

use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use vlmq::{Error, Result};

use crate::error::CandleResultExt;
use crate::models::clip::{clip_layer_forward, embed_images, ClipVisionConfig, VisionWeights};
use crate::models::llama::forward::{linear, Hooks};
use crate::models::llama::model::LlamaModel;
use crate::models::llama::weights::Linear;

/// How the tensors of a LLaVA checkpoint are spelled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LlavaNaming {
    /// Prefix of the vision tower, e.g. `vision_tower.` or `vision_tower.vision_model.`.
    pub vision: String,
    /// Prefix of the projector, e.g. `multi_modal_projector.`.
    pub projector: String,
    /// Prefix that replaces the decoder's `model.`, e.g. `language_model.model.`.
    pub lm: String,
    /// Name of a separate LM head (`language_model.lm_head.weight` or `lm_head.weight`).
    pub lm_head: String,
}

/// LLaVA-specific configuration (the vision and text parts have their own).
#[derive(Debug, Clone, PartialEq)]
pub struct LlavaConfig {
    /// The vision tower.
    pub vision: ClipVisionConfig,
    /// Id of the `<image>` token.
    pub image_token_id: u32,
    /// Encoder layers run to produce the features (from `vision_feature_layer`).
    pub feature_layers: usize,
    /// Keep the class token (`vision_feature_select_strategy = "full"`).
    pub keep_class_token: bool,
    /// The projector's linears carry biases.
    pub projector_bias: bool,
}

impl LlavaConfig {
    /// Reads the LLaVA fields of a `config.json` object (`vision_config` included).
    pub fn from_hf_json(v: &Value, path: &std::path::Path) -> Result<Self> {
        let bad = |reason: String| Error::Json {
            path: path.to_path_buf(),
            reason,
        };
        let vc = v
            .get("vision_config")
            .ok_or_else(|| bad("no vision_config object".into()))?;
        let vision = ClipVisionConfig::from_hf_json(vc, path)?;
        let image_token_id =
            v.get("image_token_index")
                .or_else(|| v.get("image_token_id"))
                .and_then(Value::as_u64)
                .ok_or_else(|| bad("missing image_token_index".into()))? as u32;
        let layer = v
            .get("vision_feature_layer")
            .map_or(Some(-2), Value::as_i64)
            .ok_or_else(|| {
                bad("vision_feature_layer must be one integer (lists are not supported)".into())
            })?;
        // hidden_states has num_layers + 1 entries (0 = after pre_layrnorm).
        let n = i64::try_from(vision.num_layers)
            .ok()
            .and_then(|n| n.checked_add(1))
            .ok_or_else(|| bad(format!("vision num_hidden_layers {}", vision.num_layers)))?;
        let idx = if layer < 0 { n + layer } else { layer };
        if !(0..n).contains(&idx) {
            return Err(bad(format!(
                "vision_feature_layer {layer} is outside the tower's {n} hidden states"
            )));
        }
        let strategy = v
            .get("vision_feature_select_strategy")
            .and_then(Value::as_str)
            .unwrap_or("default");
        let keep_class_token = match strategy {
            "default" => false,
            "full" => true,
            o => {
                return Err(bad(format!(
                    "vision_feature_select_strategy {o:?} is not supported (default, full)"
                )))
            }
        };
        let act = v
            .get("projector_hidden_act")
            .and_then(Value::as_str)
            .unwrap_or("gelu");
        if act != "gelu" {
            return Err(bad(format!(
                "projector_hidden_act {act:?} is not supported (gelu)"
            )));
        }
        Ok(LlavaConfig {
            vision,
            image_token_id,
            feature_layers: idx as usize,
            keep_class_token,
            projector_bias: v
                .get("multimodal_projector_bias")
                .and_then(Value::as_bool)
                .unwrap_or(true),
        })
    }

    /// Features (= `<image>` tokens) per image.
    pub fn tokens_per_image(&self) -> usize {
        self.vision.num_patches() + usize::from(self.keep_class_token)
    }
}

/// The projector: `linear_2(gelu(linear_1(x)))`.
#[derive(Debug, Clone)]
pub struct Projector {
    /// `linear_1` `[text hidden, vision hidden]`.
    pub linear_1: Linear,
    /// `linear_2` `[text hidden, text hidden]`.
    pub linear_2: Linear,
}

/// The names of the projector's two linears, in forward order.
pub const PROJECTOR_LINEAR_NAMES: [&str; 2] = ["linear_1", "linear_2"];

/// A LLaVA model: vision tower, projector, language model.
#[derive(Debug, Clone)]
pub struct LlavaModel {
    pub(crate) cfg: LlavaConfig,
    pub(crate) vision: VisionWeights,
    pub(crate) projector: Projector,
    pub(crate) lm: LlamaModel,
    pub(crate) naming: LlavaNaming,
    pub(crate) raw_config: Value,
}

impl LlavaModel {
    /// Assembles a model from checked parts; `raw_config` is the `config.json`
    /// object (written back unchanged by the exporter).
    pub fn new(
        cfg: LlavaConfig,
        vision: VisionWeights,
        projector: Projector,
        lm: LlamaModel,
        naming: LlavaNaming,
        raw_config: Value,
    ) -> Result<Self> {
        if vision.layers.len() != cfg.vision.num_layers {
            return Err(Error::shape(
                "vision encoder layers",
                &[cfg.vision.num_layers],
                &[vision.layers.len()],
            ));
        }
        if (cfg.image_token_id as usize) >= lm.config().vocab_size {
            return Err(Error::InvalidConfig {
                field: "image_token_index",
                value: cfg.image_token_id.to_string(),
                reason: "the <image> token must be inside the LM vocabulary",
            });
        }
        Ok(LlavaModel {
            cfg,
            vision,
            projector,
            lm,
            naming,
            raw_config,
        })
    }

    /// The LLaVA configuration.
    pub fn config(&self) -> &LlavaConfig {
        &self.cfg
    }

    /// The language model.
    pub fn language_model(&self) -> &LlamaModel {
        &self.lm
    }

    /// The vision tower's parameters.
    pub fn vision_weights(&self) -> &VisionWeights {
        &self.vision
    }

    /// The projector's parameters.
    pub fn projector(&self) -> &Projector {
        &self.projector
    }

    /// How this checkpoint spells its tensor names.
    pub fn naming(&self) -> &LlavaNaming {
        &self.naming
    }

    /// The `config.json` object the model was loaded from.
    pub fn raw_config(&self) -> &Value {
        &self.raw_config
    }

    /// The device.
    pub fn device(&self) -> &Device {
        self.lm.device()
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.lm.dtype()
    }

    /// Checks `pixels: [N, C, H, W]` against the vision config (`N >= 1`).
    pub(crate) fn check_pixels(&self, pixels: &Tensor) -> Result<()> {
        let v = &self.cfg.vision;
        let want = [v.num_channels, v.image_size, v.image_size];
        let d = pixels.dims();
        if d.len() != 4 || d[1..] != want || d[0] == 0 {
            let mut exp = vec![d.first().copied().unwrap_or(1).max(1)];
            exp.extend_from_slice(&want);
            return Err(Error::shape("pixel_values [N, C, H, W]", &exp, d));
        }
        Ok(())
    }

    /// The tower's embeddings of `pixels` (after `pre_layrnorm`): `[N, 1 + patches, d]`.
    pub fn vision_embed(&self, pixels: &Tensor) -> Result<Tensor> {
        self.check_pixels(pixels)?;
        embed_images(&self.cfg.vision, &self.vision, pixels).at_model()
    }

    /// The selected vision layer `[N, 1 + patches, d]` (class token first):
    /// what LLaVA feeds the projector before dropping the class token.
    pub fn vision_hidden(&self, pixels: &Tensor) -> Result<Tensor> {
        let mut x = self.vision_embed(pixels)?;
        for (i, l) in self.vision.layers[..self.cfg.feature_layers]
            .iter()
            .enumerate()
        {
            x = clip_layer_forward(&self.cfg.vision, l, &x, None, None).in_block(i)?;
        }
        Ok(x)
    }

    /// The projector on the selected layer `[N, 1 + patches, dv]`: image
    /// features `[N, tokens_per_image, d_text]`. `probes` (two zero tensors)
    /// are added to the linears' outputs for a backward pass.
    pub(crate) fn project(
        &self,
        hidden: &Tensor,
        mut capture: Option<&mut dyn vlmq::RowSink>,
        probes: Option<&[Tensor]>,
    ) -> candle_core::Result<Tensor> {
        let x = if self.cfg.keep_class_token {
            hidden.clone()
        } else {
            let s = hidden.dim(1)?;
            hidden.narrow(1, 1, s - 1)?
        };
        let lin = |i: usize, t: &Tensor| -> candle_core::Result<Tensor> {
            let l = [&self.projector.linear_1, &self.projector.linear_2][i];
            let y = linear(t, l)?;
            match probes {
                Some(p) => y + &p[i],
                None => Ok(y),
            }
        };
        if let Some(s) = capture.as_deref_mut() {
            s.rows(
                PROJECTOR_LINEAR_NAMES[0],
                crate::models::llama::forward::rows(&x)?.view(),
            );
        }
        let h = lin(0, &x)?.gelu_erf()?;
        if let Some(s) = capture {
            s.rows(
                PROJECTOR_LINEAR_NAMES[1],
                crate::models::llama::forward::rows(&h)?.view(),
            );
        }
        lin(1, &h)
    }

    /// Image features `[N, tokens_per_image, d_text]` of `pixels: [N, C, H, W]`.
    pub fn image_features(&self, pixels: &Tensor) -> Result<Tensor> {
        let h = self.vision_hidden(pixels)?;
        self.project(&h, None, None).at_model()
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

    /// The LM's input embeddings `[B, T, d]` with `features: [N, P, d]`
    /// (or `None` without images) written over the `<image>` tokens, in
    /// order over the flattened batch. The count of `<image>` tokens must
    /// equal `N * P`.
    pub fn merge_embeddings(&self, batch: &[&[u32]], features: Option<&Tensor>) -> Result<Tensor> {
        let text = self.lm.embed_batch(batch)?;
        let pos = self.image_positions(batch);
        let nfeat = match features {
            Some(f) => f.dims3().at_model()?.0 * f.dim(1).at_model()?,
            None => 0,
        };
        if pos.len() != nfeat {
            return Err(Error::InvalidConfig {
                field: "<image> tokens",
                value: format!("{} <image> tokens for {nfeat} image features", pos.len()),
                reason: "the ids must hold exactly one <image> token per image feature \
                         (tokens_per_image per image)",
            });
        }
        let Some(f) = features else {
            return Ok(text);
        };
        let (b, t, d) = text.dims3().at_model()?;
        let run = || -> candle_core::Result<Tensor> {
            // Gather from [text rows; feature rows]: index t for a text
            // token, b*t + k for the k-th <image> token (differentiable).
            let mut idx: Vec<u32> = (0..(b * t) as u32).collect();
            for (k, &p) in pos.iter().enumerate() {
                idx[p] = (b * t + k) as u32;
            }
            let all = Tensor::cat(
                &[
                    &text.reshape((b * t, d))?,
                    &f.to_dtype(text.dtype())?.reshape((nfeat, d))?,
                ],
                0,
            )?;
            let idx = Tensor::from_vec(idx, b * t, text.device())?;
            all.index_select(&idx, 0)?.reshape((b, t, d))
        };
        run().at_model()
    }

    /// The LM's hidden states for a batch (embeddings with the image features
    /// merged, then every decoder layer's output, the last before the final
    /// norm). `pixels` holds the batch's images in `<image>` order.
    pub fn hidden_states(&self, batch: &[&[u32]], pixels: Option<&Tensor>) -> Result<Vec<Tensor>> {
        let feats = pixels.map(|p| self.image_features(p)).transpose()?;
        let mut h = self.merge_embeddings(batch, feats.as_ref())?;
        let pos = self.lm.positional(h.dim(1).at_model()?)?;
        let mut out = vec![h.clone()];
        for i in 0..self.lm.config().num_layers {
            h = self.lm.layer(i, &h, &pos, &mut Hooks::none())?;
            out.push(h.clone());
        }
        Ok(out)
    }

    /// Logits `[B, T, vocab]`.
    pub fn logits(&self, batch: &[&[u32]], pixels: Option<&Tensor>) -> Result<Tensor> {
        let hs = self.hidden_states(batch, pixels)?;
        self.lm.head_logits(hs.last().expect("embeddings"), false)
    }
}
