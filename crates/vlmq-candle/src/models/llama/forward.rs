//! The decoder's arithmetic: RMSNorm, RoPE, grouped-query attention, SwiGLU,
//! one decoder layer with input capture and output probes.
//!
//! The forward pass can keep a [`Tape`] of its intermediates for the
//! hand-written backward in [`crate::backend::llama_backward`].

use candle_core::{DType, Tensor, D};
use ndarray::Array2;
use vlmq::RowSink;

use crate::backend::linear_op::matmul_weight_t;
use crate::models::llama::config::LlamaConfig;
use crate::models::llama::weights::{LayerWeights, Linear, LINEAR_NAMES};

pub(crate) use crate::models::llama::positional::Positional;

/// `x * rsqrt(mean(x^2) + eps) * w` over the last dimension.
pub(crate) fn rms_norm(
    x: &Tensor,
    w: &Tensor,
    eps: f64,
    differentiable: bool,
) -> candle_core::Result<Tensor> {
    // The fused kernel has no f64 version; the composed form is the same maths.
    if differentiable || x.dtype() == DType::F64 {
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)
    } else {
        candle_nn::ops::rms_norm(&x.contiguous()?, w, eps as f32)
    }
}

/// `y = x W^T + b` on `[B, T, in]`, as one matrix product over all rows.
///
/// When `x` is part of an autograd graph on the CPU, the product runs as
/// [`InputGradMatmul`](crate::backend::linear_op::InputGradMatmul): same forward
/// bits, and the backward pass skips the weight's gradient (a whole product
/// per layer that nothing reads).
pub(crate) fn linear(x: &Tensor, l: &Linear) -> candle_core::Result<Tensor> {
    let (b, t, i) = x.dims3()?;
    let out = l.weight.dim(0)?;
    let y = matmul_weight_t(&x.reshape((b * t, i))?, &l.weight)?;
    let y = match &l.bias {
        Some(bias) => y.broadcast_add(bias)?,
        None => y,
    };
    y.reshape((b, t, out))
}

/// Half-split rotary embedding of `x: [B, heads, T, hd]`.
fn rope(x: &Tensor, pos: &Positional) -> candle_core::Result<Tensor> {
    let hd = x.dim(D::Minus1)?;
    let half = hd / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(&pos.cos)? + rot.broadcast_mul(&pos.sin)?
}

/// The rows `[B*T, features]` of `[B, T, features]` as f32.
pub(crate) fn rows(t: &Tensor) -> candle_core::Result<Array2<f32>> {
    let f = t.dim(D::Minus1)?;
    let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let n = v.len() / f.max(1);
    Ok(Array2::from_shape_vec((n, f), v).expect("length is rows x features"))
}

/// What a layer run shows.
pub(crate) struct Hooks<'a> {
    /// Receives every linear's input rows (forward capture).
    pub capture: Option<&'a mut dyn RowSink>,
    /// Tensors added to each linear's output, in [`LINEAR_NAMES`] order (the
    /// finite-difference tests perturb linear outputs through them).
    pub probes: Option<&'a [Tensor]>,
}

impl Hooks<'_> {
    /// No capture, no probes.
    pub(crate) fn none() -> Hooks<'static> {
        Hooks {
            capture: None,
            probes: None,
        }
    }

    pub(crate) fn show(&mut self, idx: &[usize], x: &Tensor) -> candle_core::Result<()> {
        if let Some(sink) = self.capture.as_deref_mut() {
            let r = rows(x)?;
            for &i in idx {
                sink.rows(LINEAR_NAMES[i], r.view());
            }
        }
        Ok(())
    }

    pub(crate) fn lin(
        &self,
        i: usize,
        x: &Tensor,
        l: &LayerWeights,
    ) -> candle_core::Result<Tensor> {
        let y = linear(x, &l.linears[i])?;
        match self.probes {
            Some(p) => y + &p[i],
            None => Ok(y),
        }
    }
}

/// The intermediates of one layer's forward pass that its hand-written
/// backward ([`crate::backend::llama_backward`]) reads.
pub(crate) struct Tape {
    /// `rsqrt(mean(x^2) + eps)` of the layer input, `[B, T, 1]`.
    pub r_in: Tensor,
    /// Queries and keys after RoPE, values; keys and values already repeated
    /// to every query head: `[B, heads, T, hd]`.
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    /// Attention probabilities `[B, heads, T, T]`.
    pub probs: Tensor,
    /// The residual stream after attention, its RMS reciprocal.
    pub mid: Tensor,
    pub r_mid: Tensor,
    /// Gate and up projections `[B, T, intermediate]`.
    pub gate: Tensor,
    pub up: Tensor,
}

/// `(x * r * w, r)` with `r = rsqrt(mean(x^2) + eps)` over the last dimension.
pub(crate) fn rms_norm_keep(
    x: &Tensor,
    w: &Tensor,
    eps: f64,
) -> candle_core::Result<(Tensor, Tensor)> {
    let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    let h = x.broadcast_mul(&r)?.broadcast_mul(w)?;
    Ok((h, r))
}

/// One decoder layer on `x: [B, T, hidden]`.
pub(crate) fn layer_forward(
    cfg: &LlamaConfig,
    l: &LayerWeights,
    x: &Tensor,
    pos: &Positional,
    hooks: &mut Hooks<'_>,
) -> candle_core::Result<Tensor> {
    let (mid, act, _) = layer_body(cfg, l, x, pos, hooks, false)?;
    mlp_residual(l, &mid, &act, hooks)
}

