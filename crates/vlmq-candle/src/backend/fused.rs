//! Fused CPU kernels for the vision blocks' element-wise work, each one
//! pass over its operands: LayerNorm and the softmax backward
//! `P * (dP - rowsum(P * dP))` (the MLP activations are in
//! [`crate::backend::activation`]), and the pieces those kernels share.
//!
//! Composed from candle's element-wise ops, the softmax backward is four
//! passes over the `[heads, patches, patches]` probabilities and LayerNorm
//! nine, each allocating its result. Every row is computed on its own, in
//! a fixed order, so the split over threads does not change a bit. Off the
//! CPU, or for other dtypes than f32 and f64, the same maths runs composed
//! from candle ops.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, WithDType, D};
use rayon::prelude::*;

use vlmq::__private::exp_nonpositive;

/// The float arithmetic the kernels need, for f32 and f64.
pub(crate) trait Real:
    WithDType
    + std::ops::Add<Output = Self>
    + std::ops::AddAssign
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
{
    /// The constant `v` in this type.
    fn of(v: f64) -> Self;
    /// The square root.
    fn sqrt(self) -> Self;
    /// The logistic function `1 / (1 + e^-z)`.
    fn sigmoid(self) -> Self;
}

impl Real for f32 {
    fn of(v: f64) -> Self {
        v as f32
    }
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    /// With the vectorizable `e = exp(-|z|)` (in `(0, 1]`, so no overflow):
    /// `1 / (1 + e)` for `z >= 0`, `e / (1 + e)` below; within 1e-6 relative
    /// of the exact value (the exponential's 3e-7 and three roundings). For
    /// `z < -87` the exponential stops at about 1e-38 instead of
    /// underflowing.
    #[inline(always)]
    fn sigmoid(self) -> Self {
        let e = exp_nonpositive(-self.abs());
        let s = 1.0 / (1.0 + e);
        if self >= 0.0 {
            s
        } else {
            e * s
        }
    }
}

impl Real for f64 {
    fn of(v: f64) -> Self {
        v
    }
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    fn sigmoid(self) -> Self {
        1.0 / (1.0 + (-self).exp())
    }
}

/// The contiguous elements of `s` under `l`.
pub(crate) fn elements<'a, T: WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
) -> candle_core::Result<&'a [T]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("fused kernel: operand not contiguous".into()))?;
    Ok(&s.as_slice::<T>()?[a..b])
}

/// Whether the fused kernels take `t` (f32 or f64 on the CPU).
pub(crate) fn fusable(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64)
}

/// Elements per parallel task of the element-wise kernels (64 KB of f32).
const CHUNK: usize = 1 << 14;

/// `kernel(x, out)` over `x` in parallel chunks: a new vector of `x`'s length.
pub(crate) fn map_chunks<T: WithDType>(x: &[T], kernel: impl Fn(&[T], &mut [T]) + Sync) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(o, x)| kernel(x, o));
    out
}

/// `kernel(x, y, out)` over `x` and `y` (of one length) in parallel chunks.
pub(crate) fn map2_chunks<T: WithDType>(
    x: &[T],
    y: &[T],
    kernel: impl Fn(&[T], &[T], &mut [T]) + Sync,
) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK).zip(y.par_chunks(CHUNK)))
        .for_each(|(o, (x, y))| kernel(x, y, o));
    out
}

