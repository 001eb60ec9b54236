//! The pre-LN ViT encoder layer that CLIP and SigLIP share, on
//! `x: [N, S, d]` (`N` images of `S` tokens), with bidirectional attention
//! and no mask:
//! `x = x + out_proj(attn(layer_norm1(x)))`, then
//! `x = x + fc2(act(fc1(layer_norm2(x))))`.
//!
//! The same body runs the forward pass (capture, probes) and the tape its
//! hand-written backward reads ([`crate::backend::vit_backward`]).

use candle_core::Tensor;
use vlmq::RowSink;

use crate::models::attention::{attention, AttentionTape, PIECE_SCORES};
use crate::models::clip::{layer_norm, ClipLayerWeights, LayerNorm, VISION_LINEAR_NAMES};
use crate::models::vision_ops::{layer_norm_keep, BlockHooks, MlpAct, NormTape};

/// What a pre-LN ViT encoder layer needs besides its weights.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct EncoderShape {
    /// Attention heads (the width must divide evenly).
    pub num_heads: usize,
    /// LayerNorm epsilon.
    pub eps: f64,
    /// MLP activation.
    pub act: MlpAct,
}

/// The intermediates of one layer's forward pass that its backward reads.
pub(crate) struct EncoderTape {
    /// `layer_norm1` of the input.
    pub norm1: NormTape,
    /// The attention over `N x heads` heads (image-major).
    pub attention: AttentionTape,
    /// `layer_norm2` of the residual stream after attention.
    pub norm2: NormTape,
    /// `fc1`'s output (the activation's input) `[N, S, mlp]`.
    pub fc1: Tensor,
}

/// One encoder layer on `x: [N, S, d]`; `capture` receives each linear's
/// input rows, `probes` (one per linear in [`VISION_LINEAR_NAMES`] order)
/// are added to each linear's output.
pub(crate) fn encoder_layer_forward(
    shape: &EncoderShape,
    l: &ClipLayerWeights,
    x: &Tensor,
    capture: Option<&mut dyn RowSink>,
    probes: Option<&[Tensor]>,
) -> candle_core::Result<Tensor> {
    let mut hooks = BlockHooks::new(&VISION_LINEAR_NAMES, capture, probes);
    let (mid, a, _) = encoder_body(shape, l, x, &mut hooks, false)?;
    let a =
        a.ok_or_else(|| candle_core::Error::Msg("the encoder layer formed no activation".into()))?;
    hooks.lin_plus(5, &a, &l.linears[5], &mid)
}

/// The [`EncoderTape`] of layer `l` on `x`: the forward pass up to `fc2`,
/// whose output the backward never reads, so it is not formed.
pub(crate) fn encoder_tape(
    shape: &EncoderShape,
    l: &ClipLayerWeights,
    x: &Tensor,
) -> candle_core::Result<EncoderTape> {
    let mut hooks = BlockHooks::new(&VISION_LINEAR_NAMES, None, None);
    let (_, _, tape) = encoder_body(shape, l, x, &mut hooks, true)?;
    tape.ok_or_else(|| candle_core::Error::Msg("the encoder layer kept no tape".into()))
}

/// Layer `l` on `x` up to `fc2`: the residual stream after attention, and
/// the MLP activation (shown to the capture as `fc2`'s input) or, when
/// `keep` is set, the [`EncoderTape`] instead (the backward reads `fc1`'s
/// output, not the activation).
fn encoder_body(
    shape: &EncoderShape,
    l: &ClipLayerWeights,
    x: &Tensor,
    hooks: &mut BlockHooks<'_, '_>,
    keep: bool,
) -> candle_core::Result<(Tensor, Option<Tensor>, Option<EncoderTape>)> {
    let (n, s, d) = x.dims3()?;
    let nh = shape.num_heads;
    let hd = d / nh;
    let norm = |x: &Tensor, w: &LayerNorm| -> candle_core::Result<(Tensor, Option<NormTape>)> {
        if keep {
            let (h, t) = layer_norm_keep(x, w, shape.eps)?;
            Ok((h, Some(t)))
        } else {
            Ok((layer_norm(x, w, shape.eps)?, None))
        }
    };
    let (h, norm1) = norm(x, &l.norm1)?;
    hooks.show(&[0, 1, 2], &h)?;
    // `[N, S, d]` -> `[N x heads, S, hd]`, image-major.
    let heads = |t: Tensor| -> candle_core::Result<Tensor> {
        t.reshape((n, s, nh, hd))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((n * nh, s, hd))
    };
    let q = heads(hooks.lin(0, &h, &l.linears[0])?)?;
    let k = heads(hooks.lin(1, &h, &l.linears[1])?)?;
    let v = heads(hooks.lin(2, &h, &l.linears[2])?)?;
    let (att, attention) = attention(&q, &k, &v, &[(0, s)], PIECE_SCORES, keep)?;
    let att = att
        .reshape((n, nh, s, hd))?
        .transpose(1, 2)?
        .reshape((n, s, d))?;
    hooks.show(&[3], &att)?;
    let mid = hooks.lin_plus(3, &att, &l.linears[3], x)?;
    let (h, norm2) = norm(&mid, &l.norm2)?;
    hooks.show(&[4], &h)?;
    let fc1 = hooks.lin(4, &h, &l.linears[4])?;
    let a = if keep {
        None
    } else {
        let a = shape.act.apply(&fc1)?;
        hooks.show(&[5], &a)?;
        Some(a)
    };
    let tape = match (norm1, attention, norm2) {
        (Some(norm1), Some(attention), Some(norm2)) => Some(EncoderTape {
            norm1,
            attention,
            norm2,
            fc1,
        }),
        _ => None,
    };
    Ok((mid, a, tape))
}
