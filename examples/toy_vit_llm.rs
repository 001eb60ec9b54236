//! The main example: loads the trained toy ViT-LLM, quantizes it with RTN,
//! GPTQ, GPTAQ, VLMQ and VLMQ+GPTAQ, and prints held-out accuracy (with
//! fake-quantized weights and through the packed layers), the KL divergence of
//! the answer distribution from full precision, the summed layer objective and
//! the time of every method, averaged over calibration seeds.
//!
//! Run: `cargo run --release --example toy_vit_llm -- [flags]`
//!
//! Flags (defaults in brackets):
//!   --bits 4,3,2        bit widths [4,3,2]
//!   --group N           group size, 0 for per channel [32]; must divide every layer's
//!                       input width
//!   --sym               symmetric grid (GPTQ `sym=True`) instead of asymmetric
//!   --calib N           calibration samples per seed [64]
//!   --seed S            first calibration seed [0]
//!   --seeds N           calibration seeds S, S+1, ... (disjoint calibration subsets) [3]
//!   --eval N            held-out examples [600]
//!   --background B      plain or cluttered image background for calibration and evaluation [cluttered]
//!   --blocks lm|all     quantize the language model only, or also the ViT and projector [all]
//!   --methods a,b,...   subset of rtn,gptq,gptaq,vlmq,vlmq+gptaq [all]
//!   --weights PATH      model weights, any toy size [assets/toy_vit_llm.safetensors];
//!                       assets/toy_vit_llm_wide.safetensors is the wider comparison model
//!   --out DIR           write the GPTQ checkpoint of the last VLMQ run to DIR
//!   --power 1|2         VLMQ gradient saliency power [2]
//!   --floor X           VLMQ factor floor after mean-1 normalization [0.05]
//!   --cap X             VLMQ factor cap [none]
//!   --source task|local VLMQ gradient source: task loss or block-local RTN perturbation [task]
//!   --per-block         VLMQ factors from the block-output gradient instead of per input group
//!   --pilot F           VLMQ rows use the pilot-study scorer instead: a fraction F of the
//!                       vision tokens (lowest saliency) weighted 0.1
//!   --report            after the table, print the per-layer report of the last VLMQ run
//!                       of each bit width (objectives, damping, vision share of the Hessian
//!                       trace before -> after weighting)
//!   --quiet             no progress lines

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Instant;

use vlmq::importance::{
    GradientSaliency, Normalization, PilotScorer, PilotSelection, SaliencyPower,
};
use vlmq::pack::{CheckpointWriter, DenseTensor};
use vlmq::pipeline::{
    quantize_model, BlockSelection, GradientSource, ImportanceOptions, PipelineConfig, QuantMethod,
};
use vlmq::{Bits, GptqConfig, GroupSize, PackedLinear, QuantScheme, QuantizableModel};
use vlmq_nn::{Module, SequenceModel};
use vlmq_toy::{
    examples_with, load_toy_model, to_sample, AnswerScores, Background, Split, VqaExample,
};

const DATA_SEED: u64 = 7;

struct Args {
    bits: Vec<u32>,
    group: usize,
    symmetric: bool,
    calib: usize,
    first_seed: u64,
    seeds: u64,
    eval: usize,
    background: Background,
    lm_only: bool,
    methods: Vec<QuantMethod>,
    weights: String,
    out: Option<String>,
    quiet: bool,
    report: bool,
    importance: ImportanceOptions,
    pilot: Option<f32>,
}

fn parse_args() -> Args {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let get = |name: &str| {
        argv.iter()
            .position(|a| a == name)
            .and_then(|i| argv.get(i + 1))
            .cloned()
    };
    let num = |name: &str, default: usize| {
        get(name).map_or(default, |v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} takes a number"))
        })
    };
    let methods = get("--methods").map_or(QuantMethod::ALL.to_vec(), |list| {
        list.split(',')
            .map(|m| match m.to_ascii_lowercase().as_str() {
                "rtn" => QuantMethod::Rtn,
                "gptq" => QuantMethod::Gptq,
                "gptaq" => QuantMethod::Gptaq,
                "vlmq" => QuantMethod::Vlmq,
                "vlmq+gptaq" => QuantMethod::VlmqGptaq,
                other => panic!("unknown method {other}"),
            })
            .collect()
    });
    Args {
        bits: get("--bits").map_or(vec![4, 3, 2], |b| {
            b.split(',')
                .map(|x| x.parse().expect("--bits takes numbers"))
                .collect()
        }),
        group: num("--group", 32),
        symmetric: argv.iter().any(|a| a == "--sym"),
        calib: num("--calib", 64),
        first_seed: num("--seed", 0) as u64,
        seeds: num("--seeds", 3) as u64,
        eval: num("--eval", 600),
        background: get("--background")
            .map_or(Ok(Background::default()), |b| b.parse())
            .unwrap_or_else(|e| panic!("--background: {e}")),
        lm_only: get("--blocks").is_some_and(|b| b == "lm"),
        methods,
        weights: get("--weights").unwrap_or_else(|| "assets/toy_vit_llm.safetensors".into()),
        out: get("--out"),
        quiet: argv.iter().any(|a| a == "--quiet"),
        report: argv.iter().any(|a| a == "--report"),
        importance: ImportanceOptions::default()
            .with_source(match get("--source").as_deref() {
                Some("local") => GradientSource::BlockLocal,
                _ => GradientSource::TaskLoss,
            })
            .with_per_block(argv.iter().any(|a| a == "--per-block"))
            .with_scorer(GradientSaliency::new(
                if get("--power").as_deref() == Some("1") {
                    SaliencyPower::One
                } else {
                    SaliencyPower::Two
                },
                Normalization::new(
                    get("--floor").map_or(Normalization::DEFAULT_FLOOR, |f| {
                        f.parse().expect("--floor takes a number")
                    }),
                    get("--cap").map(|c| c.parse().expect("--cap takes a number")),
                )
                .expect("valid --floor / --cap"),
            )),
        pilot: get("--pilot").map(|f| f.parse().expect("--pilot takes a fraction")),
    }
}

