//! The run itself.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ndarray::{concatenate, Array1, Array2, ArrayView2, Axis};
use rayon::prelude::*;

use super::config::{GradientSource, PipelineConfig};
use super::progress::Progress;
use super::report::{LayerReport, PipelineReport, QuantizedModel, TraceShares};
use super::saliency::{group_index, task_loss_saliency, GroupSink, SaliencyMaps};
use super::state::RunState;
use crate::backend::{GradientModel, LinearInfo, QuantizableModel, RowSink, TokenInfo};
use crate::config::GptqConfig;
use crate::error::{Error, Result};
use crate::hessian::{HessianAccumulator, LayerStatistics};
use crate::importance::{
    GradientSaliency, ImportanceDiagnostics, SampleSignals, TokenImportance, Uniform,
};
use crate::quant::{quantize_rtn, QuantizedWeight};
use crate::solver::{hessian_objective, solve_layer};

/// Quantizes `model` block by block with calibration `samples`.
///
/// `scorer` overrides how VLMQ methods weight tokens (default:
/// [`GradientSaliency`] with the configured power and normalization); any
/// [`TokenImportance`] works, e.g. the pilot-study or per-modality scorers.
/// Gradient-driven scorers see, per token, the root of the summed squared
/// gradients of the layers being quantized (one column), so their power-1 and
/// power-2 saliencies are the gradient norm and its square. Methods without
/// importance ignore `scorer` and weight every valid token 1. `progress` is called after every
/// quantized layer. On success the model holds the dequantized weights and the
/// returned [`QuantizedModel`] holds codes and grids for packing.
///
/// Memory: one block's calibration activations per stream (two streams for
/// GPTAQ), plus, for the task-loss importance pass, one hidden state per
/// block and sample while that pass runs.
pub fn quantize_model<M: QuantizableModel>(
    model: &mut M,
    samples: &[M::Sample],
    cfg: &PipelineConfig,
    scorer: Option<&dyn TokenImportance>,
    progress: &mut dyn FnMut(&Progress),
) -> Result<QuantizedModel> {
    let start = Instant::now();
    cfg.validate()?;
    if samples.is_empty() {
        return Err(Error::Empty {
            what: "calibration set".into(),
        });
    }
    let nb = model.num_blocks();
    let selected: Vec<bool> = (0..nb)
        .map(|b| cfg.blocks.contains(b, &model.block_name(b)))
        .collect();
    let layers_total: usize = (0..nb)
        .filter(|&b| selected[b])
        .map(|b| {
            let name = model.block_name(b);
            model
                .linear_groups(b)
                .iter()
                .flatten()
                .filter(|l| cfg.scheme_for(&name, &l.name).is_some())
                .count()
        })
        .sum();

    let needs_imp = cfg.method.needs_importance();
    let default_scorer = GradientSaliency::new(cfg.importance.power, cfg.importance.normalization);
    let scorer: &dyn TokenImportance = if needs_imp {
        scorer.unwrap_or(&default_scorer)
    } else {
        &Uniform
    };
    let needs_gradients = needs_imp && scorer.needs_gradients();
    if needs_gradients && model.gradients().is_none() {
        return Err(Error::Unsupported {
            what: format!("{} with gradient-driven importance", cfg.method),
            remedy: "implement vlmq::GradientModel for the model and return Some(self) from \
                     QuantizableModel::gradients, or choose a scorer that needs no gradients"
                .into(),
        });
    }

    let mut state = match &cfg.state_dir {
        Some(dir) => Some(RunState::open(dir, model, samples, cfg)?),
        None => None,
    };
    let resume_from = state.as_ref().map_or(0, |s| s.completed_blocks());

    let imp_start = Instant::now();
    let saliency = match model.gradients() {
        Some(g) if needs_gradients && cfg.importance.source == GradientSource::TaskLoss => {
            Some(task_loss_saliency(g, samples)?)
        }
        _ => None,
    };
    let importance_seconds = imp_start.elapsed().as_secs_f64();

    let mut q_stream: Vec<M::Hidden> = samples
        .par_iter()
        .map(|s| model.embed(s))
        .collect::<Result<_>>()?;
    let mut fp_stream = cfg
        .method
        .needs_full_precision_stream()
        .then(|| q_stream.clone());
    let mut layers = Vec::new();
    let mut weights = BTreeMap::new();
    let mut done = 0usize;

    for (b, &is_selected) in selected.iter().enumerate() {
        let block_name = model.block_name(b);
        if b < resume_from {
            if let Some(fp) = fp_stream.as_mut() {
                *fp = forward(&*model, b, fp, samples)?;
            }
            let st = state.as_ref().expect("resuming needs a state");
            let (restored, reports) = st.load_block(b)?;
            for (layer, qw) in restored {
                model.set_linear_weight(b, &layer, qw.dequantize().view())?;
                weights.insert((b, layer), qw);
            }
            done += reports.len();
            layers.extend(reports);
            q_stream = forward(&*model, b, &q_stream, samples)?;
            continue;
        }
        if !is_selected {
            q_stream = forward(&*model, b, &q_stream, samples)?;
            if let Some(fp) = fp_stream.as_mut() {
                *fp = forward(&*model, b, fp, samples)?;
            }
            if let Some(st) = state.as_mut() {
                st.save_block(b, &[])?;
            }
            continue;
        }
        let groups = model.linear_groups(b);
        let infos: Vec<TokenInfo> = samples.iter().map(|s| model.token_info(b, s)).collect();
        let group_inputs: Vec<String> = groups.iter().map(|g| g[0].name.clone()).collect();
        let (fp_caps, fp_next) = match fp_stream.as_ref() {
            Some(fp) => {
                let (caps, out) = capture(&*model, b, fp, samples, &group_inputs, true)?;
                (Some(caps), Some(out))
            }
            None => (None, None),
        };
        let local_saliency = match model.gradients() {
            Some(g) if needs_gradients && cfg.importance.source == GradientSource::BlockLocal => {
                Some(block_local_saliency(g, b, &q_stream, samples, cfg)?)
            }
            _ => None,
        };
        let mut block_layers = Vec::new();
        for (k, group) in groups.iter().enumerate() {
            let (q_caps, _) = capture(&*model, b, &q_stream, samples, &group_inputs[k..=k], false)?;
            let x = stack_rows(b, &group[0], q_caps.iter().map(|c| c[0].as_ref()), &infos)?;
            // Per-block factors come from the block-output gradient; a block
            // whose output has other tokens than its input (a projector that
            // appends the text) uses its group saliency instead.
            let alpha = sample_factors(scorer, &infos, |i| {
                let (maps, index) = match (&saliency, &local_saliency) {
                    (Some(s), _) => (s, b),
                    (None, Some(s)) => (s, 0),
                    _ => return None,
                };
                let group = maps.group(index, k, i);
                if cfg.importance.per_block {
                    maps.block(index, i)
                        .filter(|s| s.len() == infos[i].len())
                        .or(group)
                } else {
                    group
                }
            })?;
            let mut diagnostics = ImportanceDiagnostics::new();
            let mut offset = 0;
            for info in &infos {
                let rows = offset..offset + info.len();
                diagnostics
                    .add(
                        x.slice(ndarray::s![rows.clone(), ..]),
                        info,
                        alpha.slice(ndarray::s![rows]),
                    )
                    .map_err(|e| in_layer(b, &group[0].name, e))?;
                offset += info.len();
            }
            let shares = TraceShares::from_diagnostics(&diagnostics);
            let stats = match &fp_caps {
                Some(fc) => {
                    let xf = stack_rows(b, &group[0], fc.iter().map(|c| c[k].as_ref()), &infos)?;
                    let mut acc = HessianAccumulator::<f32>::with_cross_term(x.ncols());
                    acc.add_paired(x.view(), xf.view(), Some(alpha.view()))?;
                    acc.finish()
                }
                None => {
                    let mut acc = HessianAccumulator::<f32>::new(x.ncols());
                    acc.add(x.view(), Some(alpha.view()))?;
                    acc.finish()
                }
            }
            .map_err(|e| in_layer(b, &group[0].name, e))?;
            let unweighted = if needs_imp {
                let a = sample_factors(&Uniform, &infos, |_| None)?;
                let mut acc = HessianAccumulator::<f32>::new(x.ncols());
                acc.add(x.view(), Some(a.view()))?;
                Some(acc.finish().map_err(|e| in_layer(b, &group[0].name, e))?)
            } else {
                None
            };
            for info in group {
                let Some(scheme) = cfg.scheme_for(&block_name, &info.name) else {
                    continue;
                };
                let t0 = Instant::now();
                let w = model
                    .linear_weight(b, &info.name)
                    .map_err(|e| in_layer(b, &info.name, e))?;
                if w.dim() != (info.out_features, info.in_features) {
                    return Err(Error::Backend {
                        block: b,
                        layer: Some(info.name.clone()),
                        reason: format!(
                            "weight has shape {:?}, the block listed [{}, {}]",
                            w.shape(),
                            info.out_features,
                            info.in_features
                        ),
                    });
                }
                let solver = GptqConfig {
                    scheme,
                    ..cfg.solver
                };
                let (qw, deq, damp) =
                    solve_one(&w, &stats, &solver, cfg).map_err(|e| in_layer(b, &info.name, e))?;
                let objective = hessian_objective(w.view(), deq.view(), stats.hessian.view())?;
                let objective_unweighted = match &unweighted {
                    Some(u) => hessian_objective(w.view(), deq.view(), u.hessian.view())?,
                    None => objective,
                };
                model
                    .set_linear_weight(b, &info.name, deq.view())
                    .map_err(|e| in_layer(b, &info.name, e))?;
                let report = LayerReport {
                    block: b,
                    block_name: block_name.clone(),
                    layer: info.name.clone(),
                    bits: scheme.bits.get(),
                    group_size: scheme.group_size.to_gptq(),
                    tokens: stats.tokens,
                    objective,
                    objective_unweighted,
                    damp_percent: damp,
                    seconds: t0.elapsed().as_secs_f64(),
                    shares,
                };
                done += 1;
                let elapsed = start.elapsed();
                let remaining = Duration::from_secs_f64(
                    elapsed.as_secs_f64() / done as f64 * layers_total.saturating_sub(done) as f64,
                );
                progress(&Progress {
                    layers_done: done,
                    layers_total,
                    block: b,
                    block_name: block_name.clone(),
                    layer: info.name.clone(),
                    elapsed,
                    remaining,
                });
                block_layers.push((info.name.clone(), qw, report));
            }
        }
        q_stream = forward(&*model, b, &q_stream, samples)?;
        if let Some(next) = fp_next {
            fp_stream = Some(next);
        }
        if let Some(st) = state.as_mut() {
            st.save_block(b, &block_layers)?;
        }
        for (layer, qw, report) in block_layers {
            weights.insert((b, layer), qw);
            layers.push(report);
        }
    }
    Ok(QuantizedModel {
        report: PipelineReport {
            method: cfg.method,
            layers,
            importance_seconds,
            total_seconds: start.elapsed().as_secs_f64(),
            resumed_blocks: resume_from,
        },
        weights,
    })
}

