//! A solve that owns its statistics (and frees the Hessian once factored)
//! gives the same solution, bit for bit, as the solve that borrows them.

use ndarray::Array2;

use crate::config::{Bits, GptqConfig, GroupSize, QuantScheme};
use crate::hessian::LayerStatistics;
use crate::rng::SplitMix64;

use super::solve::{solve_layer_owned, Method};
use super::solve_layer;

fn uniform(rng: &mut SplitMix64) -> f32 {
    (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5
}

/// A layer `[out, n]` and the statistics of `rows` random inputs, the
/// inputs of `dead` columns zero (a zero Hessian row and column), with a
/// cross term for GPTAQ.
fn layer(n: usize, rows: usize, dead: &[usize], seed: u64) -> (Array2<f32>, LayerStatistics) {
    let mut rng = SplitMix64::from_state(seed);
    let w = Array2::from_shape_fn((48, n), |_| uniform(&mut rng));
    let mut x = Array2::from_shape_fn((rows, n), |(_, j)| uniform(&mut rng) * (1 + j % 5) as f32);
    for &j in dead {
        x.column_mut(j).fill(0.0);
    }
    let hessian = x.t().dot(&x);
    let shifted = x.mapv(|v| v * 0.9 + 0.01);
    let stats = LayerStatistics {
        hessian,
        cross: Some(x.t().dot(&shifted)),
        tokens: rows,
        weight_sum: rows as f64,
    };
    (w, stats)
}

fn configs() -> Vec<(GptqConfig, Method)> {
    let scheme =
        QuantScheme::new(Bits::new(4).unwrap()).with_group_size(GroupSize::new(32).unwrap());
    let plain = GptqConfig::new(scheme).with_objective(false);
    vec![
        (plain, Method::Gptq),
        (plain.with_act_order(true).unwrap(), Method::Gptq),
        (plain.with_act_group_aware(true).unwrap(), Method::Gptq),
        (plain.with_act_order(true).unwrap(), Method::gptaq()),
    ]
}

fn same(w: &Array2<f32>, stats: &LayerStatistics, cfg: &GptqConfig, method: Method) -> u32 {
    let want = solve_layer(w.view(), stats, cfg, method).unwrap();
    let got = solve_layer_owned(w.clone(), stats.clone(), cfg, method).unwrap();
    assert_eq!(got.weight, want.weight, "{cfg:?} {method:?}");
    assert_eq!(got.dequantized, want.dequantized, "{cfg:?} {method:?}");
    assert_eq!(
        got.report.obs_loss.to_bits(),
        want.report.obs_loss.to_bits()
    );
    assert_eq!(got.report.damp_absolute, want.report.damp_absolute);
    assert_eq!(got.report.dead_columns, want.report.dead_columns);
    assert_eq!(got.report.attempts, want.report.attempts);
    got.report.attempts
}

#[test]
fn an_owned_solve_equals_the_borrowed_one_with_dead_columns_and_orders() {
    for (seed, dead) in [(1, vec![]), (2, vec![0, 7, 63]), (3, vec![5, 6, 40])] {
        let (w, stats) = layer(96, 400, &dead, seed);
        for (cfg, method) in configs() {
            assert_eq!(same(&w, &stats, &cfg, method), 1);
        }
    }
}

/// A Hessian the first damping cannot factor: the owned solve rebuilds the
/// flipped matrix from the triangle the failed factorization left alone,
/// and the retry gives the borrowed solve's factor.
#[test]
fn an_owned_solve_retries_to_the_borrowed_ones_factor() {
    // Fewer inputs than columns: a singular Gram matrix, then a shift of
    // 3% of the mean diagonal off it: eigenvalues down to -3%, which 1%
    // damping does not lift and 10% does.
    let (w, mut stats) = layer(96, 40, &[3], 4);
    let n = 96;
    let mean = (0..n).map(|i| stats.hessian[[i, i]]).sum::<f32>() / (n - 1) as f32;
    for i in (0..n).filter(|&i| i != 3) {
        stats.hessian[[i, i]] -= 0.03 * mean;
    }
    assert!((0..n).all(|i| stats.hessian[[i, i]] >= 0.0));
    for (cfg, method) in configs() {
        assert!(same(&w, &stats, &cfg, method) > 1, "{cfg:?}: no retry");
    }
}
