//! GPTAQ's correction matrix, formed from the inverse factor.

use faer::{Accum, Par};
use ndarray::{s, Array2, ArrayView2};

use crate::linalg::{faer_mut, faer_ref};

/// GPTAQ's `P = strength * triu(C U^T, 1) U` in plan order, with `C` the
/// cross term permuted like the Hessian.
pub(super) fn gptaq_correction(
    cross: ArrayView2<'_, f32>,
    perm: &[usize],
    u: ArrayView2<'_, f32>,
    strength: f32,
) -> Array2<f32> {
    let n = perm.len();
    let c = Array2::from_shape_fn((n, n), |(i, j)| cross[[perm[i], perm[j]]]);
    // `U` is upper triangular, so in column blocks `J = j0..j1` only the
    // needed parts are formed by dense products: `(C U^T)[..j1, J] =
    // C[..j1, j0..] U[J, j0..]^T` (entries below the diagonal are dropped),
    // then `P[..j1, J] = X[..j1, ..j1] U[..j1, J]`: a quarter of the two
    // dense products' flops. Fixed blocks and sequential products, so the
    // result does not depend on the thread count.
    const BLOCK: usize = 128;
    let mut x = Array2::<f32>::zeros((n, n));
    for j0 in (0..n).step_by(BLOCK) {
        let j1 = (j0 + BLOCK).min(n);
        faer::linalg::matmul::matmul(
            faer_mut(x.slice_mut(s![..j1, j0..j1])),
            Accum::Replace,
            faer_ref(c.slice(s![..j1, j0..])),
            faer_ref(u.slice(s![j0..j1, j0..]).t()),
            1.0f32,
            Par::Seq,
        );
    }
    for (i, mut row) in x.outer_iter_mut().enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            if j <= i {
                *v = 0.0;
            } else {
                *v *= strength;
            }
        }
    }
    let mut p = Array2::<f32>::zeros((n, n));
    for j0 in (0..n).step_by(BLOCK) {
        let j1 = (j0 + BLOCK).min(n);
        faer::linalg::matmul::matmul(
            faer_mut(p.slice_mut(s![..j1, j0..j1])),
            Accum::Replace,
            faer_ref(x.slice(s![..j1, ..j1])),
            faer_ref(u.slice(s![..j1, j0..j1])),
            1.0f32,
            Par::Seq,
        );
    }
    // Strictly upper: entries on and below the diagonal are sums of zero
    // products; cleared explicitly.
    for (i, mut row) in p.outer_iter_mut().enumerate() {
        row.slice_mut(s![..=i]).fill(0.0);
    }
    p
}
