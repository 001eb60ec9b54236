//! Writing a quantized [`LlamaModel`] as a GPTQ checkpoint in the model's
//! own HF layout (`model.layers.N.self_attn.q_proj.qweight`, ...), with the
//! unquantized tensors (embedding, norms, head, biases), `config.json`
//! carrying `quantization_config`, `quantize_config.json` and the tokenizer.

use std::path::Path;

use candle_core::DType;
use ndarray::{ArrayD, IxDyn};
use vlmq::pack::DenseTensor;
use vlmq::pipeline::PipelineOutput;
use vlmq::{Checkpoint, CheckpointWriter, Error, QuantizableModel, Result};

use crate::error::file;
use crate::model::LlamaModel;
use crate::weights::LINEAR_NAMES;

fn dense(t: &candle_core::Tensor, path: &Path) -> Result<DenseTensor> {
    let shape = t.dims().to_vec();
    let v = t
        .to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| file(path, e))?;
    Ok(DenseTensor::F32(
        ArrayD::from_shape_vec(IxDyn(&shape), v).expect("shape matches"),
    ))
}

/// Writes `quantized` (from a pipeline run on `model`) as a GPTQ checkpoint
/// in `dir`. Linears absent from `quantized` are stored as dense weights.
/// `tokenizer`, when given, is saved as `tokenizer.json`.
pub fn write_gptq(
    model: &LlamaModel,
    quantized: &PipelineOutput,
    tokenizer: Option<&tokenizers::Tokenizer>,
    dir: impl AsRef<Path>,
) -> Result<()> {
    let dir = dir.as_ref();
    let mut cfg = model.config().to_hf_json();
    cfg["torch_dtype"] = "float32".into();
    let mut w = CheckpointWriter::new().with_model_config(cfg);
    for (name, t) in model.weights().named_tensors() {
        let layer = name.strip_suffix(".weight").and_then(|stem| {
            let rest = stem.strip_prefix("model.layers.")?;
            let (n, lin) = rest.split_once('.')?;
            LINEAR_NAMES
                .contains(&lin)
                .then(|| (n.parse::<usize>().ok(), lin))
        });
        match layer {
            Some((Some(b), lin)) if quantized.weights.contains_key(&(b, lin.to_string())) => {
                let q = quantized.weights[&(b, lin.to_string())].clone();
                let stem = format!("model.layers.{b}.{lin}");
                let bias = model.weights().layers[b]
                    .linear(lin)
                    .and_then(|l| l.bias.as_ref())
                    .map(|bt| dense(bt, dir))
                    .transpose()?;
                w.add_layer(&stem, q, bias)?;
            }
            _ => {
                // Biases of quantized layers are written with their layer.
                let is_qbias = name.strip_suffix(".bias").is_some_and(|stem| {
                    stem.strip_prefix("model.layers.")
                        .and_then(|r| r.split_once('.'))
                        .is_some_and(|(n, lin)| {
                            n.parse::<usize>().is_ok_and(|b| {
                                quantized.weights.contains_key(&(b, lin.to_string()))
                            })
                        })
                });
                if !is_qbias {
                    w.add_tensor(&name, dense(&t, dir)?)?;
                }
            }
        }
    }
    w.write(dir)?;
    if let Some(tk) = tokenizer {
        let p = dir.join("tokenizer.json");
        tk.save(&p, false).map_err(|e| file(&p, e))?;
    }
    Ok(())
}

/// Reads a checkpoint written by [`write_gptq`] back into `model`: every
/// quantized linear goes through [`vlmq::PackedLinear`] (its weight is
/// recovered by running the packed kernel on the identity), so the model then
/// computes with exactly what the checkpoint stores. Returns how many linears were read.
pub fn load_gptq_into(model: &mut LlamaModel, dir: impl AsRef<Path>) -> Result<usize> {
    let ckpt = Checkpoint::open(dir.as_ref())?;
    let mut n = 0;
    for b in 0..model.num_blocks() {
        for lin in LINEAR_NAMES {
            let stem = format!("model.layers.{b}.{lin}");
            if !ckpt.names().contains(&stem.as_str()) {
                continue;
            }
            let packed = ckpt.packed_linear(&stem)?;
            let inp = packed.in_features();
            let eye = ndarray::Array2::<f32>::eye(inp);
            // forward(I) = I W^T (+ b): subtract the bias to get W^T.
            let mut wt = packed.forward(eye.view())?;
            if let Some(bias) = packed.bias() {
                wt -= &bias;
            }
            model.set_linear_weight(b, lin, wt.t())?;
            n += 1;
        }
    }
    if n == 0 {
        return Err(Error::CorruptCheckpoint {
            path: dir.as_ref().to_path_buf(),
            reason: "no quantized linear of this model in the checkpoint".into(),
        });
    }
    Ok(n)
}
