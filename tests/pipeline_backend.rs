//! The pipeline driving a backend written outside the crate, as another
//! crate would write it: only public `vlmq` types are used.
//!
//! Block: `h = tanh(x A^T)`, `y = x + h B^T`, with groups `[a]` then `[b]`.
//! Loss: `1/2 sum ||y_t - target_t||^2` over the target rows of a sample.

mod common;

use std::collections::BTreeMap;

use common::{weight, Rng};
use ndarray::{concatenate, Array2, ArrayView2, Axis};
use vlmq::backend::{GradientModel, LinearInfo, Modality, QuantizableModel, RowSink, TokenInfo};
use vlmq::hessian::HessianAccumulator;
use vlmq::pipeline::{quantize_model, BlockSelection, PipelineConfig, QuantMethod, QuantizedModel};
use vlmq::{solve_layer, Bits, Error, GptqConfig, GroupSize, Method, QuantScheme};

#[derive(Clone)]
struct Block {
    a: Array2<f32>,
    b: Array2<f32>,
}

struct Sample {
    x: Array2<f32>,
    info: TokenInfo,
    targets: Vec<(usize, Vec<f32>)>,
}

struct TinyModel {
    blocks: Vec<Block>,
    /// Fail in `block_forward` of this block while capturing (simulates an interruption).
    fail_at: Option<usize>,
    /// Hide a layer from `linear_weight`.
    hide_layer: bool,
}

impl TinyModel {
    fn new(seed: u64, d: usize, hidden: usize, blocks: usize) -> Self {
        let mut rng = Rng::new(seed);
        let blocks = (0..blocks)
            .map(|_| Block {
                a: weight(&mut rng, hidden, d) * (1.0 / (d as f32).sqrt()),
                b: weight(&mut rng, d, hidden) * (1.0 / (hidden as f32).sqrt()),
            })
            .collect();
        TinyModel {
            blocks,
            fail_at: None,
            hide_layer: false,
        }
    }
}

impl QuantizableModel for TinyModel {
    type Sample = Sample;
    type Hidden = Array2<f32>;

    fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    fn block_name(&self, block: usize) -> String {
        format!("tiny.{block}")
    }

    fn linear_groups(&self, block: usize) -> Vec<Vec<LinearInfo>> {
        let bl = &self.blocks[block];
        vec![
            vec![LinearInfo::new("a", bl.a.ncols(), bl.a.nrows())],
            vec![LinearInfo::new("b", bl.b.ncols(), bl.b.nrows())],
        ]
    }

    fn token_info(&self, _: usize, sample: &Sample) -> TokenInfo {
        sample.info.clone()
    }

    fn embed(&self, sample: &Sample) -> vlmq::Result<Array2<f32>> {
        Ok(sample.x.clone())
    }

    fn block_forward(
        &self,
        block: usize,
        x: &Array2<f32>,
        _: &Sample,
        sink: Option<&mut dyn RowSink>,
    ) -> vlmq::Result<Array2<f32>> {
        // Fails only where the pipeline captures inputs, i.e. while quantizing.
        if self.fail_at == Some(block) && sink.is_some() {
            return Err(Error::Cancelled);
        }
        let bl = &self.blocks[block];
        if x.ncols() != bl.a.ncols() {
            // A careless backend: it shows the rows it got and fails later.
            if let Some(s) = sink {
                s.rows("a", x.view());
            }
            return Ok(x.clone());
        }
        let h = x.dot(&bl.a.t()).mapv(f32::tanh);
        if let Some(s) = sink {
            s.rows("a", x.view());
            s.rows("b", h.view());
        }
        Ok(x + &h.dot(&bl.b.t()))
    }

    fn linear_weight(&self, block: usize, layer: &str) -> vlmq::Result<Array2<f32>> {
        let bl = &self.blocks[block];
        match layer {
            "a" if !self.hide_layer => Ok(bl.a.clone()),
            "b" => Ok(bl.b.clone()),
            _ => Err(Error::Backend {
                block,
                layer: Some(layer.into()),
                reason: "no such layer".into(),
            }),
        }
    }

    fn set_linear_weight(
        &mut self,
        block: usize,
        layer: &str,
        w: ArrayView2<'_, f32>,
    ) -> vlmq::Result<()> {
        let bl = &mut self.blocks[block];
        let slot = match layer {
            "a" => &mut bl.a,
            "b" => &mut bl.b,
            _ => {
                return Err(Error::Backend {
                    block,
                    layer: Some(layer.into()),
                    reason: "no such layer".into(),
                })
            }
        };
        if slot.dim() != w.dim() {
            return Err(Error::Backend {
                block,
                layer: Some(layer.into()),
                reason: "shape".into(),
            });
        }
        slot.assign(&w);
        Ok(())
    }

