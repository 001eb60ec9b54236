//! The task-loss importance pass in bounded memory (issue 23): the hidden
//! states it holds at once stay within `importance_memory` bytes whatever
//! the number of blocks, its chunking changes no bit of the result, and it
//! reports progress and can be cancelled.

mod common;

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::tiny::{samples, Sample, TinyModel};
use ndarray::{Array2, ArrayView2};
use vlmq::backend::{GradientModel, LinearInfo, QuantizableModel, RowSink, TokenInfo};
use vlmq::pipeline::Stage;
use vlmq::{
    quantize_model, Bits, GptqConfig, GroupSize, PipelineConfig, PipelineOutput, Progress,
    QuantMethod, QuantScheme,
};

/// Rows of hidden states alive now and at most so far.
#[derive(Default)]
struct Rows {
    live: AtomicUsize,
    peak: AtomicUsize,
}

/// A hidden state that counts its rows in [`Rows`] while it lives.
struct Tracked {
    x: Array2<f32>,
    rows: Arc<Rows>,
}

impl Tracked {
    fn new(x: Array2<f32>, rows: &Arc<Rows>) -> Self {
        let now = rows.live.fetch_add(x.nrows(), Ordering::SeqCst) + x.nrows();
        rows.peak.fetch_max(now, Ordering::SeqCst);
        Tracked {
            x,
            rows: rows.clone(),
        }
    }
}

impl Clone for Tracked {
    fn clone(&self) -> Self {
        Tracked::new(self.x.clone(), &self.rows)
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.rows.live.fetch_sub(self.x.nrows(), Ordering::SeqCst);
    }
}

/// The tiny model with every hidden state counted.
struct Counted {
    inner: TinyModel,
    rows: Arc<Rows>,
}

impl QuantizableModel for Counted {
    type Sample = Sample;
    type Hidden = Tracked;

    fn num_blocks(&self) -> usize {
        self.inner.num_blocks()
    }

    fn linear_groups(&self, block: usize) -> Vec<Vec<LinearInfo>> {
        self.inner.linear_groups(block)
    }

    fn token_info(&self, block: usize, sample: &Sample) -> TokenInfo {
        self.inner.token_info(block, sample)
    }

    fn embed(&self, sample: &Sample) -> vlmq::Result<Tracked> {
        Ok(Tracked::new(self.inner.embed(sample)?, &self.rows))
    }

    fn block_forward(
        &self,
        block: usize,
        x: &Tracked,
        sample: &Sample,
        sink: Option<&mut dyn RowSink>,
    ) -> vlmq::Result<Tracked> {
        let y = self.inner.block_forward(block, &x.x, sample, sink)?;
        Ok(Tracked::new(y, &self.rows))
    }

    fn linear_weight(&self, block: usize, layer: &str) -> vlmq::Result<Array2<f32>> {
        self.inner.linear_weight(block, layer)
    }

    fn set_linear_weight(
        &mut self,
        block: usize,
        layer: &str,
        w: ArrayView2<'_, f32>,
    ) -> vlmq::Result<()> {
        self.inner.set_linear_weight(block, layer, w)
    }

    fn gradients(&self) -> Option<&dyn GradientModel<Sample = Sample, Hidden = Tracked>> {
        Some(self)
    }
}

impl GradientModel for Counted {
    fn loss_and_grad(&self, y: &Tracked, sample: &Sample) -> vlmq::Result<Option<(f32, Tracked)>> {
        Ok(self
            .inner
            .loss_and_grad(&y.x, sample)?
            .map(|(l, g)| (l, Tracked::new(g, &self.rows))))
    }

    fn block_backward(
        &self,
        block: usize,
        x: &Tracked,
        sample: &Sample,
        gy: &Tracked,
        sink: Option<&mut dyn RowSink>,
    ) -> vlmq::Result<Tracked> {
        let g = self
            .inner
            .block_backward(block, &x.x, sample, &gy.x, sink)?;
        Ok(Tracked::new(g, &self.rows))
    }

    fn hidden_rows(&self, h: &Tracked) -> vlmq::Result<Array2<f32>> {
        Ok(h.x.clone())
    }
}

const D: usize = 8;
const HIDDEN: usize = 16;
/// Tokens per sample of `common::tiny::samples`.
const SAMPLE_TOKENS: usize = 16;

/// Bytes of `rows` rows of the tiny model's f32 hidden states.
fn bytes_of_rows(rows: usize) -> usize {
    rows * D * std::mem::size_of::<f32>()
}

/// VLMQ whose importance pass may hold `budget_rows` rows of hidden states.
/// Capture is bounded far lower, so a pass sized by the capture bound (the
/// rule before the byte budget) holds fewer rows than these tests expect.
fn vlmq_config(budget_rows: usize) -> PipelineConfig {
    let scheme =
        QuantScheme::new(Bits::new(4).unwrap()).with_group_size(GroupSize::new(8).unwrap());
    PipelineConfig::new(QuantMethod::Vlmq, GptqConfig::new(scheme))
        .with_capture_tokens(SAMPLE_TOKENS)
        .with_importance_memory(bytes_of_rows(budget_rows))
}

