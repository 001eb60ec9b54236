//! VLMQ and GPTAQ properties: exact reductions to GPTQ, exact invariances of
//! the importance weighting, and aggregate wins of each method on its own
//! objective.

mod common;

use common::{inputs, weight, Rng};
use ndarray::{Array1, Array2, Axis};
use vlmq::hessian::HessianAccumulator;
use vlmq::importance::{SampleSignals, TokenImportance, Uniform};
use vlmq::solver::{asymmetric_objective, hessian_objective};
use vlmq::{
    solve_layer, Bits, GptqConfig, GroupSize, LayerSolution, LayerStatistics, Method, Modality,
    QuantScheme, TokenInfo,
};

fn cfg(bits: u32, act_order: bool) -> GptqConfig {
    let s = QuantScheme::new(Bits::new(bits).unwrap()).with_group_size(GroupSize::new(16).unwrap());
    GptqConfig::new(s)
        .with_act_order(act_order)
        .and_then(|c| c.with_block_size(32))
        .unwrap()
}

fn stats(x: &Array2<f32>, alpha: Option<&Array1<f32>>) -> LayerStatistics {
    let mut acc = HessianAccumulator::<f32>::new(x.ncols());
    acc.add(x.view(), alpha.map(|a| a.view())).unwrap();
    acc.finish().unwrap()
}

fn paired(xq: &Array2<f32>, xf: &Array2<f32>, alpha: Option<&Array1<f32>>) -> LayerStatistics {
    let mut acc = HessianAccumulator::<f32>::with_cross_term(xq.ncols());
    acc.add_paired(xq.view(), xf.view(), alpha.map(|a| a.view()))
        .unwrap();
    acc.finish().unwrap()
}

fn assert_same(a: &LayerSolution, b: &LayerSolution, what: &str) {
    assert_eq!(a.weight, b.weight, "{what}: codes / grid differ");
    assert_eq!(
        a.dequantized, b.dequantized,
        "{what}: dequantized weights differ"
    );
}

/// Heavy-tailed positive factors (log-normal, spread over ~2 decades).
fn factors(rng: &mut Rng, tokens: usize) -> Array1<f32> {
    Array1::from_shape_fn(tokens, |_| (1.5 * rng.normal()).exp())
}

/// Uniform importance over valid tokens is GPTQ bit for bit, for GPTQ and
/// GPTAQ statistics: multiplying by 1.0 is exact and the weight sum of N ones
/// is exactly N.
#[test]
fn uniform_importance_is_exactly_gptq() {
    for seed in 0..12u64 {
        let mut rng = Rng::new(seed);
        let (m, n, tokens) = (1 + rng.below(40), 48, 150);
        let w = weight(&mut rng, m, n);
        let x = inputs(&mut rng, tokens, n);
        let info = TokenInfo::uniform(Modality::Vision, tokens);
        let alpha = Uniform.factors(&SampleSignals::new(&info, seed)).unwrap();
        let (a, b) = (stats(&x, None), stats(&x, Some(&alpha)));
        assert_eq!(a.hessian, b.hessian);
        let c = cfg(2 + seed as u32 % 3, seed % 2 == 0);
        let sa = solve_layer(w.view(), &a, &c, Method::Gptq).unwrap();
        assert_same(
            &sa,
            &solve_layer(w.view(), &b, &c, Method::Gptq).unwrap(),
            "uniform vs none",
        );
        let xf = &x + &inputs(&mut rng, tokens, n).mapv(|v| 0.1 * v);
        let (pa, pb) = (paired(&x, &xf, None), paired(&x, &xf, Some(&alpha)));
        assert_eq!((&pa.hessian, &pa.cross), (&pb.hessian, &pb.cross));
        assert_same(
            &solve_layer(w.view(), &pa, &c, Method::gptaq()).unwrap(),
            &solve_layer(w.view(), &pb, &c, Method::gptaq()).unwrap(),
            "uniform GPTAQ",
        );
    }
}

