//! The candle LLaVA model against transformers' own outputs on the hf-tiny
//! `llava/` fixture (CLIP tower 32x32 / patch 8, 2-layer GELU projector,
//! the tiny Llama LM with a tied head), and the loader on the other
//! tensor-name spellings.
//!
//! Relative error is `max |ours - reference| / max |reference|`. Bound 1e-4
//! for activations, logits and the gradient: both sides compute in f32
//! with different summation orders (observed ~1e-6); pixel values 1e-6:
//! one division and one subtraction in f32 on each side.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use vlmq::{GradientModel, QuantizableModel};
use vlmq_candle::candle_core::{DType, Device, Tensor};
use vlmq_candle::process::image_input::{rgb_from_hwc, ClipImageProcessor};
use vlmq_candle::{encode, load_llava_dir, tokenizer_from_file, LlavaModel, VlmHidden, VlmSample};

fn dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/hf-tiny/llava"
    ))
}

fn expected() -> HashMap<String, Tensor> {
    let p = dir().join("expected.safetensors");
    assert!(p.exists(), "fixture {p:?} is missing");
    vlmq_candle::candle_core::safetensors::load(&p, &Device::Cpu).unwrap()
}

fn rel(ours: &Tensor, reference: &Tensor) -> f64 {
    assert_eq!(ours.dims(), reference.dims());
    let f = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    let d = (f(ours) - f(reference))
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    let m = f(reference).abs().unwrap().max_all().unwrap();
    d.to_scalar::<f64>().unwrap() / m.to_scalar::<f64>().unwrap()
}

