//! Layer objectives used to compare quantizers.

use ndarray::{ArrayView2, Zip};

use crate::error::{Error, Result};
use crate::linalg::matmul;

/// `tr((W - Q) H (W - Q)^T)`: with `H = (2/N) sum x x^T` this is `(2/N) sum_t
/// ||(W - Q) x_t||^2`, the GPTQ objective (weighted, for an importance-weighted `H`).
pub fn hessian_objective(
    w: ArrayView2<'_, f32>,
    q: ArrayView2<'_, f32>,
    hessian: ArrayView2<'_, f32>,
) -> Result<f64> {
    if w.dim() != q.dim() {
        return Err(Error::shape("quantized weight", w.shape(), q.shape()));
    }
    let n = w.ncols();
    if hessian.dim() != (n, n) {
        return Err(Error::shape("Hessian", &[n, n], hessian.shape()));
    }
    let d = &w - &q;
    let dh = matmul(d.view(), hessian);
    Ok(Zip::from(&d)
        .and(&dh)
        .fold(0.0f64, |acc, &a, &b| acc + f64::from(a) * f64::from(b)))
}

/// `sum_t ||Q x~_t - W x_t||^2 / N` with tokens as rows of `x_quantized` (`x~`)
/// and `x_full` (`x`): GPTAQ's asymmetric objective.
pub fn asymmetric_objective(
    w: ArrayView2<'_, f32>,
    q: ArrayView2<'_, f32>,
    x_full: ArrayView2<'_, f32>,
    x_quantized: ArrayView2<'_, f32>,
) -> Result<f64> {
    if w.dim() != q.dim() {
        return Err(Error::shape("quantized weight", w.shape(), q.shape()));
    }
    if x_full.dim() != x_quantized.dim() || x_full.ncols() != w.ncols() {
        return Err(Error::shape(
            "paired inputs",
            x_full.shape(),
            x_quantized.shape(),
        ));
    }
    let yq = matmul(x_quantized, q.t());
    let yw = matmul(x_full, w.t());
    let n = x_full.nrows().max(1) as f64;
    Ok(Zip::from(&yq)
        .and(&yw)
        .fold(0.0f64, |acc, &a, &b| acc + f64::from(a - b).powi(2))
        / n)
}
