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
use ndarray::{s, Array2, ArrayView2, ArrayViewMut2};

use super::plan::Plan;
use crate::config::GroupFit;
use crate::linalg::{faer_mut, faer_ref};
use crate::quant::cell::{CellGrid, RowFit};

/// Rows solved together by one task.
pub(crate) const ROW_CHUNK: usize = 256;

/// Read-only inputs shared by every chunk.
pub(crate) struct Shared<'a, F: RowFit> {
    pub plan: &'a Plan,
    /// Upper factor of the damped inverse Hessian, in plan order.
    pub u: ArrayView2<'a, f32>,
    /// GPTAQ's strictly upper correction matrix, in plan order.
    pub p: Option<ArrayView2<'a, f32>>,
    pub fit: F,
    /// Per-column importance handed to the fit (the Hessian diagonal), in
    /// plan order.
    pub importance: &'a [f32],
    /// Static group parameters `[groups, out]`, fitted on the original weight.
    pub static_params: Option<&'a Array2<F::Grid>>,
}

/// One chunk's grids and loss (its codes and dequantized values are
/// written into the caller's rows).
pub(crate) struct ChunkResult<G> {
    /// `[groups, rows]`.
    pub params: Array2<G>,
    pub obs_loss: f64,
}

/// Solves rows `row0 .. row0 + w.nrows()` of the layer (`w` in natural
/// order), writing each weight's code into `codes` and the value it decodes
/// to over the weight in `w`: the chunk works on a copy of its rows, so the
/// layer needs no second `out x in` matrix for its result.
///
/// Dispatches to a copy of the kernel compiled for AVX2 when the CPU has it.
/// Both copies perform the same operations in the same order (no FMA
/// contraction), so results do not depend on the CPU.
pub(crate) fn solve_chunk<F: RowFit>(
    shared: &Shared<'_, F>,
    w: ArrayViewMut2<'_, f32>,
    codes: ArrayViewMut2<'_, u8>,
    row0: usize,
    groups: usize,
) -> ChunkResult<F::Grid> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            return unsafe { solve_chunk_avx2(shared, w, codes, row0, groups) };
        }
    }
    solve_chunk_impl(shared, w, codes, row0, groups)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn solve_chunk_avx2<F: RowFit>(
    shared: &Shared<'_, F>,
    w: ArrayViewMut2<'_, f32>,
    codes: ArrayViewMut2<'_, u8>,
    row0: usize,
    groups: usize,
) -> ChunkResult<F::Grid> {
    solve_chunk_impl(shared, w, codes, row0, groups)
}

