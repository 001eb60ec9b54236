//! Loading a GPTQ checkpoint directory (as [`write_gptq`](crate::export::write_gptq)
//! writes it) back into a runnable [`LlamaModel`]: the passthrough tensors
//! as they are, each packed linear dequantized into its `.weight`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use vlmq::pack::DenseTensor;
use vlmq::{Checkpoint, Result};

use crate::error::file;
use crate::load::hf::read_json;
use crate::models::llama::config::LlamaConfig;
use crate::models::llama::model::LlamaModel;
use crate::models::llama::weights::{ModelWeights, TensorSource};

/// Whether `dir` holds a GPTQ checkpoint (a `quantize_config.json`).
pub fn is_gptq_dir(dir: &Path) -> bool {
    dir.join("quantize_config.json").is_file()
}

/// Reads the GPTQ checkpoint in `dir` (`config.json`, `model.safetensors`,
/// `quantize_config.json`) as a [`LlamaModel`] whose quantized linears
/// hold their dequantized weights; every tensor digest is verified.
pub fn load_gptq_dir(dir: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<LlamaModel> {
    let dir = dir.as_ref();
    let cfg_path = dir.join("config.json");
    let cfg = LlamaConfig::from_hf_json(&read_json(&cfg_path)?, &cfg_path)?;
    let ckpt = Checkpoint::open(dir)?;
    let st = dir.join("model.safetensors");
    let mut src = Tensors {
        map: HashMap::new(),
    };
    for name in ckpt.tensor_names() {
        let t = tensor(&ckpt.tensor(name)?, device).map_err(|e| file(&st, e))?;
        src.map.insert(name.to_string(), t);
    }
    for name in ckpt.names() {
        let w = ckpt.layer(name)?.dequantize();
        let (out, inp) = w.dim();
        let t = Tensor::from_vec(w.into_raw_vec_and_offset().0, (out, inp), device)
            .map_err(|e| file(&st, e))?;
        src.map.insert(format!("{name}.weight"), t);
        if let Some(b) = ckpt.bias(name)? {
            let t = tensor(&b, device).map_err(|e| file(&st, e))?;
            src.map.insert(format!("{name}.bias"), t);
        }
    }
    let weights = ModelWeights::assemble(&cfg, &mut src, dtype)?;
    LlamaModel::new(cfg, weights)
}

/// A stored tensor as an f32 candle tensor of the same shape.
fn tensor(t: &DenseTensor, device: &Device) -> candle_core::Result<Tensor> {
    let (shape, v): (Vec<usize>, Vec<f32>) = match t {
        DenseTensor::F32(a) => (a.shape().to_vec(), a.iter().copied().collect()),
        DenseTensor::F16(a) => (a.shape().to_vec(), a.iter().map(|x| x.to_f32()).collect()),
        DenseTensor::BF16(a) => (a.shape().to_vec(), a.iter().map(|x| x.to_f32()).collect()),
        #[allow(unreachable_patterns)]
        _ => candle_core::bail!("unsupported stored dtype"),
    };
    Tensor::from_vec(v, shape, device)
}

/// The checkpoint's tensors by HF name.
struct Tensors {
    map: HashMap<String, Tensor>,
}

impl TensorSource for Tensors {
    fn get(&mut self, name: &str, dtype: DType) -> Result<Option<Tensor>> {
        self.map
            .remove(name)
            .map(|t| t.to_dtype(dtype).map_err(|e| file(Path::new(name), e)))
            .transpose()
    }
}
