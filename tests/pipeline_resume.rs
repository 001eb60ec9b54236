//! Saved state: interrupted and cancelled runs resume to the same weights,
//! and a state written for another run is refused.

mod common;

use std::ops::ControlFlow;

use common::tiny::{all_weights, samples, Sample, TinyModel};
use vlmq::importance::{GradientSaliency, ModalityWeights, Normalization, SaliencyPower};
use vlmq::pipeline::{
    quantize_model, ImportanceOptions, PipelineConfig, PipelineOutput, QuantMethod,
};
use vlmq::{Bits, Error, GptqConfig, GroupSize, QuantScheme};

fn config(method: QuantMethod) -> PipelineConfig {
    let scheme =
        QuantScheme::new(Bits::new(3).unwrap()).with_group_size(GroupSize::new(8).unwrap());
    PipelineConfig::new(method, GptqConfig::new(scheme)).with_layer_objectives(true)
}

fn run(
    model: &mut TinyModel,
    data: &[Sample],
    cfg: &PipelineConfig,
) -> vlmq::Result<PipelineOutput> {
    quantize_model(model, data, cfg, |_| {})
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
    let cfg = config(QuantMethod::VlmqGptaq);
    let mut straight = TinyModel::new(8, 16, 24, 3);
    let expected = run(&mut straight, &data, &cfg).unwrap();

    let cfg = cfg.with_state_dir(&dir);
    let mut progress = 0;
    let mut first = TinyModel::new(8, 16, 24, 3);
    first.fail_at = Some(2);
    let err = quantize_model(&mut first, &data, &cfg, |p| {
        // Layers only (the importance pass's steps come first).
        if p.stage == vlmq::pipeline::Stage::Quantize {
            progress += 1;
        }
    })
    .unwrap_err();
    // The backend's own error comes back, under the block it failed in.
    assert!(matches!(err.root(), Error::Cancelled), "{err}");
    assert!(matches!(err, Error::InBlock { block: 2, .. }), "{err}");
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
    let other = cfg
        .clone()
        .with_solver(cfg.solver().with_block_size(7).unwrap());
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
fn a_cancelled_run_resumes_to_bit_identical_weights() {
    let data = samples(17, 5, 16);
    let dir = temp_dir("cancel");
    let cfg = config(QuantMethod::VlmqGptaq);
    let mut straight = TinyModel::new(18, 16, 24, 3);
    let expected = run(&mut straight, &data, &cfg).unwrap();

    // Cancel after the first layer of block 1 (the third layer overall).
    let cfg = cfg.with_state_dir(&dir);
    let mut events = 0;
    let err = quantize_model(&mut TinyModel::new(18, 16, 24, 3), &data, &cfg, |p| {
        if p.stage != vlmq::pipeline::Stage::Quantize {
            return ControlFlow::Continue(()); // the importance pass
        }
        events += 1;
        if p.block == 1 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .unwrap_err();
    assert!(matches!(err, Error::Cancelled), "{err}");
    assert_eq!(events, 3);

    // The rerun (with the original model) resumes after block 0 and ends
    // where the uninterrupted run did, bit for bit.
    let mut resumed = TinyModel::new(18, 16, 24, 3);
    let out = run(&mut resumed, &data, &cfg).unwrap();
    assert_eq!(out.report.resumed_blocks, 1);
    assert_eq!(out.weights, expected.weights);
    assert_eq!(all_weights(&resumed), all_weights(&straight));
    let objectives = |o: &PipelineOutput| -> Vec<Option<f64>> {
        o.report.layers.iter().map(|l| l.objective).collect()
    };
    assert_eq!(objectives(&out), objectives(&expected));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn resuming_with_another_scorer_is_a_state_mismatch() {
    let data = samples(27, 4, 16);
    let dir = temp_dir("scorer");
    let saliency = |power| {
        ImportanceOptions::default()
            .with_scorer(GradientSaliency::new(power, Normalization::default()))
    };
    let cfg = config(QuantMethod::Vlmq)
        .with_importance(saliency(SaliencyPower::Two))
        .with_state_dir(&dir);
    run(&mut TinyModel::new(28, 16, 24, 2), &data, &cfg).unwrap();

    for other in [
        saliency(SaliencyPower::One),
        ImportanceOptions::default().with_scorer(ModalityWeights::new(0.5, 1.0, 1.0).unwrap()),
        saliency(SaliencyPower::Two).with_per_block(true),
    ] {
        let cfg = cfg.clone().with_importance(other);
        let err = run(&mut TinyModel::new(28, 16, 24, 2), &data, &cfg).unwrap_err();
        assert!(
            matches!(err, Error::StateMismatch { ref reason, .. } if reason.contains("configuration")),
            "{err}"
        );
    }
    // The same scorer, built again, resumes.
    let same = cfg.clone().with_importance(saliency(SaliencyPower::Two));
    let out = run(&mut TinyModel::new(28, 16, 24, 2), &data, &same).unwrap();
    assert_eq!(out.report.resumed_blocks, 2);
    let _ = std::fs::remove_dir_all(&dir);
}
