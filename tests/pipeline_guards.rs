//! Guards on how the pipeline hands statistics to the accumulator, on the
//! reference backend: each test rebuilds one layer's statistics by hand from
//! the rows the backend shows and checks the pipeline solved exactly that.
//! A pipeline that drops the importance factors (VLMQ turning into GPTQ) or
//! swaps GPTAQ's quantized-path and full-precision inputs fails here.

use std::collections::BTreeMap;

use ndarray::{Array1, Array2, ArrayView2};
use vlmq::config::Damping;
use vlmq::hessian::HessianAccumulator;
use vlmq::importance::{ModalityWeights, Uniform};
use vlmq::pipeline::{quantize_model, ImportanceOptions, PipelineConfig, QuantMethod};
use vlmq::{
    solve_layer, Bits, GptqConfig, GroupSize, LayerStatistics, Method, QuantScheme,
    QuantizableModel, QuantizedWeight, SampleSignals, TokenImportance,
};
use vlmq_nn::Sample;
use vlmq_toy::{build_model, examples, to_sample, Split, ToyConfig};

type Weights = BTreeMap<(usize, String), QuantizedWeight>;

/// ViT block 0, projector 1, LM block 2 (vision and text tokens).
const LM_BLOCK: usize = 2;
const SEED: u64 = 7;

fn toy() -> ToyConfig {
    ToyConfig {
        d_vit: 16,
        d_lm: 16,
        vit_blocks: 1,
        lm_blocks: 1,
        heads: 2,
        hidden: 32,
    }
}

fn samples() -> Vec<Sample> {
    examples(3, Split::Calibration, 0, 4)
        .iter()
        .map(to_sample)
        .collect()
}

fn config(method: QuantMethod) -> PipelineConfig {
    let scheme =
        QuantScheme::new(Bits::new(3).unwrap()).with_group_size(GroupSize::new(8).unwrap());
    PipelineConfig::new(method, GptqConfig::new(scheme))
}

/// Runs the pipeline on a fresh toy model.
fn run(cfg: &PipelineConfig, data: &[Sample]) -> Weights {
    let mut model = build_model(toy(), SEED).unwrap();
    quantize_model(&mut model, data, cfg, |_| {})
        .unwrap()
        .weights
}

/// The inputs of block `b` when blocks `0..b` carry `weights` (or their
/// original weights when `None`).
fn stream(weights: Option<&Weights>, data: &[Sample], b: usize) -> Vec<Array2<f32>> {
    let mut model = build_model(toy(), SEED).unwrap();
    if let Some(weights) = weights {
        for ((block, layer), qw) in weights.range((0, String::new())..(b, String::new())) {
            model
                .set_linear_weight(*block, layer, qw.dequantize().view())
                .unwrap();
        }
    }
    data.iter()
        .map(|s| {
            let mut h = model.embed(s).unwrap();
            for block in 0..b {
                h = model.block_forward(block, &h, s, None).unwrap();
            }
            h
        })
        .collect()
}

/// The rows `layer` of block `b` sees for each input, on the original weights
/// of block `b`.
fn rows(b: usize, layer: &str, inputs: &[Array2<f32>], data: &[Sample]) -> Vec<Array2<f32>> {
    let model = build_model(toy(), SEED).unwrap();
    inputs
        .iter()
        .zip(data)
        .map(|(h, s)| {
            let mut cap = None;
            let mut sink = |name: &str, r: ArrayView2<'_, f32>| {
                if name == layer {
                    cap = Some(r.to_owned());
                }
            };
            model.block_forward(b, h, s, Some(&mut sink)).unwrap();
            cap.expect("the layer's rows")
        })
        .collect()
}

/// The scorer's factors for each sample of block `b`.
fn factors(scorer: &dyn TokenImportance, b: usize, data: &[Sample]) -> Vec<Array1<f32>> {
    let model = build_model(toy(), SEED).unwrap();
    data.iter()
        .enumerate()
        .map(|(i, s)| {
            let info = model.token_info(b, s);
            scorer
                .factors(&SampleSignals::new(&info, i as u64))
                .unwrap()
        })
        .collect()
}

/// The first layer of block `b`, solved by hand on `stats` with the run's settings.
fn solve(
    cfg: &PipelineConfig,
    b: usize,
    stats: &LayerStatistics,
    method: Method,
) -> QuantizedWeight {
    let model = build_model(toy(), SEED).unwrap();
    let layer = first_layer(b);
    let w = model.linear_weight(b, &layer).unwrap();
    let solver = cfg.solver().with_objective(false);
    solve_layer(w.view(), stats, &solver, method)
        .unwrap()
        .weight
}

