//! The sharded GPTQ writer, fed block by block by the streaming pipeline,
//! writes the same tensors as the single-file writer after the run, with an
//! index naming the shard of each; the target appears only at the end.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use vlmq::{
    quantize_model, quantize_model_streaming, Bits, GptqConfig, GroupSize, PipelineConfig,
    QuantMethod, QuantScheme,
};
use vlmq_candle::candle_core::{safetensors, DType, Device, Tensor};
use vlmq_candle::export::{write_gptq, ShardedGptqWriter};
use vlmq_candle::{
    load_hf_dir, load_hf_dir_with, random_model, save_hf_dir, Architecture, LlamaConfig,
    LoadOptions, Residency, TextSample,
};

fn temp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vlmq-sharded-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn tensors(dir: &std::path::Path) -> HashMap<String, (Tensor, String)> {
    let mut out = HashMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            let file = p.file_name().unwrap().to_string_lossy().to_string();
            for (k, v) in safetensors::load(&p, &Device::Cpu).unwrap() {
                assert!(
                    out.insert(k, (v, file.clone())).is_none(),
                    "one shard per tensor"
                );
            }
        }
    }
    out
}

/// A random 3-layer Qwen2-shaped model saved under `root/src`, its
/// calibration samples and a GPTQ configuration.
fn setup(root: &Path) -> (PathBuf, Vec<TextSample>, PipelineConfig) {
    let cfg = LlamaConfig {
        arch: Architecture::Qwen2,
        vocab_size: 300,
        hidden_size: 64,
        intermediate_size: 128,
        num_layers: 3,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 16,
        rope_theta: 1e4,
        rms_eps: 1e-5,
        tie_embeddings: false,
        qkv_bias: true,
    };
    let src = root.join("src");
    save_hf_dir(&random_model(&cfg, 3, DType::F32).unwrap(), &src).unwrap();
    let samples: Vec<TextSample> = (0..3u32)
        .map(|s| TextSample::causal((0..16).map(|t| (s * 31 + t * 7) % 300).collect()))
        .collect();
    let scheme =
        QuantScheme::new(Bits::new(4).unwrap()).with_group_size(GroupSize::new(32).unwrap());
    let pcfg = PipelineConfig::new(QuantMethod::Gptq, GptqConfig::new(scheme));
    (src, samples, pcfg)
}

