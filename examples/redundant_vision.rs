//! Synthetic "redundant vision tokens" experiment.
//!
//! One linear layer (128 -> 64) calibrated on 448 near-duplicate vision tokens
//! (4 prototypes plus small noise, large norms) and 64 informative text
//! tokens. Synthetic per-token output gradients are large on text and small
//! on vision, as a task loss on caption tokens would make them. The table
//! compares the relative output error on held-out text tokens for RTN, GPTQ
//! and VLMQ (GPTQ on the Hessian weighted by the default gradient-saliency
//! factors), at 2 and 3 bits with groups of 32, over 8 seeds, and shows where
//! the Hessian trace comes from before and after weighting.
//!
//! Run with `cargo run --release --example redundant_vision`.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/common/redundant.rs"]
mod redundant;

use redundant::redundant_layer;
use vlmq::hessian::HessianAccumulator;
use vlmq::importance::ImportanceDiagnostics;
use vlmq::{quantize_rtn, solve_layer, Bits, GptqConfig, GroupSize, Method, QuantScheme};

fn main() -> vlmq::Result<()> {
    let seeds = 8u64;
    let (n, m, vision, text) = (128, 64, 448, 64);
    let first = redundant_layer(0, n, m, vision, text);
    let mut diag = ImportanceDiagnostics::new();
    diag.add(
        first.x.view(),
        &first.tokens,
        first.informative_factors().view(),
    )?;
    println!("Hessian trace and factors by modality (seed 0):\n{diag}");
    println!("held-out text-token relative output error, mean over {seeds} seeds");
    println!("bits      RTN     GPTQ     VLMQ  VLMQ/GPTQ  VLMQ wins");
    for bits in [2u32, 3] {
        let scheme = QuantScheme::new(Bits::new(bits)?).with_group_size(GroupSize::new(32)?);
        let cfg = GptqConfig::new(scheme);
        let (mut r, mut g, mut v, mut ratio, mut wins) = (0.0, 0.0, 0.0, 0.0, 0);
        for seed in 0..seeds {
            let layer = redundant_layer(seed, n, m, vision, text);
            let mut plain = HessianAccumulator::<f32>::new(n);
            plain.add(layer.x.view(), None)?;
            let mut weighted = HessianAccumulator::<f32>::new(n);
            weighted.add(layer.x.view(), Some(layer.informative_factors().view()))?;
            let qg = solve_layer(layer.w.view(), &plain.finish()?, &cfg, Method::Gptq)?;
            let qv = solve_layer(layer.w.view(), &weighted.finish()?, &cfg, Method::Gptq)?;
            let rtn = quantize_rtn(layer.w.view(), &scheme)?.dequantize();
            let (er, eg, ev) = (
                layer.text_error(&rtn),
                layer.text_error(&qg.dequantized),
                layer.text_error(&qv.dequantized),
            );
            r += er;
            g += eg;
            v += ev;
            ratio += ev / eg;
            wins += usize::from(ev < eg);
        }
        let k = seeds as f64;
        println!(
            "{bits:>4} {:>8.4} {:>8.4} {:>8.4} {:>10.3} {:>7}/{seeds}",
            r / k,
            g / k,
            v / k,
            ratio / k,
            wins
        );
    }
    Ok(())
}
