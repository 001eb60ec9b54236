//! Unit tests of the scorers, the normalization and the diagnostics.

use ndarray::{array, Array1, Array2};

use super::*;
use crate::backend::Modality;

fn mixed(n_vision: usize, n_text: usize) -> TokenInfo {
    let mut m = vec![Modality::Vision; n_vision];
    m.extend(vec![Modality::Text; n_text]);
    TokenInfo::new(m)
}

#[test]
fn uniform_is_ones_with_zero_padding() {
    let tokens = mixed(2, 2)
        .with_valid(vec![true, false, true, true])
        .unwrap();
    let a = Uniform.factors(&SampleSignals::new(&tokens, 0)).unwrap();
    assert_eq!(a.to_vec(), vec![1.0, 0.0, 1.0, 1.0]);
    assert!(!Uniform.needs_gradients());
}

#[test]
fn inconsistent_token_info_is_a_shape_error() {
    // A mask of another length cannot be built (the fields are private).
    let err = mixed(2, 1).with_valid(vec![true]).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
}

#[test]
fn modality_weights_validate_and_apply() {
    assert!(ModalityWeights::new(-1.0, 1.0, 1.0).is_err());
    assert!(ModalityWeights::new(1.0, f32::NAN, 1.0).is_err());
    let w = ModalityWeights::new(0.5, 2.0, 1.0).unwrap();
    let tokens = TokenInfo::new(vec![
        Modality::Vision,
        Modality::Text,
        Modality::Other,
        Modality::Text,
    ])
    .with_valid(vec![true, true, true, false])
    .unwrap();
    let a = w.factors(&SampleSignals::new(&tokens, 9)).unwrap();
    assert_eq!(a.to_vec(), vec![0.5, 2.0, 1.0, 0.0]);
}

#[test]
fn normalization_means_one_floors_caps_and_zeroes_padding() {
    let tokens = mixed(5, 0)
        .with_valid(vec![true, true, true, true, false])
        .unwrap();
    let raw = array![0.0f32, 1.0, 1.0, 10.0, 100.0];
    // Mean over the 4 valid tokens is 3.
    let a = Normalization::new(0.05, Some(2.0))
        .unwrap()
        .apply(raw.view(), &tokens)
        .unwrap();
    assert_eq!(
        a.to_vec(),
        vec![0.05, (1.0f64 / 3.0) as f32, (1.0f64 / 3.0) as f32, 2.0, 0.0]
    );
    let a = Normalization::new(0.0, None)
        .unwrap()
        .apply(raw.view(), &tokens)
        .unwrap();
    let mean = a.iter().take(4).map(|&v| f64::from(v)).sum::<f64>() / 4.0;
    assert!((mean - 1.0).abs() < 1e-6);
    // No signal: the sample counts as in GPTQ.
    let zero = Normalization::default()
        .apply(Array1::zeros(5).view(), &tokens)
        .unwrap();
    assert_eq!(zero.to_vec(), vec![1.0, 1.0, 1.0, 1.0, 0.0]);
    // Padding may hold anything, even NaN; a valid NaN or negative is an error.
    let mut bad = raw.clone();
    bad[4] = f32::NAN;
    assert!(Normalization::default().apply(bad.view(), &tokens).is_ok());
    bad[1] = -1.0;
    let err = Normalization::default()
        .apply(bad.view(), &tokens)
        .unwrap_err();
    assert!(
        matches!(err, Error::InvalidImportance { token: 1, .. }),
        "{err}"
    );
    assert!(Normalization::default()
        .apply(raw.slice(ndarray::s![..3]), &tokens)
        .is_err());
    assert!(Normalization::new(1.5, None).is_err());
    assert!(Normalization::new(0.1, Some(0.5)).is_err());
    let all_pad = mixed(2, 0).with_valid(vec![false, false]).unwrap();
    assert_eq!(
        Normalization::default()
            .apply(array![1.0f32, 2.0].view(), &all_pad)
            .unwrap()
            .to_vec(),
        vec![0.0, 0.0]
    );
}

