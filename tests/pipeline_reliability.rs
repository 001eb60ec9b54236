//! Issue 13, items 2, 3 and 7: what a backend returns is checked, and bad
//! layouts, bad gradients and dead layers are typed errors (or a fallback
//! the caller asked for), never a panic or a silent result.

mod common;

use common::tiny::{all_weights, samples, Sample, TinyModel};
use ndarray::{s, Array2, ArrayView2};
use vlmq::backend::{GradientModel, LinearInfo, QuantizableModel, RowSink, TokenInfo};
use vlmq::pipeline::{quantize_model, ImportanceOptions, PipelineConfig, QuantMethod};
use vlmq::{Bits, Error, GptqConfig, GroupSize, QuantScheme};

/// How the wrapped backend misbehaves.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Fault {
    None,
    /// `linear_groups` of block 1 has an empty group.
    EmptyGroup,
    /// `linear_groups` of block 1 lists `a` twice.
    DuplicateName,
    /// `linear_groups` of block 1 names a layer `""`.
    EmptyName,
    /// `loss_and_grad` drops the last token of the gradient.
    LossGradShort,
    /// `block_backward` of block 2 drops the last token of the input gradient.
    BackwardShort,
    /// `block_backward` of block 2 returns an input gradient one column short.
    BackwardNarrow,
    /// `block_backward` of block 1 shows the gradient at `b`'s output one token short.
    SinkShort,
    /// `hidden_rows` drops the last row of every hidden state, so the
    /// per-block factors are one token short of the block's rows.
    HiddenRowsShort,
}

struct Faulty {
    inner: TinyModel,
    fault: Fault,
}

fn drop_last_row(a: &Array2<f32>) -> Array2<f32> {
    a.slice(s![..a.nrows() - 1, ..]).to_owned()
}

impl QuantizableModel for Faulty {
    type Sample = Sample;
    type Hidden = Array2<f32>;
    fn num_blocks(&self) -> usize {
        self.inner.num_blocks()
    }
    fn block_name(&self, b: usize) -> String {
        self.inner.block_name(b)
    }
    fn linear_groups(&self, b: usize) -> Vec<Vec<LinearInfo>> {
        let mut g = self.inner.linear_groups(b);
        if b == 1 {
            match self.fault {
                Fault::EmptyGroup => g.insert(1, Vec::new()),
                Fault::DuplicateName => g[1][0].name = "a".into(),
                Fault::EmptyName => g[0][0].name = String::new(),
                _ => {}
            }
        }
        g
    }
    fn token_info(&self, b: usize, s: &Sample) -> TokenInfo {
        self.inner.token_info(b, s)
    }
    fn embed(&self, s: &Sample) -> vlmq::Result<Array2<f32>> {
        self.inner.embed(s)
    }
    fn block_forward(
        &self,
        b: usize,
        x: &Array2<f32>,
        s: &Sample,
        sink: Option<&mut dyn RowSink>,
    ) -> vlmq::Result<Array2<f32>> {
        self.inner.block_forward(b, x, s, sink)
    }
    fn linear_weight(&self, b: usize, layer: &str) -> vlmq::Result<Array2<f32>> {
        self.inner.linear_weight(b, layer)
    }
    fn set_linear_weight(
        &mut self,
        b: usize,
        layer: &str,
        w: ArrayView2<'_, f32>,
    ) -> vlmq::Result<()> {
        self.inner.set_linear_weight(b, layer, w)
    }
    fn gradients(&self) -> Option<&dyn GradientModel<Sample = Sample, Hidden = Array2<f32>>> {
        Some(self)
    }
}

