//! Writing a quantized [`LlamaModel`] as a GPTQ checkpoint in the model's
//! own HF layout (`model.layers.N.self_attn.q_proj.qweight`, ...), with the
//! unquantized tensors (embedding, norms, head, biases), `config.json`
//! carrying `quantization_config`, `quantize_config.json` and the tokenizer.
//! The writing and reading loops are shared with the LLaVA layout
//! ([`super::llava`]).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};
use ndarray::{Array2, ArrayD, IxDyn};
use serde_json::Value;
use vlmq::pack::DenseTensor;
use vlmq::pipeline::PipelineOutput;
use vlmq::{Checkpoint, CheckpointWriter, Error, QuantizableModel, Result};

use crate::error::file;
use crate::models::llama::model::LlamaModel;

/// `t` as a dense tensor of `dtype` (f32, f16 or bf16; other dtypes give f32).
pub(super) fn dense_as(t: &Tensor, dtype: DType, path: &Path) -> Result<DenseTensor> {
    fn values<T: candle_core::WithDType>(t: &Tensor, dtype: DType) -> candle_core::Result<Vec<T>> {
        t.to_dtype(dtype)?.flatten_all()?.to_vec1::<T>()
    }
    let shape = IxDyn(t.dims());
    let bad_shape = |e: ndarray::ShapeError| file(path, e);
    Ok(match dtype {
        DType::BF16 => DenseTensor::BF16(
            ArrayD::from_shape_vec(shape, values(t, dtype).map_err(|e| file(path, e))?)
                .map_err(bad_shape)?,
        ),
        DType::F16 => DenseTensor::F16(
            ArrayD::from_shape_vec(shape, values(t, dtype).map_err(|e| file(path, e))?)
                .map_err(bad_shape)?,
        ),
        _ => DenseTensor::F32(
            ArrayD::from_shape_vec(shape, values(t, DType::F32).map_err(|e| file(path, e))?)
                .map_err(bad_shape)?,
        ),
    })
}

/// `stem -> (block, linear)` for every quantizable linear of `model`: the
/// checkpoint name of a linear is its block's name, a dot and its own name.
fn linear_stems<M: QuantizableModel>(model: &M) -> HashMap<String, (usize, String)> {
    let mut m = HashMap::new();
    for b in 0..model.num_blocks() {
        let name = model.block_name(b);
        for l in model.linear_groups(b).into_iter().flatten() {
            m.insert(format!("{name}.{}", l.name), (b, l.name));
        }
    }
    m
}

/// Writes every tensor of `tensors` (the parameters of `model` under their
/// checkpoint names) to `dir`: a linear of `model` that the pipeline
/// quantized is stored packed with its bias, anything else dense f32 under
/// its own name. `tokenizer`, when given, is saved as `tokenizer.json`.
/// `tick` counts the tensors, plus one for the write to disk.
pub(crate) fn write_checkpoint<M: QuantizableModel>(
    model: &M,
    config: Value,
    tensors: &[(String, Tensor)],
    quantized: &PipelineOutput,
    tokenizer: Option<&tokenizers::Tokenizer>,
    dir: &Path,
    tick: WriteTick<'_>,
) -> Result<()> {
    let dense = DenseStyle {
        dtype: DType::F32,
        extras: serde_json::Map::new(),
    };
    write_checkpoint_styled(
        model, config, tensors, quantized, tokenizer, dir, &dense, tick,
    )
}

/// Sees `(done, total)` as a checkpoint is encoded and written; an error
/// (e.g. [`vlmq::Error::Cancelled`]) stops the write before anything is on
/// disk.
pub(crate) type WriteTick<'a> = &'a mut dyn FnMut(usize, usize) -> Result<()>;

/// A tick that ignores the counts.
pub(crate) fn ignore_writes(_: usize, _: usize) -> Result<()> {
    Ok(())
}

/// How [`write_checkpoint_styled`] stores what is not packed: the dtype of
/// the dense tensors and extra `quantization_config` keys.
pub(crate) struct DenseStyle {
    pub dtype: DType,
    pub extras: serde_json::Map<String, Value>,
}

