//! Writing GPTQ checkpoints: `model.safetensors`, `quantize_config.json` and
//! the `quantization_config` block of `config.json`, each atomically.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::path::Path;

use half::f16;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::Value;

use crate::config::GptqConfig;
use crate::digest::digest_hex;

use super::digests::add_digests;
use crate::error::{Error, Result};
use crate::fsutil::{write_dir_atomic_hooked, Step};
use crate::lock::DirLock;
use crate::quant::QuantizedWeight;
use crate::solver::Method;

use super::bits::{check_checkpoint_bits, words_for};
use super::config_json::{CheckpointFormat, QuantizeConfig};
use super::file_tensor::FileTensor;
use super::layer_encode::{encode_layer, record_settings};
use super::tensor::DenseTensor;

/// Suffixes of the tensors that make up one quantized layer.
pub(crate) const LAYER_SUFFIXES: [&str; 5] = ["qweight", "qzeros", "scales", "g_idx", "bias"];

/// Collects quantized layers and passthrough tensors, then writes a GPTQ
/// checkpoint directory.
///
/// All quantized layers must share bit width, symmetry and group size (the
/// format has one checkpoint-wide config); the group size is the one the
/// weights carry (it need not divide the input width). `desc_act` is
/// inferred: true when any layer's `g_idx` is not the in-order assignment
/// `i / group_size`.
#[derive(Debug, Clone, Default)]
pub struct CheckpointWriter {
    format: Option<CheckpointFormat>,
    static_groups: bool,
    asymmetric_v1: bool,
    pub(super) omit_digests: bool,
    settings: Option<(GptqConfig, Method)>,
    model_config: Option<Value>,
    extras: serde_json::Map<String, Value>,
    pub(super) layers: Vec<(String, QuantizedWeight, Option<DenseTensor>)>,
    pub(super) tensors: Vec<(String, DenseTensor)>,
    pub(super) file_tensors: Vec<(String, FileTensor)>,
    names: BTreeSet<String>,
    files: Vec<(String, Vec<u8>)>,
}

/// The files the writer itself produces.
const OWN_FILES: [&str; 3] = ["model.safetensors", "quantize_config.json", "config.json"];

impl CheckpointWriter {
    /// An empty writer with the automatic format: v2 (`gptq_v2`) when the
    /// layers are asymmetric, v1 (`gptq`) when they are symmetric. Format v1
    /// for asymmetric layers is refused unless
    /// [`CheckpointWriter::with_asymmetric_v1`] allows it.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `model.safetensors` records a digest of every tensor's bytes
    /// (default `true`): FNV-1a 64 of the little-endian data, as one JSON
    /// object under the header metadata key [`TENSOR_DIGESTS_KEY`](super::TENSOR_DIGESTS_KEY); the
    /// reader verifies each tensor it reads against it. `false` omits them,
    /// e.g. to reproduce another tool's file byte for byte.
    pub fn with_tensor_digests(mut self, digests: bool) -> Self {
        self.omit_digests = !digests;
        self
    }

    /// Forces a zero-point format instead of the automatic choice.
    pub fn with_format(mut self, format: CheckpointFormat) -> Self {
        self.format = Some(format);
        self
    }

    /// Records `static_groups` in the config (metadata only). The config
    /// also says `static_groups` when any layer's weight was solved with
    /// static groups ([`QuantizedWeight::static_groups`]).
    pub fn with_static_groups(mut self, static_groups: bool) -> Self {
        self.static_groups = static_groups;
        self
    }

    /// Allows format v1 for asymmetric layers (it is refused otherwise). The
    /// tensors are then exactly what GPTQModel writes (zero points of 0
    /// included, through the word-wise borrow), but the Python loaders accept
    /// such a file only when its `meta.quantizer` names GPTQModel: use this to
    /// reproduce an existing checkpoint, not for new ones.
    pub fn with_asymmetric_v1(mut self, allow: bool) -> Self {
        self.asymmetric_v1 = allow;
        self
    }

    /// Records the settings of the solve that produced the layers (damping,
    /// block size, act-order, static groups, MSE clip search, group-fitting
    /// rule, scale precision, method) in the config's `meta` block.
    pub fn with_solve_settings(mut self, cfg: &GptqConfig, method: Method) -> Self {
        self.static_groups |= cfg.static_groups();
        self.settings = Some((*cfg, method));
        self
    }

