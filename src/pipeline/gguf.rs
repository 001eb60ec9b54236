//! Runs whose layers are solved onto a GGUF block type
//! ([`PipelineConfig::with_gguf_type`]): the checks made before any work,
//! and the solve of one layer.

use ndarray::{Array2, ArrayView2};

use super::config::PipelineConfig;
use crate::config::GptqConfig;
use crate::error::{Error, Result};
use crate::hessian::LayerStatistics;
use crate::quant::gguf::GgufType;
use crate::quant::QuantizedWeight;
use crate::solver::{solve_layer_gguf, GgufSolution, Method};

/// A solved layer: GPTQ codes and grids, or GGUF blocks.
#[derive(Debug, Clone)]
pub(crate) enum LayerCodes {
    /// A layer on a GPTQ grid.
    Gptq(QuantizedWeight),
    /// A layer on a GGUF block type.
    Gguf(GgufSolution),
}

/// Refuses, before any work, the GGUF runs that cannot work: act-order
/// without static groups (GGUF stores no column order), GAR (it orders
/// GPTQ groups, not GGUF blocks) and a state directory (a saved block holds
/// GPTQ codes and grids).
pub(crate) fn check_gguf_run(cfg: &PipelineConfig) -> Result<()> {
    let Some(ty) = cfg.gguf_type() else {
        return Ok(());
    };
    let solver = cfg.solver();
    if solver.act_order() && !solver.static_groups() {
        return Err(Error::InvalidConfig {
            field: "act_order",
            value: format!("true without static_groups, format gguf:{ty}"),
            reason: "GGUF stores no column order (g_idx): act-order needs static groups",
        });
    }
    if solver.act_group_aware() {
        return Err(Error::InvalidConfig {
            field: "act_group_aware",
            value: format!("true, format gguf:{ty}"),
            reason: "GAR orders GPTQ groups, not GGUF blocks and super-blocks",
        });
    }
    if cfg.state_dir().is_some() {
        return Err(Error::InvalidConfig {
            field: "state_dir",
            value: format!("set, format gguf:{ty}"),
            reason: "a resumable run saves GPTQ codes and grids; run GGUF output without a state directory",
        });
    }
    Ok(())
}

/// Solves `w` onto `ty` (or its fallback for `w`'s width, see
/// [`GgufType::for_cols`]): with the run's solver method on `stats`, or,
/// without statistics (RTN, the dead-layer fallback), on an identity
/// Hessian, where the walk has no error to feed back and every block is
/// fitted with uniform importance: round to nearest on the same grid.
pub(crate) fn solve_gguf(
    w: ArrayView2<'_, f32>,
    stats: Option<&LayerStatistics>,
    solver: &GptqConfig,
    method: Option<Method>,
    ty: GgufType,
) -> Result<GgufSolution> {
    let ty = ty.for_cols(w.ncols());
    match (method, stats) {
        (Some(method), Some(stats)) => solve_layer_gguf(w, stats, solver, method, ty),
        _ => {
            let identity = LayerStatistics::from_hessian(Array2::eye(w.ncols()));
            solve_layer_gguf(w, &identity, solver, Method::Gptq, ty)
        }
    }
}
