//! Conversation calibration on a GGUF model: the chat template comes from
//! the file's `tokenizer.chat_template` key and its special tokens from the
//! `tokenizer.ggml.*_token_id` keys, as llama.cpp's converters store them.
//! The GGUF files are hf-tiny's Llama written by vlmq's own GGUF writer.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use vlmq::Error;
use vlmq_candle::candle_core::quantized::GgmlDType;
use vlmq_candle::candle_core::{DType, Device};
use vlmq_candle::export::write_gguf_llama;
use vlmq_candle::process::chat_template::ChatTemplate;
use vlmq_candle::{load_hf_dir, Calibration, Quantizer, Recipe, Stage};

/// Reads both special tokens, so a template without them renders differently.
const TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}";

const CONVERSATIONS: &str = r#"{"messages":[{"role":"user","content":"What is the capital of France?"},{"role":"assistant","content":"Paris, the largest city of the country."}]}
{"messages":[{"role":"user","content":"Name a prime number."},{"role":"assistant","content":"Seven is a prime number, and so is eleven."}]}
{"messages":[{"role":"user","content":"Which colour is the sky?"},{"role":"assistant","content":"Blue on a clear day, grey under clouds."}]}
"#;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf-tiny/llama")
}

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("vlmq-gguf-chat-{}-{name}", std::process::id()))
}

/// hf-tiny's Llama copied to `dir`, its `tokenizer_config.json` carrying
/// [`TEMPLATE`].
fn hf_dir_with_template(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture().join(f), dir.join(f)).unwrap();
    }
    let text = std::fs::read_to_string(fixture().join("tokenizer_config.json")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
    cfg["chat_template"] = TEMPLATE.into();
    std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
}

/// The model of the HF directory `src` as a GGUF file at `dst`, with the
/// directory's tokenizer and chat template.
fn write_gguf(src: &Path, dst: &Path) {
    let model = load_hf_dir(src, DType::F32, &Device::Cpu).unwrap();
    write_gguf_llama(&model, &BTreeMap::new(), Some(src), GgmlDType::F32, dst).unwrap();
}

fn conversations(path: &Path) -> Calibration {
    std::fs::write(path, CONVERSATIONS).unwrap();
    Calibration::from_file(path).unwrap()
}

#[test]
fn a_gguf_template_renders_as_the_source_directory_s_template() {
    let dir = tmp("hf");
    hf_dir_with_template(&dir);
    let gguf = tmp("with-template.gguf");
    write_gguf(&dir, &gguf);
    let from_dir = ChatTemplate::from_model_dir(&dir).unwrap();
    let from_gguf = ChatTemplate::from_gguf(&gguf).unwrap();
    let jsonl = tmp("render.jsonl");
    let Calibration::Conversations(convs) = conversations(&jsonl) else {
        panic!("the JSONL holds conversations");
    };
    for c in &convs {
        let text = from_gguf.render(&c.messages, false).unwrap();
        assert!(text.starts_with("<|endoftext|><user>"), "{text:?}");
        assert_eq!(text, from_dir.render(&c.messages, false).unwrap());
    }
    for p in [&gguf, &jsonl] {
        std::fs::remove_file(p).unwrap();
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn conversations_calibrate_a_gguf_model_through_the_one_call_api() {
    let dir = tmp("hf-api");
    hf_dir_with_template(&dir);
    let gguf = tmp("api.gguf");
    write_gguf(&dir, &gguf);
    let jsonl = tmp("api.jsonl");
    let data = conversations(&jsonl);
    let recipe = Recipe {
        samples: 2,
        seq_len: 16,
        ..Recipe::default()
    }
    .check("test".as_ref())
    .unwrap();
    let mut calibrated = 0;
    let done = Quantizer::from_pretrained(&gguf)
        .unwrap()
        .calibrate(data, &jsonl)
        .unwrap()
        .quantize(&recipe, |e| {
            if e.stage == Stage::Calibrate {
                calibrated = e.done;
            }
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(calibrated, 2, "both drawn conversations were rendered");
    assert!(!done.output().weights.is_empty());
    for p in [&gguf, &jsonl] {
        std::fs::remove_file(p).unwrap();
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_gguf_without_a_template_is_refused_naming_the_file_and_key() {
    // hf-tiny's own tokenizer_config.json has no chat template.
    let gguf = tmp("no-template.gguf");
    write_gguf(&fixture(), &gguf);
    let jsonl = tmp("refused.jsonl");
    let data = conversations(&jsonl);
    let recipe = Recipe::default().check("test".as_ref()).unwrap();
    let err = Quantizer::from_pretrained(&gguf)
        .unwrap()
        .calibrate(data, &jsonl)
        .unwrap()
        .quantize(&recipe, |_| ControlFlow::Continue(()))
        .err()
        .expect("no template, no conversations");
    match &err {
        Error::InvalidField { path, field, .. } => {
            assert_eq!((path, field.as_str()), (&gguf, "tokenizer.chat_template"));
        }
        other => panic!("expected InvalidField, got {other:?}"),
    }
    for p in [&gguf, &jsonl] {
        std::fs::remove_file(p).unwrap();
    }
}
