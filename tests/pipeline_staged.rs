//! The staged block forward: true-sequential capture through
//! `QuantizableModel::block_stage` gives bit for bit what one full
//! `block_forward` per group gives, and needs no replay forward.

use std::sync::atomic::{AtomicUsize, Ordering};

use ndarray::{Array2, ArrayView2};
use vlmq::backend::{LinearInfo, Modality, QuantizableModel, RowSink, TokenInfo};
use vlmq::pipeline::{quantize_model, PipelineConfig, QuantMethod};
use vlmq::{Bits, GptqConfig, GroupSize, QuantScheme, StageCarry, StageOutput};
use vlmq_nn::{Sample, SequenceModel};
use vlmq_toy::{build_model, examples, to_sample, Split, ToyConfig};

/// The reference backend with its staged forward hidden: the trait's
/// default (one `block_forward` per stage) runs instead. It records every
/// `stage_finished` call.
struct Unstaged {
    model: SequenceModel,
    finished: Vec<(usize, usize)>,
}

impl Unstaged {
    fn new(model: SequenceModel) -> Self {
        Unstaged {
            model,
            finished: Vec::new(),
        }
    }
}

impl QuantizableModel for Unstaged {
    type Sample = Sample;
    type Hidden = Array2<f32>;
    fn num_blocks(&self) -> usize {
        self.model.num_blocks()
    }
    fn block_name(&self, b: usize) -> String {
        self.model.block_name(b)
    }
    fn linear_groups(&self, b: usize) -> Vec<Vec<LinearInfo>> {
        self.model.linear_groups(b)
    }
    fn token_info(&self, b: usize, s: &Sample) -> TokenInfo {
        self.model.token_info(b, s)
    }
    fn embed(&self, s: &Sample) -> vlmq::Result<Array2<f32>> {
        self.model.embed(s)
    }
    fn block_forward(
        &self,
        b: usize,
        x: &Array2<f32>,
        s: &Sample,
        sink: Option<&mut dyn RowSink>,
    ) -> vlmq::Result<Array2<f32>> {
        self.model.block_forward(b, x, s, sink)
    }
    fn linear_weight(&self, b: usize, layer: &str) -> vlmq::Result<Array2<f32>> {
        self.model.linear_weight(b, layer)
    }
    fn set_linear_weight(
        &mut self,
        b: usize,
        layer: &str,
        w: ArrayView2<'_, f32>,
    ) -> vlmq::Result<()> {
        self.model.set_linear_weight(b, layer, w)
    }
    fn gradients(&self) -> Option<&dyn vlmq::GradientModel<Sample = Sample, Hidden = Array2<f32>>> {
        self.model.gradients()
    }
    fn stage_finished(&mut self, b: usize, k: usize) -> vlmq::Result<()> {
        self.finished.push((b, k));
        Ok(())
    }
}

fn toy() -> ToyConfig {
    ToyConfig {
        d_vit: 16,
        d_lm: 16,
        vit_blocks: 1,
        lm_blocks: 2,
        heads: 2,
        hidden: 32,
    }
}

/// Toy samples, one of them with padded (invalid) tokens so the masked
/// attention path runs through the stages too.
fn samples() -> Vec<Sample> {
    let mut s: Vec<Sample> = examples(4, Split::Calibration, 0, 5)
        .iter()
        .map(to_sample)
        .collect();
    let n = s[1].len();
    s[1] = s[1].clone().with_valid((0..n).map(|t| t + 2 < n).collect());
    s
}

