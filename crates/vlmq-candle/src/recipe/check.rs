//! Checking a [`Recipe`] once into the core's configuration types.

use std::path::Path;

use vlmq::pipeline::BlockSelection;
use vlmq::quant::gguf::GgufType;
use vlmq::{
    Bits, Damping, Error, GptqConfig, GroupSize, PipelineConfig, QuantMethod, QuantScheme, Result,
};

use super::{LayerRecipe, Recipe};

/// What a run writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum OutputFormat {
    /// A GPTQ checkpoint (safetensors + `quantize_config.json`) in the
    /// model's Hugging Face layout: `checkpoint_format` v1 (`gptq`) for a
    /// symmetric grid, v2 (`gptq_v2`, true zero points) for an asymmetric
    /// one, whose zero points of 0 the v1 offset cannot hold.
    Gptq,
    /// One GGUF v3 file whose linears were solved onto this llama.cpp block
    /// type (or its fallback for narrow rows, see
    /// [`GgufType::for_cols`]); Llama-family models only.
    Gguf(GgufType),
}

impl OutputFormat {
    /// Parses `gptq` or `gguf:TYPE` (`gguf:q4_k`, any case).
    fn parse(s: &str) -> Option<Self> {
        if s == "gptq" {
            return Some(OutputFormat::Gptq);
        }
        let ty = s.strip_prefix("gguf:")?.parse().ok()?;
        Some(OutputFormat::Gguf(ty))
    }
}

/// A [`Recipe`] whose every value has been checked: the pipeline settings,
/// the output format and the calibration sizes.
#[derive(Debug, Clone)]
pub struct CheckedRecipe {
    pipeline: PipelineConfig,
    format: OutputFormat,
    samples: usize,
    seq_len: usize,
    seed: u64,
}

impl CheckedRecipe {
    /// The pipeline settings (method, solver, per-layer grids, blocks).
    pub fn pipeline(&self) -> &PipelineConfig {
        &self.pipeline
    }

    /// What the run writes.
    pub fn format(&self) -> OutputFormat {
        self.format
    }

    /// Calibration samples (at least 1).
    pub fn samples(&self) -> usize {
        self.samples
    }

    /// Tokens per window of plain text (at least 2).
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Seed of the draw of text windows.
    pub fn seed(&self) -> u64 {
        self.seed
    }
}

