//! The single entry point: one linear layer, one method.

use std::borrow::Cow;
use std::time::Instant;

use ndarray::{Array2, ArrayView2};

use super::gptaq::gptaq_correction;
use super::objective::hessian_objective;
use super::plan::{column_order, Plan};
use super::report::{LayerSolution, SolveReport};
use super::walk::walk;
use crate::config::GptqConfig;
use crate::error::{Error, Result};
use crate::hessian::LayerStatistics;
use crate::linalg::{inverse_cholesky_upper_in_order, inverse_cholesky_upper_owned};
use crate::quant::grid::check_scales;
use crate::quant::{GridFit, QuantizedWeight};
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
    let (group_cols, groups) = checked_groups(w, stats, cfg)?;
    let mut prep = prepare(w, stats, cfg, method)?;
    let (weight, dequantized, obs_loss) = walk_prepared(&mut prep, cfg, group_cols, groups)?;
    let objective = if cfg.compute_objective() {
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
        report: prep.report(obs_loss, objective, start),
    })
}

/// [`solve_layer`] on statistics the caller gives up (the pipeline's
/// last layer of an input group): the Hessian is freed as soon as the
/// factorization has read it. The same solution, bit for bit. With
/// `cfg.compute_objective()` the Hessian is needed after the walk, so it is
/// kept.
pub fn solve_layer_owned(
    w: Array2<f32>,
    stats: LayerStatistics,
    cfg: &GptqConfig,
    method: Method,
) -> Result<LayerSolution> {
    if cfg.compute_objective() {
        return solve_layer(w.view(), &stats, cfg, method);
    }
    let start = Instant::now();
    let (group_cols, groups) = checked_groups(w.view(), &stats, cfg)?;
    let mut prep = prepare_owned(w, stats, cfg, method)?;
    let (weight, dequantized, obs_loss) = walk_prepared(&mut prep, cfg, group_cols, groups)?;
    Ok(LayerSolution {
        weight,
        dequantized,
        report: prep.report(obs_loss, None, start),
    })
}

/// Checks a weight and its statistics: non-empty, matching shapes, finite,
/// and a Hessian that can be one.
pub(crate) fn check_inputs(w: ArrayView2<'_, f32>, stats: &LayerStatistics) -> Result<()> {
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
    check_hessian(stats.hessian.view())
}

/// What every column walk of one layer starts from: the weight with dead
/// columns zeroed, the column order, the damped inverse factor in that
/// order and GPTAQ's correction.
pub(crate) struct Prepared {
    pub w_work: Array2<f32>,
    pub perm: Vec<usize>,
    pub factor: crate::linalg::InverseCholesky,
    pub p: Option<Array2<f32>>,
    pub dead_columns: usize,
}

impl Prepared {
    /// The solve's report.
    pub fn report(&self, obs_loss: f64, objective: Option<f64>, start: Instant) -> SolveReport {
        SolveReport {
            obs_loss,
            objective,
            damp_percent: self.factor.damp_percent,
            damp_absolute: self.factor.damp_absolute,
            attempts: self.factor.attempts,
            dead_columns: self.dead_columns,
            elapsed: start.elapsed(),
        }
    }
}

/// Zeroes dead columns (zero Hessian diagonal, quantized as zero), orders
/// the columns (act-order when configured), factors the damped inverse
/// Hessian and forms GPTAQ's correction for `method`.
pub(crate) fn prepare(
    w: ArrayView2<'_, f32>,
    stats: &LayerStatistics,
    cfg: &GptqConfig,
    method: Method,
) -> Result<Prepared> {
    prepare_from(
        w.to_owned(),
        Cow::Borrowed(&stats.hessian),
        stats.cross.as_ref().map(Cow::Borrowed),
        cfg,
        method,
    )
}

/// [`prepare`] of statistics the caller gives up: dead columns are patched
/// in the Hessian itself, and the Hessian is freed once the factorization
/// has read it, so the solve's peak holds one `n x n` matrix less. The same
/// result, bit for bit.
pub(crate) fn prepare_owned(
    w: Array2<f32>,
    stats: LayerStatistics,
    cfg: &GptqConfig,
    method: Method,
) -> Result<Prepared> {
    prepare_from(
        w,
        Cow::Owned(stats.hessian),
        stats.cross.map(Cow::Owned),
        cfg,
        method,
    )
}