/// [`write_checkpoint`] with the dense tensors in `style.dtype` and
/// `style.extras` added to the quantization config.
// The checkpoint's parts and its progress: one call site per family.
#[allow(clippy::too_many_arguments)]
pub(crate) fn write_checkpoint_styled<M: QuantizableModel>(
    model: &M,
    config: Value,
    tensors: &[(String, Tensor)],
    quantized: &PipelineOutput,
    tokenizer: Option<&tokenizers::Tokenizer>,
    dir: &Path,
    style: &DenseStyle,
    tick: WriteTick<'_>,
) -> Result<()> {
    // Every tensor handled, then the write of the encoded files.
    let total = tensors.len() + 1;
    let stems = linear_stems(model);
    let is_quantized = |stem: &str| {
        stems
            .get(stem)
            .filter(|(b, l)| quantized.weights.contains_key(&(*b, l.clone())))
    };
    let by_name: HashMap<&str, &Tensor> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut w = CheckpointWriter::new()
        .with_model_config(config)
        .with_config_extras(style.extras.clone());
    for (i, (name, t)) in tensors.iter().enumerate() {
        tick(i, total)?;
        if let Some(stem) = name.strip_suffix(".weight") {
            if let Some((b, l)) = is_quantized(stem) {
                let q = quantized.weights[&(*b, l.clone())].clone();
                let bias = by_name
                    .get(format!("{stem}.bias").as_str())
                    .map(|bt| dense_as(bt, style.dtype, dir))
                    .transpose()?;
                w.add_layer(stem, q, bias)?;
                continue;
            }
        }
        // Biases of quantized layers were written with their layer.
        if name
            .strip_suffix(".bias")
            .is_some_and(|stem| is_quantized(stem).is_some())
        {
            continue;
        }
        w.add_tensor(name, dense_as(t, style.dtype, dir)?)?;
    }
    if let Some(tk) = tokenizer {
        // Part of the same directory replacement as the weights, so a
        // killed write never leaves a checkpoint without its tokenizer.
        let p = dir.join("tokenizer.json");
        let text = tk.to_string(false).map_err(|e| file(&p, e))?;
        w.add_file("tokenizer.json", text.into_bytes())?;
    }
    tick(tensors.len(), total)?;
    w.write(dir)?;
    tick(total, total)
}

/// Sets every linear of `model` that the checkpoint in `dir` stores packed
/// to the weight `[out, in]` the packed kernel computes (recovered by running
/// [`vlmq::PackedLinear`] on the identity, bias subtracted). Returns how many
/// linears were read; none is an error.
pub(crate) fn read_checkpoint<M: QuantizableModel>(model: &mut M, dir: &Path) -> Result<usize> {
    let ckpt = Checkpoint::open(dir)?;
    let mut n = 0;
    for (stem, (b, lin)) in linear_stems(model) {
        if !ckpt.names().contains(&stem.as_str()) {
            continue;
        }
        let packed = ckpt.packed_linear(&stem)?;
        let eye = Array2::<f32>::eye(packed.in_features());
        // forward(I) = I W^T (+ b): subtract the bias to get W^T.
        let mut wt = packed.forward(eye.view())?;
        if let Some(bias) = packed.bias() {
            wt -= &bias;
        }
        model.set_linear_weight(b, &lin, wt.t())?;
        n += 1;
    }
    if n == 0 {
        return Err(Error::CorruptCheckpoint {
            path: dir.to_path_buf(),
            reason: "no quantized linear of this model in the checkpoint".into(),
        });
    }
    Ok(n)
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
    write_gptq_counted(
        model,
        quantized,
        tokenizer,
        dir.as_ref(),
        &mut ignore_writes,
    )
}

/// The whole-checkpoint writers take every dense tensor from the model's
/// memory: a model whose weights stay on disk has only its final norm
/// there, so writing it whole is refused instead of leaving tensors out.
pub(crate) fn refuse_streamed(model: &LlamaModel) -> Result<()> {
    if model.is_streamed() {
        return Err(Error::Unsupported {
            what: "writing a whole checkpoint of a model whose weights stay on disk \
                   (Residency::Disk)"
                .into(),
            remedy: "write it block by block with export::ShardedGptqWriter, or load it \
                     with Residency::Memory"
                .into(),
        });
    }
    Ok(())
}

/// [`write_gptq`], counted by `tick`.
pub(crate) fn write_gptq_counted(
    model: &LlamaModel,
    quantized: &PipelineOutput,
    tokenizer: Option<&tokenizers::Tokenizer>,
    dir: &Path,
    tick: WriteTick<'_>,
) -> Result<()> {
    refuse_streamed(model)?;
    let mut cfg = model.config().to_hf_json();
    cfg["torch_dtype"] = "float32".into();
    let tensors = model.weights().named_tensors();
    write_checkpoint(model, cfg, &tensors, quantized, tokenizer, dir, tick)
}

/// Reads a checkpoint written by [`write_gptq`] back into `model`: every
/// quantized linear goes through [`vlmq::PackedLinear`] (its weight is
/// recovered by running the packed kernel on the identity), so the model then
/// computes with exactly what the checkpoint stores. Returns how many linears were read.
pub fn load_gptq_into(model: &mut LlamaModel, dir: impl AsRef<Path>) -> Result<usize> {
    read_checkpoint(model, dir.as_ref())
}
