//! The Qwen2-VL image processor and prompt expansion against transformers'
//! processor outputs on the hf-tiny-vlm fixtures: grids and token ids
//! identical, `pixel_values` within 1e-5 (the bound; both sides
//! normalize in f32 from the same 8-bit pixels, so they agree to rounding).
//! One check feeds the fixtures' resized images (the steps after the
//! resize, bitwise), the other starts from the PNG files (PIL-exact bicubic
//! resize included).

use std::collections::HashMap;
use std::path::PathBuf;

use vlmq_candle::candle_core::{DType, Device, Tensor};
use vlmq_candle::process::image_input::load_image;
use vlmq_candle::process::qwen2_vl_image::{
    expand_image_tokens, pixel_values_from_resized, process_image, smart_resize, Qwen2VlImageConfig,
};
use vlmq_candle::{encode, tokenizer_from_file};

fn dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf-tiny-vlm")
        .join(name)
}

/// The processor's `pixel_values` and grids from the fixture's inputs:
/// the PNG files (`from_png`) or transformers' resized pixels.
fn preprocess(
    d: &std::path::Path,
    exp: &HashMap<String, Tensor>,
    cfg: &Qwen2VlImageConfig,
    from_png: bool,
) -> (Vec<f32>, Vec<vlmq_candle::ImageGrid>) {
    let mut pixels = Vec::new();
    let mut grids = Vec::new();
    for k in [0, 1, 0] {
        let (v, g) = if from_png {
            process_image(&load_image(d.join(format!("image_{k}.png"))).unwrap(), cfg).unwrap()
        } else {
            let raw = &exp[&format!("image_{k}_u8")];
            let (h, w, _) = raw.dims3().unwrap();
            let (rh, rw) =
                smart_resize(h, w, cfg.factor(), cfg.min_pixels, cfg.max_pixels).unwrap();
            let resized = &exp[&format!("image_{k}_resized_u8")];
            assert_eq!(resized.dims(), &[rh, rw, 3], "image {k} target size");
            let bytes: Vec<u8> = resized.flatten_all().unwrap().to_vec1().unwrap();
            pixel_values_from_resized(&bytes, rh, rw, cfg).unwrap()
        };
        pixels.extend(v);
        grids.push(g);
    }
    (pixels, grids)
}

fn check(name: &str, from_png: bool) {
    let d = dir(name);
    let exp: HashMap<String, Tensor> =
        vlmq_candle::candle_core::safetensors::load(d.join("expected.safetensors"), &Device::Cpu)
            .unwrap();
    let cfg = Qwen2VlImageConfig::from_dir(&d).unwrap();
    let (pixels, grids) = preprocess(&d, &exp, &cfg, from_png);
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
    eprintln!("{name} (from png: {from_png}) pixel_values max abs diff {diff:e}");
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
    check("qwen2_vl", false);
}

#[test]
fn qwen2_5_vl_processor_matches_transformers() {
    check("qwen2_5_vl", false);
}

#[test]
fn qwen2_vl_processor_from_png_matches_transformers() {
    check("qwen2_vl", true);
}

#[test]
fn qwen2_5_vl_processor_from_png_matches_transformers() {
    check("qwen2_5_vl", true);
}

#[test]
fn resample_codes_outside_pil_filters_are_refused() {
    let p = std::path::Path::new("preprocessor_config.json");
    let base = serde_json::json!({"min_pixels": 3136, "max_pixels": 6272});
    let cfg = Qwen2VlImageConfig::from_json(&base, p).unwrap();
    assert_eq!(
        cfg.resample,
        vlmq_candle::process::pil_resize::PilFilter::Bicubic
    );
    let mut v = base.clone();
    v["resample"] = serde_json::json!(0);
    let e = Qwen2VlImageConfig::from_json(&v, p)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("preprocessor_config.json") && e.contains("resample"),
        "{e}"
    );
}

