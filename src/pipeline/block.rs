//! Quantizing one selected block: per input group, capture, weight, solve.

use std::time::{Duration, Instant};

use ndarray::Array2;

use super::capture::{capture, sample_factors, stack_rows};
use super::config::{DeadLayerFallback, GradientSource, PipelineConfig};
use super::context::in_block;
use super::plan::PlannedLayer;
use super::progress::Progress;
use super::report::{LayerReport, TraceShares};
use super::saliency::{block_local_saliency, SaliencyMaps};
use crate::backend::{QuantizableModel, TokenInfo};
use crate::config::{GptqConfig, QuantScheme};
use crate::error::{Error, Result};
use crate::hessian::{HessianAccumulator, LayerStatistics};
use crate::importance::{ImportanceDiagnostics, TokenImportance, Uniform};
use crate::quant::{quantize_rtn, QuantizedWeight};
use crate::solver::{hessian_objective, solve_layer};

/// One quantized layer: name, codes and grids, report.
pub(crate) type SavedLayer = (String, QuantizedWeight, LayerReport);

/// A quantized block's layers and its full-precision output (GPTAQ methods).
pub(crate) type BlockResult<H> = (Vec<SavedLayer>, Option<Vec<H>>);

/// What every block of a run shares.
pub(crate) struct BlockRun<'a, S> {
    pub(crate) samples: &'a [S],
    pub(crate) cfg: &'a PipelineConfig,
    pub(crate) layers_total: usize,
    pub(crate) layers_done: usize,
    pub(crate) start: Instant,
    pub(crate) needs_gradients: bool,
}

