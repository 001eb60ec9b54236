//! A linear's bias, and the residual stream it feeds, added into the
//! linear's fresh output in place.
//!
//! As candle ops, `r + (y + b)` is two passes, each allocating a tensor of
//! `y`'s size whose pages the kernel then faults in (a SigLIP block forms
//! 33 MB of them per image), on candle's element-wise pool, whose caller
//! spins while it runs. Here it is one pass over `y`'s own memory on
//! rayon's pool, 512 bits wide where the CPU has it
//! ([`crate::backend::wide`]). Each element is `r + (y + b)` in that order,
//! as the candle ops compute it: the same bits.

use candle_core::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Tensor, D};
use rayon::prelude::*;

use crate::backend::fused::{elements, Real};
use crate::backend::wide::widened;

/// Rows per parallel task.
const ROWS: usize = 16;

/// `y[i] = r[i] + (y[i] + b[i % width])` (no `r`: `y + b`; no `b`: `r + y`).
#[inline(always)]
fn add_into<T: Real>(y: &mut [T], b: Option<&[T]>, r: Option<&[T]>) {
    match (b, r) {
        (Some(b), Some(r)) => {
            for (row, rr) in y.chunks_mut(b.len()).zip(r.chunks(b.len())) {
                for ((y, &b), &r) in row.iter_mut().zip(b).zip(rr) {
                    *y = r + (*y + b);
                }
            }
        }
        (Some(b), None) => {
            for row in y.chunks_mut(b.len()) {
                for (y, &b) in row.iter_mut().zip(b) {
                    *y += b;
                }
            }
        }
        (None, Some(r)) => {
            for (y, &r) in y.iter_mut().zip(r) {
                *y = r + *y;
            }
        }
        (None, None) => {}
    }
}

widened!(fn add_f32(y: &mut [f32], b: Option<&[f32]>, r: Option<&[f32]>) = add_into::<f32>;);

/// [`add_into`] over row chunks of `y` in parallel (`width` values a row).
fn add_rows_par<T: Real + Send + Sync>(
    y: &mut [T],
    width: usize,
    b: Option<&[T]>,
    r: Option<&[T]>,
    kernel: impl Fn(&mut [T], Option<&[T]>, Option<&[T]>) + Sync,
) {
    let step = width.max(1) * ROWS;
    y.par_chunks_mut(step).enumerate().for_each(|(i, y)| {
        let r = r.map(|r| &r[i * step..i * step + y.len()]);
        kernel(y, b, r)
    });
}

/// The in-place op: bias `[width]` and/or residual of `y`'s shape.
struct AddRows {
    bias: bool,
    residual: bool,
    width: usize,
}

impl AddRows {
    fn run<T: Real + Send + Sync>(
        &self,
        y: &mut [T],
        srcs: &[(&CpuStorage, &Layout)],
        kernel: impl Fn(&mut [T], Option<&[T]>, Option<&[T]>) + Sync,
    ) -> candle_core::Result<()> {
        let mut srcs = srcs.iter();
        let mut next = |on: bool| -> candle_core::Result<Option<&[T]>> {
            if !on {
                return Ok(None);
            }
            match srcs.next() {
                Some((s, l)) => Ok(Some(elements::<T>(s, l)?)),
                None => candle_core::bail!("add rows: operand missing"),
            }
        };
        let b = next(self.bias)?;
        let r = next(self.residual)?;
        add_rows_par(y, self.width, b, r, kernel);
        Ok(())
    }

    fn cpu<const N: usize>(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        srcs: [(&CpuStorage, &Layout); N],
    ) -> candle_core::Result<()> {
        let (a, e) = dst_l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("add rows: output not contiguous".into()))?;
        match dst {
            CpuStorage::F32(v) => self.run(&mut v[a..e], &srcs, add_f32),
            CpuStorage::F64(v) => self.run(&mut v[a..e], &srcs, add_into::<f64>),
            _ => candle_core::bail!("add rows: f32 or f64 only"),
        }
    }
}

impl InplaceOp2 for AddRows {
    fn name(&self) -> &'static str {
        "vlmq-add-rows"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        s: &CpuStorage,
        l: &Layout,
    ) -> candle_core::Result<()> {
        self.cpu(dst, dst_l, [(s, l)])
    }
}

impl InplaceOp3 for AddRows {
    fn name(&self) -> &'static str {
        "vlmq-add-rows"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        self.cpu(dst, dst_l, [(s2, l2), (s3, l3)])
    }
}

