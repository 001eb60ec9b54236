//! Solving GPTQ from a factor computed by the caller, and an f64 route to
//! that factor.

use std::time::Instant;

use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::cholesky::llt::factor::{cholesky_in_place, cholesky_in_place_scratch};
use faer::{Mat, Par, Spec};
use ndarray::{Array2, ArrayView2};

use super::objective::hessian_objective;
use super::plan::{column_order, Plan};
use super::report::{LayerSolution, SolveReport};
use super::solve::{check_hessian, run_plan};
use crate::config::GptqConfig;
use crate::error::{Error, Result};
use crate::quant::grid::check_scales;
use crate::validate::check_finite;

/// Quantizes `w` (`[out, in]`) with GPTQ from a given upper-triangular factor
/// `u` with `u^T u = (H + lambda I)^-1`, in the column order of the walk.
///
/// The order is `perm` when given (`perm[p]` = original column at position
/// `p`, and `u` must be factored in that order), else act-order computed from
/// `hessian`'s diagonal when `cfg.act_order` is set, else the natural order.
/// When `hessian` is given, columns with a zero diagonal are quantized as
/// zero (as [`solve_layer`](super::solve_layer) does; the caller's factor
/// should then have been computed with those diagonal entries set to 1) and
/// the exact objective is reported if `cfg.compute_objective`. Groups,
/// blocks and grid follow `cfg` exactly as in `solve_layer`; `cfg.damping`
/// is not used (the report's damping fields are 0 and `attempts` is 0).
///
/// Given the same factor, this and an independent implementation of the
/// same column walk produce the same codes up to rounding ties.
pub fn solve_layer_with_factor(
    w: ArrayView2<'_, f32>,
    u: ArrayView2<'_, f32>,
    perm: Option<&[usize]>,
    hessian: Option<ArrayView2<'_, f32>>,
    cfg: &GptqConfig,
) -> Result<LayerSolution> {
    let start = Instant::now();
    let (m, n) = w.dim();
    if m == 0 || n == 0 {
        return Err(Error::Empty {
            what: "weight".into(),
        });
    }
    if u.dim() != (n, n) {
        return Err(Error::shape("factor U", &[n, n], u.shape()));
    }
    check_finite("weight", w)?;
    check_finite("factor U", u)?;
    // Only the upper triangle is read: a factor with entries below the
    // diagonal (a lower factor, or U^T by mistake) would silently be taken
    // for another matrix.
    if let Some((i, j)) = (1..n)
        .flat_map(|i| (0..i).map(move |j| (i, j)))
        .find(|&(i, j)| u[[i, j]] != 0.0)
    {
        return Err(Error::InvalidConfig {
            field: "factor U",
            value: format!("U[{i}, {j}] = {} below the diagonal", u[[i, j]]),
            reason: "the factor must be upper-triangular (zero below the diagonal)",
        });
    }
    if let Some(i) = (0..n).find(|&i| u[[i, i]] <= 0.0) {
        return Err(Error::InvalidConfig {
            field: "factor U",
            value: format!("diagonal entry {} at {i}", u[[i, i]]),
            reason: "the factor's diagonal must be positive",
        });
    }
    if let Some(h) = hessian {
        if h.dim() != (n, n) {
            return Err(Error::shape("Hessian", &[n, n], h.shape()));
        }
        check_finite("Hessian", h)?;
        check_hessian(h)?;
    }
    check_scales(w, &cfg.scheme(), cfg.scheme().group_size().columns_for(n)?)?;
    let perm: Vec<usize> = match (perm, hessian) {
        (Some(p), _) => {
            check_permutation(p, n)?;
            p.to_vec()
        }
        (None, Some(h)) if cfg.act_order() || cfg.act_group_aware() => {
            let mut h = h.to_owned();
            for i in 0..n {
                if h[[i, i]] == 0.0 {
                    h[[i, i]] = 1.0;
                }
            }
            column_order(h.view(), cfg)?
        }
        (None, None) if cfg.act_order() || cfg.act_group_aware() => {
            return Err(Error::InvalidConfig {
                field: "perm",
                value: "none".into(),
                reason: "act-order and GAR need the permutation or the Hessian to compute it",
            })
        }
        (None, _) => (0..n).collect(),
    };
    let mut w_work = w.to_owned();
    let mut dead_columns = 0;
    if let Some(h) = hessian {
        for i in 0..n {
            if h[[i, i]] == 0.0 {
                w_work.column_mut(i).fill(0.0);
                dead_columns += 1;
            }
        }
    }
    let group_cols = cfg.scheme().group_size().columns_for(n)?;
    let groups = cfg.scheme().group_size().groups_for(n)?;
    let plan = Plan::new(
        perm,
        cfg.block_size(),
        group_cols,
        cfg.static_groups(),
        cfg.group_fit(),
    )
    .with_original_groups(cfg.act_group_aware());
    // The kernel reads rows of the factor as contiguous slices.
    let u = u.as_standard_layout();
    let (weight, dequantized, obs_loss) = run_plan(w_work, &plan, u.view(), None, cfg, groups)?;
    let objective = match hessian {
        Some(h) if cfg.compute_objective() => Some(hessian_objective(w, dequantized.view(), h)?),
        _ => None,
    };
    Ok(LayerSolution {
        weight,
        dequantized,
        report: SolveReport {
            obs_loss,
            objective,
            damp_percent: 0.0,
            damp_absolute: 0.0,
            attempts: 0,
            dead_columns,
            elapsed: start.elapsed(),
        },
    })
}

