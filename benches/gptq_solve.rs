//! The GPTQ solve beside a plain matrix product of equal FLOPs, on pools of
//! 1 and 2 threads, in one run; the inverse-Cholesky factor on its own shows
//! how the solve's time splits between the factor and the column walk.
//!
//! `cargo bench --bench gptq_solve` runs n = 2048 (about a minute on an idle
//! 2-core machine); `VLMQ_SOLVE_N=4096 cargo bench --bench gptq_solve` runs
//! the size of the performance goal (several minutes).
//!
//! FLOPs (mul + add = 2): Cholesky n^3/3, triangular inverse n^3/3, GPTQ's
//! updates about m n^2 for an `m x n` weight, so a square layer's solve is
//! about 5/3 n^3: the yardstick is `[n, n] @ [n, 5n/6]` (2 n^2 (5n/6) FLOPs).
//! The ratios that matter are `solve / matmul_equal_flops` and
//! `inverse_cholesky / matmul_equal_flops` (the factor's share; its own
//! FLOPs are 2/5 of the yardstick's) within one thread count.

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, SamplingMode};
use faer::{Accum, Mat, Par};
use ndarray::Array2;
use vlmq::__private::{inverse_cholesky_upper, solve_layer_owned};
use vlmq::hessian::HessianAccumulator;
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

fn sizes() -> Vec<usize> {
    std::env::var("VLMQ_SOLVE_N")
        .ok()
        .map(|v| {
            v.split(',')
                .map(|s| s.trim().parse().expect("VLMQ_SOLVE_N: sizes"))
                .collect()
        })
        .unwrap_or_else(|| vec![2048])
}

fn bench(c: &mut Criterion) {
    for n in sizes() {
        let x = data(2 * n, n, 3);
        let mut acc = HessianAccumulator::<f32>::new(n);
        acc.add(x.view(), None).expect("valid batch");
        let stats = acc.finish().expect("tokens");
        let w = data(n, n, 4);
        let scheme = QuantScheme::new(Bits::new(4).expect("4 bits"))
            .with_group_size(GroupSize::new(128).expect("g128"));
        let cfg = GptqConfig::new(scheme).with_objective(false);
        let a = Mat::<f32>::from_fn(n, n, |i, j| ((i * 7 + j * 3) % 13) as f32 - 6.0);
        let b = Mat::<f32>::from_fn(n, 5 * n / 6, |i, j| ((i * 5 + j) % 11) as f32 - 5.0);
        let mut out = Mat::<f32>::zeros(n, 5 * n / 6);
        for threads in [1usize, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("thread pool");
            let par = if threads == 1 {
                Par::Seq
            } else {
                Par::rayon(threads)
            };
            let mut g = c.benchmark_group(format!("gptq_{threads}t"));
            g.sample_size(10).sampling_mode(SamplingMode::Flat);
            g.bench_with_input(BenchmarkId::new("matmul_equal_flops", n), &n, |bch, _| {
                bch.iter(|| {
                    pool.install(|| {
                        faer::linalg::matmul::matmul(
                            out.as_mut(),
                            Accum::Replace,
                            a.as_ref(),
                            b.as_ref(),
                            1.0,
                            par,
                        )
                    })
                })
            });
            g.bench_with_input(BenchmarkId::new("inverse_cholesky", n), &n, |bch, _| {
                bch.iter(|| {
                    pool.install(|| {
                        inverse_cholesky_upper(stats.hessian.view(), &Damping::default())
                            .expect("factor")
                    })
                })
            });
            g.bench_with_input(BenchmarkId::new("solve_4bit_g128", n), &n, |bch, _| {
                bch.iter(|| {
                    pool.install(|| {
                        solve_layer(w.view(), &stats, &cfg, Method::Gptq).expect("solve")
                    })
                })
            });
            // The copies of the weight and statistics it consumes are made
            // outside the timing (the borrowed solve copies the weight inside).
            g.bench_with_input(
                BenchmarkId::new("solve_owned_4bit_g128", n),
                &n,
                |bch, _| {
                    bch.iter_batched(
                        || (w.clone(), stats.clone()),
                        |(w, s)| {
                            pool.install(|| {
                                solve_layer_owned(w, s, &cfg, Method::Gptq).expect("solve")
                            })
                        },
                        BatchSize::LargeInput,
                    )
                },
            );
            g.finish();
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
