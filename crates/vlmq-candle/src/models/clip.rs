//! A CLIP vision tower: convolutional patch embedding, class token, learned
//! positions, pre-LayerNorm, then pre-LN encoder layers (bidirectional
//! attention with biases, quick-GELU MLP).
//!
//! Layer maths, for `x: [N, S, d]` (`N` images, `S = 1 + patches` tokens):
//! `x = x + out_proj(attn(layer_norm1(x)))`, then
//! `x = x + fc2(quick_gelu(fc1(layer_norm2(x))))` with
//! `quick_gelu(z) = z * sigmoid(1.702 z)`; attention has no mask.

use candle_core::{Tensor, D};
use serde_json::Value;
use vlmq::{Error, Result, RowSink};

use crate::models::llama::weights::Linear;
use crate::models::sizes::addressable;
use crate::models::vision_ops::MlpAct;
use crate::models::vit_encoder::{encoder_layer_forward, EncoderShape};

/// The six quantizable linears of a CLIP encoder layer, by their HF names
/// (relative to `encoder.layers.N.`), in forward order.
pub const VISION_LINEAR_NAMES: [&str; 6] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "mlp.fc1",
    "mlp.fc2",
];

/// Configuration of a CLIP vision tower (`vision_config` of a LLaVA config).
#[derive(Debug, Clone, PartialEq)]
pub struct ClipVisionConfig {
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Encoder layers in the checkpoint.
    pub num_layers: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// Square input image side in pixels.
    pub image_size: usize,
    /// Square patch side in pixels.
    pub patch_size: usize,
    /// Input channels.
    pub num_channels: usize,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
}