/// Mean and sample standard deviation.
fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

/// Per-seed comparison of `values` with the same seeds' `baseline`: the mean
/// and standard deviation of `combine(value, baseline)`, how many seeds were
/// `better`, and the seed count; `None` without a baseline.
fn paired(
    values: &[f64],
    baseline: Option<Vec<f64>>,
    combine: fn(f64, f64) -> f64,
    better: fn(f64) -> bool,
) -> Option<(f64, f64, usize, usize)> {
    let per_seed: Vec<f64> = values
        .iter()
        .zip(baseline?)
        .map(|(&v, b)| combine(v, b))
        .collect();
    let (mean, sd) = mean_std(&per_seed);
    let wins = per_seed.iter().filter(|&&x| better(x)).count();
    Some((mean, sd, wins, per_seed.len()))
}

/// The model with every quantized linear running from packed codes.
fn packed_model(
    base: &SequenceModel,
    weights: &BTreeMap<(usize, String), vlmq::QuantizedWeight>,
) -> vlmq::Result<SequenceModel> {
    let mut m = base.clone();
    for ((b, layer), qw) in weights {
        m.set_linear_kernel(*b, layer, Arc::new(PackedLinear::new(qw, None)?))?;
    }
    Ok(m)
}

fn write_checkpoint(
    dir: &str,
    model: &SequenceModel,
    weights: &BTreeMap<(usize, String), vlmq::QuantizedWeight>,
) -> vlmq::Result<()> {
    let mut w = CheckpointWriter::new();
    let mut quantized = std::collections::HashSet::new();
    for ((b, layer), qw) in weights {
        let name = format!("blocks.{b}.{layer}");
        quantized.insert(format!("{name}.weight"));
        w.add_layer(&name, qw.clone(), None)?;
    }
    let mut rest = Vec::new();
    model.visit_params("", &mut |name, t| {
        if !quantized.contains(name) {
            rest.push((name.to_string(), t.to_owned()));
        }
    });
    for (name, t) in rest {
        w.add_tensor(&name, DenseTensor::F32(t))?;
    }
    w.write(dir)?;
    Ok(())
}

