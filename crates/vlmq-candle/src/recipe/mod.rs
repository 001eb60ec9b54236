//! The recipe: every setting of a quantization run, in one serde type shared
//! by the `vlmq` command's flags, its TOML recipe files and the
//! [`Quantizer`](crate::Quantizer) API.
//!
//! A [`Recipe`] is plain data as a user writes it; [`Recipe::check`] turns it
//! once into a [`CheckedRecipe`] (the core's checked configuration types),
//! with errors that name the file and the field. Nothing past that point
//! re-validates.
//!
//! The defaults (one set, used by the library, the command and the examples):
//!
//! | setting | default | meaning |
//! |---|---|---|
//! | `method` | `"gptq"` | `rtn`, `gptq`, `gptaq`, `vlmq`, `vlmq+gptaq` |
//! | `bits` | 4 | 2, 3, 4 or 8 for a GPTQ checkpoint |
//! | `group_size` | 128 | columns per scale; `-1` = one scale per output channel |
//! | `symmetric` | `true` | zero point fixed at the grid's middle |
//! | `act_order` | `false` | columns in order of decreasing Hessian diagonal |
//! | `static_groups` | `false` | groups fitted before any update (with act-order) |
//! | `act_group_aware` | `false` | GAR: groups walked by their largest Hessian diagonal entry (GPTQModel's default is on) |
//! | `damping` | 0.01 | fraction of the mean Hessian diagonal added before factoring |
//! | `true_sequential` | `true` | each linear group captured after the earlier ones were quantized |
//! | `samples` | 128 | calibration samples |
//! | `seq_len` | 512 | tokens per calibration window of plain text |
//! | `seed` | 0 | which windows of a text file are drawn |
//! | `format` | `"gptq"` | GPTQ checkpoint, format v1 (v2 for an asymmetric grid); or `gguf:q4_0`, `gguf:q4_1`, `gguf:q5_0`, `gguf:q8_0`, `gguf:q4_k`, `gguf:q6_k`: one GGUF file (Llama family) |
//! | `dense` | `[]` | layers left in full precision |
//! | `layers` | `{}` | per-layer grids (`bits`, `group_size`, `symmetric`); a GPTQ checkpoint holds one grid, so they must match the recipe's |
//! | `blocks` | every block | a block-name prefix: only those blocks are quantized |
//! | `capture_tokens` | 8192 | calibration tokens whose layer inputs are held at once while a block's statistics are gathered (memory, not results) |
//! | `capture_memory_mb` | 128 | MiB of layer inputs held at once while a block's statistics are gathered: wide inputs are captured in fewer tokens (memory, not results) |
//! | `importance_memory_mb` | 1024 | MiB of hidden states VLMQ's importance pass holds at once (memory and parallelism, not results) |
//!
//! ```
//! use vlmq_candle::Recipe;
//! let r = Recipe::from_toml_str(
//!     r#"
//!     bits = 3
//!     dense = ["mlp.down_proj"]
//!     "#,
//!     "recipe.toml".as_ref(),
//! )?;
//! let checked = r.check("recipe.toml".as_ref())?;
//! assert_eq!(checked.pipeline().solver().scheme().bits().get(), 3);
//! assert!(checked.pipeline().scheme_for("model.layers.0", "mlp.down_proj").is_none());
//! # Ok::<(), vlmq::Error>(())
//! ```

mod check;
mod file;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use check::{CheckedRecipe, OutputFormat};