/// The column walk. The current block is kept column-major (`blk[k * r +
/// row]`), so quantizing one column and pushing its error onto a later column
/// of the block are loops over contiguous rows (vectorized), while `wc` stays
/// row-major for the lazy update product.
#[inline(always)]
fn solve_chunk_impl<F: RowFit>(
    shared: &Shared<'_, F>,
    w: ArrayViewMut2<'_, f32>,
    codes: ArrayViewMut2<'_, u8>,
    row0: usize,
    groups: usize,
) -> ChunkResult<F::Grid> {
    let plan = shared.plan;
    let (r, n) = w.dim();
    let max_code = shared.fit.max_code();
    let u = shared.u;
    let width = plan.blocks.iter().map(|b| b.len()).max().unwrap_or(0);

    // Columns gathered into plan order, row by row.
    let mut wc = Array2::<f32>::zeros((r, n));
    for (mut dst, src) in wc.outer_iter_mut().zip(w.outer_iter()) {
        for (d, &c) in dst.iter_mut().zip(&plan.perm) {
            *d = src[c];
        }
    }
    // Codes by position, one contiguous run of rows per column.
    let mut codes_t = vec![0u8; n * r];
    // Block columns, the block's scaled errors and (GPTAQ) the quantized
    // columns' values: all column-major, `width x r`.
    let mut blk = vec![0.0f32; width * r];
    let mut err_t = Array2::<f32>::zeros((width, r));
    let mut saved_t = shared.p.map(|_| Array2::<f32>::zeros((width, r)));
    let placeholder = shared.fit.placeholder();
    let mut params = Array2::from_elem((groups, r), placeholder);
    if let Some(sp) = shared.static_params {
        params.assign(&sp.slice(s![.., row0..row0 + r]));
    }
    let mut cur = vec![placeholder; r];
    let mut cur_group = usize::MAX;
    let mut group_vals = vec![0.0f32; plan.fit_cols.min(n)];
    let mut fitted = vec![placeholder; plan.fit_cols.div_ceil(plan.group_cols)];
    let mut obs_loss = 0.0f64;

    for block in &plan.blocks {
        let (b0, b1) = (block.start, block.end);
        let bl = b1 - b0;
        for (row, src) in wc.outer_iter().enumerate() {
            let src = src.as_slice().expect("contiguous rows");
            for (k, &v) in src[b0..b1].iter().enumerate() {
                blk[k * r + row] = v;
            }
        }
        for i in b0..b1 {
            let k = i - b0;
            let group = plan.group_at(i);
            if plan.fits_group_at(i) {
                let end = (i + plan.fit_cols).min(n);
                let fitted = &mut fitted[..(end - i).div_ceil(plan.group_cols)];
                let importance = &shared.importance[i..end];
                for row in 0..r {
                    // Block-start rule: `wc` holds every column as it stood at the
                    // start of this block (earlier blocks' lazy updates applied,
                    // this block's in-block updates only in `blk`). Updated rule: a
                    // span inside the block has its in-block updates in `blk`; a
                    // wider span starts at the block start, where `wc` is current.
                    let in_block = plan.group_fit == GroupFit::Updated && end <= b1;
                    if in_block {
                        let vals = &mut group_vals[..end - i];
                        for (t, v) in vals.iter_mut().enumerate() {
                            *v = blk[(k + t) * r + row];
                        }
                        shared.fit.fit_span(vals, importance, fitted);
                    } else {
                        let vals = wc.slice(s![row, i..end]);
                        let vals = vals.as_slice().expect("contiguous");
                        shared.fit.fit_span(vals, importance, fitted);
                    }
                    for (t, &g) in fitted.iter().enumerate() {
                        params[[group + t, row]] = g;
                    }
                }
                cur_group = usize::MAX;
            }
            if group != cur_group {
                cur.copy_from_slice(params.row(group).as_slice().expect("contiguous params"));
                cur_group = group;
            }
            let d = u[[i, i]];
            let (done, rest) = blk[..bl * r].split_at_mut((k + 1) * r);
            let col = &mut done[k * r..];
            let mut e_row = err_t.row_mut(k);
            let e_col = e_row.as_slice_mut().expect("contiguous errors");
            let codes = &mut codes_t[i * r..(i + 1) * r];
            if let Some(sv) = saved_t.as_mut() {
                let mut s_row = sv.row_mut(k);
                s_row
                    .as_slice_mut()
                    .expect("contiguous")
                    .copy_from_slice(col);
            }
            for (((x, e), c), prm) in col
                .iter_mut()
                .zip(e_col.iter_mut())
                .zip(codes.iter_mut())
                .zip(&cur)
            {
                let wv = *x;
                let code = prm.code(wv, max_code);
                let q = prm.value(code);
                *e = (wv - q) / d;
                *c = code;
                *x = q;
            }
            for &e in e_col.iter() {
                obs_loss += f64::from(e) * f64::from(e);
            }
            let u_row = u.slice(s![i, i + 1..b1]);
            let u_row = u_row.as_slice().expect("row-major factor");
            match (shared.p, saved_t.as_ref()) {
                (Some(p), Some(sv)) => {
                    // Same roundings as GPTQ's update followed by GPTAQ's.
                    let p_row = p.slice_move(s![i, i + 1..b1]);
                    let p_row = p_row.to_slice().expect("row-major correction");
                    let wv_col = sv.row(k);
                    let wv_col = wv_col.as_slice().expect("contiguous");
                    for ((dst, &uv), &pv) in rest.chunks_exact_mut(r).zip(u_row).zip(p_row) {
                        for ((x, &e), &wv) in dst.iter_mut().zip(e_col.iter()).zip(wv_col) {
                            *x = *x - e * uv + wv * pv;
                        }
                    }
                }
                _ => {
                    for (dst, &uv) in rest.chunks_exact_mut(r).zip(u_row) {
                        for (x, &e) in dst.iter_mut().zip(e_col.iter()) {
                            *x -= e * uv;
                        }
                    }
                }
            }
        }
        for (row, mut dst) in wc.outer_iter_mut().enumerate() {
            let dst = dst.as_slice_mut().expect("contiguous rows");
            for (k, d) in dst[b0..b1].iter_mut().enumerate() {
                *d = blk[k * r + row];
            }
        }
        if b1 < n {
            faer::linalg::matmul::matmul(
                faer_mut(wc.slice_mut(s![.., b1..])),
                Accum::Add,
                faer_ref(err_t.slice(s![..bl, ..]).t()),
                faer_ref(u.slice(s![b0..b1, b1..])),
                -1.0f32,
                Par::Seq,
            );
            if let (Some(p), Some(sv)) = (shared.p, saved_t.as_ref()) {
                faer::linalg::matmul::matmul(
                    faer_mut(wc.slice_mut(s![.., b1..])),
                    Accum::Add,
                    faer_ref(sv.slice(s![..bl, ..]).t()),
                    faer_ref(p.slice(s![b0..b1, b1..])),
                    1.0f32,
                    Par::Seq,
                );
            }
        }
    }

    let (mut codes, mut w) = (codes, w);
    for (row, (mut c_row, mut d_row)) in codes.outer_iter_mut().zip(w.outer_iter_mut()).enumerate()
    {
        let src = wc.row(row);
        for (p, &c) in plan.perm.iter().enumerate() {
            c_row[c] = codes_t[p * r + row];
            d_row[c] = src[p];
        }
    }
    ChunkResult { params, obs_loss }
}
