//! The inputs the loader fuzz tests found, kept as plain tests (each one
//! panicked before its fix), and the unmutated files loading cleanly (so
//! the properties mutate files that pass every check as they are).

use std::path::{Path, PathBuf};

use serde_json::Value;
use vlmq_candle::candle_core::quantized::gguf_file::Value as GgufValue;
use vlmq_candle::{tokenizer_from_file, Residency};

use super::case_dir;
use super::files::{
    fixtures, gguf_with, header_len, llama, load_as, load_vlm, model_dir, read, tiny_gguf, vlm_dir,
    VLMS,
};

const BOTH: [Residency; 2] = [Residency::Memory, Residency::Disk];

/// `r` must be an error whose message contains every one of `names`.
fn refused(r: vlmq::Result<()>, names: &[&str]) {
    let e = r.expect_err("a corrupt file must be refused").to_string();
    for n in names {
        assert!(e.contains(n), "the error does not name {n}: {e}");
    }
}

/// Both residencies must refuse the model at `path`, naming every one of `names`.
fn refused_both(path: &Path, names: &[&str]) {
    for residency in BOTH {
        refused(load_as(path, residency), names);
    }
}

/// Writes `bytes` as `model.gguf` in the case directory `d`; returns its path.
fn gguf_file(d: &Path, bytes: &[u8]) -> PathBuf {
    let path = d.join("model.gguf");
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn the_unmutated_files_load() {
    let d = case_dir("clean");
    let gguf = gguf_file(&d, &tiny_gguf().0);
    for residency in BOTH {
        load_as(&llama(), residency).unwrap();
        load_as(&gguf, residency).unwrap();
    }
    tokenizer_from_file(llama().join("tokenizer.json")).unwrap();
    for (k, vlm) in VLMS.iter().enumerate() {
        let d = case_dir("clean-vlm");
        vlm_dir(k, &d, &read(&fixtures().join(vlm).join("config.json")));
        load_vlm(k, &d).unwrap();
    }
}

/// 1 in about 3,300 cases at first: `num_attention_heads * head_dim`
/// overflowed (a debug-build panic) when the expected shapes were computed.
#[test]
fn config_sizes_whose_product_overflows_are_refused() {
    let mut v: Value = serde_json::from_slice(&read(&llama().join("config.json"))).unwrap();
    v["num_attention_heads"] = i64::MAX.into();
    v["num_key_value_heads"] = (-1).into();
    let d = case_dir("overflow-config");
    model_dir(&d, "config.json", v.to_string().as_bytes());
    refused_both(&d, &["config.json", "num_attention_heads"]);
}

/// candle read an empty tensor through a misaligned pointer (a debug
/// precondition panic in its GGUF reader).
#[test]
fn a_gguf_tensor_with_a_zero_dimension_is_refused() {
    let mut bytes = tiny_gguf().0.clone();
    let name = b"output_norm.weight";
    // Tensor table entry: the name, its dimension count (u32), the dimensions (u64).
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len();
    assert_eq!(bytes[at..at + 4], 1u32.to_le_bytes());
    bytes[at + 4..at + 12].copy_from_slice(&0u64.to_le_bytes());
    let d = case_dir("zero-dim");
    refused_both(
        &gguf_file(&d, &bytes),
        &["model.gguf", "output_norm.weight"],
    );
}

/// candle divides by `general.alignment` when it reads the header.
#[test]
fn a_gguf_alignment_of_zero_is_refused() {
    let bytes = gguf_with(vec![("general.alignment", GgufValue::U32(0))]);
    let d = case_dir("alignment");
    refused_both(&gguf_file(&d, &bytes), &["model.gguf", "general.alignment"]);
}

/// A negative i32 size was cast to a huge usize (a model of 2^64 - 1 layers).
#[test]
fn a_negative_gguf_size_is_refused() {
    let bytes = gguf_with(vec![("llama.block_count", GgufValue::I32(-1))]);
    let d = case_dir("negative");
    refused_both(&gguf_file(&d, &bytes), &["model.gguf", "llama.block_count"]);
}

/// 1 in about 4,000 cases: LLaVA's image token outside the vocabulary was
/// an error without a file name (the model's own check, after loading).
#[test]
fn a_vlm_config_value_the_model_refuses_names_the_directory() {
    let path = fixtures().join(VLMS[0]).join("config.json");
    let mut v: Value = serde_json::from_slice(&read(&path)).unwrap();
    v["image_token_index"] = i64::from(i32::MAX).into();
    let d = case_dir("image-token");
    vlm_dir(0, &d, v.to_string().as_bytes());
    let name = d.file_name().unwrap().to_string_lossy().into_owned();
    refused(load_vlm(0, &d), &[&name, "image_token_index"]);
}

/// A model whose layers stay on disk read only the headers at load time
/// and trusted the configuration's layer count until a block was run
/// (a count of 2^64 - 1 then overflowed further on): every layer's tensors
/// are now checked against the file's tensor directory at load time.
#[test]
fn more_layers_than_the_file_holds_are_refused_at_load() {
    let mut v: Value = serde_json::from_slice(&read(&llama().join("config.json"))).unwrap();
    v["num_hidden_layers"] = 3.into();
    let d = case_dir("layers-hf");
    model_dir(&d, "config.json", v.to_string().as_bytes());
    refused_both(&d, &["model.layers.2."]);
    let bytes = gguf_with(vec![("llama.block_count", GgufValue::U32(3))]);
    let d = case_dir("layers-gguf");
    refused_both(&gguf_file(&d, &bytes), &["model.gguf", "model.layers.2."]);
}

/// The on-disk safetensors index added a tensor's end offset to the data
/// start unchecked (end = 2^64 - 1 with a consistent length overflowed).
#[test]
fn safetensors_offsets_at_the_end_of_u64_are_refused() {
    let base = read(&llama().join("model.safetensors"));
    let n = header_len(&base);
    let mut header: Value = serde_json::from_slice(&base[8..n]).unwrap();
    let len = 64 * 4; // model.norm.weight: 64 f32
    header["model.norm.weight"]["data_offsets"] = serde_json::json!([u64::MAX - len, u64::MAX]);
    let header = header.to_string();
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header.as_bytes());
    bytes.extend(&base[n..]);
    let d = case_dir("offsets");
    model_dir(&d, "model.safetensors", &bytes);
    refused(
        load_as(&d, Residency::Disk),
        &["model.safetensors", "model.norm.weight"],
    );
}

/// The tokenizers crate panics (`expect("Helper")`) on a decoder entry that
/// is not valid JSON.
#[test]
fn a_tokenizer_whose_decoder_is_not_json_is_refused() {
    let text = std::fs::read_to_string(llama().join("tokenizer.json")).unwrap();
    let broken = text.replacen("\"decoder\": {", "\"decoder\": {,", 1);
    assert_ne!(broken, text);
    let d = case_dir("decoder");
    let path = d.join("tokenizer.json");
    std::fs::write(&path, broken).unwrap();
    refused(tokenizer_from_file(&path).map(|_| ()), &["tokenizer.json"]);
}
