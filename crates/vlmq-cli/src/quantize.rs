//! `vlmq quantize`: the recipe from defaults, file and flags; load,
//! calibrate, quantize, save, optionally evaluate.

use std::path::PathBuf;
use std::time::Instant;

use vlmq::lock::DirLock;
use vlmq::Result;
use vlmq_candle::{
    device_from_name, dtype_from_name, Calibration, LoadOptions, LoadedModel, Quantizer, Recipe,
};

use crate::args::QuantizeArgs;
use crate::eval::{eval_text, print_report};
use crate::progress::{interrupt_flag, EventBars};

/// The recipe in effect and where its settings came from (for errors).
fn recipe(a: &QuantizeArgs) -> Result<(Recipe, PathBuf)> {
    let (mut r, origin) = match &a.recipe {
        Some(p) => (Recipe::from_toml_file(p)?, p.clone()),
        None => (Recipe::default(), PathBuf::from("command line")),
    };
    if let Some(v) = &a.method {
        r.method = v.clone();
    }
    if let Some(v) = a.bits {
        r.bits = v;
    }
    if let Some(v) = a.group {
        r.group_size = v;
    }
    r.symmetric &= !a.asym;
    r.act_order |= a.act_order;
    r.static_groups |= a.static_groups;
    r.act_group_aware |= a.gar;
    if let Some(v) = a.damping {
        r.damping = v;
    }
    r.true_sequential &= !a.one_forward;
    if let Some(v) = a.samples {
        r.samples = v;
    }
    if let Some(v) = a.seq_len {
        r.seq_len = v;
    }
    if let Some(v) = a.seed {
        r.seed = v;
    }
    if let Some(v) = &a.format {
        r.format = v.clone();
    }
    if let Some(v) = a.capture_tokens {
        r.capture_tokens = v;
    }
    if let Some(v) = a.capture_mb {
        r.capture_memory_mb = v;
    }
    if let Some(v) = a.importance_mb {
        r.importance_memory_mb = v;
    }
    Ok((r, origin))
}

/// Runs `vlmq quantize`.
pub fn run(a: QuantizeArgs) -> Result<()> {
    let (r, origin) = recipe(&a)?;
    let checked = r.check(&origin)?;
    if a.print_recipe {
        print!("{}", r.to_toml_string());
        return Ok(());
    }
    // One writer per directory, taken before the long work starts: a second
    // command on the same output or state directory stops here, naming us.
    let _out_lock = DirLock::output_dir(&a.out)?;
    let _state_lock = a.state_dir.as_deref().map(DirLock::state_dir).transpose()?;
    let data = Calibration::from_file(&a.calib)?;
    let t0 = Instant::now();
    let mut bars = EventBars::new(interrupt_flag(), a.stop_after_layers);
    let opts = LoadOptions::default()
        .with_device(device_from_name(&a.device)?)
        .with_dtype(dtype_from_name(&a.dtype)?);
    let mut q = Quantizer::from_pretrained_with_events(&a.model, &opts, |e| bars.on_event(e))?;
    bars.finish();
    eprintln!(
        "loaded {} ({}, {} blocks)",
        a.model.display(),
        q.model().family(),
        q.model().num_blocks()
    );
    if let Some(dir) = &a.state_dir {
        q = q.with_state_dir(dir);
    }
    let reference = a.eval.as_ref().map(|_| q.model().clone());
    let done = q
        .calibrate(data, &a.calib)?
        .quantize(&checked, |e| bars.on_event(e))?;
    bars.finish();
    done.save_with_events(&a.out, |e| bars.on_event(e))?;
    bars.finish();
    eprintln!("wrote {}", a.out.display());
    let grid = match r.format.as_str() {
        "gptq" => format!("W{} g{}", r.bits, r.group_size),
        other => other.to_string(),
    };
    let report = done.report();
    let resumed = match report.resumed_blocks {
        0 => String::new(),
        n => format!(" (resumed after {n} blocks from the state directory)"),
    };
    eprintln!(
        "{} {grid}: {} layers quantized in {:.1}s ({:.1}s in the pipeline{}){resumed}",
        r.method,
        done.output().weights.len() + done.output().gguf.len(),
        t0.elapsed().as_secs_f64(),
        report.total_seconds,
        cpu_text(report)
    );
    if let (Some(text), Some(LoadedModel::Llama(fp)), LoadedModel::Llama(m)) =
        (&a.eval, &reference, done.model())
    {
        let report = eval_text(m, Some(fp), done.tokenizer(), text, r.seq_len, 0)?;
        print_report(&report);
    } else if a.eval.is_some() {
        eprintln!("--eval: evaluation runs on Llama-family models only; skipped");
    }
    Ok(())
}

/// How busy the cores were during the pipeline, e.g. `, CPU 1.8 of 2 cores (92%)`;
/// empty without a CPU-time reading.
fn cpu_text(report: &vlmq::PipelineReport) -> String {
    match (report.cpu_seconds, report.cpu_utilization()) {
        (Some(cpu), Some(u)) => format!(
            ", CPU {:.1} of {} cores ({:.0}%)",
            cpu / report.total_seconds,
            report.cores,
            100.0 * u
        ),
        _ => String::new(),
    }
}