/// Running the stages in order gives exactly `block_forward`'s output and
/// the rows it shows, on every kind of block (ViT encoder, projector,
/// gated decoder).
#[test]
fn stages_in_order_give_the_block_forward_bit_for_bit() {
    let model = build_model(toy(), 7).unwrap();
    for sample in &samples() {
        let mut h = model.embed(sample).unwrap();
        for b in 0..model.num_blocks() {
            let mut whole: Vec<(String, Array2<f32>)> = Vec::new();
            let mut sink = |l: &str, r: ArrayView2<'_, f32>| whole.push((l.into(), r.to_owned()));
            let expected = model.block_forward(b, &h, sample, Some(&mut sink)).unwrap();
            let mut staged: Vec<(String, Array2<f32>)> = Vec::new();
            let mut carry: Option<StageCarry> = None;
            let groups = model.linear_groups(b).len();
            for k in 0..groups {
                let mut sink =
                    |l: &str, r: ArrayView2<'_, f32>| staged.push((l.into(), r.to_owned()));
                match model
                    .block_stage(b, k, &h, sample, carry.take(), &mut sink)
                    .unwrap()
                {
                    StageOutput::Carry(c) => carry = Some(c),
                    StageOutput::Output(_) => panic!("block {b}: stage {k} returned the output"),
                }
            }
            let mut none = |_: &str, _: ArrayView2<'_, f32>| {};
            let StageOutput::Output(out) = model
                .block_stage(b, groups, &h, sample, carry, &mut none)
                .unwrap()
            else {
                panic!("block {b}: the last stage returned a carry");
            };
            assert_eq!(out, expected, "block {b} output");
            assert_eq!(staged, whole, "block {b} rows");
            h = out;
        }
    }
}

/// GPTQ and GPTAQ, true-sequential, on the reference backend with and
/// without its staged forward: identical codes, grids and final weights
/// (hence identical next-block inputs), over several capture chunks.
#[test]
fn staged_true_sequential_matches_one_forward_per_group() {
    let samples = samples();
    let scheme =
        QuantScheme::new(Bits::new(3).unwrap()).with_group_size(GroupSize::new(8).unwrap());
    for method in [QuantMethod::Gptq, QuantMethod::Gptaq] {
        let cfg = PipelineConfig::new(method, GptqConfig::new(scheme)).with_capture_tokens(40);
        let mut staged = build_model(toy(), 11).unwrap();
        let mut plain = Unstaged::new(build_model(toy(), 11).unwrap());
        let a = quantize_model(&mut staged, &samples, &cfg, |_| {}).unwrap();
        let b = quantize_model(&mut plain, &samples, &cfg, |_| {}).unwrap();
        assert_eq!(a.weights, b.weights, "{method}: codes and grids");
        for s in &samples {
            assert_eq!(
                staged.forward(s).unwrap(),
                plain.model.forward(s).unwrap(),
                "{method}: the quantized models differ"
            );
        }
    }
}

/// A two-group residual block (`h = tanh(x A^T)`, `y = x + h B^T`) whose
/// staged forward counts its stages and whose `block_forward` counts calls.
struct Counting {
    a: Array2<f32>,
    b: Array2<f32>,
    forwards: AtomicUsize,
    stages: AtomicUsize,
}

impl QuantizableModel for Counting {
    type Sample = Array2<f32>;
    type Hidden = Array2<f32>;
    fn num_blocks(&self) -> usize {
        1
    }
    fn linear_groups(&self, _: usize) -> Vec<Vec<LinearInfo>> {
        vec![
            vec![LinearInfo::new("a", self.a.ncols(), self.a.nrows())],
            vec![LinearInfo::new("b", self.b.ncols(), self.b.nrows())],
        ]
    }
    fn token_info(&self, _: usize, s: &Array2<f32>) -> TokenInfo {
        TokenInfo::uniform(Modality::Text, s.nrows())
    }
    fn embed(&self, s: &Array2<f32>) -> vlmq::Result<Array2<f32>> {
        Ok(s.clone())
    }
    fn block_forward(
        &self,
        _: usize,
        x: &Array2<f32>,
        _: &Array2<f32>,
        sink: Option<&mut dyn RowSink>,
    ) -> vlmq::Result<Array2<f32>> {
        self.forwards.fetch_add(1, Ordering::Relaxed);
        let h = x.dot(&self.a.t()).mapv(f32::tanh);
        if let Some(s) = sink {
            s.rows("a", x.view());
            s.rows("b", h.view());
        }
        Ok(x + &h.dot(&self.b.t()))
    }
    fn block_stage(
        &self,
        _: usize,
        stage: usize,
        x: &Array2<f32>,
        _: &Array2<f32>,
        carry: Option<StageCarry>,
        sink: &mut dyn RowSink,
    ) -> vlmq::Result<StageOutput<Array2<f32>>> {
        self.stages.fetch_add(1, Ordering::Relaxed);
        let h = carry.and_then(|c| c.downcast::<Array2<f32>>().ok());
        Ok(match (stage, h) {
            (0, _) => {
                sink.rows("a", x.view());
                StageOutput::Carry(Box::new(()))
            }
            (1, _) => {
                let h = x.dot(&self.a.t()).mapv(f32::tanh);
                sink.rows("b", h.view());
                StageOutput::Carry(Box::new(h))
            }
            (_, Some(h)) => StageOutput::Output(x + &h.dot(&self.b.t())),
            _ => return Err(vlmq::Error::Cancelled),
        })
    }
    fn linear_weight(&self, _: usize, layer: &str) -> vlmq::Result<Array2<f32>> {
        Ok(if layer == "a" { &self.a } else { &self.b }.clone())
    }
    fn set_linear_weight(
        &mut self,
        _: usize,
        layer: &str,
        w: ArrayView2<'_, f32>,
    ) -> vlmq::Result<()> {
        if layer == "a" {
            &mut self.a
        } else {
            &mut self.b
        }
        .assign(&w);
        Ok(())
    }
}

