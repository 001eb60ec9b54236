//! GGUF loading: the hf-tiny Llama and Qwen2 fixtures written as GGUF by
//! the test (q/k rows permuted the way llama.cpp's converter does for
//! `llama`), read back to the same logits; the tokenizer rebuilt from
//! `tokenizer.ggml.*` reproduces the fixture ids.

mod common;

use std::path::PathBuf;

use common::llama_cpp_qk_rows;

use vlmq_candle::candle_core::quantized::gguf_file::{self, Value};
use vlmq_candle::candle_core::quantized::{GgmlDType, QTensor};
use vlmq_candle::candle_core::{DType, Device};
use vlmq_candle::{
    encode, load_gguf, load_hf_dir, read_gguf_content, tokenizer_from_gguf, Architecture,
    LlamaModel,
};

fn dir(name: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/hf-tiny"
    ))
    .join(name)
}

fn gguf_name(hf: &str) -> String {
    match hf {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (n, rest) = rest.split_once('.').unwrap();
    let (part, kind) = rest.rsplit_once('.').unwrap();
    let g = match part {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        p => panic!("{p}"),
    };
    format!("blk.{n}.{g}.{kind}")
}

/// Writes `model` (and the fixture tokenizer) as a GGUF file the way llama.cpp would.
fn write_gguf(model: &LlamaModel, tokenizer_json: &PathBuf, path: &PathBuf) {
    let cfg = model.config();
    let arch = match cfg.arch {
        Architecture::Llama => "llama",
        Architecture::Qwen2 => "qwen2",
    };
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for (name, t) in model.weights().named_tensors() {
        let mut t = t.clone();
        if cfg.arch == Architecture::Llama {
            if name.contains("q_proj") {
                t = llama_cpp_qk_rows(&t, cfg.num_heads, false).unwrap();
            } else if name.contains("k_proj") {
                t = llama_cpp_qk_rows(&t, cfg.num_kv_heads, false).unwrap();
            }
        }
        tensors.push((
            gguf_name(&name),
            QTensor::quantize(&t, GgmlDType::F32).unwrap(),
        ));
    }
    let tj: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tokenizer_json).unwrap()).unwrap();
    let vocab = tj["model"]["vocab"].as_object().unwrap();
    let mut toks = vec![String::new(); cfg.vocab_size];
    for (t, id) in vocab {
        toks[id.as_u64().unwrap() as usize] = t.clone();
    }
    let mut types = vec![1i32; cfg.vocab_size];
    for a in tj["added_tokens"].as_array().unwrap() {
        let id = a["id"].as_u64().unwrap() as usize;
        toks[id] = a["content"].as_str().unwrap().to_string();
        types[id] = 3;
    }
    let merges: Vec<Value> = tj["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            serde_json::Value::String(s) => Value::String(s.clone()),
            serde_json::Value::Array(p) => Value::String(format!(
                "{} {}",
                p[0].as_str().unwrap(),
                p[1].as_str().unwrap()
            )),
            _ => panic!("merge"),
        })
        .collect();
    let s = |x: &str| Value::String(x.to_string());
    let u = |x: usize| Value::U32(x as u32);
    let md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), s(arch)),
        (format!("{arch}.embedding_length"), u(cfg.hidden_size)),
        (
            format!("{arch}.feed_forward_length"),
            u(cfg.intermediate_size),
        ),
        (format!("{arch}.block_count"), u(cfg.num_layers)),
        (format!("{arch}.attention.head_count"), u(cfg.num_heads)),
        (
            format!("{arch}.attention.head_count_kv"),
            u(cfg.num_kv_heads),
        ),
        (
            format!("{arch}.rope.freq_base"),
            Value::F32(cfg.rope_theta as f32),
        ),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            Value::F32(cfg.rms_eps as f32),
        ),
        ("tokenizer.ggml.model".into(), s("gpt2")),
        ("tokenizer.ggml.pre".into(), s("gpt2")),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(toks.iter().map(|t| s(t)).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
    ];
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
}

fn roundtrip(name: &str) {
    let hf = load_hf_dir(dir(name), DType::F32, &Device::Cpu).unwrap();
    let path = std::env::temp_dir().join(format!("vlmq-candle-{name}-{}.gguf", std::process::id()));
    write_gguf(&hf, &dir(name).join("tokenizer.json"), &path);
    let g = load_gguf(&path, DType::F32, &Device::Cpu).unwrap();
    // GGUF stores eps and theta as f32: compare those to f32 precision.
    let (mut gc, hc) = (g.config().clone(), hf.config());
    assert!((gc.rms_eps - hc.rms_eps).abs() <= 1e-6 * hc.rms_eps);
    assert!((gc.rope_theta - hc.rope_theta).abs() <= 1e-6 * hc.rope_theta);
    gc.rms_eps = hc.rms_eps;
    gc.rope_theta = hc.rope_theta;
    assert_eq!(&gc, hc);
    let inputs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir(name).join("inputs.json")).unwrap())
            .unwrap();
    let tk = tokenizer_from_gguf(&read_gguf_content(&path).unwrap(), &path).unwrap();
    let mut rows = Vec::new();
    for row in inputs["rows"].as_array().unwrap() {
        let want: Vec<u32> = row["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let text = row["text"].as_str().unwrap();
        assert_eq!(encode(&tk, text).unwrap(), want, "{text:?}");
        assert_eq!(tk.decode(&want, false).unwrap(), text);
        rows.push(want);
    }
    std::fs::remove_file(&path).unwrap();
    let batch: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
    // F32 tensors are stored exactly and the permutation is undone exactly:
    // the logits are bitwise equal.
    assert_eq!(
        common::max_abs_diff(&g.logits(&batch).unwrap(), &hf.logits(&batch).unwrap()),
        0.0
    );
}

#[test]
fn llama_gguf_with_permuted_qk_loads_to_the_same_logits() {
    roundtrip("llama");
}

#[test]
fn qwen2_gguf_loads_to_the_same_logits() {
    roundtrip("qwen2");
}
