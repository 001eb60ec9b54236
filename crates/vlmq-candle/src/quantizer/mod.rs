//! The one-call API: load a model, calibrate, quantize with a recipe, save.
//!
//! ```no_run
//! use std::ops::ControlFlow;
//! use vlmq_candle::{Calibration, Quantizer, Recipe};
//!
//! let recipe = Recipe { bits: 4, samples: 32, ..Recipe::default() }.check("code".as_ref())?;
//! Quantizer::from_pretrained("SmolLM2-135M-Instruct")?
//!     .calibrate(Calibration::from_file("calib.txt")?, "calib.txt")?
//!     .quantize(&recipe, |e| {
//!         eprintln!("{} {}/{}", e.stage.name(), e.done, e.total);
//!         ControlFlow::Continue(())
//!     })?
//!     .save("SmolLM2-135M-gptq-w4g128")?;
//! # Ok::<(), vlmq::Error>(())
//! ```
//!
//! [`LoadedModel`] lists the supported families; a new family joins with
//! one variant and one arm in each `match` of this module.

mod event;
mod gguf;
mod quantized;
mod samples;
mod vlm_samples;

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use tokenizers::Tokenizer;
use vlmq::pipeline::{BlockSelection, PipelineOutput};
use vlmq::{Error, Progress, QuantizableModel, Result};

use event::send;
pub use event::{Event, Stage};
pub use quantized::Quantized;

use crate::load::llava::load_llava_dir_counted;
use crate::load::load_model_counted;
use crate::load::qwen2_vl::load_qwen2_vl_dir_counted;
use crate::load::smolvlm::load_smolvlm_dir_counted;
use crate::process::calibration::Calibration;
use crate::process::chat_template::ChatTemplate;
use crate::process::image_input::ClipImageProcessor;
use crate::process::qwen2_vl_image::Qwen2VlImageConfig;
use crate::process::smolvlm_image::SmolVlmImageProcessor;
use crate::recipe::{CheckedRecipe, OutputFormat};
use crate::{tokenizer_from_file, LlamaModel, LlavaModel, LoadOptions};

/// A model of one of the supported families.
#[derive(Debug, Clone)]
#[non_exhaustive]
// One value per run, holding handles to the weights: the variants' sizes
// do not matter.
#[allow(clippy::large_enum_variant)]
pub enum LoadedModel {
    /// A Llama-family decoder (Llama, SmolLM2, Qwen2) from an HF directory
    /// or a GGUF file.
    Llama(LlamaModel),
    /// A LLaVA-style model (CLIP tower, projector, Llama-family LM) with its
    /// image processor.
    Llava(LlavaModel, ClipImageProcessor),
    /// A Qwen2-VL or Qwen2.5-VL model with its image processor's settings.
    Qwen2Vl(crate::Qwen2VlModel, Qwen2VlImageConfig),
    /// A SmolVLM (Idefics3 layout) model with its image processor.
    SmolVlm(crate::SmolVlmModel, SmolVlmImageProcessor),
}

impl LoadedModel {
    /// The family's name.
    pub fn family(&self) -> &'static str {
        match self {
            LoadedModel::Llama(_) => "llama",
            LoadedModel::Llava(..) => "llava",
            LoadedModel::Qwen2Vl(..) => "qwen2_vl",
            LoadedModel::SmolVlm(..) => "smolvlm",
        }
    }

    /// Number of blocks the pipeline walks.
    pub fn num_blocks(&self) -> usize {
        match self {
            LoadedModel::Llama(m) => m.num_blocks(),
            LoadedModel::Llava(m, _) => m.num_blocks(),
            LoadedModel::Qwen2Vl(m, _) => m.num_blocks(),
            LoadedModel::SmolVlm(m, _) => m.num_blocks(),
        }
    }
}

/// A loaded model and its tokenizer, waiting for calibration data.
pub struct Quantizer {
    model: LoadedModel,
    tokenizer: Tokenizer,
    calibration: Option<(Calibration, PathBuf)>,
    state_dir: Option<PathBuf>,
    /// The model directory or GGUF file (its chat template is read from it).
    source: PathBuf,
}

/// Whether `path` names a GGUF file (by its extension).
fn is_gguf(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "gguf")
}

/// What [`Quantizer::from_pretrained_with`] reads from `config.json` to pick
/// the family.
fn model_type(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("model_type")?.as_str().map(str::to_string)
}

impl Quantizer {
    /// Loads `path` on the CPU in f32: a `.gguf` file or a Hugging Face
    /// directory of a supported family.
    pub fn from_pretrained(path: impl AsRef<Path>) -> Result<Quantizer> {
        Quantizer::from_pretrained_with(path, &LoadOptions::default())
    }

    /// Loads `path` with the given device, compute dtype and residency
    /// (vision-language models are always held in memory).
    pub fn from_pretrained_with(path: impl AsRef<Path>, opts: &LoadOptions) -> Result<Quantizer> {
        Quantizer::from_pretrained_with_events(path, opts, |_| ControlFlow::Continue(()))
    }

