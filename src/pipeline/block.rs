//! Quantizing one selected block: stream its groups' inputs into the
//! accumulators chunk by chunk, then solve each layer.

use std::ops::Range;
use std::time::{Duration, Instant};

use ndarray::Array2;

use super::capture::{capture, check_rows, sample_chunks, sample_factors};
use super::config::{DeadLayerFallback, GradientSource, PipelineConfig};
use super::context::in_block;
use super::plan::PlannedLayer;
use super::progress::Progress;
use super::report::{LayerReport, TraceShares};
use super::saliency::{block_local_saliency, SaliencyMaps};
use crate::backend::{LinearInfo, QuantizableModel, TokenInfo};
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

/// The block being quantized: where it is and what feeds it.
struct BlockInputs<'a, M: QuantizableModel> {
    b: usize,
    name: &'a str,
    q_stream: &'a [M::Hidden],
    fp_stream: Option<&'a [M::Hidden]>,
    infos: Vec<TokenInfo>,
    /// Per-token squared gradient norms: the run-wide maps (index = block)
    /// or this block's block-local maps (index 0).
    saliency: Option<(&'a SaliencyMaps, usize)>,
}

/// A capture pass's statistics (one per group) and, when kept, the block's
/// full-precision output.
type PassResult<H> = (Vec<GroupStatistics>, Option<Vec<H>>);

/// One input group's statistics after a capture pass.
struct GroupStatistics {
    weighted: LayerStatistics,
    unweighted: Option<LayerStatistics>,
    shares: TraceShares,
}

/// Layers already quantized in this block, with their original weights:
/// GPTAQ's full-precision captures run with the originals put back.
#[derive(Default)]
struct Swapped {
    layers: Vec<(String, Array2<f32>, Array2<f32>)>,
}

impl Swapped {
    fn set<M: QuantizableModel>(&self, model: &mut M, b: usize, original: bool) -> Result<()> {
        for (layer, w, deq) in &self.layers {
            let v = if original { w } else { deq };
            model.set_linear_weight(b, layer, v.view())?;
        }
        Ok(())
    }
}

/// Quantizes the layers of block `b`: with true-sequential capture, one
/// capture pass per input group, each after the previous groups were
/// quantized; otherwise one pass for every group. Returns the layers and,
/// for GPTAQ methods, the block's full-precision output.
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
    for pass in passes {
        let first_pass = pass.start == 0;
        let stats: Vec<Option<GroupStatistics>> = if capture {
            let (stats, fp_out) = capture_pass(
                run,
                model,
                &inputs,
                groups,
                pass.clone(),
                &swapped,
                first_pass,
            )?;
            if first_pass {
                fp_next = fp_out;
            }
            stats.into_iter().map(Some).collect()
        } else {
            pass.clone().map(|_| None).collect()
        };
        for (k, st) in pass.zip(stats) {
            for layer in &groups[k] {
                let Some(scheme) = layer.scheme else {
                    continue;
                };
                let (qw, report, original, deq) =
                    quantize_layer(model, b, name, &layer.info, scheme, st.as_ref(), cfg)?;
                if fp_stream.is_some() && cfg.true_sequential() {
                    swapped
                        .layers
                        .push((layer.info.name.clone(), original, deq));
                }
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
                    layer: layer.info.name.clone(),
                    elapsed,
                    remaining,
                };
                saved.push((layer.info.name.clone(), qw, report));
                if stop(&event) {
                    return Err(Error::Cancelled);
                }
            }
        }
    }
    Ok((saved, fp_next))
}