/// LayerNorm `(x - mean) r * w + b` over the last dimension,
/// `r = (mean((x - mean)^2) + eps)^(-1/2)` (operands `x`, `w`, `b`).
struct LayerNormOp {
    eps: f64,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "vlmq-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        fn run<T: Real>(
            eps: f64,
            (s1, l1): (&CpuStorage, &Layout),
            (s2, l2): (&CpuStorage, &Layout),
            (s3, l3): (&CpuStorage, &Layout),
        ) -> candle_core::Result<CpuStorage> {
            let x = elements::<T>(s1, l1)?;
            let (w, b) = (elements::<T>(s2, l2)?, elements::<T>(s3, l3)?);
            let n = w.len().max(1);
            let mut out = vec![T::of(0.0); x.len()];
            out.par_chunks_mut(n)
                .zip(x.par_chunks(n))
                .for_each(|(o, x)| {
                    let mean = x.iter().fold(T::of(0.0), |a, &v| a + v) / T::of(n as f64);
                    let var = x
                        .iter()
                        .fold(T::of(0.0), |a, &v| a + (v - mean) * (v - mean))
                        / T::of(n as f64);
                    let r = T::of(1.0) / (var + T::of(eps)).sqrt();
                    for (((o, &x), &w), &b) in o.iter_mut().zip(x).zip(w).zip(b) {
                        *o = (x - mean) * r * w + b;
                    }
                });
            Ok(T::to_cpu_storage_owned(out))
        }
        let out = match s1.dtype() {
            DType::F32 => run::<f32>(self.eps, (s1, l1), (s2, l2), (s3, l3))?,
            _ => run::<f64>(self.eps, (s1, l1), (s2, l2), (s3, l3))?,
        };
        Ok((out, l1.shape().clone()))
    }
}

/// `P * (dP - rowsum(P * dP))` over the last dimension (operands `P`, `dP`).
struct SoftmaxBackward;

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "vlmq-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        fn run<T: Real>(
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
        ) -> candle_core::Result<CpuStorage> {
            let (p, g) = (elements::<T>(s1, l1)?, elements::<T>(s2, l2)?);
            let n = l1.shape().dims().last().copied().unwrap_or(1).max(1);
            let mut out = vec![T::of(0.0); p.len()];
            out.par_chunks_mut(n)
                .zip(p.par_chunks(n).zip(g.par_chunks(n)))
                .for_each(|(o, (p, g))| {
                    let row = p
                        .iter()
                        .zip(g)
                        .fold(T::of(0.0), |acc, (&p, &g)| acc + p * g);
                    for ((o, &p), &g) in o.iter_mut().zip(p).zip(g) {
                        *o = p * (g - row);
                    }
                });
            Ok(T::to_cpu_storage_owned(out))
        }
        let out = match s1.dtype() {
            DType::F32 => run::<f32>(s1, l1, s2, l2)?,
            _ => run::<f64>(s1, l1, s2, l2)?,
        };
        Ok((out, l1.shape().clone()))
    }
}

/// Checks that two operands of an element-wise kernel match in shape and dtype.
pub(crate) fn same(a: &Tensor, b: &Tensor, op: &'static str) -> candle_core::Result<()> {
    if a.shape() != b.shape() {
        return Err(candle_core::Error::ShapeMismatchBinaryOp {
            lhs: a.shape().clone(),
            rhs: b.shape().clone(),
            op,
        });
    }
    if a.dtype() != b.dtype() {
        return Err(candle_core::Error::DTypeMismatchBinaryOp {
            lhs: a.dtype(),
            rhs: b.dtype(),
            op,
        });
    }
    Ok(())
}

/// LayerNorm of `x` over the last dimension with gain `w` and shift `b`
/// (`[d]` each); `composed` computes it off the fused kernel.
pub(crate) fn layer_norm(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
    composed: impl FnOnce() -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    if !fusable(x) || w.dims() != [d] || b.dims() != [d] {
        return composed();
    }
    same(w, b, "layer norm")?;
    let (w, b) = (w.to_dtype(x.dtype())?, b.to_dtype(x.dtype())?);
    x.contiguous()?
        .apply_op3_no_bwd(&w.contiguous()?, &b.contiguous()?, &LayerNormOp { eps })
}

