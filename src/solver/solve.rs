//! The single entry point: one linear layer, one method.

use std::time::Instant;

use faer::{Accum, Par};
use ndarray::{s, Array2, ArrayView2, Axis};
use rayon::prelude::*;

use super::kernel::{solve_chunk, ChunkResult, Shared, ROW_CHUNK};
use super::objective::hessian_objective;
use super::plan::{act_order_permutation, Plan};
use super::report::{LayerSolution, SolveReport};
use crate::config::GptqConfig;
use crate::error::{Error, Result};
use crate::hessian::LayerStatistics;
use crate::linalg::{faer_mut, faer_ref, inverse_cholesky_upper};
use crate::quant::grid::check_f16_scales;
use crate::quant::{GridFit, GridParams, QuantizedWeight};
use crate::validate::check_finite;

/// Which column-walk corrections a solve applies. VLMQ is not a variant:
/// it is either method run on importance-weighted [`LayerStatistics`].
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Method {
    /// GPTQ: `min_Q sum_t alpha_t ||(W - Q) x_t||^2`.
    #[default]
    Gptq,
    /// GPTAQ: `min_Q sum_t alpha_t ||Q x~_t - W x_t||^2`, which needs the
    /// statistics' cross term. `strength` scales the correction matrix `P`
    /// (0.25 in the published method) and must lie in `[0, 1]` (checked by
    /// [`Method::validate`] and by every solve).
    Gptaq {
        /// Scale of `P`, in `[0, 1]`.
        strength: f32,
    },
}

impl Method {
    /// GPTAQ with the published strength 0.25.
    pub fn gptaq() -> Self {
        Method::Gptaq { strength: 0.25 }
    }

    /// Checks the method's parameters: a GPTAQ strength must be in `[0, 1]`
    /// (0 is GPTQ on the quantized-path inputs, 1 the full correction; values
    /// outside blow the correction up instead of weighting it).
    pub fn validate(&self) -> Result<()> {
        match *self {
            Method::Gptq => Ok(()),
            Method::Gptaq { strength } if (0.0..=1.0).contains(&strength) => Ok(()),
            Method::Gptaq { strength } => Err(Error::InvalidConfig {
                field: "gptaq.strength",
                value: strength.to_string(),
                reason: "must be in [0, 1]",
            }),
        }
    }
}

