//! The run itself: checks, importance pass, then block by block.

use std::collections::BTreeMap;
use std::time::Instant;

use rayon::prelude::*;

use super::block::{quantize_block, BlockRun, SavedLayer};
use super::config::{GradientSource, PipelineConfig};
use super::context::{in_block, in_sample};
use super::cpu_time::{available_cores, CpuClock};
use super::gguf::{check_gguf_run, LayerCodes};
use super::plan::RunPlan;
use super::progress::{Progress, ProgressControl};
use super::report::{PipelineOutput, PipelineReport};
use super::sink::{BlockSink, FinishedBlock};
use super::state::RunState;
use super::task_loss::{task_loss_saliency, ImportanceProgress};
use crate::backend::QuantizableModel;
use crate::error::{Error, Result};

/// Quantizes `model` block by block with calibration `samples`.
///
/// Everything that can be checked before any work is: the configuration
/// against the model (block indices and prefixes, override keys, each
/// layer's grid), the calibration set (not empty) and, for VLMQ with a
/// gradient-driven scorer, that the model implements
/// [`GradientModel`](crate::GradientModel) (see
/// [`QuantizableModel::gradients`]).
///
/// `progress` is called after every step of the task-loss importance pass
/// ([`Stage::Importance`](super::Stage::Importance): one block's forward or
/// backward over one chunk of samples) and after every quantized layer
/// ([`Stage::Quantize`](super::Stage::Quantize)); it returns `()` or a
/// [`ControlFlow`](std::ops::ControlFlow), and `Break(())` stops the run with
/// [`Error::Cancelled`]. With a state directory, every block finished before
/// the cancellation is saved, and a rerun with the original (unquantized)
/// model, the same samples and the same configuration resumes after it and
/// gives bit-identical weights.
///
/// Errors from inside the model, the importance scorer and the solver come
/// back wrapped in [`Error::InBlock`] (block, layer and sample where known);
/// [`Error::root`] reaches the original variant.
///
/// On success the model holds the dequantized weights and the returned
/// [`PipelineOutput`] holds codes and grids for packing. After an error the
/// model may hold some quantized layers.
///
/// Memory: the block streams (one hidden state per sample, two for GPTAQ),
/// the accumulators of the groups being captured, and the layer inputs of at
/// most [`PipelineConfig::capture_tokens`] tokens at once; the task-loss
/// importance pass holds at most [`PipelineConfig::importance_memory`] bytes
/// of hidden states (or one sample's) over all blocks together while it
/// runs.
pub fn quantize_model<M, C>(
    model: &mut M,
    samples: &[M::Sample],
    cfg: &PipelineConfig,
    progress: impl FnMut(&Progress) -> C,
) -> Result<PipelineOutput>
where
    M: QuantizableModel,
    C: ProgressControl,
{
    let mut weights = BTreeMap::new();
    let mut gguf = BTreeMap::new();
    let mut keep = |block: FinishedBlock| -> Result<()> {
        for (layer, qw) in block.layers {
            weights.insert((block.index, layer), qw);
        }
        for (layer, sol) in block.gguf {
            gguf.insert((block.index, layer), sol);
        }
        Ok(())
    };
    let mut out = quantize_model_streaming(model, samples, cfg, &mut keep, progress)?;
    out.weights = weights;
    out.gguf = gguf;
    Ok(out)
}