    /// [`Quantizer::from_pretrained_with`], reporting the bytes of the
    /// weight files read as [`Stage::Load`] events (the last one has
    /// `done == total`); returning `ControlFlow::Break(())` stops the load
    /// with [`Error::Cancelled`].
    pub fn from_pretrained_with_events(
        path: impl AsRef<Path>,
        opts: &LoadOptions,
        mut on_event: impl FnMut(&Event) -> ControlFlow<()>,
    ) -> Result<Quantizer> {
        let path = path.as_ref();
        let item = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut tick = |done: u64, total: u64| -> Result<()> {
            let count = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
            send(&mut on_event, Stage::Load, count(done), count(total), &item)
        };
        let is_gguf = is_gguf(path);
        if !is_gguf && !path.join("config.json").is_file() {
            return Err(Error::field(
                path,
                "config.json",
                "is missing: MODEL is a Hugging Face model directory or a .gguf file",
            ));
        }
        let (model, tokenizer) = match model_type(path).as_deref() {
            Some("llava") if !is_gguf => {
                let m = load_llava_dir_counted(path, opts.dtype, &opts.device, &mut tick)?;
                let tk = tokenizer_from_file(path.join("tokenizer.json"))?;
                let processor = clip_processor(path, &m)?;
                (LoadedModel::Llava(m, processor), tk)
            }
            Some("qwen2_vl" | "qwen2_5_vl") if !is_gguf => {
                let (m, _) = load_qwen2_vl_dir_counted(path, opts.dtype, &opts.device, &mut tick)?;
                let tk = tokenizer_from_file(path.join("tokenizer.json"))?;
                let images = Qwen2VlImageConfig::from_dir(path)?;
                (LoadedModel::Qwen2Vl(m, images), tk)
            }
            Some("smolvlm" | "idefics3") if !is_gguf => {
                let m = load_smolvlm_dir_counted(path, opts.dtype, &opts.device, &mut tick)?;
                let tk = tokenizer_from_file(path.join("tokenizer.json"))?;
                let images = smolvlm_processor(path, &m)?;
                (LoadedModel::SmolVlm(m, images), tk)
            }
            _ => {
                let (m, tk) = load_model_counted(path, opts, &mut tick)?;
                (LoadedModel::Llama(m), tk)
            }
        };
        Ok(Quantizer {
            model,
            tokenizer,
            calibration: None,
            state_dir: None,
            source: path.to_path_buf(),
        })
    }

    /// The loaded model.
    pub fn model(&self) -> &LoadedModel {
        &self.model
    }

    /// The model's tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Sets the calibration data; `origin` names it in errors (its file).
    pub fn calibrate(mut self, data: Calibration, origin: impl Into<PathBuf>) -> Result<Quantizer> {
        self.calibration = Some((data, origin.into()));
        Ok(self)
    }

    /// Saves the run's state after each block in `dir`; a later run with
    /// the same model, calibration data and recipe resumes from it.
    pub fn with_state_dir(mut self, dir: impl Into<PathBuf>) -> Quantizer {
        self.state_dir = Some(dir.into());
        self
    }

    /// Runs the recipe: calibration samples, then every block. `on_event`
    /// sees each step; returning `ControlFlow::Break(())` cancels the run
    /// with [`Error::Cancelled`] (with a state directory, the blocks already
    /// done are kept for the next run).
    pub fn quantize(
        self,
        recipe: &CheckedRecipe,
        mut on_event: impl FnMut(&Event) -> ControlFlow<()>,
    ) -> Result<Quantized> {
        let (data, origin) = self.calibration.as_ref().ok_or_else(|| Error::Empty {
            what: "calibration data (call Quantizer::calibrate first)".into(),
        })?;
        let mut cfg = recipe.pipeline().clone();
        if let Some(dir) = &self.state_dir {
            cfg = cfg.with_state_dir(dir);
        }
        let mut tick = |stage: Stage, done: usize, total: usize, item: String| -> Result<()> {
            send(&mut on_event, stage, done, total, &item)
        };
        let template = match data {
            Calibration::Conversations(_) if is_gguf(&self.source) => {
                Some(ChatTemplate::from_gguf(&self.source)?)
            }
            Calibration::Conversations(_) => Some(ChatTemplate::from_model_dir(&self.source)?),
            _ => None,
        };
        let src = samples::Inputs {
            tk: &self.tokenizer,
            data,
            origin,
            recipe,
            template: template.as_ref(),
        };
        let mut model = self.model;
        if recipe.format() != OutputFormat::Gptq && !matches!(model, LoadedModel::Llama(_)) {
            return Err(Error::Unsupported {
                what: format!(
                    "format {} for a {} model",
                    format_name(recipe.format()),
                    model.family()
                ),
                remedy: "GGUF output covers Llama-family decoders; write gptq for VLMs".into(),
            });
        }
        let output = match &mut model {
            LoadedModel::Llama(m) => {
                if recipe.format() != OutputFormat::Gptq {
                    cfg = gguf::keep_narrow_layers_dense(m, cfg);
                }
                let texts = samples::text_samples(&src, |d, n| {
                    tick(Stage::Calibrate, d, n, format!("sample {d}"))
                })?;
                let set: Vec<_> = texts.into_iter().map(crate::TextSample::causal).collect();
                run(m, &set, &cfg, &mut tick)?
            }
            LoadedModel::Llava(m, processor) => {
                let set = samples::llava_samples(m, processor, &src, |d, n| {
                    tick(Stage::Calibrate, d, n, format!("sample {d}"))
                })?;
                // A VLM's vision tower stays dense unless the recipe names blocks.
                if *cfg.blocks() == BlockSelection::All {
                    cfg = cfg.with_blocks(m.lm_only());
                }
                run(m, &set, &cfg, &mut tick)?
            }
            LoadedModel::Qwen2Vl(m, images) => {
                let set = vlm_samples::qwen_samples(m, images, &src, |d, n| {
                    tick(Stage::Calibrate, d, n, format!("sample {d}"))
                })?;
                if *cfg.blocks() == BlockSelection::All {
                    cfg = cfg.with_blocks(m.lm_only());
                }
                run(m, &set, &cfg, &mut tick)?
            }
            LoadedModel::SmolVlm(m, images) => {
                let set = vlm_samples::smolvlm_samples(m, images, &src, |d, n| {
                    tick(Stage::Calibrate, d, n, format!("sample {d}"))
                })?;
                if *cfg.blocks() == BlockSelection::All {
                    cfg = cfg.with_blocks(m.lm_only());
                }
                run(m, &set, &cfg, &mut tick)?
            }
        };
        Ok(Quantized {
            model,
            tokenizer: self.tokenizer,
            output,
            format: recipe.format(),
            source: self.source,
        })
    }
}

