//! The task-loss importance pass: per-token saliency from one forward and
//! one block-wise backward of the task loss through the full-precision
//! model, in bounded memory.

use std::ops::Range;
use std::time::Instant;

use ndarray::Array1;
use rayon::prelude::*;

use super::capture::sample_chunks;
use super::context::{in_block, in_sample};
use super::progress::{Progress, Stage};
use super::saliency::{group_index, GroupSink, SaliencyMaps};
use crate::backend::GradientModel;
use crate::error::{Error, Result};

/// Tokens of one chunk of the pass. A chunk's samples hold at most
/// `blocks + 2` hidden states each at once (every block's input while the
/// backward walks down, plus the gradient coming in and the one going out),
/// each `width` f32 values per token, so a chunk of
/// `bytes / (4 * width * (blocks + 2))` tokens keeps the hidden states of
/// the pass within `bytes` whatever the number of blocks; a sample longer
/// than that is a chunk alone.
pub(crate) fn chunk_tokens(bytes: usize, width: usize, blocks: usize) -> usize {
    let per_token = width
        .max(1)
        .saturating_mul(std::mem::size_of::<f32>())
        .saturating_mul(blocks + 2);
    (bytes / per_token).max(1)
}

/// The width of the widest hidden state the pass holds: the widest input of
/// a block's first linear group (the normed hidden state its attention
/// projections read, in a transformer block), over all blocks.
fn hidden_width<M: GradientModel + ?Sized>(model: &M) -> usize {
    (0..model.num_blocks())
        .filter_map(|b| {
            let groups = model.linear_groups(b);
            groups.first()?.iter().map(|l| l.in_features).max()
        })
        .max()
        .unwrap_or(1)
}

/// Counts the pass's steps (one block's forward or backward over one
/// chunk) and reports each through the run's progress callback, which may
/// cancel the run.
pub(crate) struct ImportanceProgress<'a> {
    stop: &'a mut dyn FnMut(&Progress) -> bool,
    run_start: Instant,
    start: Instant,
    layers_total: usize,
    done: usize,
    total: usize,
}

impl<'a> ImportanceProgress<'a> {
    /// Reports to `stop` (`true` cancels); `run_start` is when the whole run
    /// started, `layers_total` the layers the run will quantize.
    pub(crate) fn new(
        stop: &'a mut dyn FnMut(&Progress) -> bool,
        run_start: Instant,
        layers_total: usize,
    ) -> Self {
        ImportanceProgress {
            stop,
            run_start,
            start: Instant::now(),
            layers_total,
            done: 0,
            total: 0,
        }
    }

    /// One step done: block `block` (`name`) ran forward or backward over
    /// `samples`. [`Error::Cancelled`] when the callback asks to stop.
    fn step(
        &mut self,
        block: usize,
        name: &str,
        backward: bool,
        samples: Range<usize>,
    ) -> Result<()> {
        self.done += 1;
        let event = Progress {
            stage: Stage::Importance { backward, samples },
            done: self.done,
            total: self.total,
            layers_done: 0,
            layers_total: self.layers_total,
            block,
            block_name: name.to_string(),
            layer: String::new(),
            elapsed: self.run_start.elapsed(),
            remaining: Progress::estimate(self.start.elapsed(), self.done, self.total),
        };
        if (self.stop)(&event) {
            return Err(Error::Cancelled);
        }
        Ok(())
    }
}