fn solve_one(
    w: &Array2<f32>,
    stats: &LayerStatistics,
    solver: &GptqConfig,
    cfg: &PipelineConfig,
) -> Result<(QuantizedWeight, Array2<f32>, f64)> {
    match cfg.method.solver_method(cfg.gptaq_strength) {
        None => {
            let qw = quantize_rtn(w.view(), &solver.scheme)?;
            let deq = qw.dequantize();
            Ok((qw, deq, 0.0))
        }
        Some(method) => {
            let solver = solver.with_objective(false);
            let sol = solve_layer(w.view(), stats, &solver, method)?;
            Ok((sol.weight, sol.dequantized, sol.report.damp_percent))
        }
    }
}

/// Attaches block and layer to an error that lacks them.
fn in_layer(block: usize, layer: &str, e: Error) -> Error {
    match e {
        Error::Backend { .. } => e,
        other => Error::Backend {
            block,
            layer: Some(layer.to_string()),
            reason: other.to_string(),
        },
    }
}

/// Runs one block on every sample (in parallel, results in sample order).
fn forward<M: QuantizableModel>(
    model: &M,
    b: usize,
    inputs: &[M::Hidden],
    samples: &[M::Sample],
) -> Result<Vec<M::Hidden>> {
    inputs
        .par_iter()
        .zip(samples.par_iter())
        .map(|(h, s)| model.block_forward(b, h, s, None))
        .collect()
}

