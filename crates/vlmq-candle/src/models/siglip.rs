//! A SigLIP vision tower as SmolVLM / Idefics3 use it: a convolutional
//! patch embedding with bias, learned positions (no class token, no
//! pre-norm), pre-LN encoder layers with a tanh-GELU MLP, then
//! `post_layernorm`.
//!
//! The encoder layer is CLIP's ([`encoder_layer_forward`]) with another
//! activation: `x = x + out_proj(attn(layer_norm1(x)))`, then
//! `x = x + fc2(gelu_tanh(fc1(layer_norm2(x))))`.
//!
//! Only full frames are supported (every frame `image_size` square, as the
//! SmolVLM processor cuts them): transformers then uses positions
//! `0..patches` row-major and no attention mask, which is what runs here.

use std::path::Path;

use candle_core::Tensor;
use serde_json::Value;
use vlmq::{Error, Result, RowSink};

use crate::models::clip::{layer_norm, tower_addressable, ClipLayerWeights, LayerNorm};
use crate::models::vision_ops::MlpAct;
use crate::models::vit_encoder::{encoder_layer_forward, EncoderShape};

/// Configuration of a SigLIP vision tower (`vision_config` of a SmolVLM config).
#[derive(Debug, Clone, PartialEq)]
pub struct SiglipVisionConfig {
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Encoder layers.
    pub num_layers: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// Square frame side in pixels.
    pub image_size: usize,
    /// Square patch side in pixels.
    pub patch_size: usize,
    /// Input channels.
    pub num_channels: usize,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
}

impl SiglipVisionConfig {
    /// Reads a `vision_config` object (`path` names the file in errors).
    pub fn from_hf_json(v: &Value, path: &Path) -> Result<Self> {
        let get = |k: &str| -> Result<usize> {
            v.get(k)
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .filter(|&x| x > 0)
                .ok_or_else(|| {
                    Error::field(
                        path,
                        format!("vision_config.{k}"),
                        "missing or not a positive integer",
                    )
                })
        };
        let act = v
            .get("hidden_act")
            .and_then(Value::as_str)
            .unwrap_or("gelu_pytorch_tanh");
        if !matches!(act, "gelu_pytorch_tanh" | "gelu_tanh" | "gelu_new") {
            return Err(Error::field(
                path,
                "vision_config.hidden_act",
                format!("{act:?} is not supported (gelu_pytorch_tanh)"),
            ));
        }
        let cfg = SiglipVisionConfig {
            hidden_size: get("hidden_size")?,
            intermediate_size: get("intermediate_size")?,
            num_layers: get("num_hidden_layers")?,
            num_heads: get("num_attention_heads")?,
            image_size: get("image_size")?,
            patch_size: get("patch_size")?,
            num_channels: v
                .get("num_channels")
                .and_then(Value::as_u64)
                .map_or(3, |x| x as usize),
            layer_norm_eps: v
                .get("layer_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6),
        };
        if !cfg.hidden_size.is_multiple_of(cfg.num_heads)
            || !cfg.image_size.is_multiple_of(cfg.patch_size)
        {
            return Err(Error::field(
                path,
                "vision_config",
                format!(
                    "hidden_size {} must split into {} heads and image_size {} into patches of {}",
                    cfg.hidden_size, cfg.num_heads, cfg.image_size, cfg.patch_size
                ),
            ));
        }
        if !tower_addressable(
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_channels,
            cfg.patch_size,
            cfg.grid(),
        ) {
            return Err(Error::field(
                path,
                "vision_config",
                format!("sizes too large for the tower's weights: {cfg:?}"),
            ));
        }
        Ok(cfg)
    }

    /// Patches per side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Patches per frame.
    pub fn num_patches(&self) -> usize {
        self.grid() * self.grid()
    }

    pub(crate) fn shape(&self) -> EncoderShape {
        EncoderShape {
            num_heads: self.num_heads,
            eps: self.layer_norm_eps,
            act: MlpAct::GeluTanh,
        }
    }
}

/// Every parameter of a SigLIP vision tower.
#[derive(Debug, Clone)]
pub struct SiglipWeights {
    /// Patch convolution kernel `[d, channels, patch, patch]`.
    pub patch_embedding: Tensor,
    /// Patch convolution bias `[d]`.
    pub patch_bias: Tensor,
    /// Learned positions `[patches, d]`.
    pub position_embedding: Tensor,
    /// Encoder layers (same parameters as CLIP's).
    pub layers: Vec<ClipLayerWeights>,
    /// LayerNorm after the last layer.
    pub post_norm: LayerNorm,
}

/// Embeddings of full frames `pixels: [N, C, S, S]`: patches row-major plus
/// positions, `[N, patches, d]` (the input of encoder layer 0).
pub(crate) fn siglip_embed(
    cfg: &SiglipVisionConfig,
    w: &SiglipWeights,
    pixels: &Tensor,
) -> candle_core::Result<Tensor> {
    let d = cfg.hidden_size;
    let p = pixels.to_dtype(w.patch_embedding.dtype())?.conv2d(
        &w.patch_embedding,
        0,
        cfg.patch_size,
        1,
        1,
    )?; // [N, d, g, g]
    let p = p
        .broadcast_add(&w.patch_bias.reshape((1, d, 1, 1))?)?
        .flatten_from(2)?
        .transpose(1, 2)?; // [N, patches, d]
    p.broadcast_add(&w.position_embedding.unsqueeze(0)?)
}

/// SigLIP encoder layer `l` on `x: [N, patches, d]`; `capture` and `probes`
/// as in CLIP's layer (linears in `VISION_LINEAR_NAMES` order).
pub(crate) fn siglip_layer_forward(
    cfg: &SiglipVisionConfig,
    l: &ClipLayerWeights,
    x: &Tensor,
    capture: Option<&mut dyn RowSink>,
    probes: Option<&[Tensor]>,
) -> candle_core::Result<Tensor> {
    encoder_layer_forward(&cfg.shape(), l, x, capture, probes)
}

/// `post_layernorm` on the last layer's output.
pub(crate) fn siglip_post_norm(
    cfg: &SiglipVisionConfig,
    w: &SiglipWeights,
    x: &Tensor,
) -> candle_core::Result<Tensor> {
    layer_norm(x, &w.post_norm, cfg.layer_norm_eps)
}
