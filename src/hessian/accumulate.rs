//! The streaming accumulator.

use ndarray::{Array1, Array2, ArrayView1, ArrayView2, Axis, CowArray, Ix2, ShapeBuilder};
use rayon::prelude::*;

use super::LayerStatistics;
use crate::error::{Error, Result};
use crate::linalg::{cross_into, gram_upper_into, Scalar};
use crate::validate::check_finite;

/// Streams batches of layer inputs into `sum_t alpha_t x_t x_t^T` (and, for
/// GPTAQ, `sum_t alpha_t (x_t - x~_t) x~_t^T`), keeping raw sums in `T`
/// (`f32`, or `f64` for very long calibration sets) and normalizing once in
/// [`finish`](Self::finish).
///
/// Only the upper triangle of the symmetric sum is computed, in place, tile
/// by tile in parallel (see `linalg::gram_upper_into`), from a column-major copy of
/// the batch (rows scaled by the root weights when weighted; an unweighted
/// column-major `f32` batch is used where it lies). Tiles are fixed, so for a
/// given sequence of batches the result is bit-identical for any thread
/// count; splitting the same tokens into other batches changes only the
/// order of additions.
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

impl HessianAccumulator<f32> {
    /// [`finish`](Self::finish) in the accumulator's own memory: the same
    /// statistics, bit for bit, without a second `dim x dim` matrix beside
    /// the sums (485 MB for an 11008-wide layer).
    pub fn into_statistics(mut self) -> Result<LayerStatistics> {
        if self.weight_sum <= 0.0 {
            return Err(Error::Empty {
                what: "calibration tokens with positive weight".into(),
            });
        }
        let norm = 2.0 / self.weight_sum;
        let scale = |v: f32| (v.wide() * norm) as f32;
        let n = self.dim;
        // The upper triangle holds the sums; each value goes to both
        // halves, in 64 x 64 tiles (the lower half is written down columns).
        const TILE: usize = 64;
        for i0 in (0..n).step_by(TILE) {
            for j0 in (i0..n).step_by(TILE) {
                for i in i0..(i0 + TILE).min(n) {
                    for j in j0.max(i)..(j0 + TILE).min(n) {
                        let v = scale(self.sum[[i, j]]);
                        self.sum[[i, j]] = v;
                        self.sum[[j, i]] = v;
                    }
                }
            }
        }
        if let Some(c) = self.cross.as_mut() {
            c.mapv_inplace(scale);
        }
        let stats = LayerStatistics {
            hessian: self.sum,
            cross: self.cross,
            tokens: self.tokens,
            weight_sum: self.weight_sum,
        };
        stats.check_finite()?;
        Ok(stats)
    }
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
        let scaled = scaled_by_root::<T>(x, alpha);
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
        let scaled = scaled_by_root::<T>(quantized, alpha);
        gram_upper_into(&mut self.sum, scaled.view(), scaled.view());
        if let Some(cross) = self.cross.as_mut() {
            let delta = scaled_difference::<T>(full, quantized, alpha);
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

/// Columns of the column-major copies written by one task.
const COPY_COLS: usize = 64;

/// `x` as a `T` operand with every row multiplied by the square root of its
/// weight, so that `m^T m = x^T diag(alpha) x` is one symmetric Gram product
/// over a single operand.
///
/// The operand is column-major: faer's product `m^T m` runs about 1.7x
/// faster from a column-major `m` than from a row-major one (measured on the
/// 2-core AVX2 machine, docs/PERFORMANCE.md), far more than the copy costs.
/// Borrows `x` when nothing changes (`f32`, no weights, already
/// column-major); otherwise one parallel pass writes the copy (element-wise,
/// so the same bits for any thread count).
fn scaled_by_root<'a, T: Scalar>(
    x: ArrayView2<'a, f32>,
    alpha: Option<ArrayView1<'_, f32>>,
) -> CowArray<'a, T, Ix2> {
    if alpha.is_none() && x.t().is_standard_layout() {
        if let Some(same) = as_same_scalar::<T>(x) {
            return CowArray::from(same);
        }
    }
    let roots = alpha.map(|a| a.mapv(|w| T::widen(w).sqrt()));
    let x = x.as_standard_layout();
    CowArray::from(column_major(x.nrows(), x.ncols(), |t, c0, out| {
        let row = &row_slice(&x, t)[c0..c0 + out.len()];
        match &roots {
            Some(r) => {
                let root = r[t];
                out.iter_mut()
                    .zip(row)
                    .for_each(|(o, &v)| *o = T::widen(v) * root);
            }
            None => out.iter_mut().zip(row).for_each(|(o, &v)| *o = T::widen(v)),
        }
    }))
}

