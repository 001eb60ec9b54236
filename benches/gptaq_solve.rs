//! GPTQ vs GPTAQ solve of one 1024 x 1024 layer (3-bit, groups of 128), with
//! a plain 1024^3 matmul as a yardstick.

use criterion::{criterion_group, criterion_main, Criterion};
use ndarray::Array2;
use vlmq::hessian::HessianAccumulator;
use vlmq::{solve_layer, Bits, GptqConfig, GroupSize, Method, QuantScheme};

fn bench(c: &mut Criterion) {
    let (n, tokens) = (1024, 2048);
    let w = Array2::from_shape_fn((n, n), |(i, j)| {
        (((i * 7 + j * 13) % 101) as f32 - 50.0) / 50.0
    });
    let xq = Array2::from_shape_fn((tokens, n), |(t, j)| {
        (((t * 31 + j * 17) % 97) as f32 - 48.0) / 48.0
    });
    let xf = Array2::from_shape_fn((tokens, n), |(t, j)| {
        xq[[t, j]] + (((t * 5 + j * 3) % 11) as f32 - 5.0) / 200.0
    });
    let mut acc = HessianAccumulator::<f32>::with_cross_term(n);
    acc.add_paired(xq.view(), xf.view(), None)
        .expect("valid batch");
    let stats = acc.finish().expect("tokens accumulated");
    let scheme = QuantScheme::new(Bits::new(3).expect("3 bits"))
        .with_group_size(GroupSize::new(128).expect("g128"));
    let cfg = GptqConfig::new(scheme).with_objective(false);
    let mut g = c.benchmark_group("solve_1024x1024");
    g.sample_size(10);
    g.bench_function("gptq", |b| {
        b.iter(|| solve_layer(w.view(), &stats, &cfg, Method::Gptq).expect("solve"))
    });
    g.bench_function("gptaq", |b| {
        b.iter(|| solve_layer(w.view(), &stats, &cfg, Method::gptaq()).expect("solve"))
    });
    g.bench_function("matmul_1024", |b| {
        b.iter(|| vlmq::__private::matmul(w.view(), w.view()))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