/// Scaling every factor by a power of four is exact in floating point: the
/// accumulator scales each row by the square root of its factor, which then
/// scales by an exact power of two, so every product and partial sum scales
/// exactly and `2 / (c S) * c = 2 / S` exactly; Hessian and solution must be
/// identical. Other constants (8 and 3.7 here) change the Hessian only by
/// rounding (checked to 1e-6 relative).
#[test]
fn scaling_all_factors_changes_nothing() {
    for seed in 0..12u64 {
        let mut rng = Rng::new(100 + seed);
        let (m, n, tokens) = (24, 48, 160);
        let w = weight(&mut rng, m, n);
        let x = inputs(&mut rng, tokens, n);
        let alpha = factors(&mut rng, tokens);
        let base = stats(&x, Some(&alpha));
        let c = cfg(3, seed % 2 == 1);
        let sol = solve_layer(w.view(), &base, &c, Method::Gptq).unwrap();
        for scale in [0.25f32, 16.0, 2f32.powi(-12), 2f32.powi(20)] {
            let scaled = stats(&x, Some(&alpha.mapv(|a| a * scale)));
            assert_eq!(scaled.hessian, base.hessian, "scale {scale}");
            assert_same(
                &sol,
                &solve_layer(w.view(), &scaled, &c, Method::Gptq).unwrap(),
                "power-of-four scale",
            );
        }
        let max_diag = base.hessian.diag().fold(0.0f32, |a, &b| a.max(b.abs()));
        for scale in [8.0f32, 3.7] {
            let odd = stats(&x, Some(&alpha.mapv(|a| a * scale)));
            let worst = (&odd.hessian - &base.hessian).fold(0.0f32, |a, &b| a.max(b.abs()));
            assert!(
                worst <= 1e-6 * max_diag,
                "scale {scale}: {worst} vs {max_diag}"
            );
        }
    }
}

/// A token of weight 0 is the same as a token never seen: the accumulator
/// drops such rows before its products, so the statistics (and the GPTAQ
/// cross term) are bit-identical to accumulating only the other rows.
#[test]
fn zero_weight_tokens_equal_dropped_tokens() {
    for seed in 0..12u64 {
        let mut rng = Rng::new(200 + seed);
        let (m, n, tokens) = (16, 48, 300);
        let w = weight(&mut rng, m, n);
        let x = inputs(&mut rng, tokens, n);
        let xf = &x + &inputs(&mut rng, tokens, n).mapv(|v| 0.05 * v);
        let mut alpha = factors(&mut rng, tokens);
        for t in 0..tokens {
            if rng.uniform() < 0.4 {
                alpha[t] = 0.0;
            }
        }
        let keep: Vec<usize> = (0..tokens).filter(|&t| alpha[t] > 0.0).collect();
        let (xk, xfk, ak) = (
            x.select(Axis(0), &keep),
            xf.select(Axis(0), &keep),
            alpha.select(Axis(0), &keep),
        );
        let (a, b) = (stats(&x, Some(&alpha)), stats(&xk, Some(&ak)));
        assert_eq!(a.hessian, b.hessian);
        assert_eq!(a.weight_sum, b.weight_sum);
        assert_eq!(a.tokens, tokens);
        let c = cfg(2, true);
        assert_same(
            &solve_layer(w.view(), &a, &c, Method::Gptq).unwrap(),
            &solve_layer(w.view(), &b, &c, Method::Gptq).unwrap(),
            "zero weight vs dropped",
        );
        let (pa, pb) = (paired(&x, &xf, Some(&alpha)), paired(&xk, &xfk, Some(&ak)));
        assert_eq!((&pa.hessian, &pa.cross), (&pb.hessian, &pb.cross));
    }
}

/// With `x~ = x` the cross term is exactly zero, so GPTAQ's correction is
/// zero and its solution is GPTQ's bit for bit (weighted or not).
#[test]
fn gptaq_with_equal_inputs_is_gptq() {
    for seed in 0..12u64 {
        let mut rng = Rng::new(300 + seed);
        let (m, n, tokens) = (20, 64, 200);
        let w = weight(&mut rng, m, n);
        let x = inputs(&mut rng, tokens, n);
        let alpha = (seed % 2 == 0).then(|| factors(&mut rng, tokens));
        let p = paired(&x, &x, alpha.as_ref());
        assert!(p.cross.as_ref().unwrap().iter().all(|&v| v == 0.0));
        let s = stats(&x, alpha.as_ref());
        assert_eq!(p.hessian, s.hessian);
        let c = cfg(2 + seed as u32 % 3, seed % 3 == 0);
        assert_same(
            &solve_layer(w.view(), &p, &c, Method::gptaq()).unwrap(),
            &solve_layer(w.view(), &s, &c, Method::Gptq).unwrap(),
            "GPTAQ(x~ = x) vs GPTQ",
        );
    }
}

