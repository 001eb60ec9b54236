//! The streaming accumulator.

use ndarray::{Array1, Array2, ArrayView1, ArrayView2, Axis, Zip};

use super::LayerStatistics;
use crate::error::{Error, Result};
use crate::linalg::{gram_upper_into, Scalar};
use crate::validate::check_finite;

/// Streams batches of layer inputs into `sum_t alpha_t x_t x_t^T` (and, for
/// GPTAQ, `sum_t alpha_t (x_t - x~_t) x~_t^T`), keeping raw sums in `T`
/// (`f32`, or `f64` for very long calibration sets) and normalizing once in
/// [`finish`](Self::finish).
///
/// Only the upper triangle of the symmetric sum is computed (tile by tile,
/// in parallel). Tiles are fixed, so for a given sequence of batches the
/// result is bit-identical for any thread count; splitting the same tokens
/// into other batches changes only the order of additions.
///
/// ```
/// use ndarray::array;
/// use vlmq::hessian::HessianAccumulator;
/// let mut acc = HessianAccumulator::<f32>::new(2);
/// acc.add(array![[1.0f32, 0.0], [0.0, 2.0]].view(), None)?;
/// let h = acc.finish()?.hessian;
/// assert_eq!(h, array![[1.0, 0.0], [0.0, 4.0]]); // 2/N * X^T X with N = 2
/// # Ok::<(), vlmq::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct HessianAccumulator<T: Scalar = f32> {
    dim: usize,
    sum: Array2<T>,
    cross: Option<Array2<T>>,
    tokens: usize,
    weight_sum: f64,
}

impl<T: Scalar> HessianAccumulator<T> {
    /// An empty accumulator for inputs of `dim` features.
    pub fn new(dim: usize) -> Self {
        HessianAccumulator {
            dim,
            sum: Array2::zeros((dim, dim)),
            cross: None,
            tokens: 0,
            weight_sum: 0.0,
        }
    }

    /// An empty accumulator that also collects GPTAQ's cross term; feed it with
    /// [`add_paired`](Self::add_paired).
    pub fn with_cross_term(dim: usize) -> Self {
        let mut acc = Self::new(dim);
        acc.cross = Some(Array2::zeros((dim, dim)));
        acc
    }

    /// Input features.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Tokens accumulated so far.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Adds a batch `x` of shape `[tokens, dim]` with optional per-token
    /// importance `alpha` (finite, >= 0; `None` means all ones). Tokens of
    /// weight 0 are dropped before the products: they count in
    /// [`tokens`](Self::tokens) but the sums are bit-identical to never
    /// having added them.
    pub fn add(
        &mut self,
        x: ArrayView2<'_, f32>,
        alpha: Option<ArrayView1<'_, f32>>,
    ) -> Result<()> {
        if self.cross.is_some() {
            return Err(Error::InvalidConfig {
                field: "accumulator",
                value: "unpaired batch".into(),
                reason: "an accumulator with a cross term needs paired inputs (add_paired)",
            });
        }
        self.check_batch("layer input", x, alpha)?;
        let batch_tokens = x.nrows();
        let kept = positive_rows(x, None, alpha);
        let (x, alpha) = match &kept {
            Some((x, _, a)) => (x.view(), Some(a.view())),
            None => (x, alpha),
        };
        let mut scaled = x.mapv(T::widen);
        scale_rows_by_root(&mut scaled, alpha);
        gram_upper_into(&mut self.sum, scaled.view(), scaled.view());
        self.tokens += batch_tokens;
        self.weight_sum += weight_sum(x.nrows(), alpha);
        Ok(())
    }

    /// Adds paired inputs: `quantized` (`x~`, the input on the quantized path)
    /// and `full` (`x`, the full-precision model's input), both `[tokens, dim]`.
    /// The Hessian is built from `x~`; the cross term from `(x - x~) x~^T`.
    pub fn add_paired(
        &mut self,
        quantized: ArrayView2<'_, f32>,
        full: ArrayView2<'_, f32>,
        alpha: Option<ArrayView1<'_, f32>>,
    ) -> Result<()> {
        if full.dim() != quantized.dim() {
            return Err(Error::shape(
                "full-precision inputs paired with quantized-path inputs",
                quantized.shape(),
                full.shape(),
            ));
        }
        self.check_batch("quantized-path layer input", quantized, alpha)?;
        check_finite("full-precision layer input", full)?;
        let batch_tokens = quantized.nrows();
        let kept = positive_rows(quantized, Some(full), alpha);
        let (quantized, full, alpha) = match &kept {
            Some((q, f, a)) => (
                q.view(),
                f.as_ref().map_or(full, |f| f.view()),
                Some(a.view()),
            ),
            None => (quantized, full, alpha),
        };
        let mut scaled = quantized.mapv(T::widen);
        scale_rows_by_root(&mut scaled, alpha);
        gram_upper_into(&mut self.sum, scaled.view(), scaled.view());
        if let Some(cross) = self.cross.as_mut() {
            let mut delta = Zip::from(&full)
                .and(&quantized)
                .map_collect(|&f, &q| T::widen(f) - T::widen(q));
            scale_rows_by_root(&mut delta, alpha);
            cross_into(cross, delta.view(), scaled.view());
        }
        self.tokens += batch_tokens;
        self.weight_sum += weight_sum(quantized.nrows(), alpha);
        Ok(())
    }

