//! Chain-rule terms the hand-written block backward passes share (the
//! decoder's in [`crate::backend::llama_backward`], the vision towers' in
//! [`crate::backend::vit_backward`] and [`crate::backend::qwen_vision_backward`]),
//! one tensor op per term:
//!
//! - a linear `y = x W^T (+ b)`: `dx = dy W`;
//! - attention `O = P V`, `P = softmax(S)`, `S = c Q K^T (+ mask)`:
//!   `dV = P^T dO`, `dS = P * (dP - rowsum(P * dP))` with `dP = dO V^T`,
//!   `dQ = c dS K`, `dK = c dS^T Q`;
//! - half-split rotary `y = x cos + rot(x) sin`, `rot([x1, x2]) = [-x2, x1]`:
//!   `dx = dy cos + rot^T(dy sin)`, `rot^T([z1, z2]) = [z2, -z1]`;
//! - a norm `h = xhat * w (+ b)` with `xhat = (x - mean(x)) r` (LayerNorm)
//!   or `xhat = x r` (RMSNorm), `r` the reciprocal scale, over `n` features:
//!   `dx = r * (z - xhat * mean(z * xhat) - mean(z))` with `z = dh * w`,
//!   the `mean(z)` term only for LayerNorm (it comes from the centring);
//! - the MLP activations ([`crate::backend::activation::activation_backward`]):
//!   quick-GELU `a = f s`, `s = sigmoid(1.702 f)`:
//!   `df = da * (s + 1.702 f s (1 - s))`;
//! - tanh-GELU `a = f (1 + t) / 2`, `t = tanh(u)`, `u = c (f + 0.044715 f^3)`,
//!   `c = sqrt(2 / pi)`: `df = da * ((1 + t) / 2 + f (1 - t^2) u' / 2)` with
//!   `u' = c (1 + 3 * 0.044715 f^2)`.

use candle_core::{Tensor, D};
use vlmq::{Result, RowSink};

use crate::backend::fused::softmax_backward;
use crate::error::CandleResultExt;
use crate::models::attention::{assemble, piece_of, AttentionTape, Piece};
use crate::models::llama::forward::rows;
use crate::models::vision_ops::NormTape;

/// Gradients of `sum(block(x) * grad_output)`: at the block input, and at
/// each linear's output in the block's linear order.
pub(crate) struct BlockGradients {
    pub input: Tensor,
    pub linear_outputs: Vec<Tensor>,
}

impl BlockGradients {
    /// Shows each linear output's gradient rows to `sink` under `names`
    /// (the linears' names in the same order), as block `block`'s.
    pub(crate) fn show(
        &self,
        block: usize,
        names: &[&str],
        sink: Option<&mut dyn RowSink>,
    ) -> Result<()> {
        if let Some(sink) = sink {
            for (name, g) in names.iter().zip(&self.linear_outputs) {
                sink.rows(name, rows(g).in_block(block)?.view());
            }
        }
        Ok(())
    }
}

/// `dL/dx = dL/dy W` for `y = x W^T` on `[.., out]` (any leading dims).
pub(crate) fn input_grad(dy: &Tensor, weight: &Tensor) -> candle_core::Result<Tensor> {
    let mut dims = dy.dims().to_vec();
    let out = dims.pop().unwrap_or(1);
    let rows: usize = dims.iter().product();
    dims.push(weight.dim(1)?);
    dy.reshape((rows, out))?.matmul(weight)?.reshape(dims)
}

/// The attention backward of the module docs on `[.., heads, T, hd]` (any
/// leading dims; `probs: [.., heads, T, T]`), from the gradient at the
/// attention's output `d_att`: `(dQ, dK, dV)`, `c` the score scale. `fuse`
/// runs the softmax term as one fused pass per row
/// ([`crate::backend::fused::softmax_backward`]); without it, as four
/// candle ops (the decoder's, whose results were measured that way).
pub(crate) fn attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    probs: &Tensor,
    d_att: &Tensor,
    c: f64,
    fuse: bool,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let d_v = probs.t()?.matmul(d_att)?;
    let d_p = d_att.matmul(&v.t()?)?;
    let d_s = if fuse {
        softmax_backward(probs, &d_p)?
    } else {
        let row = (probs * &d_p)?.sum_keepdim(D::Minus1)?;
        (d_p.broadcast_sub(&row)? * probs)?
    };
    let d_q = (d_s.matmul(k)? * c)?;
    let d_k = (d_s.t()?.matmul(q)? * c)?;
    Ok((d_q, d_k, d_v))
}

/// The attention backward over the pieces of `t` (fused softmax term),
/// from the gradient at the attention's output `d_att: [heads, S, hd]`:
/// `(dQ, dK, dV)`, each `[heads, S, hd]`.
pub(crate) fn pieced_attention_backward(
    t: &AttentionTape,
    d_att: &Tensor,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let c = 1.0 / (t.q.dim(D::Minus1)? as f64).sqrt();
    let n = t.pieces.len();
    let (mut dq, mut dk, mut dv) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for (p, probs) in &t.pieces {
        let (q, k, v) = attention_backward(
            &piece_of(&t.q, p)?,
            &piece_of(&t.k, p)?,
            &piece_of(&t.v, p)?,
            probs,
            &piece_of(d_att, p)?,
            c,
            true,
        )?;
        dq.push(q);
        dk.push(k);
        dv.push(v);
    }
    let plan: Vec<Piece> = t.pieces.iter().map(|(p, _)| *p).collect();
    Ok((
        assemble(&plan, dq)?,
        assemble(&plan, dk)?,
        assemble(&plan, dv)?,
    ))
}

/// The rotary backward of the module docs on `[.., T, hd]` with tables
/// `cos, sin` broadcast from `[.., T, hd]`.
pub(crate) fn rotary_backward(
    dy: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
) -> candle_core::Result<Tensor> {
    let half = dy.dim(D::Minus1)? / 2;
    let ds = dy.broadcast_mul(sin)?;
    let z1 = ds.narrow(D::Minus1, 0, half)?;
    let z2 = ds.narrow(D::Minus1, half, half)?;
    let rot_t = Tensor::cat(&[&z2, &z1.neg()?], D::Minus1)?;
    dy.broadcast_mul(cos)? + rot_t
}

/// The norm backward of the module docs, from the gradient `dh` at the
/// norm's output and its gain `w`.
pub(crate) fn norm_backward(t: &NormTape, w: &Tensor, dh: &Tensor) -> candle_core::Result<Tensor> {
    let z = dh.broadcast_mul(w)?;
    let zx = (&z * &t.xhat)?.mean_keepdim(D::Minus1)?;
    let mut inner = (&z - t.xhat.broadcast_mul(&zx)?)?;
    if t.centered {
        inner = inner.broadcast_sub(&z.mean_keepdim(D::Minus1)?)?;
    }
    inner.broadcast_mul(&t.r)
}
