//! The GGUF table runner of the `gguf_table` example (`--gguf
//! q4_0,q4_k,...`, a GGUF source): for each block type, the source re-quantized onto it, written
//! as a GGUF file, read back and run through candle's quantized matmul
//! (`QuantizedLlama`, `QMatMul` on the packed blocks, as
//! candle-transformers' quantized Llama runs it), and scored against the
//! source model in f32 (perplexity, KL) on the held-out windows.
//!
//! Per type, one of: `--candle-rtn`, candle's own quantizer (round to
//! nearest, `QTensor::quantize` of the f32 weights, no calibration), plus
//! one line for the source file itself through `QMatMul`; or the
//! `--method` (GPTQ, GPTAQ, VLMQ) solved onto the type's grid by vlmq.
//! Linears too narrow for a K-quant take llama.cpp's fallback
//! (`GgufType::for_cols`) in every method, so files of one type have the
//! same size. `--work DIR` holds the files (deleted after scoring unless
//! `--keep`; kept files are also scored with the blocks dequantized to f32,
//! `ppl_dequantized`, and the held-out token windows are written to
//! `DIR/eval-windows.json`, so another runtime can score the same file on
//! the same tokens).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use vlmq::quant::gguf::GgufType;
use vlmq::PipelineConfig;
use vlmq_candle::candle_core::quantized::{GgmlDType, QTensor};
use vlmq_candle::candle_core::{Device, Tensor};
use vlmq_candle::eval::{evaluate_with, EvalReport, TokenLogits};
use vlmq_candle::export::gguf::{requantize_gguf, requantize_gguf_with, GgufTensor};
use vlmq_candle::export::gguf_name;
use vlmq_candle::{read_gguf_content, GgufKernel, LlamaModel, QuantizedLlama, TextSample};

use crate::cli::Quant;

/// What the GGUF branch needs from the command line.
pub struct GgufArgs<'a> {
    pub source: &'a Path,
    pub types: Vec<GgufType>,
    pub candle_rtn: bool,
    pub quant: &'a Quant,
    /// The method's pipeline (the `--method` recipe as the command builds
    /// it); each type's run sets its GGUF grid on a copy.
    pub pipeline: PipelineConfig,
    pub seed: u64,
    pub work: PathBuf,
    pub keep: bool,
}

/// The block types of a comma-separated list (`q4_0,q4_k`).
pub fn parse_types(list: &str) -> Result<Vec<GgufType>, String> {
    list.split(',')
        .map(|t| t.trim().parse::<GgufType>().map_err(|e| e.to_string()))
        .collect()
}

/// A model whose logits are computed once per batch and kept: the f32
/// reference is scored against every file of a run.
struct Cached<'a> {
    model: &'a LlamaModel,
    seen: RefCell<HashMap<Vec<u32>, Tensor>>,
}

impl TokenLogits for Cached<'_> {
    fn logits(&self, batch: &[&[u32]]) -> vlmq::Result<Tensor> {
        let key: Vec<u32> = batch.iter().flat_map(|r| r.iter().copied()).collect();
        if let Some(t) = self.seen.borrow().get(&key) {
            return Ok(t.clone());
        }
        let t = self.model.logits(batch)?;
        self.seen.borrow_mut().insert(key, t.clone());
        Ok(t)
    }
}

/// candle's type for a vlmq block type.
fn ggml(ty: GgufType) -> GgmlDType {
    match ty {
        GgufType::Q8_0 => GgmlDType::Q8_0,
        GgufType::Q4_0 => GgmlDType::Q4_0,
        GgufType::Q4_1 => GgmlDType::Q4_1,
        GgufType::Q5_0 => GgmlDType::Q5_0,
        GgufType::Q4K => GgmlDType::Q4K,
        GgufType::Q6K => GgmlDType::Q6K,
    }
}

/// Whether a GGUF tensor is one of a decoder layer's seven linears.
fn is_linear(name: &str) -> bool {
    const PARTS: [&str; 7] = [
        ".attn_q.weight",
        ".attn_k.weight",
        ".attn_v.weight",
        ".attn_output.weight",
        ".ffn_gate.weight",
        ".ffn_up.weight",
        ".ffn_down.weight",
    ];
    name.starts_with("blk.") && PARTS.iter().any(|p| name.ends_with(p))
}

/// `src` with every linear re-rounded by candle's quantizer onto `ty` (or
/// its fallback for the tensor's width).
fn write_candle_rtn(src: &Path, dst: &Path, ty: GgufType) -> vlmq::Result<()> {
    let cpu = Device::Cpu;
    let err = |e: vlmq_candle::candle_core::Error| vlmq::Error::Backend {
        block: usize::MAX,
        layer: None,
        reason: e.to_string(),
    };
    requantize_gguf_with(src, dst, |name, q, _| {
        let dims = q.shape().dims().to_vec();
        if !is_linear(name) || dims.len() != 2 || !dims[1].is_multiple_of(32) {
            return Ok(None);
        }
        let t = ty.for_cols(dims[1]);
        let w = q.dequantize(&cpu).map_err(err)?;
        let packed = QTensor::quantize(&w, ggml(t)).map_err(err)?;
        Ok(Some(GgufTensor {
            name: name.to_string(),
            dims,
            ggml_type: t.ggml_id(),
            data: packed.data().map_err(err)?.into_owned(),
        }))
    })
}

/// Counts of each tensor type of the decoder linears in `path`.
fn linear_types(path: &Path) -> vlmq::Result<BTreeMap<String, usize>> {
    let c = read_gguf_content(path)?;
    let mut n = BTreeMap::new();
    for (name, info) in &c.tensor_infos {
        if is_linear(name) {
            *n.entry(format!("{:?}", info.ggml_dtype)).or_insert(0) += 1;
        }
    }
    Ok(n)
}

