//! Parameters to and from safetensors, by name (f32, f16 or bf16 on disk;
//! always f32 in memory).

use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};

use super::params::Module;
use vlmq::error::{Error, Result};

/// The on-disk dtype used when saving.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StoreDtype {
    /// 32-bit floats (lossless).
    #[default]
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    Bf16,
}

impl StoreDtype {
    fn dtype(self) -> Dtype {
        match self {
            StoreDtype::F32 => Dtype::F32,
            StoreDtype::F16 => Dtype::F16,
            StoreDtype::Bf16 => Dtype::BF16,
        }
    }

    fn encode(self, values: impl Iterator<Item = f32>, out: &mut Vec<u8>) {
        for v in values {
            match self {
                StoreDtype::F32 => out.extend_from_slice(&v.to_le_bytes()),
                StoreDtype::F16 => out.extend_from_slice(&f16::from_f32(v).to_le_bytes()),
                StoreDtype::Bf16 => out.extend_from_slice(&bf16::from_f32(v).to_le_bytes()),
            }
        }
    }
}

fn st_error(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Safetensors {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Serializes every parameter of `module` (see [`Module`]) as `dtype`.
pub fn save_safetensors_bytes(module: &dyn Module, dtype: StoreDtype) -> Result<Vec<u8>> {
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    module.visit_params("", &mut |name, t| {
        let mut bytes = Vec::with_capacity(t.len() * 4);
        dtype.encode(t.iter().copied(), &mut bytes);
        tensors.push((name.to_string(), t.shape().to_vec(), bytes));
    });
    let views = tensors
        .iter()
        .map(|(n, shape, b)| {
            safetensors::tensor::TensorView::new(dtype.dtype(), shape.clone(), b)
                .map(|v| (n.as_str(), v))
                .map_err(|e| st_error(Path::new(""), e))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize(views, None).map_err(|e| st_error(Path::new(""), e))
}

/// Writes every parameter of `module` to a safetensors file.
pub fn save_safetensors(
    module: &dyn Module,
    path: impl AsRef<Path>,
    dtype: StoreDtype,
) -> Result<()> {
    let path = path.as_ref();
    let bytes = save_safetensors_bytes(module, dtype)?;
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

/// Loads every parameter of `module` from safetensors bytes. Every parameter
/// must be present with the same shape and a float dtype (f32, f16 or bf16);
/// extra tensors are ignored. Nothing is modified unless every check passes.
pub fn load_safetensors_bytes(module: &mut dyn Module, bytes: &[u8]) -> Result<()> {
    load_from(module, bytes, PathBuf::new())
}

/// Loads every parameter of `module` from a safetensors file (see
/// [`load_safetensors_bytes`]).
pub fn load_safetensors(module: &mut dyn Module, path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    load_from(module, &bytes, path.to_path_buf())
}

fn decode(name: &str, dtype: Dtype, data: &[u8]) -> Result<Vec<f32>> {
    Ok(match dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => {
            return Err(Error::DtypeMismatch {
                name: name.to_string(),
                expected: "F32, F16 or BF16".into(),
                actual: format!("{other:?}"),
            })
        }
    })
}

fn load_from(module: &mut dyn Module, bytes: &[u8], path: PathBuf) -> Result<()> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| st_error(&path, e))?;
    let mut decoded: Vec<Vec<f32>> = Vec::new();
    let mut first_error: Option<Error> = None;
    module.visit_params("", &mut |name, t| {
        if first_error.is_some() {
            return;
        }
        let result = match st.tensor(name) {
            Err(_) => Err(Error::MissingTensor {
                name: name.to_string(),
            }),
            Ok(view) if view.shape() != t.shape() => Err(Error::shape(
                format!("tensor {name:?}"),
                t.shape(),
                view.shape(),
            )),
            Ok(view) => decode(name, view.dtype(), view.data()),
        };
        match result {
            Ok(v) => decoded.push(v),
            Err(e) => first_error = Some(e),
        }
    });
    if let Some(e) = first_error {
        return Err(e);
    }
    let mut values = decoded.into_iter();
    module.visit_params_mut("", &mut |_, mut t| {
        if let Some(v) = values.next() {
            for (dst, src) in t.iter_mut().zip(v) {
                *dst = src;
            }
        }
    });
    Ok(())
}
