//! Loader settings: where the model computes (device), in what dtype, and
//! whether its decoder layers are read into memory at load time or kept on
//! disk and materialized one block at a time.

use candle_core::{DType, Device};
use vlmq::{Error, Result};

/// Where the decoder layers live between uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Residency {
    /// Every tensor is read and converted to the compute dtype at load time
    /// (the model holds all of it; weights can be replaced and read back
    /// freely).
    #[default]
    Memory,
    /// Decoder layers stay in the checkpoint file in their source dtype (or
    /// GGUF quantization) and are materialized in the compute dtype one
    /// block at a time; a layer whose weights were replaced stays resident
    /// until [`vlmq::QuantizableModel::release_block`] drops it for good.
    /// The embedding and a separate LM head are held in their source dtype
    /// (GGUF: dequantized to the compute dtype). Peak memory is one block
    /// plus the embedding and head, whatever the number of blocks.
    Disk,
}

/// How to load a model: device, compute dtype and [`Residency`]; built
/// from [`LoadOptions::default`] (CPU, f32, in memory) with the `with_*`
/// setters, read with the getters.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub(crate) device: Device,
    pub(crate) dtype: DType,
    pub(crate) residency: Residency,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            device: Device::Cpu,
            dtype: DType::F32,
            residency: Residency::Memory,
        }
    }
}

impl LoadOptions {
    /// Where tensors are computed (`Device::Cpu`, or a CUDA device when
    /// vlmq-candle is built with the `cuda` feature).
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype blocks are computed in (F32 for quantization).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Whether decoder layers are read at load time or on demand.
    pub fn residency(&self) -> Residency {
        self.residency
    }

    /// Builder: the residency.
    pub fn with_residency(mut self, residency: Residency) -> Self {
        self.residency = residency;
        self
    }

    /// Builder: the compute dtype.
    pub fn with_dtype(mut self, dtype: DType) -> Self {
        self.dtype = dtype;
        self
    }

    /// Builder: the device.
    pub fn with_device(mut self, device: Device) -> Self {
        self.device = device;
        self
    }
}

/// The device named `name`: `cpu`, or `cuda` / `cuda:N` (needs the `cuda`
/// feature; without it, or without a GPU, an [`Error::Unsupported`]).
pub fn device_from_name(name: &str) -> Result<Device> {
    let ordinal = match name {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => Some(0),
        other => other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok()),
    };
    let Some(ordinal) = ordinal else {
        return Err(Error::InvalidConfig {
            field: "device",
            value: name.to_string(),
            reason: "the device is cpu, cuda or cuda:N",
        });
    };
    Device::new_cuda(ordinal).map_err(|e| Error::Unsupported {
        what: format!("device {name}"),
        remedy: format!("build vlmq-candle with the cuda feature on a machine with a GPU ({e})"),
    })
}

/// The dtype named `name`: `f32`, `f16`, `bf16` or `f64`.
pub fn dtype_from_name(name: &str) -> Result<DType> {
    match name {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        "f64" => Ok(DType::F64),
        _ => Err(Error::InvalidConfig {
            field: "dtype",
            value: name.to_string(),
            reason: "the compute dtype is f32, f16, bf16 or f64",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builders_set_what_the_getters_read() {
        let d = LoadOptions::default();
        assert_eq!((d.dtype(), d.residency()), (DType::F32, Residency::Memory));
        assert!(d.device().is_cpu());
        let o = d.with_dtype(DType::BF16).with_residency(Residency::Disk);
        assert_eq!((o.dtype(), o.residency()), (DType::BF16, Residency::Disk));
    }
}