fn prepare_from(
    mut w_work: Array2<f32>,
    hessian: Cow<'_, Array2<f32>>,
    cross: Option<Cow<'_, Array2<f32>>>,
    cfg: &GptqConfig,
    method: Method,
) -> Result<Prepared> {
    let n = w_work.ncols();
    method.validate()?;
    let strength = match method {
        Method::Gptq => None,
        Method::Gptaq { strength } => Some(strength),
    };
    let cross = match (strength, cross) {
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
    let dead: Vec<usize> = (0..n).filter(|&i| hessian[[i, i]] == 0.0).collect();
    for &i in &dead {
        w_work.column_mut(i).fill(0.0);
    }
    // Their diagonal entries become 1. A borrowed Hessian is copied only
    // then: for the widest layers (11008 inputs: 485 MB) a copy is a large
    // share of the solve's memory, and the factor reads the columns in the
    // walk's order in place instead of from a permuted copy. An owned one
    // is patched in place and handed to the factorization, which frees it.
    let (perm, factor) = match hessian {
        Cow::Borrowed(h) => {
            let patched = (!dead.is_empty()).then(|| {
                let mut h = h.clone();
                for &i in &dead {
                    h[[i, i]] = 1.0;
                }
                h
            });
            let h = patched.as_ref().map_or(h.view(), |h| h.view());
            let perm = column_order(h, cfg)?;
            let factor = inverse_cholesky_upper_in_order(h, Some(&perm), &cfg.damping())?;
            (perm, factor)
        }
        Cow::Owned(mut h) => {
            for &i in &dead {
                h[[i, i]] = 1.0;
            }
            let perm = column_order(h.view(), cfg)?;
            let factor = inverse_cholesky_upper_owned(h, Some(&perm), &cfg.damping())?;
            (perm, factor)
        }
    };
    let dead_columns = dead.len();
    let p = match (strength, cross) {
        (Some(a), Some(c)) => Some(gptaq_correction(c.view(), &perm, factor.u.view(), a)),
        _ => None,
    };
    Ok(Prepared {
        w_work,
        perm,
        factor,
        p,
        dead_columns,
    })
}

/// The checks of both solves before any work: the inputs' shapes and
/// values, and the grid's scales for the layer's groups. Returns the
/// columns per group and the number of groups.
fn checked_groups(
    w: ArrayView2<'_, f32>,
    stats: &LayerStatistics,
    cfg: &GptqConfig,
) -> Result<(usize, usize)> {
    let n = w.ncols();
    check_inputs(w, stats)?;
    let group_cols = cfg.scheme().group_size().columns_for(n)?;
    let groups = cfg.scheme().group_size().groups_for(n)?;
    check_scales(w, &cfg.scheme(), group_cols)?;
    Ok((group_cols, groups))
}

/// The column walk of a prepared layer in its order, with the configured
/// groups: the quantized weight, the dense weight it stands for (written
/// over the prepared work weight, which is taken), the OBS loss.
fn walk_prepared(
    prep: &mut Prepared,
    cfg: &GptqConfig,
    group_cols: usize,
    groups: usize,
) -> Result<(QuantizedWeight, Array2<f32>, f64)> {
    let plan = Plan::new(
        prep.perm.clone(),
        cfg.block_size(),
        group_cols,
        cfg.static_groups(),
        cfg.group_fit(),
    )
    .with_original_groups(cfg.act_group_aware());
    run_plan(
        std::mem::take(&mut prep.w_work),
        &plan,
        prep.factor.u.view(),
        prep.p.as_ref().map(|p| p.view()),
        cfg,
        groups,
    )
}

/// Runs the column walk of `plan` over `w_work` (dead columns already
/// zeroed) in row chunks, and assembles the quantized weight, the dense
/// weight it stands for (in `w_work`'s memory), and the OBS loss.
pub(crate) fn run_plan(
    w_work: Array2<f32>,
    plan: &Plan,
    u: ArrayView2<'_, f32>,
    p: Option<ArrayView2<'_, f32>>,
    cfg: &GptqConfig,
    groups: usize,
) -> Result<(QuantizedWeight, Array2<f32>, f64)> {
    let n = w_work.ncols();
    // GPTQ's grid fit ignores importance.
    let importance = vec![1.0f32; n];
    let walked = walk(
        w_work,
        plan,
        u,
        p,
        GridFit::new(cfg.scheme()),
        &importance,
        groups,
    );
    let weight = QuantizedWeight::grouped(
        cfg.scheme().bits(),
        cfg.scheme().symmetric(),
        cfg.scheme().group_size(),
        walked.codes,
        walked.params.mapv(|p| p.scale),
        walked.params.mapv(|p| p.zero),
        plan.g_idx(),
    )?
    .with_static_groups(cfg.static_groups());
    Ok((weight, walked.dequantized, walked.obs_loss))
}

/// Rejects a Hessian that cannot be one: a negative diagonal entry (a zero
/// one is a dead column), or asymmetry beyond rounding (only one triangle is
/// read, so an asymmetric matrix would silently be replaced by another):
/// `|H_ij - H_ji| <= 1e-4 max(|H_ij|, |H_ji|, sqrt(H_ii H_jj))`, far above
/// f32 rounding of any symmetric computation and far below a real defect.
pub(crate) fn check_hessian<T>(h: ArrayView2<'_, T>) -> Result<()>
where
    T: Copy + Into<f64> + std::fmt::Display,
{
    let n = h.nrows();
    if let Some(i) = (0..n).find(|&i| h[[i, i]].into() < 0.0) {
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
                let hii: f64 = h[[i, i]].into();
                for j in j0.max(i + 1)..(j0 + TILE).min(n) {
                    let (a, b) = (h[[i, j]], h[[j, i]]);
                    let (fa, fb): (f64, f64) = (a.into(), b.into());
                    let hjj: f64 = h[[j, j]].into();
                    let size2 = (fa * fa).max(fb * fb).max(hii * hjj);
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
