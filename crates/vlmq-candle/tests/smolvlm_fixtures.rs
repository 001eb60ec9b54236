//! SmolVLM on candle against transformers' own outputs on the hf-tiny-vlm
//! `smolvlm` fixture (tiny random weights; see the fixtures' README).
//!
//! Float outputs are compared by `max |ours - ref| / max |ref|` with bound
//! 1e-5 (the target): both sides compute in f32 with different
//! summation orders, so only rounding can differ.

use std::collections::HashMap;
use std::path::PathBuf;

use vlmq_candle::candle_core::{DType, Device, Tensor, D};
use vlmq_candle::{load_smolvlm_dir, SmolVlmModel};

const TOL: f64 = 1e-5;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf-tiny-vlm/smolvlm")
}

fn expected() -> HashMap<String, Tensor> {
    let p = dir().join("expected.safetensors");
    vlmq_candle::candle_core::safetensors::load(&p, &Device::Cpu).unwrap()
}

fn f64s(t: &Tensor) -> Tensor {
    t.to_dtype(DType::F64).unwrap()
}

fn max_abs(t: &Tensor) -> f64 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn rel(ours: &Tensor, reference: &Tensor) -> f64 {
    assert_eq!(ours.dims(), reference.dims());
    max_abs(&(f64s(ours) - f64s(reference)).unwrap()) / max_abs(&f64s(reference))
}

fn ints(t: &Tensor) -> Vec<i64> {
    t.to_dtype(DType::I64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn token_rows(exp: &HashMap<String, Tensor>) -> Vec<Vec<u32>> {
    exp["input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2()
        .unwrap()
}

/// Mean next-token cross-entropy in f64 over positions whose label is not -100.
fn loss(logits: &Tensor, labels: &[i64], vocab: usize) -> f64 {
    let x = logits
        .to_dtype(DType::F64)
        .unwrap()
        .reshape(((), vocab))
        .unwrap();
    let m = x.max_keepdim(D::Minus1).unwrap();
    let z = x.broadcast_sub(&m).unwrap();
    let lse = z
        .exp()
        .unwrap()
        .sum_keepdim(D::Minus1)
        .unwrap()
        .log()
        .unwrap();
    let lp: Vec<Vec<f64>> = z.broadcast_sub(&lse).unwrap().to_vec2().unwrap();
    let t = labels.len() / 2;
    let (mut sum, mut n) = (0.0, 0usize);
    for b in 0..2 {
        for i in 0..t - 1 {
            let y = labels[b * t + i + 1];
            if y != -100 {
                sum -= lp[b * t + i][y as usize];
                n += 1;
            }
        }
    }
    sum / n as f64
}

#[test]
fn smolvlm_matches_transformers() {
    let model = load_smolvlm_dir(dir(), DType::F32, &Device::Cpu).unwrap();
    let exp = expected();
    let frames = SmolVlmModel::real_frames(&exp["pixel_values"])
        .unwrap()
        .unwrap();
    assert_eq!(frames.dims(), &[13, 3, 32, 32], "padding frames dropped");

    let trace = model.vision_trace(&frames).unwrap();
    let mut worst: f64 = 0.0;
    let mut report = |what: &str, e: f64| {
        eprintln!("smolvlm {what}: rel err {e:.2e}");
        assert!(e < TOL, "smolvlm {what}: {e:e}");
        worst = worst.max(e);
    };
    report(
        "vision block 0 input",
        rel(&trace.block_inputs[0], &exp["vision_block0_input"]),
    );
    report(
        "vision last hidden",
        rel(&trace.last_hidden, &exp["vision_last_hidden_state"]),
    );
    let want_feats = Tensor::cat(
        &[
            &exp["image_features.0"],
            &exp["image_features.1"],
            &exp["image_features.2"],
        ],
        0,
    )
    .unwrap();
    report("image features", rel(&trace.features, &want_feats));

    let rows = token_rows(&exp);
    let batch: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
    let hs = model.hidden_states(&batch, Some(&frames)).unwrap();
    report("hidden_states.0", rel(&hs[0], &exp["hidden_states.0"]));
    report("hidden_states.1", rel(&hs[1], &exp["hidden_states.1"]));
    report("last layer output", rel(&hs[2], &exp["last_layer_output"]));
    let logits = model.logits(&batch, Some(&frames)).unwrap();
    report("logits", rel(&logits, &exp["logits"]));

    let want_loss = exp["loss"]
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let vocab = model.config().text.vocab_size;
    let ours = loss(&logits, &ints(&exp["labels"]), vocab);
    report("loss", (ours - want_loss).abs() / want_loss.abs());
    eprintln!("smolvlm worst rel err {worst:.2e}");
}

#[test]
fn image_token_count_and_frame_shape_are_checked() {
    let model = load_smolvlm_dir(dir(), DType::F32, &Device::Cpu).unwrap();
    let exp = expected();
    let frames = SmolVlmModel::real_frames(&exp["pixel_values"])
        .unwrap()
        .unwrap();
    let rows = token_rows(&exp);
    // One frame too few for the <image> tokens.
    let short = frames.narrow(0, 0, 12).unwrap();
    let batch: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
    let err = model.logits(&batch, Some(&short)).unwrap_err().to_string();
    assert!(err.contains("<image> tokens"), "{err}");
    let wrong = Tensor::zeros((1, 3, 16, 16), DType::F32, &Device::Cpu).unwrap();
    assert!(model.vision_trace(&wrong).is_err());
    let none = Tensor::zeros((1, 2, 3, 32, 32), DType::F32, &Device::Cpu).unwrap();
    assert!(SmolVlmModel::real_frames(&none).unwrap().is_none());
}

#[test]
fn a_missing_or_extra_tensor_is_named() {
    let src = dir();
    let tmp = std::env::temp_dir().join(format!("vlmq-smolvlm-bad-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::copy(src.join("config.json"), tmp.join("config.json")).unwrap();
    let mut tensors =
        vlmq_candle::candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu)
            .unwrap();
    let name = "model.connector.modality_projection.proj.weight";
    let proj = tensors.remove(name).unwrap();
    vlmq_candle::candle_core::safetensors::save(&tensors, tmp.join("model.safetensors")).unwrap();
    let err = load_smolvlm_dir(&tmp, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains(name), "{err}");
    tensors.insert(name.into(), proj);
    tensors.insert(
        "model.connector.extra.weight".into(),
        Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap(),
    );
    vlmq_candle::candle_core::safetensors::save(&tensors, tmp.join("model.safetensors")).unwrap();
    let err = load_smolvlm_dir(&tmp, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    std::fs::remove_dir_all(&tmp).unwrap();
    assert!(err.contains("model.connector.extra.weight"), "{err}");
}
