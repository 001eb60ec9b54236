//! Properties of the streaming Hessian accumulator and the inverse-Cholesky factor.

mod common;

use common::{inputs, Rng};
use ndarray::{s, Array1, Array2};
use proptest::prelude::*;
use vlmq::__private::inverse_cholesky_upper;
use vlmq::hessian::HessianAccumulator;
use vlmq::Damping;

fn one_batch(x: &Array2<f32>, alpha: Option<&Array1<f32>>) -> Array2<f32> {
    let mut acc = HessianAccumulator::<f32>::new(x.ncols());
    acc.add(x.view(), alpha.map(|a| a.view())).unwrap();
    acc.finish().unwrap().hessian
}

/// Reordering a sum of N terms changes it by at most about N * eps * sum|terms|
/// (the worst-case bound of recursive summation, eps = 2^-24); that is the
/// tolerance for a batch split, applied entry by entry against the sum of
/// absolute products computed in f64.
fn assert_within_reordering(a: &Array2<f32>, b: &Array2<f32>, x: &Array2<f32>) {
    let n_tok = x.nrows() as f64;
    let ax = x.mapv(|v| f64::from(v.abs()));
    let abs_sum = ax.t().dot(&ax) * (2.0 / n_tok);
    let eps = 2f64.powi(-24);
    for ((i, j), &va) in a.indexed_iter() {
        let tol = 2.0 * n_tok * eps * abs_sum[[i, j]] + 1e-30;
        let d = (f64::from(va) - f64::from(b[[i, j]])).abs();
        assert!(
            d <= tol,
            "[{i},{j}]: {va} vs {} (tolerance {tol})",
            b[[i, j]]
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn batch_split_does_not_change_the_hessian(seed in any::<u64>(), n in 1usize..300, tokens in 1usize..200, cuts in prop::collection::vec(0usize..200, 0..5)) {
        let mut rng = Rng::new(seed);
        let x = inputs(&mut rng, tokens, n);
        let whole = one_batch(&x, None);
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (tokens + 1)).collect();
        cuts.push(0);
        cuts.push(tokens);
        cuts.sort_unstable();
        let mut acc = HessianAccumulator::<f32>::new(n);
        let mut other = HessianAccumulator::<f32>::new(n);
        for (k, w) in cuts.windows(2).enumerate() {
            let batch = x.slice(s![w[0]..w[1], ..]);
            // Alternate between two accumulators, then merge: splitting and merging agree.
            if k % 2 == 0 { acc.add(batch, None).unwrap() } else { other.add(batch, None).unwrap() }
        }
        acc.merge(&other).unwrap();
        prop_assert_eq!(acc.tokens(), tokens);
        let split = acc.finish().unwrap().hessian;
        assert_within_reordering(&whole, &split, &x);
        // Symmetric by construction.
        prop_assert_eq!(split.clone(), split.t().to_owned());
    }

    #[test]
    fn weighted_hessian_matches_its_definition(seed in any::<u64>(), n in 1usize..40, tokens in 1usize..80) {
        let mut rng = Rng::new(seed);
        let x = inputs(&mut rng, tokens, n);
        let alpha = Array1::from_shape_fn(tokens, |_| rng.uniform() as f32 * 3.0);
        prop_assume!(alpha.sum() > 0.0);
        let h = one_batch(&x, Some(&alpha));
        let x64 = x.mapv(f64::from);
        let a64 = alpha.mapv(f64::from);
        let xa = &x64 * &a64.view().insert_axis(ndarray::Axis(1));
        let want = xa.t().dot(&x64) * (2.0 / a64.sum());
        for ((i, j), &v) in h.indexed_iter() {
            let scale = want[[i, i]].abs().max(want[[j, j]].abs()).max(1e-12);
            prop_assert!((f64::from(v) - want[[i, j]]).abs() <= 1e-5 * scale, "[{},{}] {} vs {}", i, j, v, want[[i, j]]);
        }
    }
}

#[test]
fn f64_accumulation_agrees_with_f32() {
    let mut rng = Rng::new(3);
    let x = inputs(&mut rng, 500, 64);
    let h32 = one_batch(&x, None);
    let mut acc = HessianAccumulator::<f64>::new(64);
    acc.add(x.view(), None).unwrap();
    let h64 = acc.finish().unwrap().hessian;
    assert_within_reordering(&h32, &h64, &x);
}

/// Consuming the accumulator gives `finish`'s statistics bit for bit, with
/// and without GPTAQ's cross term, at a width spanning several tiles and
/// weights that make the normalization round; and the same error when no
/// token has weight.
#[test]
fn into_statistics_is_finish_in_place() {
    let mut rng = Rng::new(11);
    let n = 150;
    let x = inputs(&mut rng, 300, n);
    let shifted = x.mapv(|v| v * 0.7 + 0.1);
    let alpha = Array1::from_shape_fn(300, |t| 0.3 + (t % 7) as f32 * 0.37);
    let mut plain = HessianAccumulator::<f32>::new(n);
    plain.add(x.view(), Some(alpha.view())).unwrap();
    let mut paired = HessianAccumulator::<f32>::with_cross_term(n);
    paired
        .add_paired(x.view(), shifted.view(), Some(alpha.view()))
        .unwrap();
    for acc in [plain, paired] {
        let want = acc.finish().unwrap();
        let got = acc.into_statistics().unwrap();
        assert!(got.hessian == want.hessian);
        assert_eq!(got.hessian, got.hessian.t());
        assert_eq!(got.cross, want.cross);
        assert_eq!((got.tokens, got.weight_sum), (want.tokens, want.weight_sum));
    }
    let empty = HessianAccumulator::<f32>::new(n);
    assert!(empty.finish().is_err());
    assert!(empty.into_statistics().is_err());
}

/// Runs `f` on a rayon pool of `threads` threads.
fn on_pool<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
        .install(f)
}