/// Quantizes one linear layer `w` (`[out, in]`) given the statistics of its
/// calibration inputs.
///
/// Dead columns (zero Hessian diagonal) are quantized as zero; the Hessian is
/// damped (with retries, see [`Damping`](crate::Damping)); columns are walked
/// in act-order when configured; dynamic groups are fitted on the updated
/// columns when a group starts, static groups on the original weight.
///
/// ```
/// use ndarray::Array2;
/// use vlmq::hessian::HessianAccumulator;
/// use vlmq::solver::{solve_layer, Method};
/// use vlmq::{Bits, GptqConfig, QuantScheme};
///
/// let w = Array2::from_shape_fn((8, 16), |(i, j)| ((i * 7 + j * 3) % 11) as f32 - 5.0);
/// let x = Array2::from_shape_fn((64, 16), |(t, j)| ((t * 5 + j) % 13) as f32 / 13.0);
/// let mut acc = HessianAccumulator::<f32>::new(16);
/// acc.add(x.view(), None)?;
/// let cfg = GptqConfig::new(QuantScheme::new(Bits::new(4)?));
/// let sol = solve_layer(w.view(), &acc.finish()?, &cfg, Method::Gptq)?;
/// assert_eq!(sol.dequantized.dim(), (8, 16));
/// # Ok::<(), vlmq::Error>(())
/// ```
pub fn solve_layer(
    w: ArrayView2<'_, f32>,
    stats: &LayerStatistics,
    cfg: &GptqConfig,
    method: Method,
) -> Result<LayerSolution> {
    let start = Instant::now();
    cfg.validate()?;
    let (m, n) = w.dim();
    if m == 0 || n == 0 {
        return Err(Error::Empty {
            what: "weight".into(),
        });
    }
    if stats.hessian.dim() != (n, n) {
        return Err(Error::shape("Hessian", &[n, n], stats.hessian.shape()));
    }
    check_finite("weight", w)?;
    check_finite("Hessian", stats.hessian.view())?;
    check_hessian(stats.hessian.view())?;
    let group_cols = cfg.scheme.group_size.columns_for(n)?;
    let groups = cfg.scheme.group_size.groups_for(n)?;
    check_f16_scales(w, &cfg.scheme, group_cols)?;
    method.validate()?;
    let strength = match method {
        Method::Gptq => None,
        Method::Gptaq { strength } => Some(strength),
    };
    let cross = match (strength, stats.cross.as_ref()) {
        (None, _) => None,
        (Some(_), Some(c)) if c.dim() == (n, n) => {
            check_finite("GPTAQ cross term", c.view())?;
            Some(c)
        }
        (Some(_), Some(c)) => return Err(Error::shape("GPTAQ cross term", &[n, n], c.shape())),
        (Some(_), None) => {
            return Err(Error::InvalidConfig {
                field: "method",
                value: "GPTAQ".into(),
                reason: "GPTAQ needs statistics with a cross term (paired inputs)",
            })
        }
    };

    // Dead columns: never activated, so any value is free; quantize them as 0.
    let mut h = stats.hessian.clone();
    let mut w_work = w.to_owned();
    let mut dead_columns = 0;
    for i in 0..n {
        if h[[i, i]] == 0.0 {
            h[[i, i]] = 1.0;
            w_work.column_mut(i).fill(0.0);
            dead_columns += 1;
        }
    }

    let perm: Vec<usize> = if cfg.act_order {
        act_order_permutation(h.view())
    } else {
        (0..n).collect()
    };
    let h_perm = Array2::from_shape_fn((n, n), |(i, j)| h[[perm[i], perm[j]]]);
    let factor = inverse_cholesky_upper(h_perm.view(), &cfg.damping)?;
    let p = match (strength, cross) {
        (Some(a), Some(c)) => Some(gptaq_correction(c.view(), &perm, factor.u.view(), a)),
        _ => None,
    };

    let plan = Plan::new(
        perm,
        cfg.block_size,
        group_cols,
        cfg.static_groups,
        cfg.group_fit,
    );
    let (weight, dequantized, obs_loss) = run_plan(
        w_work.view(),
        &plan,
        factor.u.view(),
        p.as_ref().map(|p| p.view()),
        cfg,
        groups,
    )?;
    let objective = if cfg.compute_objective {
        Some(hessian_objective(
            w,
            dequantized.view(),
            stats.hessian.view(),
        )?)
    } else {
        None
    };
    Ok(LayerSolution {
        weight,
        dequantized,
        report: SolveReport {
            obs_loss,
            objective,
            damp_percent: factor.damp_percent,
            damp_absolute: factor.damp_absolute,
            attempts: factor.attempts,
            dead_columns,
            elapsed: start.elapsed(),
        },
    })
}

/// Runs the column walk of `plan` over `w_work` (dead columns already
/// zeroed) in row chunks, and assembles the quantized weight, the dense
/// weight it stands for, and the OBS loss.
pub(crate) fn run_plan(
    w_work: ArrayView2<'_, f32>,
    plan: &Plan,
    u: ArrayView2<'_, f32>,
    p: Option<ArrayView2<'_, f32>>,
    cfg: &GptqConfig,
    groups: usize,
) -> Result<(QuantizedWeight, Array2<f32>, f64)> {
    let (m, n) = w_work.dim();
    let fit = GridFit::new(cfg.scheme);
    let static_params = cfg
        .static_groups
        .then(|| static_group_params(w_work, &fit, plan.group_cols));
    let shared = Shared {
        plan,
        u,
        p,
        fit,
        static_params: static_params.as_ref(),
    };
    let chunks: Vec<ChunkResult> = w_work
        .axis_chunks_iter(Axis(0), ROW_CHUNK)
        .into_par_iter()
        .enumerate()
        .map(|(c, rows)| solve_chunk(&shared, rows, c * ROW_CHUNK, groups))
        .collect();

    let mut codes = Array2::<u8>::zeros((m, n));
    let mut dequantized = Array2::<f32>::zeros((m, n));
    let mut scales = Array2::<f32>::zeros((groups, m));
    let mut zeros = Array2::<u8>::zeros((groups, m));
    let mut obs_loss = 0.0;
    for (c, chunk) in chunks.iter().enumerate() {
        let rows = c * ROW_CHUNK..c * ROW_CHUNK + chunk.codes.nrows();
        codes.slice_mut(s![rows.clone(), ..]).assign(&chunk.codes);
        dequantized
            .slice_mut(s![rows.clone(), ..])
            .assign(&chunk.dequantized);
        scales
            .slice_mut(s![.., rows.clone()])
            .assign(&chunk.params.mapv(|p| p.scale));
        zeros
            .slice_mut(s![.., rows])
            .assign(&chunk.params.mapv(|p| p.zero));
        obs_loss += chunk.obs_loss;
    }
    let weight = QuantizedWeight::grouped(
        cfg.scheme.bits,
        cfg.scheme.symmetric,
        cfg.scheme.group_size,
        codes,
        scales,
        zeros,
        plan.g_idx(),
    )?
    .with_static_groups(cfg.static_groups);
    Ok((weight, dequantized, obs_loss))
}