/// Captures the input rows of the named layers while running one block.
struct Capture<'a> {
    names: &'a [String],
    rows: Vec<Option<Array2<f32>>>,
}

impl RowSink for Capture<'_> {
    fn rows(&mut self, layer: &str, rows: ArrayView2<'_, f32>) {
        if let Some(i) = self.names.iter().position(|n| n == layer) {
            self.rows[i] = Some(rows.to_owned());
        }
    }
}

type Captured<H> = (Vec<Vec<Option<Array2<f32>>>>, Vec<H>);

fn capture<M: QuantizableModel>(
    model: &M,
    b: usize,
    inputs: &[M::Hidden],
    samples: &[M::Sample],
    names: &[String],
    keep_output: bool,
) -> Result<Captured<M::Hidden>> {
    type PerSample<H> = (Vec<Option<Array2<f32>>>, Option<H>);
    let per_sample: Vec<PerSample<M::Hidden>> = inputs
        .par_iter()
        .zip(samples.par_iter())
        .map(|(h, s)| {
            let mut sink = Capture {
                names,
                rows: vec![None; names.len()],
            };
            let out = model.block_forward(b, h, s, Some(&mut sink))?;
            Ok((sink.rows, keep_output.then_some(out)))
        })
        .collect::<Result<_>>()?;
    let mut caps = Vec::with_capacity(per_sample.len());
    let mut outs = Vec::with_capacity(per_sample.len());
    for (c, o) in per_sample {
        caps.push(c);
        if let Some(o) = o {
            outs.push(o);
        }
    }
    Ok((caps, outs))
}

