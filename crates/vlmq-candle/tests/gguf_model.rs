//! Whole Llama-family models written as GGUF by vlmq: the file, read back
//! through candle's GGUF reader (`candle_core::quantized::gguf_file`, each
//! tensor dequantized by candle) into vlmq's Llama, computes the logits of
//! the in-memory quantized model; the HF source's tokenizer travels along.
//!
//! The same file also runs through [`QuantizedLlama`]: candle-core's
//! `QMatMul` on the packed blocks, q/k rows left in llama.cpp's order with
//! interleaved rotary pairs, the way candle-transformers' quantized Llama
//! runs a GGUF file (that crate itself is not in this machine's offline
//! registry, so its model is not called).

use std::ops::ControlFlow;
use std::path::PathBuf;

use vlmq::quant::gguf::GgufType;
use vlmq::{quantize_model, Bits, GptqConfig, PipelineConfig, QuantMethod, QuantScheme};
use vlmq_candle::candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use vlmq_candle::candle_core::{DType, Device, Module, Tensor};
use vlmq_candle::export::write_gguf_llama;
use vlmq_candle::{
    encode, load_gguf, random_model, read_gguf_content, tokenizer_from_gguf, Architecture,
    Calibration, GgufKernel, LlamaConfig, LlamaModel, QuantizedLlama, Quantizer, Recipe,
    TextSample,
};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf-tiny")
        .join(name)
}

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("vlmq-gguf-model-{}-{name}", std::process::id()))
}

/// Largest |a - b| over the largest |b|.
fn relative_diff(a: &Tensor, b: &Tensor) -> f32 {
    let scalar = |t: Tensor| t.max_all().unwrap().to_scalar::<f32>().unwrap();
    scalar((a - b).unwrap().abs().unwrap()) / scalar(b.abs().unwrap())
}

fn probe() -> Vec<Vec<u32>> {
    vec![(0..24).map(|i| (i * 37 + 5) % 300).collect(); 2]
}

/// A random Llama 256 wide (K-quants need rows of 256), grouped-query
/// attention, untied head.
fn wide_llama() -> LlamaModel {
    let cfg = LlamaConfig {
        arch: Architecture::Llama,
        vocab_size: 300,
        hidden_size: 256,
        intermediate_size: 512,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 64,
        rope_theta: 10000.0,
        rms_eps: 1e-5,
        tie_embeddings: false,
        qkv_bias: false,
    };
    random_model(&cfg, 11, DType::F32).unwrap()
}

#[test]
fn a_gguf_written_by_vlmq_computes_the_in_memory_quantized_logits() {
    for ty in GgufType::ALL {
        let mut model = wide_llama();
        let samples: Vec<TextSample> = (0..4u32)
            .map(|s| TextSample::causal((0..32).map(|i| (i * 13 + s * 71) % 300).collect()))
            .collect();
        let scheme = QuantScheme::new(Bits::new(4).unwrap());
        let cfg = PipelineConfig::new(QuantMethod::Gptq, GptqConfig::new(scheme))
            .with_gguf_type(Some(ty));
        let out = quantize_model(&mut model, &samples, &cfg, |_| {}).unwrap();
        assert_eq!(out.gguf.len(), 14, "{ty}: every linear solved");
        assert!(
            out.gguf.values().all(|s| s.ty == ty),
            "{ty}: no fallback at width 256"
        );
        let path = tmp(&format!("{ty}.gguf"));
        write_gguf_llama(&model, &out.gguf, None, GgmlDType::F32, &path).unwrap();
        let back = load_gguf(&path, DType::F32, &Device::Cpu).unwrap();
        let rows = probe();
        let batch: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
        let in_memory = model.logits(&batch).unwrap();
        let d = relative_diff(&back.logits(&batch).unwrap(), &in_memory);
        // The issue asks for 1e-4 relative. candle decodes every block to
        // exactly the solver's values and the q/k order is undone exactly,
        // so the weights are bitwise the in-memory ones: expect 0.
        assert_eq!(d, 0.0, "{ty}: logits differ by {d} relative");

        let run = |kernel| {
            let qm = QuantizedLlama::from_gguf(&path, kernel, &Device::Cpu).unwrap();
            relative_diff(&qm.logits(&batch).unwrap(), &in_memory)
        };
        // Same weights, another forward (interleaved rotary on llama.cpp's
        // q/k rows, candle's f32 matmul on the dequantized blocks): only
        // f32 rounding differs, far below the 1e-4.
        let d = run(GgufKernel::Dequantized);
        assert!(
            d < 1e-4,
            "{ty}: dequantized QMatMul logits differ by {d} relative"
        );
        // Each linear through QMatMul is exactly the product with 8-bit
        // rounded activations (checked tightly per tensor below). Over the
        // whole model that rounding (a step of max|x| / 127 per block of 32
        // or 256 inputs, about 0.5% rms per product) compounds through the
        // 15 products of two random layers and the head in a way this test
        // does not derive: it measured 1.2e-2 to 2.4e-2 for the six types.
        // So the whole-model check only separates "the same model" from a
        // wrong block layout or q/k order (logits of another model: order
        // 1); the precise statement is the per-linear one.
        let d = run(GgufKernel::Quantized);
        assert!(d < 0.1, "{ty}: QMatMul logits differ by {d} relative");
        eprintln!("{ty}: QMatMul logits within {d:.2e} relative");
        rows_alone_match_rows_together(&path);
        each_linear_is_the_product_with_rounded_activations(&path, ty);
        std::fs::remove_file(&path).unwrap();
    }
}

