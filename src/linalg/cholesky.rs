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
    let mut scratch = MemBuffer::new(cholesky_in_place_scratch::<f32>(
        n,
        Par::Seq,
        Spec::default(),
    ));
    for attempt in 1..=damping.max_attempts() {
        let damp = percent * scale;
        // Flipped copy: a[i, j] = h[n-1-i, n-1-j] (+ damp on the diagonal).
        let mut a = Mat::<f32>::from_fn(n, n, |i, j| {
            let v = h[[n - 1 - i, n - 1 - j]];
            if i == j {
                (f64::from(v) + damp) as f32
            } else {
                v
            }
        });
        let factored = cholesky_in_place(
            a.as_mut(),
            Default::default(),
            Par::Seq,
            MemStack::new(&mut scratch),
            Spec::default(),
        );
        if factored.is_ok() {
            let mut linv = Mat::<f32>::zeros(n, n);
            faer::linalg::triangular_inverse::invert_lower_triangular(
                linv.as_mut(),
                a.as_ref(),
                Par::Seq,
            );
            let u = Array2::from_shape_fn((n, n), |(i, j)| {
                if j >= i {
                    linv[(n - 1 - i, n - 1 - j)]
                } else {
                    0.0
                }
            });
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
