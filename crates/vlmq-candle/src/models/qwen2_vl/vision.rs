//! The Qwen2-VL / Qwen2.5-VL vision tower: patch embedding, pre-norm blocks
//! with 2-D rotary attention restricted to segments (images or windows),
//! and the patch merger.
//!
//! Block maths on the patch rows `x: [1, S, d]`:
//! `x = x + proj(attn(norm1(x)))`, `x = x + mlp(norm2(x))`, where
//! - `norm` is LayerNorm (Qwen2-VL) or RMSNorm (Qwen2.5-VL), eps 1e-6;
//! - `attn.qkv` gives q, k, v side by side, each split into heads;
//!   q and k are rotated (half-split form, angles `cat(row * f, col * f)`
//!   repeated twice), then softmax attention scaled by `head_dim^-1/2`
//!   runs independently inside each segment `[cu[i], cu[i+1])`;
//! - `mlp` is `fc2(quick_gelu(fc1(x)))` (Qwen2-VL) or
//!   `down(silu(gate(x)) * up(x))` with biases (Qwen2.5-VL).
//!
//! The block itself runs in [`super::vision_block`].
//!
//! The merger normalizes each patch (`ln_q`), concatenates the `m * m`
//! patches of a merge block and applies `mlp.2(gelu(mlp.0(.)))` (exact erf GELU).

use candle_core::{DType, Tensor};
use vlmq::RowSink;

use crate::models::clip::{layer_norm, LayerNorm};
use crate::models::llama::forward::{linear, rms_norm, rows};
use crate::models::llama::weights::Linear;
use crate::models::vision_ops::{layer_norm_keep, rms_norm_keep, NormTape};

use super::config::QwenVisionConfig;

/// The quantizable linears of a Qwen2-VL block (relative to `blocks.N.`), in forward order.
pub const QWEN2_VL_BLOCK_LINEARS: [&str; 4] = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"];

/// The quantizable linears of a Qwen2.5-VL block, in forward order.
pub const QWEN2_5_VL_BLOCK_LINEARS: [&str; 5] = [
    "attn.qkv",
    "attn.proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// The merger's linears (relative to `merger.`).
pub const MERGER_LINEARS: [&str; 2] = ["mlp.0", "mlp.2"];

/// Epsilon of every norm in the tower (fixed in transformers).
pub const VISION_NORM_EPS: f64 = 1e-6;

/// A norm of the tower.
#[derive(Debug, Clone)]
pub enum VisionNorm {
    /// LayerNorm with gain and shift (Qwen2-VL).
    Layer(LayerNorm),
    /// RMSNorm gain (Qwen2.5-VL).
    Rms(Tensor),
}

impl VisionNorm {
    /// Applies the norm over the last dimension (fused kernels, or
    /// differentiable primitives when `x` is part of an autograd graph).
    pub(crate) fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            VisionNorm::Layer(n) => layer_norm(x, n, VISION_NORM_EPS),
            VisionNorm::Rms(w) => rms_norm(x, w, VISION_NORM_EPS, x.track_op()),
        }
    }

    /// Applies the norm, keeping what its backward reads.
    pub(crate) fn apply_keep(&self, x: &Tensor) -> candle_core::Result<(Tensor, NormTape)> {
        match self {
            VisionNorm::Layer(n) => layer_norm_keep(x, n, VISION_NORM_EPS),
            VisionNorm::Rms(w) => rms_norm_keep(x, w, VISION_NORM_EPS),
        }
    }

    /// The gain.
    pub(crate) fn weight(&self) -> &Tensor {
        match self {
            VisionNorm::Layer(n) => &n.weight,
            VisionNorm::Rms(w) => w,
        }
    }
}

/// One vision block.
#[derive(Debug, Clone)]
pub struct VisionBlock {
    /// Norm before attention.
    pub norm1: VisionNorm,
    /// Norm before the MLP.
    pub norm2: VisionNorm,
    /// The linears in [`QWEN2_VL_BLOCK_LINEARS`] or [`QWEN2_5_VL_BLOCK_LINEARS`]
    /// order; the number tells the MLP kind (4: quick-GELU, 5: SwiGLU).
    pub linears: Vec<Linear>,
}

impl VisionBlock {
    /// The names of this block's linears, in order.
    pub fn linear_names(&self) -> &'static [&'static str] {
        if self.linears.len() == QWEN2_5_VL_BLOCK_LINEARS.len() {
            &QWEN2_5_VL_BLOCK_LINEARS
        } else {
            &QWEN2_VL_BLOCK_LINEARS
        }
    }

    /// The linear named `name`.
    pub fn linear(&self, name: &str) -> Option<&Linear> {
        let i = self.linear_names().iter().position(|n| *n == name)?;
        self.linears.get(i)
    }

    /// Mutable access to the linear named `name`.
    pub fn linear_mut(&mut self, name: &str) -> Option<&mut Linear> {
        let i = self.linear_names().iter().position(|n| *n == name)?;
        self.linears.get_mut(i)
    }
}

