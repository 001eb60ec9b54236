//! GPTQ hot paths beside a plain faer matrix product of the same size, in one run.
//!
//! `RAYON_NUM_THREADS=1 cargo bench --bench gptq_solve` gives the one-core figures.
//! FLOPs (mul + add = 2): square matmul 2n^3; Cholesky n^3/3; triangular
//! inverse n^3/3; GPTQ lazy updates ~m n^2; accumulation N n^2 (one triangle).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use ndarray::Array2;
use vlmq::hessian::HessianAccumulator;
use vlmq::linalg::{inverse_cholesky_upper, matmul};
use vlmq::{solve_layer, Bits, Damping, GptqConfig, GroupSize, Method, QuantScheme};

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
    let mut g = c.benchmark_group("gptq");
    g.sample_size(10);
    for n in [1024usize, 4096] {
        let a = data(n, n, 1);
        let b = data(n, n, 2);
        g.bench_with_input(BenchmarkId::new("matmul_square", n), &n, |bch, _| {
            bch.iter(|| matmul(a.view(), b.view()))
        });
        let tokens = 2048;
        let x = data(tokens, n, 3);
        g.bench_with_input(
            BenchmarkId::new("accumulate_2048_tokens", n),
            &n,
            |bch, _| {
                bch.iter(|| {
                    let mut acc = HessianAccumulator::<f32>::new(n);
                    acc.add(x.view(), None).unwrap();
                    acc
                })
            },
        );
        let mut acc = HessianAccumulator::<f32>::new(n);
        acc.add(x.view(), None).unwrap();
        let stats = acc.finish().unwrap();
        g.bench_with_input(BenchmarkId::new("inverse_cholesky", n), &n, |bch, _| {
            bch.iter(|| inverse_cholesky_upper(stats.hessian.view(), &Damping::default()).unwrap())
        });
        let w = data(n, n, 4);
        let scheme =
            QuantScheme::new(Bits::new(4).unwrap()).with_group_size(GroupSize::new(128).unwrap());
        let cfg = GptqConfig::new(scheme).with_objective(false);
        g.bench_with_input(BenchmarkId::new("solve_4bit_g128", n), &n, |bch, _| {
            bch.iter(|| solve_layer(w.view(), &stats, &cfg, Method::Gptq).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
