//! Forward + backward of one pre-norm transformer block (d = 256, 256
//! tokens, 4 heads, SwiGLU hidden 768) against plain matrix products of the
//! same FLOP count, in the same run. Throughput is reported in FLOP/s
//! ("elem/s") so the two can be compared directly.
//!
//! Matrix-product FLOPs of one forward pass (T tokens, width d, MLP width h):
//! `F = 2T (4 d^2 + 2 T d + 3 d h)` (q/k/v/o, scores and P V, gate/up/down).
//! A training step (forward, backward with parameter gradients) does `3F`;
//! the importance pass (`block_backward`: recomputed forward, then input and
//! per-linear output gradients only) does `F + F_linear + 2 F_attention`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ndarray::Array2;
use vlmq_nn::{BlockConfig, Grads, Rng, TransformerBlock};

const T: usize = 256;
const D: usize = 256;
const H: usize = 768;

fn bench(c: &mut Criterion) {
    let mut rng = Rng::new(1);
    let block = TransformerBlock::init(&mut rng, BlockConfig::decoder(D, 4, H)).unwrap();
    let x = rng.normal_matrix(T, D, 1.0);
    let g = rng.normal_matrix(T, D, 1.0);
    let linear = 2 * T * (4 * D * D + 3 * D * H);
    let attention = 2 * T * (2 * T * D);
    let forward = linear + attention;
    let train = 3 * forward;
    let importance = forward + linear + 2 * attention;

    let mut group = c.benchmark_group("nn_block");
    group.sample_size(10);
    group.throughput(Throughput::Elements(train as u64));
    group.bench_function("train_step_fwd_bwd_with_param_grads", |b| {
        b.iter(|| {
            let (_, cache) = block.forward(x.view(), None, None).unwrap();
            let mut grads = Grads::new();
            block
                .backward(&cache, g.view(), Some(&mut grads), "", None)
                .unwrap()
        })
    });
    matmul_reference(&mut group, train);

    group.throughput(Throughput::Elements(importance as u64));
    group.bench_function("importance_pass_fwd_bwd_output_grads", |b| {
        b.iter(|| {
            let mut sink = |_: &str, _: ndarray::ArrayView2<'_, f32>| {};
            let (_, cache) = block.forward(x.view(), None, None).unwrap();
            block
                .backward(&cache, g.view(), None, "", Some(&mut sink))
                .unwrap()
        })
    });
    matmul_reference(&mut group, importance);
    group.finish();
}

/// `[256, 256] @ [256, n]` with `2 * 256 * 256 * n = flops`.
fn matmul_reference(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    flops: usize,
) {
    let n = flops / (2 * T * D);
    let mut rng = Rng::new(2);
    let a: Array2<f32> = rng.normal_matrix(T, D, 1.0);
    let b: Array2<f32> = rng.normal_matrix(D, n, 1.0);
    group.bench_with_input(BenchmarkId::new("matmul_same_flops", n), &n, |bch, _| {
        bch.iter(|| vlmq::__private::matmul(a.view(), b.view()))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