/// Runs VLMQ on a `blocks`-block tiny model over `n` samples; returns the
/// output, every progress event, and the most hidden-state rows alive at
/// once during the importance pass (read at its last step, after which the
/// pass allocates no hidden state).
fn run(blocks: usize, n: usize, budget_rows: usize) -> (PipelineOutput, Vec<Progress>, usize) {
    let mut model = Counted {
        inner: TinyModel::new(7, D, HIDDEN, blocks),
        rows: Arc::new(Rows::default()),
    };
    let rows = model.rows.clone();
    let set = samples(11, n, D);
    let mut events = Vec::new();
    let mut importance_peak = 0;
    let out = quantize_model(
        &mut model,
        &set,
        &vlmq_config(budget_rows),
        |p: &Progress| {
            if matches!(p.stage, Stage::Importance { .. }) && p.done == p.total {
                importance_peak = rows.peak.load(Ordering::SeqCst);
            }
            events.push(p.clone());
        },
    )
    .unwrap();
    (out, events, importance_peak)
}

#[test]
fn hidden_states_of_the_importance_pass_stay_within_the_budget_for_any_depth() {
    // 24 samples of 16 tokens; a budget of 16 samples' rows, which at 14
    // blocks is one sample per chunk. Keeping every block's input for a
    // chunk of the budget's rows (the pass before issue 23) holds
    // (blocks + 1) x 256 rows and more.
    let budget = 16 * SAMPLE_TOKENS;
    for blocks in [2, 6, 14] {
        let (_, _, peak) = run(blocks, 24, budget);
        assert!(peak > 0, "the pass ran");
        assert!(
            peak <= budget,
            "{blocks} blocks: {peak} rows of hidden states alive at once, budget {budget}"
        );
    }
}

#[test]
fn the_budget_fills_chunks_with_several_samples_for_parallelism() {
    // 2 blocks hold 4 states per sample: a budget of 16 samples' rows gives
    // chunks of 4 samples, whatever the capture bound (one sample here).
    let blocks = 2;
    let (_, events, peak) = run(blocks, 10, 16 * SAMPLE_TOKENS);
    let chunks: Vec<_> = events
        .iter()
        .filter_map(|p| match &p.stage {
            Stage::Importance {
                backward: false,
                samples,
            } if p.block == 0 => Some(samples.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(chunks, [0..4, 4..8, 8..10]);
    assert!(
        peak > (blocks + 2) * SAMPLE_TOKENS,
        "several samples at once: {peak} rows"
    );
}

#[test]
fn one_sample_is_the_floor_when_a_sample_exceeds_the_share_of_a_block() {
    // A budget below one sample per block: each sample is a chunk alone,
    // holding at most blocks + 2 states of one sample.
    let blocks = 6;
    let (_, _, peak) = run(blocks, 5, SAMPLE_TOKENS);
    assert!(peak <= (blocks + 2) * SAMPLE_TOKENS, "peak {peak}");
}

#[test]
fn chunking_and_thread_count_change_no_bit_of_the_result() {
    // One chunk of every sample (what the pass did for calibration sets
    // within capture_tokens before issue 23), one sample per chunk, and
    // something in between; on pools of 1 and 3 threads.
    let reference = run(4, 10, 1 << 20).0;
    for (capture, threads) in [(SAMPLE_TOKENS, 1), (5 * SAMPLE_TOKENS, 3), (1 << 20, 3)] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let out = pool.install(|| run(4, 10, capture).0);
        assert_eq!(out.weights.len(), reference.weights.len());
        for (key, qw) in &reference.weights {
            let other = &out.weights[key];
            assert_eq!(
                qw.codes(),
                other.codes(),
                "{key:?} codes, capture {capture}"
            );
            assert_eq!(qw.dequantize(), other.dequantize(), "{key:?} grid");
        }
    }
}

#[test]
fn importance_steps_are_reported_in_order_before_the_layers() {
    let blocks = 3;
    // Two samples per chunk: a budget of 10 x 16 rows over blocks + 2 = 5 states.
    let (out, events, _) = run(blocks, 5, 10 * SAMPLE_TOKENS);
    let steps: Vec<&Progress> = events
        .iter()
        .filter(|p| matches!(p.stage, Stage::Importance { .. }))
        .collect();
    let chunks = [0..2, 2..4, 4..5];
    assert_eq!(steps.len(), chunks.len() * 2 * blocks);
    let mut k = 0;
    for chunk in &chunks {
        let order = (0..blocks)
            .map(|b| (b, false))
            .chain((0..blocks).rev().map(|b| (b, true)));
        for (b, backward) in order {
            let p = steps[k];
            k += 1;
            assert_eq!((p.done, p.total), (k, steps.len()));
            assert_eq!(p.block, b);
            assert_eq!(
                p.stage,
                Stage::Importance {
                    backward,
                    samples: chunk.clone()
                }
            );
        }
    }
    // Every importance step comes before the first layer.
    let first_layer = events
        .iter()
        .position(|p| p.stage == Stage::Quantize)
        .unwrap();
    assert_eq!(first_layer, steps.len());
    assert_eq!(events.len() - first_layer, out.report.layers.len());
}

#[test]
fn cancelling_during_the_importance_pass_stops_before_any_weight_changes() {
    let mut model = TinyModel::new(7, D, HIDDEN, 3);
    let before = common::tiny::all_weights(&model);
    let set = samples(11, 6, D);
    let mut seen = 0;
    let err = quantize_model(&mut model, &set, &vlmq_config(1 << 20), |p: &Progress| {
        seen += 1;
        assert!(matches!(p.stage, Stage::Importance { .. }));
        if p.done == 4 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .unwrap_err();
    assert!(matches!(err, vlmq::Error::Cancelled), "{err}");
    assert_eq!(seen, 4, "no event after the cancelling one");
    assert_eq!(common::tiny::all_weights(&model), before);
}
