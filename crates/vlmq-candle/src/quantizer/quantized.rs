//! A quantized model and the writing of its checkpoint.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use tokenizers::Tokenizer;
use vlmq::pipeline::{PipelineOutput, PipelineReport};
use vlmq::{Error, Result};

use super::event::{send, Event, Stage};
use super::{gguf, LoadedModel};
use crate::export::llava::write_llava_gptq_counted;
use crate::export::qwen2_vl::write_qwen2_vl_gptq_counted;
use crate::export::smolvlm::write_smolvlm_gptq_counted;
use crate::export::write_gptq_counted;
use crate::recipe::OutputFormat;

/// A quantized model, ready to be saved.
pub struct Quantized {
    pub(super) model: LoadedModel,
    pub(super) tokenizer: Tokenizer,
    pub(super) output: PipelineOutput,
    pub(super) format: OutputFormat,
    pub(super) source: PathBuf,
}

impl Quantized {
    /// The model with its quantized layers' dequantized weights in place.
    pub fn model(&self) -> &LoadedModel {
        &self.model
    }

    /// The model's tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The run's report (per layer: objectives, damping, time).
    pub fn report(&self) -> &PipelineReport {
        &self.output.report
    }

    /// The quantized weights by `(block, layer)`.
    pub fn output(&self) -> &PipelineOutput {
        &self.output
    }

    /// Writes the checkpoint in the recipe's format to `dir`. A GGUF
    /// format writes one file: `dir` itself when it ends in `.gguf`, else
    /// `dir/model.gguf` (the directory is created): from a GGUF source its
    /// metadata and other tensors are copied, from a Hugging Face
    /// directory they are derived and the other tensors stay f32.
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        self.save_with_events(dir, |_| ControlFlow::Continue(()))
    }

    /// [`Quantized::save`], reporting [`Stage::Write`] events: a GPTQ
    /// checkpoint counts its tensors as they are encoded plus one for the
    /// write to disk, a GGUF file counts as one. Returning
    /// `ControlFlow::Break(())` stops with [`Error::Cancelled`] before
    /// anything is written.
    pub fn save_with_events(
        &self,
        dir: impl AsRef<Path>,
        mut on_event: impl FnMut(&Event) -> ControlFlow<()>,
    ) -> Result<()> {
        let dir = dir.as_ref();
        let item = dir.display().to_string();
        let mut tick = |done: usize, total: usize| -> Result<()> {
            send(&mut on_event, Stage::Write, done, total, &item)
        };
        match (&self.model, self.format) {
            (LoadedModel::Llama(m), OutputFormat::Gguf(_)) => {
                tick(0, 1)?;
                gguf::save(m, &self.output, &self.source, &gguf::gguf_path(dir)?)?;
                tick(1, 1)
            }
            (
                LoadedModel::Llava(..) | LoadedModel::Qwen2Vl(..) | LoadedModel::SmolVlm(..),
                OutputFormat::Gguf(_),
            ) => Err(Error::Unsupported {
                what: format!("GGUF output for a {} model", self.model.family()),
                remedy: "write gptq for VLMs".into(),
            }),
            (LoadedModel::Llama(m), OutputFormat::Gptq) => {
                write_gptq_counted(m, &self.output, Some(&self.tokenizer), dir, &mut tick)
            }
            (LoadedModel::Llava(m, _), OutputFormat::Gptq) => {
                write_llava_gptq_counted(m, &self.output, Some(&self.tokenizer), dir, &mut tick)
            }
            (LoadedModel::Qwen2Vl(m, _), OutputFormat::Gptq) => {
                write_qwen2_vl_gptq_counted(m, &self.output, Some(&self.tokenizer), dir, &mut tick)
            }
            (LoadedModel::SmolVlm(m, _), OutputFormat::Gptq) => {
                write_smolvlm_gptq_counted(m, &self.output, Some(&self.tokenizer), dir, &mut tick)
            }
        }
    }
}
