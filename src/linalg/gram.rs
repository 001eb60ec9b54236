//! Symmetric Gram products `A^T B` computed tile by tile on the upper triangle.

use faer::{Accum, Par};
use ndarray::{s, Array2, ArrayView2};
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

/// Side of the square tiles of a Gram product (fixed: results do not depend
/// on the thread count).
const TILE: usize = 256;

/// `acc[I, J] += a[:, I]^T b[:, J]` for every tile pair with `J >= I`, where
/// `a` and `b` are `[tokens, n]`. Only the upper triangle of `acc` (tile
/// granularity, so some entries below the diagonal inside diagonal tiles are
/// written too) is meaningful; callers mirror it when they finish.
///
/// Each tile is one sequential faer product; tiles run in parallel on
/// rayon's pool and each tile's result is the same for any thread count.
///
/// # Panics
/// When the shapes do not agree.
pub fn gram_upper_into<T: Scalar>(acc: &mut Array2<T>, a: ArrayView2<'_, T>, b: ArrayView2<'_, T>) {
    let n = acc.nrows();
    assert_eq!(acc.ncols(), n, "gram: accumulator must be square");
    assert_eq!(a.dim(), b.dim(), "gram: operands differ in shape");
    assert_eq!(a.ncols(), n, "gram: operand width");
    let tiles = n.div_ceil(TILE);
    let pairs: Vec<(usize, usize)> = (0..tiles)
        .flat_map(|i| (i..tiles).map(move |j| (i, j)))
        .collect();
    let products: Vec<((usize, usize), Array2<T>)> = pairs
        .into_par_iter()
        .map(|(ti, tj)| {
            let ri = ti * TILE..((ti + 1) * TILE).min(n);
            let rj = tj * TILE..((tj + 1) * TILE).min(n);
            let mut out = Array2::<T>::zeros((ri.len(), rj.len()));
            faer::linalg::matmul::matmul(
                faer_mut(out.view_mut()),
                Accum::Replace,
                faer_ref(a.slice(s![.., ri.clone()]).t()),
                faer_ref(b.slice(s![.., rj.clone()])),
                T::one(),
                Par::Seq,
            );
            ((ti, tj), out)
        })
        .collect();
    for ((ti, tj), out) in products {
        let mut dst = acc.slice_mut(s![ti * TILE.., tj * TILE..]);
        let mut dst = dst.slice_mut(s![..out.nrows(), ..out.ncols()]);
        dst += &out;
    }
}