fn main() -> vlmq::Result<()> {
    let args = parse_args();
    let base = load_toy_model(&args.weights)?;
    let eval: Vec<VqaExample> =
        examples_with(DATA_SEED, Split::Eval, 0, args.eval, args.background);
    let start = Instant::now();
    let fp_scores = AnswerScores::compute(&base, &eval)?;
    let fp = fp_scores.accuracy();
    let n_blocks = base.num_blocks();
    let projector = base.projector_index().unwrap_or(0);
    println!(
        "toy ViT-LLM: {} blocks (ViT 0..{projector}, projector {projector}, LM {}..{n_blocks}), {} held-out examples",
        n_blocks,
        projector + 1,
        eval.len()
    );
    println!(
        "full precision: {:.2}% held-out accuracy, answer NLL {:.4} nats ({:.1}s)",
        100.0 * fp,
        fp_scores.mean_nll(),
        start.elapsed().as_secs_f64()
    );
    let group = if args.group == 0 {
        GroupSize::PerChannel
    } else {
        GroupSize::new(args.group)?
    };
    let pilot = args
        .pilot
        .map(|f| PilotScorer::new(f, 0.1, PilotSelection::LowestSaliency))
        .transpose()?;
    let blocks = if args.lm_only {
        BlockSelection::Indices(((projector + 1)..n_blocks).collect())
    } else {
        BlockSelection::All
    };

    println!();
    println!(
        "| bits | method | accuracy % (fake-quant) | accuracy % (packed) | vs full precision (pp) | vs GPTQ (pp) | KL from FP (mnats) | KL vs GPTQ | layer objective | time (s) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut vlmq_reports = Vec::new();
    for &bits in &args.bits {
        let scheme = QuantScheme::new(Bits::new(bits)?)
            .with_group_size(group)
            .with_symmetric(args.symmetric);
        let mut gptq_acc: Option<Vec<f64>> = None;
        let mut gptq_kl: Option<Vec<f64>> = None;
        for &method in &args.methods {
            let mut accs = Vec::new();
            let mut packed_accs = Vec::new();
            let mut objectives = Vec::new();
            let mut kls = Vec::new();
            let mut times = Vec::new();
            for seed in args.first_seed..args.first_seed + args.seeds {
                let calib: Vec<_> = examples_with(
                    DATA_SEED,
                    Split::Calibration,
                    seed * 10_000,
                    args.calib,
                    args.background,
                )
                .iter()
                .map(to_sample)
                .collect();
                let importance = match &pilot {
                    Some(p) => args.importance.clone().with_scorer(*p),
                    None => args.importance.clone(),
                };
                let cfg =
                    PipelineConfig::new(method, GptqConfig::new(scheme).with_act_order(true)?)
                        .with_blocks(blocks.clone())
                        .with_importance(importance)
                        .with_layer_objectives(true);
                let mut model = base.clone();
                let t0 = Instant::now();
                let live = !args.quiet && std::io::stderr().is_terminal();
                let out = quantize_model(&mut model, &calib, &cfg, &mut |p: &vlmq::Progress| {
                    if live {
                        eprint!("\r  W{bits} {method:<10} seed {seed}: {p}        ");
                    }
                })?;
                if !args.quiet && !live {
                    eprintln!(
                        "  W{bits} {method} seed {seed}: {} layers in {:.2}s",
                        out.report.layers.len(),
                        out.report.total_seconds
                    );
                }
                times.push(t0.elapsed().as_secs_f64());
                let scores = AnswerScores::compute(&model, &eval)?;
                accs.push(100.0 * scores.accuracy());
                kls.push(1e3 * scores.mean_kl_from(&fp_scores)?);
                let packed = AnswerScores::compute(&packed_model(&base, &out.weights)?, &eval)?;
                packed_accs.push(100.0 * packed.accuracy());
                objectives.push(out.report.total_objective().unwrap_or(f64::NAN));
                if method == QuantMethod::Vlmq && seed + 1 == args.first_seed + args.seeds {
                    if let Some(dir) = &args.out {
                        write_checkpoint(dir, &model, &out.weights)?;
                    }
                    if args.report {
                        vlmq_reports.push((bits, seed, out.report.to_string()));
                    }
                }
            }
            if !args.quiet && std::io::stderr().is_terminal() {
                eprint!("\r{:100}\r", "");
            }
            if method == QuantMethod::Gptq {
                gptq_acc = Some(accs.clone());
                gptq_kl = Some(kls.clone());
            }
            let (acc, acc_sd) = mean_std(&accs);
            let (pacc, pacc_sd) = mean_std(&packed_accs);
            let (obj, _) = mean_std(&objectives);
            let (t, _) = mean_std(&times);
            let baseline = |g: &Option<Vec<f64>>| g.clone().filter(|_| method != QuantMethod::Gptq);
            let delta = paired(&accs, baseline(&gptq_acc), |a, b| a - b, |d| d > 0.0)
                .map_or(String::new(), |(d, sd, wins, n)| {
                    format!("{d:+.2} ± {sd:.2} ({wins}/{n} seeds better)")
                });
            let (kl, kl_sd) = mean_std(&kls);
            let kl_ratio = paired(&kls, baseline(&gptq_kl), |a, b| a / b, |r| r < 1.0)
                .map_or(String::new(), |(r, sd, wins, n)| {
                    format!("{r:.2}x ± {sd:.2} ({wins}/{n} seeds lower)")
                });
            let vs_fp = acc - 100.0 * fp;
            println!(
                "| W{bits} {}{} | {method} | {acc:.2} ± {acc_sd:.2} | {pacc:.2} ± {pacc_sd:.2} | {vs_fp:+.2} | {delta} | {kl:.2} ± {kl_sd:.2} | {kl_ratio} | {obj:.4e} | {t:.2} |",
                if args.group == 0 {
                    "per-channel".to_string()
                } else {
                    format!("g{}", args.group)
                },
                if args.symmetric { " sym" } else { "" }
            );
        }
    }
    for (bits, seed, report) in &vlmq_reports {
        println!();
        println!("VLMQ layer report, W{bits}, calibration seed {seed}:");
        println!("```text\n{report}\n```");
    }
    println!();
    println!(
        "full precision {:.2}%; means ± sample std over {} calibration seeds of {} samples; total {:.1}s",
        100.0 * fp,
        args.seeds,
        args.calib,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
