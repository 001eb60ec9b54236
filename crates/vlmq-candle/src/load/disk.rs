//! Safetensors tensors read from disk when asked for: each shard's header is
//! parsed once at open time, and a tensor's bytes are read (one positioned
//! read) only when the model needs that tensor, or only some of its rows
//! (an embedding lookup reads the rows of the batch's token ids).
//!
//! The files are read rather than memory-mapped on purpose: the pages of a
//! mapping count towards the resident set for as long as the mapping lives,
//! so a mapped checkpoint's RSS grows with every block the run has touched,
//! while bytes read into a buffer are freed with the tensor built from them.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use vlmq::pack::FileTensor;
use vlmq::{Error, Result};

use crate::error::file;
use crate::load::hf::safetensors_files;
use crate::models::llama::weights::TensorSource;

/// Largest header a shard may declare (the format's own limit is 100 MB).
const MAX_HEADER: u64 = 100_000_000;

/// Where one tensor's bytes are.
#[derive(Debug, Clone)]
struct Entry {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    start: u64,
    len: usize,
}

/// Every tensor of a directory's safetensors shards, by name, left on disk.
#[derive(Debug)]
pub(crate) struct DiskTensors {
    files: Vec<PathBuf>,
    entries: HashMap<String, Entry>,
    device: Device,
}

fn dtype_of(code: &str) -> Option<DType> {
    match code {
        "F32" => Some(DType::F32),
        "F16" => Some(DType::F16),
        "BF16" => Some(DType::BF16),
        "F64" => Some(DType::F64),
        _ => None,
    }
}

/// Parses one shard's header into `entries` (the shard is `files[index]`).
fn read_header(path: &Path, index: usize, entries: &mut HashMap<String, Entry>) -> Result<()> {
    let bad = |reason: String| Error::Safetensors {
        path: path.to_path_buf(),
        reason,
    };
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let size = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|e| Error::io(path, e))?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER || 8 + n > size {
        return Err(bad(format!("header length {n} in a file of {size} bytes")));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| Error::io(path, e))?;
    let header: Value =
        serde_json::from_slice(&header).map_err(|e| bad(format!("header is not JSON: {e}")))?;
    let map = header
        .as_object()
        .ok_or_else(|| bad("header is not a JSON object".into()))?;
    let data_start = 8 + n;
    for (name, info) in map {
        if name == "__metadata__" {
            continue;
        }
        let field = |key: &str| {
            info.get(key)
                .ok_or_else(|| bad(format!("tensor {name:?} has no {key}")))
        };
        let code = field("dtype")?.as_str().unwrap_or_default();
        let dtype = dtype_of(code).ok_or_else(|| {
            bad(format!(
                "tensor {name:?}: dtype {code:?} (expected F32, F16, BF16 or F64)"
            ))
        })?;
        let shape: Vec<usize> = field("shape")?
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|d| d.as_u64())
                    .map(|d| d as usize)
                    .collect()
            })
            .unwrap_or_default();
        let offsets: Vec<u64> = field("data_offsets")?
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_u64).collect())
            .unwrap_or_default();
        let [a, b] = offsets[..] else {
            return Err(bad(format!(
                "data_offsets of {name:?} are not two integers"
            )));
        };
        let want = shape
            .iter()
            .try_fold(dtype.size_in_bytes(), |acc, &d| acc.checked_mul(d));
        let end = data_start.checked_add(b);
        if b < a || want != Some((b - a) as usize) || end.is_none_or(|e| e > size) {
            return Err(bad(format!(
                "tensor {name:?}: bytes [{a}, {b}) do not hold {code} {shape:?} inside the file"
            )));
        }
        let entry = Entry {
            file: index,
            dtype,
            shape,
            start: data_start + a,
            len: (b - a) as usize,
        };
        if entries.insert(name.clone(), entry).is_some() {
            return Err(bad(format!(
                "tensor {name:?} appears in more than one shard"
            )));
        }
    }
    Ok(())
}