/// The patch merger.
#[derive(Debug, Clone)]
pub struct Merger {
    /// Norm on each patch before merging.
    pub ln_q: VisionNorm,
    /// `mlp.0` (`[m*m*d, m*m*d]`) then `mlp.2` (`[out, m*m*d]`).
    pub linears: [Linear; 2],
}

/// Every parameter of the tower.
#[derive(Debug, Clone)]
pub struct QwenVisionWeights {
    /// Patch embedding `[d, channels * frames * patch * patch]` (the Conv3d
    /// kernel flattened; no bias).
    pub patch_embed: Tensor,
    /// The blocks.
    pub blocks: Vec<VisionBlock>,
    /// The merger.
    pub merger: Merger,
}

/// Rotary tables and attention segments for one run of the tower.
#[derive(Debug, Clone)]
pub(crate) struct VisionPositions {
    /// `[S, head_dim]` cosines and sines of the patches, in run order.
    pub cos: Tensor,
    pub sin: Tensor,
    /// Image segments (`cu_seqlens`).
    pub images: Vec<usize>,
    /// Window segments (`cu_window_seqlens`; equal to `images` without windows).
    pub windows: Vec<usize>,
}

/// Tables `[S, head_dim]` for patch positions `(row, col)`: angles
/// `cat(row * f, col * f)` with `f_i = theta^(-2i / (head_dim / 2))`,
/// repeated twice (computed in f64, cast to `dtype`).
pub(crate) fn rotary_tables(
    cfg: &QwenVisionConfig,
    pos: &[[usize; 2]],
    dtype: DType,
    dev: &candle_core::Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let hd = cfg.head_dim();
    let quarter = hd / 4;
    let freqs: Vec<f64> = (0..quarter)
        .map(|i| cfg.rope_theta.powf(-((2 * i) as f64) / (hd / 2) as f64))
        .collect();
    let mut cos = Vec::with_capacity(pos.len() * hd);
    let mut sin = Vec::with_capacity(pos.len() * hd);
    for p in pos {
        let angles: Vec<f64> = p
            .iter()
            .flat_map(|&c| freqs.iter().map(move |f| c as f64 * f))
            .collect();
        for _ in 0..2 {
            for a in &angles {
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
    }
    let n = pos.len();
    Ok((
        Tensor::from_vec(cos, (n, hd), dev)?.to_dtype(dtype)?,
        Tensor::from_vec(sin, (n, hd), dev)?.to_dtype(dtype)?,
    ))
}

/// `linear(x)` plus the probe of that linear when given.
fn probed(
    x: &Tensor,
    l: &Linear,
    probes: Option<&[Tensor]>,
    i: usize,
) -> candle_core::Result<Tensor> {
    let y = linear(x, l)?;
    match probes.and_then(|p| p.get(i)) {
        Some(p) => y + p,
        None => Ok(y),
    }
}

/// The merger on the last block's output `x: [1, S, d]` (S a multiple of
/// `m * m`); `sink` receives `mlp.0`'s and `mlp.2`'s inputs, `probes`
/// (`[1, S / (m*m), out]` each) are added to their outputs. Returns
/// `[S / (m*m), out]`.
pub(crate) fn merger_forward(
    cfg: &QwenVisionConfig,
    m: &Merger,
    x: &Tensor,
    mut sink: Option<&mut dyn RowSink>,
    probes: Option<&[Tensor]>,
) -> candle_core::Result<Tensor> {
    let (_, s, d) = x.dims3()?;
    let unit = cfg.merge_unit();
    let h = m.ln_q.apply(x)?.reshape((1, s / unit, d * unit))?;
    if let Some(sk) = sink.as_deref_mut() {
        sk.rows(MERGER_LINEARS[0], rows(&h)?.view());
    }
    let a = probed(&h, &m.linears[0], probes, 0)?.gelu_erf()?;
    if let Some(sk) = sink {
        sk.rows(MERGER_LINEARS[1], rows(&a)?.view());
    }
    probed(&a, &m.linears[1], probes, 1)?.squeeze(0)
}

/// The patch embedding of `pixels: [S, patch_values]`: `[1, S, d]`.
pub(crate) fn patch_embed(w: &QwenVisionWeights, pixels: &Tensor) -> candle_core::Result<Tensor> {
    let x = pixels.to_dtype(w.patch_embed.dtype())?;
    crate::backend::linear_op::matmul_weight_t(&x, &w.patch_embed)?.unsqueeze(0)
}