#[test]
fn saliency_powers_and_group_concatenation() {
    let tokens = mixed(1, 2);
    let q = array![[1.0f32, 2.0], [0.0, 0.0], [3.0, 0.0]];
    let k = array![[2.0f32], [1.0], [4.0]];
    let norms = grad_sq_norms(&[q.view(), k.view()]).unwrap();
    let s2 = raw_saliency(norms.view(), SaliencyPower::Two).unwrap();
    assert_eq!(s2.to_vec(), vec![9.0, 1.0, 25.0]);
    let s1 = raw_saliency(norms.view(), SaliencyPower::One).unwrap();
    assert_eq!(s1.to_vec(), vec![3.0, 1.0, 5.0]);
    let concat = ndarray::concatenate![ndarray::Axis(1), q, k];
    assert_eq!(grad_sq_norms(&[concat.view()]).unwrap(), norms);

    let scorer = GradientSaliency::new(SaliencyPower::Two, Normalization::new(0.0, None).unwrap());
    assert!(scorer.needs_gradients());
    let a = scorer
        .factors(&SampleSignals::new(&tokens, 0).with_grad_sq_norms(norms.view()))
        .unwrap();
    let want: Vec<f32> = [9.0f64, 1.0, 25.0]
        .iter()
        .map(|v| (v / (35.0 / 3.0)) as f32)
        .collect();
    assert_eq!(a.to_vec(), want);
}

#[test]
fn saliency_rejects_missing_ragged_or_non_finite_gradients() {
    let tokens = mixed(2, 0);
    let s = GradientSaliency::default();
    assert!(matches!(
        s.factors(&SampleSignals::new(&tokens, 0)),
        Err(Error::Empty { .. })
    ));
    let a = Array2::<f32>::ones((2, 3));
    let b = Array2::<f32>::ones((3, 3));
    assert!(matches!(
        grad_sq_norms(&[a.view(), b.view()]),
        Err(Error::ShapeMismatch { .. })
    ));
    let mut c = Array2::<f32>::ones((2, 3));
    c[[1, 2]] = f32::INFINITY;
    assert!(matches!(
        grad_sq_norms(&[c.view()]),
        Err(Error::NonFinite { .. })
    ));
    let bad = ndarray::array![1.0f32, f32::NAN];
    assert!(matches!(
        s.factors(&SampleSignals::new(&tokens, 0).with_grad_sq_norms(bad.view())),
        Err(Error::NonFinite { .. })
    ));
    let negative = ndarray::array![1.0f32, -1.0];
    assert!(matches!(
        s.factors(&SampleSignals::new(&tokens, 0).with_grad_sq_norms(negative.view())),
        Err(Error::InvalidImportance { token: 1, .. })
    ));
    let three = ndarray::array![1.0f32, 1.0, 1.0];
    assert!(matches!(
        s.factors(&SampleSignals::new(&tokens, 0).with_grad_sq_norms(three.view())),
        Err(Error::ShapeMismatch { .. })
    ));
}

#[test]
fn pilot_random_is_deterministic_per_sample_and_touches_only_valid_vision() {
    let mut valid = vec![true; 50];
    valid[3] = false;
    valid[45] = false;
    let tokens = mixed(40, 10).with_valid(valid).unwrap();
    let p = PilotScorer::new(0.5, 0.2, PilotSelection::Random { seed: 11 }).unwrap();
    let a = p.factors(&SampleSignals::new(&tokens, 5)).unwrap();
    assert_eq!(a, p.factors(&SampleSignals::new(&tokens, 5)).unwrap());
    assert_ne!(a, p.factors(&SampleSignals::new(&tokens, 6)).unwrap());
    // 39 valid vision tokens: round(19.5) = 20 down-weighted.
    assert_eq!(a.iter().filter(|&&v| v == 0.2).count(), 20);
    assert_eq!((a[3], a[45]), (0.0, 0.0));
    assert!(a
        .iter()
        .skip(40)
        .enumerate()
        .all(|(i, &v)| v == if i == 5 { 0.0 } else { 1.0 }));
    // Every vision token is chosen about half the time over many samples.
    let mut hits = [0usize; 40];
    for s in 0..400 {
        let a = p.factors(&SampleSignals::new(&tokens, s)).unwrap();
        for (t, h) in hits.iter_mut().enumerate() {
            *h += usize::from(a[t] == 0.2);
        }
    }
    assert!(
        hits.iter()
            .enumerate()
            .all(|(t, &h)| t == 3 || (150..=260).contains(&h)),
        "{hits:?}"
    );
}

