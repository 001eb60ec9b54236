//! The product `x W^T` as a custom autograd op whose backward pass computes
//! only the gradient of its input.
//!
//! candle's autograd differentiates a matrix product with respect to both
//! operands, even when one of them (here the layer's weight) is a constant
//! that nothing asks the gradient of: for every linear layer the backward
//! pass spends a full extra product on `dL/dW` and adds it into a gradient
//! the size of the weight. The importance pass needs only gradients of
//! activations, so on the CPU the differentiable forward runs each linear
//! through [`InputGradMatmul`]: the forward is candle's own CPU matrix
//! product on the same operands and layouts (the same bits as
//! `x.matmul(&w.t())`), and the backward returns `dL/dx = dL/dy W`, the
//! product candle itself would form for the input.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Storage, Tensor};

/// `y = x W^T` for `x: [m, in]` and a constant `W: [out, in]`; the backward
/// pass yields the gradient of `x` only.
pub(crate) struct InputGradMatmul {
    /// The weight `[out, in]`.
    weight: Tensor,
}

impl InputGradMatmul {
    /// Applies `x W^T` to a 2-D `x`, recording the op for autograd.
    pub(crate) fn apply(x: &Tensor, weight: &Tensor) -> candle_core::Result<Tensor> {
        x.apply_op1(InputGradMatmul {
            weight: weight.detach(),
        })
    }
}

impl CustomOp1 for InputGradMatmul {
    fn name(&self) -> &'static str {
        "vlmq-input-grad-matmul"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k) = x_layout.shape().dims2()?;
        let (n, k2) = self.weight.dims2()?;
        if k != k2 {
            return Err(candle_core::Error::ShapeMismatchBinaryOp {
                lhs: x_layout.shape().clone(),
                rhs: self.weight.shape().clone(),
                op: "input-grad matmul",
            });
        }
        let wt = self.weight.t()?;
        let (storage, w_layout) = wt.storage_and_layout();
        let Storage::Cpu(w) = &*storage else {
            return Err(candle_core::Error::Msg(
                "input-grad matmul: the weight is not on the CPU".into(),
            ));
        };
        let y = x.matmul(w, (1, m, n, k), x_layout, w_layout)?;
        Ok((y, Shape::from((m, n))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad_y.matmul(&self.weight)?))
    }
}

/// `x W^T` for a 2-D `x: [m, in]` and `W: [out, in]`: through
/// [`InputGradMatmul`] when `x` is part of an autograd graph on the CPU,
/// candle's plain product otherwise (same forward bits either way).
pub(crate) fn matmul_weight_t(x: &Tensor, weight: &Tensor) -> candle_core::Result<Tensor> {
    if x.track_op() && x.device().is_cpu() {
        InputGradMatmul::apply(x, weight)
    } else {
        x.matmul(&weight.t()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    fn tensor(rows: usize, cols: usize, seed: usize, dtype: DType) -> Tensor {
        let v: Vec<f64> = (0..rows * cols)
            .map(|i| (((i * 37 + seed * 11) % 23) as f64 - 11.0) / 7.0)
            .collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    /// Same output bits and same input gradient as candle's own product, in
    /// f32 and f64, and no gradient reaches the weight.
    #[test]
    fn matches_candle_matmul_and_leaves_the_weight_alone() {
        for dtype in [DType::F32, DType::F64] {
            let x = Var::from_tensor(&tensor(7, 5, 1, dtype)).unwrap();
            let w = Var::from_tensor(&tensor(3, 5, 2, dtype)).unwrap();
            let g = tensor(7, 3, 3, dtype);

            let y_ref = x.matmul(&w.t().unwrap()).unwrap();
            let grads_ref = (&y_ref * &g)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let y = InputGradMatmul::apply(&x, &w).unwrap();
            let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();

            let flat = |t: &Tensor| {
                t.flatten_all()
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()
            };
            assert_eq!(flat(&y), flat(&y_ref), "{dtype:?}: output");
            let gx = grads.get(x.as_tensor()).expect("input gradient");
            let gx_ref = grads_ref.get(x.as_tensor()).unwrap();
            assert_eq!(flat(gx), flat(gx_ref), "{dtype:?}: input gradient");
            assert!(grads_ref.get(w.as_tensor()).is_some());
            assert!(
                grads.get(w.as_tensor()).is_none(),
                "{dtype:?}: weight gradient formed"
            );
        }
    }

    #[test]
    fn a_mismatched_width_is_an_error() {
        let x = Var::from_tensor(&tensor(2, 4, 1, DType::F32)).unwrap();
        let w = tensor(3, 5, 2, DType::F32);
        assert!(InputGradMatmul::apply(&x, &w).is_err());
    }
}
