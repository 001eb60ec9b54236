//! The pipeline's hand-over of statistics to the accumulator, guarded on
//! the candle decoder (the core's `tests/pipeline_guards.rs` does the same
//! on the reference backend): one layer's statistics are rebuilt by hand
//! from the rows candle shows, and the run must have solved exactly those.
//! A pipeline that drops VLMQ's importance factors (VLMQ turning into GPTQ)
//! or swaps GPTAQ's quantized-path and full-precision inputs fails here.

use std::collections::BTreeMap;

use ndarray::{Array1, Array2, ArrayView2};
use vlmq::hessian::HessianAccumulator;
use vlmq::importance::{ModalityWeights, Uniform};
use vlmq::pipeline::{quantize_model, ImportanceOptions, PipelineConfig, QuantMethod};
use vlmq::{
    solve_layer, Bits, GptqConfig, GroupSize, LayerStatistics, Method, Modality, QuantScheme,
    QuantizableModel, QuantizedWeight, SampleSignals, TokenImportance,
};
use vlmq_candle::candle_core::{DType, Tensor};
use vlmq_candle::{random_model, Architecture, LlamaConfig, LlamaModel, TextSample};

type Weights = BTreeMap<(usize, String), QuantizedWeight>;

/// The second decoder block: its inputs come from a quantized block 0.
const BLOCK: usize = 1;

fn model() -> LlamaModel {
    let cfg = LlamaConfig {
        arch: Architecture::Llama,
        vocab_size: 96,
        hidden_size: 64,
        intermediate_size: 128,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 16,
        rope_theta: 1e4,
        rms_eps: 1e-5,
        tie_embeddings: false,
        qkv_bias: false,
    };
    random_model(&cfg, 11, DType::F32).unwrap()
}

/// Three samples whose first four tokens are tagged `Other` (a system
/// prompt, say), so that a modality scorer gives non-uniform factors.
fn samples() -> Vec<TextSample> {
    (0..3)
        .map(|s| {
            let tokens: Vec<u32> = (0..12)
                .map(|i| ((i * 29 + s * 13 + 5) % 96) as u32)
                .collect();
            let modality = (0..12)
                .map(|i| {
                    if i < 4 {
                        Modality::Other
                    } else {
                        Modality::Text
                    }
                })
                .collect();
            TextSample {
                modality: Some(modality),
                ..TextSample::causal(tokens)
            }
        })
        .collect()
}

fn config(method: QuantMethod) -> PipelineConfig {
    let scheme =
        QuantScheme::new(Bits::new(3).unwrap()).with_group_size(GroupSize::new(16).unwrap());
    PipelineConfig::new(method, GptqConfig::new(scheme))
}

fn run(cfg: &PipelineConfig, data: &[TextSample]) -> Weights {
    let mut m = model();
    quantize_model(&mut m, data, cfg, |_| {}).unwrap().weights
}

/// The inputs of block `b` when blocks `0..b` carry `weights` (or their
/// original weights when `None`).
fn stream(weights: Option<&Weights>, data: &[TextSample], b: usize) -> Vec<Tensor> {
    let mut m = model();
    if let Some(weights) = weights {
        for ((block, layer), qw) in weights.range((0, String::new())..(b, String::new())) {
            m.set_linear_weight(*block, layer, qw.dequantize().view())
                .unwrap();
        }
    }
    data.iter()
        .map(|s| {
            let mut h = m.embed(s).unwrap();
            for block in 0..b {
                h = m.block_forward(block, &h, s, None).unwrap();
            }
            h
        })
        .collect()
}

/// The rows `layer` of block `b` sees for each input (block `b`'s original weights).
fn rows(b: usize, layer: &str, inputs: &[Tensor], data: &[TextSample]) -> Vec<Array2<f32>> {
    let m = model();
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
            m.block_forward(b, h, s, Some(&mut sink)).unwrap();
            cap.expect("the layer's rows")
        })
        .collect()
}

fn factors(scorer: &dyn TokenImportance, b: usize, data: &[TextSample]) -> Vec<Array1<f32>> {
    let m = model();
    data.iter()
        .enumerate()
        .map(|(i, s)| {
            let info = m.token_info(b, s);
            scorer
                .factors(&SampleSignals::new(&info, i as u64))
                .unwrap()
        })
        .collect()
}

fn first_layer(b: usize) -> String {
    model().linear_groups(b)[0][0].name.clone()
}

/// The first layer of block `b`, solved by hand on `stats` with the run's settings.
fn solve(
    cfg: &PipelineConfig,
    b: usize,
    stats: &LayerStatistics,
    method: Method,
) -> QuantizedWeight {
    let w = model().linear_weight(b, &first_layer(b)).unwrap();
    let solver = cfg.solver().with_objective(false);
    solve_layer(w.view(), stats, &solver, method)
        .unwrap()
        .weight
}

#[test]
fn vlmq_solves_on_the_hessian_weighted_by_its_factors() {
    let data = samples();
    let scorer = ModalityWeights::new(1.0, 1.0, 0.1).unwrap();
    let cfg =
        config(QuantMethod::Vlmq).with_importance(ImportanceOptions::default().with_scorer(scorer));
    let out = run(&cfg, &data);
    let gptq = run(&config(QuantMethod::Gptq), &data);

    let layer = first_layer(BLOCK);
    let alpha = factors(&scorer, BLOCK, &data);
    assert!(
        alpha.iter().all(|a| a.iter().any(|&v| v != a[0])),
        "the factors must be non-uniform for this test to see them"
    );
    let captured = rows(BLOCK, &layer, &stream(Some(&out), &data, BLOCK), &data);
    let mut acc = HessianAccumulator::<f32>::new(captured[0].ncols());
    for (x, a) in captured.iter().zip(&alpha) {
        acc.add(x.view(), Some(a.view())).unwrap();
    }
    let expected = solve(&cfg, BLOCK, &acc.finish().unwrap(), Method::Gptq);
    let key = (BLOCK, layer);
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

    // In block 0 both inputs are the embeddings; block 1 sees two streams.
    let layer = first_layer(BLOCK);
    let quantized = rows(BLOCK, &layer, &stream(Some(&out), &data, BLOCK), &data);
    let full = rows(BLOCK, &layer, &stream(None, &data, BLOCK), &data);
    assert_ne!(quantized, full, "the two streams must differ after block 0");
    let alpha = factors(&Uniform, BLOCK, &data);
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
    let key = (BLOCK, layer);
    assert_eq!(
        out[&key],
        solve(&cfg, BLOCK, &paired(false), method),
        "GPTAQ must pair (quantized, full)"
    );
    assert_ne!(
        out[&key],
        solve(&cfg, BLOCK, &paired(true), method),
        "the swapped pairing must give another result"
    );
}
