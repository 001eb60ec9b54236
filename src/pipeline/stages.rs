//! True-sequential capture through the backend's staged block forward: one
//! stage per input group, each continuing from what the previous stage of
//! the same sample left, and a last stage that gives the block's output.

use ndarray::Array2;
use rayon::prelude::*;

use super::capture::{Capture, Captured};
use super::context::in_block;
use crate::backend::{QuantizableModel, StageCarry, StageOutput};
use crate::error::{Error, Result};

/// Every sample's carry between two stages, for the quantized stream and,
/// for GPTAQ methods, the full-precision stream.
pub(crate) struct StageCarries {
    pub(crate) q: Vec<Option<StageCarry>>,
    pub(crate) fp: Option<Vec<Option<StageCarry>>>,
}

impl StageCarries {
    /// Empty carries (before stage 0) for `n` samples.
    pub(crate) fn new(n: usize, paired: bool) -> Self {
        let empty = || (0..n).map(|_| None).collect::<Vec<_>>();
        StageCarries {
            q: empty(),
            fp: paired.then(empty),
        }
    }
}

/// Runs stage `k` of block `b` on every sample of a chunk (`first` is the
/// chunk's first sample index, for errors), capturing the input rows of
/// `names` and replacing each sample's carry with the stage's.
#[allow(clippy::too_many_arguments)]
pub(crate) fn capture_stage<M: QuantizableModel + ?Sized>(
    model: &M,
    b: usize,
    block_name: &str,
    k: usize,
    inputs: &[M::Hidden],
    samples: &[M::Sample],
    carries: &mut [Option<StageCarry>],
    names: &[String],
    first: usize,
) -> Result<Captured<M::Hidden>> {
    let caps: Vec<Vec<Option<Array2<f32>>>> = inputs
        .par_iter()
        .zip(samples.par_iter())
        .zip(carries.par_iter_mut())
        .enumerate()
        .map(|(j, ((h, s), carry))| {
            let at = || in_block(b, block_name, None, Some(first + j));
            let mut sink = Capture::new(names);
            match model
                .block_stage(b, k, h, s, carry.take(), &mut sink)
                .map_err(at())?
            {
                StageOutput::Carry(c) => *carry = Some(c),
                StageOutput::Output(_) => return Err(at()(wrong_stage(b, k, "the block output"))),
            }
            Ok(sink.into_rows())
        })
        .collect::<Vec<Result<_>>>()
        .into_iter()
        .collect::<Result<_>>()?; // the first error in sample order
    Ok((caps, Vec::new()))
}

/// Runs the last stage (`groups`, the number of input groups) of block `b`
/// on every sample: the block's outputs, in sample order. The carries are
/// consumed.
pub(crate) fn finish_stages<M: QuantizableModel + ?Sized>(
    model: &M,
    b: usize,
    block_name: &str,
    groups: usize,
    inputs: &[M::Hidden],
    samples: &[M::Sample],
    carries: Vec<Option<StageCarry>>,
) -> Result<Vec<M::Hidden>> {
    inputs
        .par_iter()
        .zip(samples.par_iter())
        .zip(carries.into_par_iter())
        .enumerate()
        .map(|(i, ((h, s), carry))| {
            let at = || in_block(b, block_name, None, Some(i));
            let mut ignore = |_: &str, _: ndarray::ArrayView2<'_, f32>| {};
            match model
                .block_stage(b, groups, h, s, carry, &mut ignore)
                .map_err(at())?
            {
                StageOutput::Output(out) => Ok(out),
                StageOutput::Carry(_) => Err(at()(wrong_stage(b, groups, "a carry"))),
            }
        })
        .collect()
}

/// A stage that returned the wrong kind of result.
fn wrong_stage(b: usize, k: usize, got: &str) -> Error {
    Error::Backend {
        block: b,
        layer: None,
        reason: format!(
            "block_stage returned {got} for stage {k} (stages before the last group's \
             end return a carry, the stage after the last group returns the block output)"
        ),
    }
}
