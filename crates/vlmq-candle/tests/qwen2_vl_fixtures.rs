//! Qwen2-VL and Qwen2.5-VL on candle against transformers' own outputs on
//! the hf-tiny-vlm fixtures (tiny random weights; see the fixtures' README).
//!
//! Integer outputs (grids, position ids, segments, window index) must be
//! identical. Float outputs are compared by `max |ours - ref| / max |ref|`
//! with bound 1e-5 (the target): both sides compute in f32 with
//! different summation orders and rotary angles (ours in f64, rounded once).

use std::collections::HashMap;
use std::path::PathBuf;

use vlmq_candle::candle_core::{DType, Device, Tensor, D};
use vlmq_candle::{
    image_cu_seqlens, load_qwen2_vl_dir, rope_delta, vision_position_ids, window_index, ImageGrid,
    Qwen2VlModel,
};

const TOL: f64 = 1e-5;

fn dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf-tiny-vlm")
        .join(name)
}

fn expected(name: &str) -> HashMap<String, Tensor> {
    let p = dir(name).join("expected.safetensors");
    assert!(p.exists(), "fixture {p:?} is missing");
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

fn grids(exp: &HashMap<String, Tensor>) -> Vec<ImageGrid> {
    ints(&exp["image_grid_thw"])
        .chunks(3)
        .map(|g| ImageGrid {
            t: g[0] as usize,
            h: g[1] as usize,
            w: g[2] as usize,
        })
        .collect()
}

fn token_rows(exp: &HashMap<String, Tensor>) -> Vec<Vec<u32>> {
    exp["input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2()
        .unwrap()
}

fn load(name: &str) -> (Qwen2VlModel, HashMap<String, Tensor>) {
    let (m, _) = load_qwen2_vl_dir(dir(name), DType::F32, &Device::Cpu).unwrap();
    (m, expected(name))
}

/// Mean next-token cross-entropy in f64 over positions whose label is not -100.
fn loss(logits: &Tensor, labels: &[i64], vocab: usize) -> f64 {
    let lp = vlmq_candle::candle_core::Tensor::to_dtype(logits, DType::F64)
        .unwrap()
        .reshape(((), vocab))
        .unwrap();
    let lp = candle_nn_log_softmax(&lp);
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

fn candle_nn_log_softmax(x: &Tensor) -> Vec<Vec<f64>> {
    let m = x.max_keepdim(D::Minus1).unwrap();
    let z = x.broadcast_sub(&m).unwrap();
    let lse = z
        .exp()
        .unwrap()
        .sum_keepdim(D::Minus1)
        .unwrap()
        .log()
        .unwrap();
    z.broadcast_sub(&lse).unwrap().to_vec2().unwrap()
}

fn check_model(name: &str) -> f64 {
    let (model, exp) = load(name);
    let g = grids(&exp);
    let cfg = model.config();
    let m = cfg.vision.spatial_merge_size;

    // Patch positions and image segments: exact.
    let vpos: Vec<i64> = vision_position_ids(&g, m)
        .iter()
        .flat_map(|p| p.map(|c| c as i64))
        .collect();
    assert_eq!(
        vpos,
        ints(&exp["vision_position_ids"]),
        "{name} vision positions"
    );
    let cu: Vec<i64> = image_cu_seqlens(&g).iter().map(|&c| c as i64).collect();
    assert_eq!(cu, ints(&exp["vision_cu_seqlens"]), "{name} cu_seqlens");
    if cfg.vision.window_size > 0 {
        let (idx, cuw) = window_index(&g, m, cfg.vision.window_size, cfg.vision.patch_size);
        let idx: Vec<i64> = idx.iter().map(|&c| c as i64).collect();
        let cuw: Vec<i64> = cuw.iter().map(|&c| c as i64).collect();
        assert_eq!(
            idx,
            ints(&exp["vision_window_index"]),
            "{name} window index"
        );
        assert_eq!(
            cuw,
            ints(&exp["vision_cu_window_seqlens"]),
            "{name} windows"
        );
    }

    // Tower and merger.
    let pixels = &exp["pixel_values"];
    let trace = model.vision_trace(pixels, &g).unwrap();
    let mut worst: f64 = 0.0;
    let mut report = |what: &str, e: f64| {
        eprintln!("{name} {what}: rel err {e:.2e}");
        assert!(e < TOL, "{name} {what}: {e:e}");
        worst = worst.max(e);
    };
    report(
        "vision block 0 input",
        rel(
            &trace.block_inputs[0].squeeze(0).unwrap(),
            &exp["vision_block0_input"],
        ),
    );
    report(
        "vision last hidden",
        rel(
            &trace.last_hidden.squeeze(0).unwrap(),
            &exp["vision_last_hidden_state"],
        ),
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

    // M-RoPE positions: exact.
    let rows = token_rows(&exp);
    let batch: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
    let pos = model.rope_positions(&batch, &g).unwrap();
    let (b, t) = (rows.len(), rows[0].len());
    let mut flat = Vec::new();
    for axis in 0..3 {
        for r in &pos {
            flat.extend_from_slice(&r[axis]);
        }
    }
    assert_eq!(flat.len(), 3 * b * t);
    assert_eq!(flat, ints(&exp["position_ids"]), "{name} position ids");
    let deltas: Vec<i64> = pos.iter().map(rope_delta).collect();
    assert_eq!(deltas, ints(&exp["rope_deltas"]), "{name} rope deltas");

    // Decoder.
    let hs = model.hidden_states(&batch, Some(pixels), &g).unwrap();
    report("hidden_states.0", rel(&hs[0], &exp["hidden_states.0"]));
    report("hidden_states.1", rel(&hs[1], &exp["hidden_states.1"]));
    report("last layer output", rel(&hs[2], &exp["last_layer_output"]));
    let logits = model.logits(&batch, Some(pixels), &g).unwrap();
    report("logits", rel(&logits, &exp["logits"]));

    let want_loss = exp["loss"]
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let ours = loss(&logits, &ints(&exp["labels"]), cfg.text.vocab_size);
    report("loss", (ours - want_loss).abs() / want_loss.abs());
    worst
}

#[test]
fn qwen2_vl_matches_transformers() {
    check_model("qwen2_vl");
}

#[test]
fn qwen2_5_vl_matches_transformers() {
    check_model("qwen2_5_vl");
}

#[test]
fn both_tensor_spellings_load_to_the_same_model() {
    // Rewrite the fixture under transformers 5.x module names and reload.
    let src = dir("qwen2_5_vl");
    let tmp = std::env::temp_dir().join(format!("vlmq-qwen-rename-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::copy(src.join("config.json"), tmp.join("config.json")).unwrap();
    let tensors =
        vlmq_candle::candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu)
            .unwrap();
    let renamed: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| {
            let k = if let Some(r) = k.strip_prefix("visual.") {
                format!("model.visual.{r}")
            } else if let Some(r) = k.strip_prefix("model.") {
                format!("model.language_model.{r}")
            } else {
                k
            };
            (k, v)
        })
        .collect();
    vlmq_candle::candle_core::safetensors::save(&renamed, tmp.join("model.safetensors")).unwrap();
    let (a, na) = load_qwen2_vl_dir(&src, DType::F32, &Device::Cpu).unwrap();
    let (b, nb) = load_qwen2_vl_dir(&tmp, DType::F32, &Device::Cpu).unwrap();
    std::fs::remove_dir_all(&tmp).unwrap();
    assert_eq!(na.lm, "model.");
    assert_eq!(nb.lm, "model.language_model.");
    assert_eq!(nb.visual, "model.visual.");
    let exp = expected("qwen2_5_vl");
    let g = grids(&exp);
    let rows = token_rows(&exp);
    let batch: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
    let la = a.logits(&batch, Some(&exp["pixel_values"]), &g).unwrap();
    let lb = b.logits(&batch, Some(&exp["pixel_values"]), &g).unwrap();
    assert_eq!(rel(&la, &lb), 0.0);
}

#[test]
fn a_missing_or_extra_tensor_is_named() {
    let src = dir("qwen2_vl");
    let tmp = std::env::temp_dir().join(format!("vlmq-qwen-bad-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::copy(src.join("config.json"), tmp.join("config.json")).unwrap();
    let mut tensors =
        vlmq_candle::candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu)
            .unwrap();
    tensors.remove("visual.merger.mlp.2.bias");
    vlmq_candle::candle_core::safetensors::save(&tensors, tmp.join("model.safetensors")).unwrap();
    let err = load_qwen2_vl_dir(&tmp, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("visual.merger.mlp.2.bias"), "{err}");
    tensors.insert(
        "visual.merger.mlp.2.bias".into(),
        Tensor::zeros(64, DType::F32, &Device::Cpu).unwrap(),
    );
    tensors.insert(
        "visual.extra.weight".into(),
        Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap(),
    );
    vlmq_candle::candle_core::safetensors::save(&tensors, tmp.join("model.safetensors")).unwrap();
    let err = load_qwen2_vl_dir(&tmp, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    std::fs::remove_dir_all(&tmp).unwrap();
    assert!(err.contains("visual.extra.weight"), "{err}");
}
