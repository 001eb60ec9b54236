//! Gram products `A^T B` over a fixed tiling: the upper triangle of a
//! symmetric sum, and the full product for GPTAQ's cross term.

use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::{Accum, Par};
use ndarray::{s, Array2, ArrayView2, ArrayViewMut2, Axis};
use rayon::prelude::*;

use super::view::{faer_mut, faer_ref};

/// Floating-point types the accumulators can store (f32 and f64).
///
/// Sealed: implemented for `f32` and `f64` only, so that the faer traits the
/// kernels need stay an implementation detail (a faer upgrade is not a
/// breaking change for `vlmq` users).
pub trait Scalar:
    sealed::Sealed + num_traits::Float + Default + Send + Sync + std::fmt::Debug + 'static
{
    /// Widens or narrows an f32.
    fn widen(v: f32) -> Self;
    /// Narrows or widens to f32.
    fn narrow(self) -> f32;
    /// Widens to f64.
    fn wide(self) -> f64;
}

mod sealed {
    /// The private supertrait of [`Scalar`](super::Scalar); it carries the
    /// faer bound.
    pub trait Sealed: faer::traits::RealField {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}

impl Scalar for f32 {
    fn widen(v: f32) -> Self {
        v
    }
    fn narrow(self) -> f32 {
        self
    }
    fn wide(self) -> f64 {
        f64::from(self)
    }
}

impl Scalar for f64 {
    fn widen(v: f32) -> Self {
        f64::from(v)
    }
    fn narrow(self) -> f32 {
        self as f32
    }
    fn wide(self) -> f64 {
        self
    }
}

/// Rows of the output in one strip. Each strip's tiles are products of one
/// `STRIP`-column slice of `a` with slices of `b`.
const STRIP: usize = 256;
/// Most output columns in one task (a multiple of `STRIP`). Large enough that
/// faer's kernel runs at full speed on each task, small enough that the first
/// strips (the longest) split into several tasks for two or more threads.
const CHUNK: usize = 1024;

/// `acc[i, j] += sum_t a[t, i] b[t, j]` for every `j >= i`, where `a` and `b`
/// are `[tokens, n]` and `acc` is `[n, n]`. Entries below the diagonal are
/// neither read nor written; callers mirror the upper triangle when they
/// finish.
///
/// The triangle is cut into a fixed set of tiles (strips of 256 rows, at
/// most 1024 columns per tile; the diagonal tile of a strip is computed as a
/// triangle). Every tile is one sequential faer product accumulated in place,
/// and tiles run in parallel on rayon's pool: the tiling does not depend on
/// the number of threads, so neither does any bit of the result.
///
/// # Panics
/// When the shapes do not agree.
pub fn gram_upper_into<T: Scalar>(acc: &mut Array2<T>, a: ArrayView2<'_, T>, b: ArrayView2<'_, T>) {
    let n = acc.nrows();
    assert_eq!(acc.ncols(), n, "gram: accumulator must be square");
    assert_eq!(a.dim(), b.dim(), "gram: operands differ in shape");
    assert_eq!(a.ncols(), n, "gram: operand width");
    if a.nrows() == 0 {
        return;
    }
    acc.axis_chunks_iter_mut(Axis(0), STRIP)
        .into_par_iter()
        .enumerate()
        .for_each(|(strip, rows)| {
            let r0 = strip * STRIP;
            let r1 = r0 + rows.nrows();
            let lhs = a.slice(s![.., r0..r1]).reversed_axes();
            rows.slice_move(s![.., r0..])
                .axis_chunks_iter_mut(Axis(1), CHUNK)
                .into_par_iter()
                .enumerate()
                .for_each(|(chunk, tile)| {
                    let c0 = r0 + chunk * CHUNK;
                    let c1 = c0 + tile.ncols();
                    if chunk == 0 {
                        let (diag, rest) = tile.split_at(Axis(1), r1 - r0);
                        triangular::matmul(
                            faer_mut(diag),
                            BlockStructure::TriangularUpper,
                            Accum::Add,
                            faer_ref(lhs),
                            BlockStructure::Rectangular,
                            faer_ref(b.slice(s![.., r0..r1])),
                            BlockStructure::Rectangular,
                            T::one(),
                            Par::Seq,
                        );
                        if r1 < c1 {
                            product_add(rest, lhs, b.slice(s![.., r1..c1]));
                        }
                    } else {
                        product_add(tile, lhs, b.slice(s![.., c0..c1]));
                    }
                });
        });
}

/// `acc += a^T b` (the full, non-symmetric product) for `a`, `b` of shape
/// `[tokens, n]` and `acc` of shape `[n, n]`, over the same fixed tiling as
/// [`gram_upper_into`] without the triangle: bit-identical for any thread
/// count.
///
/// # Panics
/// When the shapes do not agree.
pub(crate) fn cross_into<T: Scalar>(
    acc: &mut Array2<T>,
    a: ArrayView2<'_, T>,
    b: ArrayView2<'_, T>,
) {
    let n = acc.nrows();
    assert_eq!(acc.ncols(), n, "cross: accumulator must be square");
    assert_eq!(a.dim(), b.dim(), "cross: operands differ in shape");
    assert_eq!(a.ncols(), n, "cross: operand width");
    if a.nrows() == 0 {
        return;
    }
    acc.axis_chunks_iter_mut(Axis(0), STRIP)
        .into_par_iter()
        .enumerate()
        .for_each(|(strip, mut rows)| {
            let r0 = strip * STRIP;
            let lhs = a.slice(s![.., r0..r0 + rows.nrows()]).reversed_axes();
            rows.axis_chunks_iter_mut(Axis(1), CHUNK)
                .into_par_iter()
                .enumerate()
                .for_each(|(chunk, tile)| {
                    let c0 = chunk * CHUNK;
                    let c1 = c0 + tile.ncols();
                    product_add(tile, lhs, b.slice(s![.., c0..c1]));
                });
        });
}

/// `dst += lhs @ rhs`, one sequential faer call.
fn product_add<T: Scalar>(
    dst: ArrayViewMut2<'_, T>,
    lhs: ArrayView2<'_, T>,
    rhs: ArrayView2<'_, T>,
) {
    faer::linalg::matmul::matmul(
        faer_mut(dst),
        Accum::Add,
        faer_ref(lhs),
        faer_ref(rhs),
        T::one(),
        Par::Seq,
    );
}
