//! Issue 25's wrong results that used to pass silently: each is now an
//! error naming what is wrong.

mod common;

use common::tiny::{samples, TinyModel};
use common::{inputs, weight, Rng};
use ndarray::Array2;
use vlmq::__private::write_dir_atomic;
use vlmq::hessian::HessianAccumulator;
use vlmq::pipeline::{quantize_model, PipelineConfig, QuantMethod};
use vlmq::solver::{inverse_factor_f64, solve_layer_with_factor};
use vlmq::{
    quantize_rtn, Bits, Error, GptqConfig, GroupSize, QuantScheme, QuantizedWeight, ScalePrecision,
};

fn scheme() -> QuantScheme {
    QuantScheme::new(Bits::new(4).unwrap()).with_group_size(GroupSize::new(8).unwrap())
}

/// A symmetric positive definite Hessian of correlated inputs, in f64.
fn hessian(n: usize) -> Array2<f64> {
    let x = inputs(&mut Rng::new(5), 4 * n, n);
    let mut acc = HessianAccumulator::<f32>::new(n);
    acc.add(x.view(), None).unwrap();
    acc.finish().unwrap().hessian.mapv(f64::from)
}

fn field_of(err: &Error) -> &'static str {
    match err {
        Error::InvalidConfig { field, .. } => field,
        other => panic!("expected an InvalidConfig error, got {other:?}"),
    }
}

#[test]
fn a_lower_triangular_factor_is_refused() {
    let n = 16;
    let perm: Vec<usize> = (0..n).collect();
    let u = inverse_factor_f64(hessian(n).view(), &perm, 0.01)
        .unwrap()
        .mapv(|v| v as f32);
    let w = weight(&mut Rng::new(6), 4, n);
    let cfg = GptqConfig::new(scheme());
    assert!(solve_layer_with_factor(w.view(), u.view(), None, None, &cfg).is_ok());
    let err = solve_layer_with_factor(w.view(), u.t(), None, None, &cfg).unwrap_err();
    assert_eq!(field_of(&err), "factor U", "{err}");
    assert!(err.to_string().contains("below the diagonal"), "{err}");
}

#[test]
fn inverse_factor_refuses_what_solve_layer_refuses() {
    let n = 8;
    let perm: Vec<usize> = (0..n).collect();
    let good = hessian(n);
    assert!(inverse_factor_f64(good.view(), &perm, 0.01).is_ok());
    // 1% asymmetry in every off-diagonal entry of the lower triangle.
    let skewed = Array2::from_shape_fn((n, n), |(i, j)| {
        good[[i, j]] * if i > j { 1.01 } else { 1.0 }
    });
    // One huge entry in the lower triangle.
    let mut spiked = good.clone();
    spiked[[5, 2]] = 1e6;
    // A negative diagonal entry.
    let mut negative = good.clone();
    negative[[3, 3]] = -1.0;
    for (what, h) in [
        ("1% asymmetry", skewed),
        ("1e6 below", spiked),
        ("negative", negative),
    ] {
        let err = inverse_factor_f64(h.view(), &perm, 0.01).unwrap_err();
        assert_eq!(field_of(&err), "Hessian", "{what}: {err}");
    }
}

#[test]
fn a_backend_that_ignores_the_new_weight_fails_the_run() {
    let data = samples(1, 4, 16);
    let cfg = PipelineConfig::new(QuantMethod::Gptq, GptqConfig::new(scheme()));
    let mut model = TinyModel::new(2, 16, 24, 2);
    assert!(quantize_model(&mut model, &data, &cfg, |_| {}).is_ok());
    let mut model = TinyModel::new(2, 16, 24, 2);
    model.ignore_sets = true;
    let err = quantize_model(&mut model, &data, &cfg, |_| {}).unwrap_err();
    assert!(
        matches!(err.root(), Error::Backend { reason, .. } if reason.contains("set_linear_weight")),
        "{err}"
    );
}