/// True-sequential capture with a staged backend runs each stage once per
/// sample and no `block_forward` at all (no per-group forward, no replay
/// for the next block's input); `true_sequential: false` keeps one capture
/// forward plus one replay forward per sample.
#[test]
fn a_staged_backend_needs_no_block_forward_in_true_sequential_capture() {
    let w = |r: usize, c: usize, k: usize| {
        Array2::from_shape_fn((r, c), |(i, j)| {
            (((i * 7 + j * 3 + k) % 11) as f32 - 5.0) / 10.0
        })
    };
    let samples: Vec<Array2<f32>> = (0..3).map(|s| w(9, 8, s)).collect();
    let scheme = QuantScheme::new(Bits::new(4).unwrap());
    for (true_sequential, forwards, stages) in [(true, 0, 3 * 3), (false, 2 * 3, 0)] {
        let mut model = Counting {
            a: w(8, 8, 1),
            b: w(8, 8, 2),
            forwards: AtomicUsize::new(0),
            stages: AtomicUsize::new(0),
        };
        let cfg = PipelineConfig::new(QuantMethod::Gptq, GptqConfig::new(scheme))
            .with_true_sequential(true_sequential);
        quantize_model(&mut model, &samples, &cfg, |_| {}).unwrap();
        assert_eq!(model.forwards.into_inner(), forwards, "{true_sequential}");
        assert_eq!(model.stages.into_inner(), stages, "{true_sequential}");
    }
}

/// A true-sequential run without a full-precision stream tells the backend
/// after each stage of each block, in order, so a streamed backend can free
/// the weights only that stage read; GPTAQ methods (which put the original
/// weights back for the full-precision stream) and one-forward capture
/// never do.
#[test]
fn finished_stages_are_reported_only_where_no_weight_is_read_again() {
    let scheme = QuantScheme::new(Bits::new(4).unwrap());
    for method in [
        QuantMethod::Gptq,
        QuantMethod::Vlmq,
        QuantMethod::Gptaq,
        QuantMethod::VlmqGptaq,
    ] {
        for true_sequential in [true, false] {
            let model = build_model(toy(), 3).unwrap();
            let expected: Vec<(usize, usize)> = (0..model.num_blocks())
                .flat_map(|b| (0..model.linear_groups(b).len()).map(move |k| (b, k)))
                .collect();
            let mut m = Unstaged::new(model);
            let cfg = PipelineConfig::new(method, GptqConfig::new(scheme))
                .with_true_sequential(true_sequential);
            quantize_model(&mut m, &samples(), &cfg, |_| {}).unwrap();
            let paired = matches!(method, QuantMethod::Gptaq | QuantMethod::VlmqGptaq);
            if true_sequential && !paired {
                assert_eq!(m.finished, expected, "{method}");
            } else {
                assert!(m.finished.is_empty(), "{method} {true_sequential}");
            }
        }
    }
}