/// Quantizes the layers of block `b` in true-sequential group order and
/// returns them with the block's full-precision output (GPTAQ methods).
/// `stop` is the progress callback; `true` cancels.
#[allow(clippy::too_many_arguments)]
pub(crate) fn quantize_block<M: QuantizableModel>(
    run: &mut BlockRun<'_, M::Sample>,
    model: &mut M,
    b: usize,
    name: &str,
    groups: &[Vec<PlannedLayer>],
    q_stream: &[M::Hidden],
    fp_stream: Option<&[M::Hidden]>,
    global: Option<&SaliencyMaps>,
    stop: &mut dyn FnMut(&Progress) -> bool,
) -> Result<BlockResult<M::Hidden>> {
    let samples = run.samples;
    let cfg = run.cfg;
    let imp = cfg.importance();
    let infos: Vec<TokenInfo> = samples.iter().map(|s| model.token_info(b, s)).collect();
    let group_inputs: Vec<String> = groups.iter().map(|g| g[0].info.name.clone()).collect();
    let (fp_caps, fp_next) = match fp_stream {
        Some(fp) => {
            let (caps, out) = capture(&*model, b, name, fp, samples, &group_inputs, true)?;
            (Some(caps), Some(out))
        }
        None => (None, None),
    };
    let local = match model.gradients() {
        Some(g) if run.needs_gradients && imp.source() == GradientSource::BlockLocal => Some(
            block_local_saliency(g, b, name, q_stream, samples, |layer| {
                cfg.scheme_for(name, layer)
            })?,
        ),
        _ => None,
    };
    let scorer: &dyn TokenImportance = if cfg.method().needs_importance() {
        imp.scorer()
    } else {
        &Uniform
    };
    let mut saved = Vec::new();
    for (k, group) in groups.iter().enumerate() {
        let first = &group[0].info;
        let at_group = |sample| in_block(b, name, Some(&first.name), sample);
        let (q_caps, _) = capture(
            &*model,
            b,
            name,
            q_stream,
            samples,
            &group_inputs[k..=k],
            false,
        )?;
        let x = stack_rows(b, name, first, q_caps.iter().map(|c| c[0].as_ref()), &infos)?;
        // Per-block factors come from the block-output gradient; a block
        // whose output has other tokens than its input (a projector that
        // appends the text) uses its group saliency instead.
        let alpha = sample_factors((b, name, &first.name), scorer, &infos, |i| {
            let (maps, index) = match (global, &local) {
                (Some(s), _) => (s, b),
                (None, Some(s)) => (s, 0),
                _ => return None,
            };
            let group = maps.group(index, k, i);
            if imp.per_block() {
                maps.block(index, i)
                    .filter(|s| s.len() == infos[i].len())
                    .or(group)
            } else {
                group
            }
        })?;
        let mut diagnostics = ImportanceDiagnostics::new();
        let mut offset = 0;
        for (i, info) in infos.iter().enumerate() {
            let rows = offset..offset + info.len();
            diagnostics
                .add(
                    x.slice(ndarray::s![rows.clone(), ..]),
                    info,
                    alpha.slice(ndarray::s![rows]),
                )
                .map_err(at_group(Some(i)))?;
            offset += info.len();
        }
        let shares = TraceShares::from_diagnostics(&diagnostics);
        let stats = match &fp_caps {
            Some(fc) => {
                let xf = stack_rows(b, name, first, fc.iter().map(|c| c[k].as_ref()), &infos)?;
                let mut acc = HessianAccumulator::<f32>::with_cross_term(x.ncols());
                acc.add_paired(x.view(), xf.view(), Some(alpha.view()))
                    .map_err(at_group(None))?;
                acc.finish()
            }
            None => {
                let mut acc = HessianAccumulator::<f32>::new(x.ncols());
                acc.add(x.view(), Some(alpha.view()))
                    .map_err(at_group(None))?;
                acc.finish()
            }
        }
        .map_err(at_group(None))?;
        let unweighted = if cfg.method().needs_importance() {
            let a = sample_factors((b, name, &first.name), &Uniform, &infos, |_| None)?;
            let mut acc = HessianAccumulator::<f32>::new(x.ncols());
            acc.add(x.view(), Some(a.view())).map_err(at_group(None))?;
            Some(acc.finish().map_err(at_group(None))?)
        } else {
            None
        };
        let dead_columns = stats.hessian.diag().iter().filter(|&&v| v == 0.0).count();
        let all_dead = dead_columns == stats.hessian.nrows();
        for layer in group {
            let Some(scheme) = layer.scheme else {
                continue;
            };
            let info = &layer.info;
            let at = in_block(b, name, Some(&info.name), None);
            // RTN never reads the Hessian: only the solvers would zero such a layer.
            if all_dead
                && cfg.solver_method().is_some()
                && cfg.dead_layer_fallback() == DeadLayerFallback::Refuse
            {
                return Err(at(Error::DeadLayer {
                    in_features: info.in_features,
                    tokens: stats.tokens,
                }));
            }
            let t0 = Instant::now();
            let (w, qw, deq, damp) =
                solve_one(&*model, b, info, scheme, &stats, cfg, all_dead).map_err(at)?;
            let objective = hessian_objective(w.view(), deq.view(), stats.hessian.view())
                .map_err(in_block(b, name, Some(&info.name), None))?;
            let objective_unweighted = match &unweighted {
                Some(u) => hessian_objective(w.view(), deq.view(), u.hessian.view())
                    .map_err(in_block(b, name, Some(&info.name), None))?,
                None => objective,
            };
            model
                .set_linear_weight(b, &info.name, deq.view())
                .map_err(in_block(b, name, Some(&info.name), None))?;
            let report = LayerReport {
                block: b,
                block_name: name.to_string(),
                layer: info.name.clone(),
                bits: scheme.bits.get(),
                group_size: scheme.group_size.to_gptq(),
                tokens: stats.tokens,
                objective,
                objective_unweighted,
                dead_columns,
                damp_percent: damp,
                seconds: t0.elapsed().as_secs_f64(),
                shares,
            };
            run.layers_done += 1;
            let elapsed = run.start.elapsed();
            let remaining = Duration::from_secs_f64(
                elapsed.as_secs_f64() / run.layers_done as f64
                    * run.layers_total.saturating_sub(run.layers_done) as f64,
            );
            let event = Progress {
                layers_done: run.layers_done,
                layers_total: run.layers_total,
                block: b,
                block_name: name.to_string(),
                layer: info.name.clone(),
                elapsed,
                remaining,
            };
            saved.push((info.name.clone(), qw, report));
            if stop(&event) {
                return Err(Error::Cancelled);
            }
        }
    }
    Ok((saved, fp_next))
}

/// Reads, checks and quantizes one layer: (original, codes, dequantized,
/// damping); with `rtn` (the dead-layer fallback) by round-to-nearest.
fn solve_one<M: QuantizableModel>(
    model: &M,
    b: usize,
    info: &crate::backend::LinearInfo,
    scheme: QuantScheme,
    stats: &LayerStatistics,
    cfg: &PipelineConfig,
    rtn: bool,
) -> Result<(Array2<f32>, QuantizedWeight, Array2<f32>, f64)> {
    let w = model.linear_weight(b, &info.name)?;
    let expected = [info.out_features, info.in_features];
    if w.shape() != expected {
        return Err(Error::shape(
            "weight returned by linear_weight (the block lists [out, in])",
            &expected,
            w.shape(),
        ));
    }
    let solver = GptqConfig {
        scheme,
        ..*cfg.solver()
    };
    let method = if rtn { None } else { cfg.solver_method() };
    let (qw, deq, damp) = match method {
        None => {
            let qw = quantize_rtn(w.view(), &solver.scheme)?;
            let deq = qw.dequantize();
            (qw, deq, 0.0)
        }
        Some(method) => {
            let solver = solver.with_objective(false);
            let sol = solve_layer(w.view(), stats, &solver, method)?;
            (sol.weight, sol.dequantized, sol.report.damp_percent)
        }
    };
    Ok((w, qw, deq, damp))
}