    fn gradients(&self) -> Option<&dyn GradientModel<Sample = Sample, Hidden = Array2<f32>>> {
        Some(self)
    }
}

impl GradientModel for TinyModel {
    fn block_backward(
        &self,
        block: usize,
        x: &Array2<f32>,
        _: &Sample,
        gy: &Array2<f32>,
        sink: Option<&mut dyn RowSink>,
    ) -> vlmq::Result<Array2<f32>> {
        let bl = &self.blocks[block];
        let h = x.dot(&bl.a.t()).mapv(f32::tanh);
        let gh = gy.dot(&bl.b);
        let ga = &gh * &h.mapv(|v| 1.0 - v * v);
        if let Some(s) = sink {
            s.rows("b", gy.view());
            s.rows("a", ga.view());
        }
        Ok(gy + &ga.dot(&bl.a))
    }

    fn hidden_rows(&self, h: &Array2<f32>) -> vlmq::Result<Array2<f32>> {
        Ok(h.clone())
    }

    fn loss_and_grad(
        &self,
        y: &Array2<f32>,
        sample: &Sample,
    ) -> vlmq::Result<Option<(f32, Array2<f32>)>> {
        if sample.targets.is_empty() {
            return Ok(None);
        }
        let mut g = Array2::zeros(y.dim());
        let mut loss = 0.0;
        for (t, target) in &sample.targets {
            for (j, &v) in target.iter().enumerate() {
                let d = y[[*t, j]] - v;
                loss += 0.5 * d * d;
                g[[*t, j]] = d;
            }
        }
        Ok(Some((loss, g)))
    }
}

/// Samples of 12 vision tokens (near duplicates) and 4 text tokens, the last of which has a target.
fn samples(seed: u64, n: usize, d: usize) -> Vec<Sample> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| {
            let base: Vec<f32> = (0..d).map(|_| rng.normal()).collect();
            let x = Array2::from_shape_fn((16, d), |(t, j)| {
                if t < 12 {
                    base[j] + 0.05 * rng.normal()
                } else {
                    rng.normal()
                }
            });
            let mut modality = vec![Modality::Vision; 12];
            modality.extend([Modality::Text; 4]);
            let target = (0..d).map(|_| rng.normal()).collect();
            Sample {
                x,
                info: TokenInfo::new(modality),
                targets: vec![(15, target)],
            }
        })
        .collect()
}

fn config(method: QuantMethod) -> PipelineConfig {
    let scheme =
        QuantScheme::new(Bits::new(3).unwrap()).with_group_size(GroupSize::new(8).unwrap());
    PipelineConfig::new(method, GptqConfig::new(scheme))
}

/// A run without a custom scorer or progress output.
fn run(
    model: &mut TinyModel,
    data: &[Sample],
    cfg: &PipelineConfig,
) -> vlmq::Result<QuantizedModel> {
    quantize_model(model, data, cfg, None, &mut |_| {})
}

fn all_weights(m: &TinyModel) -> Vec<Array2<f32>> {
    m.blocks
        .iter()
        .flat_map(|b| [b.a.clone(), b.b.clone()])
        .collect()
}