/// Rejects a Hessian that cannot be one: a negative diagonal entry (a zero
/// one is a dead column), or asymmetry beyond rounding (only one triangle is
/// read, so an asymmetric matrix would silently be replaced by another):
/// `|H_ij - H_ji| <= 1e-4 max(|H_ij|, |H_ji|, sqrt(H_ii H_jj))`, far above
/// f32 rounding of any symmetric computation and far below a real defect.
pub(crate) fn check_hessian(h: ArrayView2<'_, f32>) -> Result<()> {
    let n = h.nrows();
    if let Some(i) = (0..n).find(|&i| h[[i, i]] < 0.0) {
        return Err(Error::InvalidConfig {
            field: "Hessian",
            value: format!("diagonal entry {} at {i}", h[[i, i]]),
            reason: "a Hessian's diagonal must be non-negative (0 marks a dead input)",
        });
    }
    // Tiles of the upper triangle against their mirror tiles, so both reads
    // stay in cache; the test `|a - b| > 1e-4 * max(|a|, |b|, sqrt(h_ii h_jj))`
    // is compared squared (every term is non-negative) to skip the root.
    const TILE: usize = 64;
    for i0 in (0..n).step_by(TILE) {
        for j0 in (i0..n).step_by(TILE) {
            for i in i0..(i0 + TILE).min(n) {
                let hii = f64::from(h[[i, i]]);
                for j in j0.max(i + 1)..(j0 + TILE).min(n) {
                    let (a, b) = (h[[i, j]], h[[j, i]]);
                    let (fa, fb) = (f64::from(a), f64::from(b));
                    let size2 = (fa * fa).max(fb * fb).max(hii * f64::from(h[[j, j]]));
                    if (fa - fb) * (fa - fb) > 1e-8 * size2 {
                        return Err(Error::InvalidConfig {
                            field: "Hessian",
                            value: format!("H[{i}, {j}] = {a} but H[{j}, {i}] = {b}"),
                            reason: "a Hessian must be symmetric (up to rounding)",
                        });
                    }
                }
            }
        }
    }
    Ok(())
}

/// GPTAQ's `P = strength * triu(C U^T, 1) U` in plan order, with `C` the
/// cross term permuted like the Hessian.
fn gptaq_correction(
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

/// Grid parameters `[groups, out]` fitted on the original weight, by
/// original column (group `g` holds columns `g * group_cols ..` up to the
/// next group or the end of a ragged layer).
fn static_group_params(
    w: ArrayView2<'_, f32>,
    fit: &GridFit,
    group_cols: usize,
) -> Array2<GridParams> {
    let (m, n) = w.dim();
    let groups = n.div_ceil(group_cols);
    let mut row = vec![0.0f32; group_cols];
    Array2::from_shape_fn((groups, m), |(g, o)| {
        let cols = g * group_cols..((g + 1) * group_cols).min(n);
        let vals = &mut row[..cols.len()];
        for (v, c) in vals.iter_mut().zip(cols) {
            *v = w[[o, c]];
        }
        fit.fit(vals)
    })
}
