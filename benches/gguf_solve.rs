//! Solving one SmolLM2-shaped layer onto GGUF block types beside the plain
//! GPTQ W4 solve (groups of 32 and 128) of the same layer and statistics,
//! in one run. The target: a GGUF solve costs at most 1.2x the
//! plain solve. Shapes: `[1536, 576]` (gate/up: 576 inputs, so Q4_K falls
//! back to Q5_0 as llama.cpp does) and `[576, 1536]` (down: Q4_K proper).
//!
//! `cargo bench --bench gguf_solve`; ratios, not absolute times, are the
//! result (compare `gguf/*` with `gptq_w4_g32` / `gptq_w4_g128` of the same
//! shape).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode};
use ndarray::Array2;
use vlmq::hessian::HessianAccumulator;
use vlmq::quant::gguf::GgufType;
use vlmq::solver::solve_layer_gguf;
use vlmq::{solve_layer, Bits, GptqConfig, GroupSize, Method, QuantScheme};

fn data(rows: usize, cols: usize, seed: u64) -> Array2<f32> {
    let mut s = seed;
    Array2::from_shape_fn((rows, cols), |_| {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    })
}

fn bench(c: &mut Criterion) {
    for (out, inp) in [(1536usize, 576usize), (576, 1536)] {
        let x = data(2048, inp, 3);
        let mut acc = HessianAccumulator::<f32>::new(inp);
        acc.add(x.view(), None).expect("valid batch");
        let stats = acc.finish().expect("tokens");
        let w = data(out, inp, 4);
        let shape = format!("{out}x{inp}");
        let mut g = c.benchmark_group(format!("solve_{shape}"));
        g.sample_size(10).sampling_mode(SamplingMode::Flat);
        for group in [32usize, 128] {
            let scheme = QuantScheme::new(Bits::new(4).expect("4 bits"))
                .with_group_size(GroupSize::new(group).expect("group"));
            let cfg = GptqConfig::new(scheme).with_objective(false);
            g.bench_function(BenchmarkId::new("gptq_w4", format!("g{group}")), |b| {
                b.iter(|| solve_layer(w.view(), &stats, &cfg, Method::Gptq).expect("solve"))
            });
        }
        let cfg =
            GptqConfig::new(QuantScheme::new(Bits::new(4).expect("4 bits"))).with_objective(false);
        for ty in [GgufType::Q4_0, GgufType::Q4K] {
            let ty = ty.for_cols(inp);
            g.bench_function(BenchmarkId::new("gguf", ty.name()), |b| {
                b.iter(|| {
                    solve_layer_gguf(w.view(), &stats, &cfg, Method::Gptq, ty).expect("solve")
                })
            });
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