/// `QuantizedLlama` runs the rows of a batch as separate tasks: each row's
/// logits are the same bits whether it runs alone or beside other rows.
fn rows_alone_match_rows_together(path: &std::path::Path) {
    let rows: Vec<Vec<u32>> = (0..3u32)
        .map(|r| (0..20).map(|i| (i * 29 + r * 101 + 3) % 300).collect())
        .collect();
    let batch: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
    let qm = QuantizedLlama::from_gguf(path, GgufKernel::Quantized, &Device::Cpu).unwrap();
    let together = qm.logits(&batch).unwrap();
    for (i, row) in batch.iter().enumerate() {
        let alone = qm.logits(&[row]).unwrap();
        let beside = together.narrow(0, i, 1).unwrap();
        let (a, b): (Vec<f32>, Vec<f32>) = (
            alone.flatten_all().unwrap().to_vec1().unwrap(),
            beside.flatten_all().unwrap().to_vec1().unwrap(),
        );
        assert_eq!(a, b, "row {i}: logits depend on the other rows");
    }
}

/// The block types candle's `QMatMul` may round the activations to before
/// its integer dot products with weights of type `ty`: ggml's
/// `vec_dot_type`, and for Q8_0 also Q8_K, which candle's repacked AVX-512
/// VNNI kernel uses for Q8_0 weights whose rows are a multiple of 256 wide
/// (`repack_x86::select`): which one runs depends on the CPU.
fn activation_types(ty: GgufType) -> &'static [GgmlDType] {
    match ty {
        GgufType::Q4_1 => &[GgmlDType::Q8_1],
        GgufType::Q4K | GgufType::Q6K => &[GgmlDType::Q8K],
        GgufType::Q8_0 => &[GgmlDType::Q8_0, GgmlDType::Q8K],
        GgufType::Q4_0 | GgufType::Q5_0 => &[GgmlDType::Q8_0],
    }
}

