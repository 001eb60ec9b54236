//! Saved pipeline state: a run interrupted after block `b` resumes at `b + 1`.
//!
//! The state directory holds `manifest.json` (fingerprints of the model,
//! the calibration set and the configuration, and the number of completed
//! blocks) and, per completed block, `block_{b}.safetensors` (codes, scales,
//! zero points, g_idx of its layers) and `block_{b}.json` (their reports).
//! Every file is written under a temporary name and renamed into place, and
//! the manifest is updated last, so an interruption never leaves a block
//! half recorded. The manifest records a checksum (FNV-1a 64) of every block
//! file, verified when the block is loaded: a changed code, bit width or
//! report, or a truncated or emptied file, is an error naming the file. A
//! missing manifest while block files remain is an error too (not a silent
//! restart). The directory is locked ([`DirLock`]) while a run uses it.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use ndarray::Array2;
use safetensors::tensor::{Dtype, TensorView};

use super::block::SavedLayer;
use super::config::PipelineConfig;
use super::gguf::LayerCodes;
use super::report::LayerReport;
use super::report_json::{report_from_json, report_to_json};
use crate::backend::QuantizableModel;
use crate::config::Bits;
use crate::digest::{digest_hex, Fnv};
use crate::error::{Error, Result};
use crate::fsutil::write_atomic;
use crate::lock::DirLock;
use crate::quant::QuantizedWeight;

/// A saved block: its layers' quantized weights and their reports.
pub(crate) type SavedBlock = (Vec<(String, QuantizedWeight)>, Vec<LayerReport>);

/// The state of a resumable run.
pub(crate) struct RunState {
    dir: PathBuf,
    fingerprints: [(String, String); 3],
    completed: usize,
    /// Checksum of every block file of the completed blocks, by file name.
    checksums: BTreeMap<String, String>,
    /// One writer per state directory, for as long as the run lasts.
    _lock: DirLock,
}

/// The manifest's format version (2: with block-file checksums).
const MANIFEST_VERSION: u64 = 2;

/// The two files of block `b`.
fn block_files(b: usize) -> [String; 2] {
    [format!("block_{b}.safetensors"), format!("block_{b}.json")]
}

