//! Calibration JSONL parsing and chat-template rendering: the SmolVLM and
//! Qwen2-VL chat formats rendered from conversations reproduce the prompts
//! of the hf-tiny-vlm fixtures (`inputs.json`), message spans and token
//! roles follow the text, and malformed records name file, line and field.

use std::path::{Path, PathBuf};

use serde_json::Value;
use vlmq::Error;
use vlmq_candle::process::chat_template::{ChatTemplate, TokenRole};
use vlmq_candle::process::conversation::{parse_conversation, read_conversations, Part};

fn fixture(model: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf-tiny-vlm")
        .join(model)
}

/// SmolVLM-Instruct's published chat template (role capitalized, ':' right
/// after the role when the message opens with an image, ': ' otherwise).
const SMOLVLM_TEMPLATE: &str = "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}";

/// Qwen2-VL's chat template without its default system message (the
/// fixture prompts have none); block tags on their own lines exercise
/// `trim_blocks` / `lstrip_blocks`.
const QWEN_TEMPLATE: &str = "{% set image_count = namespace(value=0) %}
{% for message in messages %}
<|im_start|>{{ message['role'] }}
{% if message['content'] is string %}
{{ message['content'] }}<|im_end|>
{% else %}
    {% for content in message['content'] %}
        {% if content['type'] == 'image' %}
            {% set image_count.value = image_count.value + 1 %}
<|vision_start|><|image_pad|><|vision_end|>
{%- elif 'text' in content %}{{ content['text'] }}{% endif %}
    {% endfor %}
<|im_end|>
{% endif %}
{% endfor %}
{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}";

fn write_jsonl(dir: &Path, lines: &[Value]) -> PathBuf {
    let path = dir.join("calib.jsonl");
    let text: Vec<String> = lines.iter().map(Value::to_string).collect();
    std::fs::write(&path, text.join("\n")).unwrap();
    path
}

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vlmq-chat-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The fixture's two samples as conversations (answers as in the prompts).
fn fixture_records(answers: [&str; 2]) -> Vec<Value> {
    let img = |p: &str| serde_json::json!({"type": "image", "path": p});
    let text = |t: &str| serde_json::json!({"type": "text", "text": t});
    vec![
        serde_json::json!({"messages": [
            {"role": "user", "content": [img("image_0.png"), text("What is in the picture?")]},
            {"role": "assistant", "content": [text(answers[0])]}]}),
        serde_json::json!({"messages": [
            {"role": "user", "content": [img("image_1.png"), img("image_0.png"), text("Compare the pictures.")]},
            {"role": "assistant", "content": answers[1]}]}),
    ]
}

fn inputs(model: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(model).join("inputs.json")).unwrap())
        .unwrap()
}

fn copy_images(model: &str, dir: &Path) {
    for k in 0..2 {
        let name = format!("image_{k}.png");
        std::fs::copy(fixture(model).join(&name), dir.join(&name)).unwrap();
    }
}

#[test]
fn smolvlm_template_reproduces_the_fixture_prompts() {
    let dir = tmp_dir("smol");
    copy_images("smolvlm", &dir);
    let answers = [
        "A red square sits on a smooth colored gradient, and a",
        "The first is tall.",
    ];
    let file = write_jsonl(&dir, &fixture_records(answers));
    let convs = read_conversations(&file).unwrap();
    assert_eq!(convs.len(), 2);
    assert_eq!(
        convs[1].images(),
        vec![dir.join("image_1.png"), dir.join("image_0.png")]
    );
    let tmpl = ChatTemplate::new(SMOLVLM_TEMPLATE.into(), serde_json::json!({})).unwrap();
    let want = inputs("smolvlm");
    for (k, c) in convs.iter().enumerate() {
        let r = tmpl.render_with_spans(&c.messages).unwrap();
        // The fixture prompts stop right after the answer (no end of turn).
        let prompt = want["samples"][k]["text"].as_str().unwrap();
        assert_eq!(r.text.strip_suffix("<end_of_utterance>\n"), Some(prompt));
        let answer = &r.spans[1];
        // The generation prompt is "Assistant:"; the template's ": " puts the
        // space into the answer.
        assert_eq!(
            &r.text[answer.content_start..answer.end],
            format!(" {}<end_of_utterance>\n", answers[k])
        );
        assert_eq!(&r.text[answer.start..answer.content_start], "Assistant:");
        assert_eq!(r.spans[0].start, "<|im_start|>".len());
    }
}

#[test]
fn qwen_template_reproduces_the_fixture_prompts() {
    let dir = tmp_dir("qwen");
    copy_images("qwen2_vl", &dir);
    let answers = [
        "A red square sits on a smooth colored",
        "The first one is tall.",
    ];
    let file = write_jsonl(&dir, &fixture_records(answers));
    let convs = read_conversations(&file).unwrap();
    let tmpl = ChatTemplate::new(QWEN_TEMPLATE.into(), serde_json::json!({})).unwrap();
    let want = inputs("qwen2_vl");
    for (k, c) in convs.iter().enumerate() {
        let r = tmpl.render_with_spans(&c.messages).unwrap();
        let prompt = want["samples"][k]["text"].as_str().unwrap();
        assert_eq!(
            r.text.strip_suffix("<|im_end|>\n"),
            Some(prompt),
            "sample {k}"
        );
        let answer = &r.spans[1];
        assert_eq!(
            &r.text[answer.start..answer.content_start],
            "<|im_start|>assistant\n"
        );
    }
}