/// The recipe's format as written in a recipe.
fn format_name(f: OutputFormat) -> String {
    match f {
        OutputFormat::Gptq => "gptq".into(),
        OutputFormat::Gguf(ty) => format!("gguf:{ty}"),
    }
}

/// The pipeline over `set`, each step of the importance pass reported as a
/// [`Stage::Importance`] event and each layer as a [`Stage::Quantize`] event.
fn run<M: QuantizableModel>(
    m: &mut M,
    set: &[M::Sample],
    cfg: &vlmq::PipelineConfig,
    tick: &mut impl FnMut(Stage, usize, usize, String) -> Result<()>,
) -> Result<PipelineOutput> {
    vlmq::quantize_model(m, set, cfg, |p: &Progress| {
        let (stage, item) = match &p.stage {
            vlmq::pipeline::Stage::Importance { backward, samples } => (
                Stage::Importance,
                format!(
                    "{} {} (samples {}..{})",
                    p.block_name,
                    if *backward { "backward" } else { "forward" },
                    samples.start,
                    samples.end
                ),
            ),
            _ => (Stage::Quantize, format!("{}/{}", p.block_name, p.layer)),
        };
        match tick(stage, p.done, p.total, item) {
            Ok(()) => ControlFlow::Continue(()),
            Err(_) => ControlFlow::Break(()),
        }
    })
}

/// The CLIP image processor of a LLaVA directory (its
/// `preprocessor_config.json`, or CLIP's defaults at the tower's size).
fn clip_processor(dir: &Path, m: &LlavaModel) -> Result<ClipImageProcessor> {
    let size = m.config().vision.image_size;
    let pre = dir.join("preprocessor_config.json");
    let p = if pre.exists() {
        ClipImageProcessor::from_preprocessor_config(&pre, size)?
    } else {
        ClipImageProcessor::for_image_size(size)
    };
    if p.crop != size {
        return Err(Error::field(
            &pre,
            "crop_size",
            format!(
                "{} differs from the vision tower's image_size {size}",
                p.crop
            ),
        ));
    }
    Ok(p)
}

/// The image processor of a SmolVLM directory, checked against the model:
/// its frames must be the tower's input size and its `image_seq_len` the
/// connector's features per frame.
fn smolvlm_processor(dir: &Path, m: &crate::SmolVlmModel) -> Result<SmolVlmImageProcessor> {
    let p = SmolVlmImageProcessor::from_model_dir(dir)?;
    let file = match dir.join("processor_config.json") {
        f if f.is_file() => f,
        _ => dir.join("preprocessor_config.json"),
    };
    let cfg = m.config();
    if p.frame_side != cfg.vision.image_size {
        return Err(Error::field(
            &file,
            "max_image_size.longest_edge",
            format!(
                "{} differs from the vision tower's image_size {}",
                p.frame_side, cfg.vision.image_size
            ),
        ));
    }
    if p.image_seq_len != cfg.tokens_per_frame() {
        return Err(Error::field(
            &file,
            "image_seq_len",
            format!(
                "{} differs from the connector's {} features per frame",
                p.image_seq_len,
                cfg.tokens_per_frame()
            ),
        ));
    }
    Ok(p)
}