/// Every packed linear of the file at `path`, multiplied by candle's
/// `QMatMul`, gives the product of the activations rounded to one of
/// [`activation_types`] with the weights candle decodes from vlmq's blocks
/// (equal to the solver's values: the first test), up to the arithmetic of
/// the integer kernel.
fn each_linear_is_the_product_with_rounded_activations(path: &std::path::Path, ty: GgufType) {
    let cpu = Device::Cpu;
    let max = |t: Tensor| t.max_all().unwrap().to_scalar::<f32>().unwrap();
    let content = read_gguf_content(path).unwrap();
    let mut reader = std::io::BufReader::new(std::fs::File::open(path).unwrap());
    let mut checked = 0;
    for (name, info) in &content.tensor_infos {
        if matches!(info.ggml_dtype, GgmlDType::F32 | GgmlDType::F16) {
            continue;
        }
        let q = content.tensor(&mut reader, name, &cpu).unwrap();
        let cols = q.shape().dims()[1];
        let x: Vec<f32> = (0..5 * cols)
            .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * (1.0 + (i % 11) as f32))
            .collect();
        let x = Tensor::from_vec(x, (5, cols), &cpu).unwrap();
        let w = q.dequantize(&cpu).unwrap();
        let got = QMatMul::from_qtensor(q).unwrap().forward(&x).unwrap();
        // Relative to the largest sum of |x||w| of a product.
        let err = activation_types(ty)
            .iter()
            .map(|&a| {
                let rounded = QTensor::quantize(&x, a).unwrap().dequantize(&cpu).unwrap();
                let want = rounded.matmul(&w.t().unwrap()).unwrap();
                let scale = rounded
                    .abs()
                    .unwrap()
                    .matmul(&w.abs().unwrap().t().unwrap());
                max((&got - want).unwrap().abs().unwrap()) / max(scale.unwrap())
            })
            .fold(f32::INFINITY, f32::min);
        // f32 sums of up to 512 terms in another order differ by at most
        // 512 * 2^-24 = 3.1e-5 < 2^-14 of that scale. Q4_1's kernel also
        // uses each activation block's sum stored as an f16 (ggml's Q8_1
        // `s`, two f16 roundings: 2^-10 relative) times the block min, a
        // term no larger than the |x||w| sum when some code of the block is
        // 0. Rounding x to another block type is already off by more
        // (Q8_0 blocks where the kernel used Q8_K: 2.2e-3 measured here).
        let bound = match ty {
            GgufType::Q4_1 => 2f32.powi(-10),
            _ => 2f32.powi(-14),
        };
        assert!(
            err < bound,
            "{ty} {name}: QMatMul differs by {err:e} (bound {bound:e})"
        );
        checked += 1;
    }
    assert_eq!(
        checked, 14,
        "{ty}: the 14 linears are packed (head and embedding f32)"
    );
}

#[test]
fn hf_tiny_through_the_one_call_api_writes_gguf_with_its_tokenizer() {
    let src = fixture("llama");
    let calib = tmp("calib.txt");
    std::fs::write(
        &calib,
        "the quick brown fox jumps over the lazy dog. ".repeat(40),
    )
    .unwrap();
    let recipe = Recipe {
        samples: 4,
        seq_len: 16,
        format: "gguf:q4_0".into(),
        ..Recipe::default()
    }
    .check("test".as_ref())
    .unwrap();
    let done = Quantizer::from_pretrained(&src)
        .unwrap()
        .calibrate(Calibration::from_file(&calib).unwrap(), &calib)
        .unwrap()
        .quantize(&recipe, |_| ControlFlow::Continue(()))
        .unwrap();
    std::fs::remove_file(&calib).unwrap();
    // hf-tiny's down_proj has 176 input columns: no GGUF block type holds
    // them, so it stays dense (llama.cpp would write f16); the other six
    // linears of each of the 2 blocks are Q4_0.
    let gguf = &done.output().gguf;
    assert_eq!(gguf.len(), 12);
    assert!(gguf.keys().all(|(_, l)| l != "mlp.down_proj"));
    assert!(gguf.values().all(|s| s.ty == GgufType::Q4_0));
    let out = tmp("hf-tiny.gguf");
    done.save(&out).unwrap();
    let content = read_gguf_content(&out).unwrap();
    let ty = |n: &str| content.tensor_infos[n].ggml_dtype;
    assert_eq!(ty("blk.1.attn_q.weight"), GgmlDType::Q4_0);
    assert_eq!(ty("blk.1.ffn_down.weight"), GgmlDType::F32);
    let tk = tokenizer_from_gguf(&content, &out).unwrap();
    let inputs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("inputs.json")).unwrap()).unwrap();
    for row in inputs["rows"].as_array().unwrap() {
        let text = row["text"].as_str().unwrap();
        assert_eq!(
            encode(&tk, text).unwrap(),
            encode(done.tokenizer(), text).unwrap(),
            "{text:?}"
        );
    }
    let back = load_gguf(&out, DType::F32, &Device::Cpu).unwrap();
    std::fs::remove_file(&out).unwrap();
    let vlmq_candle::LoadedModel::Llama(model) = done.model() else {
        panic!("hf-tiny is a Llama");
    };
    let rows = probe();
    let batch: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
    let d = relative_diff(
        &back.logits(&batch).unwrap(),
        &model.logits(&batch).unwrap(),
    );
    assert_eq!(d, 0.0, "logits differ by {d} relative");
}
