//! Loading a Hugging Face model directory: `config.json`, one
//! `model.safetensors` or several shards listed in
//! `model.safetensors.index.json`, and (separately) `tokenizer.json`.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::safetensors::{Load, SliceSafetensors};
use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use vlmq::{Error, Result};

use crate::error::{file, in_model_file};
use crate::load::disk::DiskTensors;
use crate::load::options::{LoadOptions, Residency};
use crate::load::progress::{ignore, total_bytes, LoadTick};
use crate::models::llama::config::LlamaConfig;
use crate::models::llama::model::LlamaModel;
use crate::models::llama::store::{LayerSource, StreamedLayers};
use crate::models::llama::weights::{check_directory, ModelWeights, TensorSource};

/// Reads and parses a JSON file (a missing file is an [`Error::Io`]).
pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Json {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// The safetensors files of a directory: the shards named by the index, or `model.safetensors`.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let v = read_json(&index)?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| Error::Json {
                path: index.clone(),
                reason: "no weight_map object".into(),
            })?;
        let mut files = BTreeSet::new();
        for (name, f) in map {
            let f = f.as_str().ok_or_else(|| Error::Json {
                path: index.clone(),
                reason: format!("weight_map entry of {name:?} is not a file name"),
            })?;
            files.insert(dir.join(f));
        }
        Ok(files.into_iter().collect())
    } else {
        Ok(vec![dir.join("model.safetensors")])
    }
}

/// Tensors by name, converted on request.
pub(crate) struct NamedTensors {
    pub(crate) tensors: HashMap<String, Tensor>,
    origin: HashMap<String, PathBuf>,
}

impl NamedTensors {
    /// Every tensor of a directory's safetensors files; `tick` sees the
    /// bytes read after each tensor, of the files' summed sizes, and ends
    /// at `done == total`.
    pub(crate) fn read_dir(dir: &Path, device: &Device, tick: LoadTick<'_>) -> Result<Self> {
        let mut src = NamedTensors {
            tensors: HashMap::new(),
            origin: HashMap::new(),
        };
        let files = safetensors_files(dir)?;
        for f in &files {
            if !f.exists() {
                return Err(Error::io(
                    f,
                    std::io::Error::new(std::io::ErrorKind::NotFound, "safetensors file not found"),
                ));
            }
        }
        let total = total_bytes(files.iter().map(PathBuf::as_path))?;
        tick(0, total)?;
        let mut files_done = 0u64;
        for f in files {
            let bytes = std::fs::read(&f).map_err(|e| file(&f, e))?;
            let st = SliceSafetensors::new(&bytes).map_err(|e| file(&f, e))?;
            let mut done = files_done;
            for (name, view) in st.tensors() {
                let t = view.load(device).map_err(|e| file(&f, e))?;
                src.origin.insert(name.clone(), f.clone());
                src.tensors.insert(name, t);
                done = done.saturating_add(view.data().len() as u64);
                tick(done.min(total), total)?;
            }
            // The file's header and padding count once it is read whole.
            files_done = files_done.saturating_add(bytes.len() as u64);
            tick(files_done.min(total), total)?;
        }
        Ok(src)
    }
}

impl TensorSource for NamedTensors {
    fn get(&mut self, name: &str, dtype: DType) -> Result<Option<Tensor>> {
        let Some(t) = self.tensors.remove(name) else {
            return Ok(None);
        };
        match t.dtype() {
            DType::F32 | DType::F16 | DType::BF16 | DType::F64 => {}
            other => {
                return Err(Error::DtypeMismatch {
                    name: name.to_string(),
                    expected: "f32, f16, bf16 or f64".into(),
                    actual: format!("{other:?}"),
                })
            }
        }
        let path = self.origin.get(name).cloned().unwrap_or_default();
        t.to_dtype(dtype).map(Some).map_err(|e| file(&path, e))
    }
}

/// Loads a Llama-family model from an HF directory, computing in `dtype`.
pub fn load_hf_dir(dir: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<LlamaModel> {
    let opts = LoadOptions::default()
        .with_dtype(dtype)
        .with_device(device.clone());
    load_hf_dir_with(dir, &opts)
}

/// Loads a Llama-family model from an HF directory with `opts`: with
/// [`Residency::Disk`] only the shards' headers and the final norm are read
/// at load time; a batch's embedding rows, the head and each decoder layer
/// are read and converted to `opts.dtype` when the model needs them.
pub fn load_hf_dir_with(dir: impl AsRef<Path>, opts: &LoadOptions) -> Result<LlamaModel> {
    load_hf_dir_counted(dir.as_ref(), opts, &mut ignore)
}

/// [`load_hf_dir_with`], the bytes read reported to `tick` (with
/// [`Residency::Disk`] once, at the end: only headers and the final norm
/// are read).
pub(crate) fn load_hf_dir_counted(
    dir: &Path,
    opts: &LoadOptions,
    tick: LoadTick<'_>,
) -> Result<LlamaModel> {
    let cfg_path = dir.join("config.json");
    let cfg = LlamaConfig::from_hf_json(&read_json(&cfg_path)?, &cfg_path)?;
    match opts.residency {
        Residency::Memory => {
            let mut src = NamedTensors::read_dir(dir, &opts.device, tick)?;
            let weights =
                ModelWeights::assemble(&cfg, &mut src, opts.dtype).map_err(in_model_file(dir))?;
            LlamaModel::new(cfg, weights)
        }
        Residency::Disk => {
            let mut src = DiskTensors::open(dir, &opts.device)?;
            check_directory(&cfg, |n| src.shape(n)).map_err(in_model_file(dir))?;
            let outer = ModelWeights::final_norm_only(&cfg, &mut src, opts.dtype)
                .map_err(in_model_file(dir))?;
            let layers =
                StreamedLayers::new(LayerSource::new(cfg.clone(), opts.dtype, Box::new(src)));
            let total = total_bytes(safetensors_files(dir)?.iter().map(PathBuf::as_path))?;
            tick(total, total)?;
            LlamaModel::streamed(cfg, outer, layers)
        }
    }
}

/// Writes `model` as an HF directory (`config.json` and one f32
/// `model.safetensors`); tokenizer files are the caller's.
pub fn save_hf_dir(model: &LlamaModel, dir: impl AsRef<Path>) -> Result<()> {
    let dir = dir.as_ref();
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let cfg = serde_json::to_string_pretty(&model.config().to_hf_json()).expect("json");
    let cp = dir.join("config.json");
    std::fs::write(&cp, cfg).map_err(|e| Error::io(&cp, e))?;
    let st = dir.join("model.safetensors");
    let mut map = HashMap::new();
    for (n, t) in model.weights().named_tensors() {
        map.insert(n, t.to_dtype(DType::F32).map_err(|e| file(&st, e))?);
    }
    candle_core::safetensors::save(&map, &st).map_err(|e| file(&st, e))
}
