//! GGUF v3 writing: a model requantized with vlmq-solved layers reads back
//! through candle's GGUF reader with the metadata copied, untouched tensors
//! byte for byte, and the solved layers decoding (after the loader's q/k
//! row order is undone) to exactly the solver's values.

mod common;

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;

use common::llama_cpp_qk_rows;
use ndarray::Array2;
use vlmq::hessian::HessianAccumulator;
use vlmq::quant::gguf::GgufType;
use vlmq::solver::solve_layer_gguf;
use vlmq::{Bits, GptqConfig, Method, QuantScheme};
use vlmq_candle::candle_core::quantized::gguf_file::{self, Content, Value};
use vlmq_candle::candle_core::quantized::QTensor;
use vlmq_candle::candle_core::{Device, Tensor};
use vlmq_candle::export::gguf::requantize_gguf;

fn values(rows: usize, cols: usize, seed: usize) -> Vec<f32> {
    (0..rows * cols)
        .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.0 - 1.0) * 0.1)
        .collect()
}

fn to_array(t: &Tensor) -> Array2<f32> {
    let (r, c) = t.dims2().unwrap();
    Array2::from_shape_vec((r, c), t.flatten_all().unwrap().to_vec1().unwrap()).unwrap()
}

#[test]
fn requantized_gguf_reads_back_exactly() {
    let tmp = std::env::temp_dir().join(format!("vlmq-gguf-write-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let (src, dst) = (tmp.join("src.gguf"), tmp.join("dst.gguf"));
    let dev = Device::Cpu;
    // Stored q rows are in llama.cpp's order (2 heads of 4 rows).
    let q = Tensor::from_vec(values(8, 64, 1), (8, 64), &dev).unwrap();
    let up = Tensor::from_vec(values(4, 256, 2), (4, 256), &dev).unwrap();
    let norm = Tensor::from_vec(values(1, 64, 3), 64, &dev).unwrap();
    let tensors = [
        (
            "blk.0.attn_q.weight",
            QTensor::quantize(&q, vlmq_candle::candle_core::quantized::GgmlDType::F32).unwrap(),
        ),
        (
            "blk.0.ffn_up.weight",
            QTensor::quantize(&up, vlmq_candle::candle_core::quantized::GgmlDType::F32).unwrap(),
        ),
        (
            "output_norm.weight",
            QTensor::quantize(&norm, vlmq_candle::candle_core::quantized::GgmlDType::F32).unwrap(),
        ),
    ];
    let tokens = Value::Array(vec![Value::String("a".into()), Value::String("b".into())]);
    let meta = [
        ("general.architecture", &Value::String("llama".into())),
        ("llama.attention.head_count", &Value::U32(2)),
        ("tokenizer.ggml.tokens", &tokens),
    ];
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
    gguf_file::write(&mut File::create(&src).unwrap(), &meta, &refs).unwrap();

    // The solver works in HF row order, as the loader hands weights over.
    let q_hf = to_array(&llama_cpp_qk_rows(&q, 2, true).unwrap());
    let up_hf = to_array(&up);
    let cfg = GptqConfig::new(QuantScheme::new(Bits::new(4).unwrap()));
    let solve = |w: &Array2<f32>, ty| {
        let n = w.ncols();
        let x = Array2::from_shape_fn((4 * n, n), |(t, j)| {
            ((t * 31 + j * 17) % 23) as f32 / 23.0 - 0.5
        });
        let mut acc = HessianAccumulator::<f32>::new(n);
        acc.add(x.view(), None).unwrap();
        solve_layer_gguf(w.view(), &acc.finish().unwrap(), &cfg, Method::Gptq, ty).unwrap()
    };
    let mut solved = HashMap::new();
    solved.insert(
        "blk.0.attn_q.weight".to_string(),
        solve(&q_hf, GgufType::Q8_0),
    );
    solved.insert(
        "blk.0.ffn_up.weight".to_string(),
        solve(&up_hf, GgufType::Q4K),
    );
    requantize_gguf(&src, &dst, &solved).unwrap();

    let bytes = std::fs::read(&dst).unwrap();
    assert_eq!(&bytes[..4], b"GGUF");
    assert_eq!(
        u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]),
        3
    );
    let mut reader = BufReader::new(File::open(&dst).unwrap());
    let content = Content::read(&mut reader).unwrap();
    assert_eq!(content.tensor_data_offset % 32, 0);
    assert!(
        matches!(content.metadata.get("tokenizer.ggml.tokens"), Some(Value::Array(a)) if a.len() == 2)
    );
    assert!(matches!(
        content.metadata.get("general.alignment"),
        Some(Value::U32(32))
    ));
    let mut read = |name: &str| content.tensor(&mut reader, name, &dev).unwrap();
    let norm_back = read("output_norm.weight").dequantize(&dev).unwrap();
    assert_eq!(
        norm_back.to_vec1::<f32>().unwrap(),
        norm.to_vec1::<f32>().unwrap()
    );
    let up_back = to_array(&read("blk.0.ffn_up.weight").dequantize(&dev).unwrap());
    assert_eq!(up_back, solved["blk.0.ffn_up.weight"].dequantized);
    let q_back = read("blk.0.attn_q.weight").dequantize(&dev).unwrap();
    let q_back = to_array(&llama_cpp_qk_rows(&q_back, 2, true).unwrap());
    assert_eq!(q_back, solved["blk.0.attn_q.weight"].dequantized);

    // A solution for a tensor the source lacks is refused before anything
    // is written.
    let stray = solved["blk.0.attn_q.weight"].clone();
    solved.insert("blk.7.attn_q.weight".to_string(), stray);
    let refused = tmp.join("refused.gguf");
    let err = requantize_gguf(&src, &refused, &solved).unwrap_err();
    assert!(
        matches!(&err, vlmq::Error::MissingTensor { name } if name.contains("blk.7.attn_q.weight")),
        "{err}"
    );
    assert!(!refused.exists());
    std::fs::remove_dir_all(&tmp).ok();
}
