//! One block of the Qwen2-VL / Qwen2.5-VL vision tower (maths in
//! [`super::vision`]'s docs), run forward with capture and probes, or
//! keeping the tape its hand-written backward reads
//! ([`crate::backend::qwen_vision_backward`]).

use candle_core::{Tensor, D};
use vlmq::RowSink;

use crate::models::attention::{attention, AttentionTape, PIECE_SCORES};
use crate::models::vision_ops::{BlockHooks, MlpAct, NormTape};

use super::config::QwenVisionConfig;
use super::vision::{VisionBlock, VisionNorm, VisionPositions, QWEN2_5_VL_BLOCK_LINEARS};

/// The MLP intermediates a block's backward reads.
pub(crate) enum MlpTape {
    /// `fc1`'s output (quick-GELU's input), Qwen2-VL.
    QuickGelu { fc1: Tensor },
    /// The gate and up projections, Qwen2.5-VL.
    SwiGlu { gate: Tensor, up: Tensor },
}

/// The intermediates of one block's forward pass that its backward reads.
pub(crate) struct VisionBlockTape {
    /// `norm1` of the input.
    pub norm1: NormTape,
    /// The attention (queries and keys after the rotation) within the
    /// non-empty segments.
    pub attention: AttentionTape,
    /// `norm2` of the residual stream after attention.
    pub norm2: NormTape,
    /// The MLP's intermediates.
    pub mlp: MlpTape,
}

impl VisionBlock {
    /// Whether the MLP is SwiGLU (Qwen2.5-VL) rather than quick-GELU.
    pub(crate) fn swiglu(&self) -> bool {
        self.linears.len() == QWEN2_5_VL_BLOCK_LINEARS.len()
    }
}

/// Half-split rotation of `x: [heads, S, hd]` by `[S, hd]` tables.
fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rot.broadcast_mul(sin)?
}

/// The non-empty segments `(start, len)` of the boundaries `cu`.
pub(crate) fn segments(cu: &[usize]) -> Vec<(usize, usize)> {
    cu.windows(2)
        .filter(|w| w[1] > w[0])
        .map(|w| (w[0], w[1] - w[0]))
        .collect()
}

/// One block on `x: [1, S, d]`; `sink` receives each linear's input rows
/// under the names of [`VisionBlock::linear_names`]; `probes` (`[1, S, out]`,
/// one per linear in that order) are added to each linear's output.
pub(crate) fn block_forward(
    cfg: &QwenVisionConfig,
    b: &VisionBlock,
    x: &Tensor,
    pos: &VisionPositions,
    windowed: bool,
    sink: Option<&mut dyn RowSink>,
    probes: Option<&[Tensor]>,
) -> candle_core::Result<Tensor> {
    let mut hooks = BlockHooks::new(b.linear_names(), sink, probes);
    let (mid, a, _) = block_body(cfg, b, x, pos, windowed, &mut hooks, false)?;
    let a =
        a.ok_or_else(|| candle_core::Error::Msg("the vision block formed no activation".into()))?;
    let last = b.linears.len() - 1;
    hooks.lin_plus(last, &a, &b.linears[last], &mid)
}

/// The [`VisionBlockTape`] of block `b` on `x`: the forward pass up to the
/// last linear, whose output the backward never reads, so it is not formed.
pub(crate) fn block_tape(
    cfg: &QwenVisionConfig,
    b: &VisionBlock,
    x: &Tensor,
    pos: &VisionPositions,
    windowed: bool,
) -> candle_core::Result<VisionBlockTape> {
    let mut hooks = BlockHooks::new(b.linear_names(), None, None);
    let (_, _, tape) = block_body(cfg, b, x, pos, windowed, &mut hooks, true)?;
    tape.ok_or_else(|| candle_core::Error::Msg("the vision block kept no tape".into()))
}

/// Block `b` on `x` up to the last linear: the residual stream after
/// attention, and the MLP activation (shown to the capture as the last
/// linear's input) or, when `keep` is set, the [`VisionBlockTape`] instead
/// (the backward reads the MLP's pre-activations, not the activation).
fn block_body(
    cfg: &QwenVisionConfig,
    b: &VisionBlock,
    x: &Tensor,
    pos: &VisionPositions,
    windowed: bool,
    hooks: &mut BlockHooks<'_, '_>,
    keep: bool,
) -> candle_core::Result<(Tensor, Option<Tensor>, Option<VisionBlockTape>)> {
    let lin = |hooks: &BlockHooks<'_, '_>, i: usize, t: &Tensor| hooks.lin(i, t, &b.linears[i]);
    let norm = |n: &VisionNorm, x: &Tensor| -> candle_core::Result<(Tensor, Option<NormTape>)> {
        if keep {
            let (h, t) = n.apply_keep(x)?;
            Ok((h, Some(t)))
        } else {
            Ok((n.apply(x)?, None))
        }
    };
    let (_, s, _) = x.dims3()?;
    let (nh, hd) = (cfg.num_heads, cfg.head_dim());
    let (h, norm1) = norm(&b.norm1, x)?;
    hooks.show(&[0], &h)?;
    let qkv = lin(hooks, 0, &h)?.reshape((s, 3, nh, hd))?;
    let part = |i: usize| {
        qkv.narrow(1, i, 1)?
            .squeeze(1)?
            .transpose(0, 1)?
            .contiguous()
    };
    let q = rotate(&part(0)?, &pos.cos, &pos.sin)?;
    let k = rotate(&part(1)?, &pos.cos, &pos.sin)?;
    let v = part(2)?;
    let segs = segments(if windowed { &pos.windows } else { &pos.images });
    let (att, attention) = attention(&q, &k, &v, &segs, PIECE_SCORES, keep)?;
    let att = att.transpose(0, 1)?.reshape((1, s, nh * hd))?;
    hooks.show(&[1], &att)?;
    let mid = hooks.lin_plus(1, &att, &b.linears[1], x)?;
    let (h, norm2) = norm(&b.norm2, &mid)?;
    let mlp = if b.swiglu() {
        hooks.show(&[2, 3], &h)?;
        let gate = lin(hooks, 2, &h)?;
        let up = lin(hooks, 3, &h)?;
        MlpTape::SwiGlu { gate, up }
    } else {
        hooks.show(&[2], &h)?;
        MlpTape::QuickGelu {
            fc1: lin(hooks, 2, &h)?,
        }
    };
    let a = if keep {
        None
    } else {
        let a = match &mlp {
            MlpTape::SwiGlu { gate, up } => (gate.silu()? * up)?,
            MlpTape::QuickGelu { fc1 } => MlpAct::QuickGelu.apply(fc1)?,
        };
        hooks.show(&[b.linears.len() - 1], &a)?;
        Some(a)
    };
    let tape = match (norm1, attention, norm2) {
        (Some(norm1), Some(attention), Some(norm2)) => Some(VisionBlockTape {
            norm1,
            attention,
            norm2,
            mlp,
        }),
        _ => None,
    };
    Ok((mid, a, tape))
}
