//! One SmolLM2-135M-shaped decoder layer (hidden 576, 9 query / 3 KV heads
//! of 64, MLP 1536) on one 512-token sample: forward with input capture,
//! and forward + backward (gradients at every linear output and the input),
//! beside a plain candle matmul of the same FLOP count in the same run.
//! Criterion prints each time; the ratio of rates is printed once per run.

use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion};
use vlmq::{GradientModel, QuantizableModel};
use vlmq_candle::candle_core::{DType, Device, Tensor};
use vlmq_candle::{random_model, Architecture, LlamaConfig, TextSample};

const T: usize = 512;

fn cfg() -> LlamaConfig {
    LlamaConfig {
        arch: Architecture::Llama,
        vocab_size: 256,
        hidden_size: 576,
        intermediate_size: 1536,
        num_layers: 1,
        num_heads: 9,
        num_kv_heads: 3,
        head_dim: 64,
        rope_theta: 1e5,
        rms_eps: 1e-5,
        tie_embeddings: true,
        qkv_bias: false,
    }
}

/// Multiply-adds x 2 of the layer's linears and attention products (full T x T scores).
fn layer_flops(c: &LlamaConfig) -> f64 {
    let (d, f, q, kv) = (c.hidden_size, c.intermediate_size, c.q_dim(), c.kv_dim());
    let lin = d * (q + 2 * kv) + q * d + 3 * d * f;
    let att = 2 * T * T * c.num_heads * c.head_dim;
    2.0 * (T * lin + att) as f64
}

fn bench(cr: &mut Criterion) {
    let c = cfg();
    let m = random_model(&c, 1, DType::F32).unwrap();
    let s = TextSample::causal((0..T as u32).map(|i| i % 256).collect());
    let x = m.embed(&s).unwrap();
    let g = Tensor::ones((1, T, 576), DType::F32, &Device::Cpu).unwrap();
    let flops = layer_flops(&c);
    // Plain matmul [T, 576] x [576, n] with the same FLOPs.
    let n = (flops / (2.0 * T as f64 * 576.0)).round() as usize;
    let a = Tensor::ones((T, 576), DType::F32, &Device::Cpu).unwrap();
    let b = Tensor::ones((576, n), DType::F32, &Device::Cpu).unwrap();

    let mut group = cr.benchmark_group("smollm2_layer_T512");
    group.sample_size(10);
    group.bench_function("matmul_equal_flops", |bn| bn.iter(|| a.matmul(&b).unwrap()));
    group.bench_function("forward_capture", |bn| {
        bn.iter(|| {
            let mut sink = |_: &str, r: ndarray::ArrayView2<'_, f32>| {
                std::hint::black_box(r[[0, 0]]);
            };
            m.block_forward(0, &x, &s, Some(&mut sink)).unwrap()
        })
    });
    group.bench_function("forward_backward", |bn| {
        bn.iter(|| {
            let mut sink = |_: &str, r: ndarray::ArrayView2<'_, f32>| {
                std::hint::black_box(r[[0, 0]]);
            };
            m.block_backward(0, &x, &s, &g, Some(&mut sink)).unwrap()
        })
    });
    group.finish();

    // One summary line with rates from a few direct repetitions.
    let time = |f: &mut dyn FnMut()| {
        f();
        let t = Instant::now();
        for _ in 0..5 {
            f();
        }
        t.elapsed().as_secs_f64() / 5.0
    };
    let tm = time(&mut || {
        a.matmul(&b).unwrap();
    });
    let tf = time(&mut || {
        let mut sink = |_: &str, _: ndarray::ArrayView2<'_, f32>| {};
        m.block_forward(0, &x, &s, Some(&mut sink)).unwrap();
    });
    let tb = time(&mut || {
        m.block_backward(0, &x, &s, &g, None).unwrap();
    });
    println!(
        "layer {:.2} GFLOP: matmul {:.1} GFLOP/s; forward+capture {:.1} GFLOP/s ({:.0}% of matmul); \
         forward+backward {:.1}x forward time ({:.0}% of matmul rate at 3x forward FLOPs)",
        flops / 1e9,
        flops / tm / 1e9,
        flops / tf / 1e9,
        100.0 * tm / tf,
        tb / tf,
        100.0 * 3.0 * tm / tb
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
