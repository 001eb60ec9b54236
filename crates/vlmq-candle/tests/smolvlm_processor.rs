//! The SmolVLM processor against transformers' PIL-backend outputs for the
//! hf-tiny-vlm `smolvlm` fixture: the frames byte for byte, `input_ids` and
//! `pixel_attention_mask` identical, `pixel_values` within 1e-5.

use std::path::PathBuf;

use safetensors::SafeTensors;
use serde_json::Value;
use vlmq_candle::process::smolvlm_image::SmolVlmImageProcessor;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf-tiny-vlm/smolvlm")
}

fn bytes_of(st: &SafeTensors, name: &str) -> (Vec<u8>, Vec<usize>) {
    let t = st.tensor(name).unwrap();
    (t.data().to_vec(), t.shape().to_vec())
}

fn i64s(b: &[u8]) -> Vec<i64> {
    b.chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn processor_matches_transformers() {
    let raw = std::fs::read(dir().join("expected.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&raw).unwrap();
    let inputs: Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("inputs.json")).unwrap()).unwrap();
    let proc = SmolVlmImageProcessor::from_model_dir(&dir()).unwrap();
    assert_eq!(
        (proc.longest_edge, proc.frame_side, proc.image_seq_len),
        (64, 32, 4)
    );
    let tok = tokenizers::Tokenizer::from_file(dir().join("tokenizer.json")).unwrap();

    // Frames of each image file, byte for byte.
    let load = |name: &str| image::open(dir().join(name)).unwrap().to_rgb8();
    for k in 0..2 {
        let f = proc.frames(&load(&format!("image_{k}.png"))).unwrap();
        let got: Vec<u8> = f.frames.iter().flat_map(|fr| fr.as_raw().clone()).collect();
        let (want, _) = bytes_of(&st, &format!("image_{k}_frames_u8"));
        assert_eq!(got, want, "image_{k} frames");
    }

    let samples = inputs["samples"].as_array().unwrap();
    let texts: Vec<&str> = samples
        .iter()
        .map(|s| s["text"].as_str().unwrap())
        .collect();
    let images: Vec<Vec<image::RgbImage>> = samples
        .iter()
        .map(|s| {
            s["images"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| load(n.as_str().unwrap()))
                .collect()
        })
        .collect();
    let out = proc.process_batch(&tok, &texts, &images).unwrap();

    let (ids, shape) = bytes_of(&st, "input_ids");
    let want_ids = i64s(&ids);
    let got_ids: Vec<i64> = out
        .input_ids
        .iter()
        .flatten()
        .map(|&i| i64::from(i))
        .collect();
    assert_eq!(shape, vec![2, out.input_ids[0].len()]);
    assert_eq!(got_ids, want_ids);

    let (mask, shape) = bytes_of(&st, "pixel_attention_mask");
    assert_eq!(shape, vec![2, out.max_frames, 32, 32]);
    let got_mask: Vec<i64> = out
        .pixel_attention_mask
        .iter()
        .map(|&m| i64::from(m))
        .collect();
    assert_eq!(got_mask, i64s(&mask));
    assert_eq!(out.frames_per_sample, vec![5, 8]);

    let (pv, shape) = bytes_of(&st, "pixel_values");
    assert_eq!(shape, vec![2, out.max_frames, 3, 32, 32]);
    let want: Vec<f32> = pv
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let worst = out
        .pixel_values
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    // Same 8-bit frames and the same f64-then-f32 arithmetic as transformers:
    // only f32 rounding can differ.
    assert!(worst <= 1e-5, "pixel_values max diff {worst}");
}

#[test]
fn bad_configs_and_marker_counts_are_errors() {
    let proc = SmolVlmImageProcessor::from_model_dir(&dir()).unwrap();
    let tok = tokenizers::Tokenizer::from_file(dir().join("tokenizer.json")).unwrap();
    let img = image::RgbImage::new(8, 8);
    assert!(proc
        .process_batch(&tok, &["no marker"], &[vec![img]])
        .is_err());
    let cfg = serde_json::json!({"size": {"longest_edge": 64}});
    let err =
        SmolVlmImageProcessor::from_config(&cfg, 4, std::path::Path::new("p.json")).unwrap_err();
    assert!(err.to_string().contains("max_image_size"), "{err}");
    // An unsplit image is the global frame only.
    assert_eq!(
        proc.image_prompt(0, 0),
        "<fake_token_around_image><global-img><image><image><image><image><fake_token_around_image>"
    );
}
