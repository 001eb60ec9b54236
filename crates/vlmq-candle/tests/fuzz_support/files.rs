//! The fixture files the loader fuzz tests mutate, and the loads they run.

use std::path::{Path, PathBuf};

use vlmq_candle::candle_core::quantized::gguf_file::{self, Value as GgufValue};
use vlmq_candle::candle_core::quantized::{GgmlDType, QTensor};
use vlmq_candle::candle_core::{DType, Device};
use vlmq_candle::{
    load_llava_dir, load_model_with, load_qwen2_vl_dir, load_smolvlm_dir, LoadOptions, Residency,
};

/// The crate's test fixtures.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The tiny Llama HF directory (config.json, model.safetensors, tokenizer.json).
pub fn llama() -> PathBuf {
    fixtures().join("hf-tiny/llama")
}

/// The bytes of a fixture file.
pub fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

/// A copy of the tiny Llama directory in `dir` with `file` replaced.
pub fn model_dir(dir: &Path, file: &str, bytes: &[u8]) {
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(llama().join(f), dir.join(f)).unwrap();
    }
    std::fs::write(dir.join(file), bytes).unwrap();
}

/// Loads the model (and tokenizer) at `path` with its layers in `residency`.
pub fn load_as(path: &Path, residency: Residency) -> vlmq::Result<()> {
    let opts = LoadOptions::default().with_residency(residency);
    load_model_with(path, &opts).map(|_| ())
}

/// The vision-language fixture directories (fixtures-relative).
pub const VLMS: [&str; 4] = [
    "hf-tiny/llava",
    "hf-tiny-vlm/qwen2_vl",
    "hf-tiny-vlm/qwen2_5_vl",
    "hf-tiny-vlm/smolvlm",
];

/// Loads the model of `VLMS[k]`'s kind from `dir`.
pub fn load_vlm(k: usize, dir: &Path) -> vlmq::Result<()> {
    let (dtype, cpu) = (DType::F32, &Device::Cpu);
    match k {
        0 => load_llava_dir(dir, dtype, cpu).map(|_| ()),
        1 | 2 => load_qwen2_vl_dir(dir, dtype, cpu).map(|_| ()),
        _ => load_smolvlm_dir(dir, dtype, cpu).map(|_| ()),
    }
}

/// `VLMS[k]`'s weights in `dir` (a link where the system has them) with
/// `config` as its config.json.
pub fn vlm_dir(k: usize, dir: &Path, config: &[u8]) {
    let weights = fixtures().join(VLMS[k]).join("model.safetensors");
    #[cfg(unix)]
    std::os::unix::fs::symlink(&weights, dir.join("model.safetensors")).unwrap();
    #[cfg(not(unix))]
    std::fs::copy(&weights, dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("config.json"), config).unwrap();
}

/// Length of a safetensors file's header (the 8-byte length and the JSON).
pub fn header_len(bytes: &[u8]) -> usize {
    8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize
}

/// A two-line text calibration file.
pub const RECORDS: &str =
    "{\"text\": \"the first record\"}\n{\"text\": \"and the second\", \"images\": [\"a.png\"]}\n";

/// A conversation calibration file (SmolVLM / Qwen2-VL style).
pub const CONVERSATIONS: &str = "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"image\",\"path\":\"a.png\"},{\"type\":\"text\",\"text\":\"What is this?\"}]},{\"role\":\"assistant\",\"content\":\"A cat.\"}]}\n";

