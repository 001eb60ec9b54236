//! The upper Cholesky factor of the damped inverse Hessian, by the flip route.

use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::cholesky::llt::factor::{cholesky_in_place, cholesky_in_place_scratch};
use faer::{Mat, MatMut, Par, Spec};
use ndarray::{Array2, ArrayView2};

use crate::config::Damping;
use crate::error::{Error, Result};

/// `U` with `(H + damp I)^-1 = U^T U`, and the damping that made it exist.
#[derive(Debug, Clone)]
pub struct InverseCholesky {
    /// Upper-triangular factor `[n, n]` (zeros below the diagonal).
    pub u: Array2<f32>,
    /// Relative damping actually used (fraction of the mean diagonal).
    pub damp_percent: f64,
    /// Absolute damping added to the diagonal.
    pub damp_absolute: f64,
    /// Factorizations attempted (1 when the first damping worked).
    pub attempts: u32,
}

/// Computes the upper Cholesky factor `U` of `(H + d I)^-1` without forming the
/// inverse: with `J` the exchange matrix, `J (H + d I) J = L L^T` gives
/// `U = J L^-1 J` (one Cholesky and one triangular inverse).
///
/// `d = percent * mean(diag H)`; when the factorization fails (or the factor
/// is not finite) `percent` grows by the policy's factor, up to its attempt
/// limit, after which [`Error::IndefiniteHessian`] is returned. `h` must be
/// symmetric and finite (only its lower triangle is read, after the flip).
pub fn inverse_cholesky_upper(
    h: ArrayView2<'_, f32>,
    damping: &Damping,
) -> Result<InverseCholesky> {
    inverse_cholesky_upper_in_order(h, None, damping)
}

/// [`inverse_cholesky_upper`] of `h` with rows and columns taken in the
/// order `perm` (`perm[p]` = row and column of `h` at position `p`; `None`
/// = the natural order), reading `h` in place: the same factor, bit for
/// bit, as that of the permuted copy, without making it (for an 11008-wide
/// layer the copy is 485 MB). `perm` must be a permutation of `0..n`
/// (checked by the callers).
pub(crate) fn inverse_cholesky_upper_in_order(
    h: ArrayView2<'_, f32>,
    perm: Option<&[usize]>,
    damping: &Damping,
) -> Result<InverseCholesky> {
    factor_in_order(h, perm, damping)
}

/// Checks a Hessian (square, non-empty, finite) and an order of its
/// columns (`perm`, of length `n` when given), and returns the damping's
/// scale: the mean of the diagonal, summed in the walk's order, or 1 when
/// it is not positive.
pub(super) fn checked_scale(h: ArrayView2<'_, f32>, perm: Option<&[usize]>) -> Result<f64> {
    let n = h.nrows();
    if h.ncols() != n {
        return Err(Error::shape("Hessian", &[n, n], h.shape()));
    }
    if n == 0 {
        return Err(Error::Empty {
            what: "Hessian".into(),
        });
    }
    crate::validate::check_finite("Hessian", h)?;
    if perm.is_some_and(|p| p.len() != n) {
        return Err(Error::shape(
            "column order",
            &[n],
            &[perm.map_or(0, <[usize]>::len)],
        ));
    }
    if let Some(perm) = perm {
        let mut seen = vec![false; n];
        for &i in perm {
            if i >= n || std::mem::replace(&mut seen[i], true) {
                return Err(Error::InvalidConfig {
                    field: "column order",
                    value: format!("{i}"),
                    reason: "must be a permutation of the Hessian's columns",
                });
            }
        }
    }
    // Position p of the ordered matrix is row and column at(p) of h.
    let at = |p: usize| perm.map_or(p, |perm| perm[p]);
    let mean_diag = (0..n).map(|p| f64::from(h[[at(p), at(p)]])).sum::<f64>() / n as f64;
    Ok(if mean_diag > 0.0 { mean_diag } else { 1.0 })
}

/// The damping of the attempt that gave a healthy factor.
pub(super) struct Damped {
    /// Relative damping (fraction of the mean diagonal).
    pub(super) percent: f64,
    /// Absolute damping added to the diagonal.
    pub(super) absolute: f64,
    /// Attempts made, the successful one included.
    pub(super) attempts: u32,
}

/// The damping policy's attempts, shared by both routes:
/// `try_factor(attempt, damp)` factors `H + damp I` (`damp = percent *
/// scale`) and says whether the factor is healthy; `percent` grows by the
/// policy's factor after each failure, up to its attempt limit, after which
/// [`Error::IndefiniteHessian`] is returned for the `n`-wide Hessian.
pub(super) fn damped_attempts(
    n: usize,
    scale: f64,
    damping: &Damping,
    mut try_factor: impl FnMut(u32, f64) -> bool,
) -> Result<Damped> {
    let mut percent = damping.initial_percent();
    for attempt in 1..=damping.max_attempts() {
        let absolute = percent * scale;
        if try_factor(attempt, absolute) {
            return Ok(Damped {
                percent,
                absolute,
                attempts: attempt,
            });
        }
        percent *= damping.growth();
    }
    Err(Error::IndefiniteHessian {
        dim: n,
        last_damp_percent: percent / damping.growth(),
        attempts: damping.max_attempts() as usize,
    })
}

