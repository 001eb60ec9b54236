//! The upper Cholesky factor of the damped inverse Hessian, by the flip route.

use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::cholesky::llt::factor::{cholesky_in_place, cholesky_in_place_scratch};
use faer::{Mat, Par, Spec};
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
    let mean_diag = h.diag().iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64;
    let scale = if mean_diag > 0.0 { mean_diag } else { 1.0 };
    let mut percent = damping.initial_percent();
    let par = factor_par(n);
    let mut scratch = MemBuffer::new(cholesky_in_place_scratch::<f32>(n, par, Spec::default()));
    for attempt in 1..=damping.max_attempts() {
        let damp = percent * scale;
        // Flipped copy a[i, j] = h[n-1-i, n-1-j] = h[n-1-j, n-1-i] (symmetry),
        // filled column by column so both sides are read and written in order.
        let mut a = Mat::<f32>::zeros(n, n);
        for j in 0..n {
            let src = h.row(n - 1 - j);
            let mut dst = a.col_mut(j);
            for i in 0..n {
                dst[i] = src[n - 1 - i];
            }
            dst[j] = (f64::from(dst[j]) + damp) as f32;
        }
        let factored = cholesky_in_place(
            a.as_mut(),
            Default::default(),
            par,
            MemStack::new(&mut scratch),
            Spec::default(),
        );
        if factored.is_ok() {
            // L^-1 written straight into U through a view with both axes
            // reversed: entry (i, j) of the view is u[n-1-i, n-1-j], so the
            // view receives L^-1 exactly when U = J L^-1 J. Only its lower
            // triangle is written; the rest of U stays zero.
            let mut u = Array2::<f32>::zeros((n, n));
            faer::linalg::triangular_inverse::invert_lower_triangular(
                crate::linalg::faer_mut(u.view_mut()).reverse_rows_and_cols_mut(),
                a.as_ref(),
                par,
            );
            let healthy = u.diag().iter().all(|&d| d.is_finite() && d > 0.0)
                && u.iter().all(|v| v.is_finite());
            if healthy {
                return Ok(InverseCholesky {
                    u,
                    damp_percent: percent,
                    damp_absolute: damp,
                    attempts: attempt,
                });
            }
        }
        percent *= damping.growth();
    }
    Err(Error::IndefiniteHessian {
        dim: n,
        last_damp_percent: percent / damping.growth(),
        attempts: damping.max_attempts() as usize,
    })
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
fn factor_par(n: usize) -> Par {
    let threads = rayon::current_num_threads();
    if n < PARALLEL_DIM || threads < 2 {
        Par::Seq
    } else {
        Par::rayon(threads)
    }
}