/// One capture pass over the samples for the groups `pass`, chunk by chunk
/// (a chunk holds at most the configured number of tokens, or one sample):
/// each chunk's rows go straight into the groups' accumulators, one sample
/// at a time in sample order, so the sums do not depend on the chunking or
/// the thread count. With a full-precision stream, the chunk also runs
/// through the block's original weights and, in the first pass, keeps the
/// block's full-precision output.
fn capture_pass<M: QuantizableModel>(
    run: &BlockRun<'_, M::Sample>,
    model: &mut M,
    inputs: &BlockInputs<'_, M>,
    groups: &[Vec<PlannedLayer>],
    pass: Range<usize>,
    swapped: &Swapped,
    keep_fp_output: bool,
) -> Result<PassResult<M::Hidden>> {
    let (b, name, samples, cfg) = (inputs.b, inputs.name, run.samples, run.cfg);
    let firsts: Vec<&LinearInfo> = groups[pass.clone()].iter().map(|g| &g[0].info).collect();
    let names: Vec<String> = firsts.iter().map(|l| l.name.clone()).collect();
    let paired = inputs.fp_stream.is_some();
    let unweighted = cfg.layer_objectives() && cfg.method().needs_importance();
    let new_acc = |n: usize| {
        if paired {
            HessianAccumulator::<f32>::with_cross_term(n)
        } else {
            HessianAccumulator::<f32>::new(n)
        }
    };
    let mut weighted: Vec<_> = firsts.iter().map(|l| new_acc(l.in_features)).collect();
    let mut plain: Vec<Option<HessianAccumulator<f32>>> = firsts
        .iter()
        .map(|l| unweighted.then(|| HessianAccumulator::<f32>::new(l.in_features)))
        .collect();
    let mut diagnostics = vec![ImportanceDiagnostics::new(); firsts.len()];
    let mut fp_out = (keep_fp_output && paired).then(Vec::new);
    let scorer: &dyn TokenImportance = if cfg.method().needs_importance() {
        cfg.importance().scorer()
    } else {
        &Uniform
    };
    for chunk in sample_chunks(&inputs.infos, cfg.capture_tokens()) {
        let fp_caps = match inputs.fp_stream {
            Some(fp) => {
                swapped
                    .set(model, b, true)
                    .map_err(in_block(b, name, None, None))?;
                let caps = capture(
                    &*model,
                    b,
                    name,
                    &fp[chunk.clone()],
                    &samples[chunk.clone()],
                    &names,
                    fp_out.is_some(),
                );
                swapped
                    .set(model, b, false)
                    .map_err(in_block(b, name, None, None))?;
                let (caps, outs) = caps?;
                if let Some(all) = fp_out.as_mut() {
                    all.extend(outs);
                }
                Some(caps)
            }
            None => None,
        };
        let (q_caps, _) = capture(
            &*model,
            b,
            name,
            &inputs.q_stream[chunk.clone()],
            &samples[chunk.clone()],
            &names,
            false,
        )?;
        for (j, i) in chunk.enumerate() {
            let info = &inputs.infos[i];
            for (g, layer) in firsts.iter().enumerate() {
                let at = || in_block(b, name, Some(&layer.name), Some(i));
                let x = check_rows(b, layer, q_caps[j][g].as_ref(), info).map_err(at())?;
                let alpha = sample_factors(
                    scorer,
                    info,
                    i,
                    saliency_of(inputs, pass.start + g, i, info, cfg),
                )
                .map_err(at())?;
                diagnostics[g].add(x, info, alpha.view()).map_err(at())?;
                match &fp_caps {
                    Some(fc) => {
                        let xf = check_rows(b, layer, fc[j][g].as_ref(), info).map_err(at())?;
                        weighted[g].add_paired(x, xf, Some(alpha.view()))
                    }
                    None => weighted[g].add(x, Some(alpha.view())),
                }
                .map_err(at())?;
                if let Some(acc) = plain[g].as_mut() {
                    let ones = sample_factors(&Uniform, info, i, None).map_err(at())?;
                    acc.add(x, Some(ones.view())).map_err(at())?;
                }
            }
        }
    }
    let stats = firsts
        .iter()
        .zip(weighted.iter().zip(plain.iter().zip(&diagnostics)))
        .map(|(layer, (w, (p, d)))| {
            let at = || in_block(b, name, Some(&layer.name), None);
            Ok(GroupStatistics {
                weighted: w.finish().map_err(at())?,
                unweighted: p.as_ref().map(|p| p.finish()).transpose().map_err(at())?,
                shares: TraceShares::from_diagnostics(d),
            })
        })
        .collect::<Result<_>>()?;
    Ok((stats, fp_out))
}

/// Sample `i`'s per-token squared gradient norms for group `k`, when the
/// run has some (per block when configured and the token counts agree).
fn saliency_of<'a, M: QuantizableModel>(
    inputs: &'a BlockInputs<'_, M>,
    k: usize,
    i: usize,
    info: &TokenInfo,
    cfg: &PipelineConfig,
) -> Option<ndarray::ArrayView1<'a, f32>> {
    let (maps, index) = inputs.saliency?;
    let group = maps.group(index, k, i);
    if cfg.importance().per_block() {
        // A block whose output has other tokens than its input (a projector
        // that appends the text) uses its group saliency instead.
        maps.block(index, i)
            .filter(|s| s.len() == info.len())
            .or(group)
    } else {
        group
    }
}

/// Solves one layer on its group's statistics (none for RTN without
/// objectives), installs the dequantized weight and reports it: (codes,
/// report, original weight, dequantized).
fn quantize_layer<M: QuantizableModel>(
    model: &mut M,
    b: usize,
    name: &str,
    info: &LinearInfo,
    scheme: QuantScheme,
    st: Option<&GroupStatistics>,
    cfg: &PipelineConfig,
) -> Result<(QuantizedWeight, LayerReport, Array2<f32>, Array2<f32>)> {
    let at = || in_block(b, name, Some(&info.name), None);
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
            tokens: st.map_or(0, |s| s.weighted.tokens),
        }));
    }
    let t0 = Instant::now();
    let stats = st.map(|s| &s.weighted).filter(|_| !all_dead);
    let (w, qw, deq, damp) = solve_one(&*model, b, info, scheme, stats, cfg).map_err(at())?;
    let (objective, objective_unweighted) = match st {
        Some(st) if cfg.layer_objectives() => {
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
    let report = LayerReport {
        block: b,
        block_name: name.to_string(),
        layer: info.name.clone(),
        bits: scheme.bits.get(),
        group_size: scheme.group_size.to_gptq(),
        tokens: st.map_or(0, |s| s.weighted.tokens),
        objective,
        objective_unweighted,
        dead_columns,
        damp_percent: damp,
        seconds: t0.elapsed().as_secs_f64(),
        shares: st.map(|s| s.shares).unwrap_or_default(),
    };
    Ok((qw, report, w, deq))
}

/// Reads, checks and quantizes one layer: (original, codes, dequantized,
/// damping). The solver methods use `stats`; without them (RTN, or the
/// dead-layer fallback) the layer is rounded to nearest.
fn solve_one<M: QuantizableModel>(
    model: &M,
    b: usize,
    info: &LinearInfo,
    scheme: QuantScheme,
    stats: Option<&LayerStatistics>,
    cfg: &PipelineConfig,
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
    let (qw, deq, damp) = match (cfg.solver_method(), stats) {
        (Some(method), Some(stats)) => {
            let solver = solver.with_objective(false);
            let sol = solve_layer(w.view(), stats, &solver, method)?;
            (sol.weight, sol.dequantized, sol.report.damp_percent)
        }
        _ => {
            let qw = quantize_rtn(w.view(), &solver.scheme)?;
            let deq = qw.dequantize();
            (qw, deq, 0.0)
        }
    };
    Ok((w, qw, deq, damp))
}
