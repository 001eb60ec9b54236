//! The group-fitting rules, the scale precision and ragged groups at the
//! size of a real layer.
//!
//! `measure_group_fit_rules` (ignored; run with `cargo test --release --test
//! gptq_group_fit -- --ignored --nocapture`) prints the exact objective of
//! both fitting rules on synthetic layers.

mod common;

use common::{inputs, weight, Rng};
use ndarray::Array2;
use vlmq::hessian::HessianAccumulator;
use vlmq::pack::{Checkpoint, CheckpointWriter, PackedLinear};
use vlmq::{
    quantize_rtn, solve_layer, Bits, GptqConfig, GroupFit, GroupSize, LayerStatistics, Method,
    QuantScheme, ScalePrecision,
};

mod pack_common;
use pack_common::TempDir;

fn stats_of(x: &Array2<f32>) -> LayerStatistics {
    let mut acc = HessianAccumulator::<f32>::new(x.ncols());
    acc.add(x.view(), None).unwrap();
    acc.finish().unwrap()
}

fn objective(w: &Array2<f32>, stats: &LayerStatistics, cfg: &GptqConfig) -> f64 {
    solve_layer(w.view(), stats, cfg, Method::Gptq)
        .unwrap()
        .report
        .objective
        .unwrap()
}

#[test]
#[ignore = "measurement; prints a table"]
fn measure_group_fit_rules() {
    println!("m n bits g block act_order tokens | block_start updated ratio(bs/upd)");
    for &(m, n, bits, g, block, ao, tok_per_n) in &[
        (128usize, 256usize, 3u32, 64usize, 128usize, true, 4usize),
        (128, 256, 3, 64, 128, false, 4),
        (128, 256, 4, 32, 128, true, 4),
        (128, 256, 2, 64, 128, true, 4),
        (128, 256, 3, 128, 128, true, 4),
        (128, 256, 3, 64, 128, true, 1),
        (128, 576, 4, 128, 128, true, 2),
        (128, 576, 3, 128, 128, true, 1),
        (128, 256, 3, 16, 128, true, 4),
    ] {
        let mut ratios = Vec::new();
        let (mut sum_bs, mut sum_up) = (0.0, 0.0);
        for seed in 0..3u64 {
            let mut rng = Rng::new(seed * 7919 + n as u64);
            let w = weight(&mut rng, m, n);
            let x = inputs(&mut rng, tok_per_n * n, n);
            let stats = stats_of(&x);
            let scheme = QuantScheme::new(Bits::new(bits).unwrap())
                .with_group_size(GroupSize::new(g).unwrap());
            let cfg = GptqConfig::new(scheme)
                .with_block_size(block)
                .and_then(|c| c.with_act_order(ao))
                .unwrap();
            let bs = objective(&w, &stats, &cfg.with_group_fit(GroupFit::BlockStart));
            let up = objective(&w, &stats, &cfg.with_group_fit(GroupFit::Updated));
            sum_bs += bs;
            sum_up += up;
            ratios.push(bs / up);
        }
        println!(
            "{m} {n} {bits} {g} {block} {ao} {tok_per_n}n | {:.4e} {:.4e} {:.4} (per seed {:?})",
            sum_bs / 3.0,
            sum_up / 3.0,
            sum_bs / sum_up,
            ratios.iter().map(|r| format!("{r:.3}")).collect::<Vec<_>>()
        );
    }
}

