//! Quantizes one random linear layer with RTN and GPTQ at 2, 3, 4 and 8 bits
//! and prints the layer-output error of each on held-out tokens.
//!
//! Run: `cargo run --release --example quickstart`

use std::time::Instant;

use ndarray::{s, Array2};
use vlmq::hessian::HessianAccumulator;
use vlmq::{quantize_rtn, solve_layer, Bits, GptqConfig, GroupSize, Method, QuantScheme};
use vlmq_nn::Rng;

/// Correlated activations: a few shared directions plus noise, like real layer inputs.
fn activations(rng: &mut Rng, tokens: usize, n: usize) -> Array2<f32> {
    let rank = n / 8;
    let basis = Array2::from_shape_fn((rank, n), |_| rng.normal());
    let coef = Array2::from_shape_fn((tokens, rank), |_| rng.normal());
    let noise = Array2::from_shape_fn((tokens, n), |_| 0.2 * rng.normal());
    coef.dot(&basis) + noise
}

fn relative_output_error(x: &Array2<f32>, w: &Array2<f32>, q: &Array2<f32>) -> f64 {
    let y = x.dot(&w.t());
    let yq = x.dot(&q.t());
    let num: f64 = (&y - &yq).iter().map(|v| f64::from(*v).powi(2)).sum();
    let den: f64 = y.iter().map(|v| f64::from(*v).powi(2)).sum();
    (num / den).sqrt()
}

fn main() -> vlmq::Result<()> {
    let (out_features, in_features, tokens) = (512, 512, 2048);
    let mut rng = Rng::new(42);
    let w = Array2::from_shape_fn((out_features, in_features), |_| 0.05 * rng.normal());
    let x = activations(&mut rng, tokens, in_features);
    let (calib, held_out) = (
        x.slice(s![..tokens / 2, ..]),
        x.slice(s![tokens / 2.., ..]).to_owned(),
    );

    let mut acc = HessianAccumulator::<f32>::new(in_features);
    for batch in calib.axis_chunks_iter(ndarray::Axis(0), 256) {
        acc.add(batch, None)?;
    }
    let stats = acc.finish()?;

    println!(
        "layer {out_features}x{in_features}, {} calibration tokens, group size 128",
        tokens / 2
    );
    println!(
        "{:>4}  {:>12}  {:>12}  {:>10}",
        "bits", "RTN error", "GPTQ error", "GPTQ time"
    );
    for bits in [2, 3, 4, 8] {
        let scheme = QuantScheme::new(Bits::new(bits)?).with_group_size(GroupSize::new(128)?);
        let rtn = quantize_rtn(w.view(), &scheme)?.dequantize();
        let start = Instant::now();
        let cfg = GptqConfig::new(scheme).with_act_order(true)?;
        let sol = solve_layer(w.view(), &stats, &cfg, Method::Gptq)?;
        let took = start.elapsed();
        println!(
            "{bits:>4}  {:>12.5}  {:>12.5}  {:>8.1}ms",
            relative_output_error(&held_out, &w, &rtn),
            relative_output_error(&held_out, &w, &sol.dequantized),
            took.as_secs_f64() * 1e3
        );
    }
    println!("(relative L2 error of the layer output on held-out tokens)");
    Ok(())
}
