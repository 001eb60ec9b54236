//! The LLaVA backend in the vlmq pipeline (hf-tiny `llava/` fixture):
//! gradients of the vision and projector blocks against finite
//! differences, token info, VLMQ with the LM-only selection and with every
//! block, and the LLaVA-layout GPTQ checkpoint written and read back.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use ndarray::{Array2, ArrayView2};
use vlmq::{
    Bits, Checkpoint, GptqConfig, GradientModel, GroupSize, Modality, PipelineConfig, QuantMethod,
    QuantScheme, QuantizableModel,
};
use vlmq_candle::candle_core::{DType, Device, Tensor};
use vlmq_candle::export::llava::{load_llava_gptq_into, write_llava_gptq};
use vlmq_candle::{load_llava_dir, tokenizer_from_file, LlavaModel, VlmHidden, VlmSample};

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

/// The fixture's two rows (one image each), a padded copy of row 0 and a
/// text-only sample, in `dtype`.
fn samples(model: &LlavaModel, dtype: DType) -> Vec<VlmSample> {
    let exp = expected();
    let rows = exp["input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2::<u32>()
        .unwrap();
    let px = exp["pixel_values"].to_dtype(dtype).unwrap();
    let img = |i: usize| Some(px.narrow(0, i, 1).unwrap());
    let id = model.config().image_token_id;
    vec![
        VlmSample::causal(rows[0].clone(), img(0)).without_image_targets(id),
        VlmSample::causal(rows[1].clone(), img(1)).without_image_targets(id),
        VlmSample::causal(rows[0].clone(), img(0))
            .without_image_targets(id)
            .padded(5, 0),
        VlmSample::causal(rows[0][..6].to_vec(), None),
    ]
}

fn lcg(shape: &[usize], seed: u64) -> Tensor {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn tensor(h: &VlmHidden) -> &Tensor {
    match h {
        VlmHidden::Vision(Some(t)) | VlmHidden::Text(t) => t,
        VlmHidden::Vision(None) => panic!("no vision stream"),
    }
}

fn wrap_like(h: &VlmHidden, t: Tensor) -> VlmHidden {
    match h {
        VlmHidden::Text(_) => VlmHidden::Text(t),
        VlmHidden::Vision(_) => VlmHidden::Vision(Some(t)),
    }
}

fn dot(a: &Tensor, b: &Tensor) -> f64 {
    (a * b)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

#[test]
fn vision_and_projector_backward_match_finite_differences() {
    let m = load_llava_dir(dir(), DType::F64, &Device::Cpu).unwrap();
    let s = &samples(&m, DType::F64)[0];
    let x0 = m.embed(s).unwrap();
    // Block 0 (vision layer) and block 1 (projector, into the LM stream).
    let x1 = m.block_forward(0, &x0, s, None).unwrap();
    for (b, x) in [(0usize, &x0), (1, &x1)] {
        let y = m.block_forward(b, x, s, None).unwrap();
        let g = lcg(tensor(&y).dims(), 1 + b as u64);
        let gy = wrap_like(&y, g.clone());
        let mut seen = Vec::new();
        let mut sink = |name: &str, rows: ArrayView2<'_, f32>| {
            seen.push((name.to_string(), rows.dim()));
        };
        let gx = m.block_backward(b, x, s, &gy, Some(&mut sink)).unwrap();
        let names: Vec<String> = m
            .linear_groups(b)
            .into_iter()
            .flatten()
            .map(|l| l.name)
            .collect();
        assert_eq!(
            seen.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(),
            names
        );
        let rows_expected = m.token_info(b, s).len();
        assert!(seen.iter().all(|(_, (r, _))| *r == rows_expected));
        let d = lcg(tensor(x).dims(), 10 + b as u64);
        let eps = 1e-5;
        let f = |sign: f64| {
            let xs = wrap_like(x, (tensor(x) + (&d * (sign * eps)).unwrap()).unwrap());
            dot(tensor(&m.block_forward(b, &xs, s, None).unwrap()), &g)
        };
        let fd = (f(1.0) - f(-1.0)) / (2.0 * eps);
        let an = dot(tensor(&gx), &d);
        // f64 central difference: truncation ~eps^2, rounding ~1e-16/eps.
        assert!(
            (fd - an).abs() <= 1e-7 * an.abs().max(1.0),
            "block {b}: fd {fd} vs analytic {an}"
        );
    }
}

#[test]
fn token_info_tags_vision_and_padding() {
    let m = load_llava_dir(dir(), DType::F32, &Device::Cpu).unwrap();
    let ss = samples(&m, DType::F32);
    let lm0 = m.config().feature_layers + 1;
    let info = m.token_info(lm0, &ss[2]);
    assert_eq!(info.len(), 37);
    assert_eq!(info.mask(Modality::Vision).sum(), 16.0);
    assert_eq!(info.valid_count(), 32);
    assert_eq!(m.token_info(0, &ss[0]).len(), 17);
    assert_eq!(m.token_info(0, &ss[0]).modality()[0], Modality::Other);
    assert_eq!(
        m.token_info(lm0 - 1, &ss[0]).mask(Modality::Vision).sum(),
        16.0
    );
    assert!(m.token_info(0, &ss[3]).is_empty());
    // Padding never changes the real tokens (causal attention, right padding).
    let run = |s: &VlmSample| {
        let mut h = m.embed(s).unwrap();
        for b in 0..m.num_blocks() {
            h = m.block_forward(b, &h, s, None).unwrap();
        }
        tensor(&h).narrow(1, 0, 32).unwrap()
    };
    let d = (run(&ss[0]) - run(&ss[2]))
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(d, 0.0);
    // The padded sample's loss equals the unpadded one's (padding is no target).
    let lo = |s: &VlmSample| {
        let mut h = m.embed(s).unwrap();
        for b in 0..m.num_blocks() {
            h = m.block_forward(b, &h, s, None).unwrap();
        }
        m.loss_and_grad(&h, s).unwrap().unwrap().0
    };
    assert!((lo(&ss[0]) - lo(&ss[2])).abs() < 1e-6);
}

fn scheme() -> GptqConfig {
    GptqConfig::new(
        QuantScheme::new(Bits::new(4).unwrap())
            .with_group_size(GroupSize::new(32).unwrap())
            .with_symmetric(true),
    )
}

#[test]
fn vlmq_lm_only_then_llava_gptq_checkpoint_roundtrip() {
    let orig = load_llava_dir(dir(), DType::F32, &Device::Cpu).unwrap();
    let mut model = orig.clone();
    let ss = samples(&model, DType::F32);
    let cfg = PipelineConfig::new(QuantMethod::Vlmq, scheme()).with_blocks(model.lm_only());
    let q = vlmq::quantize_model(&mut model, &ss, &cfg, |_| {}).unwrap();
    // 2 LM layers x 7 linears; the vision tower and projector untouched.
    assert_eq!(q.weights.len(), 14);
    assert!(q.weights.keys().all(|(b, _)| *b >= 2));
    for (b, l) in [(0, "self_attn.q_proj"), (1, "linear_1")] {
        assert_eq!(
            model.linear_weight(b, l).unwrap(),
            orig.linear_weight(b, l).unwrap()
        );
    }
    assert_ne!(
        model.linear_weight(2, "mlp.up_proj").unwrap(),
        orig.linear_weight(2, "mlp.up_proj").unwrap()
    );

    let tmp = std::env::temp_dir().join(format!("vlmq-llava-ckpt-{}", std::process::id()));
    let tk = tokenizer_from_file(dir().join("tokenizer.json")).unwrap();
    write_llava_gptq(&model, &q, Some(&tk), &tmp).unwrap();
    let ck = Checkpoint::open(&tmp).unwrap();
    assert!(ck
        .names()
        .contains(&"language_model.model.layers.1.self_attn.q_proj"));
    assert_eq!(ck.names().len(), 14);
    for n in [
        "vision_tower.encoder.layers.0.self_attn.q_proj.weight",
        "vision_tower.encoder.layers.1.mlp.fc2.bias",
        "vision_tower.embeddings.patch_embedding.weight",
        "vision_tower.post_layernorm.weight",
        "multi_modal_projector.linear_1.weight",
        "multi_modal_projector.linear_2.bias",
        "language_model.model.embed_tokens.weight",
        "language_model.model.norm.weight",
    ] {
        assert!(ck.tensor_names().contains(&n), "{n} missing");
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["quantization_config"]["bits"], 4);
    assert_eq!(config["model_type"], "llava");
    assert_eq!(config["vision_config"]["patch_size"], 8);

    let mut back = orig.clone();
    assert_eq!(load_llava_gptq_into(&mut back, &tmp).unwrap(), 14);
    let exp = expected();
    let rows = exp["input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2::<u32>()
        .unwrap();
    let batch: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
    let px = &exp["pixel_values"];
    let want = model.logits(&batch, Some(px)).unwrap();
    // The packed kernel reproduces the dequantized weights up to f32
    // rounding of scale * (code - zero).
    let d = common::max_abs_diff(&back.logits(&batch, Some(px)).unwrap(), &want);
    assert!(d < 1e-4, "read-back logits differ by {d}");
    let d0 = common::max_abs_diff(&orig.logits(&batch, Some(px)).unwrap(), &want);
    assert!(d0 > 1e-3, "quantization changed nothing ({d0})");
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn every_block_is_quantizable() {
    for method in [QuantMethod::Gptq, QuantMethod::Vlmq] {
        let mut model = load_llava_dir(dir(), DType::F32, &Device::Cpu).unwrap();
        let ss = samples(&model, DType::F32);
        let cfg = PipelineConfig::new(method, scheme());
        let q = vlmq::quantize_model(&mut model, &ss, &cfg, |_| {}).unwrap();
        // 1 vision layer x 6 + projector 2 + 2 LM layers x 7.
        assert_eq!(q.weights.len(), 22, "{method}");
        let w: Array2<f32> = model.linear_weight(0, "mlp.fc1").unwrap();
        assert!(w.iter().all(|v| v.is_finite()));
    }
}
