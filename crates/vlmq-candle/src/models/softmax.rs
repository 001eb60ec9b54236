//! The softmax over the last dimension of the vision towers' attention
//! scores, with an exponential the compiler vectorizes.
//!
//! candle's CPU softmax calls libm's scalar `expf` once per score: over one
//! image's 1024 patches that is 12.6 M calls per SigLIP block, 12% of its
//! forward in a profile. Here each row is one pass for its maximum, one for
//! `exp(x - max)` and the sum, one for the division, where the exponential
//! is the core's `exp_nonpositive` (the reference backend's): a range
//! reduction and a polynomial, plain arithmetic the compiler vectorizes,
//! within 3e-7 relative of `exp`. Rows are independent and each is reduced in a
//! fixed order (interleaved partial sums added in lane order), so the split
//! over threads changes no bit. f32 on the CPU only; other dtypes and
//! devices use candle's softmax. The gradient is the softmax's own
//! `P * (dP - rowsum(P * dP))`.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;
use vlmq::__private::exp_nonpositive;

use crate::backend::wide::widened;

/// Interleaved partial sums per row sum: element `i` goes to lane `i % LANES`.
const LANES: usize = 16;

/// One row of the softmax: `out = exp(x - max x) / sum`.
#[inline(always)]
fn softmax_row(x: &[f32], out: &mut [f32]) {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut lanes = [0.0f32; LANES];
    let (xc, xr) = x.as_chunks::<LANES>();
    let (oc, or) = out.as_chunks_mut::<LANES>();
    for (xs, os) in xc.iter().zip(oc.iter_mut()) {
        for l in 0..LANES {
            let e = exp_nonpositive(xs[l] - max);
            os[l] = e;
            lanes[l] += e;
        }
    }
    let mut sum = lanes.iter().sum::<f32>();
    for (&v, o) in xr.iter().zip(or.iter_mut()) {
        let e = exp_nonpositive(v - max);
        *o = e;
        sum += e;
    }
    let inv = 1.0 / sum;
    for o in out.iter_mut() {
        *o *= inv;
    }
}

widened!(fn softmax_row_wide(x: &[f32], out: &mut [f32]) = softmax_row;);

/// The softmax over the last dimension of a contiguous f32 CPU tensor.
struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "vlmq-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = match (s, l.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((a, b))) => &v[a..b],
            _ => candle_core::bail!("vlmq-softmax takes a contiguous f32 tensor"),
        };
        let n = l.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![0.0f32; x.len()];
        out.par_chunks_mut(n)
            .zip(x.par_chunks(n))
            .for_each(|(o, x)| softmax_row_wide(x, o));
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let row = (res * grad_res)?.sum_keepdim(D::Minus1)?;
        Ok(Some((grad_res.broadcast_sub(&row)? * res)?))
    }
}

/// The softmax of `x` over its last dimension (see the module doc).
pub(crate) fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 && x.elem_count() > 0 {
        return x.contiguous()?.apply_op1(Softmax);
    }
    candle_nn::ops::softmax_last_dim(x)
}

#[cfg(test)]
mod tests {
    use candle_core::Var;

    use super::*;

    fn scores(shape: &[usize], seed: u64, scale: f32) -> Tensor {
        crate::backend::fused::tests::values(shape, seed, f64::from(scale))
            .to_dtype(candle_core::DType::F32)
            .unwrap()
    }

    #[test]
    fn matches_candles_softmax() {
        // Rows of 37 (two chunks of 16 and a remainder) and 1024, scores
        // spread over +-30 so that many probabilities underflow.
        for (shape, scale) in [(&[3usize, 5, 37][..], 30.0f32), (&[2, 1024], 8.0)] {
            let x = scores(shape, 7, scale);
            let ours = softmax_last_dim(&x).unwrap();
            let theirs = candle_nn::ops::softmax_last_dim(&x).unwrap();
            let a: Vec<f32> = ours.flatten_all().unwrap().to_vec1().unwrap();
            let b: Vec<f32> = theirs.flatten_all().unwrap().to_vec1().unwrap();
            // Each probability is exp / sum: a few f32 roundings on both
            // sides (2 ulp of the exponential, the sum's order, the
            // reciprocal), so 1e-6 relative to the row's largest (<= 1) is
            // far above them and far below any wrong term.
            let worst = a
                .iter()
                .zip(&b)
                .map(|(p, q)| (p - q).abs())
                .fold(0.0, f32::max);
            assert!(worst < 1e-6, "{shape:?}: {worst:e}");
        }
    }

    #[test]
    fn gradient_is_the_softmax_backward() {
        let x = Var::from_tensor(&scores(&[4, 9], 3, 2.0)).unwrap();
        let w = scores(&[4, 9], 5, 1.0);
        let ours = (softmax_last_dim(x.as_tensor()).unwrap() * &w).unwrap();
        let g = ours.sum_all().unwrap().backward().unwrap();
        let ours = g.get(&x).unwrap().clone();
        let theirs = (candle_nn::ops::softmax(x.as_tensor(), D::Minus1).unwrap() * &w).unwrap();
        let g = theirs.sum_all().unwrap().backward().unwrap();
        let theirs = g.get(&x).unwrap();
        let d = (ours - theirs).unwrap().abs().unwrap().max_all().unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-6);
    }

    /// The row kernel built for AVX-512 (which this test runs where the CPU
    /// has it) gives the bits of the baseline build, inlined here.
    #[test]
    fn the_wide_build_gives_the_baseline_bits() {
        let x: Vec<f32> = scores(&[1061], 13, 20.0).to_vec1::<f32>().unwrap();
        let (mut base, mut wide) = (vec![0.0f32; x.len()], vec![0.0f32; x.len()]);
        softmax_row(&x, &mut base);
        softmax_row_wide(&x, &mut wide);
        let bits = |v: &[f32]| v.iter().map(|p| p.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&base), bits(&wide));
    }

    #[test]
    fn threads_change_no_bit() {
        let x = scores(&[6, 300], 11, 10.0);
        let run = |threads| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| softmax_last_dim(&x).unwrap())
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(run(1), run(3));
    }
}
