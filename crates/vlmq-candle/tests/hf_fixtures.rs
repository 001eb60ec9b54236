//! The candle decoder against transformers' own outputs on the hf-tiny
//! fixtures (tiny random Llama with GQA and tied head; Qwen2 with q/k/v
//! biases and a separate head).
//!
//! Relative error is `max |ours - reference| / max |reference|` (max-abs
//! norm). Bound 1e-4: both sides compute in f32 with different summation
//! orders; the observed errors are ~1e-6.

use std::collections::HashMap;
use std::path::PathBuf;

use vlmq::{GradientModel, QuantizableModel};
use vlmq_candle::candle_core::{DType, Device, Tensor};
use vlmq_candle::{encode, load_hf_dir, tokenizer_from_file, TextSample};

fn dir(name: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/hf-tiny"
    ))
    .join(name)
}

fn expected(name: &str) -> HashMap<String, Tensor> {
    let p = dir(name).join("expected.safetensors");
    assert!(p.exists(), "fixture {p:?} is missing");
    vlmq_candle::candle_core::safetensors::load(&p, &Device::Cpu).unwrap()
}

fn rel(ours: &Tensor, reference: &Tensor) -> f64 {
    assert_eq!(ours.dims(), reference.dims());
    let d = (ours.to_dtype(DType::F64).unwrap() - reference.to_dtype(DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let m = reference
        .to_dtype(DType::F64)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    d / m
}

fn ids(exp: &HashMap<String, Tensor>) -> Vec<Vec<u32>> {
    exp["input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2::<u32>()
        .unwrap()
}

fn check(name: &str) {
    let model = load_hf_dir(dir(name), DType::F32, &Device::Cpu).unwrap();
    let exp = expected(name);
    let rows = ids(&exp);
    let batch: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();

    // Tokenizer reproduces the ids.
    let inputs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir(name).join("inputs.json")).unwrap())
            .unwrap();
    let tk = tokenizer_from_file(dir(name).join("tokenizer.json")).unwrap();
    for (row, want) in inputs["rows"].as_array().unwrap().iter().zip(&rows) {
        assert_eq!(&encode(&tk, row["text"].as_str().unwrap()).unwrap(), want);
    }

    let hs = model.hidden_states(&batch).unwrap();
    assert!(rel(&hs[0], &exp["hidden_states.0"]) < 1e-6, "embeddings");
    let e1 = rel(&hs[1], &exp["hidden_states.1"]);
    let e2 = rel(&hs[2], &exp["last_layer_output"]);
    let logits = model.logits(&batch).unwrap();
    let el = rel(&logits, &exp["logits"]);
    eprintln!("{name}: rel hidden1 {e1:.2e}, last {e2:.2e}, logits {el:.2e}");
    assert!(e1 < 1e-4 && e2 < 1e-4 && el < 1e-4);

    // Loss and the input gradient of layer 1 through the backend trait.
    // The fixture's loss is the mean over both rows (same length), so each
    // row's gradient is halved.
    let want_loss = exp["loss"].to_scalar::<f32>().unwrap();
    let mut loss = 0.0;
    let mut grads = Vec::new();
    for row in &rows {
        let s = TextSample::causal(row.clone());
        let h0 = model.embed(&s).unwrap();
        let h1 = model.block_forward(0, &h0, &s, None).unwrap();
        let h2 = model.block_forward(1, &h1, &s, None).unwrap();
        let (l, g) = model.loss_and_grad(&h2, &s).unwrap().unwrap();
        loss += l / rows.len() as f32;
        let g1 = model.block_backward(1, &h1, &s, &g, None).unwrap();
        grads.push((g1 / rows.len() as f64).unwrap());
    }
    assert!(
        ((loss - want_loss) / want_loss).abs() < 1e-5,
        "loss {loss} vs {want_loss}"
    );
    let g = Tensor::cat(&grads, 0).unwrap();
    let eg = rel(&g, &exp["grad_layer1_input"]);
    eprintln!("{name}: loss {loss} (ref {want_loss}), rel grad_layer1_input {eg:.2e}");
    assert!(eg < 1e-4);
}

#[test]
fn llama_matches_transformers() {
    check("llama");
}

#[test]
fn qwen2_matches_transformers() {
    check("qwen2");
}

#[test]
fn missing_files_and_bad_configs_are_typed_errors() {
    let tmp = std::env::temp_dir().join(format!("vlmq-candle-missing-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    // No config.json.
    let e = load_hf_dir(&tmp, DType::F32, &Device::Cpu).unwrap_err();
    assert!(matches!(e, vlmq::Error::Io { .. }), "{e}");
    // Unsupported architecture.
    std::fs::write(tmp.join("config.json"), r#"{"model_type": "gpt2"}"#).unwrap();
    let e = load_hf_dir(&tmp, DType::F32, &Device::Cpu).unwrap_err();
    assert!(
        matches!(e, vlmq::Error::Json { .. }) && e.to_string().contains("gpt2"),
        "{e}"
    );
    // Config that disagrees with the weights (wider hidden size).
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir("llama").join("config.json")).unwrap())
            .unwrap();
    cfg["hidden_size"] = 128.into();
    std::fs::write(tmp.join("config.json"), cfg.to_string()).unwrap();
    // Weights missing.
    let e = load_hf_dir(&tmp, DType::F32, &Device::Cpu).unwrap_err();
    assert!(matches!(e, vlmq::Error::Io { .. }), "{e}");
    std::fs::copy(
        dir("llama").join("model.safetensors"),
        tmp.join("model.safetensors"),
    )
    .unwrap();
    // The shape error names the directory (the tensors' file).
    let e = load_hf_dir(&tmp, DType::F32, &Device::Cpu).unwrap_err();
    assert!(
        matches!(e, vlmq::Error::InvalidField { ref path, .. } if *path == tmp)
            && e.to_string().contains("shape mismatch"),
        "{e}"
    );
    std::fs::remove_dir_all(&tmp).unwrap();
}
