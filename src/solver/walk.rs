//! The column walk over a whole layer for any grid: row chunks solved in
//! parallel (results independent of the thread count) and reassembled.

use ndarray::{s, Array2, ArrayView2, Axis};
use rayon::prelude::*;

use super::kernel::{solve_chunk, ChunkResult, Shared, ROW_CHUNK};
use super::plan::Plan;
use crate::quant::cell::RowFit;

/// Everything one walk produces, rows in natural column order.
pub(crate) struct Walked<G> {
    /// Codes `[out, in]`.
    pub codes: Array2<u8>,
    /// The value each code decodes to `[out, in]`.
    pub dequantized: Array2<f32>,
    /// Grids `[groups, out]`.
    pub params: Array2<G>,
    /// Sum of the squared scaled errors (GPTQ's OBS loss).
    pub obs_loss: f64,
}

/// Walks `w_work` (dead columns already zeroed) through `plan` with factor
/// `u` (and GPTAQ's `p`), fitting grids with `fit`. `importance` is one
/// weight per original column (the Hessian diagonal), handed to the fit.
/// The dequantized weight is written over `w_work` and returned in it, and
/// every chunk writes its codes straight into the layer's: the walk holds
/// no `out x in` matrix beyond the weight and the codes.
pub(crate) fn walk<F: RowFit>(
    mut w_work: Array2<f32>,
    plan: &Plan,
    u: ArrayView2<'_, f32>,
    p: Option<ArrayView2<'_, f32>>,
    fit: F,
    importance: &[f32],
    groups: usize,
) -> Walked<F::Grid> {
    let (m, n) = w_work.dim();
    let static_params = plan
        .static_groups
        .then(|| static_span_params(w_work.view(), &fit, plan, importance, groups));
    let importance_plan: Vec<f32> = plan.perm.iter().map(|&c| importance[c]).collect();
    let shared = Shared {
        plan,
        u,
        p,
        fit,
        importance: &importance_plan,
        static_params: static_params.as_ref(),
    };
    let mut codes = Array2::<u8>::zeros((m, n));
    let chunks: Vec<ChunkResult<F::Grid>> = w_work
        .axis_chunks_iter_mut(Axis(0), ROW_CHUNK)
        .into_par_iter()
        .zip(
            codes
                .axis_chunks_iter_mut(Axis(0), ROW_CHUNK)
                .into_par_iter(),
        )
        .enumerate()
        .map(|(c, (rows, codes))| solve_chunk(&shared, rows, codes, c * ROW_CHUNK, groups))
        .collect();

    let mut params = Array2::from_elem((groups, m), shared.fit.placeholder());
    let mut obs_loss = 0.0;
    for (c, chunk) in chunks.iter().enumerate() {
        let rows = c * ROW_CHUNK..c * ROW_CHUNK + chunk.params.ncols();
        params.slice_mut(s![.., rows]).assign(&chunk.params);
        obs_loss += chunk.obs_loss;
    }
    Walked {
        codes,
        dequantized: w_work,
        params,
        obs_loss,
    }
}

/// Grids `[groups, out]` fitted on the original weight, by original column:
/// span `k` holds columns `k * fit_cols ..` up to the next span or the end
/// of a ragged layer.
fn static_span_params<F: RowFit>(
    w: ArrayView2<'_, f32>,
    fit: &F,
    plan: &Plan,
    importance: &[f32],
    groups: usize,
) -> Array2<F::Grid> {
    let (m, n) = w.dim();
    let mut params = Array2::from_elem((groups, m), fit.placeholder());
    let mut vals = vec![0.0f32; plan.fit_cols.min(n)];
    let mut out = vec![fit.placeholder(); plan.fit_cols.div_ceil(plan.group_cols)];
    for start in (0..n).step_by(plan.fit_cols) {
        let end = (start + plan.fit_cols).min(n);
        let g0 = start / plan.group_cols;
        let out = &mut out[..(end - start).div_ceil(plan.group_cols)];
        for o in 0..m {
            let vals = &mut vals[..end - start];
            for (v, c) in vals.iter_mut().zip(start..end) {
                *v = w[[o, c]];
            }
            fit.fit_span(vals, &importance[start..end], out);
            for (t, &g) in out.iter().enumerate() {
                params[[g0 + t, o]] = g;
            }
        }
    }
    params
}