/// GPTAQ targets `||Q x~ - W x||`; GPTQ on the same quantized-path inputs
/// ignores the drift `x - x~`. With `x~` a perturbed copy of `x`, GPTAQ's
/// asymmetric objective must be lower on average over 32 seeds and on most
/// of them (measured numbers at the thresholds below).
#[test]
fn gptaq_lowers_the_asymmetric_objective() {
    let seeds = 32u64;
    let (mut ratio_sum, mut wins) = (0.0, 0);
    for seed in 0..seeds {
        let mut rng = Rng::new(400 + seed);
        let (m, n, tokens) = (32, 64, 512);
        let w = weight(&mut rng, m, n);
        let x = inputs(&mut rng, tokens, n);
        let xq = &x + &inputs(&mut rng, tokens, n).mapv(|v| 0.2 * v);
        let c = cfg(3, false);
        let g = solve_layer(w.view(), &stats(&xq, None), &c, Method::Gptq).unwrap();
        let a = solve_layer(w.view(), &paired(&xq, &x, None), &c, Method::gptaq()).unwrap();
        let og = asymmetric_objective(w.view(), g.dequantized.view(), x.view(), xq.view()).unwrap();
        let oa = asymmetric_objective(w.view(), a.dequantized.view(), x.view(), xq.view()).unwrap();
        ratio_sum += oa / og;
        wins += usize::from(oa < og);
    }
    let mean = ratio_sum / seeds as f64;
    println!(
        "GPTAQ/GPTQ asymmetric objective: mean ratio {mean:.4}, GPTAQ lower on {wins}/{seeds}"
    );
    assert!(mean < GPTAQ_MAX_MEAN_RATIO, "mean ratio {mean}");
    assert!(wins >= GPTAQ_MIN_WINS, "GPTAQ lower on {wins}/{seeds}");
}

/// Measured (3-bit, groups of 16, 512 tokens, perturbation 0.2x): mean ratio
/// 0.829, GPTAQ lower on 32/32 seeds. Thresholds keep a margin for kernel
/// changes that move rounding.
const GPTAQ_MAX_MEAN_RATIO: f64 = 0.9;
const GPTAQ_MIN_WINS: usize = 28;

/// VLMQ (GPTQ on the alpha-weighted Hessian) targets the alpha-weighted
/// objective; GPTQ on the unweighted Hessian does not. Measured on the
/// weighted Hessian over 32 seeds.
#[test]
fn vlmq_lowers_the_weighted_objective() {
    let seeds = 32u64;
    let (mut ratio_sum, mut wins) = (0.0, 0);
    for seed in 0..seeds {
        let mut rng = Rng::new(500 + seed);
        let (m, n, tokens) = (32, 64, 384);
        let w = weight(&mut rng, m, n);
        let x = inputs(&mut rng, tokens, n);
        let alpha = factors(&mut rng, tokens);
        let weighted = stats(&x, Some(&alpha));
        let c = cfg(3, false);
        let g = solve_layer(w.view(), &stats(&x, None), &c, Method::Gptq).unwrap();
        let v = solve_layer(w.view(), &weighted, &c, Method::Gptq).unwrap();
        let og =
            hessian_objective(w.view(), g.dequantized.view(), weighted.hessian.view()).unwrap();
        let ov =
            hessian_objective(w.view(), v.dequantized.view(), weighted.hessian.view()).unwrap();
        ratio_sum += ov / og;
        wins += usize::from(ov < og);
    }
    let mean = ratio_sum / seeds as f64;
    println!("VLMQ/GPTQ weighted objective: mean ratio {mean:.4}, VLMQ lower on {wins}/{seeds}");
    assert!(mean < VLMQ_MAX_MEAN_RATIO, "mean ratio {mean}");
    assert!(wins >= VLMQ_MIN_WINS, "VLMQ lower on {wins}/{seeds}");
}

/// Measured (3-bit, groups of 16, 384 tokens, log-normal factors with
/// sigma 1.5): mean ratio 0.917, VLMQ lower on 24/32 seeds. GPTQ is greedy,
/// so a solve on the right Hessian can still lose on single instances; the
/// thresholds ask for a clear aggregate win with margin.
const VLMQ_MAX_MEAN_RATIO: f64 = 0.96;
const VLMQ_MIN_WINS: usize = 20;
