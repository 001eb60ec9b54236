//! Hostile model files (issue 25): mutated copies of real fixture files go
//! through vlmq-candle's loaders. Every case must end in a value or an
//! error naming the file, never a panic or a hang (see `fuzz_support`).
//!
//! Cases per property: `PROPTEST_CASES` (default 128 here, sized for a
//! 2-core CI machine in the test profile).

mod fuzz_support;

use std::path::Path;

use fuzz_support::files::{
    fixtures, header_len, llama, load_as, load_vlm, model_dir, read, tiny_gguf, tiny_jpeg, vlm_dir,
    write_shards, CONVERSATIONS, RECORDS, TEMPLATE, VLMS,
};
use fuzz_support::{case_dir, cases, check, edits, json_values, mutate, mutate_json, Edit};
use proptest::prelude::*;
use vlmq_candle::candle_core::Device;
use vlmq_candle::process::chat_template::ChatTemplate;
use vlmq_candle::process::conversation::{read_conversations, Message, Part};
use vlmq_candle::process::image_input::{load_image, ClipImageProcessor};
use vlmq_candle::{tokenizer_from_file, Calibration, Residency};

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: cases(128),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Loads `path` with the layers in memory and, separately, on disk (that
/// load reads only headers, so it runs even where the other one fails):
/// each must pass [`check`] with errors naming `file`.
fn check_loads(file: &Path, path: &Path) -> Result<(), TestCaseError> {
    for residency in [Residency::Memory, Residency::Disk] {
        check(file, || load_as(path, residency))?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn mutated_safetensors_bytes(e in edits()) {
        let base = read(&llama().join("model.safetensors"));
        let bytes = mutate(&base, header_len(&base), &e);
        let d = case_dir("st-bytes");
        model_dir(&d, "model.safetensors", &bytes);
        check_loads(&d.join("model.safetensors"), &d)?;
    }

    #[test]
    fn mutated_safetensors_header(
        r in prop::collection::vec((any::<usize>(), json_values()), 1..4),
        dup in prop::option::of(any::<usize>()),
    ) {
        let base = read(&llama().join("model.safetensors"));
        let n = header_len(&base);
        let header = std::str::from_utf8(&base[8..n]).unwrap();
        let new_header = mutate_json(header, &r, dup);
        let mut bytes = (new_header.len() as u64).to_le_bytes().to_vec();
        bytes.extend(new_header);
        bytes.extend(&base[n..]);
        let d = case_dir("st-header");
        model_dir(&d, "model.safetensors", &bytes);
        check_loads(&d.join("model.safetensors"), &d)?;
    }

    #[test]
    fn mutated_shard_index(
        r in prop::collection::vec((any::<usize>(), json_values()), 0..3),
        dup in prop::option::of(any::<usize>()),
        e in prop::option::of(edits()),
    ) {
        let d = case_dir("shards");
        model_dir(&d, "config.json", &read(&llama().join("config.json")));
        std::fs::remove_file(d.join("model.safetensors")).unwrap();
        let index = write_shards(&d);
        let mut bytes = mutate_json(&index, &r, dup);
        if let Some(e) = e {
            bytes = mutate(&bytes, bytes.len(), &e);
        }
        let path = d.join("model.safetensors.index.json");
        std::fs::write(&path, bytes).unwrap();
        check_loads(&path, &d)?;
    }

    #[test]
    fn mutated_config_json(
        r in prop::collection::vec((any::<usize>(), json_values()), 1..4),
        dup in prop::option::of(any::<usize>()),
    ) {
        let text = std::fs::read_to_string(llama().join("config.json")).unwrap();
        let d = case_dir("config");
        model_dir(&d, "config.json", &mutate_json(&text, &r, dup));
        check_loads(&d.join("config.json"), &d)?;
    }

    #[test]
    fn mutated_vlm_config_json(
        k in 0..VLMS.len(),
        r in prop::collection::vec((any::<usize>(), json_values()), 1..4),
        dup in prop::option::of(any::<usize>()),
    ) {
        let path = fixtures().join(VLMS[k]).join("config.json");
        let text = std::fs::read_to_string(path).unwrap();
        let d = case_dir("vlm-config");
        vlm_dir(k, &d, &mutate_json(&text, &r, dup));
        check(&d.join("config.json"), || load_vlm(k, &d))?;
    }

    #[test]
    fn mutated_gguf(e in edits()) {
        let (base, header) = tiny_gguf();
        let d = case_dir("gguf");
        let path = d.join("model.gguf");
        std::fs::write(&path, mutate(base, *header, &e)).unwrap();
        check_loads(&path, &path)?;
    }

    #[test]
    fn mutated_tokenizer_json(
        r in prop::collection::vec((any::<usize>(), json_values()), 0..3),
        e in prop::option::of(edits()),
    ) {
        let text = std::fs::read_to_string(llama().join("tokenizer.json")).unwrap();
        let mut bytes = mutate_json(&text, &r, None);
        if let Some(e) = e {
            bytes = mutate(&bytes, bytes.len(), &e);
        }
        let d = case_dir("tokenizer");
        let path = d.join("tokenizer.json");
        std::fs::write(&path, bytes).unwrap();
        check(&path, || tokenizer_from_file(&path))?;
    }

    #[test]
    fn mutated_chat_template(e in edits()) {
        let bytes = mutate(TEMPLATE.as_bytes(), TEMPLATE.len(), &e);
        let source = String::from_utf8_lossy(&bytes).into_owned();
        let messages = [Message {
            role: "user".into(),
            content: vec![Part::Text("What is it?".into()), Part::Image("a.png".into())],
        }];
        // Templates are not files here: errors name the chat template.
        check(Path::new("chat template"), || {
            let t = ChatTemplate::new(source, serde_json::json!({"bos_token": "<s>"}))?;
            t.render(&messages, true)
        })?;
    }

    #[test]
    fn mutated_calibration_jsonl(e in edits(), conversations in any::<bool>()) {
        let d = case_dir("jsonl");
        std::fs::write(d.join("a.png"), b"not read").unwrap();
        let base = if conversations { CONVERSATIONS } else { RECORDS };
        let path = d.join("calib.jsonl");
        std::fs::write(&path, mutate(base.as_bytes(), base.len(), &e)).unwrap();
        if conversations {
            check(&path, || read_conversations(&path))?;
        } else {
            check(&path, || Calibration::from_file(&path))?;
        }
    }

    #[test]
    fn mutated_images(e in edits(), jpeg in any::<bool>()) {
        let (base, header) = if jpeg { tiny_jpeg() } else {
            let png = read(&fixtures().join("hf-tiny-vlm/qwen2_vl/image_0.png"));
            (png, 64)
        };
        let d = case_dir("image");
        let path = d.join(if jpeg { "image.jpg" } else { "image.png" });
        std::fs::write(&path, mutate(&base, header, &e)).unwrap();
        check(&path, || {
            let img = load_image(&path)?;
            ClipImageProcessor::for_image_size(16).batch(&[img], &Device::Cpu)
        })?;
    }
}

/// The mutations change the inputs (a test on unchanged files would prove
/// nothing): one flip in the header of each kind changes its bytes.
#[test]
fn the_mutations_change_the_files() {
    let base = read(&llama().join("model.safetensors"));
    let m = mutate(&base, header_len(&base), &[(Edit::Flip(0, 1), true)]);
    assert_ne!(m, base);
    assert_eq!(m.len(), base.len());
}
