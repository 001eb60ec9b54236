//! The pipeline on the crate's own backend: every importance source and
//! granularity runs on a small ViT -> projector -> LM model.

use vlmq::pipeline::{
    input_statistics, quantize_model, GradientSource, ImportanceOptions, PipelineConfig,
    QuantMethod,
};
use vlmq::{Bits, GptqConfig, GroupSize, QuantScheme};
use vlmq::{Modality, TokenInfo};
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

#[test]
fn every_importance_source_runs_on_the_reference_backend() {
    let calib: Vec<_> = examples(1, Split::Calibration, 0, 4)
        .iter()
        .map(to_sample)
        .collect();
    let scheme =
        QuantScheme::new(Bits::new(3).unwrap()).with_group_size(GroupSize::new(8).unwrap());
    for (source, per_block) in [
        (GradientSource::TaskLoss, false),
        (GradientSource::TaskLoss, true),
        (GradientSource::BlockLocal, false),
        (GradientSource::BlockLocal, true),
    ] {
        let mut model = build_model(tiny(), 3).unwrap();
        let cfg = PipelineConfig::new(QuantMethod::VlmqGptaq, GptqConfig::new(scheme))
            .with_importance(
                ImportanceOptions::default()
                    .with_source(source)
                    .with_per_block(per_block),
            )
            .with_layer_objectives(true);
        let out = quantize_model(&mut model, &calib, &cfg, |_| {})
            .unwrap_or_else(|e| panic!("{source:?}, per block {per_block}: {e}"));
        // ViT block (q, k, v, o, up, down), projector, LM block (q, k, v, o, gate, up, down).
        assert_eq!(out.report.layers.len(), 14, "{source:?} {per_block}");
        // The run's CPU time is read around it (getrusage on Unix): some
        // was spent, and the utilization is that time per wall second and core.
        if cfg!(unix) {
            let cpu = out.report.cpu_seconds.expect("CPU time on unix");
            assert!(cpu > 0.0, "cpu {cpu}");
            let u = out.report.cpu_utilization().unwrap();
            let expect = cpu / out.report.total_seconds / out.report.cores as f64;
            assert!((u - expect).abs() <= 1e-12 * expect, "{u} vs {expect}");
            assert!(out.report.to_string().contains("CPU"));
        }
        // Gradient factors are not uniform in the ViT block (index 0) nor in the
        // LM block (index 2). The mean factor cannot show it inside the ViT,
        // where every token is a vision token and factors have mean 1 per
        // sample by construction; the Hessian can: with uniform factors the
        // weighted Hessian *is* the unweighted one and the two objectives of
        // a layer agree to rounding (~1e-6 relative), while these factors
        // move them by 1-60%. 1e-3 separates the two cases.
        for block in [0, 2] {
            assert!(
                out.report.layers.iter().any(|l| {
                    let (o, u) = (l.objective.unwrap(), l.objective_unweighted.unwrap());
                    l.block == block && (o - u).abs() > 1e-3 * u
                }),
                "{source:?}, per block {per_block}: factors stayed uniform in block {block}"
            );
        }
    }
}

/// Per-modality input statistics add up to the unweighted ones: with 0/1
/// masks, `S_text H_text + S_vision H_vision = S_all H_all` (each `H` is a sum
/// divided by its weight sum `S`), up to the f32 rounding of the stored
/// Hessians and of the three products (a few ulps of the largest entry; 1e-5
/// relative leaves two orders of magnitude of room).
/// The ViT blocks and the projector see no text token, so their text
/// statistics are absent.
#[test]
fn modality_input_statistics_add_up_to_the_unweighted_ones() {
    let model = build_model(tiny(), 5).unwrap();
    let samples: Vec<_> = examples(2, Split::Calibration, 0, 3)
        .iter()
        .map(to_sample)
        .collect();
    let all = input_statistics(&model, &samples, &|_| None).unwrap();
    let text = input_statistics(&model, &samples, &|info: &TokenInfo| {
        Some(info.mask(Modality::Text))
    })
    .unwrap();
    let vision = input_statistics(&model, &samples, &|info: &TokenInfo| {
        Some(info.mask(Modality::Vision))
    })
    .unwrap();
    assert_eq!(all.len(), text.len());
    // ViT block (qkv, o, up, down), projector, LM block (qkv, o, gate+up, down).
    assert_eq!(all.len(), 4 + 1 + 4);
    for ((a, t), v) in all.iter().zip(&text).zip(&vision) {
        let a_stats = a.stats.as_ref().expect("every group sees tokens");
        let v_stats = v.stats.as_ref().expect("every block sees vision tokens");
        let lm = a.block > 1;
        assert_eq!(t.stats.is_some(), lm, "block {}", a.block);
        let mut sum = &v_stats.hessian * v_stats.weight_sum as f32;
        if let Some(t_stats) = &t.stats {
            sum += &(&t_stats.hessian * t_stats.weight_sum as f32);
        }
        let expected = &a_stats.hessian * a_stats.weight_sum as f32;
        let scale = expected.iter().fold(0.0f32, |m, &x| m.max(x.abs()));
        let worst = (&sum - &expected)
            .iter()
            .fold(0.0f32, |m, &x| m.max(x.abs()));
        assert!(
            worst <= 1e-5 * scale,
            "block {}: {worst} vs {scale}",
            a.block
        );
        assert_eq!(a_stats.tokens, v_stats.tokens);
    }
}
