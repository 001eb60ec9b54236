//! A model loaded with `Residency::Disk` from a sharded bf16 checkpoint
//! quantizes to the same codes as the same values loaded into memory in
//! f32, with its layers read one at a time and each quantized block
//! released after the pipeline hands it to the sink; its embedding rows
//! and head are read from the checkpoint when needed and never kept.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use vlmq::{
    quantize_model, quantize_model_streaming, Bits, FinishedBlock, GptqConfig, GradientModel,
    GroupSize, PipelineConfig, QuantMethod, QuantScheme, QuantizableModel, QuantizedWeight, Result,
};
use vlmq_candle::candle_core::quantized::GgmlDType;
use vlmq_candle::candle_core::{safetensors, DType, Device, Tensor};
use vlmq_candle::export::{write_gguf_llama, write_gptq};
use vlmq_candle::{
    load_gguf, load_gguf_with, load_hf_dir, load_hf_dir_with, random_model, save_hf_dir,
    Architecture, LlamaConfig, LoadOptions, Residency, TextSample,
};

fn cfg(arch: Architecture) -> LlamaConfig {
    LlamaConfig {
        arch,
        vocab_size: 300,
        hidden_size: 64,
        intermediate_size: 128,
        num_layers: 3,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 16,
        rope_theta: 1e4,
        rms_eps: 1e-5,
        tie_embeddings: arch == Architecture::Llama,
        qkv_bias: arch == Architecture::Qwen2,
    }
}

