//! Writing GGUF (version 3) files: metadata, tensor directory and aligned
//! tensor data, little-endian; and requantizing a GGUF model with layers
//! solved by vlmq onto GGUF block types.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;
use vlmq::solver::GgufSolution;
use vlmq::{Error, Result};

use crate::error::file;

/// Alignment of the tensor data section and of every tensor in it (the
/// format's default; written as `general.alignment`).
pub const ALIGNMENT: usize = 32;

/// One tensor to write: its name, shape (row-major, `[rows, cols]` for a
/// matrix, as candle and PyTorch write shapes), ggml type id and bytes.
#[derive(Debug, Clone)]
pub struct GgufTensor {
    /// llama.cpp's tensor name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Row-major shape; written innermost first, as GGUF stores it.
    pub dims: Vec<usize>,
    /// ggml type id (0 f32, 1 f16, or [`GgufType::ggml_id`](vlmq::quant::gguf::GgufType::ggml_id)).
    pub ggml_type: u32,
    /// The packed data.
    pub data: Vec<u8>,
}

impl GgufTensor {
    /// An f32 tensor.
    pub fn f32(name: &str, dims: Vec<usize>, values: &[f32]) -> Self {
        GgufTensor {
            name: name.to_string(),
            dims,
            ggml_type: 0,
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    /// A solved layer as packed blocks (`[out, in]`).
    pub fn solved(name: &str, sol: &GgufSolution) -> Result<Self> {
        Ok(GgufTensor {
            name: name.to_string(),
            dims: vec![sol.codes.nrows(), sol.codes.ncols()],
            ggml_type: sol.ty.ggml_id(),
            data: sol.pack()?,
        })
    }
}

/// ggml's type id of a candle block type.
pub(crate) fn ggml_id(dtype: GgmlDType) -> u32 {
    match dtype {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

/// Writes a GGUF v3 file atomically: the metadata in the given order (plus
/// `general.alignment` when absent), then the tensor directory, then every
/// tensor's data at a multiple of [`ALIGNMENT`].
pub fn write_gguf(path: &Path, metadata: &[(String, Value)], tensors: &[GgufTensor]) -> Result<()> {
    let mut out = Vec::new();
    let has_alignment = metadata.iter().any(|(k, _)| k == "general.alignment");
    out.extend_from_slice(b"GGUF");
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&((metadata.len() + usize::from(!has_alignment)) as u64).to_le_bytes());
    for (key, value) in metadata {
        put_string(&mut out, key);
        put_value(&mut out, value, key, path)?;
    }
    if !has_alignment {
        put_string(&mut out, "general.alignment");
        put_value(
            &mut out,
            &Value::U32(ALIGNMENT as u32),
            "general.alignment",
            path,
        )?;
    }
    let mut offset = 0usize;
    for t in tensors {
        put_string(&mut out, &t.name);
        out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for &d in t.dims.iter().rev() {
            out.extend_from_slice(&(d as u64).to_le_bytes());
        }
        out.extend_from_slice(&t.ggml_type.to_le_bytes());
        out.extend_from_slice(&(offset as u64).to_le_bytes());
        offset += t.data.len().next_multiple_of(ALIGNMENT);
    }
    out.resize(out.len().next_multiple_of(ALIGNMENT), 0);
    for t in tensors {
        out.extend_from_slice(&t.data);
        out.resize(out.len().next_multiple_of(ALIGNMENT), 0);
    }
    vlmq::write_file_atomic(path, &out)
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// GGUF's value type id.
fn type_id(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_value(out: &mut Vec<u8>, v: &Value, key: &str, path: &Path) -> Result<()> {
    out.extend_from_slice(&type_id(v).to_le_bytes());
    put_payload(out, v, key, path)
}

fn put_payload(out: &mut Vec<u8>, v: &Value, key: &str, path: &Path) -> Result<()> {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => put_string(out, s),
        Value::Array(items) => {
            let elem = items.first().map_or(4, type_id);
            if items
                .iter()
                .any(|i| type_id(i) != elem || matches!(i, Value::Array(_)))
            {
                return Err(file(
                    path,
                    format!("metadata {key:?}: GGUF arrays hold one scalar type"),
                ));
            }
            out.extend_from_slice(&elem.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for i in items {
                put_payload(out, i, key, path)?;
            }
        }
    }
    Ok(())
}

/// llama.cpp's converter row order for q/k projections, applied to packed
/// rows: within each head, row `j * hd/2 + i` (HF's halves) moves to row
/// `2 i + j` (pairs). Rows are independent blocks, so the bytes move whole.
pub fn permute_packed_rows(data: &[u8], rows: usize, heads: usize) -> Result<Vec<u8>> {
    if heads == 0 || !rows.is_multiple_of(2 * heads) || !data.len().is_multiple_of(rows.max(1)) {
        return Err(Error::shape(
            "q/k rows (per head pairs)",
            &[2 * heads],
            &[rows],
        ));
    }
    let row_bytes = data.len() / rows;
    let hd = rows / heads;
    let mut out = vec![0u8; data.len()];
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..hd / 2 {
                let src = h * hd + j * (hd / 2) + i;
                let dst = h * hd + 2 * i + j;
                out[dst * row_bytes..(dst + 1) * row_bytes]
                    .copy_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
            }
        }
    }
    Ok(out)
}

/// Writes `dst`: the GGUF model `src` with the weights named in `solved`
/// (llama.cpp names, solutions in HF row order) replaced by their packed
/// blocks; every other tensor and all metadata are copied as they are.
/// For the `llama` architecture the q/k rows get llama.cpp's converter
/// order back (the loader undoes it when reading).
pub fn requantize_gguf(
    src: &Path,
    dst: &Path,
    solved: &HashMap<String, GgufSolution>,
) -> Result<()> {
    let header = crate::load::gguf::read_gguf_content(src)?;
    if let Some(name) = solved
        .keys()
        .find(|n| !header.tensor_infos.contains_key(*n))
    {
        return Err(Error::MissingTensor {
            name: format!("{name} (solved, not in {})", src.display()),
        });
    }
    requantize_gguf_with(src, dst, |name, q, order| {
        let Some(sol) = solved.get(name) else {
            return Ok(None);
        };
        let dims = q.shape().dims();
        let rows = sol.codes.nrows();
        if [rows, sol.codes.ncols()] != dims[..] {
            return Err(Error::shape(
                format!("solution for {name}"),
                dims,
                &[rows, sol.codes.ncols()],
            ));
        }
        let mut t = GgufTensor::solved(name, sol)?;
        if let Some(h) = order.llama_cpp_heads {
            t.data = permute_packed_rows(&t.data, rows, h)?;
        }
        Ok(Some(t))
    })
}

/// The row order of a source tensor, as [`requantize_gguf_with`] tells its
/// callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowOrder {
    /// `Some(heads)` for the q/k weights of the `llama` architecture, whose
    /// rows the file holds in llama.cpp's converter order (HF row `j hd/2 +
    /// i` of a head is row `2 i + j`); a replacement computed in HF order
    /// must be put back with [`permute_packed_rows`].
    pub llama_cpp_heads: Option<usize>,
}

/// Writes `dst`: the GGUF model `src` with any tensor replaced by what
/// `replace(name, tensor, order)` returns (`Ok(None)` copies it as it is),
/// its metadata copied; tensors keep the source's order.
pub fn requantize_gguf_with(
    src: &Path,
    dst: &Path,
    mut replace: impl FnMut(&str, &QTensor, RowOrder) -> Result<Option<GgufTensor>>,
) -> Result<()> {
    let mut reader = BufReader::new(File::open(src).map_err(|e| file(src, e))?);
    let content = Content::read(&mut reader).map_err(|e| file(src, e))?;
    let arch = match content.metadata.get("general.architecture") {
        Some(Value::String(a)) => a.clone(),
        _ => return Err(file(src, "metadata general.architecture missing")),
    };
    let heads = |key: &str| -> Option<usize> {
        match content.metadata.get(&format!("{arch}.attention.{key}")) {
            Some(Value::U32(v)) => Some(*v as usize),
            Some(Value::U64(v)) => Some(*v as usize),
            Some(Value::I32(v)) => usize::try_from(*v).ok(),
            _ => None,
        }
    };
    let q_heads = heads("head_count");
    let k_heads = heads("head_count_kv").or(q_heads);
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort_by_key(|n| content.tensor_infos[*n].offset);
    let mut tensors = Vec::with_capacity(names.len());
    for name in names {
        let q = content
            .tensor(&mut reader, name, &Device::Cpu)
            .map_err(|e| file(src, format!("tensor {name:?}: {e}")))?;
        let order = RowOrder {
            llama_cpp_heads: match name.as_str() {
                n if arch == "llama" && n.ends_with("attn_q.weight") => q_heads,
                n if arch == "llama" && n.ends_with("attn_k.weight") => k_heads,
                _ => None,
            },
        };
        let tensor = match replace(name, &q, order)? {
            Some(t) => t,
            None => GgufTensor {
                name: name.clone(),
                dims: q.shape().dims().to_vec(),
                ggml_type: ggml_id(q.dtype()),
                data: q.data().map_err(|e| file(src, e))?.into_owned(),
            },
        };
        tensors.push(tensor);
    }
    let mut metadata: Vec<(String, Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    metadata.sort_by(|a, b| a.0.cmp(&b.0));
    write_gguf(dst, &metadata, &tensors)
}