/// Whether `t` can be an operand of the in-place add next to `y`.
fn fits(t: &Tensor, y: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == y.dtype() && !t.track_op() && t.is_contiguous()
}

/// `r + (y + b)` for a linear's output `y: [.., width]`, its bias `b:
/// [width]` and the residual stream `r` of `y`'s shape (either may be
/// absent). `y` must be a tensor no one else holds, such as a product just
/// formed: on the CPU, for contiguous f32 or f64 operands outside autograd,
/// the sums are written into `y`'s memory; otherwise they are candle ops.
pub(crate) fn add_rows(
    y: Tensor,
    b: Option<&Tensor>,
    r: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let width = y.dim(D::Minus1)?;
    let in_place = y.device().is_cpu()
        && matches!(y.dtype(), DType::F32 | DType::F64)
        && y.is_contiguous()
        && y.elem_count() > 0
        && !y.track_op()
        && b.is_none_or(|b| b.dims() == [width] && fits(b, &y))
        && r.is_none_or(|r| r.shape() == y.shape() && fits(r, &y));
    if !in_place {
        let y = match b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        return match r {
            Some(r) => r + y,
            None => Ok(y),
        };
    }
    let op = AddRows {
        bias: b.is_some(),
        residual: r.is_some(),
        width,
    };
    match (b, r) {
        (Some(b), Some(r)) => y.inplace_op3(b, r, &op)?,
        (Some(t), None) | (None, Some(t)) => y.inplace_op2(t, &op)?,
        (None, None) => {}
    }
    Ok(y)
}

#[cfg(test)]
mod tests {
    use candle_core::Var;

    use super::*;
    use crate::backend::fused::tests::values;

    fn bits(t: &Tensor) -> Vec<u64> {
        let t = t.flatten_all().unwrap();
        match t.dtype() {
            DType::F32 => t
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|v| u64::from(v.to_bits()))
                .collect(),
            _ => t
                .to_vec1::<f64>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect(),
        }
    }

    /// In place, every combination gives the bits of candle's ops, in f32
    /// and f64, over more rows than one parallel task takes (42 rows, 16 a
    /// task, so the residual's slices are offset).
    #[test]
    fn in_place_sums_are_candles_bits() {
        for dtype in [DType::F32, DType::F64] {
            let c = |t: Tensor| t.to_dtype(dtype).unwrap();
            let y = || c(values(&[2, 21, 37], 1, 3.0));
            let b = c(values(&[37], 2, 1.0));
            let r = c(values(&[2, 21, 37], 3, 5.0));
            let cases: [(Option<&Tensor>, Option<&Tensor>); 3] =
                [(Some(&b), Some(&r)), (Some(&b), None), (None, Some(&r))];
            for (bb, rr) in cases {
                let mut want = y();
                if let Some(b) = bb {
                    want = want.broadcast_add(b).unwrap();
                }
                if let Some(r) = rr {
                    want = (r + want).unwrap();
                }
                let y = y();
                let id = y.id();
                let got = add_rows(y, bb, rr).unwrap();
                assert_eq!(bits(&got), bits(&want), "{dtype:?} {}", bb.is_some());
                // Written into the product's memory, not a new tensor.
                assert_eq!(got.id(), id);
            }
        }
    }

    /// The operands are left alone; a non-contiguous output and autograd
    /// take candle's ops (and the gradient still flows).
    #[test]
    fn other_operands_take_candles_ops() {
        let b = values(&[4], 2, 1.0);
        let r = values(&[3, 4], 3, 1.0);
        let (b0, r0) = (bits(&b), bits(&r));
        let y = values(&[4, 3], 1, 1.0).t().unwrap();
        let got = add_rows(y.clone(), Some(&b), Some(&r)).unwrap();
        let want = (&r + y.broadcast_add(&b).unwrap()).unwrap();
        assert_eq!(bits(&got), bits(&want));
        assert_eq!((bits(&b), bits(&r)), (b0, r0));
        let v = Var::from_tensor(&values(&[3, 4], 4, 1.0)).unwrap();
        let y = (v.as_tensor() * 2.0).unwrap();
        let out = add_rows(y, Some(&b), Some(&r)).unwrap();
        let g = out.sum_all().unwrap().backward().unwrap();
        let dv = g.get(v.as_tensor()).unwrap();
        assert!(bits(dv).iter().all(|&x| f64::from_bits(x) == 2.0));
        assert!(add_rows(values(&[2, 3], 5, 1.0), Some(&b), None).is_err());
    }
}
