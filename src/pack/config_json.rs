//! `quantize_config.json` and the `quantization_config` block of `config.json`.

use std::fs;
use std::path::Path;

use serde_json::{json, Map, Value};

use crate::config::{Bits, GroupSize};
use crate::error::{Error, Result};

use super::bits::check_checkpoint_bits;

/// How zero points are stored in `qzeros`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CheckpointFormat {
    /// `checkpoint_format: "gptq"`: zero - 1 is stored (word-wise for 2, 4 and
    /// 8 bits, field-wise for 3 bits). Cannot represent a zero point of 0
    /// for loaders that undo the offset field by field.
    V1,
    /// `checkpoint_format: "gptq_v2"`: the true zero point is stored.
    V2,
}

impl CheckpointFormat {
    /// The string the Python ecosystem uses for this format.
    pub fn as_str(self) -> &'static str {
        match self {
            CheckpointFormat::V1 => "gptq",
            CheckpointFormat::V2 => "gptq_v2",
        }
    }

    /// Parses `"gptq"` or `"gptq_v2"`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "gptq" => Some(CheckpointFormat::V1),
            "gptq_v2" => Some(CheckpointFormat::V2),
            _ => None,
        }
    }
}

/// The checkpoint-wide quantization settings the Python loaders read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantizeConfig {
    /// Bit width (2, 3, 4 or 8).
    pub bits: Bits,
    /// Group size (`-1` on disk for per channel).
    pub group_size: GroupSize,
    /// Act-order: `g_idx` may assign input columns to groups out of order.
    pub desc_act: bool,
    /// Symmetric grid (every zero point is `2^(bits-1)`).
    pub sym: bool,
    /// Groups fitted on the original weight before the solve.
    pub static_groups: bool,
    /// How zero points are stored.
    pub format: CheckpointFormat,
}

/// Name of the tool recorded in `meta.quantizer`.
const QUANTIZER: &str = concat!("vlmq:", env!("CARGO_PKG_VERSION"));

impl QuantizeConfig {
    /// The JSON object written as `quantize_config.json` and as
    /// `config.json -> quantization_config`.
    pub fn to_json(&self) -> Value {
        json!({
            "quant_method": "gptq",
            "method": "gptq",
            "bits": self.bits.get(),
            "group_size": self.group_size.to_gptq(),
            "desc_act": self.desc_act,
            "sym": self.sym,
            "static_groups": self.static_groups,
            "lm_head": false,
            "checkpoint_format": self.format.as_str(),
            "format": self.format.as_str(),
            "pack_dtype": "int32",
            "meta": {
                "quantizer": [QUANTIZER],
                "static_groups": self.static_groups,
            },
        })
    }

    /// Parses and checks a config object; `path` names the file in errors.
    ///
    /// Required: `quant_method: "gptq"`, `bits` in {2, 3, 4, 8}, `group_size`
    /// (`-1` or positive), `desc_act` and `sym` booleans. Optional:
    /// `checkpoint_format` / `format` (must agree; default `"gptq"`),
    /// `static_groups` (top level or in `meta`, default false) and
    /// `pack_dtype` (must be `"int32"`).
    pub fn from_json(value: &Value, path: &Path) -> Result<Self> {
        let bad = |reason: String| Error::Json {
            path: path.to_path_buf(),
            reason,
        };
        let obj = value
            .as_object()
            .ok_or_else(|| bad("the quantization config is not a JSON object".into()))?;
        match obj.get("quant_method").and_then(Value::as_str) {
            Some("gptq") => {}
            other => {
                return Err(bad(format!(
                    "quant_method must be \"gptq\", found {other:?}"
                )))
            }
        }
        let bits = obj
            .get("bits")
            .and_then(Value::as_u64)
            .ok_or_else(|| bad("bits must be a non-negative integer".into()))?;
        let bits = Bits::new(u32::try_from(bits).unwrap_or(u32::MAX))
            .and_then(|b| check_checkpoint_bits(b).map(|()| b))
            .map_err(|e| bad(format!("bits: {e}")))?;
        let group_size = obj
            .get("group_size")
            .and_then(Value::as_i64)
            .ok_or_else(|| bad("group_size must be an integer".into()))?;
        let group_size =
            GroupSize::from_gptq(group_size).map_err(|e| bad(format!("group_size: {e}")))?;
        let flag = |key: &str| -> Result<bool> {
            obj.get(key)
                .and_then(Value::as_bool)
                .ok_or_else(|| bad(format!("{key} must be a boolean")))
        };
        let desc_act = flag("desc_act")?;
        let sym = flag("sym")?;
        let static_groups = optional_bool(obj, "static_groups", path)?
            .or(match obj.get("meta").and_then(Value::as_object) {
                Some(meta) => optional_bool(meta, "static_groups", path)?,
                None => None,
            })
            .unwrap_or(false);
        let format = parse_format(obj, "checkpoint_format", path)?;
        let alias = parse_format(obj, "format", path)?;
        let format = match (format, alias) {
            (Some(a), Some(b)) if a != b => {
                return Err(bad(format!(
                    "checkpoint_format {:?} and format {:?} disagree",
                    a.as_str(),
                    b.as_str()
                )))
            }
            (Some(a), _) | (None, Some(a)) => a,
            (None, None) => CheckpointFormat::V1,
        };
        if let Some(p) = obj.get("pack_dtype") {
            if p.as_str() != Some("int32") {
                return Err(bad(format!("pack_dtype must be \"int32\", found {p}")));
            }
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
}

fn optional_bool(obj: &Map<String, Value>, key: &str, path: &Path) -> Result<Option<bool>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(Error::Json {
            path: path.to_path_buf(),
            reason: format!("{key} must be a boolean, found {other}"),
        }),
    }
}

fn parse_format(
    obj: &Map<String, Value>,
    key: &str,
    path: &Path,
) -> Result<Option<CheckpointFormat>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_str()
            .and_then(CheckpointFormat::parse)
            .map(Some)
            .ok_or_else(|| Error::Json {
                path: path.to_path_buf(),
                reason: format!("{key} must be \"gptq\" or \"gptq_v2\", found {v}"),
            }),
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

/// The checkpoint config of directory `dir`: `quantize_config.json`, or
/// `config.json -> quantization_config`; when both exist they must agree.
pub(super) fn read_config(dir: &Path) -> Result<QuantizeConfig> {
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
