//! Calibration from token ids the caller has cut (`Calibration::Tokens`):
//! drawn by the recipe's seed with `vlmq::sample_indices`, cut to
//! `seq_len`, and refused with the sample named when a row is too short or
//! holds an id the tokenizer does not have.

use std::ops::ControlFlow;
use std::path::PathBuf;

use vlmq::Error;
use vlmq_candle::{Calibration, Quantized, Quantizer, Recipe};

fn model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf-tiny/llama")
}

fn run(data: Calibration, samples: usize, seed: u64) -> vlmq::Result<Quantized> {
    let recipe = Recipe {
        samples,
        seq_len: 8,
        seed,
        ..Recipe::default()
    }
    .check("test".as_ref())?;
    Quantizer::from_pretrained(model())?
        .calibrate(data, "tokens")?
        .quantize(&recipe, |_| ControlFlow::Continue(()))
}

/// Ten distinct rows of 12 ids, longer than the recipe's 8.
fn rows() -> Vec<Vec<u32>> {
    (0..10u32)
        .map(|r| (0..12u32).map(|i| (r * 31 + i * 7) % 200).collect())
        .collect()
}

#[test]
fn token_samples_are_the_seeded_draw_cut_to_seq_len() {
    let (samples, seed) = (3, 5);
    let drawn = run(Calibration::Tokens(rows()), samples, seed).unwrap();
    // The same rows, drawn by hand and already cut: every one is taken.
    let picked: Vec<Vec<u32>> = vlmq::sample_indices(10, samples, seed)
        .into_iter()
        .map(|i| rows()[i][..8].to_vec())
        .collect();
    let by_hand = run(Calibration::Tokens(picked), samples, seed).unwrap();
    assert_eq!(drawn.output().weights, by_hand.output().weights);
    // Another seed draws other rows, and the solution moves with them.
    let other = run(Calibration::Tokens(rows()), samples, seed + 1).unwrap();
    assert_ne!(
        vlmq::sample_indices(10, samples, seed),
        vlmq::sample_indices(10, samples, seed + 1)
    );
    assert_ne!(drawn.output().weights, other.output().weights);
}

#[test]
fn a_short_row_or_an_unknown_id_is_refused_naming_the_sample() {
    let field = |data: Calibration| match run(data, 2, 0).err() {
        Some(Error::InvalidField { field, .. }) => field,
        other => panic!("expected InvalidField, got {other:?}"),
    };
    assert_eq!(
        field(Calibration::Tokens(vec![vec![1, 2, 3], vec![4]])),
        "sample 2"
    );
    assert_eq!(
        field(Calibration::Tokens(vec![vec![1, 2, 3], vec![4, u32::MAX]])),
        "sample 2"
    );
}