/// The softmax backward `P * (dP - rowsum(P * dP))` over the last dimension.
pub(crate) fn softmax_backward(p: &Tensor, dp: &Tensor) -> candle_core::Result<Tensor> {
    same(p, dp, "softmax backward")?;
    if fusable(p) {
        return p
            .contiguous()?
            .apply_op2_no_bwd(&dp.contiguous()?, &SoftmaxBackward);
    }
    let row = (p * dp)?.sum_keepdim(D::Minus1)?;
    dp.broadcast_sub(&row)? * p
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Deterministic pseudo-random f64 values in `[-scale, scale)`.
    pub(crate) fn values(shape: &[usize], seed: u64, scale: f64) -> Tensor {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * scale
            })
            .collect();
        Tensor::from_vec(v, shape, &candle_core::Device::Cpu).unwrap()
    }

    /// The largest difference of `a` and `b` relative to the largest `|b|`.
    pub(crate) fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
        let a = a.to_dtype(DType::F64).unwrap();
        let b = b.to_dtype(DType::F64).unwrap();
        let scale = b
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let diff = (a - &b).unwrap().abs().unwrap().max_all().unwrap();
        diff.to_scalar::<f64>().unwrap() / scale.max(1e-300)
    }

    /// The fused kernels against the composed maths (the off-CPU path), in
    /// f64 (other operation order only: 1e-12) and in f32 (f32 rounding of a
    /// few operations: 1e-5).
    #[test]
    fn fused_kernels_match_the_composed_maths() {
        let f = values(&[3, 50, 37], 1, 4.0);
        let logits = values(&[2, 3, 40, 40], 3, 5.0);
        let p = candle_nn::ops::softmax_last_dim(&logits).unwrap();
        let dp = values(&[2, 3, 40, 40], 4, 1.0);
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
            let c = |t: &Tensor| t.to_dtype(dtype).unwrap();
            let w = values(&[37], 7, 0.5).affine(1.0, 1.0).unwrap();
            let b = values(&[37], 8, 0.5);
            // Rows with a mean far from zero, as residual streams have.
            let x = (&f + 3.0).unwrap();
            let fused = layer_norm(&c(&x), &c(&w), &c(&b), 1e-6, || unreachable!()).unwrap();
            let xc = x
                .broadcast_sub(&x.mean_keepdim(D::Minus1).unwrap())
                .unwrap();
            let var = xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
            let composed = xc
                .broadcast_div(&(var + 1e-6).unwrap().sqrt().unwrap())
                .unwrap()
                .broadcast_mul(&w)
                .unwrap()
                .broadcast_add(&b)
                .unwrap();
            let err = max_rel(&fused, &composed);
            assert!(err < tol, "layer norm {dtype:?}: {err:e}");
            let fused = softmax_backward(&c(&p), &c(&dp)).unwrap();
            let row = (&p * &dp).unwrap().sum_keepdim(D::Minus1).unwrap();
            let composed = (dp.broadcast_sub(&row).unwrap() * &p).unwrap();
            let err = max_rel(&fused, &composed);
            assert!(err < tol, "softmax backward {dtype:?}: {err:e}");
        }
    }

    /// Mismatched operands are errors, not panics.
    #[test]
    fn mismatched_operands_are_errors() {
        let a = values(&[2, 3], 1, 1.0);
        let b = values(&[3, 2], 2, 1.0);
        assert!(softmax_backward(&a, &b).is_err());
        let b32 = values(&[2, 3], 2, 1.0).to_dtype(DType::F32).unwrap();
        assert!(softmax_backward(&a, &b32).is_err());
    }

    /// The f32 sigmoid within 1e-6 of the f64 one relative to each value,
    /// over `z` in [-87, 87] (both branches, the tails near 0 and 1): the
    /// exponential's 3e-7 and three f32 roundings stay below it, a wrong
    /// branch or a missing factor does not.
    #[test]
    fn f32_sigmoid_is_close_to_each_value() {
        for i in -8700..=8700 {
            let z = i as f32 * 0.01;
            let want = f64::from(z).sigmoid();
            let got = f64::from(z.sigmoid());
            assert!(
                (got - want).abs() <= 1e-6 * want,
                "z = {z}: {got} vs {want}"
            );
        }
    }
}