#[test]
fn uniform_pipeline_equals_layer_by_layer_gptq() {
    let data = samples(1, 6, 16);
    let mut model = TinyModel::new(2, 16, 24, 3);
    let mut reference = TinyModel::new(2, 16, 24, 3);
    let cfg = config(QuantMethod::Gptq);
    let mut events = 0;
    let out = quantize_model(&mut model, &data, &cfg, None, &mut |p| {
        events += 1;
        assert_eq!(p.layers_total, 6);
        assert_eq!(p.layers_done, events);
    })
    .unwrap();
    assert_eq!(events, 6);
    assert_eq!(out.weights.len(), 6);

    // The same, by hand: per block, per group, stack the current inputs, solve, write back.
    let mut xs: Vec<Array2<f32>> = data.iter().map(|s| s.x.clone()).collect();
    for b in 0..3 {
        for layer in ["a", "b"] {
            let mut rows = Vec::new();
            for (x, s) in xs.iter().zip(&data) {
                let mut cap = None;
                let mut sink = |name: &str, r: ArrayView2<'_, f32>| {
                    if name == layer {
                        cap = Some(r.to_owned());
                    }
                };
                reference.block_forward(b, x, s, Some(&mut sink)).unwrap();
                rows.push(cap.unwrap());
            }
            let views: Vec<_> = rows.iter().map(|r| r.view()).collect();
            let x = concatenate(Axis(0), &views).unwrap();
            let mut acc = HessianAccumulator::<f32>::new(x.ncols());
            acc.add(x.view(), None).unwrap();
            let w = reference.linear_weight(b, layer).unwrap();
            let sol =
                solve_layer(w.view(), &acc.finish().unwrap(), &cfg.solver, Method::Gptq).unwrap();
            reference
                .set_linear_weight(b, layer, sol.dequantized.view())
                .unwrap();
            assert_eq!(
                out.weights[&(b, layer.to_string())],
                sol.weight,
                "block {b} layer {layer}"
            );
        }
        xs = xs
            .iter()
            .zip(&data)
            .map(|(x, s)| reference.block_forward(b, x, s, None).unwrap())
            .collect();
    }
    assert_eq!(all_weights(&model), all_weights(&reference));
}

#[test]
fn every_method_runs_end_to_end_and_vlmq_moves_weight_to_text() {
    let data = samples(3, 8, 16);
    for method in QuantMethod::ALL {
        let mut model = TinyModel::new(4, 16, 24, 2);
        let out = run(&mut model, &data, &config(method)).unwrap();
        assert_eq!(out.report.layers.len(), 4, "{method}");
        let first = &out.report.layers[0];
        assert!(
            (first.shares.vision_before - first.shares.vision_after).abs() < 1e-12
                || method.needs_importance()
        );
        if method.needs_importance() {
            // The target sits on a text token: task-loss factors shift weight towards text.
            assert!(
                first.shares.text_after > first.shares.text_before,
                "{method}: {:?}",
                first.shares
            );
        }
        let text = format!("{}", out.report);
        assert!(text.contains("tiny.1"));
        assert_eq!(out.report.to_json()["layers"].as_array().unwrap().len(), 4);
    }
}