impl RunState {
    /// Opens (or creates) the state in `dir`, refusing a state written for
    /// another model, calibration set or configuration.
    pub(crate) fn open<M: QuantizableModel>(
        dir: &Path,
        model: &M,
        samples: &[M::Sample],
        cfg: &PipelineConfig,
    ) -> Result<Self> {
        let lock = DirLock::state_dir(dir)?;
        let fingerprints = [
            ("model".to_string(), model_fingerprint(model)?),
            (
                "calibration".to_string(),
                calibration_fingerprint(model, samples)?,
            ),
            ("configuration".to_string(), config_fingerprint(cfg)),
        ];
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let manifest = dir.join("manifest.json");
        let mut checksums = BTreeMap::new();
        let completed = if manifest.exists() {
            let text = fs::read_to_string(&manifest).map_err(|e| Error::io(&manifest, e))?;
            let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Json {
                path: manifest.clone(),
                reason: e.to_string(),
            })?;
            for (what, fp) in &fingerprints {
                let saved = json.get(what).and_then(|v| v.as_str()).unwrap_or("");
                if saved != fp {
                    return Err(Error::StateMismatch {
                        path: dir.to_path_buf(),
                        reason: format!("the saved state was written for a different {what}"),
                    });
                }
            }
            if json.get("version").and_then(|v| v.as_u64()) != Some(MANIFEST_VERSION) {
                return Err(Error::StateMismatch {
                    path: dir.to_path_buf(),
                    reason: format!(
                        "{} has another format version than {MANIFEST_VERSION} (a state \
                         without block checksums); remove the directory to start over",
                        manifest.display()
                    ),
                });
            }
            let completed = json
                .get("completed_blocks")
                .and_then(|v| v.as_u64())
                .and_then(|v| usize::try_from(v).ok())
                .ok_or_else(|| Error::Json {
                    path: manifest.clone(),
                    reason: "missing completed_blocks".into(),
                })?;
            let files = json.get("files").and_then(|v| v.as_object());
            for b in 0..completed.min(model.num_blocks()) {
                for file in block_files(b) {
                    let sum = files
                        .and_then(|f| f.get(&file))
                        .and_then(|v| v.as_str())
                        .ok_or_else(|| Error::Json {
                            path: manifest.clone(),
                            reason: format!("no checksum for {file}"),
                        })?;
                    checksums.insert(file, sum.to_string());
                }
            }
            completed
        } else {
            // No manifest: only a fresh directory may start from scratch.
            let leftover = fs::read_dir(dir)
                .map_err(|e| Error::io(dir, e))?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .find(|n| n.starts_with("block_"));
            if let Some(file) = leftover {
                return Err(Error::StateMismatch {
                    path: dir.to_path_buf(),
                    reason: format!(
                        "manifest.json is missing but block files remain ({file}); remove \
                         the directory to start over"
                    ),
                });
            }
            0
        };
        if completed > model.num_blocks() {
            return Err(Error::StateMismatch {
                path: dir.to_path_buf(),
                reason: format!(
                    "{completed} completed blocks but the model has {}",
                    model.num_blocks()
                ),
            });
        }
        let state = RunState {
            dir: dir.to_path_buf(),
            fingerprints,
            completed,
            checksums,
            _lock: lock,
        };
        state.write_manifest(completed)?;
        Ok(state)
    }

    /// Blocks already completed.
    pub(crate) fn completed_blocks(&self) -> usize {
        self.completed
    }

    fn write_manifest(&self, completed: usize) -> Result<()> {
        let mut json = serde_json::Map::new();
        for (k, v) in &self.fingerprints {
            json.insert(k.clone(), serde_json::Value::String(v.clone()));
        }
        json.insert("completed_blocks".into(), completed.into());
        json.insert("version".into(), MANIFEST_VERSION.into());
        let files: serde_json::Map<String, serde_json::Value> = self
            .checksums
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        json.insert("files".into(), files.into());
        let text = serde_json::Value::Object(json).to_string();
        write_atomic(&self.dir.join("manifest.json"), text.as_bytes())
    }

    /// Records block `b` as completed with its layers (GPTQ codes only: a
    /// GGUF run has no state directory, see `check_gguf_run`).
    pub(crate) fn save_block(&mut self, b: usize, layers: &[SavedLayer]) -> Result<()> {
        let mut tensors: Vec<(String, Vec<u8>, Dtype, Vec<usize>)> = Vec::new();
        let mut meta = HashMap::new();
        for (name, codes, _) in layers {
            let LayerCodes::Gptq(qw) = codes else {
                return Err(Error::Unsupported {
                    what: format!("saving the GGUF layer {name} to the state directory"),
                    remedy: "run GGUF output without a state directory".into(),
                });
            };
            meta.insert(format!("{name}.bits"), qw.bits().get().to_string());
            meta.insert(format!("{name}.symmetric"), qw.symmetric().to_string());
            let codes = qw.codes();
            tensors.push((
                format!("{name}.codes"),
                codes.iter().copied().collect(),
                Dtype::U8,
                codes.shape().to_vec(),
            ));
            let scales = qw.scales();
            tensors.push((
                format!("{name}.scales"),
                scales.iter().flat_map(|v| v.to_le_bytes()).collect(),
                Dtype::F32,
                scales.shape().to_vec(),
            ));
            let zeros = qw.zeros();
            tensors.push((
                format!("{name}.zeros"),
                zeros.iter().copied().collect(),
                Dtype::U8,
                zeros.shape().to_vec(),
            ));
            let g = qw.g_idx();
            tensors.push((
                format!("{name}.g_idx"),
                g.iter().flat_map(|v| v.to_le_bytes()).collect(),
                Dtype::U32,
                vec![g.len()],
            ));
        }
        let path = self.dir.join(format!("block_{b}.safetensors"));
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(n, data, dt, shape)| {
                TensorView::new(*dt, shape.clone(), data)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| Error::Safetensors {
                        path: path.clone(),
                        reason: format!("{n}: {e}"),
                    })
            })
            .collect::<Result<_>>()?;
        let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| Error::Safetensors {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        write_atomic(&path, &bytes)?;
        let reports: Vec<serde_json::Value> =
            layers.iter().map(|(_, _, r)| report_to_json(r)).collect();
        let json_path = self.dir.join(format!("block_{b}.json"));
        let json = serde_json::Value::Array(reports).to_string();
        write_atomic(&json_path, json.as_bytes())?;
        let [st_name, json_name] = block_files(b);
        self.checksums.insert(st_name, digest_hex(&bytes));
        self.checksums
            .insert(json_name, digest_hex(json.as_bytes()));
        self.completed = b + 1;
        self.write_manifest(self.completed)
    }

    /// A block file's bytes, checked against the manifest's checksum.
    fn read_checked(&self, path: &Path) -> Result<Vec<u8>> {
        let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let expected = self.checksums.get(&name).map(String::as_str);
        let actual = digest_hex(&bytes);
        if expected != Some(actual.as_str()) {
            return Err(Error::CorruptCheckpoint {
                path: path.to_path_buf(),
                reason: format!(
                    "resume state file {name} has checksum {actual}, the manifest records {}; \
                     the file changed after it was saved (remove the state directory to start \
                     over)",
                    expected.unwrap_or("none")
                ),
            });
        }
        Ok(bytes)
    }

    /// The layers and reports saved for block `b`.
    pub(crate) fn load_block(&self, b: usize) -> Result<SavedBlock> {
        let json_path = self.dir.join(format!("block_{b}.json"));
        let corrupt = |path: &Path, reason: String| Error::CorruptCheckpoint {
            path: path.to_path_buf(),
            reason,
        };
        let text = self.read_checked(&json_path)?;
        let text = String::from_utf8(text).map_err(|e| corrupt(&json_path, e.to_string()))?;
        let reports: Vec<serde_json::Value> =
            serde_json::from_str(&text).map_err(|e| corrupt(&json_path, e.to_string()))?;
        let reports: Vec<LayerReport> = reports
            .iter()
            .map(|v| {
                report_from_json(v)
                    .ok_or_else(|| corrupt(&json_path, "malformed layer report".into()))
            })
            .collect::<Result<_>>()?;
        let path = self.dir.join(format!("block_{b}.safetensors"));
        let bytes = self.read_checked(&path)?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| corrupt(&path, e.to_string()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| corrupt(&path, e.to_string()))?;
        let meta = header.metadata().clone().unwrap_or_default();
        let mut layers = Vec::new();
        for r in &reports {
            let name = &r.layer;
            let get = |suffix: &str, dtype: Dtype| -> Result<(Vec<u8>, Vec<usize>)> {
                let t = st
                    .tensor(&format!("{name}.{suffix}"))
                    .map_err(|e| corrupt(&path, e.to_string()))?;
                if t.dtype() != dtype {
                    return Err(corrupt(
                        &path,
                        format!("{name}.{suffix} has dtype {:?}", t.dtype()),
                    ));
                }
                Ok((t.data().to_vec(), t.shape().to_vec()))
            };
            let bits: u32 = meta
                .get(&format!("{name}.bits"))
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| corrupt(&path, format!("{name}: missing bit width")))?;
            let symmetric = meta
                .get(&format!("{name}.symmetric"))
                .is_some_and(|v| v == "true");
            let shape2 = |data: Vec<u8>, shape: Vec<usize>| -> Result<Array2<u8>> {
                match shape[..] {
                    [r, c] => Array2::from_shape_vec((r, c), data)
                        .map_err(|e| corrupt(&path, e.to_string())),
                    _ => Err(corrupt(&path, format!("{name}: expected a matrix"))),
                }
            };
            let (cd, cs) = get("codes", Dtype::U8)?;
            let (zd, zs) = get("zeros", Dtype::U8)?;
            let (sd, ss) = get("scales", Dtype::F32)?;
            let (gd, _) = get("g_idx", Dtype::U32)?;
            let scales_flat: Vec<f32> = sd
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let scales = match ss[..] {
                [r, c] => Array2::from_shape_vec((r, c), scales_flat)
                    .map_err(|e| corrupt(&path, e.to_string()))?,
                _ => return Err(corrupt(&path, format!("{name}: scales must be a matrix"))),
            };
            let g_idx = gd
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let qw = QuantizedWeight::new(
                Bits::new(bits)?,
                symmetric,
                shape2(cd, cs)?,
                scales,
                shape2(zd, zs)?,
                g_idx,
            )?;
            layers.push((name.clone(), qw));
        }
        Ok((layers, reports))
    }
}