    /// Adds model-specific keys to the quantization config (both
    /// `quantize_config.json` and `config.json -> quantization_config`),
    /// e.g. which blocks a loader converts and which modules stay dense.
    /// A key the writer sets itself (`bits`, `format`, `meta`, ...) is
    /// refused by [`write`](Self::write) before anything is written (an
    /// [`Error::InvalidField`] naming `quantize_config.json` and the key),
    /// so an extra can never contradict the layers.
    pub fn with_config_extras(mut self, extras: serde_json::Map<String, Value>) -> Self {
        self.extras = extras;
        self
    }

    /// The model's own `config.json` object, into which the
    /// `quantization_config` block is inserted. Without it, an existing
    /// `config.json` in the target directory is updated, or a new one holding
    /// only the block is created.
    pub fn with_model_config(mut self, config: Value) -> Self {
        self.model_config = Some(config);
        self
    }

    pub(super) fn claim(&mut self, names: &[String]) -> Result<()> {
        for n in names {
            if n.is_empty()
                || self.names.contains(n)
                || names.iter().filter(|m| *m == n).count() > 1
            {
                return Err(Error::InvalidConfig {
                    field: "tensor name",
                    value: format!("{n:?}"),
                    reason: "tensor names must be non-empty and unique",
                });
            }
        }
        self.names.extend(names.iter().cloned());
        Ok(())
    }

    /// Adds a quantized linear layer stored as `name.qweight`, `name.qzeros`,
    /// `name.scales`, `name.g_idx` and, when given, `name.bias` (a 1-D tensor
    /// of `out_features` values, stored in its own dtype).
    pub fn add_layer(
        &mut self,
        name: &str,
        weight: QuantizedWeight,
        bias: Option<DenseTensor>,
    ) -> Result<()> {
        if name.is_empty() {
            return Err(Error::InvalidConfig {
                field: "layer name",
                value: "\"\"".into(),
                reason: "a quantized layer needs a non-empty name",
            });
        }
        let bits = weight.bits();
        check_checkpoint_bits(bits)?;
        let (out, inp) = (weight.out_features(), weight.in_features());
        if words_for(inp, bits).is_none() || words_for(out, bits).is_none() || inp == 0 || out == 0
        {
            return Err(Error::Unencodable {
                what: format!("layer {name:?} [{out}, {inp}] at {} bits", bits.get()),
                reason: "input and output features times bits must be positive multiples of 32"
                    .into(),
            });
        }
        if let Some(b) = &bias {
            if b.shape() != [out] {
                return Err(Error::shape(format!("bias of {name:?}"), &[out], b.shape()));
            }
        }
        if let Some(((g, o), s)) = weight
            .scales()
            .indexed_iter()
            .find(|(_, &s)| f16::from_f32(s).to_f32() != s)
        {
            return Err(Error::Unencodable {
                what: format!("scale {s} at [{g}, {o}] of {name:?}"),
                reason: "scales are stored as f16 and this value is not representable".into(),
            });
        }
        let mut names: Vec<String> = LAYER_SUFFIXES[..4]
            .iter()
            .map(|s| format!("{name}.{s}"))
            .collect();
        if bias.is_some() {
            names.push(format!("{name}.bias"));
        }
        self.claim(&names)?;
        self.layers.push((name.to_string(), weight, bias));
        Ok(())
    }

    /// Adds an unquantized tensor that is stored unchanged. Names ending in
    /// `.qweight` or `.qzeros` are refused: a reader would take them for a
    /// quantized layer's tensors.
    pub fn add_tensor(&mut self, name: &str, tensor: DenseTensor) -> Result<()> {
        self.check_dense_name(name)?;
        self.claim(&[name.to_string()])?;
        self.tensors.push((name.to_string(), tensor));
        Ok(())
    }

    /// Refuses a dense tensor's name that a reader would take for part of
    /// a quantized layer.
    pub(super) fn check_dense_name(&self, name: &str) -> Result<()> {
        if name.ends_with(".qweight") || name.ends_with(".qzeros") {
            return Err(Error::InvalidConfig {
                field: "tensor name",
                value: format!("{name:?}"),
                reason: "names ending in .qweight or .qzeros are reserved for quantized layers",
            });
        }
        Ok(())
    }