fn check_permutation(p: &[usize], n: usize) -> Result<()> {
    let mut seen = vec![false; n];
    if p.len() != n {
        return Err(Error::shape("perm", &[n], &[p.len()]));
    }
    for (k, &c) in p.iter().enumerate() {
        if c >= n || seen[c] {
            return Err(Error::InvalidConfig {
                field: "perm",
                value: format!("{c} at position {k}"),
                reason: "must be a permutation of the input columns",
            });
        }
        seen[c] = true;
    }
    Ok(())
}

/// The upper factor `U` with `U^T U = (H_p + lambda I)^-1` computed in f64,
/// for statistics held in f64: `H_p` is `hessian` in the order `perm`, with
/// zero diagonal entries (dead columns) set to 1 first, and `lambda =
/// damp_percent * mean(diag)`. One attempt, no retries: fails with
/// [`Error::IndefiniteHessian`] when the damped matrix is not positive
/// definite. Pass the result (as f32) to [`solve_layer_with_factor`].
pub fn inverse_factor_f64(
    hessian: ArrayView2<'_, f64>,
    perm: &[usize],
    damp_percent: f64,
) -> Result<Array2<f64>> {
    let n = hessian.nrows();
    if hessian.ncols() != n {
        return Err(Error::shape("Hessian", &[n, n], hessian.shape()));
    }
    if n == 0 {
        return Err(Error::Empty {
            what: "Hessian".into(),
        });
    }
    if !(damp_percent > 0.0 && damp_percent < 1.0) {
        return Err(Error::InvalidConfig {
            field: "damp_percent",
            value: damp_percent.to_string(),
            reason: "must be in (0, 1)",
        });
    }
    check_permutation(perm, n)?;
    if let Some(((i, j), _)) = hessian.indexed_iter().find(|(_, v)| !v.is_finite()) {
        return Err(Error::NonFinite {
            what: "Hessian".into(),
            index: vec![i, j],
        });
    }
    check_hessian(hessian)?;
    let diag = |i: usize| {
        let d = hessian[[i, i]];
        if d == 0.0 {
            1.0
        } else {
            d
        }
    };
    let mean = (0..n).map(diag).sum::<f64>() / n as f64;
    let damp = damp_percent * mean;
    // Flip route: with J the exchange matrix, J H_p J = L L^T gives U = J L^-1 J.
    let mut a = Mat::<f64>::zeros(n, n);
    for j in 0..n {
        for i in 0..n {
            let (r, c) = (perm[n - 1 - i], perm[n - 1 - j]);
            a[(i, j)] = if r == c {
                diag(r) + damp
            } else {
                hessian[[r, c]]
            };
        }
    }
    let mut scratch = MemBuffer::new(cholesky_in_place_scratch::<f64>(
        n,
        Par::Seq,
        Spec::default(),
    ));
    let indefinite = || Error::IndefiniteHessian {
        dim: n,
        last_damp_percent: damp_percent,
        attempts: 1,
    };
    cholesky_in_place(
        a.as_mut(),
        Default::default(),
        Par::Seq,
        MemStack::new(&mut scratch),
        Spec::default(),
    )
    .map_err(|_| indefinite())?;
    let mut linv = Mat::<f64>::zeros(n, n);
    faer::linalg::triangular_inverse::invert_lower_triangular(linv.as_mut(), a.as_ref(), Par::Seq);
    let u = Array2::from_shape_fn((n, n), |(i, j)| {
        if j >= i {
            linv[(n - 1 - i, n - 1 - j)]
        } else {
            0.0
        }
    });
    if u.iter().all(|v| v.is_finite()) && u.diag().iter().all(|&d| d > 0.0) {
        Ok(u)
    } else {
        Err(indefinite())
    }
}