#[test]
fn pilot_lowest_saliency_picks_the_quietest_vision_tokens() {
    let tokens = TokenInfo::new(vec![
        Modality::Vision,
        Modality::Vision,
        Modality::Text,
        Modality::Vision,
        Modality::Vision,
    ]);
    let g = array![[3.0f32], [1.0], [0.0], [2.0], [1.0]];
    let norms = grad_sq_norms(&[g.view()]).unwrap();
    let p = PilotScorer::new(0.5, 0.0, PilotSelection::LowestSaliency).unwrap();
    assert!(p.needs_gradients());
    let a = p
        .factors(&SampleSignals::new(&tokens, 0).with_grad_sq_norms(norms.view()))
        .unwrap();
    assert_eq!(a.to_vec(), vec![1.0, 0.0, 1.0, 1.0, 0.0]);
    assert!(p.factors(&SampleSignals::new(&tokens, 0)).is_err());
    assert!(PilotScorer::new(1.5, 0.1, PilotSelection::LowestSaliency).is_err());
    assert!(PilotScorer::new(0.5, -0.1, PilotSelection::LowestSaliency).is_err());
}

#[test]
fn diagnostics_shares_and_stats() {
    let tokens = mixed(3, 1)
        .with_valid(vec![true, true, true, false])
        .unwrap();
    let x = array![[1.0f32, 1.0], [1.0, 1.0], [0.0, 2.0], [5.0, 5.0]];
    let mut d = ImportanceDiagnostics::new();
    d.add(x.view(), &tokens, array![1.0f32, 1.0, 1.0, 0.0].view())
        .unwrap();
    let tokens2 = TokenInfo::new(vec![Modality::Text]);
    let mut d2 = ImportanceDiagnostics::new();
    d2.add(
        array![[2.0f32, 0.0]].view(),
        &tokens2,
        array![4.0f32].view(),
    )
    .unwrap();
    d.merge(&d2);
    // before: vision 2 + 2 + 4 = 8, text 4; after: vision 8, text 16.
    assert_eq!(d.trace_share_before(Modality::Vision), 8.0 / 12.0);
    assert_eq!(d.trace_share_after(Modality::Text), 16.0 / 24.0);
    assert_eq!(d.trace_share_after(Modality::Other), 0.0);
    assert_eq!(d.padding_tokens(), 1);
    let r = d.report();
    assert_eq!(r.len(), 2);
    assert_eq!((r[0].modality, r[0].tokens), (Modality::Vision, 3));
    assert_eq!(r[1].alpha.unwrap().max, 4.0);
    assert!(d.to_string().contains("vision"));
    let err = d
        .add(x.view(), &tokens, array![1.0f32, -1.0, 1.0, 1.0].view())
        .unwrap_err();
    assert!(matches!(err, Error::InvalidImportance { token: 1, .. }));
    assert!(d.add(x.view(), &tokens, array![1.0f32].view()).is_err());
}

#[test]
fn alpha_stats_quantiles_use_nearest_rank() {
    let v: Vec<f32> = (1..=10).rev().map(|i| i as f32).collect();
    let s = AlphaStats::from_values(&v).unwrap();
    assert_eq!(
        (s.min, s.p10, s.p50, s.p90, s.max),
        (1.0, 1.0, 5.0, 9.0, 10.0)
    );
    assert_eq!(s.mean, 5.5);
    assert!(AlphaStats::from_values(&[]).is_none());
}

#[test]
fn scorers_are_object_safe() {
    let scorers: Vec<Box<dyn TokenImportance>> = vec![
        Box::new(Uniform),
        Box::new(ModalityWeights::new(1.0, 1.0, 1.0).unwrap()),
        Box::new(PilotScorer::new(0.5, 0.1, PilotSelection::Random { seed: 0 }).unwrap()),
        Box::new(GradientSaliency::default()),
    ];
    let names: Vec<&str> = scorers.iter().map(|s| s.name()).collect();
    assert_eq!(
        names,
        vec![
            "uniform",
            "modality-weights",
            "pilot(random)",
            "gradient-saliency(p=2)"
        ]
    );
}
