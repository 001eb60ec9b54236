//! Unquantized tensors that pass through a checkpoint in their own dtype.

use half::{bf16, f16};
use ndarray::{ArrayD, IxDyn};
use safetensors::Dtype;

use crate::error::{Error, Result};

/// A dense floating-point tensor stored unchanged in a checkpoint
/// (embeddings, norms, heads, biases).
#[derive(Debug, Clone, PartialEq)]
pub enum DenseTensor {
    /// 32-bit floats (`F32`).
    F32(ArrayD<f32>),
    /// IEEE half precision (`F16`).
    F16(ArrayD<f16>),
    /// bfloat16 (`BF16`).
    BF16(ArrayD<bf16>),
}

impl DenseTensor {
    /// The shape.
    pub fn shape(&self) -> &[usize] {
        match self {
            DenseTensor::F32(a) => a.shape(),
            DenseTensor::F16(a) => a.shape(),
            DenseTensor::BF16(a) => a.shape(),
        }
    }

    /// The safetensors dtype name (`"F32"`, `"F16"` or `"BF16"`).
    pub fn dtype_name(&self) -> &'static str {
        match self {
            DenseTensor::F32(_) => "F32",
            DenseTensor::F16(_) => "F16",
            DenseTensor::BF16(_) => "BF16",
        }
    }

    /// The values widened to `f32` (exact for every dtype).
    pub fn to_f32(&self) -> ArrayD<f32> {
        match self {
            DenseTensor::F32(a) => a.clone(),
            DenseTensor::F16(a) => a.mapv(f16::to_f32),
            DenseTensor::BF16(a) => a.mapv(bf16::to_f32),
        }
    }

    pub(crate) fn dtype(&self) -> Dtype {
        match self {
            DenseTensor::F32(_) => Dtype::F32,
            DenseTensor::F16(_) => Dtype::F16,
            DenseTensor::BF16(_) => Dtype::BF16,
        }
    }

    /// Little-endian bytes in row-major order.
    pub(crate) fn to_le_bytes(&self) -> Vec<u8> {
        match self {
            DenseTensor::F32(a) => a.iter().flat_map(|v| v.to_le_bytes()).collect(),
            DenseTensor::F16(a) => a.iter().flat_map(|v| v.to_le_bytes()).collect(),
            DenseTensor::BF16(a) => a.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    /// Decodes little-endian `bytes` of `dtype` with `shape`.
    pub(crate) fn from_le_bytes(
        name: &str,
        dtype: Dtype,
        shape: &[usize],
        bytes: &[u8],
    ) -> Result<Self> {
        let n: usize = shape.iter().product();
        let width = match dtype {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            other => {
                return Err(Error::DtypeMismatch {
                    name: name.to_string(),
                    expected: "F32, F16 or BF16".into(),
                    actual: format!("{other:?}"),
                })
            }
        };
        if bytes.len() != n * width {
            return Err(Error::CorruptCheckpoint {
                path: Default::default(),
                reason: format!(
                    "tensor {name:?} holds {} bytes, expected {}",
                    bytes.len(),
                    n * width
                ),
            });
        }
        let sh = IxDyn(shape);
        let shape_err = |e: ndarray::ShapeError| Error::CorruptCheckpoint {
            path: Default::default(),
            reason: format!("tensor {name:?}: {e}"),
        };
        Ok(match dtype {
            Dtype::F32 => {
                let v = bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                DenseTensor::F32(ArrayD::from_shape_vec(sh, v).map_err(shape_err)?)
            }
            Dtype::F16 => {
                let v = bytes
                    .chunks_exact(2)
                    .map(|c| f16::from_le_bytes([c[0], c[1]]))
                    .collect();
                DenseTensor::F16(ArrayD::from_shape_vec(sh, v).map_err(shape_err)?)
            }
            _ => {
                let v = bytes
                    .chunks_exact(2)
                    .map(|c| bf16::from_le_bytes([c[0], c[1]]))
                    .collect();
                DenseTensor::BF16(ArrayD::from_shape_vec(sh, v).map_err(shape_err)?)
            }
        })
    }
}

impl From<ArrayD<f32>> for DenseTensor {
    fn from(a: ArrayD<f32>) -> Self {
        DenseTensor::F32(a)
    }
}

impl From<ArrayD<f16>> for DenseTensor {
    fn from(a: ArrayD<f16>) -> Self {
        DenseTensor::F16(a)
    }
}

impl From<ArrayD<bf16>> for DenseTensor {
    fn from(a: ArrayD<bf16>) -> Self {
        DenseTensor::BF16(a)
    }
}