#[test]
fn subnormal_weights_are_refused_with_f32_scales_too() {
    let f32s = scheme().with_scale_precision(ScalePrecision::F32);
    // Normal weights a decade above the smallest normal f32 still quantize.
    let tiny = Array2::from_shape_fn((2, 8), |(i, j)| 1e-36 * ((i + j) as f32 - 4.0));
    let back = quantize_rtn(tiny.view(), &f32s).unwrap().dequantize();
    assert!(back.iter().any(|&x| x != 0.0));
    let sub = Array2::from_shape_fn((2, 8), |(i, j)| 1e-40 * ((i + j) as f32 - 4.0));
    let err = quantize_rtn(sub.view(), &f32s).unwrap_err();
    assert!(matches!(err, Error::Unencodable { .. }), "{err}");
    assert!(err.to_string().contains("output 0, group 0"), "{err}");
}

#[test]
fn a_file_name_given_twice_is_refused_and_nothing_is_written() {
    let dir = std::env::temp_dir().join(format!("vlmq-twice-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let files: [(&str, &[u8]); 2] = [("a.json", b"first"), ("a.json", b"second")];
    let err = write_dir_atomic(&dir, &files).unwrap_err();
    assert!(err.to_string().contains("given twice"), "{err}");
    assert!(!dir.exists());
}

#[test]
fn an_out_of_range_group_index_is_named_as_such() {
    let w = weight(&mut Rng::new(9), 3, 16);
    let q = quantize_rtn(w.view(), &scheme()).unwrap();
    let mut g_idx = q.g_idx().to_vec();
    // An entry of group 0: the old code inferred a group size of 7 from it.
    g_idx[3] = 7;
    let err = QuantizedWeight::new(
        q.bits(),
        q.symmetric(),
        q.codes().to_owned(),
        q.scales().to_owned(),
        q.zeros().to_owned(),
        g_idx,
    )
    .unwrap_err();
    assert_eq!(field_of(&err), "g_idx", "{err}");
    assert!(err.to_string().contains("7 at input 3"), "{err}");
}

/// Item 7 on a real immutable file (`chattr +i`: root on a filesystem with
/// the attribute; skipped with a message elsewhere). The old directory,
/// renamed aside, cannot be removed; the error names it.
#[test]
fn an_old_directory_holding_an_immutable_file_is_named_in_the_error() {
    let root = std::env::temp_dir().join(format!("vlmq-immutable-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let dir = root.join("ckpt");
    write_dir_atomic(&dir, &[("a.txt", b"one"), ("stuck.txt", b"kept")]).unwrap();
    let chattr = |flag: &str, p: &std::path::Path| {
        std::process::Command::new("chattr")
            .arg(flag)
            .arg(p)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !chattr("+i", &dir.join("stuck.txt")) {
        std::fs::remove_dir_all(&root).unwrap();
        eprintln!("skipped: `chattr +i` is not available here (needs root and ext4/xfs/btrfs)");
        return;
    }
    let result = write_dir_atomic(&dir, &[("a.txt", b"two")]);
    // Clear the attribute wherever the file is now, before asserting.
    for e in std::fs::read_dir(&root).unwrap() {
        chattr("-i", &e.unwrap().path().join("stuck.txt"));
    }
    let err = result.unwrap_err();
    let Error::LeftBehind { dir: d, left, .. } = &err else {
        panic!("expected LeftBehind, got {err}");
    };
    assert_eq!(d, &dir);
    assert!(left.join("stuck.txt").exists(), "{err}");
    assert!(err.to_string().contains(&*left.to_string_lossy()), "{err}");
    // The new directory is complete: the new file and the carried-over one.
    assert_eq!(std::fs::read(dir.join("a.txt")).unwrap(), b"two");
    assert_eq!(std::fs::read(dir.join("stuck.txt")).unwrap(), b"kept");
    std::fs::remove_dir_all(&root).unwrap();
}
