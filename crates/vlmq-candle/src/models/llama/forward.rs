//! The decoder's arithmetic: RMSNorm, RoPE, grouped-query attention, SwiGLU,
//! one decoder layer with input capture and output probes.
//!
//! The forward pass can keep a [`Tape`] of its intermediates for the
//! hand-written backward in [`crate::backend::llama_backward`].

use candle_core::{CpuStorage, DType, Tensor, D};
use ndarray::{Array2, ArrayView2};
use vlmq::RowSink;

use crate::backend::linear_op::matmul_weight_t;
use crate::backend::row_add::add_rows;
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
    linear_plus(x, l, None)
}

/// `r + (x W^T + b)` on `[B, T, in]` (`r: [B, T, out]`, or none): the bias
/// and the residual are added into the product's own memory where they can
/// be ([`add_rows`]: the same bits as the candle ops).
pub(crate) fn linear_plus(
    x: &Tensor,
    l: &Linear,
    r: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let (b, t, i) = x.dims3()?;
    let out = l.weight.dim(0)?;
    let y = matmul_weight_t(&x.reshape((b * t, i))?, &l.weight)?.reshape((b, t, out))?;
    add_rows(y, l.bias.as_ref(), r)
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

/// Shows `sink` the rows `[B*T, features]` of `t: [B, T, features]` under
/// each of `names`: straight from the tensor's memory when it is a
/// contiguous f32 CPU tensor, else from a converted copy ([`rows`]).
pub(crate) fn show_rows(
    sink: &mut dyn RowSink,
    names: impl Iterator<Item = &'static str>,
    t: &Tensor,
) -> candle_core::Result<()> {
    let f = t.dim(D::Minus1)?.max(1);
    let (storage, layout) = t.storage_and_layout();
    if let (candle_core::Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) =
        (&*storage, layout.contiguous_offsets())
    {
        let view = ArrayView2::from_shape(((b - a) / f, f), &v[a..b])
            .map_err(|e| candle_core::Error::Msg(format!("captured rows: {e}")))?;
        for name in names {
            sink.rows(name, view);
        }
        return Ok(());
    }
    drop(storage);
    let r = rows(t)?;
    for name in names {
        sink.rows(name, r.view());
    }
    Ok(())
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
        match self.capture.as_deref_mut() {
            Some(sink) => show_rows(sink, idx.iter().map(|&i| LINEAR_NAMES[i]), x),
            None => Ok(()),
        }
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

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    /// Every name sees the tensor's rows, borrowed (contiguous f32) or
    /// copied (a transposed view, bf16), with the same values.
    #[test]
    fn shown_rows_are_the_tensors_rows() {
        let v: Vec<f32> = (0..24).map(|i| i as f32 * 0.5 - 3.0).collect();
        let t = Tensor::from_vec(v, (2, 3, 4), &Device::Cpu).unwrap();
        let want = t.reshape((6, 4)).unwrap().to_vec2::<f32>().unwrap();
        let transposed = t.transpose(1, 2).unwrap().contiguous().unwrap();
        let cases = [
            (t.clone(), want.clone()),
            // A contiguous part that starts inside the storage.
            (t.narrow(0, 1, 1).unwrap(), want[3..].to_vec()),
            (
                t.narrow(1, 1, 2).unwrap(),
                [1, 2, 4, 5].map(|r| want[r].clone()).to_vec(),
            ),
            (t.to_dtype(DType::BF16).unwrap(), want.clone()),
            (transposed.transpose(1, 2).unwrap(), want.clone()),
        ];
        for (i, (t, want)) in cases.iter().enumerate() {
            // Where the tensor's own f32 memory is contiguous, the sink sees it.
            let own = match (&*t.storage_and_layout().0, t.layout().contiguous_offsets()) {
                (candle_core::Storage::Cpu(CpuStorage::F32(v)), Some((a, _))) => {
                    Some(v[a..].as_ptr() as usize)
                }
                _ => None,
            };
            let mut seen = Vec::new();
            let mut ptrs = Vec::new();
            let mut sink = |name: &str, r: ArrayView2<'_, f32>| {
                ptrs.push(r.as_ptr() as usize);
                let got: Vec<Vec<f32>> = r.outer_iter().map(|row| row.to_vec()).collect();
                seen.push((name.to_string(), got));
            };
            show_rows(&mut sink, ["a", "b"].into_iter(), t).unwrap();
            if let Some(own) = own {
                assert_eq!(ptrs, [own, own], "case {i}: rows copied");
            }
            assert_eq!(seen.len(), 2, "case {i}");
            for (name, (n, got)) in ["a", "b"].iter().zip(&seen) {
                assert_eq!(n, name, "case {i}");
                assert_eq!(got, want, "case {i}");
            }
        }
    }
}
