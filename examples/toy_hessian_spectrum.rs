//! How many input directions each quantized layer of the toy ViT-LLM sees:
//! the participation ratio of every layer's calibration Hessian (unweighted,
//! full-precision inputs), next to the layer's input width. A ratio far below
//! the width means GPTQ's column updates can push most of the rounding error
//! into directions the data never visits: the wide model
//! (`assets/toy_vit_llm_wide.safetensors`) has that slack and GPTQ is nearly
//! lossless on it at W2; the narrower main model has much less.
//!
//! Run: `cargo run --release --example toy_hessian_spectrum -- [--calib N]
//! [--weights PATH]` (defaults: 64 calibration samples, the main model;
//! calibration seed 0, cluttered images).

use vlmq::pipeline::input_statistics;
use vlmq::QuantizableModel;
use vlmq_toy::{examples, load_toy_model, to_sample, Split};

fn main() -> vlmq::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let calib_count = args
        .iter()
        .position(|a| a == "--calib")
        .and_then(|i| args.get(i + 1))
        .map_or(64, |v| v.parse().expect("--calib takes a number"));
    let weights = args
        .iter()
        .position(|a| a == "--weights")
        .and_then(|i| args.get(i + 1))
        .map_or("assets/toy_vit_llm.safetensors", |w| w.as_str());
    let model = load_toy_model(weights)?;
    let calib: Vec<_> = examples(7, Split::Calibration, 0, calib_count)
        .iter()
        .map(to_sample)
        .collect();
    println!("| block | layers (one input) | input width | participation ratio |");
    println!("|---|---|---|---|");
    for group in input_statistics(&model, &calib, &|_| None)? {
        let Some(stats) = group.stats else { continue };
        let names: Vec<&str> = group.layers.iter().map(|l| l.name.as_str()).collect();
        println!(
            "| {} | {} | {} | {:.2} |",
            model.block_name(group.block),
            names.join(", "),
            stats.dim(),
            stats.participation_ratio()
        );
    }
    Ok(())
}