/// Conversations as the calibration file holds them (the fixture's two
/// prompts, images as files) become the fixture's samples: the same ids
/// followed by the `<|im_end|>\n` that closes the answer, the same pixels
/// and grids, the answer tokens as the only targets.
#[test]
fn conversations_give_the_fixture_samples() {
    use vlmq_candle::process::chat_template::ChatTemplate;
    use vlmq_candle::process::conversation::read_conversations;
    use vlmq_candle::process::qwen2_vl_prompt::{qwen_conversation_sample, QwenPromptContext};

    let d = dir("qwen2_vl");
    let exp: HashMap<String, Tensor> =
        vlmq_candle::candle_core::safetensors::load(d.join("expected.safetensors"), &Device::Cpu)
            .unwrap();
    let tmp = std::env::temp_dir().join(format!("vlmq-qwen-conv-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    for k in 0..2 {
        let n = format!("image_{k}.png");
        std::fs::copy(d.join(&n), tmp.join(&n)).unwrap();
    }
    let answers = [
        "A red square sits on a smooth colored",
        "The first one is tall.",
    ];
    let img = |p: &str| serde_json::json!({"type": "image", "path": p});
    let text = |t: &str| serde_json::json!({"type": "text", "text": t});
    let lines = [
        serde_json::json!({"messages": [
            {"role": "user", "content": [img("image_0.png"), text("What is in the picture?")]},
            {"role": "assistant", "content": [text(answers[0])]}]}),
        serde_json::json!({"messages": [
            {"role": "user", "content": [img("image_1.png"), img("image_0.png"), text("Compare the pictures.")]},
            {"role": "assistant", "content": answers[1]}]}),
    ];
    let file = tmp.join("calib.jsonl");
    let body: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    std::fs::write(&file, body.join("\n")).unwrap();
    let convs = read_conversations(&file).unwrap();

    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let source = std::fs::read_to_string(root.join("qwen2_vl_chat_template.jinja")).unwrap();
    let template = ChatTemplate::new(source, serde_json::json!({})).unwrap();
    let tk = tokenizer_from_file(d.join("tokenizer.json")).unwrap();
    let images = Qwen2VlImageConfig::from_dir(&d).unwrap();
    let ctx = QwenPromptContext {
        tokenizer: &tk,
        template: &template,
        images: &images,
        image_token_id: 302,
        dtype: DType::F32,
        device: &Device::Cpu,
    };
    let ids: Vec<Vec<u32>> = exp["input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2()
        .unwrap();
    let tail = encode(&tk, "<|im_end|>\n").unwrap();
    let mut start = 0;
    for (k, conv) in convs.iter().enumerate() {
        let s = qwen_conversation_sample(&ctx, conv).unwrap();
        assert_eq!(s.tokens[..ids[k].len()], ids[k][..], "sample {k} ids");
        assert_eq!(s.tokens[ids[k].len()..], tail[..], "sample {k} end of turn");
        let px = s.pixels.as_ref().unwrap();
        let n = px.dim(0).unwrap();
        let want = exp["pixel_values"].narrow(0, start, n).unwrap();
        start += n;
        let diff = (px - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff <= 1e-5, "sample {k} pixel_values {diff:e}");
        let answer: Vec<u32> = s
            .tokens
            .iter()
            .zip(&s.targets)
            .filter(|(_, &t)| t)
            .map(|(&id, _)| id)
            .collect();
        assert_eq!(
            answer,
            encode(&tk, &format!("{}<|im_end|>\n", answers[k])).unwrap()
        );
    }
    assert_eq!(start, exp["pixel_values"].dim(0).unwrap());
    // An image the decoder cannot read names its field.
    std::fs::write(tmp.join("image_0.png"), b"not a png").unwrap();
    let e = qwen_conversation_sample(&ctx, &convs[0])
        .unwrap_err()
        .to_string();
    assert!(e.contains("line 1: messages[0].content[0].path"), "{e}");
    std::fs::remove_dir_all(&tmp).unwrap();
}
