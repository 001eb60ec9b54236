//! Reading GPTQ checkpoints from a memory-mapped `model.safetensors`.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use half::f16;
use memmap2::Mmap;
use ndarray::{Array1, Array2};
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use crate::config::Bits;
use crate::error::{Error, Result};
use crate::quant::QuantizedWeight;

use super::bits::{qzeros_v1_to_v2, unpack_qweight, unpack_qzeros, values_for, words_for};
use super::checkpoint_write::LAYER_SUFFIXES;
use super::config_json::{CheckpointFormat, QuantizeConfig};
use super::digests::{check_digest, read_digests};
use super::packed_linear::PackedLinear;
use super::tensor::DenseTensor;

/// Shape facts of one quantized layer, checked when the checkpoint is opened.
#[derive(Debug, Clone, Copy)]
struct LayerShape {
    out: usize,
    inp: usize,
    groups: usize,
    has_g_idx: bool,
}

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

    fn index_layers(&mut self) -> Result<()> {
        let bits = self.config.bits;
        let b = bits.get() as usize;
        let mut layers = BTreeMap::new();
        let names: Vec<String> = self.meta.tensors().into_keys().collect();
        for n in &names {
            if let Some(prefix) = n.strip_suffix(".qweight") {
                let s = self.check_layer(prefix, bits, b)?;
                layers.insert(prefix.to_string(), s);
            }
        }
        for n in &names {
            if let Some(prefix) = n.strip_suffix(".qzeros") {
                if !layers.contains_key(prefix) {
                    return Err(corrupt(
                        &self.path,
                        format!("{n:?} has no matching {prefix}.qweight"),
                    ));
                }
            }
        }
        self.layers = layers;
        let mut passthrough: Vec<String> = names
            .into_iter()
            .filter(|n| self.owning_layer(n).is_none())
            .collect();
        passthrough.sort();
        self.passthrough = passthrough;
        Ok(())
    }

    fn expect(&self, name: &str, dtypes: &[Dtype], shape: Option<&[usize]>) -> Result<&TensorInfo> {
        let info = self.info(name)?;
        if !dtypes.contains(&info.dtype) {
            return Err(Error::DtypeMismatch {
                name: name.into(),
                expected: format!("{dtypes:?}"),
                actual: format!("{:?}", info.dtype),
            });
        }
        if let Some(s) = shape {
            if info.shape != s {
                return Err(Error::shape(name, s, &info.shape));
            }
        }
        Ok(info)
    }

    fn check_layer(&self, name: &str, bits: Bits, b: usize) -> Result<LayerShape> {
        let qw = self.expect(&format!("{name}.qweight"), &[Dtype::I32], None)?;
        let [rows, out] = qw.shape[..] else {
            return Err(corrupt(
                &self.path,
                format!("{name}.qweight must be 2-D, has shape {:?}", qw.shape),
            ));
        };
        let inp = values_for(rows, bits).ok_or_else(|| {
            corrupt(
                &self.path,
                format!("{name}.qweight has {rows} rows, not a whole number of {b}-bit inputs"),
            )
        })?;
        let zcols = words_for(out, bits).ok_or_else(|| {
            corrupt(
                &self.path,
                format!("{name}: {out} outputs at {b} bits do not fill whole qzeros words"),
            )
        })?;
        if inp == 0 || out == 0 {
            return Err(corrupt(&self.path, format!("{name}.qweight is empty")));
        }
        let groups = self.config.group_size.groups_for(inp)?;
        self.expect(
            &format!("{name}.qzeros"),
            &[Dtype::I32],
            Some(&[groups, zcols]),
        )?;
        self.expect(
            &format!("{name}.scales"),
            &[Dtype::F16],
            Some(&[groups, out]),
        )?;
        let has_g_idx = self.meta.info(&format!("{name}.g_idx")).is_some();
        if has_g_idx {
            self.expect(&format!("{name}.g_idx"), &[Dtype::I32], Some(&[inp]))?;
        } else if self.config.desc_act {
            return Err(Error::MissingTensor {
                name: format!("{name}.g_idx"),
            });
        }
        if self.meta.info(&format!("{name}.bias")).is_some() {
            self.expect(
                &format!("{name}.bias"),
                &[Dtype::F16, Dtype::BF16, Dtype::F32],
                Some(&[out]),
            )?;
        }
        Ok(LayerShape {
            out,
            inp,
            groups,
            has_g_idx,
        })
    }
}

fn corrupt(path: &Path, reason: String) -> Error {
    Error::CorruptCheckpoint {
        path: path.to_path_buf(),
        reason,
    }
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    match fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::Json {
                path: path.to_path_buf(),
                reason: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path, e)),
    }
}

fn read_config(dir: &Path) -> Result<QuantizeConfig> {
    let qpath = dir.join("quantize_config.json");
    let cpath = dir.join("config.json");
    let from_quantize = read_json(&qpath)?
        .map(|v| QuantizeConfig::from_json(&v, &qpath))
        .transpose()?;
    let from_model = match read_json(&cpath)? {
        Some(v) => {
            let obj = v.as_object().ok_or_else(|| Error::Json {
                path: cpath.clone(),
                reason: "config.json is not a JSON object".into(),
            })?;
            obj.get("quantization_config")
                .map(|q| QuantizeConfig::from_json(q, &cpath))
                .transpose()?
        }
        None => None,
    };
    match (from_quantize, from_model) {
        (Some(a), Some(b)) if a != b => Err(Error::Json {
            path: cpath,
            reason: format!("quantization_config {b:?} disagrees with quantize_config.json {a:?}"),
        }),
        (Some(a), _) | (None, Some(a)) => Ok(a),
        (None, None) => Err(Error::Json {
            path: qpath,
            reason: "no quantize_config.json and no quantization_config in config.json".into(),
        }),
    }
}
