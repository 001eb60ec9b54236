//! The streaming pipeline: chunked capture and the chunked importance pass
//! change no bit of the result, whatever the chunk bound or thread count;
//! capturing every group in one forward is a different, valid run.

use ndarray::Array2;
use vlmq::pipeline::{quantize_model, PipelineConfig, PipelineOutput, QuantMethod};
use vlmq::{Bits, GptqConfig, GroupSize, QuantScheme, QuantizableModel};
use vlmq_toy::{build_model, examples, to_sample, Split, ToyConfig};

fn tiny() -> ToyConfig {
    ToyConfig {
        d_vit: 16,
        d_lm: 16,
        vit_blocks: 1,
        lm_blocks: 1,
        heads: 2,
        hidden: 32,
    }
}

fn config(method: QuantMethod) -> PipelineConfig {
    let scheme =
        QuantScheme::new(Bits::new(3).unwrap()).with_group_size(GroupSize::new(8).unwrap());
    PipelineConfig::new(method, GptqConfig::new(scheme)).with_layer_objectives(true)
}

/// Every linear weight of the model, block by block.
fn all_weights<M: QuantizableModel>(m: &M) -> Vec<Array2<f32>> {
    (0..m.num_blocks())
        .flat_map(|b| {
            m.linear_groups(b)
                .into_iter()
                .flatten()
                .map(move |l| (b, l.name))
        })
        .map(|(b, name)| m.linear_weight(b, &name).unwrap())
        .collect()
}

/// The report without its timings.
fn report_facts(o: &PipelineOutput) -> Vec<String> {
    o.report
        .layers
        .iter()
        .map(|l| {
            format!(
                "{} {} {} {:?} {:?} {:?} {:?}",
                l.block_name,
                l.layer,
                l.tokens,
                l.objective.map(f64::to_bits),
                l.objective_unweighted.map(f64::to_bits),
                l.damp_percent.to_bits(),
                l.shares
            )
        })
        .collect()
}

fn run(cfg: &PipelineConfig) -> (PipelineOutput, Vec<Array2<f32>>) {
    let calib: Vec<_> = examples(5, Split::Calibration, 0, 6)
        .iter()
        .map(to_sample)
        .collect();
    let mut model = build_model(tiny(), 11).unwrap();
    let out = quantize_model(&mut model, &calib, cfg, |_| {}).unwrap();
    let w = all_weights(&model);
    (out, w)
}

/// Holding every calibration token at once (the pre-streaming memory
/// profile), one sample at a time, or a bound in between: the same bits.
#[test]
fn the_capture_bound_changes_no_bit() {
    for method in [
        QuantMethod::Gptq,
        QuantMethod::Gptaq,
        QuantMethod::Vlmq,
        QuantMethod::VlmqGptaq,
    ] {
        let unbounded = config(method)
            .with_capture_tokens(usize::MAX)
            .with_capture_memory(usize::MAX);
        let (all, w_all) = run(&unbounded);
        // Token bounds, and byte bounds: 1 byte leaves one sample per
        // thread in a chunk, 8 KiB a few tokens of the tiny model's rows.
        let bounds = [
            ("tokens 1", config(method).with_capture_tokens(1)),
            ("tokens 40", config(method).with_capture_tokens(40)),
            ("bytes 1", unbounded.clone().with_capture_memory(1)),
            (
                "bytes 8 KiB",
                unbounded.clone().with_capture_memory(8 << 10),
            ),
        ];
        for (bound, cfg) in bounds {
            let (chunked, w) = run(&cfg);
            assert_eq!(
                chunked.weights, all.weights,
                "{method} bound {bound}: codes"
            );
            assert_eq!(w, w_all, "{method} bound {bound}: model weights");
            assert_eq!(
                report_facts(&chunked),
                report_facts(&all),
                "{method} bound {bound}: reports"
            );
        }
    }
}

/// Capturing every group in one forward sees the unquantized block, so the
/// later groups' inputs, and with them their weights, differ from the
/// true-sequential run; every layer is still quantized, and the result does
/// not depend on the thread count.
#[test]
fn one_forward_capture_is_a_different_valid_run() {
    for method in [QuantMethod::Gptq, QuantMethod::VlmqGptaq] {
        let (seq, w_seq) = run(&config(method));
        let cfg = config(method).with_true_sequential(false);
        let (one, w_one) = run(&cfg);
        assert_eq!(one.report.layers.len(), seq.report.layers.len());
        assert_ne!(w_one, w_seq, "{method}: later groups saw the same inputs");
        let single = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
            .install(|| run(&cfg));
        assert_eq!(single.0.weights, one.weights, "{method}: thread count");
        assert_eq!(single.1, w_one, "{method}: thread count");
    }
}

/// Objectives cost about a solve each; they are computed only on request.
#[test]
fn layer_objectives_only_on_request() {
    let (plain, w_plain) = run(&config(QuantMethod::Vlmq).with_layer_objectives(false));
    let (with, w_with) = run(&config(QuantMethod::Vlmq));
    assert!(plain
        .report
        .layers
        .iter()
        .all(|l| l.objective.is_none() && l.objective_unweighted.is_none()));
    assert!(with
        .report
        .layers
        .iter()
        .all(|l| l.objective.is_some() && l.objective_unweighted.is_some()));
    assert_eq!(plain.report.total_objective(), None);
    assert_eq!(w_plain, w_with, "objectives must not change the weights");
}