/// [`quantize_model`] that hands each block to `sink` as soon as it is
/// final instead of keeping every layer's codes until the end, and then
/// calls [`QuantizableModel::release_block`] so a backend that materializes
/// blocks on demand can drop the block's working copy.
///
/// The returned [`PipelineOutput::weights`] is empty (the sink received
/// them); the report is complete. The model's released blocks hold what the
/// backend's `release_block` leaves (for backends that keep every block
/// resident: the dequantized weights, as with [`quantize_model`]).
pub fn quantize_model_streaming<M, C>(
    model: &mut M,
    samples: &[M::Sample],
    cfg: &PipelineConfig,
    sink: &mut dyn BlockSink,
    mut progress: impl FnMut(&Progress) -> C,
) -> Result<PipelineOutput>
where
    M: QuantizableModel,
    C: ProgressControl,
{
    let start = Instant::now();
    let cpu = CpuClock::start();
    check_gguf_run(cfg)?;
    if samples.is_empty() {
        return Err(Error::Empty {
            what: "calibration set".into(),
        });
    }
    let plan = RunPlan::new(&*model, cfg)?;
    let imp = cfg.importance();
    let needs_gradients = cfg.method().needs_importance() && imp.scorer().needs_gradients();
    if needs_gradients && model.gradients().is_none() {
        return Err(Error::Unsupported {
            what: format!(
                "{} with the gradient-driven scorer {}",
                cfg.method(),
                imp.scorer().name()
            ),
            remedy: "implement vlmq::GradientModel for the model and return Some(self) from \
                     QuantizableModel::gradients, or configure a scorer that needs no gradients"
                .into(),
        });
    }

    let mut state = match cfg.state_dir() {
        Some(dir) => Some(RunState::open(dir, &*model, samples, cfg)?),
        None => None,
    };
    let resume_from = state.as_ref().map_or(0, |s| s.completed_blocks());

    let mut stop = |p: &Progress| progress(p).cancels();
    let imp_start = Instant::now();
    let saliency = match model.gradients() {
        Some(g) if needs_gradients && imp.source() == GradientSource::TaskLoss => {
            let mut steps = ImportanceProgress::new(&mut stop, start, plan.layers_total);
            Some(task_loss_saliency(
                g,
                samples,
                cfg.importance_memory(),
                &mut steps,
            )?)
        }
        _ => None,
    };
    let importance_seconds = imp_start.elapsed().as_secs_f64();

    let mut q_stream: Vec<M::Hidden> = samples
        .par_iter()
        .enumerate()
        .map(|(i, s)| model.embed(s).map_err(in_sample(i, "embedding")))
        .collect::<Vec<Result<_>>>()
        .into_iter()
        .collect::<Result<_>>()?; // the first error in sample order
    let mut fp_stream = cfg
        .method()
        .needs_full_precision_stream()
        .then(|| q_stream.clone());
    let mut layers = Vec::new();
    let mut run = BlockRun {
        samples,
        cfg,
        layers_total: plan.layers_total,
        layers_done: 0,
        start,
        needs_gradients,
    };
    // The next block's input when the staged forward already computed it.
    let mut q_next = None;

    for (b, planned) in plan.blocks.iter().enumerate() {
        let name = planned.name.as_str();
        let saved: Vec<SavedLayer> = if b < resume_from {
            // resume_from > 0 only comes from a state; an error, not a panic, if not.
            let Some(st) = state.as_ref() else {
                return Err(Error::StateMismatch {
                    path: Default::default(),
                    reason: "resuming without a state directory".into(),
                });
            };
            let (restored, reports) = st.load_block(b)?;
            check_restored(b, planned, &restored, cfg)?;
            if let Some(fp) = fp_stream.as_mut() {
                *fp = forward(&*model, b, name, fp, samples)?;
            }
            for (layer, qw) in &restored {
                model
                    .set_linear_weight(b, layer, qw.dequantize().view())
                    .map_err(in_block(b, name, Some(layer), None))?;
            }
            run.layers_done += reports.len();
            restored
                .into_iter()
                .zip(reports)
                .map(|((layer, qw), report)| (layer, LayerCodes::Gptq(qw), report))
                .collect()
        } else if let Some(groups) = &planned.groups {
            let result = quantize_block(
                &mut run,
                model,
                b,
                name,
                groups,
                &q_stream,
                fp_stream.as_deref(),
                saliency.as_ref(),
                &mut stop,
            )?;
            if let Some(next) = result.fp_next {
                fp_stream = Some(next);
            }
            q_next = result.q_next;
            result.layers
        } else {
            if let Some(fp) = fp_stream.as_mut() {
                *fp = forward(&*model, b, name, fp, samples)?;
            }
            Vec::new()
        };
        q_stream = match q_next.take() {
            Some(next) => next,
            None => forward(&*model, b, name, &q_stream, samples)?,
        };
        if b >= resume_from {
            if let Some(st) = state.as_mut() {
                st.save_block(b, &saved)?;
            }
        }
        let mut finished = FinishedBlock {
            index: b,
            name: name.to_string(),
            layers: Vec::with_capacity(saved.len()),
            gguf: Vec::new(),
        };
        for (layer, codes, report) in saved {
            match codes {
                LayerCodes::Gptq(qw) => finished.layers.push((layer, qw)),
                LayerCodes::Gguf(sol) => finished.gguf.push((layer, sol)),
            }
            layers.push(report);
        }
        sink.block_finished(finished)?;
        model
            .release_block(b)
            .map_err(in_block(b, name, None, None))?;
    }
    Ok(PipelineOutput {
        report: PipelineReport {
            method: cfg.method(),
            layers,
            importance_seconds,
            total_seconds: start.elapsed().as_secs_f64(),
            cpu_seconds: cpu.seconds(),
            cores: available_cores(),
            resumed_blocks: resume_from,
        },
        weights: BTreeMap::new(),
        gguf: BTreeMap::new(),
    })
}

/// A restored block must hold exactly the layers the plan quantizes, in
/// order, with their shapes (a state file emptied to `[]` would otherwise
/// leave the block in full precision).
fn check_restored(
    b: usize,
    planned: &super::plan::PlannedBlock,
    restored: &[(String, crate::quant::QuantizedWeight)],
    cfg: &PipelineConfig,
) -> Result<()> {
    let expected: Vec<(&str, [usize; 2])> = planned
        .groups
        .iter()
        .flatten()
        .flatten()
        .filter(|l| l.scheme.is_some())
        .map(|l| {
            (
                l.info.name.as_str(),
                [l.info.out_features, l.info.in_features],
            )
        })
        .collect();
    let got: Vec<(&str, [usize; 2])> = restored
        .iter()
        .map(|(n, qw)| (n.as_str(), [qw.codes().nrows(), qw.codes().ncols()]))
        .collect();
    if expected != got {
        let list = |v: &[(&str, [usize; 2])]| {
            v.iter()
                .map(|(n, [o, i])| format!("{n} [{o}, {i}]"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(Error::StateMismatch {
            path: cfg.state_dir().map(|d| d.to_path_buf()).unwrap_or_default(),
            reason: format!(
                "block_{b} holds the layers [{}] but the run quantizes [{}] in that block",
                list(&got),
                list(&expected)
            ),
        });
    }
    Ok(())
}

/// Runs one block on every sample (in parallel, results in sample order).
pub(crate) fn forward<M: QuantizableModel + ?Sized>(
    model: &M,
    b: usize,
    name: &str,
    inputs: &[M::Hidden],
    samples: &[M::Sample],
) -> Result<Vec<M::Hidden>> {
    inputs
        .par_iter()
        .zip(samples.par_iter())
        .enumerate()
        .map(|(i, (h, s))| {
            model
                .block_forward(b, h, s, None)
                .map_err(in_block(b, name, None, Some(i)))
        })
        .collect()
}
