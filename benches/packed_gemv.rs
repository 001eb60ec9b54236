//! Packed 4-bit GEMV against dense f32 GEMV on one 4096 x 4096 layer.
//!
//! Run: `cargo bench --bench packed_gemv -- --measurement-time 3`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use faer::linalg::matmul::matmul;
use faer::{Accum, ColMut, ColRef, MatRef, Par};
use ndarray::{Array1, Array2};
use rayon::prelude::*;
use std::hint::black_box;
use vlmq::{quantize_rtn, Bits, GroupSize, PackedLinear, QuantScheme};

const N: usize = 4096;

fn dense_rows(w: &[f32], x: &[f32], y: &mut [f32]) {
    y.par_chunks_mut(16).enumerate().for_each(|(c, chunk)| {
        for (k, yo) in chunk.iter_mut().enumerate() {
            let row = &w[(c * 16 + k) * N..(c * 16 + k + 1) * N];
            let mut acc = [0f32; 8];
            for (a, b) in row.chunks_exact(8).zip(x.chunks_exact(8)) {
                for j in 0..8 {
                    acc[j] += a[j] * b[j];
                }
            }
            *yo = acc.iter().sum();
        }
    });
}

fn bench(c: &mut Criterion) {
    let w = Array2::from_shape_fn((N, N), |(o, i)| {
        (((o * 7919 + i * 104729) % 2003) as f32 / 1001.0 - 1.0) * 0.05
    });
    let scheme =
        QuantScheme::new(Bits::new(4).unwrap()).with_group_size(GroupSize::new(128).unwrap());
    let q = quantize_rtn(w.view(), &scheme).unwrap();
    let packed = PackedLinear::new(&q, None).unwrap();
    assert!(packed.uses_fast_kernel());
    let dense = q.dequantize();
    let dense = dense.as_slice().unwrap();
    let x = Array1::from_shape_fn(N, |i| ((i * 31) % 97) as f32 / 48.0 - 1.0);
    let xs = x.as_slice().unwrap();
    let mut y = vec![0f32; N];

    let mut g = c.benchmark_group("gemv_4096x4096");
    g.throughput(Throughput::Elements((N * N) as u64));
    g.bench_function("packed_4bit_g128", |b| {
        b.iter(|| black_box(packed.gemv(black_box(x.view())).unwrap()))
    });
    g.bench_function("dense_f32_faer", |b| {
        b.iter(|| dense_faer(dense, black_box(xs), &mut y, Par::rayon(0)))
    });
    g.bench_function("dense_f32_rayon_rows", |b| {
        b.iter(|| {
            dense_rows(dense, black_box(xs), &mut y);
            black_box(&y);
        })
    });
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    g.bench_function("packed_4bit_g128_1thread", |b| {
        b.iter(|| one.install(|| black_box(packed.gemv(black_box(x.view())).unwrap())))
    });
    g.bench_function("dense_f32_faer_1thread", |b| {
        b.iter(|| dense_faer(dense, black_box(xs), &mut y, Par::Seq))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

/// `y = dense x` through faer, for a row-major `N x N` matrix.
fn dense_faer(dense: &[f32], xs: &[f32], y: &mut [f32], par: Par) {
    matmul(
        ColMut::from_slice_mut(y),
        Accum::Replace,
        MatRef::from_row_major_slice(dense, N, N),
        ColRef::from_slice(xs),
        1.0f32,
        par,
    );
    black_box(y);
}
