//! `vlmq quantize` on vision-language model directories (the hf-tiny-vlm
//! fixtures of vlmq-candle, each with its family's chat template) with a
//! calibration file of conversations: the decoder layers are quantized,
//! the rest stays dense and is listed as such in `quantization_config`.

mod common;

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use common::{s, scratch, stderr, stdout, vlmq};
use vlmq_candle::candle_core::{DType, Device};
use vlmq_candle::export::smolvlm::load_smolvlm_gptq_into;
use vlmq_candle::{load_smolvlm_dir, Calibration, LoadedModel, Quantizer, Recipe};

/// Two conversations about the fixture's images, one with two images and
/// a plain-string answer.
const CONVERSATIONS: &str = concat!(
    r#"{"messages":[{"role":"user","content":[{"type":"image","path":"image_0.png"},{"type":"text","text":"What is in the picture?"}]},{"role":"assistant","content":[{"type":"text","text":"A red square."}]}]}"#,
    "\n",
    r#"{"messages":[{"role":"user","content":[{"type":"image","path":"image_1.png"},{"type":"image","path":"image_0.png"},{"type":"text","text":"Compare the pictures."}]},{"role":"assistant","content":"The first one is tall."}]}"#,
    "\n"
);

/// A copy of the fixture `family` in `d/model` with `template` as its
/// `chat_template.jinja` (the fixtures carry none), the images and the
/// conversations in `d`; returns the model directory and the file.
fn model_and_calibration(d: &Path, family: &str, template: &str) -> (PathBuf, PathBuf) {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../vlmq-candle/tests/fixtures");
    let src = fixtures.join("hf-tiny-vlm").join(family);
    let model = d.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "processor_config.json",
    ] {
        std::fs::copy(src.join(f), model.join(f)).unwrap();
    }
    std::fs::copy(fixtures.join(template), model.join("chat_template.jinja")).unwrap();
    for f in ["image_0.png", "image_1.png"] {
        std::fs::copy(src.join(f), d.join(f)).unwrap();
    }
    let calib = d.join("calib.jsonl");
    std::fs::write(&calib, CONVERSATIONS).unwrap();
    (model, calib)
}

/// Quantizes `model` with 4-bit groups of 16 on both conversations and
/// returns the written `config.json`'s `quantization_config`.
fn quantize(d: &Path, model: &Path, calib: &Path, family: &str) -> serde_json::Value {
    let recipe = d.join("r.toml");
    std::fs::write(&recipe, "bits = 4\ngroup_size = 16\n").unwrap();
    let out = d.join("out");
    let o = vlmq(&[
        "quantize",
        s(model),
        "--out",
        s(&out),
        "--calib",
        s(calib),
        "--recipe",
        s(&recipe),
        "--samples",
        "2",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = vlmq(&["inspect", s(&out)]);
    assert!(o.status.success(), "{}", stderr(&o));
    // 2 decoder layers x 7 linears.
    assert!(
        stdout(&o).contains("quantized    14 layers\n"),
        "{}",
        stdout(&o)
    );
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], family);
    config["quantization_config"].clone()
}

#[test]
fn quantize_a_qwen2_vl_directory_with_conversations() {
    let d = scratch("qwen2vl");
    let (model, calib) = model_and_calibration(&d, "qwen2_vl", "qwen2_vl_chat_template.jinja");
    let qc = quantize(&d, &model, &calib, "qwen2_vl");
    assert_eq!(qc["block_name_to_quantize"], "model.layers");
    assert!(qc["dynamic"].get("-:^visual\\.").is_some(), "{qc}");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn quantize_a_smolvlm_directory_with_conversations() {
    let d = scratch("smolvlm");
    let (model, calib) = model_and_calibration(&d, "smolvlm", "smolvlm_chat_template.jinja");
    let qc = quantize(&d, &model, &calib, "smolvlm");
    assert_eq!(qc["block_name_to_quantize"], "model.text_model.layers");
    for part in ["-:^model\\.vision_model\\.", "-:^model\\.connector\\."] {
        assert!(qc["dynamic"].get(part).is_some(), "{part}: {qc}");
    }
    // Read back: the packed layers in the source model compute what the
    // one-call API's in-memory result computes with the same recipe.
    let recipe = Recipe::from_toml_file(d.join("r.toml")).unwrap();
    let checked = Recipe {
        samples: 2,
        ..recipe
    }
    .check(&d.join("r.toml"))
    .unwrap();
    let done = Quantizer::from_pretrained(&model)
        .unwrap()
        .calibrate(Calibration::from_file(&calib).unwrap(), &calib)
        .unwrap()
        .quantize(&checked, |_| ControlFlow::Continue(()))
        .unwrap();
    let LoadedModel::SmolVlm(want, _) = done.model() else {
        panic!("not a SmolVLM model")
    };
    let mut back = load_smolvlm_dir(&model, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        load_smolvlm_gptq_into(&mut back, d.join("out")).unwrap(),
        14
    );
    let ids: Vec<u32> = (0..40).map(|i| (i * 7) % 300).collect();
    let logits = |m: &vlmq_candle::SmolVlmModel| m.logits(&[ids.as_slice()], None).unwrap();
    let diff = (logits(&back) - logits(want))
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    // The packed kernel reproduces the dequantized weights up to f32
    // rounding of scale * (code - zero).
    assert!(diff < 1e-4, "read-back logits differ by {diff}");
    std::fs::remove_dir_all(&d).unwrap();
}