    /// Adds a file (e.g. `tokenizer.json`) that is written into the
    /// checkpoint directory together with the checkpoint's own files, in the
    /// same all-or-nothing replacement: a run killed while writing never
    /// leaves a checkpoint without it. The name must be a plain file name
    /// other than the writer's own files and not given before.
    pub fn add_file(&mut self, name: &str, bytes: Vec<u8>) -> Result<()> {
        let plain = !name.is_empty()
            && name != "."
            && name != ".."
            && !name.contains(['/', '\\'])
            && !OWN_FILES.contains(&name)
            && !self.files.iter().any(|(n, _)| n == name);
        if !plain {
            return Err(Error::InvalidConfig {
                field: "file name",
                value: format!("{name:?}"),
                reason: "an extra checkpoint file needs a plain, unique name other than \
                         model.safetensors, quantize_config.json and config.json",
            });
        }
        self.files.push((name.to_string(), bytes));
        Ok(())
    }

    /// The checkpoint-wide config these layers imply, or the reason they
    /// cannot share one (mixed bit widths, symmetry or group sizes, or an
    /// asymmetric v1 request without [`CheckpointWriter::with_asymmetric_v1`]).
    pub fn quantize_config(&self) -> Result<QuantizeConfig> {
        let Some((_, first, _)) = self.layers.first() else {
            return Err(Error::Empty {
                what: "quantized layers of the checkpoint".into(),
            });
        };
        let (bits, sym) = (first.bits(), first.symmetric());
        let group_size = first.group_size();
        let mut desc_act = false;
        let mut static_groups = self.static_groups;
        for (name, w, _) in &self.layers {
            if w.bits() != bits || w.symmetric() != sym {
                return Err(mixed(name, "bit width and symmetry"));
            }
            if w.group_size() != group_size {
                return Err(mixed(name, "group size"));
            }
            desc_act |= w.contiguous_group_size().is_none();
            static_groups |= w.static_groups();
        }
        let format = self.format.unwrap_or(if sym {
            CheckpointFormat::V1
        } else {
            CheckpointFormat::V2
        });
        if format == CheckpointFormat::V1 && !sym && !self.asymmetric_v1 {
            return Err(Error::Unencodable {
                what: "an asymmetric checkpoint in format v1 (gptq)".into(),
                reason: "the Python loaders refuse asymmetric v1 checkpoints that GPTQModel did \
                         not write; write format v2 (gptq_v2, the default for asymmetric layers)"
                    .into(),
            });
        }
        Ok(QuantizeConfig {
            bits,
            group_size,
            desc_act,
            sym,
            static_groups,
            format,
        })
    }

    /// Writes `model.safetensors`, `quantize_config.json`, `config.json` and
    /// the files given to [`add_file`](Self::add_file) into `dir` and returns
    /// the config written.
    ///
    /// All or nothing: every file is built and checked in memory first (the
    /// model config must be a JSON object), then written with
    /// [`write_dir_atomic`](crate::fsutil::write_dir_atomic) into a new
    /// sibling directory, flushed, and swapped in by renames; the other files
    /// of an existing `dir` are carried over. After an error `dir` is the
    /// complete old checkpoint (or absent); after success the complete new
    /// one. Peak memory is about twice the file size (the tensors and the
    /// serialized file).
    pub fn write(&self, dir: impl AsRef<Path>) -> Result<QuantizeConfig> {
        self.write_hooked(dir.as_ref(), &mut |_| Ok(()))
    }