/// Every accumulator kind (unweighted, weighted with some zero weights,
/// paired with the cross term, f64) gives the same bits on 1, 2 and 3
/// threads. The width spans several 256-row strips and 1024-column tiles, so
/// the tiles really are spread over the threads.
#[test]
fn accumulation_is_thread_count_invariant() {
    let mut rng = Rng::new(11);
    let (tokens, n) = (37, 1300);
    let x = inputs(&mut rng, tokens, n);
    let xf = &x + &inputs(&mut rng, tokens, n).mapv(|v| 0.01 * v);
    let mut alpha = Array1::from_shape_fn(tokens, |_| rng.uniform() as f32 * 2.0);
    alpha[3] = 0.0;
    let run = |t| {
        on_pool(t, || {
            let mut plain = HessianAccumulator::<f32>::new(n);
            plain.add(x.view(), None).unwrap();
            plain.add(xf.view(), None).unwrap();
            let mut weighted = HessianAccumulator::<f32>::new(n);
            weighted.add(x.view(), Some(alpha.view())).unwrap();
            let mut paired = HessianAccumulator::<f32>::with_cross_term(n);
            paired
                .add_paired(x.view(), xf.view(), Some(alpha.view()))
                .unwrap();
            let mut wide = HessianAccumulator::<f64>::new(n);
            wide.add(x.view(), Some(alpha.view())).unwrap();
            let paired = paired.finish().unwrap();
            (
                plain.finish().unwrap().hessian,
                weighted.finish().unwrap().hessian,
                paired.hessian,
                paired.cross.unwrap(),
                wide.finish().unwrap().hessian,
            )
        })
    };
    let one = run(1);
    assert_eq!(one, run(2));
    assert_eq!(one, run(3));
}

