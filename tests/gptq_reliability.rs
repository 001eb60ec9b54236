//! Bad inputs to the quantizers and the Hessian get typed errors, never a
//! panic or a silently wrong result (issue 13; listed in docs/RELIABILITY.md).

use ndarray::Array2;
use vlmq::hessian::HessianAccumulator;
use vlmq::solver::solve_layer_with_factor;
use vlmq::{
    quantize_rtn, solve_layer, Bits, Error, GptqConfig, GroupSize, LayerStatistics, Method,
    QuantScheme, ScalePrecision,
};

fn scheme() -> QuantScheme {
    QuantScheme::new(Bits::new(4).unwrap())
}

#[test]
fn rtn_on_a_weight_without_inputs_is_an_error() {
    for shape in [(32, 0), (0, 0)] {
        let w = Array2::<f32>::zeros(shape);
        for s in [
            scheme(),
            scheme().with_group_size(GroupSize::new(8).unwrap()),
        ] {
            let r = quantize_rtn(w.view(), &s);
            assert!(
                matches!(r, Err(Error::InvalidGroupSize { .. })),
                "{shape:?}: {r:?}"
            );
        }
    }
}

#[test]
fn asymmetric_hessian_is_an_error() {
    let w = Array2::from_shape_fn((4, 6), |(i, j)| (i + 2 * j) as f32 / 7.0 - 0.5);
    let mut h = Array2::<f32>::eye(6);
    h[[0, 3]] = 1000.0;
    let stats = LayerStatistics::from_hessian(h.clone());
    let r = solve_layer(w.view(), &stats, &GptqConfig::new(scheme()), Method::Gptq);
    assert!(
        matches!(
            r,
            Err(Error::InvalidConfig {
                field: "Hessian",
                ..
            })
        ),
        "{r:?}"
    );
    // A factor entry point given the same Hessian refuses it too.
    let u = Array2::<f32>::eye(6);
    let r = solve_layer_with_factor(
        w.view(),
        u.view(),
        None,
        Some(h.view()),
        &GptqConfig::new(scheme()),
    );
    assert!(
        matches!(
            r,
            Err(Error::InvalidConfig {
                field: "Hessian",
                ..
            })
        ),
        "{r:?}"
    );
    // Rounding-level asymmetry is accepted.
    let mut h = Array2::<f32>::eye(6) * 2.0;
    h[[0, 3]] = 0.5;
    h[[3, 0]] = 0.5 * (1.0 + 1e-6);
    let stats = LayerStatistics::from_hessian(h);
    assert!(solve_layer(w.view(), &stats, &GptqConfig::new(scheme()), Method::Gptq).is_ok());
}

#[test]
fn negative_diagonal_hessian_is_an_error() {
    let w = Array2::from_shape_fn((4, 6), |(i, j)| (i + 2 * j) as f32 / 7.0 - 0.5);
    let h = -Array2::<f32>::eye(6);
    let r = solve_layer(
        w.view(),
        &LayerStatistics::from_hessian(h),
        &GptqConfig::new(scheme()),
        Method::Gptq,
    );
    assert!(
        matches!(
            r,
            Err(Error::InvalidConfig {
                field: "Hessian",
                ..
            })
        ),
        "{r:?}"
    );
}

#[test]
fn overflowing_inputs_give_a_non_finite_error_at_finish() {
    let x = Array2::from_elem((4, 3), 1e20f32);
    let mut acc = HessianAccumulator::<f32>::new(3);
    acc.add(x.view(), None).unwrap();
    assert!(matches!(acc.finish(), Err(Error::NonFinite { .. })));
    // Importance factors near f32::MAX overflow the weighted squares too.
    let x = Array2::from_elem((2, 3), 1e10f32);
    let alpha = ndarray::Array1::from_elem(2, f32::MAX / 2.0);
    let mut acc = HessianAccumulator::<f32>::new(3);
    acc.add(x.view(), Some(alpha.view())).unwrap();
    assert!(matches!(acc.finish(), Err(Error::NonFinite { .. })));
}

#[test]
fn gptaq_strength_outside_unit_interval_is_an_error() {
    for s in [-3.0f32, 1.5, 1e30, f32::NAN] {
        let m = Method::Gptaq { strength: s };
        assert!(matches!(
            m.validate(),
            Err(Error::InvalidConfig {
                field: "gptaq.strength",
                ..
            })
        ));
        let w = Array2::<f32>::ones((2, 4));
        let x = Array2::from_shape_fn((16, 4), |(t, j)| ((t * 3 + j) % 5) as f32);
        let mut acc = HessianAccumulator::<f32>::with_cross_term(4);
        acc.add_paired(x.view(), x.view(), None).unwrap();
        let r = solve_layer(
            w.view(),
            &acc.finish().unwrap(),
            &GptqConfig::new(scheme()),
            m,
        );
        assert!(matches!(r, Err(Error::InvalidConfig { .. })), "{s}: {r:?}");
    }
    for s in [0.0f32, 0.25, 1.0] {
        assert!(Method::Gptaq { strength: s }.validate().is_ok());
    }
}

#[test]
fn weights_outside_f16_scale_range_are_errors_unless_f32_scales() {
    let stats = LayerStatistics::from_hessian(Array2::eye(8));
    for v in [1e37f32, 1e-13] {
        let w = Array2::from_shape_fn((2, 8), |(i, j)| v * ((i + j) as f32 - 4.0));
        let r = quantize_rtn(w.view(), &scheme());
        assert!(matches!(r, Err(Error::Unencodable { .. })), "{v}: {r:?}");
        let r = solve_layer(w.view(), &stats, &GptqConfig::new(scheme()), Method::Gptq);
        assert!(matches!(r, Err(Error::Unencodable { .. })), "{v}: {r:?}");
        // With f32 scales the grid fits and the weights survive.
        let f32s = scheme().with_scale_precision(ScalePrecision::F32);
        let q = quantize_rtn(w.view(), &f32s).unwrap();
        let back = q.dequantize();
        assert!(back.iter().any(|&x| x != 0.0), "{v}");
        assert!(back.iter().all(|x| x.is_finite()));
    }
}
