//! The configuration is checked against the model before any work, and
//! errors from inside a run keep their type under the place they happened.

mod common;

use common::tiny::{all_weights, samples, Sample, TinyModel};
use ndarray::Array2;
use vlmq::pipeline::{quantize_model, BlockSelection, PipelineConfig, PipelineOutput, QuantMethod};
use vlmq::{Bits, Error, GptqConfig, GroupSize, QuantScheme};

fn config(method: QuantMethod) -> PipelineConfig {
    let scheme =
        QuantScheme::new(Bits::new(3).unwrap()).with_group_size(GroupSize::new(8).unwrap());
    PipelineConfig::new(method, GptqConfig::new(scheme))
}

fn run(
    model: &mut TinyModel,
    data: &[Sample],
    cfg: &PipelineConfig,
) -> vlmq::Result<PipelineOutput> {
    quantize_model(model, data, cfg, |_| {})
}

/// Runs `cfg` and checks that it failed before touching any weight.
fn refused(cfg: &PipelineConfig) -> Error {
    let mut model = TinyModel::new(1, 16, 24, 3);
    let before = all_weights(&model);
    let err = run(&mut model, &samples(1, 2, 16), cfg).unwrap_err();
    assert_eq!(all_weights(&model), before, "{err}");
    err
}

#[test]
fn a_typo_in_an_override_key_is_an_error_listing_the_unknown_names() {
    let eight = Some(QuantScheme::new(Bits::new(8).unwrap()));
    let cfg = config(QuantMethod::Gptq)
        .with_layer_override("a", eight)
        .with_layer_override("tiny.1/bb", None)
        .with_layer_override("mlp.down", None);
    let err = refused(&cfg);
    match &err {
        Error::UnknownNames { names, known, .. } => {
            assert_eq!(names, &["mlp.down".to_string(), "tiny.1/bb".to_string()]);
            assert!(known.contains('a') && known.contains('b'), "{known}");
        }
        other => panic!("expected UnknownNames, got {other}"),
    }
    assert!(err.to_string().contains("tiny.1/bb"), "{err}");
    // A key naming a layer of an unselected block is still a real name.
    let cfg = config(QuantMethod::Gptq)
        .with_blocks(BlockSelection::Indices(vec![0]))
        .with_layer_override("tiny.2/b", None);
    run(&mut TinyModel::new(1, 16, 24, 3), &samples(1, 2, 16), &cfg).unwrap();
}

#[test]
fn an_out_of_range_block_index_or_an_unmatched_prefix_is_an_error() {
    let cfg = config(QuantMethod::Gptq).with_blocks(BlockSelection::Indices(vec![0, 3, 7]));
    let err = refused(&cfg);
    assert!(
        matches!(&err, Error::UnknownNames { names, known, .. }
            if names == &["3".to_string(), "7".to_string()] && known.contains("0..=2")),
        "{err}"
    );
    let cfg = config(QuantMethod::Gptq).with_blocks(BlockSelection::NamePrefix("lm.".into()));
    let err = refused(&cfg);
    assert!(
        matches!(&err, Error::UnknownNames { names, known, .. }
            if names == &["lm.".to_string()] && known.contains("tiny.0")),
        "{err}"
    );
}

#[test]
fn a_group_size_that_does_not_divide_a_layer_gives_ragged_groups() {
    // `a` takes 16 inputs, `b` 24. Groups of 10 give a = 10 + 6 and b = 10 + 10 + 4
    // (the last group shorter, g_idx[i] = i / 10); groups of 24 are one group of all
    // 16 inputs for `a`.
    for (g, groups_a, groups_b) in [(10, 2, 3), (24, 1, 1)] {
        let scheme =
            QuantScheme::new(Bits::new(3).unwrap()).with_group_size(GroupSize::new(g).unwrap());
        let cfg = PipelineConfig::new(QuantMethod::Gptq, GptqConfig::new(scheme));
        let mut model = TinyModel::new(1, 16, 24, 3);
        let out = run(&mut model, &samples(1, 2, 16), &cfg).unwrap();
        let a = &out.weights[&(0, "a".to_string())];
        let b = &out.weights[&(0, "b".to_string())];
        assert_eq!((a.in_features(), a.groups()), (16, groups_a));
        assert_eq!((b.in_features(), b.groups()), (24, groups_b));
        let expected: Vec<u32> = (0..24).map(|i| (i / g) as u32).collect();
        assert_eq!(b.g_idx().to_vec(), expected);
    }
}

#[test]
fn bad_backend_output_is_a_typed_error_naming_block_layer_and_sample() {
    let cfg = config(QuantMethod::Gptq);
    let err = run(&mut TinyModel::new(1, 16, 24, 2), &[], &cfg).unwrap_err();
    assert!(matches!(err, Error::Empty { .. }), "{err}");

    let at = |err: &Error, layer: &str, sample: Option<usize>| {
        matches!(err, Error::InBlock { block: 0, layer: Some(l), sample: s, .. }
            if l == layer && *s == sample)
    };
    let mut data = samples(1, 3, 16);
    data[1].x = Array2::ones((16, 15));
    let err = run(&mut TinyModel::new(1, 16, 24, 2), &data, &cfg).unwrap_err();
    assert!(at(&err, "a", Some(1)), "{err}");
    assert!(matches!(err.root(), Error::ShapeMismatch { .. }), "{err}");

    let mut data = samples(1, 3, 16);
    data[2].x[[3, 4]] = f32::NAN;
    let err = run(&mut TinyModel::new(1, 16, 24, 2), &data, &cfg).unwrap_err();
    assert!(at(&err, "a", Some(2)), "{err}");
    assert!(
        matches!(err.root(), Error::NonFinite { index, .. } if index == &[3, 4]),
        "{err}"
    );

    let mut model = TinyModel::new(1, 16, 24, 2);
    model.hide_layer = true;
    let err = run(&mut model, &samples(1, 3, 16), &cfg).unwrap_err();
    assert!(at(&err, "a", None), "{err}");
    assert!(matches!(err.root(), Error::Backend { .. }), "{err}");

    let mut data = samples(1, 3, 16);
    // Token info for 15 tokens while the sample has 16 rows.
    data[0].info = vlmq::TokenInfo::uniform(vlmq::Modality::Text, 15);
    let err = run(&mut TinyModel::new(1, 16, 24, 2), &data, &cfg).unwrap_err();
    assert!(at(&err, "a", Some(0)), "{err}");
    assert!(matches!(err.root(), Error::ShapeMismatch { .. }), "{err}");
}

#[test]
fn importance_pass_errors_name_the_block_and_sample() {
    // A target row with a NaN: the loss gradient is NaN, and the scorer
    // rejects the sample's gradient norms under block and layer.
    let mut data = samples(2, 3, 16);
    data[1].targets[0].1[0] = f32::NAN;
    let err = run(
        &mut TinyModel::new(2, 16, 24, 2),
        &data,
        &config(QuantMethod::Vlmq),
    )
    .unwrap_err();
    assert!(
        matches!(
            &err,
            Error::InBlock {
                layer: Some(_),
                sample: Some(1),
                ..
            }
        ),
        "{err}"
    );
    assert!(matches!(err.root(), Error::NonFinite { .. }), "{err}");
}
