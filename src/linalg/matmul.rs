//! A parallel matrix product whose result does not depend on the thread count.

use faer::{Accum, Par};
use ndarray::{s, Array2, ArrayView2, ArrayViewMut2, Axis};
use rayon::prelude::*;

use super::view::{faer_mut, faer_ref};

/// Rows of the output computed by one task. Fixed, so the work split (and
/// therefore every rounding) is the same whatever the number of threads.
const ROW_TILE: usize = 64;
/// Below this many multiply-adds the product runs as one sequential call.
const SERIAL_WORK: usize = 1 << 18;

/// `a @ b` for `a: [m, k]`, `b: [k, n]` (any strides: pass `x.t()` for a transpose).
///
/// ```
/// use ndarray::array;
/// let a = array![[1.0f32, 2.0], [3.0, 4.0]];
/// let c = vlmq::__private::matmul(a.view(), a.t());
/// assert_eq!(c, array![[5.0, 11.0], [11.0, 25.0]]);
/// ```
///
/// # Panics
/// When the inner dimensions differ.
pub fn matmul(a: ArrayView2<'_, f32>, b: ArrayView2<'_, f32>) -> Array2<f32> {
    let mut c = Array2::<f32>::zeros((a.nrows(), b.ncols()));
    matmul_into(c.view_mut(), a, b, 1.0, false);
    c
}

/// `c = alpha * a @ b` (or `c += alpha * a @ b` when `accumulate`), computed
/// in fixed 64-row tiles spread over rayon's pool, each tile sequentially by
/// faer: the result is bit-identical for any thread count.
///
/// # Panics
/// When the shapes do not agree.
pub fn matmul_into(
    mut c: ArrayViewMut2<'_, f32>,
    a: ArrayView2<'_, f32>,
    b: ArrayView2<'_, f32>,
    alpha: f32,
    accumulate: bool,
) {
    assert_eq!(a.ncols(), b.nrows(), "matmul: inner dimensions differ");
    assert_eq!(c.dim(), (a.nrows(), b.ncols()), "matmul: output shape");
    let accum = if accumulate {
        Accum::Add
    } else {
        Accum::Replace
    };
    let (m, k) = a.dim();
    let n = b.ncols();
    if m * k * n <= SERIAL_WORK || m <= ROW_TILE {
        faer::linalg::matmul::matmul(
            faer_mut(c),
            accum,
            faer_ref(a),
            faer_ref(b),
            alpha,
            Par::Seq,
        );
        return;
    }
    c.axis_chunks_iter_mut(Axis(0), ROW_TILE)
        .into_par_iter()
        .enumerate()
        .for_each(|(t, c_tile)| {
            let rows = t * ROW_TILE..t * ROW_TILE + c_tile.nrows();
            let a_tile = a.slice(s![rows, ..]);
            faer::linalg::matmul::matmul(
                faer_mut(c_tile),
                accum,
                faer_ref(a_tile),
                faer_ref(b),
                alpha,
                Par::Seq,
            );
        });
}