    /// Adds another accumulator's sums (same dimension and kind).
    pub fn merge(&mut self, other: &HessianAccumulator<T>) -> Result<()> {
        if other.dim != self.dim {
            return Err(Error::shape(
                "merged accumulator",
                &[self.dim],
                &[other.dim],
            ));
        }
        if other.cross.is_some() != self.cross.is_some() {
            return Err(Error::InvalidConfig {
                field: "accumulator",
                value: "merge".into(),
                reason: "cannot merge an accumulator with a cross term and one without",
            });
        }
        self.sum += &other.sum;
        if let (Some(c), Some(o)) = (self.cross.as_mut(), other.cross.as_ref()) {
            *c += o;
        }
        self.tokens += other.tokens;
        self.weight_sum += other.weight_sum;
        Ok(())
    }

    /// Normalizes by the weight sum and returns the statistics (f32).
    /// Errors when no token carried positive weight.
    pub fn finish(&self) -> Result<LayerStatistics> {
        if self.weight_sum <= 0.0 {
            return Err(Error::Empty {
                what: "calibration tokens with positive weight".into(),
            });
        }
        let norm = 2.0 / self.weight_sum;
        let n = self.dim;
        let hessian = Array2::from_shape_fn((n, n), |(i, j)| {
            let v = if i <= j {
                self.sum[[i, j]]
            } else {
                self.sum[[j, i]]
            };
            (v.wide() * norm) as f32
        });
        let cross = self
            .cross
            .as_ref()
            .map(|c| c.mapv(|v| (v.wide() * norm) as f32));
        let stats = LayerStatistics {
            hessian,
            cross,
            tokens: self.tokens,
            weight_sum: self.weight_sum,
        };
        stats.check_finite()?;
        Ok(stats)
    }

    fn check_batch(
        &self,
        what: &str,
        x: ArrayView2<'_, f32>,
        alpha: Option<ArrayView1<'_, f32>>,
    ) -> Result<()> {
        if x.ncols() != self.dim {
            return Err(Error::shape(what, &[x.nrows(), self.dim], x.shape()));
        }
        check_finite(what, x)?;
        if let Some(a) = alpha {
            if a.len() != x.nrows() {
                return Err(Error::shape("importance factors", &[x.nrows()], &[a.len()]));
            }
            if let Some((token, &value)) = a
                .iter()
                .enumerate()
                .find(|(_, v)| !(v.is_finite() && **v >= 0.0))
            {
                return Err(Error::InvalidImportance { token, value });
            }
        }
        Ok(())
    }
}

/// Multiplies every row of `m` by the square root of its weight, so that
/// `m^T m = x^T diag(alpha) x` is one symmetric Gram product over a single
/// operand (and `d^T m` the weighted cross term for a scaled `d`). No-op
/// without weights.
fn scale_rows_by_root<T: Scalar>(m: &mut Array2<T>, alpha: Option<ArrayView1<'_, f32>>) {
    if let Some(a) = alpha {
        for (mut row, &w) in m.axis_iter_mut(Axis(0)).zip(a.iter()) {
            let root = T::widen(w).sqrt();
            row.mapv_inplace(|v| v * root);
        }
    }
}

/// Sum of the weights: the token count without weights.
fn weight_sum(tokens: usize, alpha: Option<ArrayView1<'_, f32>>) -> f64 {
    alpha.map_or(tokens as f64, |a| a.iter().map(|&v| f64::from(v)).sum())
}

/// Rows with positive weight (of `x`, of `paired` when given, and of
/// `alpha`) when some token has weight 0; `None` when every token is kept.
///
/// Dropping zero-weight tokens before the products (instead of multiplying
/// them by 0) makes a token with `alpha = 0` bit-identical to a token never
/// seen, whatever the product kernel's summation order, and skips the work
/// for padding.
#[allow(clippy::type_complexity)]
fn positive_rows(
    x: ArrayView2<'_, f32>,
    paired: Option<ArrayView2<'_, f32>>,
    alpha: Option<ArrayView1<'_, f32>>,
) -> Option<(Array2<f32>, Option<Array2<f32>>, Array1<f32>)> {
    let a = alpha?;
    if a.iter().all(|&v| v > 0.0) {
        return None;
    }
    let keep: Vec<usize> = (0..a.len()).filter(|&t| a[t] > 0.0).collect();
    Some((
        x.select(Axis(0), &keep),
        paired.map(|p| p.select(Axis(0), &keep)),
        a.select(Axis(0), &keep),
    ))
}

/// `cross += delta^T weighted` (full, non-symmetric), in fixed row tiles.
fn cross_into<T: Scalar>(
    cross: &mut Array2<T>,
    delta: ArrayView2<'_, T>,
    weighted: ArrayView2<'_, T>,
) {
    use crate::linalg::{faer_mut, faer_ref};
    use rayon::prelude::*;
    const TILE: usize = 128;
    cross
        .axis_chunks_iter_mut(Axis(0), TILE)
        .into_par_iter()
        .enumerate()
        .for_each(|(t, tile)| {
            let rows = t * TILE..t * TILE + tile.nrows();
            faer::linalg::matmul::matmul(
                faer_mut(tile),
                faer::Accum::Add,
                faer_ref(delta.slice(ndarray::s![.., rows]).t()),
                faer_ref(weighted),
                T::one(),
                faer::Par::Seq,
            );
        });
}