/// A chat template with loops, conditions and filters, like the models'.
pub const TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] | capitalize }}\n{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>{% elif 'text' in part %}{{ part['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// Splits the tiny Llama's tensors into two shards in `dir`; returns the index text.
pub fn write_shards(dir: &Path) -> String {
    let tensors = vlmq_candle::candle_core::safetensors::load(
        llama().join("model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut map = serde_json::Map::new();
    for (k, part) in names.chunks(names.len().div_ceil(2)).enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", k + 1);
        let shard: std::collections::HashMap<String, _> = part
            .iter()
            .map(|n| ((*n).clone(), tensors[*n].clone()))
            .collect();
        vlmq_candle::candle_core::safetensors::save(&shard, dir.join(&file)).unwrap();
        for n in part {
            map.insert((*n).clone(), file.clone().into());
        }
    }
    serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map}).to_string()
}

/// GGUF name of an HF tensor name of the tiny Llama.
pub fn gguf_name(hf: &str) -> String {
    let fixed = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = fixed.iter().find(|(h, _)| *h == hf) {
        return g.to_string();
    }
    let parts = [
        ("input_layernorm", "attn_norm"),
        ("post_attention_layernorm", "ffn_norm"),
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
    ];
    let rest = hf.strip_prefix("model.layers.").expect("a layer tensor");
    let (n, rest) = rest.split_once('.').unwrap();
    let (part, kind) = rest.rsplit_once('.').unwrap();
    let g = parts
        .iter()
        .find(|(h, _)| *h == part)
        .expect("known part")
        .1;
    format!("blk.{n}.{g}.{kind}")
}

/// The tiny Llama (f16 tensors) and a 300-token byte-level BPE vocabulary
/// as a GGUF file: its bytes and the length of its header (made once).
pub fn tiny_gguf() -> &'static (Vec<u8>, usize) {
    static GGUF: std::sync::OnceLock<(Vec<u8>, usize)> = std::sync::OnceLock::new();
    GGUF.get_or_init(|| {
        let bytes = gguf_with(Vec::new());
        let content = gguf_file::Content::read(&mut std::io::Cursor::new(&bytes)).unwrap();
        let header = content.tensor_data_offset as usize;
        (bytes, header)
    })
}

/// The bytes of [`tiny_gguf`] with the metadata entries of `changes`
/// replaced or added.
pub fn gguf_with(changes: Vec<(&str, GgufValue)>) -> Vec<u8> {
    let opts = LoadOptions::default().with_dtype(DType::F32);
    let (model, _) = load_model_with(llama(), &opts).unwrap();
    let cfg = model.config();
    let tensors: Vec<(String, QTensor)> = model
        .weights()
        .named_tensors()
        .into_iter()
        .map(|(n, t)| {
            (
                gguf_name(&n),
                QTensor::quantize(&t, GgmlDType::F16).unwrap(),
            )
        })
        .collect();
    let s = |x: &str| GgufValue::String(x.to_string());
    let u = |x: usize| GgufValue::U32(x as u32);
    let mut tokens: Vec<GgufValue> = (0..cfg.vocab_size).map(|i| s(&format!("t{i}"))).collect();
    tokens[0] = s("<s>");
    // The one merge's result is in the vocabulary (else the tokenizer is refused).
    tokens[cfg.vocab_size - 1] = s("t1t2");
    let mut md: Vec<(&str, GgufValue)> = vec![
        ("general.architecture", s("llama")),
        ("llama.embedding_length", u(cfg.hidden_size)),
        ("llama.feed_forward_length", u(cfg.intermediate_size)),
        ("llama.block_count", u(cfg.num_layers)),
        ("llama.attention.head_count", u(cfg.num_heads)),
        ("llama.attention.head_count_kv", u(cfg.num_kv_heads)),
        (
            "llama.rope.freq_base",
            GgufValue::F32(cfg.rope_theta as f32),
        ),
        ("tokenizer.ggml.model", s("gpt2")),
        ("tokenizer.ggml.tokens", GgufValue::Array(tokens)),
        ("tokenizer.ggml.merges", GgufValue::Array(vec![s("t1 t2")])),
        (
            "tokenizer.ggml.token_type",
            GgufValue::Array(
                (0..cfg.vocab_size)
                    .map(|i| GgufValue::I32(if i == 0 { 3 } else { 1 }))
                    .collect(),
            ),
        ),
    ];
    for (key, value) in changes {
        md.retain(|(k, _)| *k != key);
        md.push((key, value));
    }
    let md_refs: Vec<(&str, &GgufValue)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut bytes = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut bytes, &md_refs, &t_refs).unwrap();
    bytes.into_inner()
}

/// A small JPEG (a colour gradient) and the length of its headers.
pub fn tiny_jpeg() -> (Vec<u8>, usize) {
    let img = image::RgbImage::from_fn(24, 16, |x, y| {
        image::Rgb([(x * 10) as u8, (y * 15) as u8, 128])
    });
    let mut bytes = std::io::Cursor::new(Vec::new());
    img.write_to(&mut bytes, image::ImageFormat::Jpeg).unwrap();
    (bytes.into_inner(), 700)
}