fn temp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vlmq-disk-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Writes a random model twice with the same values: `f32/` as one f32
/// file, `bf16/` as two bf16 shards plus an index (the values are bf16
/// numbers to begin with, so both hold exactly the same weights).
fn checkpoints(arch: Architecture, root: &Path) -> (PathBuf, PathBuf) {
    let model = random_model(&cfg(arch), 7, DType::F32).unwrap();
    let rounded = model
        .to_dtype(DType::BF16)
        .and_then(|m| m.to_dtype(DType::F32))
        .unwrap();
    let (f32_dir, bf16_dir) = (root.join("f32"), root.join("bf16"));
    save_hf_dir(&rounded, &f32_dir).unwrap();
    save_hf_dir(&rounded, &bf16_dir).unwrap();
    let st = bf16_dir.join("model.safetensors");
    let all = safetensors::load(&st, &Device::Cpu).unwrap();
    std::fs::remove_file(&st).unwrap();
    let mut parts: [HashMap<String, Tensor>; 2] = [HashMap::new(), HashMap::new()];
    let mut map = BTreeMap::new();
    for (i, (k, v)) in all.into_iter().enumerate() {
        let f = format!("model-0000{}-of-00002.safetensors", i % 2 + 1);
        map.insert(k.clone(), serde_json::Value::String(f));
        parts[i % 2].insert(k, v.to_dtype(DType::BF16).unwrap());
    }
    for (i, p) in parts.iter().enumerate() {
        let f = bf16_dir.join(format!("model-0000{}-of-00002.safetensors", i + 1));
        safetensors::save(p, f).unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(
        bf16_dir.join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    (f32_dir, bf16_dir)
}

fn samples() -> Vec<TextSample> {
    (0..4u32)
        .map(|s| TextSample::causal((0..16).map(|t| (s * 37 + t * 11) % 300).collect()))
        .collect()
}

fn pipeline(method: QuantMethod) -> PipelineConfig {
    let scheme =
        QuantScheme::new(Bits::new(4).unwrap()).with_group_size(GroupSize::new(32).unwrap());
    PipelineConfig::new(method, GptqConfig::new(scheme))
}

type Weights = BTreeMap<(usize, String), QuantizedWeight>;

fn streamed_run(dir: &Path, method: QuantMethod) -> (vlmq_candle::LlamaModel, Weights) {
    let opts = LoadOptions::default().with_residency(Residency::Disk);
    let mut model = load_hf_dir_with(dir, &opts).unwrap();
    assert!(model.is_streamed());
    assert!(
        model.weights().layers.is_empty(),
        "no layer read at load time"
    );
    assert!(model.weights().embed.is_none() && model.weights().lm_head.is_none());
    assert_eq!(
        model.resident_table_bytes(),
        0,
        "no table read at load time"
    );
    assert_eq!(model.dtype(), DType::F32);
    let mut got = BTreeMap::new();
    let mut sink = |b: FinishedBlock| -> Result<()> {
        for (layer, qw) in b.layers {
            got.insert((b.index, layer), qw);
        }
        Ok(())
    };
    quantize_model_streaming(&mut model, &samples(), &pipeline(method), &mut sink, |_| {}).unwrap();
    assert_eq!(model.resident_table_bytes(), 0, "no table kept after use");
    (model, got)
}

fn same_codes(arch: Architecture, method: QuantMethod, tag: &str) {
    let root = temp(tag);
    let (f32_dir, bf16_dir) = checkpoints(arch, &root);
    let mut memory = load_hf_dir(&f32_dir, DType::F32, &Device::Cpu).unwrap();
    let expected = quantize_model(&mut memory, &samples(), &pipeline(method), |_| {}).unwrap();
    let (streamed, got) = streamed_run(&bf16_dir, method);
    assert_eq!(got.len(), 3 * 7);
    assert_eq!(got, expected.weights);
    // Its dense tensors are not in memory: a whole-checkpoint writer
    // refuses it rather than leave them out, and writes nothing.
    let out = root.join("whole");
    let err = write_gptq(&streamed, &expected, None, &out).unwrap_err();
    assert!(matches!(err, vlmq::Error::Unsupported { .. }), "{err}");
    let gguf = root.join("whole.gguf");
    let err = write_gguf_llama(&streamed, &BTreeMap::new(), None, GgmlDType::F32, &gguf);
    assert!(matches!(err, Err(vlmq::Error::Unsupported { .. })));
    assert!(!out.exists() && !gguf.exists());
    // A quantized block was released: running it again is an error, not a
    // silent run with the unquantized weights from disk.
    let s = &samples()[0];
    let h = streamed.embed(s).unwrap();
    let err = streamed.block_forward(0, &h, s, None).unwrap_err();
    assert!(err.to_string().contains("released"), "{err}");
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn gptq_from_bf16_shards_on_disk_gives_the_f32_codes() {
    same_codes(Architecture::Llama, QuantMethod::Gptq, "gptq");
}

#[test]
fn vlmq_from_bf16_shards_on_disk_gives_the_f32_codes() {
    same_codes(Architecture::Qwen2, QuantMethod::Vlmq, "vlmq");
}

#[test]
fn an_untouched_layer_is_read_again_after_release() {
    let root = temp("reread");
    let (f32_dir, bf16_dir) = checkpoints(Architecture::Llama, &root);
    let memory = load_hf_dir(&f32_dir, DType::F32, &Device::Cpu).unwrap();
    let opts = LoadOptions::default().with_residency(Residency::Disk);
    let mut disk = load_hf_dir_with(&bf16_dir, &opts).unwrap();
    let s = &samples()[1];
    let h = memory.embed(s).unwrap();
    let want = memory.block_forward(2, &h, s, None).unwrap();
    for _ in 0..2 {
        let got = disk
            .block_forward(2, &disk.embed(s).unwrap(), s, None)
            .unwrap();
        let diff = (got - &want).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
        disk.release_block(2).unwrap();
    }
    assert_eq!(
        disk.linear_weight(1, "mlp.up_proj").unwrap(),
        memory.linear_weight(1, "mlp.up_proj").unwrap()
    );
    std::fs::remove_dir_all(&root).unwrap();
}

/// Issue 23: once a true-sequential stage ran, a streamed block frees the
/// projections only that stage read (stage 2 reads o_proj); a resident
/// model keeps them, they are the run's result. A streamed block's stage 4
/// computes the MLP's product again (stage 3 carries only the residual),
/// so gate and up stay past stage 3, and its stages give `block_forward`'s
/// bits.
#[test]
fn a_finished_stage_frees_its_projections_only_when_streamed() {
    let root = temp("stage-free");
    let (f32_dir, bf16_dir) = checkpoints(Architecture::Llama, &root);
    let mut memory = load_hf_dir(&f32_dir, DType::F32, &Device::Cpu).unwrap();
    let opts = LoadOptions::default().with_residency(Residency::Disk);
    let mut disk = load_hf_dir_with(&bf16_dir, &opts).unwrap();
    // Stages 0-4 of a streamed block, carry after carry.
    let s = &samples()[0];
    let h = disk.embed(s).unwrap();
    let want = memory
        .block_forward(1, &memory.embed(s).unwrap(), s, None)
        .unwrap();
    let mut carry = None;
    let mut ignore = |_: &str, _: ndarray::ArrayView2<'_, f32>| {};
    for stage in 0..4 {
        match disk
            .block_stage(1, stage, &h, s, carry.take(), &mut ignore)
            .unwrap()
        {
            vlmq::StageOutput::Carry(c) => carry = Some(c),
            vlmq::StageOutput::Output(_) => panic!("stage {stage} gave the output"),
        }
    }
    let Ok(vlmq::StageOutput::Output(got)) = disk.block_stage(1, 4, &h, s, carry, &mut ignore)
    else {
        panic!("stage 4 gave no output");
    };
    assert_eq!(common::max_abs_diff(&got, &want), 0.0);
    let o = memory.linear_weight(1, "self_attn.o_proj").unwrap();
    let gate = memory.linear_weight(1, "mlp.gate_proj").unwrap();
    for m in [&mut memory, &mut disk] {
        m.stage_finished(1, 2).unwrap();
        m.stage_finished(1, 3).unwrap();
    }
    assert_eq!(memory.linear_weight(1, "self_attn.o_proj").unwrap(), o);
    let freed = disk.linear_weight(1, "self_attn.o_proj").unwrap();
    assert_eq!(freed.dim(), (0, o.ncols()));
    assert_eq!(disk.linear_weight(1, "mlp.gate_proj").unwrap(), gate);
    assert_eq!(
        disk.linear_weight(0, "self_attn.o_proj").unwrap().dim(),
        o.dim()
    );
    // Running the block again is an error, not a result without o_proj.
    assert!(disk.block_forward(1, &h, s, None).is_err());
    std::fs::remove_dir_all(&root).unwrap();
}

/// Issue 23: a streamed block hands a weight being solved over instead of
/// keeping a copy, and takes the solved one back; a resident model keeps
/// its own.
#[test]
fn a_streamed_block_hands_over_the_weight_it_solves() {
    let root = temp("take");
    let (f32_dir, bf16_dir) = checkpoints(Architecture::Llama, &root);
    let mut memory = load_hf_dir(&f32_dir, DType::F32, &Device::Cpu).unwrap();
    let opts = LoadOptions::default().with_residency(Residency::Disk);
    let mut disk = load_hf_dir_with(&bf16_dir, &opts).unwrap();
    let layer = "mlp.down_proj";
    let want = memory.linear_weight(0, layer).unwrap();
    assert_eq!(memory.take_linear_weight(0, layer).unwrap(), want);
    assert_eq!(memory.linear_weight(0, layer).unwrap(), want);
    assert_eq!(disk.take_linear_weight(0, layer).unwrap(), want);
    assert_eq!(
        disk.linear_weight(0, layer).unwrap().dim(),
        (0, want.ncols())
    );
    // The freed layer holds no rows; the configuration still fixes them.
    let short = want.slice(ndarray::s![1.., ..]);
    let err = disk.set_linear_weight(0, layer, short).unwrap_err();
    assert!(
        matches!(&err, vlmq::Error::ShapeMismatch { what, .. } if what.contains(layer)),
        "{err}"
    );
    let solved = want.mapv(|v| (v * 8.0).round() / 8.0);
    disk.set_linear_weight(0, layer, solved.view()).unwrap();
    assert_eq!(disk.linear_weight(0, layer).unwrap(), solved);
    std::fs::remove_dir_all(&root).unwrap();
}

/// Issue 23: the embedding rows read from disk, the logits through the head
/// read from disk and the loss gradient are those of the same values held
/// in memory, bit for bit, for a tied (Llama) and an untied (Qwen2) head.
#[test]
fn embedding_rows_logits_and_loss_gradient_read_from_disk_are_the_resident_bits() {
    for arch in [Architecture::Llama, Architecture::Qwen2] {
        let root = temp(&format!("tables-{arch:?}"));
        let (f32_dir, bf16_dir) = checkpoints(arch, &root);
        let memory = load_hf_dir(&f32_dir, DType::F32, &Device::Cpu).unwrap();
        let opts = LoadOptions::default().with_residency(Residency::Disk);
        let disk = load_hf_dir_with(&bf16_dir, &opts).unwrap();
        // Repeated ids, the first and the last row of the vocabulary.
        let rows: [&[u32]; 2] = [&[0, 299, 5, 5, 17], &[299, 1, 0, 42, 5]];
        let (want, got) = (
            memory.embed_batch(&rows).unwrap(),
            disk.embed_batch(&rows).unwrap(),
        );
        assert_eq!(got.dtype(), DType::F32);
        assert_eq!(
            common::max_abs_diff(&want, &got),
            0.0,
            "{arch:?} embeddings"
        );
        assert_eq!(
            common::max_abs_diff(&memory.logits(&rows).unwrap(), &disk.logits(&rows).unwrap()),
            0.0,
            "{arch:?} logits"
        );
        let s = &samples()[2];
        let h = memory.hidden_states(&[&s.tokens]).unwrap().pop().unwrap();
        let (lw, gw) = memory.loss_and_grad(&h, s).unwrap().unwrap();
        let (lg, gg) = disk.loss_and_grad(&h, s).unwrap().unwrap();
        assert_eq!(lw.to_bits(), lg.to_bits(), "{arch:?} loss");
        assert_eq!(
            common::max_abs_diff(&gw, &gg),
            0.0,
            "{arch:?} loss gradient"
        );
        assert_eq!(disk.resident_table_bytes(), 0, "read, used and dropped");
        let bad: [&[u32]; 1] = [&[300]];
        assert!(disk.embed_batch(&bad).is_err());
        std::fs::remove_dir_all(&root).unwrap();
    }
}

/// The same from a GGUF file whose embedding and head are quantized (Q4_0
/// and Q8_0: a 64-wide row is two blocks, read on its own).
#[test]
fn gguf_embedding_rows_and_logits_read_from_disk_are_the_resident_bits() {
    let root = temp("gguf");
    std::fs::create_dir_all(&root).unwrap();
    for (arch, ty) in [
        (Architecture::Qwen2, GgmlDType::Q4_0),
        (Architecture::Llama, GgmlDType::Q8_0),
    ] {
        let model = random_model(&cfg(arch), 5, DType::F32).unwrap();
        let path = root.join(format!("{arch:?}-{ty:?}.gguf"));
        write_gguf_llama(&model, &BTreeMap::new(), None, ty, &path).unwrap();
        let memory = load_gguf(&path, DType::F32, &Device::Cpu).unwrap();
        let opts = LoadOptions::default().with_residency(Residency::Disk);
        let disk = load_gguf_with(&path, &opts).unwrap();
        assert_eq!(disk.resident_table_bytes(), 0);
        let rows: [&[u32]; 2] = [&[0, 299, 5, 5, 17], &[299, 1, 0, 42, 5]];
        let (want, got) = (
            memory.embed_batch(&rows).unwrap(),
            disk.embed_batch(&rows).unwrap(),
        );
        assert_eq!(common::max_abs_diff(&want, &got), 0.0, "{ty:?} embeddings");
        assert_eq!(
            common::max_abs_diff(&memory.logits(&rows).unwrap(), &disk.logits(&rows).unwrap()),
            0.0,
            "{ty:?} logits"
        );
        assert_eq!(disk.resident_table_bytes(), 0);
    }
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn a_truncated_shard_is_a_typed_error_naming_the_file() {
    let root = temp("trunc");
    let (_, bf16_dir) = checkpoints(Architecture::Llama, &root);
    let f = bf16_dir.join("model-00002-of-00002.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() - 10]).unwrap();
    let opts = LoadOptions::default().with_residency(Residency::Disk);
    let err = load_hf_dir_with(&bf16_dir, &opts).unwrap_err();
    assert!(
        matches!(&err, vlmq::Error::Safetensors { path, .. } if path == &f),
        "{err}"
    );
    std::fs::remove_dir_all(&root).unwrap();
}
