//! A GPTQ checkpoint written block by block while the pipeline runs: one
//! safetensors shard per decoder layer (`model-00001-of-000NN.safetensors`,
//! the last one also holding the embedding, final norm and head; GPTQModel's
//! sharded layout) plus `model.safetensors.index.json`, built in a
//! temporary sibling directory and swapped in when the run is done. The
//! tensors left unquantized keep the dtype they are stored in (a bf16
//! checkpoint's embedding, norms and head stay bf16, bit for bit), and each
//! shard is streamed to its file tensor by tensor; for a model whose
//! weights stay in safetensors files, the dense tensors are copied from
//! the source file into the shard piece by piece, never held whole.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Tensor};
use vlmq::lock::DirLock;
use vlmq::pack::DenseTensor;
use vlmq::{BlockSink, CheckpointWriter, Error, FinishedBlock, Result};

use super::llama::dense_as;
use crate::models::llama::model::LlamaModel;
use crate::models::llama::store::LayerSource;
use crate::models::llama::weights::{ModelWeights, EMBED, HEAD, LINEAR_NAMES};

/// Where the writer reads what the pipeline does not hand it (norms,
/// biases, linears left unquantized): the checkpoint on disk for a streamed
/// model, a copy of the parameters as loaded otherwise.
enum Originals {
    Disk(Arc<LayerSource>),
    Memory(Box<ModelWeights>),
}

impl Originals {
    /// Adds `name` to `w` as stored: copied from the source file when the
    /// writer can stream its bytes there, else read (in its stored dtype
    /// from disk, or as loaded). `false` when there is no such tensor.
    fn add_to(&self, w: &mut CheckpointWriter, name: &str, dir: &Path) -> Result<bool> {
        if let Originals::Disk(src) = self {
            if let Some(t) = src.file_tensor(name)? {
                w.add_file_tensor(name, t)?;
                return Ok(true);
            }
        }
        match self.tensor(name)? {
            Some(t) => w.add_tensor(name, stored(&t, dir)?).map(|_| true),
            None => Ok(false),
        }
    }

    /// `name` in the dtype it is stored in (on disk), or as loaded.
    fn tensor(&self, name: &str) -> Result<Option<Tensor>> {
        match self {
            Originals::Disk(src) => src.stored_tensor(name),
            Originals::Memory(w) => Ok(w
                .named_tensors()
                .into_iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t)),
        }
    }
}

/// Receives finished blocks from
/// [`quantize_model_streaming`](vlmq::quantize_model_streaming) and writes
/// each as its own shard at once; [`finish`](Self::finish) adds the
/// embedding, final norm and head, the configs and the index, and replaces
/// the target directory. Until then the target is untouched; a writer
/// dropped without finishing (after an error, e.g. a full disk) removes
/// its partial directory. The target is locked
/// ([`DirLock::output_dir`]) for the writer's lifetime.
pub struct ShardedGptqWriter {
    target: PathBuf,
    partial: PathBuf,
    model_config: serde_json::Value,
    blocks: usize,
    originals: Originals,
    outer: Vec<(String, Option<Tensor>)>,
    weight_map: BTreeMap<String, String>,
    configs_from: Option<usize>,
    _lock: DirLock,
}

impl ShardedGptqWriter {
    /// A writer for `model`'s run into `dir` (built in a sibling
    /// `.NAME.partial` directory).
    pub fn new(model: &LlamaModel, dir: impl AsRef<Path>) -> Result<Self> {
        let target = dir.as_ref().to_path_buf();
        let name = target
            .file_name()
            .ok_or_else(|| Error::InvalidConfig {
                field: "output directory",
                value: target.display().to_string(),
                reason: "the output needs a directory name",
            })?
            .to_string_lossy()
            .to_string();
        // Held until the writer is dropped: the partial directory below is
        // ours to clear only while no other process writes this target.
        let lock = DirLock::output_dir(&target)?;
        let partial = target.with_file_name(format!(".{name}.partial"));
        if partial.exists() {
            std::fs::remove_dir_all(&partial).map_err(|e| Error::io(&partial, e))?;
        }
        std::fs::create_dir_all(&partial).map_err(|e| Error::io(&partial, e))?;
        let originals = match model.layer_source() {
            Some(src) => Originals::Disk(src),
            None => Originals::Memory(Box::new(model.weights().clone())),
        };
        // The embedding and head as the model holds them (in the compute
        // dtype), or read from the source in their stored dtype when the
        // last shard is written (a model whose weights stay on disk); the
        // final norm is read then too.
        let w = model.weights();
        let mut outer = vec![
            (EMBED.to_string(), w.embed.clone()),
            ("model.norm.weight".to_string(), None),
        ];
        if !model.config().tie_embeddings {
            outer.push((HEAD.to_string(), w.lm_head.clone()));
        }
        let table_dtype = match (&w.embed, &originals) {
            (Some(e), _) => e.dtype(),
            (None, Originals::Disk(src)) => src.stored_dtype(EMBED),
            (None, Originals::Memory(_)) => model.dtype(),
        };
        let mut model_config = model.config().to_hf_json();
        model_config["torch_dtype"] = match table_dtype {
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
            _ => "float32",
        }
        .into();
        Ok(ShardedGptqWriter {
            target,
            partial,
            model_config,
            blocks: model.config().num_layers,
            originals,
            outer,
            weight_map: BTreeMap::new(),
            configs_from: None,
            _lock: lock,
        })
    }