impl Recipe {
    /// Checks every value; an error is [`Error::InvalidField`] naming
    /// `origin` (the recipe file, or where the settings came from) and the
    /// field.
    pub fn check(&self, origin: &Path) -> Result<CheckedRecipe> {
        let bad = |field: &str, e: &dyn std::fmt::Display| Error::field(origin, field, e);
        let method: QuantMethod = self.method.parse().map_err(|e| bad("method", &e))?;
        let format = OutputFormat::parse(&self.format).ok_or_else(|| {
            bad(
                "format",
                &format!(
                    "{:?} is not gptq or gguf:TYPE (q4_0, q4_1, q5_0, q8_0, q4_k, q6_k)",
                    self.format
                ),
            )
        })?;
        let gguf = match format {
            OutputFormat::Gguf(ty) => Some(ty),
            OutputFormat::Gptq => None,
        };
        if gguf.is_some() && self.act_order && !self.static_groups {
            return Err(bad(
                "act_order",
                &"GGUF stores no column order: with a gguf format, act_order needs static_groups",
            ));
        }
        if gguf.is_some() && self.act_group_aware {
            return Err(bad(
                "act_group_aware",
                &"GAR orders GPTQ groups, not GGUF blocks: leave it off with a gguf format",
            ));
        }
        let scheme = scheme(origin, "", self.bits, self.group_size, self.symmetric)?;
        let damping = Damping::percent(self.damping).map_err(|e| bad("damping", &e))?;
        if self.static_groups && !self.act_order {
            return Err(bad(
                "static_groups",
                &"only changes a run with act_order = true",
            ));
        }
        if self.act_group_aware && self.act_order {
            return Err(bad(
                "act_group_aware",
                &"orders the columns itself: use it without act_order",
            ));
        }
        if self.samples == 0 {
            return Err(bad("samples", &"must be at least 1"));
        }
        if self.seq_len < 2 {
            return Err(bad("seq_len", &"must be at least 2 (one predicted token)"));
        }
        if self.capture_tokens == 0 {
            return Err(bad("capture_tokens", &"must be at least 1"));
        }
        let mib_budget = |field: &'static str, mib: usize| {
            mib.checked_mul(1 << 20).filter(|&b| b > 0).ok_or_else(|| {
                bad(
                    field,
                    &format!(
                        "{mib} MiB is not a usable budget (1 or more, in bytes below usize::MAX)"
                    ),
                )
            })
        };
        let capture_bytes = mib_budget("capture_memory_mb", self.capture_memory_mb)?;
        let importance_bytes = mib_budget("importance_memory_mb", self.importance_memory_mb)?;
        let solver = GptqConfig::new(scheme)
            .with_damping(damping)
            .with_act_order(self.act_order)
            .and_then(|s| s.with_static_groups(self.static_groups))
            .and_then(|s| s.with_act_group_aware(self.act_group_aware))
            .map_err(|e| match e {
                Error::InvalidConfig { field, reason, .. } => bad(field, &reason),
                e => e,
            })?;
        let mut pipeline = PipelineConfig::new(method, solver)
            .with_true_sequential(self.true_sequential)
            .with_capture_tokens(self.capture_tokens)
            .with_capture_memory(capture_bytes)
            .with_importance_memory(importance_bytes)
            .with_gguf_type(gguf);
        for (key, layer) in &self.layers {
            let s = layer_scheme(origin, key, layer, self)?;
            if s != scheme {
                return Err(bad(
                    &format!("layers.{key:?}"),
                    &"a GPTQ checkpoint holds one grid for every layer: leave the layer dense instead",
                ));
            }
            pipeline = pipeline.with_layer_override(key.clone(), Some(s));
        }
        for key in &self.dense {
            if key.is_empty() {
                return Err(bad("dense", &"an empty layer name"));
            }
            pipeline = pipeline.with_layer_override(key.clone(), None);
        }
        if let Some(prefix) = &self.blocks {
            pipeline = pipeline.with_blocks(BlockSelection::NamePrefix(prefix.clone()));
        }
        Ok(CheckedRecipe {
            pipeline,
            format,
            samples: self.samples,
            seq_len: self.seq_len,
            seed: self.seed,
        })
    }
}

/// The grid of a `[layers.KEY]` table, its missing fields from the recipe.
fn layer_scheme(origin: &Path, key: &str, l: &LayerRecipe, r: &Recipe) -> Result<QuantScheme> {
    scheme(
        origin,
        &format!("layers.{key:?}."),
        l.bits.unwrap_or(r.bits),
        l.group_size.unwrap_or(r.group_size),
        l.symmetric.unwrap_or(r.symmetric),
    )
}

/// A checked grid; `prefix` goes before the field names in errors.
fn scheme(
    origin: &Path,
    prefix: &str,
    bits: u32,
    group_size: i64,
    symmetric: bool,
) -> Result<QuantScheme> {
    let bad = |field: &str, e: &dyn std::fmt::Display| {
        Error::field(origin, prefix.to_string() + field, e)
    };
    // The GPTQ layout packs 2, 3, 4 and 8 bits only.
    if !matches!(bits, 2 | 3 | 4 | 8) {
        return Err(bad(
            "bits",
            &format!("{bits} is not 2, 3, 4 or 8 (the widths a GPTQ checkpoint stores)"),
        ));
    }
    let bits = Bits::new(bits).map_err(|e| bad("bits", &e))?;
    let group = GroupSize::from_gptq(if group_size == 0 { -1 } else { group_size })
        .map_err(|e| bad("group_size", &e))?;
    Ok(QuantScheme::new(bits)
        .with_group_size(group)
        .with_symmetric(symmetric))
}
