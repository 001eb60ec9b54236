//! Where each method leaves the rounding error: for every quantized layer of
//! the toy ViT-LLM, the mean output error on the question (text) tokens and on
//! the vision tokens of held-out examples, `tr((W - Q) H_m (W - Q)^T)` with
//! `H_m` the Hessian of one modality's full-precision inputs, summed per block.
//! GPTQ minimizes the error summed over all calibration tokens, which are
//! almost all vision tokens; the answer is read at the question token.
//!
//! Run: `cargo run --release --example toy_token_errors -- [--bits 2] [--seed 0]
//! [--calib 64] [--eval 200] [--weights PATH]` (defaults in brackets: W2 with
//! groups of 32 and act-order, the main model, every block quantized, as in the
//! main example; the errors are measured on held-out examples, not on the
//! calibration set).

use std::collections::BTreeMap;

use vlmq::hessian::LayerStatistics;
use vlmq::pipeline::{input_statistics, quantize_model, PipelineConfig, QuantMethod};
use vlmq::solver::hessian_objective;
use vlmq::{Bits, GptqConfig, GroupSize, Modality, QuantScheme, QuantizableModel, TokenInfo};
use vlmq_toy::{examples, load_toy_model, to_sample, Split};

/// The toy's data seed (as in the other examples).
const DATA_SEED: u64 = 7;

fn flag(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

fn number(name: &str, default: &str) -> usize {
    flag(name, default)
        .parse()
        .unwrap_or_else(|_| panic!("{name} takes a number"))
}

/// Per-layer statistics of one modality's held-out inputs, keyed by block and
/// layer name (every linear of a group shares its group's statistics).
fn modality_statistics<M: QuantizableModel>(
    model: &M,
    samples: &[M::Sample],
    modality: Modality,
) -> vlmq::Result<BTreeMap<(usize, String), LayerStatistics>> {
    let mask = |info: &TokenInfo| Some(info.mask(modality));
    let mut by_layer = BTreeMap::new();
    for group in input_statistics(model, samples, &mask)? {
        if let Some(stats) = group.stats {
            for layer in &group.layers {
                by_layer.insert((group.block, layer.name.clone()), stats.clone());
            }
        }
    }
    Ok(by_layer)
}

fn main() -> vlmq::Result<()> {
    let weights = flag("--weights", "assets/toy_vit_llm.safetensors");
    let bits = number("--bits", "2") as u32;
    let seed = number("--seed", "0") as u64;
    let base = load_toy_model(&weights)?;
    let calib: Vec<_> = examples(
        DATA_SEED,
        Split::Calibration,
        seed * 10_000,
        number("--calib", "64"),
    )
    .iter()
    .map(to_sample)
    .collect();
    let held_out: Vec<_> = examples(DATA_SEED, Split::Eval, 0, number("--eval", "200"))
        .iter()
        .map(to_sample)
        .collect();
    let text = modality_statistics(&base, &held_out, Modality::Text)?;
    let vision = modality_statistics(&base, &held_out, Modality::Vision)?;
    let scheme = QuantScheme::new(Bits::new(bits)?).with_group_size(GroupSize::new(32)?);

    println!("W{bits} g32, calibration seed {seed}; mean output error per token of each kind, summed over each block's layers");
    println!();
    println!("| block | method | question-token error | vision-token error |");
    println!("|---|---|---|---|");
    for method in [QuantMethod::Rtn, QuantMethod::Gptq, QuantMethod::Vlmq] {
        let mut model = base.clone();
        let cfg = PipelineConfig::new(method, GptqConfig::new(scheme).with_act_order(true)?);
        let out = quantize_model(&mut model, &calib, &cfg, |_| {})?;
        let mut per_block: BTreeMap<usize, (Option<f64>, f64)> = BTreeMap::new();
        for ((block, layer), qw) in &out.weights {
            let w = base.linear_weight(*block, layer)?;
            let q = qw.dequantize();
            let key = (*block, layer.clone());
            let entry = per_block.entry(*block).or_insert((None, 0.0));
            if let Some(t) = text.get(&key) {
                let e = hessian_objective(w.view(), q.view(), t.hessian.view())?;
                entry.0 = Some(entry.0.unwrap_or(0.0) + e);
            }
            if let Some(v) = vision.get(&key) {
                entry.1 += hessian_objective(w.view(), q.view(), v.hessian.view())?;
            }
        }
        for (block, (t, v)) in per_block {
            let t = t.map_or("-".to_string(), |t| format!("{t:.3}"));
            println!("| {} | {method} | {t} | {v:.3} |", base.block_name(block));
        }
    }
    Ok(())
}