    fn shard_name(&self, k: usize) -> String {
        format!("model-{:05}-of-{:05}.safetensors", k + 1, self.blocks)
    }

    /// Streams `w` to shard `k`, recording its tensors in the index; the
    /// first shard also writes the config files.
    fn write_shard(&mut self, k: usize, w: &CheckpointWriter, names: Vec<String>) -> Result<()> {
        let shard = self.shard_name(k);
        w.write_safetensors(self.partial.join(&shard))?;
        if self.configs_from.is_none() {
            w.write_configs(&self.partial)?;
            self.configs_from = Some(k);
        }
        for n in names {
            self.weight_map.insert(n, shard.clone());
        }
        Ok(())
    }

    /// Writes the index and the tokenizer, then swaps the finished
    /// directory in for the target. Every block must have been written.
    pub fn finish(self, tokenizer: Option<&tokenizers::Tokenizer>) -> Result<()> {
        if self.configs_from.is_none() || !self.outer.is_empty() {
            return Err(Error::Empty {
                what: format!(
                    "blocks handed to the sharded writer of {} (the run did not finish)",
                    self.target.display()
                ),
            });
        }
        let mut index = serde_json::json!({"metadata": {}, "weight_map": self.weight_map});
        index["metadata"]["format"] = "gptq".into();
        let path = self.partial.join("model.safetensors.index.json");
        let text = serde_json::to_vec_pretty(&index).map_err(|e| Error::Json {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        vlmq::write_file_atomic(&path, &text)?;
        if let Some(tk) = tokenizer {
            let p = self.partial.join("tokenizer.json");
            tk.save(&p, false).map_err(|e| crate::error::file(&p, e))?;
        }
        let old = self.target.with_file_name(format!(
            ".{}.old",
            self.target
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
        ));
        if old.exists() {
            // Named by the error of an earlier writer that could not remove
            // it; ours to clear while we hold the target's lock.
            std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
        }
        let existed = self.target.exists();
        if existed {
            std::fs::rename(&self.target, &old).map_err(|e| Error::io(&self.target, e))?;
        }
        if let Err(e) = std::fs::rename(&self.partial, &self.target) {
            if existed {
                let _ = std::fs::rename(&old, &self.target);
            }
            return Err(Error::io(&self.target, e));
        }
        if existed {
            std::fs::remove_dir_all(&old).map_err(|e| Error::LeftBehind {
                dir: self.target.clone(),
                left: old.clone(),
                reason: e.to_string(),
            })?;
        }
        Ok(())
    }
}

impl Drop for ShardedGptqWriter {
    /// A writer dropped before [`finish`](Self::finish) succeeded (an error,
    /// a cancelled run) removes its partial directory; the target was never
    /// touched.
    fn drop(&mut self) {
        if self.partial.exists() {
            let _ = std::fs::remove_dir_all(&self.partial);
        }
    }
}

impl BlockSink for ShardedGptqWriter {
    fn block_finished(&mut self, block: FinishedBlock) -> Result<()> {
        let b = block.index;
        let p = format!("model.layers.{b}.");
        let mut w = CheckpointWriter::new().with_model_config(self.model_config.clone());
        let mut names = Vec::new();
        if b + 1 == self.blocks {
            for (name, t) in std::mem::take(&mut self.outer) {
                match t {
                    Some(t) => w.add_tensor(&name, stored(&t, &self.partial)?)?,
                    None if self.originals.add_to(&mut w, &name, &self.partial)? => {}
                    None => return Err(Error::MissingTensor { name }),
                }
                names.push(name);
            }
        }
        let mut quantized = std::collections::BTreeSet::new();
        for (layer, qw) in block.layers {
            let stem = format!("{p}{layer}");
            let bias = self
                .originals
                .tensor(&format!("{stem}.bias"))?
                .map(|t| stored(&t, &self.partial))
                .transpose()?;
            for s in ["qweight", "qzeros", "scales", "g_idx"] {
                names.push(format!("{stem}.{s}"));
            }
            if bias.is_some() {
                names.push(format!("{stem}.bias"));
            }
            w.add_layer(&stem, qw, bias)?;
            quantized.insert(layer);
        }
        let mut dense_names = vec![
            format!("{p}input_layernorm.weight"),
            format!("{p}post_attention_layernorm.weight"),
        ];
        for l in LINEAR_NAMES.iter().filter(|l| !quantized.contains(**l)) {
            dense_names.push(format!("{p}{l}.weight"));
            dense_names.push(format!("{p}{l}.bias"));
        }
        for name in dense_names {
            if self.originals.add_to(&mut w, &name, &self.partial)? {
                names.push(name);
            }
        }
        if quantized.is_empty() {
            return Err(Error::Unsupported {
                what: format!("block {b} without quantized layers in a sharded GPTQ checkpoint"),
                remedy: "quantize every block, or write the run with write_gptq".into(),
            });
        }
        self.write_shard(b, &w, names)
    }
}

/// `t` as a dense tensor of its own dtype (f32, f16 or bf16; f64 as f32).
fn stored(t: &Tensor, path: &Path) -> Result<DenseTensor> {
    dense_as(t, t.dtype(), path)
}