impl DiskTensors {
    /// Reads the headers of a directory's shards (those named by
    /// `model.safetensors.index.json`, or `model.safetensors`).
    pub(crate) fn open(dir: &Path, device: &Device) -> Result<Self> {
        let files = safetensors_files(dir)?;
        let mut entries = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            read_header(f, i, &mut entries)?;
        }
        Ok(DiskTensors {
            files,
            entries,
            device: device.clone(),
        })
    }

    /// The stored dtype of `name`, when present.
    pub(crate) fn dtype(&self, name: &str) -> Option<DType> {
        self.entries.get(name).map(|e| e.dtype)
    }

    /// The stored shape of `name`, when present.
    pub(crate) fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.entries.get(name).map(|e| e.shape.clone())
    }

    /// Reads `name` in its stored dtype; `Ok(None)` when absent.
    pub(crate) fn read(&self, name: &str) -> Result<Option<Tensor>> {
        let Some(e) = self.entries.get(name) else {
            return Ok(None);
        };
        let path = &self.files[e.file];
        let mut bytes = vec![0u8; e.len];
        let mut f = File::open(path).map_err(|err| Error::io(path, err))?;
        f.seek(SeekFrom::Start(e.start))
            .and_then(|_| f.read_exact(&mut bytes))
            .map_err(|err| Error::io(path, err))?;
        Tensor::from_raw_buffer(&bytes, e.dtype, &e.shape, &self.device)
            .map(Some)
            .map_err(|err| file(path, format!("tensor {name:?}: {err}")))
    }
}

impl DiskTensors {
    /// Rows `ids` of the 2-D tensor `name` in its stored dtype, one
    /// positioned read per row; `Ok(None)` when absent.
    pub(crate) fn read_rows(&self, name: &str, ids: &[u32]) -> Result<Option<Tensor>> {
        let Some(e) = self.entries.get(name) else {
            return Ok(None);
        };
        let path = &self.files[e.file];
        let bad = |reason: String| Error::Safetensors {
            path: path.clone(),
            reason: format!("tensor {name:?}: {reason}"),
        };
        let [rows, width] = e.shape[..] else {
            return Err(bad(format!("rows asked of a {}-D tensor", e.shape.len())));
        };
        if let Some(id) = ids.iter().find(|&&id| id as usize >= rows) {
            return Err(bad(format!("row {id} asked of {rows} rows")));
        }
        // The header check made `len` the product of the shape and the
        // element size, so a row is `len / rows` bytes.
        let row = e.len / rows.max(1);
        let mut bytes = vec![0u8; ids.len() * row];
        let mut f = File::open(path).map_err(|err| Error::io(path, err))?;
        for (&id, out) in ids.iter().zip(bytes.chunks_exact_mut(row.max(1))) {
            f.seek(SeekFrom::Start(e.start + id as u64 * row as u64))
                .and_then(|_| f.read_exact(out))
                .map_err(|err| Error::io(path, err))?;
        }
        Tensor::from_raw_buffer(&bytes, e.dtype, &[ids.len(), width], &self.device)
            .map(Some)
            .map_err(|err| file(path, format!("tensor {name:?}: {err}")))
    }
}

impl TensorSource for DiskTensors {
    fn rows(&mut self, name: &str, ids: &[u32], dtype: DType) -> Result<Option<Tensor>> {
        let Some(t) = self.read_rows(name, ids)? else {
            return Ok(None);
        };
        let path = &self.files[self.entries[name].file];
        t.to_dtype(dtype).map(Some).map_err(|e| file(path, e))
    }

    fn get(&mut self, name: &str, dtype: DType) -> Result<Option<Tensor>> {
        let Some(t) = self.read(name)? else {
            return Ok(None);
        };
        let path = &self.files[self.entries[name].file];
        t.to_dtype(dtype).map(Some).map_err(|e| file(path, e))
    }

    fn stored_dtype(&self, name: &str) -> Option<DType> {
        self.dtype(name)
    }

    fn file_tensor(&self, name: &str) -> Result<Option<FileTensor>> {
        let Some(e) = self.entries.get(name) else {
            return Ok(None);
        };
        let dtype = match e.dtype {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            _ => return Ok(None),
        };
        FileTensor::new(&self.files[e.file], e.start, dtype, &e.shape).map(Some)
    }
}