/// Every setting of a quantization run, as written in a TOML recipe (the
/// field names are the keys) or built in code; see the module docs for the
/// defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Recipe {
    /// `rtn`, `gptq`, `gptaq`, `vlmq` or `vlmq+gptaq` (any case).
    pub method: String,
    /// Bit width of the default grid.
    pub bits: u32,
    /// Columns per group; `-1` (or `0`) = per output channel.
    pub group_size: i64,
    /// Symmetric grid.
    pub symmetric: bool,
    /// Act-order (decreasing Hessian diagonal).
    pub act_order: bool,
    /// Static groups (fitted before any update).
    pub static_groups: bool,
    /// Group-aware activation ordering (GAR, GPTQModel's `act_group_aware`):
    /// groups keep their columns, the walk visits them by their largest
    /// Hessian diagonal entry. Excludes `act_order`.
    pub act_group_aware: bool,
    /// Relative damping of the Hessian diagonal (GPTQ's `damp_percent`).
    pub damping: f64,
    /// True-sequential capture; `false` captures every group in one forward.
    pub true_sequential: bool,
    /// Calibration samples.
    pub samples: usize,
    /// Tokens per window when plain text is cut into windows.
    pub seq_len: usize,
    /// Seed of the draw of text windows.
    pub seed: u64,
    /// Output format: `gptq` (checkpoint format v1 for symmetric grids, v2
    /// for asymmetric ones) or `gguf:TYPE` (a GGUF file, the linears solved
    /// onto that llama.cpp block type; `bits`, `group_size` and `symmetric`
    /// are then not used).
    pub format: String,
    /// Layers left in full precision, by layer name (`mlp.down_proj`) or
    /// `block/layer` (`model.layers.0/mlp.down_proj`).
    pub dense: Vec<String>,
    /// Per-layer grids, keyed like `dense`.
    pub layers: BTreeMap<String, LayerRecipe>,
    /// Quantize only the blocks whose name starts with this prefix.
    pub blocks: Option<String>,
    /// Calibration tokens whose layer inputs are held at once while a
    /// block's statistics are gathered
    /// ([`PipelineConfig::with_capture_tokens`](vlmq::PipelineConfig::with_capture_tokens));
    /// changes memory, not the result.
    pub capture_tokens: usize,
    /// MiB of f32 layer inputs held at once while a block's statistics
    /// are gathered
    /// ([`PipelineConfig::with_capture_memory`](vlmq::PipelineConfig::with_capture_memory));
    /// changes memory, not the result.
    pub capture_memory_mb: usize,
    /// MiB of f32 hidden states the task-loss importance pass (VLMQ
    /// methods) holds at once
    /// ([`PipelineConfig::with_importance_memory`](vlmq::PipelineConfig::with_importance_memory)):
    /// a smaller budget lowers the peak memory and runs fewer samples in
    /// parallel; it changes no bit of the result.
    pub importance_memory_mb: usize,
}

/// The grid of one layer (or of every layer matching a key); a field left
/// out takes the recipe's value.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LayerRecipe {
    /// Bit width.
    pub bits: Option<u32>,
    /// Columns per group; `-1` = per channel.
    pub group_size: Option<i64>,
    /// Symmetric grid.
    pub symmetric: Option<bool>,
}

impl Default for Recipe {
    fn default() -> Self {
        Recipe {
            method: Self::DEFAULT_METHOD.into(),
            bits: Self::DEFAULT_BITS,
            group_size: Self::DEFAULT_GROUP_SIZE,
            symmetric: true,
            act_order: false,
            static_groups: false,
            act_group_aware: false,
            damping: Self::DEFAULT_DAMPING,
            true_sequential: true,
            samples: Self::DEFAULT_SAMPLES,
            seq_len: Self::DEFAULT_SEQ_LEN,
            seed: 0,
            format: Self::DEFAULT_FORMAT.into(),
            dense: Vec::new(),
            layers: BTreeMap::new(),
            blocks: None,
            capture_tokens: vlmq::PipelineConfig::DEFAULT_CAPTURE_TOKENS,
            capture_memory_mb: vlmq::PipelineConfig::DEFAULT_CAPTURE_MEMORY >> 20,
            importance_memory_mb: vlmq::PipelineConfig::DEFAULT_IMPORTANCE_MEMORY >> 20,
        }
    }
}

impl Recipe {
    /// Default method.
    pub const DEFAULT_METHOD: &'static str = "gptq";
    /// Default bit width.
    pub const DEFAULT_BITS: u32 = 4;
    /// Default group size.
    pub const DEFAULT_GROUP_SIZE: i64 = 128;
    /// Default relative damping.
    pub const DEFAULT_DAMPING: f64 = 0.01;
    /// Default number of calibration samples.
    pub const DEFAULT_SAMPLES: usize = 128;
    /// Default calibration window length in tokens.
    pub const DEFAULT_SEQ_LEN: usize = 512;
    /// Default output format (a GPTQ checkpoint, format v1 for the default
    /// symmetric grid).
    pub const DEFAULT_FORMAT: &'static str = "gptq";
}