#[test]
fn f32_scales_are_not_rounded_and_can_be_rounded_for_writing() {
    let mut rng = Rng::new(5);
    let w = weight(&mut rng, 16, 40);
    let x = inputs(&mut rng, 160, 40);
    let stats = stats_of(&x);
    let scheme = QuantScheme::new(Bits::new(4).unwrap())
        .with_group_size(GroupSize::new(16).unwrap())
        .with_scale_precision(ScalePrecision::F32);
    let sol = solve_layer(w.view(), &stats, &GptqConfig::new(scheme), Method::Gptq).unwrap();
    let is_f16 = |s: f32| half::f16::from_f32(s).to_f32() == s;
    assert!(
        sol.weight.scales().iter().any(|&s| !is_f16(s)),
        "f32 scales should not all be f16 values"
    );
    // The dense weight is what the f32 scales stand for.
    assert_eq!(sol.weight.dequantize(), sol.dequantized);
    let dir = TempDir::new("f32-scales");
    let mut writer = CheckpointWriter::new();
    assert!(writer.add_layer("l", sol.weight.clone(), None).is_err());
    let rounded = sol.weight.clone().with_f16_scales().unwrap();
    assert!(rounded.scales().iter().all(|&s| is_f16(s)));
    assert_eq!(rounded.codes(), sol.weight.codes());
    writer.add_layer("l", rounded.clone(), None).unwrap();
    writer.write(dir.path()).unwrap();
    assert_eq!(
        Checkpoint::open(dir.path()).unwrap().layer("l").unwrap(),
        rounded
    );
    // RTN honours the precision too.
    let rtn = quantize_rtn(w.view(), &scheme).unwrap();
    assert!(rtn.scales().iter().any(|&s| !is_f16(s)));
}

/// SmolLM2-135M's 576-input MLP layers (up/gate projections, 1536 x 576) at
/// GPTQModel's default group size 128: four groups of 128 and one of 64.
#[test]
fn ragged_576_by_1536_layer_solves_writes_reads_and_runs() {
    let (m, n) = (1536usize, 576usize);
    let mut rng = Rng::new(576);
    let w = weight(&mut rng, m, n);
    let x = inputs(&mut rng, 2 * n, n);
    let stats = stats_of(&x);
    let scheme =
        QuantScheme::new(Bits::new(4).unwrap()).with_group_size(GroupSize::new(128).unwrap());
    let cfg = GptqConfig::new(scheme).with_act_order(true).unwrap();
    let sol = solve_layer(w.view(), &stats, &cfg, Method::Gptq).unwrap();
    let q = &sol.weight;
    assert_eq!((q.out_features(), q.in_features(), q.groups()), (m, n, 5));
    let mut counts = [0usize; 5];
    for &g in q.g_idx() {
        counts[g as usize] += 1;
    }
    assert_eq!(counts, [128, 128, 128, 128, 64]);
    // GPTQ beats RTN on its own objective (with margin: act-order GPTQ on
    // correlated inputs is typically several times better).
    let rtn = quantize_rtn(w.view(), &scheme).unwrap().dequantize();
    let rtn_obj =
        vlmq::solver::hessian_objective(w.view(), rtn.view(), stats.hessian.view()).unwrap();
    assert!(sol.report.objective.unwrap() < rtn_obj);

    let dir = TempDir::new("ragged-576");
    let mut writer = CheckpointWriter::new().with_solve_settings(&cfg, Method::Gptq);
    writer.add_layer("mlp.up_proj", q.clone(), None).unwrap();
    let written = writer.write(dir.path()).unwrap();
    assert_eq!(written.group_size, GroupSize::new(128).unwrap());
    assert!(written.desc_act);
    let ck = Checkpoint::open(dir.path()).unwrap();
    let back = ck.layer("mlp.up_proj").unwrap();
    assert_eq!(&back, q);
    let lin: PackedLinear = ck.packed_linear("mlp.up_proj").unwrap();
    // 4 bits: every group starts on a 32-input block, including the 64-wide last one.
    assert!(lin.uses_fast_kernel());
    let xt = Array2::from_shape_fn((2, n), |(t, i)| ((t * 13 + i * 7) % 17) as f32 / 8.0 - 1.0);
    let y = lin.forward(xt.view()).unwrap();
    let y1 = lin.gemv(xt.row(1)).unwrap();
    let dense = xt.dot(&sol.dequantized.t());
    for t in 0..2 {
        for o in 0..m {
            // Summation order only: eps * n * sum |x w|.
            let mag: f32 = xt
                .row(t)
                .iter()
                .zip(sol.dequantized.row(o))
                .map(|(a, b)| (a * b).abs())
                .sum();
            let tol = n as f32 * f32::EPSILON * mag;
            assert!(
                (y[[t, o]] - dense[[t, o]]).abs() <= tol,
                "forward [{t}, {o}]"
            );
            if t == 1 {
                assert!((y1[o] - dense[[1, o]]).abs() <= tol, "gemv [{o}]");
            }
        }
    }
}