#[test]
fn expansion_moves_spans_and_tokens_get_roles() {
    let dir = tmp_dir("roles");
    copy_images("smolvlm", &dir);
    let file = write_jsonl(&dir, &fixture_records(["Yes.", "No."]));
    let convs = read_conversations(&file).unwrap();
    let tmpl = ChatTemplate::new(SMOLVLM_TEMPLATE.into(), serde_json::json!({})).unwrap();
    let r = tmpl.render_with_spans(&convs[1].messages).unwrap();
    let expanded = r
        .expand("<image>", &["<a><image><image>".into(), "<image>".into()])
        .unwrap();
    let answer = &expanded.spans[1];
    assert_eq!(
        &expanded.text[answer.content_start..answer.end],
        " No.<end_of_utterance>\n"
    );
    assert_eq!(
        &expanded.text[..expanded.spans[0].end],
        "<|im_start|>User:<a><image><image><image>Compare the pictures.<end_of_utterance>\n"
    );
    assert!(r.expand("<image>", &["x".into()]).is_err());

    let tok = tokenizers::Tokenizer::from_file(fixture("smolvlm").join("tokenizer.json")).unwrap();
    let enc = tok.encode(expanded.text.as_str(), false).unwrap();
    let roles = expanded.token_roles(enc.get_ids(), enc.get_offsets(), 301);
    let count = |role| roles.iter().filter(|&&r| r == role).count();
    assert_eq!(count(TokenRole::Vision), 3);
    let answer_text: String = enc
        .get_offsets()
        .iter()
        .zip(&roles)
        .filter(|(_, &r)| r == TokenRole::Answer)
        .map(|(&(s, e), _)| &expanded.text[s..e])
        .collect();
    assert_eq!(answer_text, " No.<end_of_utterance>\n");
}

fn record_error(line: &str) -> (usize, String, String) {
    let dir = tmp_dir("bad");
    std::fs::write(dir.join("ok.png"), b"").unwrap();
    let path = dir.join("bad.jsonl");
    std::fs::write(&path, format!("\n{line}\n")).unwrap();
    match read_conversations(&path) {
        Err(Error::InvalidField {
            path: p,
            field,
            reason,
        }) => {
            assert_eq!(p, path);
            let (line, field) = field.split_once(": ").expect("line N: field");
            let line = line.strip_prefix("line ").unwrap().parse().unwrap();
            (line, field.to_string(), reason)
        }
        other => panic!("expected InvalidField, got {other:?}"),
    }
}

#[test]
fn malformed_records_name_line_and_field() {
    let (line, field, _) = record_error("{not json");
    assert_eq!((line, field.as_str()), (2, "(record)"));
    let (_, field, _) = record_error(r#"{"msgs": []}"#);
    assert_eq!(field, "messages");
    let (_, field, _) = record_error(r#"{"messages": [{"content": "hi"}]}"#);
    assert_eq!(field, "messages[0].role");
    let (_, field, _) =
        record_error(r#"{"messages": [{"role": "user", "content": [{"type": "audio"}]}]}"#);
    assert_eq!(field, "messages[0].content[0].type");
    let (_, field, reason) = record_error(
        r#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image", "path": "missing.png"}]}]}"#,
    );
    assert_eq!(field, "messages[0].content[1].path");
    assert!(reason.contains("missing.png"), "{reason}");
    // A good record parses, plain-string content is one text part.
    let c = parse_conversation(
        r#"{"messages": [{"role": "user", "content": "hi"}]}"#,
        Path::new("x.jsonl"),
        7,
        Path::new("."),
    )
    .unwrap();
    assert_eq!(c.messages[0].content, vec![Part::Text("hi".into())]);
    assert_eq!(c.line, 7);
}

#[test]
fn template_search_order_and_raise_exception() {
    let dir = tmp_dir("find");
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"bos_token": {"content": "<s>"}, "chat_template": [{"name": "default", "template": "{{ bos_token }}T"}]}"#,
    )
    .unwrap();
    let msgs = vec![];
    assert_eq!(
        ChatTemplate::from_model_dir(&dir)
            .unwrap()
            .render(&msgs, false)
            .unwrap(),
        "<s>T"
    );
    std::fs::write(
        dir.join("processor_config.json"),
        r#"{"chat_template": "P"}"#,
    )
    .unwrap();
    assert_eq!(
        ChatTemplate::from_model_dir(&dir)
            .unwrap()
            .render(&msgs, false)
            .unwrap(),
        "P"
    );
    std::fs::write(
        dir.join("chat_template.jinja"),
        "{{ raise_exception('no system role') }}",
    )
    .unwrap();
    let err = ChatTemplate::from_model_dir(&dir)
        .unwrap()
        .render(&msgs, false)
        .unwrap_err();
    assert!(err.to_string().contains("no system role"), "{err}");
}
