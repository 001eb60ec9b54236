//! One capture pass of a block: run the samples through it chunk by chunk
//! (whole forwards, or one stage of the staged forward) and stream each
//! group's input rows into its accumulators.

use std::ops::Range;

use ndarray::Array2;

use super::block::BlockRun;
use super::capture::{
    capture, capture_token_bound, check_rows, sample_chunks_of_at_least, sample_factors, Captured,
};
use super::config::PipelineConfig;
use super::context::in_block;
use super::plan::PlannedLayer;
use super::report::TraceShares;
use super::saliency::SaliencyMaps;
use super::stages::{capture_stage, StageCarries};
use crate::backend::{LinearInfo, QuantizableModel, TokenInfo};
use crate::error::Result;
use crate::hessian::{HessianAccumulator, LayerStatistics};
use crate::importance::{ImportanceDiagnostics, TokenImportance, Uniform};

/// The block being quantized: where it is and what feeds it.
pub(crate) struct BlockInputs<'a, M: QuantizableModel> {
    pub(crate) b: usize,
    pub(crate) name: &'a str,
    pub(crate) q_stream: &'a [M::Hidden],
    pub(crate) fp_stream: Option<&'a [M::Hidden]>,
    pub(crate) infos: Vec<TokenInfo>,
    /// Per-token squared gradient norms: the run-wide maps (index = block)
    /// or this block's block-local maps (index 0).
    pub(crate) saliency: Option<(&'a SaliencyMaps, usize)>,
}

/// A capture pass's statistics (one per group) and, when kept, the block's
/// full-precision output.
pub(crate) type PassResult<H> = (Vec<GroupStatistics>, Option<Vec<H>>);

/// One input group's statistics after a capture pass.
pub(crate) struct GroupStatistics {
    pub(crate) weighted: LayerStatistics,
    pub(crate) unweighted: Option<LayerStatistics>,
    pub(crate) shares: TraceShares,
}

/// Layers already quantized in this block, with their original weights:
/// GPTAQ's full-precision captures run with the originals put back.
#[derive(Default)]
pub(crate) struct Swapped {
    pub(crate) layers: Vec<(String, Array2<f32>, Array2<f32>)>,
}

impl Swapped {
    pub(crate) fn set<M: QuantizableModel>(
        &self,
        model: &mut M,
        b: usize,
        original: bool,
    ) -> Result<()> {
        for (layer, w, deq) in &self.layers {
            let v = if original { w } else { deq };
            model.set_linear_weight(b, layer, v.view())?;
        }
        Ok(())
    }
}

/// How a capture pass runs the block over the samples.
pub(crate) enum PassRun<'c> {
    /// One `block_forward` per sample; `keep_fp_output` keeps the
    /// full-precision stream's block outputs.
    Forward { keep_fp_output: bool },
    /// Stage `pass.start` of the staged forward, continuing every sample's
    /// carry (true-sequential passes hold one group each).
    Stage(&'c mut StageCarries),
}

/// One capture pass over the samples for the groups `pass`, chunk by chunk
/// (a chunk holds at most the configured number of tokens, or one sample):
/// each chunk's rows go straight into the groups' accumulators, one sample
/// at a time in sample order, so the sums do not depend on the chunking or
/// the thread count. With a full-precision stream, the chunk also runs
/// through the block's original weights and, when asked, keeps the block's
/// full-precision output.
pub(crate) fn capture_pass<M: QuantizableModel>(
    run: &BlockRun<'_, M::Sample>,
    model: &mut M,
    inputs: &BlockInputs<'_, M>,
    groups: &[Vec<PlannedLayer>],
    pass: Range<usize>,
    swapped: &Swapped,
    mut how: PassRun<'_>,
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
    let keep_fp_output = matches!(
        how,
        PassRun::Forward {
            keep_fp_output: true
        }
    );
    let mut fp_out = (keep_fp_output && paired).then(Vec::new);
    let scorer: &dyn TokenImportance = if cfg.method().needs_importance() {
        cfg.importance().scorer()
    } else {
        &Uniform
    };
    let max_tokens = capture_token_bound(
        cfg.capture_tokens(),
        cfg.capture_memory(),
        firsts.iter().map(|l| l.in_features),
        if paired { 2 } else { 1 },
    );
    // Chunking changes no result, so it may follow the thread count: a
    // chunk has a sample for every thread.
    let chunks = sample_chunks_of_at_least(&inputs.infos, max_tokens, rayon::current_num_threads());
    for chunk in chunks {
        let fp_caps = match inputs.fp_stream {
            Some(fp) => {
                swapped
                    .set(model, b, true)
                    .map_err(in_block(b, name, None, None))?;
                let caps = run_chunk(
                    &*model,
                    inputs,
                    &mut how,
                    pass.start,
                    (fp, true),
                    &samples[chunk.clone()],
                    chunk.clone(),
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
        let (q_caps, _) = run_chunk(
            &*model,
            inputs,
            &mut how,
            pass.start,
            (inputs.q_stream, false),
            &samples[chunk.clone()],
            chunk.clone(),
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
        crate::kill_point::reached("capture");
    }
    let stats = firsts
        .iter()
        .zip(
            weighted
                .into_iter()
                .zip(plain.into_iter().zip(&diagnostics)),
        )
        .map(|(layer, (w, (p, d)))| {
            let at = || in_block(b, name, Some(&layer.name), None);
            // Normalized in the sums' own memory: no second n x n matrix.
            Ok(GroupStatistics {
                weighted: w.into_statistics().map_err(at())?,
                unweighted: p
                    .map(HessianAccumulator::into_statistics)
                    .transpose()
                    .map_err(at())?,
                shares: TraceShares::from_diagnostics(d),
            })
        })
        .collect::<Result<_>>()?;
    Ok((stats, fp_out))
}

/// Runs one chunk of one stream (`(stream, full_precision)`) through the
/// block as `how` says, capturing the rows of `names`.
#[allow(clippy::too_many_arguments)]
fn run_chunk<M: QuantizableModel>(
    model: &M,
    inputs: &BlockInputs<'_, M>,
    how: &mut PassRun<'_>,
    stage: usize,
    (stream, full_precision): (&[M::Hidden], bool),
    samples: &[M::Sample],
    chunk: Range<usize>,
    names: &[String],
    keep_output: bool,
) -> Result<Captured<M::Hidden>> {
    let (b, name) = (inputs.b, inputs.name);
    match how {
        PassRun::Forward { .. } => {
            capture(model, b, name, &stream[chunk], samples, names, keep_output)
        }
        PassRun::Stage(carries) => {
            let slots = if full_precision {
                carries.fp.as_deref_mut()
            } else {
                Some(&mut carries.q[..])
            };
            let Some(slots) = slots else {
                return Err(crate::error::Error::Backend {
                    block: b,
                    layer: None,
                    reason: "no carries for the full-precision stream".into(),
                });
            };
            let first = chunk.start;
            capture_stage(
                model,
                b,
                name,
                stage,
                &stream[chunk.clone()],
                samples,
                &mut slots[chunk],
                names,
                first,
            )
        }
    }
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
