//! Quantizing one selected block: stream its groups' inputs into the
//! accumulators chunk by chunk, then solve each layer.

use std::ops::Range;
use std::time::Instant;

use ndarray::Array2;

use super::config::{DeadLayerFallback, GradientSource, PipelineConfig};
use super::context::in_block;
use super::gguf::{solve_gguf, LayerCodes};
use super::pass::{capture_pass, BlockInputs, GroupStatistics, PassRun, Swapped};
use super::plan::PlannedLayer;
use super::progress::{Progress, Stage};
use super::report::LayerReport;
use super::saliency::{block_local_saliency, SaliencyMaps};
use super::stages::{finish_stages, StageCarries};
use super::weight_check::{left_in_place, WeightPrint};
use crate::backend::{LinearInfo, QuantizableModel};
use crate::config::QuantScheme;
use crate::error::{Error, Result};
use crate::hessian::LayerStatistics;
use crate::quant::quantize_rtn;
use crate::solver::{hessian_objective, solve_layer, solve_layer_owned};

/// One quantized layer: name, codes and grids (or GGUF blocks), report.
pub(crate) type SavedLayer = (String, LayerCodes, LayerReport);

/// A quantized block: its layers, its full-precision output (GPTAQ
/// methods) and, when the staged forward computed it, its output with the
/// quantized weights (the next block's input).
pub(crate) struct BlockResult<H> {
    pub(crate) layers: Vec<SavedLayer>,
    pub(crate) fp_next: Option<Vec<H>>,
    pub(crate) q_next: Option<Vec<H>>,
}

/// What every block of a run shares.
pub(crate) struct BlockRun<'a, S> {
    pub(crate) samples: &'a [S],
    pub(crate) cfg: &'a PipelineConfig,
    pub(crate) layers_total: usize,
    pub(crate) layers_done: usize,
    pub(crate) start: Instant,
    pub(crate) needs_gradients: bool,
}

/// Quantizes the layers of block `b`: with true-sequential capture, one
/// stage of the backend's staged forward per input group, each after the
/// previous groups were quantized, then the last stage gives the block's
/// outputs; otherwise one forward pass captures every group. Returns the
/// layers and, for GPTAQ methods, the block's full-precision output.
///
/// While a true-sequential block runs, every sample's stage carry (one per
/// stream) stays resident between the stages, through the group's solve.
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
    let local = match model.gradients() {
        Some(g) if run.needs_gradients && imp.source() == GradientSource::BlockLocal => Some(
            block_local_saliency(g, b, name, q_stream, samples, |layer| {
                cfg.scheme_for(name, layer)
            })?,
        ),
        _ => None,
    };
    let inputs = BlockInputs::<M> {
        b,
        name,
        q_stream,
        fp_stream,
        infos: samples.iter().map(|s| model.token_info(b, s)).collect(),
        saliency: match (global, &local) {
            (Some(s), _) => Some((s, b)),
            (None, Some(s)) => Some((s, 0)),
            _ => None,
        },
    };
    let passes: Vec<Range<usize>> = if cfg.true_sequential() {
        (0..groups.len()).map(|k| k..k + 1).collect()
    } else {
        std::iter::once(0..groups.len()).collect()
    };
    let mut swapped = Swapped::default();
    let mut fp_next = None;
    let mut saved = Vec::new();
    // RTN needs no calibration statistics unless objectives are asked for.
    let capture = cfg.solver_method().is_some() || cfg.layer_objectives();
    let mut carries = (capture && cfg.true_sequential())
        .then(|| StageCarries::new(samples.len(), fp_stream.is_some()));
    for pass in passes {
        let first_pass = pass.start == 0;
        let stats: Vec<Option<GroupStatistics>> = if capture {
            let how = match carries.as_mut() {
                Some(c) => PassRun::Stage(c),
                None => PassRun::Forward {
                    keep_fp_output: first_pass,
                },
            };
            let (stats, fp_out) =
                capture_pass(run, model, &inputs, groups, pass.clone(), &swapped, how)?;
            // Only later stages run from here on; without a full-precision
            // stream no earlier group's weight is put back either.
            if carries.is_some() && fp_stream.is_none() {
                model
                    .stage_finished(b, pass.start)
                    .map_err(in_block(b, name, None, None))?;
            }
            if fp_out.is_some() {
                fp_next = fp_out;
            }
            stats.into_iter().map(Some).collect()
        } else {
            pass.clone().map(|_| None).collect()
        };
        for (k, mut st) in pass.zip(stats) {
            // The group's last quantized layer owns its statistics (unless
            // objectives need the Hessian afterwards): its solve frees the
            // Hessian once factored instead of keeping it beside the factor.
            let last = groups[k].iter().rposition(|l| l.scheme.is_some());
            for (i, layer) in groups[k].iter().enumerate() {
                let Some(scheme) = layer.scheme else {
                    continue;
                };
                let stats = match st.take() {
                    Some(s) if Some(i) == last && !cfg.layer_objectives() => {
                        Stats::Owned(Box::new(s))
                    }
                    taken => {
                        st = taken;
                        Stats::Shared(st.as_ref())
                    }
                };
                // GPTAQ's full-precision captures put the original back.
                let swap = fp_stream.is_some() && cfg.true_sequential();
                let (qw, report, original, deq) =
                    quantize_layer(model, b, name, &layer.info, scheme, stats, cfg, swap)?;
                // What the layer's solve freed goes back to the system
                // before the next layer allocates (docs/PERFORMANCE.md).
                super::trim::return_free_pages();
                if let Some(original) = original.filter(|_| swap) {
                    swapped
                        .layers
                        .push((layer.info.name.clone(), original, deq));
                }
                run.layers_done += 1;
                let elapsed = run.start.elapsed();
                let event = Progress {
                    stage: Stage::Quantize,
                    done: run.layers_done,
                    total: run.layers_total,
                    layers_done: run.layers_done,
                    layers_total: run.layers_total,
                    block: b,
                    block_name: name.to_string(),
                    layer: layer.info.name.clone(),
                    elapsed,
                    remaining: Progress::estimate(elapsed, run.layers_done, run.layers_total),
                };
                saved.push((layer.info.name.clone(), qw, report));
                if stop(&event) {
                    return Err(Error::Cancelled);
                }
            }
        }
    }
    let mut q_next = None;
    if let Some(StageCarries { q, fp }) = carries {
        if let (Some(fp), Some(fp_in)) = (fp, fp_stream) {
            swapped
                .set(model, b, true)
                .map_err(in_block(b, name, None, None))?;
            let out = finish_stages(&*model, b, name, groups.len(), fp_in, samples, fp);
            swapped
                .set(model, b, false)
                .map_err(in_block(b, name, None, None))?;
            fp_next = Some(out?);
        }
        q_next = Some(finish_stages(
            &*model,
            b,
            name,
            groups.len(),
            q_stream,
            samples,
            q,
        )?);
    }
    Ok(BlockResult {
        layers: saved,
        fp_next,
        q_next,
    })
}