/// The task-loss source: forward through the full-precision model keeping
/// each block's input, then walk the blocks in reverse applying each block's
/// backward (recomputed from its stored input) and recording saliencies.
///
/// Samples go through the whole stack in consecutive chunks of at most
/// [`chunk_tokens`] tokens (by the first block's token info; a longer
/// sample alone), so the hidden states held at once stay within
/// `memory_bytes` (or one sample's) whatever the number of blocks, and the
/// backend's layer cache holds one block at a time. A chunk's samples run in
/// parallel. Every sample's result is computed on its own, so the chunking
/// changes no bit of the maps.
pub(crate) fn task_loss_saliency<M: GradientModel + ?Sized>(
    model: &M,
    samples: &[M::Sample],
    memory_bytes: usize,
    progress: &mut ImportanceProgress<'_>,
) -> Result<SaliencyMaps> {
    let nb = model.num_blocks();
    let infos: Vec<_> = samples.iter().map(|s| model.token_info(0, s)).collect();
    let max_tokens = chunk_tokens(memory_bytes, hidden_width(model), nb);
    let chunks = sample_chunks(&infos, max_tokens);
    progress.total = chunks.len() * 2 * nb;
    let names: Vec<String> = (0..nb).map(|b| model.block_name(b)).collect();
    let mut maps = SaliencyMaps::default();
    let mut with_targets = false;
    for chunk in chunks {
        let (part, any) = chunk_saliency(model, samples, chunk, &names, progress)?;
        with_targets |= any;
        maps.append(part);
    }
    if !with_targets {
        return Err(Error::Empty {
            what: "calibration samples with targets (the task-loss importance needs at least one)"
                .into(),
        });
    }
    Ok(maps)
}

/// Collects per-sample results in sample order, returning the first error
/// in sample order.
fn in_order<T>(results: Vec<Result<T>>) -> Result<Vec<T>> {
    results.into_iter().collect()
}

/// [`task_loss_saliency`] for the samples `chunk` of the calibration set;
/// also says whether any of them had targets.
fn chunk_saliency<M: GradientModel + ?Sized>(
    model: &M,
    all: &[M::Sample],
    chunk: Range<usize>,
    names: &[String],
    progress: &mut ImportanceProgress<'_>,
) -> Result<(SaliencyMaps, bool)> {
    let nb = names.len();
    let offset = chunk.start;
    let samples = &all[chunk.clone()];
    let mut hidden: Vec<M::Hidden> = in_order(
        samples
            .par_iter()
            .enumerate()
            .map(|(i, s)| model.embed(s).map_err(in_sample(offset + i, "embedding")))
            .collect(),
    )?;
    let mut inputs: Vec<Vec<M::Hidden>> = Vec::with_capacity(nb);
    for (b, name) in names.iter().enumerate() {
        let next: Vec<M::Hidden> = in_order(
            hidden
                .par_iter()
                .zip(samples.par_iter())
                .enumerate()
                .map(|(i, (h, s))| {
                    model.block_forward(b, h, s, None).map_err(in_block(
                        b,
                        name,
                        None,
                        Some(offset + i),
                    ))
                })
                .collect(),
        )?;
        inputs.push(std::mem::replace(&mut hidden, next));
        super::trim::return_free_pages();
        progress.step(b, name, false, chunk.clone())?;
    }
    let mut grads: Vec<Option<M::Hidden>> = in_order(
        hidden
            .par_iter()
            .zip(samples.par_iter())
            .enumerate()
            .map(|(i, (h, s))| {
                let out = model
                    .loss_and_grad(h, s)
                    .map_err(in_sample(offset + i, "task loss"))?;
                if let (Some((_, g)), Some(last)) = (&out, nb.checked_sub(1)) {
                    check_gradient(model, "gradient returned by loss_and_grad", g, h)
                        .map_err(in_block(last, &names[last], None, Some(offset + i)))?;
                }
                Ok(out.map(|(_, g)| g))
            })
            .collect(),
    )?;
    drop(hidden);
    super::trim::return_free_pages();
    let any_targets = grads.iter().any(Option::is_some);
    let mut groups = vec![Vec::new(); nb];
    let mut blocks = vec![Vec::new(); nb];
    for b in (0..nb).rev() {
        crate::kill_point::reached("importance");
        let Some(block_inputs) = inputs.pop() else {
            break; // one stored input per block: not reached
        };
        let name = &names[b];
        let results = backward_block(model, b, name, &block_inputs, samples, &grads, offset)?;
        drop(block_inputs);
        let n_groups = model.linear_groups(b).len();
        let mut per_group = vec![Vec::with_capacity(samples.len()); n_groups];
        let mut per_block = Vec::with_capacity(samples.len());
        grads = Vec::with_capacity(samples.len());
        for (gin, gs, bs) in results {
            grads.push(gin);
            for (k, v) in gs.into_iter().enumerate() {
                per_group[k].push(v);
            }
            per_block.push(bs);
        }
        groups[b] = per_group;
        blocks[b] = per_block;
        super::trim::return_free_pages();
        progress.step(b, name, true, chunk.clone())?;
    }
    Ok((SaliencyMaps::from_parts(groups, blocks), any_targets))
}