/// `(full - quantized)` in `T`, rows scaled by `sqrt(alpha)` like
/// [`scaled_by_root`] (and column-major like it), so that `delta^T scaled`
/// is the weighted cross term.
fn scaled_difference<T: Scalar>(
    full: ArrayView2<'_, f32>,
    quantized: ArrayView2<'_, f32>,
    alpha: Option<ArrayView1<'_, f32>>,
) -> Array2<T> {
    let roots = alpha.map(|a| a.mapv(|w| T::widen(w).sqrt()));
    let (full, quantized) = (full.as_standard_layout(), quantized.as_standard_layout());
    column_major(quantized.nrows(), quantized.ncols(), |t, c0, out| {
        let c1 = c0 + out.len();
        let (f, q) = (
            &row_slice(&full, t)[c0..c1],
            &row_slice(&quantized, t)[c0..c1],
        );
        // Without weights the root is 1, and multiplying by 1 is exact.
        let root = roots.as_ref().map_or(T::one(), |r| r[t]);
        for ((o, &f), &q) in out.iter_mut().zip(f).zip(q) {
            *o = (T::widen(f) - T::widen(q)) * root;
        }
    })
}

/// Row `t` of a standard-layout array as a slice.
///
/// # Panics
/// Never for the arrays this module makes with `as_standard_layout`, whose
/// rows are contiguous by construction.
fn row_slice<'a>(x: &'a CowArray<'_, f32, Ix2>, t: usize) -> &'a [f32] {
    let row = x.row(t);
    row.to_slice()
        .expect("rows of a standard-layout array are contiguous")
}

/// Rows transposed together by one task of [`column_major`]: a tile of
/// `TILE_ROWS x COPY_COLS` values (32 KB in f64) stays in the L1 cache while
/// its rows are read and its columns written.
const TILE_ROWS: usize = 64;

/// A column-major `[rows, cols]` array whose entries `(t, c0 .. c0 + k)` are
/// written by `fill(t, c0, buffer of k)`, in parallel over fixed blocks of
/// [`COPY_COLS`] columns (each entry is written once, so the bits do not
/// depend on the thread count). Within a block, [`TILE_ROWS`] row segments
/// are filled into a tile and written down the block's contiguous columns,
/// so both the reads and the writes run along memory.
fn column_major<T: Scalar>(
    rows: usize,
    cols: usize,
    fill: impl Fn(usize, usize, &mut [T]) + Sync,
) -> Array2<T> {
    let mut out = Array2::<T>::zeros((rows, cols).f());
    out.axis_chunks_iter_mut(Axis(1), COPY_COLS)
        .into_par_iter()
        .enumerate()
        .for_each(|(chunk, mut block)| {
            let c0 = chunk * COPY_COLS;
            let k = block.ncols();
            let mut tile = vec![T::zero(); TILE_ROWS * k];
            for t0 in (0..rows).step_by(TILE_ROWS) {
                let h = TILE_ROWS.min(rows - t0);
                for (r, seg) in tile.chunks_exact_mut(k).take(h).enumerate() {
                    fill(t0 + r, c0, seg);
                }
                for (c, column) in block.columns_mut().into_iter().enumerate() {
                    let column = column
                        .into_slice()
                        .expect("columns of a column-major array are contiguous");
                    for (r, dst) in column[t0..t0 + h].iter_mut().enumerate() {
                        *dst = tile[r * k + c];
                    }
                }
            }
        });
    out
}

/// The same view typed as `T` when `T` is `f32`; `None` otherwise.
fn as_same_scalar<'a, T: Scalar>(x: ArrayView2<'a, f32>) -> Option<ArrayView2<'a, T>> {
    if std::any::TypeId::of::<T>() != std::any::TypeId::of::<f32>() {
        return None;
    }
    let x = std::mem::ManuallyDrop::new(x);
    // SAFETY: `T` is `f32` (same `TypeId`), so both types are the same type
    // and the bitwise copy is the identity; `ManuallyDrop` keeps the source
    // from being dropped twice (a view owns nothing anyway).
    Some(unsafe { std::ptr::read((&*x as *const ArrayView2<'a, f32>).cast::<ArrayView2<'a, T>>()) })
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