fn ids(exp: &HashMap<String, Tensor>) -> Vec<Vec<u32>> {
    exp["input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2::<u32>()
        .unwrap()
}

/// pixel_values from the fixture's raw images through our preprocessing.
fn pixels(model: &LlavaModel, exp: &HashMap<String, Tensor>) -> Tensor {
    let u8s = &exp["image_u8"];
    let (n, h, w, _) = u8s.dims4().unwrap();
    let flat = u8s.flatten_all().unwrap().to_vec1::<u8>().unwrap();
    let imgs: Vec<_> = (0..n)
        .map(|i| rgb_from_hwc(&flat[i * h * w * 3..(i + 1) * h * w * 3], h, w).unwrap())
        .collect();
    ClipImageProcessor::for_image_size(model.config().vision.image_size)
        .batch(&imgs, &Device::Cpu)
        .unwrap()
}

fn image(p: &Tensor, i: usize) -> Tensor {
    p.narrow(0, i, 1).unwrap()
}

/// Forward outputs, loss and layer-1 input gradient of one loaded model.
fn check_model(model: &LlavaModel, exp: &HashMap<String, Tensor>, label: &str) {
    let rows = ids(exp);
    let batch: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
    let px = pixels(model, exp);
    let ep = rel(&px, &exp["pixel_values"]);
    assert!(ep < 1e-6, "{label}: pixel_values rel {ep:.2e}");

    let vh = model.vision_hidden(&px).unwrap();
    let ev = rel(&vh, &exp["vision_hidden"]);
    let feats = model.image_features(&px).unwrap();
    let ef = rel(&feats, &exp["image_features"]);
    let hs = model.hidden_states(&batch, Some(&px)).unwrap();
    let e0 = rel(&hs[0], &exp["hidden_states.0"]);
    let e1 = rel(&hs[1], &exp["hidden_states.1"]);
    let el = rel(&hs[2], &exp["last_layer_output"]);
    let normed = model.language_model().head_logits(&hs[2], false).unwrap();
    let logits = model.logits(&batch, Some(&px)).unwrap();
    let elog = rel(&logits, &exp["logits"]);
    eprintln!(
        "{label}: rel pixels {ep:.2e} vision_hidden {ev:.2e} image_features {ef:.2e} h0 {e0:.2e} h1 {e1:.2e} last {el:.2e} logits {elog:.2e}"
    );
    for (what, e) in [
        ("vision_hidden", ev),
        ("image_features", ef),
        ("h0", e0),
        ("h1", e1),
        ("last", el),
        ("logits", elog),
    ] {
        assert!(e < 1e-4, "{label}: {what} rel {e:.2e}");
    }
    assert_eq!(normed.dims(), logits.dims());
    // hidden_states.2 is the last layer's output after the final RMSNorm.
    let lm = model.language_model();
    let w = &lm.weights().norm;
    let h2 = {
        let x = hs[2].clone();
        let ms = x.sqr().unwrap().mean_keepdim(2).unwrap();
        x.broadcast_div(&(ms + lm.config().rms_eps).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(w)
            .unwrap()
    };
    let e2 = rel(&h2, &exp["hidden_states.2"]);
    assert!(e2 < 1e-4, "{label}: hidden_states.2 rel {e2:.2e}");

    // Loss (labels = input_ids) and d loss / d (LM layer-1 input), through
    // the backend traits block by block. The fixture's loss is the mean
    // over both rows (same length), so each row's gradient is halved.
    let nv = model.config().feature_layers;
    let last_lm = model.num_blocks() - 1;
    for masked in [false, true] {
        let mut loss = 0.0;
        let mut grads = Vec::new();
        let mut tokens = 0usize;
        let mut per_row = Vec::new();
        for (i, row) in rows.iter().enumerate() {
            let mut s = VlmSample::causal(row.clone(), Some(image(&px, i)));
            if masked {
                s = s.without_image_targets(model.config().image_token_id);
            }
            let mut h = model.embed(&s).unwrap();
            let mut inputs = Vec::new();
            for b in 0..model.num_blocks() {
                inputs.push(h.clone());
                h = model.block_forward(b, &h, &s, None).unwrap();
            }
            let (l, mut g) = model.loss_and_grad(&h, &s).unwrap().unwrap();
            let n = s.targets.iter().skip(1).filter(|&&b| b).count();
            tokens += n;
            per_row.push((l, n));
            // Walk back from the last LM block to LM layer 1 (block nv + 2).
            for b in (nv + 2..=last_lm).rev() {
                g = model.block_backward(b, &inputs[b], &s, &g, None).unwrap();
            }
            let VlmHidden::Text(g) = g else {
                panic!("LM gradient is text")
            };
            grads.push((g / rows.len() as f64).unwrap());
            loss += l / rows.len() as f32;
        }
        if masked {
            // Masked loss is the mean over all counted positions of both rows.
            let pooled: f32 =
                per_row.iter().map(|(l, n)| l * *n as f32).sum::<f32>() / tokens as f32;
            let want = exp["loss_image_masked"].to_scalar::<f32>().unwrap();
            eprintln!("{label}: loss_image_masked {pooled} (ref {want})");
            assert!(((pooled - want) / want).abs() < 1e-5);
        } else {
            let want = exp["loss"].to_scalar::<f32>().unwrap();
            let g = Tensor::cat(&grads, 0).unwrap();
            let eg = rel(&g, &exp["grad_layer1_input"]);
            eprintln!("{label}: loss {loss} (ref {want}), rel grad_layer1_input {eg:.2e}");
            // Loss 1e-5 relative: a mean of 62 f32 cross-entropies.
            assert!(((loss - want) / want).abs() < 1e-5);
            assert!(eg < 1e-4);
        }
    }
}

#[test]
fn llava_matches_transformers() {
    let model = load_llava_dir(dir(), DType::F32, &Device::Cpu).unwrap();
    let exp = expected();
    // Tokenizer reproduces the ids (the <image> token is an added special token).
    let inputs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("inputs.json")).unwrap()).unwrap();
    let tk = tokenizer_from_file(dir().join("tokenizer.json")).unwrap();
    for (row, want) in inputs["rows"].as_array().unwrap().iter().zip(&ids(&exp)) {
        assert_eq!(&encode(&tk, row["text"].as_str().unwrap()).unwrap(), want);
        // The prompt with <image> expanded (as LlavaProcessor), cut to 32 tokens.
        let full = model
            .encode_prompt(&tk, row["prompt"].as_str().unwrap())
            .unwrap();
        assert_eq!(&full[..32], want.as_slice());
    }
    assert_eq!(model.config().tokens_per_image(), 16);
    assert_eq!(model.config().feature_layers, 1);
    assert_eq!(model.block_name(0), "vision_tower.encoder.layers.0");
    assert_eq!(model.block_name(1), "multi_modal_projector");
    assert_eq!(model.block_name(2), "language_model.model.layers.0");
    check_model(&model, &exp, "fixture names");
}

