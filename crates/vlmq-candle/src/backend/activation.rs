//! The vision MLPs' activations and their backward `da * act'(f)`, each one
//! fused pass over its operands on the CPU.
//!
//! Both GELUs are written with one `exp` each: `(1 + tanh(u)) / 2 =
//! sigmoid(2u)`, so tanh-GELU is `f * sigmoid(2u)` (libm's `tanhf` cost
//! twice its `expf` in the profile of a SigLIP block); quick-GELU is
//! `f * sigmoid(1.702 f)`. In f32 the sigmoid takes the vectorizable
//! exponential of the attention's softmax ([`Real::sigmoid`]) and the
//! kernels run in 512-bit vectors where the CPU has them
//! ([`crate::backend::wide`]): libm's scalar `expf` per element was 5% of
//! a SigLIP block's forward. Every element is computed on its own, so
//! neither the split over threads nor the vector width changes a bit. Off
//! the CPU, or for other dtypes than f32 and f64, the same maths runs
//! composed from candle ops.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};

use crate::backend::fused::{elements, fusable, map2_chunks, map_chunks, same, Real};
use crate::backend::wide::widened;
use crate::models::vision_ops::MlpAct;

/// `sqrt(2 / pi)` and the cubic coefficient of the tanh approximation.
const GELU_C: f64 = 0.797_884_560_802_865_4;
const GELU_A: f64 = 0.044_715;

/// The argument `z` of the activation's sigmoid (`a = f * sigmoid(z)`) and
/// its derivative `dz/df`.
#[inline(always)]
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

/// The activation `f * sigmoid(z(f))` of each element of `f`, into `out`.
#[inline(always)]
fn activate_into<T: Real>(act: MlpAct, f: &[T], out: &mut [T]) {
    for (o, &f) in out.iter_mut().zip(f) {
        *o = f * gate(act, f).0.sigmoid();
    }
}

/// `da * act'(f)` of each element, into `out`, where the derivative is
/// `s + f s (1 - s) z'` with `s = sigmoid(z(f))`.
#[inline(always)]
fn backward_into<T: Real>(act: MlpAct, f: &[T], da: &[T], out: &mut [T]) {
    for ((o, &f), &g) in out.iter_mut().zip(f).zip(da) {
        let (z, dz) = gate(act, f);
        let s = z.sigmoid();
        *o = g * (s + f * s * (T::of(1.0) - s) * dz);
    }
}

widened!(fn activate_f32(act: MlpAct, f: &[f32], out: &mut [f32]) = activate_into::<f32>;);
widened!(fn backward_f32(act: MlpAct, f: &[f32], da: &[f32], out: &mut [f32]) = backward_into::<f32>;);

/// An MLP activation on each element.
struct Activation(MlpAct);

impl CustomOp1 for Activation {
    fn name(&self) -> &'static str {
        "vlmq-activation"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let act = self.0;
        let out = match s.dtype() {
            DType::F32 => {
                CpuStorage::F32(map_chunks(elements(s, l)?, |f, o| activate_f32(act, f, o)))
            }
            _ => CpuStorage::F64(map_chunks(elements(s, l)?, |f, o| activate_into(act, f, o))),
        };
        Ok((out, l.shape().clone()))
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
        let act = self.0;
        let out = match s1.dtype() {
            DType::F32 => CpuStorage::F32(map2_chunks(
                elements(s1, l1)?,
                elements(s2, l2)?,
                |f, da, o| backward_f32(act, f, da, o),
            )),
            _ => CpuStorage::F64(map2_chunks(
                elements(s1, l1)?,
                elements(s2, l2)?,
                |f, da, o| backward_into(act, f, da, o),
            )),
        };
        Ok((out, l1.shape().clone()))
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::fused::tests::{max_rel, values};

    /// The fused kernels against the composed maths (the off-CPU path), in
    /// f64 (other operation order only: 1e-12) and in f32 (f32 rounding of a
    /// few operations and the f32 exponential's 3e-7: 1e-5).
    #[test]
    fn fused_activations_match_the_composed_maths() {
        // Activation inputs up to |12|: both tails of the GELUs and the middle.
        let f = values(&[3, 50, 37], 1, 12.0);
        let g = values(&[3, 50, 37], 2, 1.0);
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
        }
    }

    /// The kernels built for AVX-512 (which these calls run where the CPU
    /// has it) give the bits of the baseline build, inlined here.
    #[test]
    fn the_wide_build_gives_the_baseline_bits() {
        let f: Vec<f32> = values(&[1031], 5, 9.0)
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap();
        let g: Vec<f32> = values(&[1031], 6, 1.0)
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for act in [MlpAct::QuickGelu, MlpAct::GeluTanh] {
            let (mut base, mut wide) = (vec![0.0f32; f.len()], vec![0.0f32; f.len()]);
            activate_into(act, &f, &mut base);
            activate_f32(act, &f, &mut wide);
            assert_eq!(bits(&base), bits(&wide), "{act:?}");
            backward_into(act, &f, &g, &mut base);
            backward_f32(act, &f, &g, &mut wide);
            assert_eq!(bits(&base), bits(&wide), "{act:?} backward");
        }
    }

    #[test]
    fn mismatched_operands_are_errors() {
        let a = values(&[2, 3], 1, 1.0);
        let b = values(&[3, 2], 2, 1.0);
        assert!(activation_backward(MlpAct::GeluTanh, &a, &b).is_err());
        let b32 = values(&[2, 3], 2, 1.0).to_dtype(DType::F32).unwrap();
        assert!(activation_backward(MlpAct::QuickGelu, &a, &b32).is_err());
    }
}