impl GradientModel for Faulty {
    fn loss_and_grad(
        &self,
        y: &Array2<f32>,
        s: &Sample,
    ) -> vlmq::Result<Option<(f32, Array2<f32>)>> {
        let out = self.inner.loss_and_grad(y, s)?;
        Ok(match (self.fault, out) {
            (Fault::LossGradShort, Some((l, g))) => Some((l, drop_last_row(&g))),
            (_, out) => out,
        })
    }
    fn block_backward(
        &self,
        b: usize,
        x: &Array2<f32>,
        s: &Sample,
        gy: &Array2<f32>,
        mut sink: Option<&mut dyn RowSink>,
    ) -> vlmq::Result<Array2<f32>> {
        if self.fault == Fault::SinkShort && b == 1 {
            let mut short = |layer: &str, rows: ArrayView2<'_, f32>| {
                let rows = if layer == "b" {
                    rows.slice(s![..rows.nrows() - 1, ..])
                } else {
                    rows
                };
                if let Some(sink) = sink.as_deref_mut() {
                    sink.rows(layer, rows);
                }
            };
            return self.inner.block_backward(b, x, s, gy, Some(&mut short));
        }
        let gin = self.inner.block_backward(b, x, s, gy, sink)?;
        Ok(match (self.fault, b) {
            (Fault::BackwardShort, 2) => drop_last_row(&gin),
            (Fault::BackwardNarrow, 2) => gin.slice(s![.., 1..]).to_owned(),
            _ => gin,
        })
    }
    fn hidden_rows(&self, h: &Array2<f32>) -> vlmq::Result<Array2<f32>> {
        let rows = self.inner.hidden_rows(h)?;
        Ok(match self.fault {
            Fault::HiddenRowsShort => drop_last_row(&rows),
            _ => rows,
        })
    }
}

fn config(method: QuantMethod) -> PipelineConfig {
    let scheme =
        QuantScheme::new(Bits::new(3).unwrap()).with_group_size(GroupSize::new(8).unwrap());
    PipelineConfig::new(method, GptqConfig::new(scheme))
}

/// Runs VLMQ (task-loss gradients) on a 3-block model with `fault`.
fn run_faulty(fault: Fault) -> (vlmq::Result<vlmq::pipeline::PipelineOutput>, bool) {
    let mut model = Faulty {
        inner: TinyModel::new(1, 16, 24, 3),
        fault,
    };
    let before = all_weights(&model.inner);
    let out = quantize_model(
        &mut model,
        &samples(2, 3, 16),
        &config(QuantMethod::Vlmq),
        |_| {},
    );
    let untouched = all_weights(&model.inner) == before;
    (out, untouched)
}

#[test]
fn a_bad_linear_groups_layout_is_an_error_before_any_work() {
    run_faulty(Fault::None).0.unwrap();
    for (fault, layer) in [
        (Fault::EmptyGroup, None),
        (Fault::DuplicateName, Some("a")),
        (Fault::EmptyName, Some("")),
    ] {
        let (out, untouched) = run_faulty(fault);
        let err = out.unwrap_err();
        assert!(untouched, "{fault:?}: weights changed before the error");
        match &err {
            Error::InBlock {
                block: 1,
                layer: l,
                source,
                ..
            } => {
                assert_eq!(l.as_deref(), layer, "{fault:?}: {err}");
                assert!(matches!(**source, Error::Backend { .. }), "{err}");
            }
            other => panic!("{fault:?}: expected InBlock, got {other}"),
        }
        assert!(err.to_string().contains("linear_groups"), "{err}");
    }
}

#[test]
fn gradients_with_the_wrong_token_count_or_width_name_block_and_sample() {
    for (fault, block) in [
        (Fault::LossGradShort, 2),
        (Fault::BackwardShort, 2),
        (Fault::BackwardNarrow, 2),
        (Fault::SinkShort, 1),
    ] {
        let (out, untouched) = run_faulty(fault);
        let err = out.unwrap_err();
        assert!(untouched, "{fault:?}: weights changed before the error");
        match &err {
            Error::InBlock {
                block: b,
                sample: Some(0),
                ..
            } => assert_eq!(*b, block, "{fault:?}: {err}"),
            other => panic!("{fault:?}: expected InBlock with a sample, got {other}"),
        }
        assert!(
            matches!(err.root(), Error::ShapeMismatch { .. }),
            "{fault:?}: {err}"
        );
    }
}

/// Issue 25, item 4: `hidden_rows` one row short used to make per-block
/// importance fall back to the per-layer factors without a word. Every
/// gradient is consistently short, so the shape checks between gradients
/// pass; only the comparison with `token_info` in a block that keeps its
/// token count can see it.
#[test]
fn hidden_rows_one_row_short_is_an_error_with_per_block_importance() {
    let cfg = config(QuantMethod::Vlmq)
        .with_importance(ImportanceOptions::default().with_per_block(true));
    let mut model = Faulty {
        inner: TinyModel::new(1, 16, 24, 3),
        fault: Fault::None,
    };
    quantize_model(&mut model, &samples(2, 3, 16), &cfg, |_| {}).unwrap();
    let mut model = Faulty {
        inner: TinyModel::new(1, 16, 24, 3),
        fault: Fault::HiddenRowsShort,
    };
    let before = all_weights(&model.inner);
    let err = quantize_model(&mut model, &samples(2, 3, 16), &cfg, |_| {}).unwrap_err();
    assert!(
        all_weights(&model.inner) == before,
        "weights changed before the error"
    );
    // The last block is the first one the backward pass reaches.
    match &err {
        Error::InBlock {
            block: 2,
            sample: Some(0),
            ..
        } => {}
        other => panic!("expected InBlock for block 2, sample 0, got {other}"),
    }
    assert!(matches!(err.root(), Error::Backend { .. }), "{err}");
    assert!(err.to_string().contains("hidden_rows"), "{err}");
}