fn bad(path: &std::path::Path, reason: impl Into<String>) -> Error {
    Error::Json {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// A ViT tower's weights fit in memory's address range (the loaders and
/// the forward multiply these sizes): the patch kernel, the position table
/// (one row per patch and a class row), the MLP.
pub(crate) fn tower_addressable(
    hidden: usize,
    intermediate: usize,
    channels: usize,
    patch: usize,
    grid: usize,
) -> bool {
    let rows = grid.checked_mul(grid).and_then(|n| n.checked_add(1));
    addressable(&[hidden, channels, patch, patch])
        && rows.is_some_and(|n| addressable(&[n, hidden]))
        && addressable(&[hidden, intermediate])
}

impl ClipVisionConfig {
    /// Reads a `vision_config` object (`path` is only used in errors).
    pub fn from_hf_json(v: &Value, path: &std::path::Path) -> Result<Self> {
        let get = |k: &str| -> Result<usize> {
            v.get(k)
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .ok_or_else(|| bad(path, format!("vision_config: missing integer {k:?}")))
        };
        let act = v
            .get("hidden_act")
            .and_then(Value::as_str)
            .unwrap_or("quick_gelu");
        if act != "quick_gelu" {
            return Err(bad(
                path,
                format!("vision_config.hidden_act {act:?} is not supported (only quick_gelu)"),
            ));
        }
        let cfg = ClipVisionConfig {
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
                .unwrap_or(1e-5),
        };
        let ok = cfg.hidden_size > 0
            && cfg.num_heads > 0
            && cfg.hidden_size.is_multiple_of(cfg.num_heads)
            && cfg.patch_size > 0
            && cfg.image_size.is_multiple_of(cfg.patch_size)
            && cfg.image_size > 0
            && cfg.intermediate_size > 0
            && cfg.num_channels > 0
            && tower_addressable(
                cfg.hidden_size,
                cfg.intermediate_size,
                cfg.num_channels,
                cfg.patch_size,
                cfg.grid(),
            );
        if !ok {
            return Err(bad(path, format!("inconsistent vision_config {cfg:?}")));
        }
        Ok(cfg)
    }

    /// Patches per side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Patches per image.
    pub fn num_patches(&self) -> usize {
        self.grid() * self.grid()
    }

    /// Width of one head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// What an encoder layer needs besides its weights.
    pub(crate) fn shape(&self) -> EncoderShape {
        EncoderShape {
            num_heads: self.num_heads,
            eps: self.layer_norm_eps,
            act: MlpAct::QuickGelu,
        }
    }
}

/// A LayerNorm's gain and shift.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    /// Gain `[d]`.
    pub weight: Tensor,
    /// Shift `[d]`.
    pub bias: Tensor,
}

/// The parameters of one CLIP encoder layer.
#[derive(Debug, Clone)]
pub struct ClipLayerWeights {
    /// LayerNorm before attention.
    pub norm1: LayerNorm,
    /// LayerNorm before the MLP.
    pub norm2: LayerNorm,
    /// The six linears in [`VISION_LINEAR_NAMES`] order (all with biases).
    pub linears: [Linear; 6],
}

impl ClipLayerWeights {
    /// Mutable access to the linear named `name` (one of [`VISION_LINEAR_NAMES`]).
    pub fn linear_mut(&mut self, name: &str) -> Option<&mut Linear> {
        VISION_LINEAR_NAMES
            .iter()
            .position(|n| *n == name)
            .map(move |i| &mut self.linears[i])
    }

    /// The linear named `name`.
    pub fn linear(&self, name: &str) -> Option<&Linear> {
        VISION_LINEAR_NAMES
            .iter()
            .position(|n| *n == name)
            .map(|i| &self.linears[i])
    }
}

/// Every parameter of a CLIP vision tower.
#[derive(Debug, Clone)]
pub struct VisionWeights {
    /// Patch convolution kernel `[d, channels, patch, patch]` (no bias).
    pub patch_embedding: Tensor,
    /// Class token `[d]`.
    pub class_embedding: Tensor,
    /// Learned positions `[1 + patches, d]`.
    pub position_embedding: Tensor,
    /// LayerNorm after the embeddings (`pre_layrnorm`, HF's spelling).
    pub pre_norm: LayerNorm,
    /// Encoder layers.
    pub layers: Vec<ClipLayerWeights>,
    /// Final LayerNorm (kept for export; LLaVA never applies it).
    pub post_norm: LayerNorm,
}

/// `(x - mean) / sqrt(var + eps) * w + b` over the last dimension: one
/// fused pass on the CPU, composed from primitives when `x` is part of an
/// autograd graph (the fused kernel has no backward) or off the CPU.
pub(crate) fn layer_norm(x: &Tensor, n: &LayerNorm, eps: f64) -> candle_core::Result<Tensor> {
    let composed = || {
        let mean = x.mean_keepdim(D::Minus1)?;
        let c = x.broadcast_sub(&mean)?;
        let var = c.sqr()?.mean_keepdim(D::Minus1)?;
        c.broadcast_div(&(var + eps)?.sqrt()?)?
            .broadcast_mul(&n.weight)?
            .broadcast_add(&n.bias)
    };
    if x.track_op() {
        return composed();
    }
    crate::backend::fused::layer_norm(x, &n.weight, &n.bias, eps, composed)
}

/// Embeddings of `pixels: [N, C, H, W]`: patches (row-major), class token
/// first, positions added, then `pre_layrnorm`. Returns `[N, 1 + patches, d]`.
pub(crate) fn embed_images(
    cfg: &ClipVisionConfig,
    w: &VisionWeights,
    pixels: &Tensor,
) -> candle_core::Result<Tensor> {
    let n = pixels.dim(0)?;
    let d = cfg.hidden_size;
    let p = pixels.to_dtype(w.patch_embedding.dtype())?.conv2d(
        &w.patch_embedding,
        0,
        cfg.patch_size,
        1,
        1,
    )?; // [N, d, g, g]
    let p = p.flatten_from(2)?.transpose(1, 2)?; // [N, patches, d]
    let cls = w.class_embedding.reshape((1, 1, d))?.expand((n, 1, d))?;
    let x = Tensor::cat(&[&cls, &p], 1)?.broadcast_add(&w.position_embedding.unsqueeze(0)?)?;
    layer_norm(&x, &w.pre_norm, cfg.layer_norm_eps)
}

/// One CLIP encoder layer on `x: [N, S, d]`. `capture` receives each linear's
/// input rows; `probes` (one per linear in [`VISION_LINEAR_NAMES`] order) are
/// added to each linear's output (the finite-difference tests perturb
/// linear outputs through them).
pub(crate) fn clip_layer_forward(
    cfg: &ClipVisionConfig,
    l: &ClipLayerWeights,
    x: &Tensor,
    capture: Option<&mut dyn RowSink>,
    probes: Option<&[Tensor]>,
) -> candle_core::Result<Tensor> {
    encoder_layer_forward(&cfg.shape(), l, x, capture, probes)
}
