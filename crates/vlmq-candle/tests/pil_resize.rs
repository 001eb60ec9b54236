//! PIL's resampling against the resized 8-bit images transformers' PIL
//! backend produced for the hf-tiny-vlm fixtures: BICUBIC (Qwen2-VL's
//! `smart_resize`) and LANCZOS (SmolVLM's resize, split and global frame),
//! compared byte for byte.

use std::path::PathBuf;

use image::RgbImage;
use safetensors::SafeTensors;
use vlmq_candle::process::pil_resize::{pil_resize, PilFilter};

fn fixture(model: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf-tiny-vlm")
        .join(model)
}

/// A U8 tensor `[.., h, w, 3]` of `expected.safetensors` as raw bytes and shape.
fn u8_tensor(bytes: &[u8], name: &str) -> (Vec<u8>, Vec<usize>) {
    let st = SafeTensors::deserialize(bytes).unwrap();
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::U8, "{name}");
    (t.data().to_vec(), t.shape().to_vec())
}

fn png(model: &str, k: usize) -> RgbImage {
    image::open(fixture(model).join(format!("image_{k}.png")))
        .unwrap()
        .to_rgb8()
}

fn same(got: &RgbImage, want: &[u8], what: &str) {
    let diff = got
        .as_raw()
        .iter()
        .zip(want)
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(got.as_raw().len(), want.len(), "{what}: size");
    assert_eq!(diff, 0, "{what}: {diff} bytes differ");
}

#[test]
fn bicubic_matches_qwen2_vl_resized_images() {
    let bytes = std::fs::read(fixture("qwen2_vl").join("expected.safetensors")).unwrap();
    for k in 0..2 {
        let img = png("qwen2_vl", k);
        let (raw, _) = u8_tensor(&bytes, &format!("image_{k}_u8"));
        same(&img, &raw, "decoded png");
        let (want, shape) = u8_tensor(&bytes, &format!("image_{k}_resized_u8"));
        let out = pil_resize(&img, shape[1] as u32, shape[0] as u32, PilFilter::Bicubic).unwrap();
        same(&out, &want, &format!("image_{k}_resized_u8"));
    }
}

#[test]
fn lanczos_matches_smolvlm_frames() {
    let bytes = std::fs::read(fixture("smolvlm").join("expected.safetensors")).unwrap();
    // (longest-edge size, split size, crop rows x cols) from the fixture's README.
    let plans = [((64, 36), (64, 64), (2, 2)), ((26, 64), (32, 64), (2, 1))];
    for (k, &((w1, h1), (w2, h2), (rows, cols))) in plans.iter().enumerate() {
        let img = png("smolvlm", k);
        let step1 = pil_resize(&img, w1, h1, PilFilter::Lanczos).unwrap();
        let step2 = pil_resize(&step1, w2, h2, PilFilter::Lanczos).unwrap();
        let mut frames = Vec::new();
        for r in 0..rows {
            for c in 0..cols {
                let crop = image::imageops::crop_imm(&step2, c * 32, r * 32, 32, 32).to_image();
                frames.extend_from_slice(crop.as_raw());
            }
        }
        let global = pil_resize(&step2, 32, 32, PilFilter::Lanczos).unwrap();
        frames.extend_from_slice(global.as_raw());
        let (want, shape) = u8_tensor(&bytes, &format!("image_{k}_frames_u8"));
        assert_eq!(shape, vec![(rows * cols + 1) as usize, 32, 32, 3]);
        let frames = RgbImage::from_raw(32, 32 * shape[0] as u32, frames).unwrap();
        same(&frames, &want, &format!("image_{k}_frames_u8"));
    }
}