/// The [`Tape`] of layer `l` on `x`: the forward pass up to the down
/// projection, whose output the backward never reads, so it is not formed.
pub(crate) fn layer_tape(
    cfg: &LlamaConfig,
    l: &LayerWeights,
    x: &Tensor,
    pos: &Positional,
) -> candle_core::Result<Tape> {
    let (_, _, tape) = layer_body(cfg, l, x, pos, &mut Hooks::none(), true)?;
    tape.ok_or_else(|| candle_core::Error::Msg("the forward pass kept no tape".into()))
}

/// Layer `l` on `x` up to the down projection: the residual stream after
/// attention, the SwiGLU activation (shown to the capture as the down
/// projection's input) and, when `keep` is set, the [`Tape`].
fn layer_body(
    cfg: &LlamaConfig,
    l: &LayerWeights,
    x: &Tensor,
    pos: &Positional,
    hooks: &mut Hooks<'_>,
    keep: bool,
) -> candle_core::Result<(Tensor, Tensor, Option<Tape>)> {
    let f64_maths = x.dtype() == DType::F64;
    let norm = |x: &Tensor, w: &Tensor| -> candle_core::Result<(Tensor, Option<Tensor>)> {
        if keep {
            let (h, r) = rms_norm_keep(x, w, cfg.rms_eps)?;
            Ok((h, Some(r)))
        } else {
            Ok((rms_norm(x, w, cfg.rms_eps, f64_maths)?, None))
        }
    };

    let (h, r_in) = norm(x, &l.input_norm)?;
    hooks.show(&[0, 1, 2], &h)?;
    let Attended {
        q,
        k,
        v,
        probs,
        att,
    } = attend(cfg, l, &h, pos, hooks)?;
    hooks.show(&[3], &att)?;
    let mid = attention_residual(l, x, &att, hooks)?;

    let (h, r_mid) = norm(&mid, &l.post_norm)?;
    hooks.show(&[4, 5], &h)?;
    let (gate, up, a) = swiglu(l, &h, hooks)?;
    hooks.show(&[6], &a)?;
    let tape = r_in.zip(r_mid).map(|(r_in, r_mid)| Tape {
        r_in,
        q,
        k,
        v,
        probs,
        mid: mid.clone(),
        r_mid,
        gate,
        up,
    });
    Ok((mid, a, tape))
}

/// The attention of one layer on its normed input: queries and keys after
/// RoPE, values repeated to every query head, probabilities, and the
/// context `att: [B, T, heads x hd]` (the input of `o_proj`).
pub(crate) struct Attended {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub probs: Tensor,
    pub att: Tensor,
}

/// Grouped-query attention of layer `l` on `h = input_norm(x)`.
pub(crate) fn attend(
    cfg: &LlamaConfig,
    l: &LayerWeights,
    h: &Tensor,
    pos: &Positional,
    hooks: &Hooks<'_>,
) -> candle_core::Result<Attended> {
    let (b, t, _) = h.dims3()?;
    let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
    let q = hooks.lin(0, h, l)?;
    let k = hooks.lin(1, h, l)?;
    let v = hooks.lin(2, h, l)?;
    let q = q.reshape((b, t, nh, hd))?.transpose(1, 2)?.contiguous()?;
    let k = k.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
    let v = v.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
    let q = rope(&q, pos)?;
    let k = rope(&k, pos)?;
    // Query head h reads KV head h / (nh / nkv) (HF's repeat_kv).
    let rep = nh / nkv;
    let (k, v) = if rep == 1 {
        (k, v)
    } else {
        let expand = |z: &Tensor| {
            z.unsqueeze(2)?
                .expand((b, nkv, rep, t, hd))?
                .reshape((b, nh, t, hd))
        };
        (expand(&k)?, expand(&v)?)
    };
    let scale = 1.0 / (hd as f64).sqrt();
    let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&pos.mask)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    let att = probs
        .matmul(&v)?
        .transpose(1, 2)?
        .reshape((b, t, nh * hd))?;
    Ok(Attended {
        q,
        k,
        v,
        probs,
        att,
    })
}

/// The residual stream after attention: `x + o_proj(att)`.
pub(crate) fn attention_residual(
    l: &LayerWeights,
    x: &Tensor,
    att: &Tensor,
    hooks: &Hooks<'_>,
) -> candle_core::Result<Tensor> {
    x + hooks.lin(3, att, l)?
}

/// Gate and up projections of `h = post_norm(mid)` and the SwiGLU
/// activation `silu(gate) * up` (the input of `down_proj`).
pub(crate) fn swiglu(
    l: &LayerWeights,
    h: &Tensor,
    hooks: &Hooks<'_>,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let gate = hooks.lin(4, h, l)?;
    let up = hooks.lin(5, h, l)?;
    let a = (gate.silu()? * &up)?;
    Ok((gate, up, a))
}

/// The layer output from the residual after attention and the SwiGLU
/// activation: `mid + down_proj(a)`.
pub(crate) fn mlp_residual(
    l: &LayerWeights,
    mid: &Tensor,
    a: &Tensor,
    hooks: &Hooks<'_>,
) -> candle_core::Result<Tensor> {
    mid + hooks.lin(6, a, l)?
}
