//! Hessian accumulation beside one plain full `X^T X` product of the same
//! batch (faer's matmul), on pools of 1 and 2 threads, in one run.
//!
//! Two yardsticks: `plain_xtx`, faer's product on the batch as it comes
//! (row-major `[tokens, features]`), and `plain_xtx_colmajor`, the same
//! product from a column-major copy (the layout faer runs fastest; the copy
//! is not timed). The accumulator's own copy into that layout is timed.
//!
//! `cargo bench --bench accumulate` (about a minute, 1024 tokens x 1024
//! features); `VLMQ_ACC_DIMS=2048x4096 cargo bench --bench accumulate` runs
//! a layer of the width (a few minutes). The ratios that matter
//! are within one thread count: `unweighted / plain_xtx` and
//! `weighted / plain_xtx` (target at most 0.6: the accumulator computes one
//! triangle, half the flops), and `paired / plain_xtx` (the Gram triangle
//! plus GPTAQ's full cross product: about 1.5 plain products of work).

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use faer::{Accum, Mat, Par};
use ndarray::{Array1, Array2};
use vlmq::hessian::HessianAccumulator;

fn data(tokens: usize, n: usize, seed: usize) -> Array2<f32> {
    Array2::from_shape_fn((tokens, n), |(t, j)| {
        (((t * 31 + j * 17 + seed * 7) % 97) as f32 - 48.0) / 48.0
    })
}

fn bench(c: &mut Criterion) {
    let (tokens, n) = std::env::var("VLMQ_ACC_DIMS")
        .ok()
        .and_then(|v| {
            let (t, n) = v.split_once('x')?;
            Some((t.trim().parse().ok()?, n.trim().parse().ok()?))
        })
        .unwrap_or((1024, 1024));
    let x = data(tokens, n, 0);
    let xf = &x + &(data(tokens, n, 1) * 0.01);
    let alpha = Array1::from_shape_fn(tokens, |t| 0.05 + ((t * 13) % 29) as f32 / 7.0);
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
        let mut g = c.benchmark_group(format!("accumulate_{tokens}x{n}_{threads}t"));
        g.sample_size(10).sampling_mode(SamplingMode::Flat);
        let xs = x.as_slice().expect("standard layout");
        let xm = faer::MatRef::from_row_major_slice(xs, tokens, n);
        let mut full = Mat::<f32>::zeros(n, n);
        g.bench_function("plain_xtx", |b| {
            b.iter(|| {
                pool.install(|| {
                    faer::linalg::matmul::matmul(
                        full.as_mut(),
                        Accum::Replace,
                        xm.transpose(),
                        xm,
                        1.0,
                        par,
                    )
                })
            })
        });
        // The same product from a column-major copy of the batch (copy made
        // outside the timing): the layout faer runs fastest, and the one the
        // accumulator copies its batches into.
        let xc = Mat::<f32>::from_fn(tokens, n, |t, j| x[[t, j]]);
        g.bench_function("plain_xtx_colmajor", |b| {
            b.iter(|| {
                pool.install(|| {
                    faer::linalg::matmul::matmul(
                        full.as_mut(),
                        Accum::Replace,
                        xc.transpose(),
                        xc.as_ref(),
                        1.0,
                        par,
                    )
                })
            })
        });
        g.bench_function("unweighted", |b| {
            b.iter(|| {
                pool.install(|| {
                    let mut acc = HessianAccumulator::<f32>::new(n);
                    acc.add(x.view(), None).expect("valid batch");
                    acc
                })
            })
        });
        g.bench_function("weighted", |b| {
            b.iter(|| {
                pool.install(|| {
                    let mut acc = HessianAccumulator::<f32>::new(n);
                    acc.add(x.view(), Some(alpha.view())).expect("valid batch");
                    acc
                })
            })
        });
        g.bench_function("paired", |b| {
            b.iter(|| {
                pool.install(|| {
                    let mut acc = HessianAccumulator::<f32>::with_cross_term(n);
                    acc.add_paired(x.view(), xf.view(), None)
                        .expect("valid batch");
                    acc
                })
            })
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
