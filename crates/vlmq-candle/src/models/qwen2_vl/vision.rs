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
//! The merger normalizes each patch (`ln_q`), concatenates the `m * m`
//! patches of a merge block and applies `mlp.2(gelu(mlp.0(.)))` (exact erf GELU).

use candle_core::{DType, Tensor, D};
use vlmq::RowSink;

use crate::models::clip::{layer_norm, LayerNorm};
use crate::models::llama::forward::{linear, rms_norm, rows};
use crate::models::llama::weights::Linear;

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
    /// Applies the norm over the last dimension (differentiable primitives).
    pub(crate) fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            VisionNorm::Layer(n) => layer_norm(x, n, VISION_NORM_EPS),
            VisionNorm::Rms(w) => rms_norm(x, w, VISION_NORM_EPS, true),
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

/// Half-split rotation of `x: [heads, S, hd]` by `[S, hd]` tables.
fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rot.broadcast_mul(sin)?
}

/// Softmax attention of `q, k, v: [heads, S, hd]` within each segment of
/// `cu`; the result as rows `[1, S, heads * hd]`. `differentiable` picks the
/// composed softmax (the fused kernel has no backward).
fn segment_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cu: &[usize],
    differentiable: bool,
) -> candle_core::Result<Tensor> {
    let (nh, s, hd) = q.dims3()?;
    let scale = 1.0 / (hd as f64).sqrt();
    let mut parts = Vec::with_capacity(cu.len().saturating_sub(1));
    for seg in cu.windows(2) {
        let (a, len) = (seg[0], seg[1] - seg[0]);
        if len == 0 {
            continue;
        }
        let (qs, ks, vs) = (
            q.narrow(1, a, len)?,
            k.narrow(1, a, len)?,
            v.narrow(1, a, len)?,
        );
        let scores = (qs.matmul(&ks.t()?)? * scale)?;
        let probs = if differentiable {
            candle_nn::ops::softmax(&scores, D::Minus1)?
        } else {
            candle_nn::ops::softmax_last_dim(&scores)?
        };
        parts.push(probs.matmul(&vs)?);
    }
    let att = Tensor::cat(&parts, 1)?;
    att.transpose(0, 1)?.reshape((1, s, nh * hd))
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

/// One block on `x: [1, S, d]`; `sink` receives each linear's input rows
/// under the names of [`VisionBlock::linear_names`]; `probes` (zero tensors
/// `[1, S, out]`, one per linear in that order) are added to each linear's
/// output so a backward pass shows the gradient there.
pub(crate) fn block_forward(
    cfg: &QwenVisionConfig,
    b: &VisionBlock,
    x: &Tensor,
    pos: &VisionPositions,
    windowed: bool,
    mut sink: Option<&mut dyn RowSink>,
    probes: Option<&[Tensor]>,
) -> candle_core::Result<Tensor> {
    let names = b.linear_names();
    let lin = |i: usize, t: &Tensor| probed(t, &b.linears[i], probes, i);
    let mut show = |idx: &[usize], t: &Tensor| -> candle_core::Result<()> {
        if let Some(s) = sink.as_deref_mut() {
            let r = rows(t)?;
            for &i in idx {
                s.rows(names[i], r.view());
            }
        }
        Ok(())
    };
    let (_, s, d) = x.dims3()?;
    let (nh, hd) = (cfg.num_heads, cfg.head_dim());
    let h = b.norm1.apply(x)?;
    show(&[0], &h)?;
    let qkv = lin(0, &h)?.reshape((s, 3, nh, hd))?;
    let part = |i: usize| {
        qkv.narrow(1, i, 1)?
            .squeeze(1)?
            .transpose(0, 1)?
            .contiguous()
    };
    let q = rotate(&part(0)?, &pos.cos, &pos.sin)?;
    let k = rotate(&part(1)?, &pos.cos, &pos.sin)?;
    let v = part(2)?;
    let cu = if windowed { &pos.windows } else { &pos.images };
    let att = segment_attention(&q, &k, &v, cu, probes.is_some())?;
    debug_assert_eq!(att.dim(2)?, d);
    show(&[1], &att)?;
    let x = (x + lin(1, &att)?)?;
    let h = b.norm2.apply(&x)?;
    let y = if b.linears.len() == QWEN2_5_VL_BLOCK_LINEARS.len() {
        show(&[2, 3], &h)?;
        let a = (lin(2, &h)?.silu()? * lin(3, &h)?)?;
        show(&[4], &a)?;
        lin(4, &a)?
    } else {
        show(&[2], &h)?;
        let f = lin(2, &h)?;
        let a = (&f * candle_nn::ops::sigmoid(&(&f * 1.702)?)?)?;
        show(&[3], &a)?;
        lin(3, &a)?
    };
    x + y
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
