//! SmolVLM through the one-call API (hf-tiny-vlm `smolvlm/` fixture with
//! SmolVLM's chat template): calibration conversations become the samples
//! transformers' processor makes, and a directory stored in bf16 is
//! quantized and saved with its dense tensors byte for byte the source's,
//! the modules left dense listed in `quantization_config`, and the packed
//! layers reproducing the in-memory quantized logits when read back.

mod common;

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use vlmq_candle::candle_core::{DType, Device, Tensor};
use vlmq_candle::export::smolvlm::load_smolvlm_gptq_into;
use vlmq_candle::process::chat_template::ChatTemplate;
use vlmq_candle::process::conversation::read_conversations;
use vlmq_candle::process::smolvlm_image::SmolVlmImageProcessor;
use vlmq_candle::process::smolvlm_prompt::{smolvlm_conversation_sample, SmolVlmPromptContext};
use vlmq_candle::{
    encode, load_smolvlm_dir, tokenizer_from_file, Calibration, LoadedModel, Quantizer, Recipe,
    SmolVlmModel,
};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn dir() -> PathBuf {
    fixtures().join("hf-tiny-vlm/smolvlm")
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vlmq-smolvlm-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The fixture's two prompts as a calibration file of conversations in
/// `d` (images copied beside it); returns the file and the answers.
fn write_conversations(d: &Path) -> (PathBuf, [&'static str; 2]) {
    for k in 0..2 {
        let n = format!("image_{k}.png");
        std::fs::copy(dir().join(&n), d.join(&n)).unwrap();
    }
    // The fixture's answers (sample 0's cut at a word boundary).
    let answers = [
        "A red square sits on a smooth colored gradient, and a",
        "The first is tall.",
    ];
    let img = |p: &str| json!({"type": "image", "path": p});
    let text = |t: &str| json!({"type": "text", "text": t});
    let lines = [
        json!({"messages": [
            {"role": "user", "content": [img("image_0.png"), text("What is in the picture?")]},
            {"role": "assistant", "content": [text(answers[0])]}]}),
        json!({"messages": [
            {"role": "user", "content": [img("image_1.png"), img("image_0.png"), text("Compare the pictures.")]},
            {"role": "assistant", "content": answers[1]}]}),
    ];
    let file = d.join("calib.jsonl");
    let body: Vec<String> = lines.iter().map(Value::to_string).collect();
    std::fs::write(&file, body.join("\n")).unwrap();
    (file, answers)
}

/// The fixture's prompts as conversations give transformers' `input_ids`
/// (then the `<end_of_utterance>\n` that closes the answer), its frames
/// and the answer tokens as the only targets.
#[test]
fn conversations_give_the_processor_samples() {
    let d = scratch("conv");
    let (file, answers) = write_conversations(&d);
    let convs = read_conversations(&file).unwrap();
    let exp: HashMap<String, Tensor> = vlmq_candle::candle_core::safetensors::load(
        dir().join("expected.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let source = std::fs::read_to_string(fixtures().join("smolvlm_chat_template.jinja")).unwrap();
    let template = ChatTemplate::new(source, json!({})).unwrap();
    let tk = tokenizer_from_file(dir().join("tokenizer.json")).unwrap();
    let images = SmolVlmImageProcessor::from_model_dir(&dir()).unwrap();
    let ctx = SmolVlmPromptContext {
        tokenizer: &tk,
        template: &template,
        images: &images,
        image_token_id: 301,
        dtype: DType::F32,
        device: &Device::Cpu,
    };
    let ids: Vec<Vec<u32>> = exp["input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2()
        .unwrap();
    let frames = SmolVlmModel::real_frames(&exp["pixel_values"])
        .unwrap()
        .unwrap();
    let tail = encode(&tk, "<end_of_utterance>\n").unwrap();
    let mut start = 0;
    for (k, conv) in convs.iter().enumerate() {
        let s = smolvlm_conversation_sample(&ctx, conv).unwrap();
        assert_eq!(s.tokens[..ids[k].len()], ids[k][..], "sample {k} ids");
        assert_eq!(s.tokens[ids[k].len()..], tail[..], "sample {k} end of turn");
        let px = s.pixels.as_ref().unwrap();
        let n = px.dim(0).unwrap();
        let d = common::max_abs_diff(px, &frames.narrow(0, start, n).unwrap());
        start += n;
        // The processor test's bound: PIL-exact frames, f32 normalization.
        assert!(d <= 1e-5, "sample {k} pixel_values {d:e}");
        let answer: Vec<u32> = s
            .tokens
            .iter()
            .zip(&s.targets)
            .filter(|(_, &t)| t)
            .map(|(&id, _)| id)
            .collect();
        let want = encode(&tk, &format!(" {}<end_of_utterance>\n", answers[k])).unwrap();
        assert_eq!(answer, want, "sample {k} targets");
        assert_eq!(s.valid_len, s.tokens.len());
    }
    assert_eq!(start, frames.dim(0).unwrap());
    // An image the decoder cannot read names its line and field.
    std::fs::write(d.join("image_1.png"), b"not a png").unwrap();
    let e = smolvlm_conversation_sample(&ctx, &convs[1])
        .unwrap_err()
        .to_string();
    assert!(e.contains("line 2: messages[0].content[0].path"), "{e}");
    std::fs::remove_dir_all(&d).unwrap();
}

/// The fixture stored in bf16 (weights and `dtype`), with the chat template.
fn bf16_model(d: &Path) -> PathBuf {
    let m = d.join("model");
    std::fs::create_dir_all(&m).unwrap();
    let weights =
        vlmq_candle::candle_core::safetensors::load(dir().join("model.safetensors"), &Device::Cpu)
            .unwrap();
    let bf16: HashMap<String, Tensor> = weights
        .into_iter()
        .map(|(n, t)| (n, t.to_dtype(DType::BF16).unwrap()))
        .collect();
    vlmq_candle::candle_core::safetensors::save(&bf16, m.join("model.safetensors")).unwrap();
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("config.json")).unwrap()).unwrap();
    for part in ["text_config", "vision_config"] {
        cfg[part]["dtype"] = "bfloat16".into();
    }
    cfg["dtype"] = "bfloat16".into();
    std::fs::write(m.join("config.json"), cfg.to_string()).unwrap();
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "processor_config.json",
    ] {
        std::fs::copy(dir().join(f), m.join(f)).unwrap();
    }
    std::fs::copy(
        fixtures().join("smolvlm_chat_template.jinja"),
        m.join("chat_template.jinja"),
    )
    .unwrap();
    m
}

#[test]
fn a_bf16_directory_quantizes_and_keeps_its_dense_bytes() {
    let d = scratch("bf16");
    let model_dir = bf16_model(&d);
    let (calib, _) = write_conversations(&d);
    let recipe = Recipe {
        bits: 4,
        group_size: 16,
        samples: 2,
        ..Recipe::default()
    }
    .check(Path::new("test"))
    .unwrap();
    let q = Quantizer::from_pretrained(&model_dir).unwrap();
    assert_eq!(q.model().family(), "smolvlm");
    let done = q
        .calibrate(Calibration::from_file(&calib).unwrap(), &calib)
        .unwrap()
        .quantize(&recipe, |_| ControlFlow::Continue(()))
        .unwrap();
    // The LM only by default: 2 decoder layers x 7 linears.
    assert_eq!(done.output().weights.len(), 14);
    let out = d.join("out");
    done.save(&out).unwrap();

    let src_bytes = std::fs::read(model_dir.join("model.safetensors")).unwrap();
    let src = safetensors::SafeTensors::deserialize(&src_bytes).unwrap();
    let out_bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let saved = safetensors::SafeTensors::deserialize(&out_bytes).unwrap();
    let mut dense = 0;
    for (name, t) in src.tensors() {
        let stem = name.strip_suffix(".weight").unwrap_or(&name);
        if stem.starts_with("model.text_model.layers.") && stem.contains("_proj") {
            assert!(saved.tensor(&format!("{stem}.qweight")).is_ok(), "{stem}");
            assert!(saved.tensor(&name).is_err(), "{name} stored dense too");
            continue;
        }
        let s = saved
            .tensor(&name)
            .unwrap_or_else(|_| panic!("{name} missing"));
        assert_eq!(s.dtype(), t.dtype(), "{name}");
        assert_eq!(s.shape(), t.shape(), "{name}");
        assert!(
            s.data() == t.data(),
            "{name}: bytes differ from the source's"
        );
        dense += 1;
    }
    // Every tensor but the 14 quantized weights (the tied head is not stored).
    assert_eq!(dense, src.len() - 14);

    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    let mut want: Value =
        serde_json::from_str(&std::fs::read_to_string(model_dir.join("config.json")).unwrap())
            .unwrap();
    let qc = config["quantization_config"].clone();
    want["quantization_config"] = qc.clone();
    assert_eq!(
        config, want,
        "config.json changed beyond quantization_config"
    );
    assert_eq!(qc["block_name_to_quantize"], "model.text_model.layers");
    assert_eq!(
        qc["modules_in_block_to_quantize"],
        json!([
            ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
            ["self_attn.o_proj"],
            ["mlp.gate_proj", "mlp.up_proj"],
            ["mlp.down_proj"]
        ])
    );
    let mut rules: Vec<&String> = qc["dynamic"].as_object().unwrap().keys().collect();
    rules.sort();
    assert_eq!(
        rules,
        ["-:^model\\.connector\\.", "-:^model\\.vision_model\\."]
    );

    // The packed layers read into the source model compute what the
    // quantized model in memory computes.
    let LoadedModel::SmolVlm(quantized, _) = done.model() else {
        panic!("not a SmolVLM model")
    };
    let mut back = load_smolvlm_dir(&model_dir, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(load_smolvlm_gptq_into(&mut back, &out).unwrap(), 14);
    let exp = vlmq_candle::candle_core::safetensors::load(
        dir().join("expected.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let rows: Vec<Vec<u32>> = exp["input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2()
        .unwrap();
    let batch: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
    let frames = SmolVlmModel::real_frames(&exp["pixel_values"])
        .unwrap()
        .unwrap();
    let want = quantized.logits(&batch, Some(&frames)).unwrap();
    let got = back.logits(&batch, Some(&frames)).unwrap();
    // The packed kernel reproduces the dequantized weights up to f32
    // rounding of scale * (code - zero).
    let diff = common::max_abs_diff(&got, &want);
    assert!(diff < 1e-4, "read-back logits differ by {diff}");
    std::fs::remove_dir_all(&d).unwrap();
}

/// A processor whose `image_seq_len` disagrees with the connector is
/// refused at load, naming the file and the field.
#[test]
fn a_processor_that_does_not_fit_the_model_is_refused() {
    let d = scratch("proc");
    let m = bf16_model(&d);
    let p = m.join("processor_config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    v["image_seq_len"] = 9.into();
    std::fs::write(&p, v.to_string()).unwrap();
    let e = Quantizer::from_pretrained(&m).err().unwrap().to_string();
    assert!(
        e.contains("processor_config.json") && e.contains("image_seq_len"),
        "{e}"
    );
    std::fs::remove_dir_all(&d).unwrap();
}