fn model_fingerprint<M: QuantizableModel>(model: &M) -> Result<String> {
    let mut h = Fnv::new();
    for b in 0..model.num_blocks() {
        h.bytes(model.block_name(b).as_bytes());
        for group in model.linear_groups(b) {
            h.bytes(b"|group");
            for l in group {
                h.bytes(l.name.as_bytes());
                h.bytes(&(l.in_features as u64).to_le_bytes());
                h.bytes(&(l.out_features as u64).to_le_bytes());
                h.floats(model.linear_weight(b, &l.name)?.iter().copied());
            }
        }
    }
    Ok(h.hex())
}

fn calibration_fingerprint<M: QuantizableModel>(
    model: &M,
    samples: &[M::Sample],
) -> Result<String> {
    let mut h = Fnv::new();
    for s in samples {
        let info = model.token_info(0, s);
        for (m, v) in info.modality().iter().zip(info.valid()) {
            h.bytes(&[*m as u8, u8::from(*v)]);
        }
        // The rows block 0 shows for its linears stand for the sample
        // (the hidden state itself is opaque to the base trait).
        let hidden = model.embed(s)?;
        if model.num_blocks() == 0 {
            continue;
        }
        let mut sink = |layer: &str, rows: ndarray::ArrayView2<'_, f32>| {
            h.bytes(layer.as_bytes());
            h.floats(rows.iter().copied());
        };
        model.block_forward(0, &hidden, s, Some(&mut sink))?;
    }
    Ok(h.hex())
}

fn config_fingerprint(cfg: &PipelineConfig) -> String {
    let mut h = Fnv::new();
    h.bytes(cfg.description().as_bytes());
    h.hex()
}
