//! GPTQ (and GPTAQ, and VLMQ through its statistics) onto a GGUF block
//! format: the same column walk with error feedback, on the type's grid.

use std::time::Instant;

use ndarray::{Array2, ArrayView2};

use super::objective::hessian_objective;
use super::plan::Plan;
use super::report::SolveReport;
use super::solve::{check_inputs, prepare, Method};
use super::walk::walk;
use crate::config::GptqConfig;
use crate::error::{Error, Result};
use crate::hessian::LayerStatistics;
use crate::quant::gguf::{encode_rows, BlockFit, BlockGrid, GgufType};

/// Largest weight magnitude accepted: every block header is f16 (Q4_1
/// stores its minimum as one), so values near f16's largest (65504) cannot
/// be represented; the margin leaves room for error feedback.
const MAX_WEIGHT: f32 = 32768.0;

/// A layer solved onto a GGUF block type.
#[derive(Debug, Clone)]
pub struct GgufSolution {
    /// The block type.
    pub ty: GgufType,
    /// Codes `[out, in]` (unsigned: the stored value plus the type's zero
    /// code for Q8_0).
    pub codes: Array2<u8>,
    /// One grid per block (K-quants: per sub-block) and row, `[groups, out]`.
    pub grids: Array2<BlockGrid>,
    /// The value each weight decodes to, `[out, in]`: exactly what the packed
    /// blocks decode to in candle and llama.cpp's reference dequantization.
    pub dequantized: Array2<f32>,
    /// Facts about the solve.
    pub report: SolveReport,
}

impl GgufSolution {
    /// The packed blocks, row after row, as a GGUF tensor stores them.
    pub fn pack(&self) -> Result<Vec<u8>> {
        encode_rows(self.ty, self.codes.view(), self.grids.view())
    }
}

/// Quantizes one linear layer `w` (`[out, in]`) onto GGUF type `ty` with the
/// column walk of [`solve_layer`](super::solve_layer).
///
/// `cfg` gives damping, block size, act-order, static groups, the group fit
/// rule and whether the objective is reported; its `scheme` is not used (the
/// grid is the type's). Each block (a K-quant super-block: all of its
/// sub-blocks) is fitted when the walk reaches it, by `cfg.group_fit`'s
/// rule, with the Hessian diagonal as per-column importance, or on the
/// original weight with static groups. GGUF stores no column order, so
/// act-order needs `static_groups` (blocks stay contiguous in the original
/// order) and is refused without it. `w`'s input dimension must be a
/// multiple of the type's block (32, or 256 for the K-quants).
pub fn solve_layer_gguf(
    w: ArrayView2<'_, f32>,
    stats: &LayerStatistics,
    cfg: &GptqConfig,
    method: Method,
    ty: GgufType,
) -> Result<GgufSolution> {
    let start = Instant::now();
    check_inputs(w, stats)?;
    let n = w.ncols();
    ty.check_cols("weight", n)?;
    if cfg.act_order() && !cfg.static_groups() {
        return Err(Error::InvalidConfig {
            field: "act_order",
            value: "true without static_groups".into(),
            reason: "GGUF stores no column order (g_idx): act-order needs static groups",
        });
    }
    if cfg.act_group_aware() {
        return Err(Error::InvalidConfig {
            field: "act_group_aware",
            value: "true".into(),
            reason: "GAR orders GPTQ groups, not GGUF blocks and super-blocks",
        });
    }
    // One pass over the weight that vectorizes; the (slow) search for the
    // position only when there is one to report.
    let too_large = w.fold(false, |any, v| any | (v.abs() > MAX_WEIGHT));
    let first = too_large
        .then(|| w.indexed_iter().find(|(_, v)| v.abs() > MAX_WEIGHT))
        .flatten();
    if let Some(((o, c), v)) = first {
        return Err(Error::Unencodable {
            what: format!("weight [{o}, {c}] = {v:e}"),
            reason: format!("GGUF block headers are f16; weights must stay within +-{MAX_WEIGHT}"),
        });
    }
    let mut prep = prepare(w, stats, cfg, method)?;
    let plan = Plan::with_fit_span(
        prep.perm.clone(),
        cfg.block_size(),
        ty.group_cols(),
        ty.block_cols(),
        cfg.static_groups(),
        cfg.group_fit(),
    );
    let importance: Vec<f32> = stats.hessian.diag().to_vec();
    let walked = walk(
        std::mem::take(&mut prep.w_work),
        &plan,
        prep.factor.u.view(),
        prep.p.as_ref().map(|p| p.view()),
        BlockFit::new(ty),
        &importance,
        n / ty.group_cols(),
    );
    let objective = if cfg.compute_objective() {
        Some(hessian_objective(
            w,
            walked.dequantized.view(),
            stats.hessian.view(),
        )?)
    } else {
        None
    };
    Ok(GgufSolution {
        ty,
        codes: walked.codes,
        grids: walked.params,
        dequantized: walked.dequantized,
        report: prep.report(walked.obs_loss, objective, start),
    })
}
