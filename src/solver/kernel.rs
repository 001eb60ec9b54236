//! The blocked column walk over a chunk of output rows.
//!
//! Rows of W are independent given the shared factor `U`, so the solve runs
//! on fixed chunks of rows (in parallel, results independent of the thread
//! count). Within a chunk, columns are walked in plan order; each column is
//! quantized, its scaled error `e = (w - q) / U_ii` is pushed onto the rest of
//! the current block right away, and onto the columns after the block in one
//! matrix product when the block ends (GPTQ's lazy batch update). GPTAQ adds
//! `w * P[i, j]` to the same updates.

use faer::{Accum, Par};
use ndarray::{s, Array2, ArrayView2};

use super::plan::Plan;
use crate::linalg::{faer_mut, faer_ref};
use crate::quant::{GridFit, GridParams};

/// Rows solved together by one task.
pub(crate) const ROW_CHUNK: usize = 256;

/// Read-only inputs shared by every chunk.
pub(crate) struct Shared<'a> {
    pub plan: &'a Plan,
    /// Upper factor of the damped inverse Hessian, in plan order.
    pub u: ArrayView2<'a, f32>,
    /// GPTAQ's strictly upper correction matrix, in plan order.
    pub p: Option<ArrayView2<'a, f32>>,
    pub fit: GridFit,
    /// Static group parameters `[groups, out]`, fitted on the original weight.
    pub static_params: Option<&'a Array2<GridParams>>,
}

/// One chunk's results, in natural column order.
pub(crate) struct ChunkResult {
    pub codes: Array2<u8>,
    pub dequantized: Array2<f32>,
    /// `[groups, rows]`.
    pub params: Array2<GridParams>,
    pub obs_loss: f64,
}

/// Solves rows `row0 .. row0 + w.nrows()` of the layer (`w` in natural order).
pub(crate) fn solve_chunk(
    shared: &Shared<'_>,
    w: ArrayView2<'_, f32>,
    row0: usize,
    groups: usize,
) -> ChunkResult {
    let plan = shared.plan;
    let (r, n) = w.dim();
    let max_code = shared.fit.max_code();
    let u = shared.u;
    let width = plan.blocks.iter().map(|b| b.len()).max().unwrap_or(0);

    let mut wc = Array2::<f32>::from_shape_fn((r, n), |(row, p)| w[[row, plan.perm[p]]]);
    let mut codes_p = Array2::<u8>::zeros((r, n));
    let mut err = Array2::<f32>::zeros((r, width));
    let mut saved = shared.p.map(|_| Array2::<f32>::zeros((r, width)));
    let placeholder = GridParams {
        scale: 1.0,
        zero: 0,
    };
    let mut params = Array2::from_elem((groups, r), placeholder);
    if let Some(sp) = shared.static_params {
        params.assign(&sp.slice(s![.., row0..row0 + r]));
    }
    let mut obs_loss = 0.0f64;

    for block in &plan.blocks {
        let (b0, b1) = (block.start, block.end);
        let bl = b1 - b0;
        // The block's columns, compact so the in-block updates stay in cache.
        let mut blk = wc.slice(s![.., b0..b1]).to_owned();
        for i in b0..b1 {
            let k = i - b0;
            let group = plan.group_at(i);
            if plan.fits_group_at(i) {
                let end = (i + plan.group_cols).min(n);
                for row in 0..r {
                    // A group inside the block has its in-block updates in `blk`;
                    // a wider group starts at the block start, where `wc` is current.
                    let fitted = if end <= b1 {
                        shared.fit.fit(
                            blk.slice(s![row, k..end - b0])
                                .as_slice()
                                .expect("contiguous"),
                        )
                    } else {
                        shared
                            .fit
                            .fit(wc.slice(s![row, i..end]).as_slice().expect("contiguous"))
                    };
                    params[[group, row]] = fitted;
                }
            }
            let d = u[[i, i]];
            let u_row = u.slice(s![i, i + 1..b1]);
            let u_row = u_row.as_slice().expect("row-major factor");
            let p_row = shared.p.map(|p| {
                p.slice_move(s![i, i + 1..b1])
                    .to_slice()
                    .expect("row-major correction")
            });
            for row in 0..r {
                let prm = params[[group, row]];
                let mut br = blk.row_mut(row);
                let br = br.as_slice_mut().expect("contiguous block");
                let wv = br[k];
                let code = prm.code(wv, max_code);
                let q = prm.value(code);
                let e = (wv - q) / d;
                obs_loss += f64::from(e) * f64::from(e);
                codes_p[[row, i]] = code;
                err[[row, k]] = e;
                br[k] = q;
                let rest = &mut br[k + 1..];
                match (p_row, saved.as_mut()) {
                    (Some(pr), Some(sv)) => {
                        // One pass over slices; same roundings as GPTQ's
                        // update followed by GPTAQ's.
                        sv[[row, k]] = wv;
                        for ((x, &uv), &pv) in rest.iter_mut().zip(u_row).zip(pr) {
                            *x = *x - e * uv + wv * pv;
                        }
                    }
                    _ => {
                        for (x, &uv) in rest.iter_mut().zip(u_row) {
                            *x -= e * uv;
                        }
                    }
                }
            }
        }
        wc.slice_mut(s![.., b0..b1]).assign(&blk);
        if b1 < n {
            faer::linalg::matmul::matmul(
                faer_mut(wc.slice_mut(s![.., b1..])),
                Accum::Add,
                faer_ref(err.slice(s![.., ..bl])),
                faer_ref(u.slice(s![b0..b1, b1..])),
                -1.0f32,
                Par::Seq,
            );
            if let (Some(p), Some(sv)) = (shared.p, saved.as_ref()) {
                faer::linalg::matmul::matmul(
                    faer_mut(wc.slice_mut(s![.., b1..])),
                    Accum::Add,
                    faer_ref(sv.slice(s![.., ..bl])),
                    faer_ref(p.slice(s![b0..b1, b1..])),
                    1.0f32,
                    Par::Seq,
                );
            }
        }
    }

    let mut codes = Array2::<u8>::zeros((r, n));
    let mut dequantized = Array2::<f32>::zeros((r, n));
    for (p, &c) in plan.perm.iter().enumerate() {
        codes.column_mut(c).assign(&codes_p.column(p));
        dequantized.column_mut(c).assign(&wc.column(p));
    }
    ChunkResult {
        codes,
        dequantized,
        params,
        obs_loss,
    }
}