/// Copies the fixture with every tensor renamed by `rename` into a temp dir.
fn renamed(tag: &str, rename: impl Fn(&str) -> String) -> PathBuf {
    let out = std::env::temp_dir().join(format!("vlmq-llava-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&out).unwrap();
    std::fs::copy(dir().join("config.json"), out.join("config.json")).unwrap();
    let map =
        vlmq_candle::candle_core::safetensors::load(dir().join("model.safetensors"), &Device::Cpu)
            .unwrap();
    let map: HashMap<String, Tensor> = map.into_iter().map(|(k, v)| (rename(&k), v)).collect();
    vlmq_candle::candle_core::safetensors::save(&map, out.join("model.safetensors")).unwrap();
    out
}

fn cleanup(p: &Path) {
    std::fs::remove_dir_all(p).unwrap();
}

#[test]
fn other_tensor_spellings_load_to_the_same_model() {
    let exp = expected();
    // llava-hf (transformers 4.x): vision_tower.vision_model.*, plus an explicit
    // (untied-looking but equal) head under language_model.lm_head.
    let hub = renamed("hub", |k| {
        k.replacen("vision_tower.", "vision_tower.vision_model.", 1)
    });
    let m = load_llava_dir(&hub, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        m.block_name(0),
        "vision_tower.vision_model.encoder.layers.0"
    );
    check_model(&m, &exp, "4.x names");
    cleanup(&hub);
    // transformers 5.x module names.
    let v5 = renamed("v5", |k| {
        if let Some(r) = k.strip_prefix("language_model.model.") {
            format!("model.language_model.{r}")
        } else {
            format!("model.{k}")
        }
    });
    let m = load_llava_dir(&v5, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(m.block_name(1), "model.multi_modal_projector");
    assert_eq!(m.block_name(3), "model.language_model.layers.1");
    check_model(&m, &exp, "5.x module names");
    cleanup(&v5);
    // A mixed / unknown spelling is a typed error, not a partial model.
    let bad = renamed("bad", |k| {
        k.replace("multi_modal_projector", "mm_projector")
    });
    let e = load_llava_dir(&bad, DType::F32, &Device::Cpu).unwrap_err();
    assert!(missing_in(&e, &bad), "{e}");
    cleanup(&bad);
    // A tensor that belongs to no LLaVA part is refused (another architecture).
    let more = renamed("more", str::to_string);
    let st = more.join("model.safetensors");
    let mut map = vlmq_candle::candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
    map.insert(
        "image_newline".into(),
        Tensor::zeros(64, DType::F32, &Device::Cpu).unwrap(),
    );
    vlmq_candle::candle_core::safetensors::save(&map, &st).unwrap();
    let e = load_llava_dir(&more, DType::F32, &Device::Cpu).unwrap_err();
    assert!(
        matches!(e, vlmq::Error::CorruptCheckpoint { .. })
            && e.to_string().contains("image_newline"),
        "{e}"
    );
    cleanup(&more);
    let extra = renamed("extra", |k| k.replace("post_layernorm", "final_norm"));
    let e = load_llava_dir(&extra, DType::F32, &Device::Cpu).unwrap_err();
    assert!(missing_in(&e, &extra), "{e}");
    cleanup(&extra);
}

/// A missing tensor, named with the directory it is missing from.
fn missing_in(e: &vlmq::Error, dir: &std::path::Path) -> bool {
    matches!(e, vlmq::Error::InvalidField { path, .. } if path == dir)
        && e.to_string().contains("is missing")
}

#[test]
fn image_token_count_mismatch_is_a_typed_error() {
    let model = load_llava_dir(dir(), DType::F32, &Device::Cpu).unwrap();
    let exp = expected();
    let px = pixels(&model, &exp);
    let rows = ids(&exp);
    // One <image> token short.
    let mut short = rows[0].clone();
    let p = short.iter().position(|&t| t == 300).unwrap();
    short[p] = 55;
    let e = model.logits(&[&short], Some(&image(&px, 0))).unwrap_err();
    assert!(matches!(e, vlmq::Error::InvalidConfig { .. }), "{e}");
    let s = VlmSample::causal(short, Some(image(&px, 0)));
    assert!(matches!(
        model.embed(&s).unwrap_err(),
        vlmq::Error::InvalidConfig { .. }
    ));
    // Images without any <image> token, and <image> tokens without images.
    let e = model
        .logits(&[&[1, 2, 3]], Some(&image(&px, 0)))
        .unwrap_err();
    assert!(matches!(e, vlmq::Error::InvalidConfig { .. }), "{e}");
    let e = model.logits(&[&rows[1]], None).unwrap_err();
    assert!(matches!(e, vlmq::Error::InvalidConfig { .. }), "{e}");
    // Wrong image size.
    let small = Tensor::zeros((1, 3, 16, 16), DType::F32, &Device::Cpu).unwrap();
    let e = model.logits(&[&rows[0]], Some(&small)).unwrap_err();
    assert!(matches!(e, vlmq::Error::ShapeMismatch { .. }), "{e}");
    // An empty image batch is a shape error too, not a zero-sized convolution.
    let none = Tensor::zeros((0, 3, 32, 32), DType::F32, &Device::Cpu).unwrap();
    let s = VlmSample::causal(vec![1, 2, 3], Some(none));
    let e = model.embed(&s).unwrap_err();
    assert!(matches!(e, vlmq::Error::ShapeMismatch { .. }), "{e}");
}
