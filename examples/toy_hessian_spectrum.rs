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

use std::collections::BTreeMap;

use vlmq::hessian::HessianAccumulator;
use vlmq::toy::{examples, load_toy_model, to_sample, Split};
use vlmq::QuantizableModel;

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
    let mut hidden = calib
        .iter()
        .map(|s| model.embed(s))
        .collect::<vlmq::Result<Vec<_>>>()?;
    println!("| block | layers (one input) | input width | participation ratio |");
    println!("|---|---|---|---|");
    for block in 0..model.num_blocks() {
        // Linears of one group share their input: accumulate it once, under
        // the group's first layer.
        let groups = model.linear_groups(block);
        let mut accumulators: BTreeMap<String, HessianAccumulator<f64>> = groups
            .iter()
            .filter_map(|g| g.first())
            .map(|l| (l.name.clone(), HessianAccumulator::new(l.in_features)))
            .collect();
        let mut failure = None;
        for (h, sample) in hidden.iter_mut().zip(&calib) {
            let mut sink = |layer: &str, rows: ndarray::ArrayView2<'_, f32>| {
                if let Some(Err(e)) = accumulators.get_mut(layer).map(|a| a.add(rows, None)) {
                    failure.get_or_insert(e);
                }
            };
            *h = model.block_forward(block, h, sample, Some(&mut sink))?;
        }
        if let Some(e) = failure {
            return Err(e);
        }
        for group in &groups {
            let Some(acc) = group.first().and_then(|l| accumulators.get(&l.name)) else {
                continue;
            };
            let stats = acc.finish()?;
            let names: Vec<&str> = group.iter().map(|l| l.name.as_str()).collect();
            println!(
                "| {} | {} | {} | {:.2} |",
                model.block_name(block),
                names.join(", "),
                stats.dim(),
                stats.participation_ratio()
            );
        }
    }
    Ok(())
}