#[test]
fn overrides_and_block_selection() {
    let data = samples(5, 4, 16);
    let mut model = TinyModel::new(6, 16, 24, 3);
    let before = all_weights(&model);
    let mut cfg = config(QuantMethod::Gptq);
    cfg.blocks = BlockSelection::Indices(vec![0, 2]);
    let mut overrides = BTreeMap::new();
    overrides.insert("tiny.2/b".to_string(), None);
    overrides.insert(
        "a".to_string(),
        Some(QuantScheme::new(Bits::new(8).unwrap())),
    );
    cfg.layer_overrides = overrides;
    let out = run(&mut model, &data, &cfg).unwrap();
    let names: Vec<(usize, String, u32)> = out
        .report
        .layers
        .iter()
        .map(|l| (l.block, l.layer.clone(), l.bits))
        .collect();
    assert_eq!(
        names,
        vec![(0, "a".into(), 8), (0, "b".into(), 3), (2, "a".into(), 8)]
    );
    let after = all_weights(&model);
    assert_eq!(after[2], before[2]);
    assert_eq!(after[3], before[3]);
    assert_eq!(after[5], before[5]);
    assert_ne!(after[0], before[0]);
}

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("vlmq-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn interrupted_run_resumes_from_the_last_completed_block() {
    let data = samples(7, 5, 16);
    let dir = temp_dir("resume");
    let mut cfg = config(QuantMethod::VlmqGptaq);
    let mut straight = TinyModel::new(8, 16, 24, 3);
    let expected = run(&mut straight, &data, &cfg).unwrap();

    cfg.state_dir = Some(dir.clone());
    let mut progress = 0;
    let mut first = TinyModel::new(8, 16, 24, 3);
    first.fail_at = Some(2);
    let err = quantize_model(&mut first, &data, &cfg, None, &mut |_| progress += 1).unwrap_err();
    assert!(matches!(err, Error::Cancelled), "{err}");
    assert_eq!(progress, 4, "blocks 0 and 1 completed before the failure");

    let mut resumed = TinyModel::new(8, 16, 24, 3);
    let out = run(&mut resumed, &data, &cfg).unwrap();
    assert_eq!(out.report.resumed_blocks, 2);
    assert_eq!(all_weights(&resumed), all_weights(&straight));
    assert_eq!(out.weights, expected.weights);

    // A finished state resumes everything; a different configuration is refused.
    let mut again = TinyModel::new(8, 16, 24, 3);
    let out = run(&mut again, &data, &cfg).unwrap();
    assert_eq!(out.report.resumed_blocks, 3);
    assert_eq!(all_weights(&again), all_weights(&straight));
    let mut other = cfg.clone();
    other.solver.block_size = 7;
    let err = run(&mut TinyModel::new(8, 16, 24, 3), &data, &other).unwrap_err();
    assert!(matches!(err, Error::StateMismatch { .. }), "{err}");
    let err = run(&mut TinyModel::new(9, 16, 24, 3), &data, &cfg).unwrap_err();
    assert!(
        matches!(err, Error::StateMismatch { ref reason, .. } if reason.contains("model")),
        "{err}"
    );
    let err = run(&mut TinyModel::new(8, 16, 24, 3), &samples(70, 5, 16), &cfg).unwrap_err();
    assert!(
        matches!(err, Error::StateMismatch { ref reason, .. } if reason.contains("calibration")),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_inputs_are_typed_errors_naming_block_and_layer() {
    let cfg = config(QuantMethod::Gptq);
    let err = run(&mut TinyModel::new(1, 16, 24, 2), &[], &cfg).unwrap_err();
    assert!(matches!(err, Error::Empty { .. }), "{err}");

    let mut data = samples(1, 3, 16);
    data[1].x = Array2::ones((16, 15));
    let err = run(&mut TinyModel::new(1, 16, 24, 2), &data, &cfg).unwrap_err();
    assert!(
        matches!(err, Error::Backend { block: 0, ref layer, .. } if layer.as_deref() == Some("a")),
        "{err}"
    );

    let mut data = samples(1, 3, 16);
    data[2].x[[3, 4]] = f32::NAN;
    let err = run(&mut TinyModel::new(1, 16, 24, 2), &data, &cfg).unwrap_err();
    assert!(
        matches!(err, Error::Backend { block: 0, ref layer, ref reason } if layer.as_deref() == Some("a") && reason.contains("non-finite")),
        "{err}"
    );

    let mut model = TinyModel::new(1, 16, 24, 2);
    model.hide_layer = true;
    let err = run(&mut model, &samples(1, 3, 16), &cfg).unwrap_err();
    assert!(
        matches!(err, Error::Backend { block: 0, ref layer, .. } if layer.as_deref() == Some("a")),
        "{err}"
    );

    let mut data = samples(1, 3, 16);
    data[0].info.valid.pop();
    let err = run(&mut TinyModel::new(1, 16, 24, 2), &data, &cfg).unwrap_err();
    assert!(matches!(err, Error::Backend { .. }), "{err}");
}

#[test]
fn any_token_importance_scorer_plugs_in() {
    use vlmq::importance::{ModalityWeights, PilotScorer, PilotSelection};
    let data = samples(11, 6, 16);
    let cfg = config(QuantMethod::Vlmq);
    let down = ModalityWeights::new(0.1, 1.0, 1.0).unwrap();
    let mut model = TinyModel::new(12, 16, 24, 2);
    let out = quantize_model(&mut model, &data, &cfg, Some(&down), &mut |_| {}).unwrap();
    let s = out.report.layers[0].shares;
    assert!(s.vision_after < s.vision_before, "{s:?}");
    assert!(
        (s.mean_alpha_vision - 0.1).abs() < 1e-6 && (s.mean_alpha_text - 1.0).abs() < 1e-6,
        "{s:?}"
    );

    // The pilot scorer that down-weights the lowest-saliency half of the vision tokens.
    let pilot = PilotScorer::new(0.5, 0.1, PilotSelection::LowestSaliency).unwrap();
    let mut model = TinyModel::new(12, 16, 24, 2);
    let out = quantize_model(&mut model, &data, &cfg, Some(&pilot), &mut |_| {}).unwrap();
    assert!(out.report.layers[0].shares.mean_alpha_vision < 1.0);

    // Methods without importance ignore the scorer: plain GPTQ weights.
    let mut a = TinyModel::new(12, 16, 24, 2);
    let mut b = TinyModel::new(12, 16, 24, 2);
    let gptq = config(QuantMethod::Gptq);
    let wa = quantize_model(&mut a, &data, &gptq, Some(&down), &mut |_| {})
        .unwrap()
        .weights;
    let wb = run(&mut b, &data, &gptq).unwrap().weights;
    assert_eq!(wa, wb);
}
