//! One SmolLM2-135M-shaped decoder layer (hidden 576, 9 query / 3 KV heads
//! of 64, MLP 1536) on one 512-token sample: forward with input capture,
//! and forward + backward (gradients at every linear output and the input),
//! beside a plain candle matmul of the same FLOP count in the same run.
//! Criterion prints each time; the ratio of rates is printed once per run.
//!
//! Second group, `smollm2_block_quantize_8x512`: the whole GPTQ step of one
//! such block over 8 samples of 512 tokens (W4 g128, true-sequential: staged
//! capture, Hessian accumulation, solve, next block input) through
//! `vlmq::quantize_model`, beside its floor in the same run: one plain forward
//! of the block over the same samples plus the accumulation of the four input
//! groups' Hessians (q/k/v, o, gate/up, down). The ratio is printed once.

use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion};
use vlmq::pipeline::{quantize_model, PipelineConfig, QuantMethod};
use vlmq::{ndarray, QuantizableModel};
use vlmq::{Bits, GptqConfig, GradientModel, GroupSize, HessianAccumulator, QuantScheme};
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

/// Samples in the block-quantization comparison.
const SAMPLES: usize = 8;

/// The layers whose inputs start an input group: q/k/v share the normed
/// input, gate/up the post-attention norm.
const GROUP_HEADS: [&str; 4] = [
    "self_attn.q_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.down_proj",
];

/// One forward of the block over every sample, then every input group's
/// Hessian accumulated from one batch of all the samples' tokens (as the
/// pipeline batches them, up to `capture_tokens`).
fn forward_and_accumulate(m: &vlmq_candle::LlamaModel, xs: &[Tensor], ss: &[TextSample]) {
    let mut captured: Vec<Vec<f32>> = vec![Vec::new(); GROUP_HEADS.len()];
    let mut dims = [0usize; 4];
    for (x, s) in xs.iter().zip(ss) {
        let mut sink = |name: &str, r: ndarray::ArrayView2<'_, f32>| {
            if let Some(g) = GROUP_HEADS.iter().position(|h| *h == name) {
                dims[g] = r.ncols();
                captured[g].extend(r.iter());
            }
        };
        std::hint::black_box(m.block_forward(0, x, s, Some(&mut sink)).unwrap());
    }
    assert!(
        dims.iter().all(|&d| d > 0),
        "a group's first layer was not captured"
    );
    for (rows, dim) in captured.iter().zip(dims) {
        let batch = ndarray::ArrayView2::from_shape((rows.len() / dim, dim), rows).unwrap();
        let mut acc = HessianAccumulator::<f32>::new(dim);
        acc.add(batch, None).unwrap();
        std::hint::black_box(acc.tokens());
    }
}

fn bench_quantize(cr: &mut Criterion) {
    let c = cfg();
    let m = random_model(&c, 1, DType::F32).unwrap();
    let samples: Vec<TextSample> = (0..SAMPLES)
        .map(|k| {
            TextSample::causal(
                (0..T as u32)
                    .map(|i| (i * 7 + k as u32 * 13) % 256)
                    .collect(),
            )
        })
        .collect();
    let xs: Vec<Tensor> = samples.iter().map(|s| m.embed(s).unwrap()).collect();
    let scheme =
        QuantScheme::new(Bits::new(4).unwrap()).with_group_size(GroupSize::new(128).unwrap());
    let pcfg = PipelineConfig::new(QuantMethod::Gptq, GptqConfig::new(scheme));
    let quantize = || {
        let mut q = m.clone();
        std::hint::black_box(quantize_model(&mut q, &samples, &pcfg, |_| {}).unwrap());
    };
    // The clone above is part of the step's time; it is timed alone so the
    // summary can take it out.
    let clone = || {
        std::hint::black_box(m.clone());
    };

    let mut group = cr.benchmark_group("smollm2_block_quantize_8x512");
    group.sample_size(10);
    group.bench_function("forward_and_accumulate", |bn| {
        bn.iter(|| forward_and_accumulate(&m, &xs, &samples))
    });
    group.bench_function("gptq_block_step", |bn| bn.iter(quantize));
    group.finish();

    let time = |f: &mut dyn FnMut()| {
        f();
        let t = Instant::now();
        for _ in 0..3 {
            f();
        }
        t.elapsed().as_secs_f64() / 3.0
    };
    let floor = time(&mut || forward_and_accumulate(&m, &xs, &samples));
    let step = time(&mut || quantize());
    let copy = time(&mut || clone());
    println!(
        "block {SAMPLES} x {T} tokens: forward + accumulation {:.1} ms; GPTQ step {:.1} ms \
         (model copy {:.1} ms of it): {:.2}x the floor",
        1e3 * floor,
        1e3 * step,
        1e3 * copy,
        (step - copy) / floor
    );
}

criterion_group!(benches, bench, bench_quantize);
criterion_main!(benches);
