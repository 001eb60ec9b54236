//! The Qwen2-VL / Qwen2.5-VL backend in the vlmq pipeline (hf-tiny-vlm
//! fixtures): the loss and the gradients that the backend's
//! `GradientModel` gives, sample by sample, against transformers' batch
//! loss and gradients (at decoder layer 1's input and at vision block 0's
//! input, i.e. through the decoder, the merger and the whole tower); token
//! rows; GPTQ on the language model and VLMQ on every block, written as a
//! checkpoint in the model's own layout and read back through
//! `PackedLinear`.

use std::collections::HashMap;
use std::path::PathBuf;

use ndarray::ArrayView2;
use vlmq::{
    Bits, Checkpoint, GptqConfig, GradientModel, GroupSize, Modality, PipelineConfig, QuantMethod,
    QuantScheme, QuantizableModel,
};
use vlmq_candle::candle_core::{DType, Device, Tensor};
use vlmq_candle::export::qwen2_vl::{load_qwen2_vl_gptq_into, write_qwen2_vl_gptq};
use vlmq_candle::{
    load_qwen2_vl_dir, tokenizer_from_file, ImageGrid, Qwen2VlModel, QwenVlSample, VlmHidden,
};

fn dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf-tiny-vlm")
        .join(name)
}

fn expected(name: &str) -> HashMap<String, Tensor> {
    vlmq_candle::candle_core::safetensors::load(
        dir(name).join("expected.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

fn grids(exp: &HashMap<String, Tensor>) -> Vec<ImageGrid> {
    let g: Vec<i64> = exp["image_grid_thw"]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    g.chunks(3)
        .map(|c| ImageGrid {
            t: c[0] as usize,
            h: c[1] as usize,
            w: c[2] as usize,
        })
        .collect()
}

fn rows(exp: &HashMap<String, Tensor>) -> Vec<Vec<u32>> {
    exp["input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2()
        .unwrap()
}

/// The fixture's two samples (sample 0: image occurrence 0; sample 1:
/// occurrences 1 and 2), targets as transformers' labels (image tokens -100).
fn fixture_samples(m: &Qwen2VlModel, exp: &HashMap<String, Tensor>) -> Vec<QwenVlSample> {
    let g = grids(exp);
    let px = &exp["pixel_values"];
    let ids = rows(exp);
    let id = m.config().image_token_id;
    let p0 = g[0].patches();
    let sample = |r: usize, start: usize, grids: Vec<ImageGrid>| {
        let n: usize = grids.iter().map(ImageGrid::patches).sum();
        QwenVlSample::causal(ids[r].clone(), Some(px.narrow(0, start, n).unwrap()), grids)
            .without_image_targets(id)
    };
    vec![sample(0, 0, vec![g[0]]), sample(1, p0, vec![g[1], g[2]])]
}

fn tensor(h: &VlmHidden) -> &Tensor {
    match h {
        VlmHidden::Vision(Some(t)) | VlmHidden::Text(t) => t,
        VlmHidden::Vision(None) => panic!("no vision stream"),
    }
}

fn rel_err(ours: &Tensor, want: &Tensor) -> f32 {
    let m = |t: &Tensor| {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    m(&(ours - want).unwrap()) / m(want)
}

/// Runs the pipeline's gradient walk on each sample (forward through every
/// block, task loss, block backward down to block 0) and compares the
/// batch-weighted loss and gradients with transformers'.
fn check_gradients(name: &str) {
    let exp = expected(name);
    let (m, _) = load_qwen2_vl_dir(dir(name), DType::F32, &Device::Cpu).unwrap();
    let lm1 = m.config().vision.depth + 2;
    let samples = fixture_samples(&m, &exp);
    // transformers averages over the batch's targets; each sample's loss is
    // its own mean, so it weighs by its share of the targets.
    let counts: Vec<usize> = samples
        .iter()
        .map(|s| s.targets.iter().skip(1).filter(|&&t| t).count())
        .collect();
    let total: usize = counts.iter().sum();
    let (mut loss, mut g_lm1, mut g_vis0) = (0.0f64, Vec::new(), Vec::new());
    for (s, &c) in samples.iter().zip(&counts) {
        let w = c as f64 / total as f64;
        let mut inputs = vec![m.embed(s).unwrap()];
        for b in 0..m.num_blocks() {
            let y = m.block_forward(b, inputs.last().unwrap(), s, None).unwrap();
            inputs.push(y);
        }
        let out = inputs.pop().unwrap();
        let (l, mut g) = m.loss_and_grad(&out, s).unwrap().unwrap();
        loss += w * l as f64;
        for b in (0..m.num_blocks()).rev() {
            let mut shown = Vec::new();
            let mut sink = |n: &str, r: ArrayView2<'_, f32>| shown.push((n.to_string(), r.dim()));
            g = m
                .block_backward(b, &inputs[b], s, &g, Some(&mut sink))
                .unwrap();
            // One gradient per linear, one row per token the block shows.
            let names: Vec<String> = m
                .linear_groups(b)
                .into_iter()
                .flatten()
                .map(|l| l.name)
                .collect();
            assert_eq!(
                shown.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(),
                names
            );
            let n = m.token_info(b, s).len();
            assert!(shown.iter().all(|(_, (r, _))| *r == n), "block {b}");
            if b == lm1 {
                g_lm1.push((tensor(&g) * w).unwrap());
            }
        }
        g_vis0.push((tensor(&g).squeeze(0).unwrap() * w).unwrap());
    }
    let want_loss = exp["loss"].to_scalar::<f32>().unwrap() as f64;
    let loss_err = (loss - want_loss).abs() / want_loss;
    let e1 = rel_err(&Tensor::cat(&g_lm1, 0).unwrap(), &exp["grad_layer1_input"]);
    let e0 = rel_err(
        &Tensor::cat(&g_vis0, 0).unwrap(),
        &exp["grad_vision_block0_input"],
    );
    eprintln!("{name}: loss {loss_err:.1e}, layer-1 input grad {e1:.1e}, vision block 0 input grad {e0:.1e}");
    // f32 on both sides, the forward bound of the fixture tests (1e-5).
    assert!(loss_err < 1e-5 && e1 < 1e-5 && e0 < 1e-5, "{name}");
}

#[test]
fn qwen2_vl_backend_gradients_match_transformers() {
    check_gradients("qwen2_vl");
}

#[test]
fn qwen2_5_vl_backend_gradients_match_transformers() {
    check_gradients("qwen2_5_vl");
}

#[test]
fn token_info_tags_patches_merged_patches_and_tokens() {
    let exp = expected("qwen2_5_vl");
    let (m, _) = load_qwen2_vl_dir(dir("qwen2_5_vl"), DType::F32, &Device::Cpu).unwrap();
    let s = &fixture_samples(&m, &exp)[1];
    let depth = m.config().vision.depth;
    assert_eq!(m.token_info(0, s).mask(Modality::Vision).sum(), 56.0);
    assert_eq!(m.token_info(depth, s).mask(Modality::Vision).sum(), 14.0);
    let lm = m.token_info(depth + 1, s);
    assert_eq!(lm.len(), 64);
    assert_eq!(lm.mask(Modality::Vision).sum(), 14.0);
    assert_eq!(m.block_name(0), "visual.blocks.0");
    assert_eq!(m.block_name(depth), "visual.merger");
    assert_eq!(m.block_name(depth + 1), "model.layers.0");
    // A text-only sample runs with an empty vision stream.
    let first_image = s.tokens.iter().position(|&t| t == 302).unwrap();
    let text = QwenVlSample::causal(s.tokens[..first_image].to_vec(), None, vec![]);
    assert!(m.token_info(0, &text).is_empty());
    let mut h = m.embed(&text).unwrap();
    for b in 0..m.num_blocks() {
        h = m.block_forward(b, &h, &text, None).unwrap();
    }
    assert_eq!(tensor(&h).dims(), &[1, first_image, 64]);
    // Pixels that disagree with the grids are refused.
    let mut bad = s.clone();
    bad.grids.pop();
    assert!(m.embed(&bad).is_err());
}

fn scheme() -> GptqConfig {
    // Group 16 divides every width of the fixtures (32, 48, 64, 128, 176).
    GptqConfig::new(
        QuantScheme::new(Bits::new(4).unwrap()).with_group_size(GroupSize::new(16).unwrap()),
    )
}

/// Quantizes with `cfg`, writes the checkpoint, reads it back into the
/// original model and compares logits; returns the checkpoint's
/// `quantization_config`.
fn roundtrip(name: &str, method: QuantMethod, lm_only: bool) -> serde_json::Value {
    let exp = expected(name);
    let (orig, _) = load_qwen2_vl_dir(dir(name), DType::F32, &Device::Cpu).unwrap();
    let mut model = orig.clone();
    let mut samples = fixture_samples(&model, &exp);
    let first_image = samples[0].tokens.iter().position(|&t| t == 302).unwrap();
    samples.push(QwenVlSample::causal(
        samples[0].tokens[..first_image].to_vec(),
        None,
        vec![],
    ));
    let mut cfg = PipelineConfig::new(method, scheme());
    if lm_only {
        cfg = cfg.with_blocks(model.lm_only());
    }
    let q = vlmq::quantize_model(&mut model, &samples, &cfg, |_| {}).unwrap();
    let depth = model.config().vision.depth;
    let tower_linears: usize = (0..=depth)
        .map(|b| model.linear_groups(b).into_iter().flatten().count())
        .sum();
    let want = 2 * 7 + if lm_only { 0 } else { tower_linears };
    assert_eq!(q.weights.len(), want, "{name} {method}");

    let tmp = std::env::temp_dir().join(format!(
        "vlmq-qwen-ckpt-{name}-{method}-{lm_only}-{}",
        std::process::id()
    ));
    let tk = tokenizer_from_file(dir(name).join("tokenizer.json")).unwrap();
    write_qwen2_vl_gptq(&model, &q, Some(&tk), &tmp).unwrap();
    let ck = Checkpoint::open(&tmp).unwrap();
    assert_eq!(ck.names().len(), want);
    assert!(ck.names().contains(&"model.layers.1.self_attn.q_proj"));
    // Every source tensor is in the checkpoint under its own name, packed
    // or dense.
    let src = vlmq_candle::candle_core::safetensors::load(
        dir(name).join("model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    for n in src.keys() {
        // A packed linear stores its bias with its codes.
        let stem = n
            .strip_suffix(".weight")
            .or_else(|| n.strip_suffix(".bias"))
            .unwrap_or(n);
        assert!(
            ck.tensor_names().contains(&n.as_str()) || ck.names().contains(&stem),
            "{name}: {n} missing"
        );
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], name);

    let mut back = orig.clone();
    assert_eq!(load_qwen2_vl_gptq_into(&mut back, &tmp).unwrap(), want);
    let ids = rows(&exp);
    let batch: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
    let (px, g) = (&exp["pixel_values"], grids(&exp));
    let want_logits = model.logits(&batch, Some(px), &g).unwrap();
    let max = |t: Tensor| {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    // The packed kernel reproduces the dequantized weights up to f32
    // rounding of scale * (code - zero).
    let d = max((back.logits(&batch, Some(px), &g).unwrap() - &want_logits).unwrap());
    assert!(d < 1e-4, "{name} {method}: read-back logits differ by {d}");
    let d0 = max((orig.logits(&batch, Some(px), &g).unwrap() - &want_logits).unwrap());
    assert!(
        d0 > 1e-3,
        "{name} {method}: quantization changed nothing ({d0})"
    );
    std::fs::remove_dir_all(&tmp).unwrap();
    config["quantization_config"].clone()
}

#[test]
fn qwen2_vl_gptq_lm_only_checkpoint_roundtrip() {
    let qc = roundtrip("qwen2_vl", QuantMethod::Gptq, true);
    assert_eq!(qc["block_name_to_quantize"], "model.layers");
    assert_eq!(qc["dynamic"], serde_json::json!({"-:^visual\\.": {}}));
    assert_eq!(qc["modules_in_block_to_quantize"][0][0], "self_attn.q_proj");
}

#[test]
fn qwen2_5_vl_vlmq_every_block_checkpoint_roundtrip() {
    let qc = roundtrip("qwen2_5_vl", QuantMethod::Vlmq, false);
    assert_eq!(
        qc["block_name_to_quantize"],
        serde_json::json!(["model.layers", "visual.blocks", "visual.merger"])
    );
    assert_eq!(qc["dynamic"], serde_json::json!({}));
}

#[test]
fn qwen2_5_vl_vlmq_lm_only_and_qwen2_vl_gptq_every_block() {
    roundtrip("qwen2_5_vl", QuantMethod::Vlmq, true);
    roundtrip("qwen2_vl", QuantMethod::Gptq, false);
}