/// Samples whose rows are `x` with the listed input columns set to 0.
fn with_zero_columns(data: Vec<Sample>, cols: std::ops::Range<usize>) -> Vec<Sample> {
    data.into_iter()
        .map(|mut s| {
            s.x.slice_mut(s![.., cols.clone()]).fill(0.0);
            s
        })
        .collect()
}

#[test]
fn dead_columns_are_reported_and_an_all_dead_layer_is_an_error_unless_rtn_is_asked_for() {
    // Column 3 of the first layer's input is always 0: one dead column, reported.
    let mut model = TinyModel::new(1, 16, 24, 1);
    let out = quantize_model(
        &mut model,
        &with_zero_columns(samples(2, 3, 16), 3..4),
        &config(QuantMethod::Gptq),
        |_| {},
    )
    .unwrap();
    let dead: Vec<(String, Option<usize>)> = out
        .report
        .layers
        .iter()
        .map(|r| (r.layer.clone(), r.dead_columns))
        .collect();
    assert_eq!(
        dead,
        [("a".to_string(), Some(1)), ("b".to_string(), Some(0))]
    );

    // Every input zero: both layers are all dead (b's input is tanh(0 A^T) = 0).
    let zeros = with_zero_columns(samples(2, 3, 16), 0..16);
    for method in [QuantMethod::Gptq, QuantMethod::Gptaq, QuantMethod::Vlmq] {
        let mut model = TinyModel::new(1, 16, 24, 1);
        let before = all_weights(&model);
        let err = quantize_model(&mut model, &zeros, &config(method), |_| {}).unwrap_err();
        assert!(
            matches!(&err, Error::InBlock { block: 0, layer: Some(l), .. } if l == "a"),
            "{method}: {err}"
        );
        assert!(
            matches!(
                err.root(),
                Error::DeadLayer {
                    in_features: 16,
                    tokens: 48
                }
            ),
            "{method}: {err}"
        );
        assert!(
            err.to_string().contains("with_dead_layer_fallback"),
            "{err}"
        );
        assert_eq!(all_weights(&model), before, "{method}: nothing written");
    }

    // RTN never reads the Hessian: it runs; it gathers statistics (and so
    // knows the dead columns) only when objectives are asked for.
    let rtn = |cfg: PipelineConfig| {
        quantize_model(&mut TinyModel::new(1, 16, 24, 1), &zeros, &cfg, |_| {}).unwrap()
    };
    let out = rtn(config(QuantMethod::Rtn));
    assert_eq!(out.report.layers[0].dead_columns, None);
    let out = rtn(config(QuantMethod::Rtn).with_layer_objectives(true));
    assert_eq!(out.report.layers[0].dead_columns, Some(16));

    // Opting in: the layers are quantized with round-to-nearest, not zeroed.
    let cfg = config(QuantMethod::Gptq)
        .with_dead_layer_fallback(vlmq::DeadLayerFallback::Rtn)
        .with_layer_objectives(true);
    let mut model = TinyModel::new(1, 16, 24, 1);
    let original = all_weights(&model);
    let out = quantize_model(&mut model, &zeros, &cfg, |_| {}).unwrap();
    let scheme = cfg.solver().scheme();
    for (w, (r, now)) in original
        .iter()
        .zip(out.report.layers.iter().zip(all_weights(&model)))
    {
        assert_eq!(r.dead_columns, Some(w.ncols()), "{}", r.layer);
        assert_eq!(r.objective, Some(0.0), "zero Hessian");
        let rtn = vlmq::quantize_rtn(w.view(), &scheme).unwrap().dequantize();
        assert_eq!(now, rtn, "{}: RTN of the original weight", r.layer);
        assert!(now.iter().any(|&v| v != 0.0));
    }
}