fn first_layer(b: usize) -> String {
    let model = build_model(toy(), SEED).unwrap();
    model.linear_groups(b)[0][0].name.clone()
}

/// Vision tokens weigh a tenth of text tokens: non-uniform in the LM block.
fn down_weight_vision() -> ModalityWeights {
    ModalityWeights::new(0.1, 1.0, 1.0).unwrap()
}

#[test]
fn vlmq_solves_on_the_hessian_weighted_by_its_factors() {
    let data = samples();
    let scorer = down_weight_vision();
    let cfg =
        config(QuantMethod::Vlmq).with_importance(ImportanceOptions::default().with_scorer(scorer));
    let out = run(&cfg, &data);
    let gptq = run(&config(QuantMethod::Gptq), &data);

    let layer = first_layer(LM_BLOCK);
    let inputs = stream(Some(&out), &data, LM_BLOCK);
    let alpha = factors(&scorer, LM_BLOCK, &data);
    assert!(
        alpha.iter().any(|a| a.iter().any(|&v| v != a[0])),
        "the factors must be non-uniform for this test to see them"
    );
    let mut acc = HessianAccumulator::<f32>::new(inputs[0].ncols());
    for (x, a) in rows(LM_BLOCK, &layer, &inputs, &data).iter().zip(&alpha) {
        acc.add(x.view(), Some(a.view())).unwrap();
    }
    let expected = solve(&cfg, LM_BLOCK, &acc.finish().unwrap(), Method::Gptq);
    let key = (LM_BLOCK, layer);
    assert_eq!(
        out[&key], expected,
        "VLMQ must solve on the weighted Hessian"
    );
    assert_ne!(
        out[&key], gptq[&key],
        "VLMQ with these factors must differ from GPTQ"
    );
}

#[test]
fn gptaq_pairs_the_quantized_path_with_the_full_precision_inputs() {
    let data = samples();
    let cfg = config(QuantMethod::Gptaq);
    let out = run(&cfg, &data);

    // In block 0 both inputs are the embeddings; block 2 sees two streams.
    let layer = first_layer(LM_BLOCK);
    let quantized = rows(
        LM_BLOCK,
        &layer,
        &stream(Some(&out), &data, LM_BLOCK),
        &data,
    );
    let full = rows(LM_BLOCK, &layer, &stream(None, &data, LM_BLOCK), &data);
    assert_ne!(quantized, full, "the two streams must differ after block 0");
    let alpha = factors(&Uniform, LM_BLOCK, &data);
    let paired = |swap: bool| {
        let mut acc = HessianAccumulator::<f32>::with_cross_term(quantized[0].ncols());
        for ((q, f), a) in quantized.iter().zip(&full).zip(&alpha) {
            let (q, f) = if swap { (f, q) } else { (q, f) };
            acc.add_paired(q.view(), f.view(), Some(a.view())).unwrap();
        }
        acc.finish().unwrap()
    };
    let method = Method::Gptaq {
        strength: cfg.gptaq_strength(),
    };
    let expected = solve(&cfg, LM_BLOCK, &paired(false), method);
    let swapped = solve(&cfg, LM_BLOCK, &paired(true), method);
    let key = (LM_BLOCK, layer);
    assert_eq!(out[&key], expected, "GPTAQ must pair (quantized, full)");
    assert_ne!(
        out[&key], swapped,
        "the swapped pairing must give another result"
    );
}

/// The configured damping reaches the solver: the run equals a hand solve
/// with that damping and differs from the default damping's result.
#[test]
fn the_configured_damping_reaches_every_solve() {
    let data = samples();
    let base = config(QuantMethod::Gptq);
    let damping = Damping::percent(0.3).unwrap();
    let cfg = base
        .clone()
        .with_solver(base.solver().with_damping(damping));
    let out = run(&cfg, &data);
    let default = run(&base, &data);

    // Block 0's first layer sees the embeddings, the same in every run.
    let layer = first_layer(0);
    let inputs = stream(None, &data, 0);
    let mut acc = HessianAccumulator::<f32>::new(inputs[0].ncols());
    for x in rows(0, &layer, &inputs, &data) {
        acc.add(x.view(), Some(Array1::ones(x.nrows()).view()))
            .unwrap();
    }
    let stats = acc.finish().unwrap();
    let key = (0, layer);
    assert_eq!(out[&key], solve(&cfg, 0, &stats, Method::Gptq));
    assert_eq!(default[&key], solve(&base, 0, &stats, Method::Gptq));
    assert_ne!(
        out[&key], default[&key],
        "30% damping must change the codes"
    );
}