fn run(residency: Residency, tag: &str) {
    let root = temp(tag);
    let (src, samples, pcfg) = setup(&root);

    let mut whole = load_hf_dir(&src, DType::F32, &Device::Cpu).unwrap();
    let original = whole.clone();
    let out = quantize_model(&mut whole, &samples, &pcfg, |_| {}).unwrap();
    let single = root.join("single");
    write_gptq(&original, &out, None, &single).unwrap();

    let opts = LoadOptions::default().with_residency(residency);
    let mut model = load_hf_dir_with(&src, &opts).unwrap();
    let target = root.join("sharded");
    let mut writer = ShardedGptqWriter::new(&model, &target).unwrap();
    quantize_model_streaming(&mut model, &samples, &pcfg, &mut writer, |_| {}).unwrap();
    assert!(!target.exists(), "the target appears only when finished");
    writer.finish(None).unwrap();

    let want = tensors(&single);
    let got = tensors(&target);
    let mut names: Vec<_> = want.keys().collect();
    names.sort();
    let mut got_names: Vec<_> = got.keys().collect();
    got_names.sort();
    assert_eq!(names, got_names);
    for n in names {
        let (a, b) = (&want[n].0, &got[n].0);
        assert_eq!(a.dtype(), b.dtype(), "{n}");
        let d = (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert_eq!(d, 0.0, "{n}");
    }
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(target.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let map: BTreeMap<String, String> =
        serde_json::from_value(index["weight_map"].clone()).unwrap();
    assert_eq!(map.len(), got.len());
    for (name, (_, file)) in &got {
        assert_eq!(&map[name], file, "{name}");
    }
    assert_eq!(
        map["model.layers.0.self_attn.q_proj.qweight"],
        "model-00001-of-00003.safetensors"
    );
    let qc = std::fs::read_to_string(target.join("quantize_config.json")).unwrap();
    assert!(qc.contains("\"bits\": 4"), "{qc}");
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn sharded_output_of_a_resident_model_matches_the_single_file() {
    run(Residency::Memory, "memory");
}

#[test]
fn sharded_output_of_a_disk_model_matches_the_single_file() {
    run(Residency::Disk, "disk");
}

/// Every entry under `dir` (names relative to it) with the bytes of files.
fn listing(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let rel = p.strip_prefix(dir).unwrap().to_path_buf();
        if p.is_dir() {
            out.insert(rel.clone(), Vec::new());
            for (k, v) in listing(&p) {
                out.insert(rel.join(k), v);
            }
        } else {
            out.insert(rel, std::fs::read(&p).unwrap());
        }
    }
    out
}

/// Issue 25: a full disk (simulated in the writer) while the sharded writer
/// or `write_gptq` replaces an earlier output gives an I/O error naming a
/// file of the output, leaves the earlier output byte for byte and no
/// partial directory, lock or temporary file beside it.
#[test]
fn a_full_disk_leaves_the_earlier_output_and_no_partial_directory() {
    let root = temp("full");
    let (src, samples, pcfg) = setup(&root);
    let mut model = load_hf_dir(&src, DType::F32, &Device::Cpu).unwrap();
    let original = model.clone();
    let out = quantize_model(&mut model, &samples, &pcfg, |_| {}).unwrap();
    let target = root.join("out");
    write_gptq(&original, &out, None, &target).unwrap();
    let before = listing(&root);
    let size: u64 = listing(&target).values().map(|b| b.len() as u64).sum();
    let check = |err: vlmq::Error, free: u64| {
        match err.root() {
            vlmq::Error::Io { path, source } => {
                assert_eq!(source.kind(), std::io::ErrorKind::StorageFull, "{err}");
                assert!(path.starts_with(&root), "{err}");
            }
            other => panic!("free {free}: expected an I/O error, got {other}"),
        }
        assert!(
            listing(&root) == before,
            "free {free}: the directory changed"
        );
    };
    for free in [0, size / 2] {
        let mut model = original.clone();
        let mut writer = ShardedGptqWriter::new(&model, &target).unwrap();
        vlmq::__private::simulate_free_space(Some(free));
        let run = quantize_model_streaming(&mut model, &samples, &pcfg, &mut writer, |_| {});
        vlmq::__private::simulate_free_space(None);
        drop(writer);
        check(run.unwrap_err(), free);

        vlmq::__private::simulate_free_space(Some(free));
        let single = write_gptq(&original, &out, None, &target);
        vlmq::__private::simulate_free_space(None);
        check(single.unwrap_err(), free);
    }
    std::fs::remove_dir_all(&root).unwrap();
}

/// `src` (an f32 checkpoint) rewritten under `dir` with every tensor in bf16.
fn bf16_copy(src: &Path, dir: &Path) -> HashMap<String, Tensor> {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let all: HashMap<String, Tensor> =
        safetensors::load(src.join("model.safetensors"), &Device::Cpu)
            .unwrap()
            .into_iter()
            .map(|(k, v)| (k, v.to_dtype(DType::BF16).unwrap()))
            .collect();
    safetensors::save(&all, dir.join("model.safetensors")).unwrap();
    all
}

fn bits(t: &Tensor) -> Vec<u16> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<vlmq::half::bf16>()
        .unwrap()
        .into_iter()
        .map(|v| v.to_bits())
        .collect()
}

/// Issue 23: from a bf16 checkpoint whose layers stay on disk, the sharded
/// writer stores the embedding, head, norms and biases in bf16, bit for bit
/// the source's, says `torch_dtype: bfloat16`, and its packed layers are
/// those of the same values quantized in memory in f32.
#[test]
fn a_bf16_source_keeps_its_dense_tensors_in_bf16_bit_for_bit() {
    let root = temp("bf16");
    let (src, samples, pcfg) = setup(&root);
    let bf16_dir = root.join("bf16");
    let source = bf16_copy(&src, &bf16_dir);

    let mut whole = load_hf_dir(&bf16_dir, DType::F32, &Device::Cpu).unwrap();
    let original = whole.clone();
    let out = quantize_model(&mut whole, &samples, &pcfg, |_| {}).unwrap();
    let single = root.join("single");
    write_gptq(&original, &out, None, &single).unwrap();

    let opts = LoadOptions::default().with_residency(Residency::Disk);
    let mut model = load_hf_dir_with(&bf16_dir, &opts).unwrap();
    let target = root.join("sharded");
    let mut writer = ShardedGptqWriter::new(&model, &target).unwrap();
    quantize_model_streaming(&mut model, &samples, &pcfg, &mut writer, |_| {}).unwrap();
    writer.finish(None).unwrap();

    let got = tensors(&target);
    let want = tensors(&single);
    assert_eq!(got.len(), want.len());
    let mut dense = 0;
    for (name, (w, _)) in &want {
        let g = &got[name].0;
        match source.get(name) {
            Some(s) => {
                dense += 1;
                assert_eq!(g.dtype(), DType::BF16, "{name}");
                assert_eq!(bits(g), bits(s), "{name}");
            }
            None => {
                assert_eq!(g.dtype(), w.dtype(), "{name}");
                let same = g
                    .eq(w)
                    .unwrap()
                    .min_all()
                    .unwrap()
                    .to_scalar::<u8>()
                    .unwrap();
                assert_eq!(same, 1, "{name}");
            }
        }
    }
    // Embedding, final norm, head, two norms per block, three q/k/v biases.
    assert_eq!(dense, 3 + 3 * (2 + 3));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(target.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["torch_dtype"], "bfloat16");
    std::fs::remove_dir_all(&root).unwrap();
}
