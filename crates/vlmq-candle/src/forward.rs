//! The decoder's arithmetic: RMSNorm, RoPE, grouped-query attention, SwiGLU,
//! one decoder layer with input capture and output probes.
//!
//! Two flavours of the same maths: `differentiable = false` uses candle-nn's
//! fused RMSNorm and softmax (fast, no backward), `true` composes them from
//! primitives so candle's autograd reaches every parameter and probe.

use candle_core::{DType, Device, Tensor, D};
use ndarray::Array2;
use vlmq::RowSink;

use crate::config::LlamaConfig;
use crate::linear_op::matmul_weight_t;
use crate::weights::{LayerWeights, Linear, LINEAR_NAMES};

/// Cosine and sine tables `[T, head_dim]` (the half angles repeated twice,
/// HF's half-split layout) and the causal mask `[T, T]` for one length.
#[derive(Debug, Clone)]
pub(crate) struct Positional {
    cos: Tensor,
    sin: Tensor,
    mask: Tensor,
}

impl Positional {
    /// Tables for positions `0..t` (angles computed in f64, then cast to `dtype`).
    pub(crate) fn new(
        cfg: &LlamaConfig,
        t: usize,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Self> {
        let hd = cfg.head_dim;
        let half = hd / 2;
        let mut cos = Vec::with_capacity(t * hd);
        let mut sin = Vec::with_capacity(t * hd);
        for p in 0..t {
            let row: Vec<(f64, f64)> = (0..half)
                .map(|i| {
                    let inv = cfg.rope_theta.powf(-2.0 * i as f64 / hd as f64);
                    (p as f64 * inv).sin_cos()
                })
                .collect();
            for _ in 0..2 {
                for &(s, c) in &row {
                    sin.push(s);
                    cos.push(c);
                }
            }
        }
        let mask: Vec<f64> = (0..t * t)
            .map(|k| {
                if k % t > k / t {
                    f64::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        Ok(Positional {
            cos: Tensor::from_vec(cos, (t, hd), dev)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, (t, hd), dev)?.to_dtype(dtype)?,
            mask: Tensor::from_vec(mask, (t, t), dev)?.to_dtype(dtype)?,
        })
    }
}

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
/// [`InputGradMatmul`](crate::linear_op::InputGradMatmul): same forward
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

/// What a layer run shows and where it can be differentiated.
pub(crate) struct Hooks<'a> {
    /// Receives every linear's input rows (forward capture).
    pub capture: Option<&'a mut dyn RowSink>,
    /// Zero-valued variables added to each linear's output, in [`LINEAR_NAMES`] order.
    pub probes: Option<&'a [Tensor]>,
    /// Compose the fused ops from primitives (needed for a backward pass).
    pub differentiable: bool,
}

impl Hooks<'_> {
    /// No capture, no probes, fused ops.
    pub(crate) fn none() -> Hooks<'static> {
        Hooks {
            capture: None,
            probes: None,
            differentiable: false,
        }
    }

    fn show(&mut self, idx: &[usize], x: &Tensor) -> candle_core::Result<()> {
        if let Some(sink) = self.capture.as_deref_mut() {
            let r = rows(x)?;
            for &i in idx {
                sink.rows(LINEAR_NAMES[i], r.view());
            }
        }
        Ok(())
    }

    fn lin(&self, i: usize, x: &Tensor, l: &LayerWeights) -> candle_core::Result<Tensor> {
        let y = linear(x, &l.linears[i])?;
        match self.probes {
            Some(p) => y + &p[i],
            None => Ok(y),
        }
    }
}

/// One decoder layer on `x: [B, T, hidden]`.
pub(crate) fn layer_forward(
    cfg: &LlamaConfig,
    l: &LayerWeights,
    x: &Tensor,
    pos: &Positional,
    hooks: &mut Hooks<'_>,
) -> candle_core::Result<Tensor> {
    let (b, t, _) = x.dims3()?;
    let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
    let diff = hooks.differentiable || x.dtype() == DType::F64;

    let h = rms_norm(x, &l.input_norm, cfg.rms_eps, diff)?;
    hooks.show(&[0, 1, 2], &h)?;
    let q = hooks.lin(0, &h, l)?;
    let k = hooks.lin(1, &h, l)?;
    let v = hooks.lin(2, &h, l)?;
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
    let probs = if diff {
        candle_nn::ops::softmax(&scores, D::Minus1)?
    } else {
        candle_nn::ops::softmax_last_dim(&scores)?
    };
    let att = probs
        .matmul(&v)?
        .transpose(1, 2)?
        .reshape((b, t, nh * hd))?;
    hooks.show(&[3], &att)?;
    let x = (x + hooks.lin(3, &att, l)?)?;

    let h = rms_norm(&x, &l.post_norm, cfg.rms_eps, diff)?;
    hooks.show(&[4, 5], &h)?;
    let g = hooks.lin(4, &h, l)?;
    let u = hooks.lin(5, &h, l)?;
    let a = (g.silu()? * u)?;
    hooks.show(&[6], &a)?;
    x + hooks.lin(6, &a, l)?
}