/// One scored file.
struct Scored {
    eval: EvalReport,
    dequantized: Option<EvalReport>,
    bytes: u64,
    types: BTreeMap<String, usize>,
}

fn eval_file(
    path: &Path,
    kernel: GgufKernel,
    reference: &Cached<'_>,
    eval_set: &[Vec<u32>],
) -> vlmq::Result<EvalReport> {
    let qm = QuantizedLlama::from_gguf(path, kernel, &Device::Cpu)?;
    let mut prog = |d: usize, n: usize| eprint!("\r  eval {d}/{n}   ");
    evaluate_with(
        &qm,
        Some(reference as &dyn TokenLogits),
        eval_set,
        2,
        &mut prog,
    )
}

fn score(
    path: &Path,
    reference: &Cached<'_>,
    eval_set: &[Vec<u32>],
    dequantized: bool,
) -> vlmq::Result<Scored> {
    let eval = eval_file(path, GgufKernel::Quantized, reference, eval_set)?;
    let dequantized = match dequantized {
        true => Some(eval_file(
            path,
            GgufKernel::Dequantized,
            reference,
            eval_set,
        )?),
        false => None,
    };
    let bytes = std::fs::metadata(path)
        .map_err(|e| vlmq::Error::io(path, e))?
        .len();
    Ok(Scored {
        eval,
        dequantized,
        bytes,
        types: linear_types(path)?,
    })
}

/// Runs every type, handing `emit` one JSON object per scored file as soon
/// as it is scored (`common` holds the fields every line shares).
pub fn run(
    a: &GgufArgs<'_>,
    model: &LlamaModel,
    samples: &[TextSample],
    eval_set: &[Vec<u32>],
    common: serde_json::Value,
    emit: &mut dyn FnMut(&serde_json::Value) -> std::io::Result<()>,
) -> Result<(), Box<dyn std::error::Error>> {
    if a.source.extension().is_none_or(|e| e != "gguf") {
        return Err(format!("--gguf needs a .gguf source, got {:?}", a.source).into());
    }
    std::fs::create_dir_all(&a.work)?;
    if a.keep {
        let p = a.work.join("eval-windows.json");
        std::fs::write(&p, serde_json::to_string(eval_set)?)?;
    }
    let reference = Cached {
        model,
        seen: RefCell::new(HashMap::new()),
    };
    let mut prog = |d: usize, n: usize| eprint!("\r  eval {d}/{n}   ");
    let base = evaluate_with(&reference, None, eval_set, 2, &mut prog)?;
    eprintln!("\nreference (f32): ppl {:.4}", base.perplexity);
    let mut line = |method: &str, ty: &str, s: &Scored, quant_s: f64, write_s: f64| {
        let mut l = common.clone();
        let extra = serde_json::json!({
            "method": method, "gguf_type": ty, "kernel": "candle QMatMul",
            "linear_types": s.types, "file_bytes": s.bytes, "ppl_fp": base.perplexity,
            "ppl": s.eval.perplexity, "kl": s.eval.kl, "eval_tokens": s.eval.tokens,
            "quant_seconds": quant_s, "write_seconds": write_s,
            "ppl_dequantized": s.dequantized.map(|e| e.perplexity),
            "kl_dequantized": s.dequantized.and_then(|e| e.kl),
        });
        for (k, v) in extra.as_object().expect("object") {
            l[k] = v.clone();
        }
        eprintln!(
            "\n{method} {ty}: ppl {:.4}, KL {:.5}, {} bytes, write {write_s:.2}s",
            s.eval.perplexity,
            s.eval.kl.unwrap_or(f64::NAN),
            s.bytes
        );
        emit(&l)
    };
    if a.candle_rtn {
        let s = score(a.source, &reference, eval_set, a.keep)?;
        line("source", "source", &s, 0.0, 0.0)?;
    }
    let tag = match a.candle_rtn {
        true => "candle-rtn".to_string(),
        false => format!("{}-seed{}", a.quant.method.name(), a.seed),
    };
    for &ty in &a.types {
        let dst = a.work.join(format!("{tag}-{ty}.gguf"));
        let (quant_s, write_s, method) = if a.candle_rtn {
            let t = Instant::now();
            write_candle_rtn(a.source, &dst, ty)?;
            (0.0, t.elapsed().as_secs_f64(), "candle-rtn".to_string())
        } else {
            let mut m = model.clone();
            let cfg = a.pipeline.clone().with_gguf_type(Some(ty));
            let t = Instant::now();
            let q = vlmq::quantize_model(&mut m, samples, &cfg, |p| eprint!("\r  {p}      "))?;
            let quant_s = t.elapsed().as_secs_f64();
            let mut solved = HashMap::new();
            for ((b, layer), sol) in q.gguf {
                let hf = format!("model.layers.{b}.{layer}.weight");
                let name = gguf_name(&hf).ok_or(format!("no GGUF name for {hf}"))?;
                solved.insert(name, sol);
            }
            let t = Instant::now();
            requantize_gguf(a.source, &dst, &solved)?;
            (
                quant_s,
                t.elapsed().as_secs_f64(),
                a.quant.method.name().to_string(),
            )
        };
        let s = score(&dst, &reference, eval_set, a.keep)?;
        line(&method, ty.name(), &s, quant_s, write_s)?;
        if !a.keep {
            std::fs::remove_file(&dst)?;
        }
    }
    Ok(())
}