/// Across several strips and tiles (width 1300), the Hessian and the GPTAQ
/// cross term match their definitions computed in f64. Tolerance: the
/// f32 sums reorder at most N terms, so each entry is within
/// `2 N eps sum_t |x_ti x_tj|` (see `assert_within_reordering`); the cross
/// term uses the same bound with `|x_ti - x~_ti| |x~_tj|`. 131 tokens are
/// two full 64-row tiles of the column-major copies and a ragged third.
#[test]
fn multi_tile_products_match_their_definitions() {
    let mut rng = Rng::new(5);
    let (tokens, n) = (131, 1300);
    let xq = inputs(&mut rng, tokens, n);
    let xf = &xq + &inputs(&mut rng, tokens, n).mapv(|v| 0.05 * v);
    let mut acc = HessianAccumulator::<f32>::with_cross_term(n);
    acc.add_paired(xq.view(), xf.view(), None).unwrap();
    let stats = acc.finish().unwrap();
    let q64 = xq.mapv(f64::from);
    let want = q64.t().dot(&q64) * (2.0 / tokens as f64);
    assert_within_reordering(&stats.hessian, &want.mapv(|v| v as f32), &xq);
    let d64 = xf.mapv(f64::from) - &q64;
    let want_cross = d64.t().dot(&q64) * (2.0 / tokens as f64);
    let abs_cross = d64.mapv(f64::abs).t().dot(&q64.mapv(f64::abs)) * (2.0 / tokens as f64);
    let eps = 2f64.powi(-24);
    let cross = stats.cross.unwrap();
    for ((i, j), &v) in cross.indexed_iter() {
        // One more rounding for the f32 difference x - x~ (relative eps).
        let tol = (2.0 * tokens as f64 + 2.0) * eps * abs_cross[[i, j]] + 1e-30;
        let d = (f64::from(v) - want_cross[[i, j]]).abs();
        assert!(d <= tol, "cross [{i},{j}]: {v} vs {}", want_cross[[i, j]]);
    }
}

/// The flip route (`U = J L^-1 J` from `J H J = L L^T`) against the direct
/// route (invert, then factor) computed in f64: `U^T U (H + dI) = I`.
#[test]
fn flip_route_factor_inverts_the_damped_hessian() {
    for seed in 0..6 {
        let mut rng = Rng::new(seed);
        let n = 16 + 40 * seed as usize;
        let x = inputs(&mut rng, 4 * n, n);
        let h = one_batch(&x, None);
        let f = inverse_cholesky_upper(h.view(), &Damping::default()).unwrap();
        let u = f.u.mapv(f64::from);
        for i in 0..n {
            for j in 0..i {
                assert_eq!(u[[i, j]], 0.0, "U must be upper triangular");
            }
        }
        let mut hd = h.mapv(f64::from);
        for i in 0..n {
            hd[[i, i]] += f.damp_absolute;
        }
        let prod = u.t().dot(&u).dot(&hd);
        let err = (&prod - &Array2::<f64>::eye(n))
            .iter()
            .fold(0.0f64, |m, v| m.max(v.abs()));
        // f32 factor: residual ~ n * 2^-24 * cond(H + dI); cond <= ~1/damp ~ 100 here.
        assert!(err < 1e-3, "seed {seed} n {n}: max |U^T U H - I| = {err}");
    }
}

#[test]
fn invalid_batches_are_rejected() {
    let mut acc = HessianAccumulator::<f32>::new(3);
    assert!(acc.add(Array2::<f32>::zeros((2, 4)).view(), None).is_err());
    let mut x = Array2::<f32>::zeros((2, 3));
    x[[1, 2]] = f32::INFINITY;
    assert!(acc.add(x.view(), None).is_err());
    let ok = Array2::<f32>::ones((2, 3));
    assert!(acc
        .add(ok.view(), Some(Array1::from(vec![1.0, -1.0]).view()))
        .is_err());
    assert!(acc
        .add(ok.view(), Some(Array1::from(vec![1.0]).view()))
        .is_err());
    assert!(acc.finish().is_err(), "no tokens were accepted");
    let mut paired = HessianAccumulator::<f32>::with_cross_term(3);
    assert!(paired
        .add_paired(ok.view(), Array2::<f32>::ones((3, 3)).view(), None)
        .is_err());
}

/// The inverse-Cholesky factor is the same bits on 1, 2 and 3 threads, at
/// sizes below and above the dimension where the factorization goes
/// parallel (1536) and across faer's recursion splits. The large case uses
/// fewer tokens than features (a singular Hessian the damping makes
/// definite) to keep the test cheap.
#[test]
fn inverse_cholesky_is_thread_count_invariant() {
    for (seed, n, tokens) in [(1u64, 300usize, 350usize), (2, 1600, 64)] {
        let mut rng = Rng::new(seed);
        let x = inputs(&mut rng, tokens, n);
        let h = one_batch(&x, None);
        let run = |t| {
            on_pool(t, || {
                inverse_cholesky_upper(h.view(), &Damping::default())
                    .unwrap()
                    .u
            })
        };
        let one = run(1);
        assert!(one == run(2), "n {n}: 2 threads differ from 1");
        assert!(one == run(3), "n {n}: 3 threads differ from 1");
    }
}