fn factor_in_order(
    h: ArrayView2<'_, f32>,
    perm: Option<&[usize]>,
    damping: &Damping,
) -> Result<InverseCholesky> {
    let scale = checked_scale(h, perm)?;
    let n = h.nrows();
    let mut llt = LowerFactor::new(n);
    let par = llt.par;
    // The flipped matrix's diagonal before damping.
    let mut diag = vec![0f32; n];
    let mut a = Mat::<f32>::zeros(n, n);
    let mut u = Array2::<f32>::zeros((n, n));
    let damped = damped_attempts(n, scale, damping, |_, damp| {
        fill_flipped(&mut a, h, perm, &mut diag);
        for (j, d) in diag.iter().enumerate() {
            a[(j, j)] = (f64::from(*d) + damp) as f32;
        }
        if !llt.factor(a.as_mut()) {
            return false;
        }
        // L^-1 written straight into U through a view with both axes
        // reversed: entry (i, j) of the view is u[n-1-i, n-1-j], so the
        // view receives L^-1 exactly when U = J L^-1 J. Only its lower
        // triangle is written; the rest of U stays zero.
        faer::linalg::triangular_inverse::invert_lower_triangular(
            crate::linalg::faer_mut(u.view_mut()).reverse_rows_and_cols_mut(),
            a.as_ref(),
            par,
        );
        u.diag().iter().all(|&d| d.is_finite() && d > 0.0) && u.iter().all(|v| v.is_finite())
    })?;
    Ok(InverseCholesky {
        u,
        damp_percent: damped.percent,
        damp_absolute: damped.absolute,
        attempts: damped.attempts,
    })
}

/// Fills `a` with the flipped ordered matrix (`H_o[p, q] = h[at(p), at(q)]`):
/// `a[i, j] = H_o[n-1-i, n-1-j] = H_o[n-1-j, n-1-i]` (symmetry), column by
/// column so each column reads one row of `h`; `diag` receives its
/// diagonal (the damping is added by the caller).
fn fill_flipped(
    a: &mut Mat<f32>,
    h: ArrayView2<'_, f32>,
    perm: Option<&[usize]>,
    diag: &mut [f32],
) {
    let n = h.nrows();
    let at = |p: usize| perm.map_or(p, |perm| perm[p]);
    for j in 0..n {
        let src = h.row(at(n - 1 - j));
        let mut dst = a.col_mut(j);
        match perm {
            None => {
                for i in 0..n {
                    dst[i] = src[n - 1 - i];
                }
            }
            Some(perm) => {
                for i in 0..n {
                    dst[i] = src[perm[n - 1 - i]];
                }
            }
        }
        diag[j] = dst[j];
    }
}

/// Below this dimension the factorization runs on one thread: on two cores
/// threading a factorization of n <= 1024 measured slower than one thread
/// (docs/PERFORMANCE.md).
const PARALLEL_DIM: usize = 1536;

/// Parallelism for the Cholesky factor and the triangular inverse: rayon's
/// current pool for large matrices.
///
/// faer splits these routines recursively by size, never by thread count,
/// and its matrix-product kernels sum each output entry over the same
/// fixed-depth blocks whichever thread computes it, so the factor is the
/// same bits for any number of threads (tested with pools of 1, 2 and 3
/// threads in `tests/hessian_properties.rs`).
pub(super) fn factor_par(n: usize) -> Par {
    let threads = rayon::current_num_threads();
    if n < PARALLEL_DIM || threads < 2 {
        Par::Seq
    } else {
        Par::rayon(threads)
    }
}

/// faer's in-place LLT of an `n x n` f32 matrix, with its scratch and its
/// parallelism ([`factor_par`]): one factorization for the borrowed and
/// the owned inverse Cholesky.
pub(super) struct LowerFactor {
    /// The parallelism of the factorization (and of the triangular
    /// inverse that follows it).
    pub(super) par: Par,
    scratch: MemBuffer,
}

impl LowerFactor {
    /// Scratch for factoring `n x n` matrices.
    pub(super) fn new(n: usize) -> Self {
        let par = factor_par(n);
        let scratch = MemBuffer::new(cholesky_in_place_scratch::<f32>(n, par, Spec::default()));
        LowerFactor { par, scratch }
    }

    /// Overwrites the lower triangle of `a` with its Cholesky factor `L`
    /// (`a = L L^T`, read from the lower triangle); false when `a` is not
    /// numerically positive definite.
    pub(super) fn factor(&mut self, a: MatMut<'_, f32>) -> bool {
        cholesky_in_place(
            a,
            Default::default(),
            self.par,
            MemStack::new(&mut self.scratch),
            Spec::default(),
        )
        .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reading `h` in the walk's order in place gives the factor of the
    /// permuted copy bit for bit (sizes on both sides of the parallel
    /// threshold are not needed: the copy is the only difference).
    #[test]
    fn factor_in_order_equals_factor_of_the_permuted_copy() {
        let n = 37;
        let mut state = 0x1234_5678_u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let x = Array2::from_shape_fn((3 * n, n), |_| next());
        let h = x.t().dot(&x);
        let perm: Vec<usize> = (0..n).map(|i| (i * 11 + 5) % n).collect();
        let copy = Array2::from_shape_fn((n, n), |(i, j)| h[[perm[i], perm[j]]]);
        let damping = Damping::default();
        let want = inverse_cholesky_upper(copy.view(), &damping).unwrap();
        let got = inverse_cholesky_upper_in_order(h.view(), Some(&perm), &damping).unwrap();
        assert_eq!(got.u, want.u);
        assert_eq!(got.damp_absolute, want.damp_absolute);
        // And the order matters: the natural order gives another factor.
        let natural = inverse_cholesky_upper_in_order(h.view(), None, &damping).unwrap();
        assert_ne!(natural.u, want.u);
    }
}