/// One sample's backward result: input gradient, group saliencies, block saliency.
type BackwardOut<H> = (Option<H>, Vec<Option<Array1<f32>>>, Option<Array1<f32>>);

/// Block `b`'s backward for every sample of a chunk (the first at index
/// `offset` of the set), from the block's inputs and the gradients at its
/// output (`None` for samples without targets).
fn backward_block<M: GradientModel + ?Sized>(
    model: &M,
    b: usize,
    name: &str,
    inputs: &[M::Hidden],
    samples: &[M::Sample],
    grads: &[Option<M::Hidden>],
    offset: usize,
) -> Result<Vec<BackwardOut<M::Hidden>>> {
    let group_of = group_index(model, b);
    let n_groups = model.linear_groups(b).len();
    in_order(
        grads
            .par_iter()
            .zip(inputs.par_iter())
            .zip(samples.par_iter())
            .enumerate()
            .map(|(i, ((g, x), s))| {
                let Some(g) = g else {
                    return Ok((None, vec![None; n_groups], None));
                };
                let at = || in_block(b, name, None, Some(offset + i));
                let out_sal = row_saliency(model, g).map_err(at())?;
                let tokens = model.token_info(b, s).len();
                check_block_rows(model, b, x, out_sal.len(), tokens).map_err(at())?;
                let mut sink = GroupSink::new(&group_of, n_groups, tokens);
                let gin = model
                    .block_backward(b, x, s, g, Some(&mut sink))
                    .map_err(at())?;
                // Checked against the block input only: token_info counts
                // the rows of the block's linears, which a block that drops
                // or adds tokens (a projector dropping the class token) does
                // not share with its input.
                check_gradient(model, "input gradient returned by block_backward", &gin, x)
                    .map_err(at())?;
                Ok((Some(gin), sink.finish(b).map_err(at())?, Some(out_sal)))
            })
            .collect(),
    )
}

/// Checks that a gradient returned by the backend has the shape (rows of
/// [`GradientModel::hidden_rows`]) of the value it is the gradient of.
fn check_gradient<M: GradientModel + ?Sized>(
    model: &M,
    what: &str,
    grad: &M::Hidden,
    value: &M::Hidden,
) -> Result<()> {
    let g = model.hidden_rows(grad)?.dim();
    let v = model.hidden_rows(value)?.dim();
    if g != v {
        return Err(Error::shape(
            format!("{what} (rows of the value it is the gradient of)"),
            &[v.0, v.1],
            &[g.0, g.1],
        ));
    }
    Ok(())
}

/// Checks the rows of the gradient at a block's output (`out_rows`, the
/// length of its per-block factors) against the `tokens` of the block's
/// linears. They may differ only in a block that changes its token count (a
/// projector appending text or dropping the class token), where the
/// per-block factors fall back to the group factors; in a block whose input
/// has as many rows as its output, a difference means
/// [`GradientModel::hidden_rows`] disagrees with
/// [`token_info`](crate::backend::QuantizableModel::token_info), and per-block importance
/// would silently use the per-layer factors.
fn check_block_rows<M: GradientModel + ?Sized>(
    model: &M,
    block: usize,
    input: &M::Hidden,
    out_rows: usize,
    tokens: usize,
) -> Result<()> {
    if out_rows == tokens {
        return Ok(());
    }
    let in_rows = model.hidden_rows(input)?.nrows();
    if in_rows != out_rows {
        return Ok(());
    }
    Err(Error::Backend {
        block,
        layer: None,
        reason: format!(
            "hidden_rows gives {out_rows} rows for both the block's input and the gradient at \
             its output, but token_info counts {tokens} tokens for the block's linears; \
             per-block importance factors would not line up with the block's rows"
        ),
    })
}

/// `sum g^2` over each row of a gradient with respect to a hidden state.
fn row_saliency<M: GradientModel + ?Sized>(model: &M, grad: &M::Hidden) -> Result<Array1<f32>> {
    let rows = model.hidden_rows(grad)?;
    Ok(rows.map_axis(ndarray::Axis(1), |r| r.iter().map(|v| v * v).sum::<f32>()))
}
