//! GPTQ onto the GGUF block formats: the packed blocks decode to exactly the
//! solver's values, error feedback beats rounding on the same grid, and the
//! refusals (ragged rows, act-order without static groups).

mod common;

use common::{inputs, weight, Rng};
use ndarray::Array2;
use vlmq::hessian::HessianAccumulator;
use vlmq::quant::gguf::{decode_rows, GgufType};
use vlmq::solver::solve_layer_gguf;
use vlmq::{Bits, Error, GptqConfig, GroupFit, LayerStatistics, Method, QuantScheme};

fn stats_of(x: &Array2<f32>) -> LayerStatistics {
    let mut acc = HessianAccumulator::<f32>::new(x.ncols());
    acc.add(x.view(), None).unwrap();
    acc.finish().unwrap()
}

/// The scheme is not used by the GGUF solve; any valid one will do.
fn cfg() -> GptqConfig {
    GptqConfig::new(QuantScheme::new(Bits::new(4).unwrap()))
}

fn layer(seed: u64, m: usize, n: usize) -> (Array2<f32>, LayerStatistics) {
    let mut rng = Rng::new(seed);
    let w = weight(&mut rng, m, n).mapv(|v| 0.05 * v);
    let x = inputs(&mut rng, 2 * n, n);
    (w, stats_of(&x))
}

#[test]
fn packed_blocks_decode_to_the_solved_values() {
    let (w, stats) = layer(1, 24, 512);
    for ty in GgufType::ALL {
        for fit in [GroupFit::BlockStart, GroupFit::Updated] {
            let c = cfg().with_group_fit(fit);
            let sol = solve_layer_gguf(w.view(), &stats, &c, Method::Gptq, ty).unwrap();
            let bytes = sol.pack().unwrap();
            assert_eq!(bytes.len(), 24 * ty.row_bytes(512), "{ty}");
            let back = decode_rows(ty, &bytes, 24, 512).unwrap();
            for (a, b) in back.iter().zip(sol.dequantized.iter()) {
                assert_eq!(a.to_bits(), b.to_bits(), "{ty} {fit:?}");
            }
        }
    }
}

#[test]
fn error_feedback_beats_rounding_on_the_same_grid() {
    let (w, stats) = layer(2, 32, 512);
    // The diagonal of H alone: same importance weights for the fit, but a
    // diagonal inverse factor, so no error is pushed onto later columns.
    let diag = Array2::from_shape_fn(
        (512, 512),
        |(i, j)| {
            if i == j {
                stats.hessian[[i, i]]
            } else {
                0.0
            }
        },
    );
    let rounded_stats = LayerStatistics::from_hessian(diag);
    for ty in GgufType::ALL {
        let gptq = solve_layer_gguf(w.view(), &stats, &cfg(), Method::Gptq, ty).unwrap();
        let rounded = solve_layer_gguf(w.view(), &rounded_stats, &cfg(), Method::Gptq, ty).unwrap();
        let objective = |q: &Array2<f32>| {
            vlmq::solver::hessian_objective(w.view(), q.view(), stats.hessian.view()).unwrap()
        };
        let (g, r) = (
            objective(&gptq.dequantized),
            objective(&rounded.dequantized),
        );
        assert!(g < r, "{ty}: GPTQ {g} vs rounding {r}");
    }
}

#[test]
fn act_order_needs_static_groups() {
    let (w, stats) = layer(3, 8, 256);
    let c = cfg().with_act_order(true).unwrap();
    let err = solve_layer_gguf(w.view(), &stats, &c, Method::Gptq, GgufType::Q4K).unwrap_err();
    assert!(matches!(
        err,
        Error::InvalidConfig {
            field: "act_order",
            ..
        }
    ));
    let c = c.with_static_groups(true).unwrap();
    for ty in [GgufType::Q4_0, GgufType::Q4K] {
        let sol = solve_layer_gguf(w.view(), &stats, &c, Method::Gptq, ty).unwrap();
        let back = decode_rows(ty, &sol.pack().unwrap(), 8, 256).unwrap();
        assert_eq!(back, sol.dequantized);
    }
}

#[test]
fn rows_must_split_into_whole_blocks() {
    let (w, stats) = layer(4, 8, 96);
    let err = solve_layer_gguf(w.view(), &stats, &cfg(), Method::Gptq, GgufType::Q6K).unwrap_err();
    assert!(matches!(err, Error::Unsupported { .. }));
    assert!(solve_layer_gguf(w.view(), &stats, &cfg(), Method::Gptq, GgufType::Q8_0).is_ok());
    let mut big = w.clone();
    big[[3, 5]] = 1e6;
    let err =
        solve_layer_gguf(big.view(), &stats, &cfg(), Method::Gptq, GgufType::Q8_0).unwrap_err();
    assert!(matches!(err, Error::Unencodable { .. }));
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    // More rows than one chunk of the walk, so chunks run in parallel.
    let (w, stats) = layer(5, 300, 256);
    let run = |threads: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| {
                solve_layer_gguf(w.view(), &stats, &cfg(), Method::Gptq, GgufType::Q4K).unwrap()
            })
    };
    let (a, b) = (run(1), run(3));
    assert_eq!(a.codes, b.codes);
    assert_eq!(a.pack().unwrap(), b.pack().unwrap());
}

#[test]
fn gptaq_runs_on_a_gguf_grid() {
    let mut rng = Rng::new(6);
    let w = weight(&mut rng, 16, 256).mapv(|v| 0.05 * v);
    let x = inputs(&mut rng, 512, 256);
    let x_q = x.mapv(|v| v + 0.01 * rng.normal());
    let mut acc = HessianAccumulator::<f32>::with_cross_term(256);
    acc.add_paired(x_q.view(), x.view(), None).unwrap();
    let stats = acc.finish().unwrap();
    let gptq = solve_layer_gguf(w.view(), &stats, &cfg(), Method::Gptq, GgufType::Q4_1).unwrap();
    let gptaq =
        solve_layer_gguf(w.view(), &stats, &cfg(), Method::gptaq(), GgufType::Q4_1).unwrap();
    assert_ne!(gptq.codes, gptaq.codes);
    let back = decode_rows(GgufType::Q4_1, &gptaq.pack().unwrap(), 16, 256).unwrap();
    assert_eq!(back, gptaq.dequantized);
}
