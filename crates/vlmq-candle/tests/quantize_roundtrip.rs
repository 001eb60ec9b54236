//! A tiny random model written in HF layout (sharded, with the fixture
//! tokenizer) goes through loading, perplexity, GPTQ and VLMQ, the GPTQ
//! checkpoint writer and the read-back through `PackedLinear`.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use vlmq::{Bits, Checkpoint, GptqConfig, GroupSize, PipelineConfig, QuantMethod, QuantScheme};
use vlmq_candle::candle_core::{DType, Device, Tensor};
use vlmq_candle::eval::{evaluate, windows};
use vlmq_candle::export::{load_gptq_into, write_gptq};
use vlmq_candle::{
    encode, load_hf_dir, random_model, save_hf_dir, tokenizer_from_file, Architecture, LlamaConfig,
    TextSample,
};

fn fixture_tokenizer() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/hf-tiny/tokenizer/tokenizer.json"
    ))
}

fn cfg(arch: Architecture) -> LlamaConfig {
    LlamaConfig {
        arch,
        vocab_size: 300,
        hidden_size: 64,
        intermediate_size: 128,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 16,
        rope_theta: 1e4,
        rms_eps: 1e-5,
        tie_embeddings: arch == Architecture::Llama,
        qkv_bias: arch == Architecture::Qwen2,
    }
}

/// Rewrites `dir/model.safetensors` as two shards plus an index.
fn shard(dir: &Path) {
    let st = dir.join("model.safetensors");
    let all = vlmq_candle::candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
    std::fs::remove_file(&st).unwrap();
    let mut parts: [HashMap<String, Tensor>; 2] = [HashMap::new(), HashMap::new()];
    let mut map = BTreeMap::new();
    for (i, (k, v)) in all.into_iter().enumerate() {
        let f = format!("model-0000{}-of-00002.safetensors", i % 2 + 1);
        map.insert(k.clone(), serde_json::Value::String(f));
        parts[i % 2].insert(k, v);
    }
    for (i, p) in parts.iter().enumerate() {
        let f = dir.join(format!("model-0000{}-of-00002.safetensors", i + 1));
        vlmq_candle::candle_core::safetensors::save(p, f).unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

fn text() -> String {
    "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. \
     Rust programs are fast and memory efficient, with no runtime or garbage collector. "
        .repeat(6)
}

fn run(arch: Architecture, method: QuantMethod) {
    let tmp = std::env::temp_dir().join(format!(
        "vlmq-candle-rt-{arch:?}-{method}-{}",
        std::process::id()
    ));
    let (src, out) = (tmp.join("src"), tmp.join("out"));
    let orig = random_model(&cfg(arch), 11, DType::F32).unwrap();
    save_hf_dir(&orig, &src).unwrap();
    std::fs::copy(fixture_tokenizer(), src.join("tokenizer.json")).unwrap();
    shard(&src);

    let mut model = load_hf_dir(&src, DType::F32, &Device::Cpu).unwrap();
    let tk = tokenizer_from_file(src.join("tokenizer.json")).unwrap();
    let tokens = encode(&tk, &text()).unwrap();
    let wins = windows(&tokens, 32);
    assert!(wins.len() >= 6, "{} windows", wins.len());
    let probe: Vec<&[u32]> = wins[..2].iter().map(Vec::as_slice).collect();
    assert_eq!(
        common::max_abs_diff(
            &model.logits(&probe).unwrap(),
            &orig.logits(&probe).unwrap()
        ),
        0.0
    );

    let reference = model.clone();
    let eval_set = &wins[wins.len() - 2..];
    let base = evaluate(&reference, Some(&reference), eval_set, 2, &mut |_, _| {}).unwrap();
    assert!(base.perplexity.is_finite() && base.kl.unwrap().abs() < 1e-9);

    let samples: Vec<TextSample> = wins[..4].iter().cloned().map(TextSample::causal).collect();
    let scheme = QuantScheme::new(Bits::new(4).unwrap())
        .with_group_size(GroupSize::new(32).unwrap())
        .with_symmetric(true);
    let pcfg = PipelineConfig::new(method, GptqConfig::new(scheme));
    let q = vlmq::quantize_model(&mut model, &samples, &pcfg, |_| {}).unwrap();
    assert_eq!(q.weights.len(), 14);
    let after = evaluate(&model, Some(&reference), eval_set, 2, &mut |_, _| {}).unwrap();
    assert!(after.kl.unwrap() > 0.0 && after.perplexity.is_finite());

    write_gptq(&model, &q, Some(&tk), &out).unwrap();
    let ck = Checkpoint::open(&out).unwrap();
    assert!(ck.names().contains(&"model.layers.1.self_attn.q_proj"));
    assert!(ck.tensor_names().contains(&"model.embed_tokens.weight"));
    if arch == Architecture::Qwen2 {
        assert!(ck
            .bias("model.layers.0.self_attn.k_proj")
            .unwrap()
            .is_some());
        assert!(ck.tensor_names().contains(&"lm_head.weight"));
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["quantization_config"]["bits"], 4);
    assert_eq!(config["model_type"], arch_name(arch));
    assert!(out.join("quantize_config.json").exists() && out.join("tokenizer.json").exists());

    let mut back = reference.clone();
    assert_eq!(load_gptq_into(&mut back, &out).unwrap(), 14);
    // The packed kernel reproduces the dequantized weights up to f32
    // rounding of scale * (code - zero) (and of the bias subtraction).
    let d = common::max_abs_diff(
        &back.logits(&probe).unwrap(),
        &model.logits(&probe).unwrap(),
    );
    assert!(d < 1e-4, "read-back logits differ by {d}");
    std::fs::remove_dir_all(&tmp).unwrap();
}

fn arch_name(a: Architecture) -> &'static str {
    match a {
        Architecture::Llama => "llama",
        Architecture::Qwen2 => "qwen2",
    }
}

#[test]
fn llama_gptq_roundtrip() {
    run(Architecture::Llama, QuantMethod::Gptq);
}

#[test]
fn qwen2_vlmq_gptaq_roundtrip() {
    run(Architecture::Qwen2, QuantMethod::VlmqGptaq);
}