    /// [`write`](Self::write) with a failure-injection hook.
    pub(crate) fn write_hooked(
        &self,
        dir: &Path,
        hook: &mut dyn FnMut(Step<'_>) -> Result<()>,
    ) -> Result<QuantizeConfig> {
        let _lock = DirLock::output_dir(dir)?;
        let config = self.quantize_config()?;
        let qc = self.config_json(&config, dir)?;
        let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        for (name, w, bias) in &self.layers {
            encode_layer(name, w, bias.as_ref(), &config, &mut owned)?;
        }
        for (name, t) in &self.tensors {
            owned.push((name.clone(), t.dtype(), t.shape().to_vec(), t.to_le_bytes()));
        }
        for (name, t) in &self.file_tensors {
            owned.push((name.clone(), t.dtype(), t.shape().to_vec(), t.read_all()?));
        }
        let target = dir.join("model.safetensors");
        let mut views = Vec::with_capacity(owned.len());
        for (name, dtype, shape, bytes) in &owned {
            let v =
                TensorView::new(*dtype, shape.clone(), bytes).map_err(|e| Error::Safetensors {
                    path: target.clone(),
                    reason: format!("{name}: {e}"),
                })?;
            views.push((name.as_str(), v));
        }
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        let mut model_bytes =
            safetensors::serialize(views, Some(meta)).map_err(|e| Error::Safetensors {
                path: target.clone(),
                reason: e.to_string(),
            })?;
        if !self.omit_digests {
            let digests: BTreeMap<&str, String> = owned
                .iter()
                .map(|(name, _, _, bytes)| (name.as_str(), digest_hex(bytes)))
                .collect();
            model_bytes = add_digests(&model_bytes, &digests, &target)?;
        }
        drop(owned);
        let (qc_bytes, config_bytes) = self.config_files(&qc, dir)?;
        let mut files: Vec<(&str, &[u8])> = vec![
            (OWN_FILES[0], &model_bytes),
            (OWN_FILES[1], &qc_bytes),
            (OWN_FILES[2], &config_bytes),
        ];
        files.extend(self.files.iter().map(|(n, b)| (n.as_str(), b.as_slice())));
        write_dir_atomic_hooked(dir, &files, hook)?;
        Ok(config)
    }
}

impl CheckpointWriter {
    /// The quantization config object: the layers' settings, the solve's
    /// (when recorded) and the extras, which may not replace a key the
    /// writer sets (an error naming `dir/quantize_config.json` and the key).
    pub(super) fn config_json(&self, config: &QuantizeConfig, dir: &Path) -> Result<Value> {
        let mut qc = config.to_json();
        if let Some((cfg, method)) = &self.settings {
            record_settings(&mut qc, cfg, *method);
        }
        if let Some(obj) = qc.as_object_mut() {
            for (k, v) in &self.extras {
                if obj.contains_key(k) {
                    return Err(Error::field(
                        dir.join("quantize_config.json"),
                        k.as_str(),
                        "set by the writer from the layers; an extra key may not replace it",
                    ));
                }
                obj.insert(k.clone(), v.clone());
            }
        }
        Ok(qc)
    }
}

impl CheckpointWriter {
    /// The bytes of `quantize_config.json` and `config.json` for the
    /// quantization config object `qc`: the model config given to
    /// [`with_model_config`](Self::with_model_config), else `dir`'s existing
    /// `config.json`, else an empty object, with `quantization_config`
    /// inserted.
    pub(super) fn config_files(&self, qc: &Value, dir: &Path) -> Result<(Vec<u8>, Vec<u8>)> {
        let qc_bytes = json_bytes(&dir.join("quantize_config.json"), qc)?;
        let config_path = dir.join("config.json");
        let mut model = match &self.model_config {
            Some(v) => v.clone(),
            None if config_path.exists() => {
                let text =
                    fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
                serde_json::from_str(&text).map_err(|e| Error::Json {
                    path: config_path.clone(),
                    reason: e.to_string(),
                })?
            }
            None => Value::Object(Default::default()),
        };
        let obj = model.as_object_mut().ok_or_else(|| Error::Json {
            path: config_path.clone(),
            reason: "the model config is not a JSON object".into(),
        })?;
        obj.insert("quantization_config".into(), qc.clone());
        let config_bytes = json_bytes(&config_path, &model)?;
        Ok((qc_bytes, config_bytes))
    }
}

fn mixed(name: &str, what: &str) -> Error {
    Error::Unencodable {
        what: format!("layer {name:?}"),
        reason: format!(
            "its {what} differs from the other layers; a GPTQ checkpoint has one config"
        ),
    }
}

/// Pretty JSON with a final newline.
fn json_bytes(path: &Path, value: &Value) -> Result<Vec<u8>> {
    let mut text = serde_json::to_vec_pretty(value).map_err(|e| Error::Json {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    text.push(b'\n');
    Ok(text)
}
