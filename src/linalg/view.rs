//! Zero-copy conversion of ndarray views to faer views (any strides).

use faer::{MatMut, MatRef};
use ndarray::{ArrayView2, ArrayViewMut2};

/// A faer view of the same memory as `a`, with the same strides.
pub(crate) fn faer_ref<'a, T>(a: ArrayView2<'a, T>) -> MatRef<'a, T> {
    let (r, c) = a.dim();
    let s = a.strides();
    // SAFETY: ndarray guarantees that every index (i, j) with i < r, j < c at
    // offset i * s[0] + j * s[1] from `as_ptr` is in bounds and initialized,
    // and the returned view borrows `a` for 'a.
    unsafe { MatRef::from_raw_parts(a.as_ptr(), r, c, s[0], s[1]) }
}

/// A mutable faer view of the same memory as `a`, with the same strides.
pub(crate) fn faer_mut<'a, T>(mut a: ArrayViewMut2<'a, T>) -> MatMut<'a, T> {
    let (r, c) = a.dim();
    let s = a.strides().to_vec();
    let ptr = a.as_mut_ptr();
    // SAFETY: as in `faer_ref`; ndarray views never alias mutably, and the
    // view is consumed so the faer view is the only handle for 'a.
    unsafe { MatMut::from_raw_parts_mut(ptr, r, c, s[0], s[1]) }
}