/// A layer's view of its group's statistics: shared with the group's other
/// layers, or handed over to the group's last one.
enum Stats<'a> {
    Shared(Option<&'a GroupStatistics>),
    Owned(Box<GroupStatistics>),
}

/// Solves one layer on its group's statistics (none for RTN without
/// objectives), installs the dequantized weight and reports it: (codes,
/// report, original weight when `keep_original` or objectives need it,
/// dequantized).
#[allow(clippy::too_many_arguments)]
fn quantize_layer<M: QuantizableModel>(
    model: &mut M,
    b: usize,
    name: &str,
    info: &LinearInfo,
    scheme: QuantScheme,
    stats: Stats<'_>,
    cfg: &PipelineConfig,
    keep_original: bool,
) -> Result<QuantizedLayer> {
    let at = || in_block(b, name, Some(&info.name), None);
    let (shared, owned) = match stats {
        Stats::Shared(s) => (s, None),
        Stats::Owned(s) => (None, Some(*s)),
    };
    let st = shared.or(owned.as_ref());
    let tokens = st.map_or(0, |s| s.weighted.tokens);
    let shares = st.map(|s| s.shares).unwrap_or_default();
    let dead_columns = st.map(|s| {
        s.weighted
            .hessian
            .diag()
            .iter()
            .filter(|&&v| v == 0.0)
            .count()
    });
    let all_dead = dead_columns == Some(info.in_features);
    // RTN never reads the Hessian: only the solvers would zero such a layer.
    if all_dead
        && cfg.solver_method().is_some()
        && cfg.dead_layer_fallback() == DeadLayerFallback::Refuse
    {
        return Err(at()(Error::DeadLayer {
            in_features: info.in_features,
            tokens,
        }));
    }
    let t0 = Instant::now();
    let layer_stats = match owned {
        Some(s) if !all_dead => Some(LayerStats::Owned(s.weighted)),
        Some(_) => None,
        None => shared
            .map(|s| &s.weighted)
            .filter(|_| !all_dead)
            .map(LayerStats::Shared),
    };
    let keep = keep_original || cfg.layer_objectives();
    let (original, print, qw, deq, damp) =
        solve_one(model, b, info, scheme, layer_stats, cfg, keep).map_err(at())?;
    crate::kill_point::reached("solve");
    // With objectives asked for, the statistics are never handed over and
    // the original weight is kept.
    let (objective, objective_unweighted) = match (shared, original.as_ref()) {
        (Some(st), Some(w)) if cfg.layer_objectives() => {
            let o =
                hessian_objective(w.view(), deq.view(), st.weighted.hessian.view()).map_err(at())?;
            let u = match &st.unweighted {
                Some(u) => {
                    hessian_objective(w.view(), deq.view(), u.hessian.view()).map_err(at())?
                }
                None => o,
            };
            (Some(o), Some(u))
        }
        _ => (None, None),
    };
    model
        .set_linear_weight(b, &info.name, deq.view())
        .map_err(at())?;
    // Read the weight back: it must have moved off the original
    // (`weight_check`).
    let read_back = model.linear_weight(b, &info.name).map_err(at())?;
    if left_in_place(print, deq.view(), read_back.view()) {
        return Err(Error::Backend {
            block: b,
            layer: Some(info.name.clone()),
            reason: "set_linear_weight left the original weight in place: linear_weight \
                     still returns it after the quantized weight was set"
                .into(),
        });
    }
    // A GGUF layer reports its type's code width and scale group.
    let (bits, group_size) = match &qw {
        LayerCodes::Gptq(_) => (scheme.bits().get(), scheme.group_size().to_gptq()),
        LayerCodes::Gguf(sol) => (u32::from(sol.ty.code_bits()), sol.ty.group_cols() as i64),
    };
    let report = LayerReport {
        block: b,
        block_name: name.to_string(),
        layer: info.name.clone(),
        bits,
        group_size,
        tokens,
        objective,
        objective_unweighted,
        dead_columns,
        damp_percent: damp,
        seconds: t0.elapsed().as_secs_f64(),
        shares,
    };
    Ok((qw, report, original, deq))
}

