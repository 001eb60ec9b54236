//! Fused CPU kernels for the vision blocks' element-wise work: each MLP
//! activation, its backward `da * act'(f)`, the softmax backward
//! `P * (dP - rowsum(P * dP))` and LayerNorm, each one pass over its
//! operands.
//!
//! Composed from candle's element-wise ops, the tanh-GELU backward is a
//! dozen passes over the `[patches, mlp]` activations, the softmax
//! backward four over the `[heads, patches, patches]` probabilities and
//! LayerNorm nine, each allocating its result. Both GELUs are written with
//! one `exp` each: `(1 + tanh(u)) / 2 = sigmoid(2u)`, so tanh-GELU is
//! `f * sigmoid(2u)` (libm's `tanhf` cost twice its `expf` in the profile
//! of a SigLIP block). Every element (every row, for the softmax and the
//! norm) is
//! computed on its own, in a fixed order, so the split over threads does
//! not change a bit. Off the CPU, or for other dtypes than f32 and f64,
//! the same maths runs composed from candle ops.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, WithDType, D,
};
use rayon::prelude::*;

use crate::models::vision_ops::MlpAct;

/// The float arithmetic the kernels need, for f32 and f64.
trait Real:
    WithDType
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
{
    fn of(v: f64) -> Self;
    fn exp(self) -> Self;
    fn sqrt(self) -> Self;
}

impl Real for f32 {
    fn of(v: f64) -> Self {
        v as f32
    }
    fn exp(self) -> Self {
        f32::exp(self)
    }
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
}

impl Real for f64 {
    fn of(v: f64) -> Self {
        v
    }
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
}

/// `sqrt(2 / pi)` and the cubic coefficient of the tanh approximation.
const GELU_C: f64 = 0.797_884_560_802_865_4;
const GELU_A: f64 = 0.044_715;

/// `1 / (1 + exp(-z))`.
fn sigmoid<T: Real>(z: T) -> T {
    T::of(1.0) / (T::of(1.0) + (T::of(0.0) - z).exp())
}

/// The argument `z` of the activation's sigmoid (`a = f * sigmoid(z)`) and
/// its derivative `dz/df`.
fn gate<T: Real>(act: MlpAct, f: T) -> (T, T) {
    match act {
        MlpAct::QuickGelu => (T::of(1.702) * f, T::of(1.702)),
        MlpAct::GeluTanh => {
            let f2 = f * f;
            let z = T::of(2.0 * GELU_C) * f * (T::of(1.0) + T::of(GELU_A) * f2);
            (
                z,
                T::of(2.0 * GELU_C) * (T::of(1.0) + T::of(3.0 * GELU_A) * f2),
            )
        }
    }
}

/// The activation `f * sigmoid(z(f))`.
fn activate<T: Real>(act: MlpAct, f: T) -> T {
    f * sigmoid(gate(act, f).0)
}

/// The activation's derivative at `f`: `s + f s (1 - s) z'` with
/// `s = sigmoid(z(f))`.
fn slope<T: Real>(act: MlpAct, f: T) -> T {
    let (z, dz) = gate(act, f);
    let s = sigmoid(z);
    s + f * s * (T::of(1.0) - s) * dz
}

/// The contiguous elements of `s` under `l`.
fn elements<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [T]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("fused kernel: operand not contiguous".into()))?;
    Ok(&s.as_slice::<T>()?[a..b])
}

/// Whether the fused kernels take `t` (f32 or f64 on the CPU).
fn fusable(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64)
}

/// An MLP activation on each element.
struct Activation(MlpAct);

impl CustomOp1 for Activation {
    fn name(&self) -> &'static str {
        "vlmq-activation"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        fn run<T: Real>(
            act: MlpAct,
            s: &CpuStorage,
            l: &Layout,
        ) -> candle_core::Result<CpuStorage> {
            let f = elements::<T>(s, l)?;
            let out: Vec<T> = f.par_iter().map(|&f| activate(act, f)).collect();
            Ok(T::to_cpu_storage_owned(out))
        }
        let out = match s.dtype() {
            DType::F32 => run::<f32>(self.0, s, l)?,
            _ => run::<f64>(self.0, s, l)?,
        };
        Ok((out, l.shape().clone()))
    }
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

/// `da * act'(f)` on each element (operands `f`, `da`).
struct ActivationBackward(MlpAct);

