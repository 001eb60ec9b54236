//! Reading GPTQ checkpoints from a memory-mapped `model.safetensors`.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use half::f16;
use memmap2::Mmap;
use ndarray::{Array1, Array2};
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};
use crate::quant::QuantizedWeight;

use super::bits::{qzeros_v1_to_v2, unpack_qweight, unpack_qzeros};
use super::checkpoint_write::LAYER_SUFFIXES;
use super::config_json::{read_config, CheckpointFormat, QuantizeConfig};
use super::digests::{check_digest, read_digests};
use super::packed_linear::PackedLinear;
use super::tensor::DenseTensor;

mod index;

use index::LayerShape;

/// A raw, zero-copy view of one stored tensor.
#[derive(Debug, Clone, Copy)]
pub struct RawTensor<'a> {
    /// The safetensors dtype.
    pub dtype: Dtype,
    /// The shape.
    pub shape: &'a [usize],
    /// Little-endian row-major bytes, borrowed from the memory map.
    pub data: &'a [u8],
}

/// An opened GPTQ checkpoint directory (single-file `model.safetensors`).
///
/// Opening maps the file, parses the safetensors header, reads the config
/// (`quantize_config.json`, or `config.json -> quantization_config`; when
/// both exist they must agree) and checks every quantized layer's tensor
/// dtypes and shapes against each other and the config. Tensor contents
/// (`g_idx` ranges, finite scales, symmetric zero points) are checked when a
/// layer is decoded.
#[derive(Debug)]
pub struct Checkpoint {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    meta: Metadata,
    config: QuantizeConfig,
    layers: BTreeMap<String, LayerShape>,
    passthrough: Vec<String>,
    /// Digest of each tensor's bytes, when the file records them.
    digests: Option<BTreeMap<String, String>>,
}

