//! Weighted vs unweighted Hessian accumulation (2048 tokens x 1024 features),
//! with a plain matmul of the same size as a yardstick.

use criterion::{criterion_group, criterion_main, Criterion};
use ndarray::{Array1, Array2};
use vlmq::hessian::HessianAccumulator;

fn data(tokens: usize, n: usize) -> (Array2<f32>, Array1<f32>) {
    let x = Array2::from_shape_fn((tokens, n), |(t, j)| {
        (((t * 31 + j * 17) % 97) as f32 - 48.0) / 48.0
    });
    let alpha = Array1::from_shape_fn(tokens, |t| 0.05 + ((t * 13) % 29) as f32 / 7.0);
    (x, alpha)
}

fn bench(c: &mut Criterion) {
    let (tokens, n) = (2048, 1024);
    let (x, alpha) = data(tokens, n);
    let mut g = c.benchmark_group("accumulate_2048x1024");
    g.sample_size(10);
    g.bench_function("unweighted", |b| {
        b.iter(|| {
            let mut acc = HessianAccumulator::<f32>::new(n);
            acc.add(x.view(), None).expect("valid batch");
            acc
        })
    });
    g.bench_function("weighted", |b| {
        b.iter(|| {
            let mut acc = HessianAccumulator::<f32>::new(n);
            acc.add(x.view(), Some(alpha.view())).expect("valid batch");
            acc
        })
    });
    g.bench_function("matmul_xt_x", |b| {
        b.iter(|| vlmq::linalg::matmul(x.t(), x.view()))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
