//! Safetensors io of `vlmq_nn` parameters: round trips in f32/f16/bf16 and
//! typed errors naming the tensor for missing tensors, wrong shapes and
//! wrong dtypes.

use safetensors::tensor::TensorView;
use safetensors::Dtype;
use vlmq::Error;
use vlmq_nn::*;

fn model(seed: u64) -> SequenceModel {
    let mut rng = Rng::new(seed);
    SequenceModel::decoder(&mut rng, 11, 2, BlockConfig::decoder(8, 2, 12)).unwrap()
}

fn params(m: &dyn Module) -> Vec<(String, Vec<f32>)> {
    let mut out = Vec::new();
    m.visit_params("", &mut |n, t| {
        out.push((n.to_string(), t.iter().copied().collect()))
    });
    out
}

fn max_rel_diff(a: &dyn Module, b: &dyn Module) -> f32 {
    params(a)
        .iter()
        .zip(params(b))
        .flat_map(|((_, x), (_, y))| {
            x.iter()
                .zip(y)
                .map(|(u, v)| (u - v).abs() / u.abs().max(1e-3))
                .collect::<Vec<_>>()
        })
        .fold(0.0, f32::max)
}

#[test]
fn round_trips_in_every_dtype() {
    let source = model(1);
    for (dtype, tol) in [
        (StoreDtype::F32, 0.0),
        (StoreDtype::F16, 1e-3),
        (StoreDtype::Bf16, 8e-3),
    ] {
        let bytes = save_safetensors_bytes(&source, dtype).unwrap();
        let mut target = model(2);
        load_safetensors_bytes(&mut target, &bytes).unwrap();
        let diff = max_rel_diff(&source, &target);
        assert!(diff <= tol, "{dtype:?}: relative difference {diff}");
    }
}

#[test]
fn round_trips_through_a_file() {
    let dir = std::env::temp_dir().join(format!("vlmq-nn-params-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.safetensors");
    let source = model(3);
    save_safetensors(&source, &path, StoreDtype::F32).unwrap();
    let mut target = model(4);
    load_safetensors(&mut target, &path).unwrap();
    assert_eq!(max_rel_diff(&source, &target), 0.0);
    std::fs::remove_dir_all(&dir).unwrap();
    let err = load_safetensors(&mut target, &path).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
}

/// Serializes `model`'s tensors, letting `edit` drop or replace them.
fn checkpoint(
    edit: impl Fn(&str, Vec<usize>, Vec<u8>) -> Option<(Dtype, Vec<usize>, Vec<u8>)>,
) -> Vec<u8> {
    let mut tensors = Vec::new();
    model(5).visit_params("", &mut |n, t| {
        let bytes: Vec<u8> = t.iter().flat_map(|v| v.to_le_bytes()).collect();
        if let Some(e) = edit(n, t.shape().to_vec(), bytes) {
            tensors.push((n.to_string(), e));
        }
    });
    let views: Vec<(&str, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, (d, s, b))| (n.as_str(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize(views, None).unwrap()
}

const VICTIM: &str = "blocks.1.attn.k.weight";

#[test]
fn missing_tensor_is_named() {
    let bytes = checkpoint(|n, s, b| (n != VICTIM).then_some((Dtype::F32, s, b)));
    let mut m = model(6);
    let before = params(&m);
    match load_safetensors_bytes(&mut m, &bytes).unwrap_err() {
        Error::MissingTensor { name } => assert_eq!(name, VICTIM),
        other => panic!("unexpected error {other}"),
    }
    assert_eq!(
        before,
        params(&m),
        "a failed load must not modify the model"
    );
}

#[test]
fn wrong_shape_is_named() {
    let bytes = checkpoint(|n, s, b| {
        if n == "blocks.1.mlp.up.weight" {
            Some((Dtype::F32, vec![s[1], s[0]], b))
        } else {
            Some((Dtype::F32, s, b))
        }
    });
    let err = load_safetensors_bytes(&mut model(6), &bytes).unwrap_err();
    match &err {
        Error::ShapeMismatch {
            what,
            expected,
            actual,
        } => {
            assert!(what.contains("blocks.1.mlp.up.weight"), "{err}");
            assert_eq!(expected, &vec![12, 8]);
            assert_eq!(actual, &vec![8, 12]);
        }
        other => panic!("unexpected error {other}"),
    }
    let bytes = checkpoint(|n, s, b| {
        if n == "embed.weight" {
            Some((
                Dtype::F32,
                vec![s[0] - 1, s[1]],
                b[..b.len() - 4 * s[1]].to_vec(),
            ))
        } else {
            Some((Dtype::F32, s, b))
        }
    });
    let err = load_safetensors_bytes(&mut model(6), &bytes).unwrap_err();
    assert!(
        matches!(&err, Error::ShapeMismatch { what, .. } if what.contains("embed.weight")),
        "{err}"
    );
}

#[test]
fn wrong_dtype_is_named() {
    let bytes = checkpoint(|n, s, b| {
        if n == VICTIM {
            Some((Dtype::I32, s, b))
        } else {
            Some((Dtype::F32, s, b))
        }
    });
    match load_safetensors_bytes(&mut model(6), &bytes).unwrap_err() {
        Error::DtypeMismatch { name, actual, .. } => {
            assert_eq!(name, VICTIM);
            assert_eq!(actual, "I32");
        }
        other => panic!("unexpected error {other}"),
    }
}

#[test]
fn garbage_bytes_are_a_safetensors_error() {
    let err = load_safetensors_bytes(&mut model(6), b"not a checkpoint").unwrap_err();
    assert!(matches!(err, Error::Safetensors { .. }), "{err}");
}