impl Checkpoint {
    /// Opens and validates the checkpoint in `dir`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let config = read_config(dir)?;
        let path = dir.join("model.safetensors");
        let file = fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        let len = file.metadata().map_err(|e| Error::io(&path, e))?.len();
        if len < 8 {
            return Err(corrupt(
                &path,
                format!("file is {len} bytes, shorter than the 8-byte header length"),
            ));
        }
        // SAFETY: the map is read-only; like every memory-mapped reader we
        // require that the file is not modified while the checkpoint is open.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        let (header, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| Error::Safetensors {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let mut ck = Checkpoint {
            data_start: 8 + header,
            path,
            mmap,
            meta,
            config,
            layers: BTreeMap::new(),
            passthrough: Vec::new(),
            digests: None,
        };
        ck.digests = read_digests(&ck.meta, &ck.path)?;
        ck.index_layers()?;
        Ok(ck)
    }

    /// The checkpoint-wide quantization config.
    pub fn config(&self) -> &QuantizeConfig {
        &self.config
    }

    /// Names of the quantized layers, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.layers.keys().map(String::as_str).collect()
    }

    /// Names of the passthrough (unquantized) tensors, sorted.
    pub fn tensor_names(&self) -> Vec<&str> {
        self.passthrough.iter().map(String::as_str).collect()
    }

    fn owning_layer<'a>(&self, name: &'a str) -> Option<&'a str> {
        let (prefix, suffix) = name.rsplit_once('.')?;
        (LAYER_SUFFIXES.contains(&suffix) && self.layers.contains_key(prefix)).then_some(prefix)
    }

    fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.meta
            .info(name)
            .ok_or_else(|| Error::MissingTensor { name: name.into() })
    }

    /// A zero-copy view of any stored tensor, quantized parts included.
    pub fn raw(&self, name: &str) -> Result<RawTensor<'_>> {
        let info = self.info(name)?;
        let (s, e) = info.data_offsets;
        let data = self
            .data_start
            .checked_add(s)
            .zip(self.data_start.checked_add(e))
            .and_then(|(a, b)| self.mmap.get(a..b))
            .ok_or_else(|| corrupt(&self.path, format!("tensor {name:?} lies outside the file")))?;
        if let Some(d) = &self.digests {
            check_digest(d, name, data, &self.path)?;
        }
        Ok(RawTensor {
            dtype: info.dtype,
            shape: &info.shape,
            data,
        })
    }

    /// A passthrough tensor (F32, F16 or BF16) in its stored dtype.
    pub fn tensor(&self, name: &str) -> Result<DenseTensor> {
        let r = self.raw(name)?;
        DenseTensor::from_le_bytes(name, r.dtype, r.shape, r.data).map_err(|e| self.locate(e))
    }

    /// The bias of quantized layer `name`, if it has one.
    pub fn bias(&self, name: &str) -> Result<Option<DenseTensor>> {
        self.shape_of(name)?;
        let key = format!("{name}.bias");
        if self.meta.info(&key).is_none() {
            return Ok(None);
        }
        self.tensor(&key).map(Some)
    }

    fn shape_of(&self, name: &str) -> Result<LayerShape> {
        self.layers
            .get(name)
            .copied()
            .ok_or_else(|| Error::MissingTensor {
                name: format!("{name}.qweight"),
            })
    }

    fn locate(&self, e: Error) -> Error {
        match e {
            Error::CorruptCheckpoint { reason, .. } => corrupt(&self.path, reason),
            other => other,
        }
    }

    fn i32_array(&self, name: &str, rows: usize, cols: usize) -> Result<Array2<i32>> {
        let r = self.raw(name)?;
        let v: Vec<i32> = r
            .data
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Array2::from_shape_vec((rows, cols), v)
            .map_err(|e| corrupt(&self.path, format!("{name}: {e}")))
    }

    /// Decodes quantized layer `name` into codes, true zero points, f32
    /// scales and `g_idx`, checking the contents against the config.
    pub fn layer(&self, name: &str) -> Result<QuantizedWeight> {
        let s = self.shape_of(name)?;
        let bits = self.config.bits;
        let b = bits.get() as usize;
        let qweight = self.i32_array(&format!("{name}.qweight"), s.inp * b / 32, s.out)?;
        let codes = unpack_qweight(qweight.view(), bits)?;
        let mut qzeros = self.i32_array(&format!("{name}.qzeros"), s.groups, s.out * b / 32)?;
        if self.config.format == CheckpointFormat::V1 {
            qzeros_v1_to_v2(&mut qzeros, bits)?;
        }
        let zeros = unpack_qzeros(qzeros.view(), bits)?;
        let scales_raw = self.raw(&format!("{name}.scales"))?;
        let scales: Vec<f32> = scales_raw
            .data
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect();
        let scales = Array2::from_shape_vec((s.groups, s.out), scales)
            .map_err(|e| corrupt(&self.path, format!("{name}.scales: {e}")))?;
        let cols = self.config.group_size.columns_for(s.inp)?;
        let in_order = |i: usize| i / cols;
        let g_idx: Vec<u32> = if s.has_g_idx {
            let raw = self.raw(&format!("{name}.g_idx"))?;
            let mut v = Vec::with_capacity(s.inp);
            for (i, c) in raw.data.chunks_exact(4).enumerate() {
                let g = i32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                if g < 0 || g as usize >= s.groups {
                    return Err(corrupt(
                        &self.path,
                        format!(
                            "{name}.g_idx[{i}] = {g} is not a group index below {}",
                            s.groups
                        ),
                    ));
                }
                if !self.config.desc_act && g as usize != in_order(i) {
                    return Err(corrupt(
                        &self.path,
                        format!(
                            "{name}.g_idx[{i}] = {g} but desc_act is false (expected {})",
                            in_order(i)
                        ),
                    ));
                }
                v.push(g as u32);
            }
            v
        } else {
            (0..s.inp).map(|i| in_order(i) as u32).collect()
        };
        if self.config.sym {
            let mid = 1u8 << (b - 1);
            if let Some(((g, o), z)) = zeros.indexed_iter().find(|(_, &z)| z != mid) {
                return Err(corrupt(
                    &self.path,
                    format!("{name}: sym is true but zero point [{g}, {o}] is {z}, not {mid}"),
                ));
            }
        }
        let weight = QuantizedWeight::grouped(
            bits,
            self.config.sym,
            self.config.group_size,
            codes,
            scales,
            zeros,
            g_idx,
        )
        .map_err(|e| match e {
            Error::NonFinite { index, .. } => corrupt(
                &self.path,
                format!("{name}.scales has a non-finite value at {index:?}"),
            ),
            other => other,
        })?;
        Ok(weight.with_static_groups(self.config.static_groups))
    }

    /// Decodes layer `name` with its bias into a [`PackedLinear`]. The codes
    /// pass through an unpacked `[out, in]` byte array on the way (freed
    /// before returning).
    pub fn packed_linear(&self, name: &str) -> Result<PackedLinear> {
        let w = self.layer(name)?;
        let bias = match self.bias(name)? {
            Some(t) => {
                let v = t.to_f32();
                Some(Array1::from_iter(v.iter().copied()))
            }
            None => None,
        };
        PackedLinear::new(&w, bias)
    }
}

/// A `CorruptCheckpoint` error for the file at `path`.
fn corrupt(path: &Path, reason: String) -> Error {
    Error::CorruptCheckpoint {
        path: path.to_path_buf(),
        reason,
    }
}