/// What [`quantize_layer`] gives: the codes, the report, the original
/// weight (when kept) and the dequantized weight.
type QuantizedLayer = (LayerCodes, LayerReport, Option<Array2<f32>>, Array2<f32>);

/// What [`solve_one`] gives: the original weight (when kept) and its
/// print, the codes, the dequantized weight, the damping.
type Solved = (
    Option<Array2<f32>>,
    WeightPrint,
    LayerCodes,
    Array2<f32>,
    f64,
);

/// Reads, checks and quantizes one layer. The solver methods use `stats`;
/// without them (RTN, or the dead-layer fallback) the layer is rounded to
/// nearest. With a GGUF type configured the layer goes onto that type's
/// blocks. Unless `keep_original`, the weight is taken from the model
/// ([`QuantizableModel::take_linear_weight`]), the solve of statistics
/// handed over works in its memory, and the original is not returned.
fn solve_one<M: QuantizableModel>(
    model: &mut M,
    b: usize,
    info: &LinearInfo,
    scheme: QuantScheme,
    stats: Option<LayerStats<'_>>,
    cfg: &PipelineConfig,
    keep_original: bool,
) -> Result<Solved> {
    let w = if keep_original {
        model.linear_weight(b, &info.name)?
    } else {
        model.take_linear_weight(b, &info.name)?
    };
    let expected = [info.out_features, info.in_features];
    if w.shape() != expected {
        return Err(Error::shape(
            "weight returned by linear_weight (the block lists [out, in])",
            &expected,
            w.shape(),
        ));
    }
    let print = WeightPrint::of(w.view());
    let solver = cfg.solver().with_scheme(scheme);
    if let Some(ty) = cfg.gguf_type() {
        let solver = solver.with_objective(false);
        let stats = stats.as_ref().map(LayerStats::get);
        let sol = solve_gguf(w.view(), stats, &solver, cfg.solver_method(), ty)?;
        let damp = if stats.is_some() && cfg.solver_method().is_some() {
            sol.report.damp_percent
        } else {
            0.0
        };
        let deq = sol.dequantized.clone();
        let original = keep_original.then_some(w);
        return Ok((original, print, LayerCodes::Gguf(sol), deq, damp));
    }
    let (original, qw, deq, damp) = match (cfg.solver_method(), stats) {
        (Some(method), Some(stats)) => {
            let solver = solver.with_objective(false);
            let (original, sol) = match stats {
                LayerStats::Shared(s) => {
                    let sol = solve_layer(w.view(), s, &solver, method)?;
                    (keep_original.then_some(w), sol)
                }
                LayerStats::Owned(s) if keep_original => {
                    let sol = solve_layer_owned(w.clone(), s, &solver, method)?;
                    (Some(w), sol)
                }
                LayerStats::Owned(s) => (None, solve_layer_owned(w, s, &solver, method)?),
            };
            (
                original,
                sol.weight,
                sol.dequantized,
                sol.report.damp_percent,
            )
        }
        _ => {
            let qw = quantize_rtn(w.view(), &solver.scheme())?;
            let deq = qw.dequantize();
            (keep_original.then_some(w), qw, deq, 0.0)
        }
    };
    Ok((original, print, LayerCodes::Gptq(qw), deq, damp))
}

/// One layer's statistics, borrowed or owned (then freed by the solve).
enum LayerStats<'a> {
    Shared(&'a LayerStatistics),
    Owned(LayerStatistics),
}

impl LayerStats<'_> {
    fn get(&self) -> &LayerStatistics {
        match self {
            LayerStats::Shared(s) => s,
            LayerStats::Owned(s) => s,
        }
    }
}
