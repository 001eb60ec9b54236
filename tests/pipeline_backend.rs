//! The pipeline driving a backend written outside the crate, as another
//! crate would write it (`common::tiny`): only public `vlmq` types are used.

mod common;

use common::tiny::{all_weights, samples, Sample, TinyModel};
use ndarray::{concatenate, Array2, ArrayView2, Axis};
use vlmq::hessian::HessianAccumulator;
use vlmq::pipeline::{
    quantize_model, BlockSelection, ImportanceOptions, PipelineConfig, PipelineOutput, QuantMethod,
};
use vlmq::{solve_layer, Bits, GptqConfig, GroupSize, Method, QuantScheme, QuantizableModel};

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
) -> vlmq::Result<PipelineOutput> {
    quantize_model(model, data, cfg, |_| {})
}

#[test]
fn uniform_pipeline_equals_layer_by_layer_gptq() {
    let data = samples(1, 6, 16);
    let mut model = TinyModel::new(2, 16, 24, 3);
    let mut reference = TinyModel::new(2, 16, 24, 3);
    let cfg = config(QuantMethod::Gptq);
    let mut events = 0;
    let out = quantize_model(&mut model, &data, &cfg, |p: &vlmq::Progress| {
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
                solve_layer(w.view(), &acc.finish().unwrap(), cfg.solver(), Method::Gptq).unwrap();
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
    let cfg = config(QuantMethod::Gptq)
        .with_blocks(BlockSelection::Indices(vec![0, 2]))
        .with_layer_override("tiny.2/b", None)
        .with_layer_override("a", Some(QuantScheme::new(Bits::new(8).unwrap())));
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

#[test]
fn any_token_importance_scorer_plugs_in() {
    use vlmq::importance::{ModalityWeights, PilotScorer, PilotSelection};
    let data = samples(11, 6, 16);
    let down = ModalityWeights::new(0.1, 1.0, 1.0).unwrap();
    let with = |scorer: std::sync::Arc<dyn vlmq::TokenImportance>| {
        ImportanceOptions::default().with_shared_scorer(scorer)
    };
    let cfg = config(QuantMethod::Vlmq).with_importance(with(std::sync::Arc::new(down)));
    let mut model = TinyModel::new(12, 16, 24, 2);
    let out = run(&mut model, &data, &cfg).unwrap();
    let s = out.report.layers[0].shares;
    assert!(s.vision_after < s.vision_before, "{s:?}");
    assert!(
        (s.mean_alpha_vision - 0.1).abs() < 1e-6 && (s.mean_alpha_text - 1.0).abs() < 1e-6,
        "{s:?}"
    );

    // The pilot scorer that down-weights the lowest-saliency half of the vision tokens.
    let pilot = PilotScorer::new(0.5, 0.1, PilotSelection::LowestSaliency).unwrap();
    let cfg = config(QuantMethod::Vlmq).with_importance(with(std::sync::Arc::new(pilot)));
    let mut model = TinyModel::new(12, 16, 24, 2);
    let out = run(&mut model, &data, &cfg).unwrap();
    assert!(out.report.layers[0].shares.mean_alpha_vision < 1.0);

    // Methods without importance ignore the scorer: plain GPTQ weights.
    let mut a = TinyModel::new(12, 16, 24, 2);
    let mut b = TinyModel::new(12, 16, 24, 2);
    let gptq = config(QuantMethod::Gptq);
    let with_scorer = gptq
        .clone()
        .with_importance(with(std::sync::Arc::new(down)));
    let wa = run(&mut a, &data, &with_scorer).unwrap().weights;
    let wb = run(&mut b, &data, &gptq).unwrap().weights;
    assert_eq!(wa, wb);
}