impl CustomOp2 for ActivationBackward {
    fn name(&self) -> &'static str {
        "vlmq-activation-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        fn run<T: Real>(
            act: MlpAct,
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
        ) -> candle_core::Result<CpuStorage> {
            let (f, da) = (elements::<T>(s1, l1)?, elements::<T>(s2, l2)?);
            let out: Vec<T> = f
                .par_iter()
                .zip(da.par_iter())
                .map(|(&f, &g)| g * slope(act, f))
                .collect();
            Ok(T::to_cpu_storage_owned(out))
        }
        let out = match s1.dtype() {
            DType::F32 => run::<f32>(self.0, s1, l1, s2, l2)?,
            _ => run::<f64>(self.0, s1, l1, s2, l2)?,
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
fn same(a: &Tensor, b: &Tensor, op: &'static str) -> candle_core::Result<()> {
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

/// The MLP activation of `z`.
pub(crate) fn activation(act: MlpAct, z: &Tensor) -> candle_core::Result<Tensor> {
    if fusable(z) {
        return z.contiguous()?.apply_op1_no_bwd(&Activation(act));
    }
    match act {
        MlpAct::GeluTanh => z.gelu(),
        MlpAct::QuickGelu => z * candle_nn::ops::sigmoid(&(z * 1.702)?)?,
    }
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

/// The gradient at the activation's input `f` from the gradient `da` at
/// its output: `da * act'(f)`.
pub(crate) fn activation_backward(
    act: MlpAct,
    f: &Tensor,
    da: &Tensor,
) -> candle_core::Result<Tensor> {
    same(f, da, "activation backward")?;
    if fusable(f) {
        return f
            .contiguous()?
            .apply_op2_no_bwd(&da.contiguous()?, &ActivationBackward(act));
    }
    da * activation_slope(act, f)?
}

/// The activation's derivative at `f`, composed from candle ops.
pub(crate) fn activation_slope(act: MlpAct, f: &Tensor) -> candle_core::Result<Tensor> {
    match act {
        MlpAct::QuickGelu => {
            let z = (f * 1.702)?;
            let s = candle_nn::ops::sigmoid(&z)?;
            &s * ((z * (1.0 - &s)?)? + 1.0)?
        }
        MlpAct::GeluTanh => {
            let f2 = f.sqr()?;
            let t = ((f * GELU_C)? * ((&f2 * GELU_A)? + 1.0)?)?.tanh()?;
            let du = ((&f2 * (3.0 * GELU_A * GELU_C))? + GELU_C)?;
            let one_minus_t2 = (1.0 - t.sqr()?)?;
            ((t + 1.0)? * 0.5)? + ((f * 0.5)? * one_minus_t2)?.mul(&du)?
        }
    }
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
mod tests {
    use super::*;

    fn values(shape: &[usize], seed: u64, scale: f64) -> Tensor {
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

    fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
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
        // Activation inputs up to |4|: both tails of the GELUs and the middle.
        let f = values(&[3, 50, 37], 1, 4.0);
        let g = values(&[3, 50, 37], 2, 1.0);
        let logits = values(&[2, 3, 40, 40], 3, 5.0);
        let p = candle_nn::ops::softmax_last_dim(&logits).unwrap();
        let dp = values(&[2, 3, 40, 40], 4, 1.0);
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
            let c = |t: &Tensor| t.to_dtype(dtype).unwrap();
            for act in [MlpAct::QuickGelu, MlpAct::GeluTanh] {
                let fused = activation_backward(act, &c(&f), &c(&g)).unwrap();
                let composed = (&g * activation_slope(act, &f).unwrap()).unwrap();
                let err = max_rel(&fused, &composed);
                assert!(err < tol, "{act:?} backward {dtype:?}: {err:e}");
            }
            let fused = activation(MlpAct::QuickGelu, &c(&f)).unwrap();
            let composed = (&f * candle_nn::ops::sigmoid(&(&f * 1.702).unwrap()).unwrap()).unwrap();
            let err = max_rel(&fused, &composed);
            assert!(err < tol, "quick-GELU {dtype:?}: {err:e}");
            // candle's own tanh-GELU, in the tanh form.
            let fused = activation(MlpAct::GeluTanh, &c(&f)).unwrap();
            let err = max_rel(&fused, &f.gelu().unwrap());
            assert!(err < tol, "tanh-GELU {dtype:?}: {err:e}");
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
        assert!(activation_backward(MlpAct::GeluTanh, &a, &b).is_err());
        let b32 = values(&[2, 3], 2, 1.0).to_dtype(DType::F32).unwrap();
        assert!(softmax_backward(&a, &b32).is_err());
    }
}
