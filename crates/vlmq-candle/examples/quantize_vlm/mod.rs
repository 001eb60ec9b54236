//! The LLaVA branch of the `quantize` example: calibration prompts plus
//! images, the LM-only block selection (or every block), the task loss on
//! the prompts' text tokens before and after, and the LLaVA-layout GPTQ
//! checkpoint read back.
//!
//! `--prompts FILE`: one prompt per line (blank lines skipped), each with
//! one `<image>` marker per image, e.g. `USER: <image>\nWhat color is
//! the square? ASSISTANT: red` (write `\n` for a newline inside a line).
//! `--images DIR_OR_FILES`: a directory (its `.png`/`.jpg`/`.jpeg` files,
//! sorted by name) or a comma-separated list of files. Images are consumed
//! in order, one per marker, cycling when the prompts need more.
//! `--eval-windows N` holds the last N prompts out (default: none).

use std::path::{Path, PathBuf};
use std::time::Instant;

use vlmq::{GptqConfig, PipelineConfig, QuantScheme};
use vlmq_candle::candle_core::{DType, Device, Tensor};
use vlmq_candle::export::llava::{load_llava_gptq_into, write_llava_gptq};
use vlmq_candle::process::image_input::{load_image, ClipImageProcessor};
use vlmq_candle::{load_llava_dir, tokenizer_from_file, LlavaModel, VlmSample};

/// What the LLaVA branch needs from the command line.
pub struct VlmArgs<'a> {
    pub model: &'a Path,
    pub prompts: &'a Path,
    pub images: &'a str,
    pub method: vlmq::QuantMethod,
    pub scheme: QuantScheme,
    pub eval: usize,
    pub all_blocks: bool,
    pub out: Option<&'a Path>,
}

/// Whether `dir/config.json` describes a LLaVA model.
pub fn is_llava(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .is_some_and(|v| v["model_type"] == "llava")
}

fn image_files(spec: &str) -> Result<Vec<PathBuf>, String> {
    let p = Path::new(spec);
    let files: Vec<PathBuf> = if p.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(p)
            .map_err(|e| format!("{spec}: {e}"))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|f| {
                f.extension().and_then(|x| x.to_str()).is_some_and(|x| {
                    matches!(x.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg")
                })
            })
            .collect();
        v.sort();
        v
    } else {
        spec.split(',')
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
            .collect()
    };
    if files.is_empty() {
        return Err(format!("--images {spec:?} names no PNG/JPEG file"));
    }
    Ok(files)
}

/// Mean text loss per target token; `None` for an empty set.
fn mean_loss(m: &LlavaModel, set: &[VlmSample]) -> vlmq::Result<Option<f64>> {
    let (mut sum, mut n) = (0.0f64, 0usize);
    for s in set {
        if let Some((l, k)) = m.sample_loss(s)? {
            sum += l as f64 * k as f64;
            n += k;
        }
    }
    Ok((n > 0).then(|| sum / n as f64))
}

/// Runs the LLaVA branch; returns the JSON summary line.
pub fn run(a: &VlmArgs<'_>) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    let t0 = Instant::now();
    let mut model = load_llava_dir(a.model, DType::F32, &dev)?;
    let tk = tokenizer_from_file(a.model.join("tokenizer.json"))?;
    let pre = a.model.join("preprocessor_config.json");
    let size = model.config().vision.image_size;
    let processor = if pre.exists() {
        ClipImageProcessor::from_preprocessor_config(&pre, size)?
    } else {
        ClipImageProcessor::for_image_size(size)
    };
    if processor.crop != size {
        return Err(format!(
            "processor crop {} != vision image_size {size}",
            processor.crop
        )
        .into());
    }
    eprintln!(
        "loaded LLaVA {:?} in {:.1}s ({} blocks)",
        a.model,
        t0.elapsed().as_secs_f64(),
        vlmq::QuantizableModel::num_blocks(&model)
    );

    let files = image_files(a.images)?;
    let images = files
        .iter()
        .map(load_image)
        .collect::<vlmq::Result<Vec<_>>>()?;
    let prompts: Vec<String> = std::fs::read_to_string(a.prompts)?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.replace("\\n", "\n"))
        .collect();
    let mut next = 0usize;
    let mut set = Vec::with_capacity(prompts.len());
    for p in &prompts {
        let k = p.matches(vlmq_candle::IMAGE_MARKER).count();
        let px: Option<Tensor> = if k == 0 {
            None
        } else {
            let pick: Vec<_> = (0..k)
                .map(|j| images[(next + j) % images.len()].clone())
                .collect();
            next += k;
            Some(processor.batch(&pick, &dev)?)
        };
        set.push(model.prompt_sample(&tk, p, px)?);
    }
    if a.eval >= set.len() {
        return Err(format!(
            "{} prompts, {} held out: nothing left to calibrate on",
            set.len(),
            a.eval
        )
        .into());
    }
    let held = set.split_off(set.len() - a.eval);
    eprintln!(
        "{} calibration prompts, {} held out, {} images",
        set.len(),
        held.len(),
        images.len()
    );

    let reference = model.clone();
    let fp_calib = mean_loss(&reference, &set)?;
    let fp_held = mean_loss(&reference, &held)?;
    let mut cfg = PipelineConfig::new(a.method, GptqConfig::new(a.scheme));
    if !a.all_blocks {
        cfg = cfg.with_blocks(model.lm_only());
    }
    let tq = Instant::now();
    let q = vlmq::quantize_model(&mut model, &set, &cfg, |p| eprint!("\r  {p}      "))?;
    let quant_s = tq.elapsed().as_secs_f64();
    let q_calib = mean_loss(&model, &set)?;
    let q_held = mean_loss(&model, &held)?;
    eprintln!(
        "\n{}: {} linears in {quant_s:.1}s; text loss on calibration prompts {fp_calib:.4?} -> {q_calib:.4?}, held out {fp_held:.4?} -> {q_held:.4?}",
        a.method,
        q.weights.len()
    );
    let mut readback = None;
    if let Some(out) = a.out {
        write_llava_gptq(&model, &q, Some(&tk), out)?;
        let mut back = reference.clone();
        let n = load_llava_gptq_into(&mut back, out)?;
        let l = mean_loss(&back, &set)?;
        eprintln!("checkpoint {out:?}: {n} packed linears read back; calibration text loss {l:.6?} (in memory {q_calib:.6?})");
        readback = Some(l);
    }
    Ok(serde_json::json!({
        "model": a.model, "method": a.method.name(), "all_blocks": a.all_blocks,
        "prompts": prompts.len(), "held_out": held.len(), "images": files,
        "loss_fp_calib": fp_calib, "loss_calib": q_calib, "loss_fp_held": fp_held, "loss_held": q_held,
        "linears": q.weights.len(), "quant_seconds": quant_s, "readback_loss": readback,
    }))
}
