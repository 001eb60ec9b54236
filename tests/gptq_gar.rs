//! Group-aware activation ordering (GAR, GPTQModel's `act_group_aware`): the
//! column order against GPTQModel's own rule, and the solve against a plain
//! solve of the permuted problem (the groups must keep their original
//! columns, so the checkpoint needs no `g_idx` permutation).

mod common;

use common::{weight, Rng};
use ndarray::Array2;
use vlmq::hessian::LayerStatistics;
use vlmq::solver::group_aware_permutation;
use vlmq::{solve_layer, Bits, GptqConfig, GroupSize, Method, QuantScheme};

fn diagonal(d: &[f32]) -> Array2<f32> {
    Array2::from_diag(&ndarray::Array1::from(d.to_vec()))
}

/// Expected orders printed by GPTQModel 7.7.0's `quantization/gar.py`
/// (`compute_local_perms`, `compute_global_perm`, `compose_final_perm`,
/// `extend_perm_with_tail`) for these diagonals; no ties, so its unstable
/// sort inside a group cannot differ from ours.
#[test]
fn the_order_is_gptqmodels() {
    let ragged = [0.5, 2.0, 0.1, 1.5, 3.0, 0.2, 0.7, 0.05, 4.0, 0.3];
    assert_eq!(
        group_aware_permutation(diagonal(&ragged).view(), 4),
        vec![4, 6, 5, 7, 1, 3, 0, 2, 8, 9]
    );
    let even = [1.0, 9.0, 2.0, 8.0, 3.0, 7.0, 4.0, 6.0, 5.0, 0.5, 11.0, 10.0];
    assert_eq!(
        group_aware_permutation(diagonal(&even).view(), 3),
        vec![10, 11, 9, 1, 2, 0, 3, 5, 4, 7, 8, 6]
    );
}

#[test]
fn ties_keep_the_natural_order() {
    let d = [1.0, 2.0, 2.0, 1.0, 2.0, 1.0];
    assert_eq!(
        group_aware_permutation(diagonal(&d).view(), 3),
        vec![1, 2, 0, 4, 3, 5]
    );
}

/// A Hessian of small integers: every sum the solver forms of its entries
/// (the mean diagonal behind the damping included) is exact in any order,
/// so the permuted problem is the same problem to the last bit.
fn integer_hessian(rng: &mut Rng, n: usize) -> Array2<f32> {
    let x = Array2::from_shape_fn((4 * n, n), |(_, c)| {
        let v = rng.below(7) as f32 - 3.0;
        // Columns of different scale give groups different largest entries.
        v * (1 + c % 3) as f32
    });
    let h = x.t().dot(&x);
    h + Array2::<f32>::eye(n)
}

#[test]
fn a_gar_solve_is_a_plain_solve_of_the_permuted_problem() {
    let mut rng = Rng::new(7);
    // 26 columns in groups of 8: three full groups and a ragged group of 2.
    let (m, n, g) = (12, 26, 8);
    let w = weight(&mut rng, m, n);
    let h = integer_hessian(&mut rng, n);
    let scheme =
        QuantScheme::new(Bits::new(3).unwrap()).with_group_size(GroupSize::new(g).unwrap());
    let gar = GptqConfig::new(scheme).with_act_group_aware(true).unwrap();
    let perm = group_aware_permutation(h.view(), g);
    assert_ne!(
        perm,
        (0..n).collect::<Vec<_>>(),
        "the test needs a non-trivial order"
    );

    let sol = solve_layer(
        w.view(),
        &LayerStatistics::from_hessian(h.clone()),
        &gar,
        Method::Gptq,
    )
    .unwrap();
    let w_p = Array2::from_shape_fn((m, n), |(r, p)| w[[r, perm[p]]]);
    let h_p = Array2::from_shape_fn((n, n), |(i, j)| h[[perm[i], perm[j]]]);
    let plain = solve_layer(
        w_p.view(),
        &LayerStatistics::from_hessian(h_p),
        &GptqConfig::new(scheme),
        Method::Gptq,
    )
    .unwrap();

    // Groups keep their original columns: g_idx is column / g.
    let expected_g_idx: Vec<u32> = (0..n).map(|c| (c / g) as u32).collect();
    assert_eq!(sol.weight.g_idx().to_vec(), expected_g_idx);
    for (p, &c) in perm.iter().enumerate() {
        for r in 0..m {
            assert_eq!(
                sol.weight.codes()[[r, c]],
                plain.weight.codes()[[r, p]],
                "code of row {r}, column {c}"
            );
        }
    }
    // Walk position p starts plain group p / g, which is GAR's original group
    // perm[p] / g (every group is a contiguous run of positions).
    for k in 0..n.div_ceil(g) {
        let original = perm[k * g] / g;
        assert_eq!(
            sol.weight.scales().row(original),
            plain.weight.scales().row(k),
            "scales of group {original}"
        );
        assert_eq!(
            sol.weight.zeros().row(original),
            plain.weight.zeros().row(k)
        );
    }
    // And GAR is not the natural order in disguise.
    let natural = solve_layer(
        w.view(),
        &LayerStatistics::from_hessian(h),
        &GptqConfig::new(scheme),
        Method::Gptq,
    )
    .unwrap();
    assert_ne!(natural.weight.codes(), sol.weight.codes());
}

#[test]
fn gar_with_act_order_or_static_groups_is_refused_when_built() {
    let scheme =
        QuantScheme::new(Bits::new(4).unwrap()).with_group_size(GroupSize::new(8).unwrap());
    let field = |r: vlmq::Result<GptqConfig>| match r {
        Err(vlmq::Error::InvalidConfig { field, .. }) => field,
        other => panic!("expected InvalidConfig, got {other:?}"),
    };
    let gar = GptqConfig::new(scheme).with_act_group_aware(true).unwrap();
    assert_eq!(field(gar.with_act_order(true)), "act_order");
    assert_eq!(field(gar.with_static_groups(true)), "static_groups");
    let ordered = GptqConfig::new(scheme).with_act_order(true).unwrap();
    assert_eq!(field(ordered.with_act_group_aware(true)), "act_group_aware");
    let static_groups = GptqConfig::new(scheme).with_static_groups(true).unwrap();
    assert_eq!(
        field(static_groups.with_act_group_aware(true)),
        "act_group_aware"
    );
    // Turning one off first makes room for the other.
    let switched = gar
        .with_act_group_aware(false)
        .unwrap()
        .with_act_order(true)
        .unwrap();
    assert!(switched.act_order() && !switched.act_group_aware());
}