/// Stacks one layer's captured rows of every sample, checking them.
fn stack_rows<'a>(
    b: usize,
    layer: &LinearInfo,
    caps: impl Iterator<Item = Option<&'a Array2<f32>>>,
    infos: &[TokenInfo],
) -> Result<Array2<f32>> {
    let fail = |reason: String| Error::Backend {
        block: b,
        layer: Some(layer.name.clone()),
        reason,
    };
    let mut views = Vec::with_capacity(infos.len());
    for (i, (c, info)) in caps.zip(infos).enumerate() {
        let c = c.ok_or_else(|| {
            fail(format!(
                "sample {i}: the block never showed this layer's input"
            ))
        })?;
        if c.ncols() != layer.in_features {
            return Err(fail(format!(
                "sample {i}: input has {} features, the layer takes {}",
                c.ncols(),
                layer.in_features
            )));
        }
        if c.nrows() != info.len() || info.valid.len() != info.len() {
            return Err(fail(format!(
                "sample {i}: {} input rows but token info describes {} tokens",
                c.nrows(),
                info.len()
            )));
        }
        if let Some(pos) = c.iter().position(|v| !v.is_finite()) {
            return Err(fail(format!(
                "sample {i}: non-finite activation at token {}, feature {}",
                pos / c.ncols(),
                pos % c.ncols()
            )));
        }
        views.push(c.view());
    }
    concatenate(Axis(0), &views).map_err(|e| fail(e.to_string()))
}

/// Concatenated factors of every sample, checked. `saliency(i)` is sample
/// `i`'s per-token sum of squared gradients, when there is one.
fn sample_factors<'s>(
    scorer: &dyn TokenImportance,
    infos: &[TokenInfo],
    saliency: impl Fn(usize) -> Option<ndarray::ArrayView1<'s, f32>>,
) -> Result<Array1<f32>> {
    let mut all = Vec::new();
    for (i, info) in infos.iter().enumerate() {
        let norms = scorer.needs_gradients().then(|| match saliency(i) {
            Some(s) => s.mapv(f32::sqrt).insert_axis(Axis(1)),
            None => Array2::zeros((info.len(), 1)),
        });
        let views: Vec<ArrayView2<'_, f32>> = norms.iter().map(|n| n.view()).collect();
        let signals = SampleSignals::new(info, i as u64).with_gradients(&views);
        let f = scorer.factors(&signals)?;
        if f.len() != info.len() {
            return Err(Error::shape(
                format!("importance factors of sample {i}"),
                &[info.len()],
                &[f.len()],
            ));
        }
        all.extend(f.iter().copied());
    }
    Ok(Array1::from(all))
}

/// The block-local source for one block: saliency from the gradients of
/// `1/2 ||B~(x) - B(x)||^2` with the block's weights rounded to nearest.
fn block_local_saliency<M: GradientModel + ?Sized>(
    model: &M,
    b: usize,
    inputs: &[M::Hidden],
    samples: &[M::Sample],
    cfg: &PipelineConfig,
) -> Result<SaliencyMaps> {
    let block_name = model.block_name(b);
    let group_of = group_index(model, b);
    let n_groups = model.linear_groups(b).len();
    let perturb = |layer: &str, w: ArrayView2<'_, f32>| -> Result<Array2<f32>> {
        match cfg.scheme_for(&block_name, layer) {
            Some(scheme) => Ok(quantize_rtn(w, &scheme)?.dequantize()),
            None => Ok(w.to_owned()),
        }
    };
    let per_sample: Vec<Vec<Option<Array1<f32>>>> = inputs
        .par_iter()
        .zip(samples.par_iter())
        .map(|(h, s)| {
            let mut sink = GroupSink::new(&group_of, n_groups);
            model.block_local_backward(b, h, s, &perturb, &mut sink)?;
            sink.finish(b)
        })
        .collect::<Result<_>>()?;
    let mut groups = vec![Vec::with_capacity(samples.len()); n_groups];
    for s in per_sample {
        for (k, v) in s.into_iter().enumerate() {
            groups[k].push(v);
        }
    }
    // Per-block factors from the block-local loss: sum over the block's groups.
    let blocks = (0..samples.len())
        .map(|i| {
            groups.iter().filter_map(|g| g[i].clone()).reduce(|a, b| {
                if a.len() == b.len() {
                    a + b
                } else {
                    a
                }
            })
        })
        .collect();
    Ok(SaliencyMaps::single_block(groups, blocks))
}
