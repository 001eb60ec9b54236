//! The Qwen2-VL image processor and prompt expansion against transformers'
//! processor outputs on the hf-tiny-vlm fixtures: grids and token ids
//! identical, `pixel_values` within 1e-5 (the bound; both sides
//! normalize in f32 from the same 8-bit pixels, so they agree to rounding).
//! The resize itself (PIL bicubic) is fed from the fixtures' resized images.

use std::collections::HashMap;
use std::path::PathBuf;

use vlmq_candle::candle_core::{DType, Device, Tensor};
use vlmq_candle::process::qwen2_vl_image::{
    expand_image_tokens, pixel_values_from_resized, smart_resize, Qwen2VlImageConfig,
};
use vlmq_candle::{encode, tokenizer_from_file};

fn dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf-tiny-vlm")
        .join(name)
}

fn check(name: &str) {
    let d = dir(name);
    let exp: HashMap<String, Tensor> =
        vlmq_candle::candle_core::safetensors::load(d.join("expected.safetensors"), &Device::Cpu)
            .unwrap();
    let cfg = Qwen2VlImageConfig::from_dir(&d).unwrap();
    let mut pixels = Vec::new();
    let mut grids = Vec::new();
    for k in [0, 1, 0] {
        let raw = &exp[&format!("image_{k}_u8")];
        let (h, w, _) = raw.dims3().unwrap();
        let (rh, rw) = smart_resize(h, w, cfg.factor(), cfg.min_pixels, cfg.max_pixels).unwrap();
        let resized = &exp[&format!("image_{k}_resized_u8")];
        assert_eq!(resized.dims(), &[rh, rw, 3], "{name} image {k} target size");
        let bytes: Vec<u8> = resized.flatten_all().unwrap().to_vec1().unwrap();
        let (v, g) = pixel_values_from_resized(&bytes, rh, rw, &cfg).unwrap();
        pixels.extend(v);
        grids.push(g);
    }
    let want_grids: Vec<i64> = exp["image_grid_thw"]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let ours_grids: Vec<i64> = grids
        .iter()
        .flat_map(|g| [g.t as i64, g.h as i64, g.w as i64])
        .collect();
    assert_eq!(ours_grids, want_grids, "{name} image_grid_thw");
    let want = &exp["pixel_values"];
    let ours = Tensor::from_vec(pixels, want.dims(), &Device::Cpu).unwrap();
    let diff = (ours - want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    eprintln!("{name} pixel_values max abs diff {diff:e}");
    assert!(diff <= 1e-5, "{name} pixel_values: {diff:e}");

    // Prompt expansion and tokenization give transformers' input_ids.
    let inputs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("inputs.json")).unwrap()).unwrap();
    let tk = tokenizer_from_file(d.join("tokenizer.json")).unwrap();
    let ids: Vec<Vec<u32>> = exp["input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2()
        .unwrap();
    let mut next = 0;
    for (s, want_ids) in inputs["samples"].as_array().unwrap().iter().zip(&ids) {
        let n = s["images"].as_array().unwrap().len();
        let text = expand_image_tokens(
            s["text"].as_str().unwrap(),
            "<|image_pad|>",
            &grids[next..next + n],
            cfg.merge_size,
        )
        .unwrap();
        next += n;
        assert_eq!(text, s["expanded_text"].as_str().unwrap());
        assert_eq!(&encode(&tk, &text).unwrap(), want_ids, "{name} input_ids");
    }
    assert!(expand_image_tokens("<|image_pad|>", "<|image_pad|>", &grids, 2).is_err());
}

#[test]
fn qwen2_vl_processor_matches_transformers() {
    check("qwen2_vl");
}

#[test]
fn qwen2_5_vl_processor_matches_transformers() {
    check("qwen2_5_vl");
}
