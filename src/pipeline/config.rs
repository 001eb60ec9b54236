//! What a pipeline run does.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::config::{GptqConfig, QuantScheme};
use crate::error::{Error, Result};
use crate::solver::Method;

use crate::importance::{Normalization, SaliencyPower};

/// The quantization method of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantMethod {
    /// Round to nearest on the original weights (no calibration statistics).
    Rtn,
    /// GPTQ: uniform token weights.
    Gptq,
    /// GPTAQ: GPTQ plus the asymmetric correction from full-precision inputs.
    Gptaq,
    /// VLMQ: GPTQ on the importance-weighted Hessian.
    Vlmq,
    /// VLMQ's weighting combined with GPTAQ's correction.
    VlmqGptaq,
}

impl QuantMethod {
    /// Every method, in table order.
    pub const ALL: [QuantMethod; 5] = [
        QuantMethod::Rtn,
        QuantMethod::Gptq,
        QuantMethod::Gptaq,
        QuantMethod::Vlmq,
        QuantMethod::VlmqGptaq,
    ];

    /// Whether the method needs per-token importance factors.
    pub fn needs_importance(self) -> bool {
        matches!(self, QuantMethod::Vlmq | QuantMethod::VlmqGptaq)
    }

    /// Whether the method needs the full-precision stream (GPTAQ's cross term).
    pub fn needs_full_precision_stream(self) -> bool {
        matches!(self, QuantMethod::Gptaq | QuantMethod::VlmqGptaq)
    }

    /// The solver method, `None` for RTN.
    pub fn solver_method(self, gptaq_strength: f32) -> Option<Method> {
        match self {
            QuantMethod::Rtn => None,
            QuantMethod::Gptq | QuantMethod::Vlmq => Some(Method::Gptq),
            QuantMethod::Gptaq | QuantMethod::VlmqGptaq => Some(Method::Gptaq {
                strength: gptaq_strength,
            }),
        }
    }

    /// Short display name.
    pub fn name(self) -> &'static str {
        match self {
            QuantMethod::Rtn => "RTN",
            QuantMethod::Gptq => "GPTQ",
            QuantMethod::Gptaq => "GPTAQ",
            QuantMethod::Vlmq => "VLMQ",
            QuantMethod::VlmqGptaq => "VLMQ+GPTAQ",
        }
    }
}

impl std::fmt::Display for QuantMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Which blocks are quantized (the others only pass the streams through).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum BlockSelection {
    /// Every block.
    #[default]
    All,
    /// Blocks with these indices.
    Indices(Vec<usize>),
    /// Blocks whose name starts with this prefix (e.g. `"lm."`).
    NamePrefix(String),
}

impl BlockSelection {
    /// Whether block `index` named `name` is selected.
    pub fn contains(&self, index: usize, name: &str) -> bool {
        match self {
            BlockSelection::All => true,
            BlockSelection::Indices(v) => v.contains(&index),
            BlockSelection::NamePrefix(p) => name.starts_with(p.as_str()),
        }
    }
}

/// Where the gradients behind importance factors come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GradientSource {
    /// The task loss of the full-precision model, backpropagated once block by block (default).
    #[default]
    TaskLoss,
    /// A block-local loss `1/2 ||B~(X) - B(X)||^2` with the block's weights
    /// rounded to nearest at the target setting.
    BlockLocal,
}

/// How importance factors are derived from gradients.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ImportanceOptions {
    /// Gradient source.
    pub source: GradientSource,
    /// Per input group (default) or one factor set per block from the block-output gradient.
    pub per_block: bool,
    /// Saliency power of the default scorer: squared gradient norm
    /// (Fisher-style, default) or the norm itself.
    pub power: SaliencyPower,
    /// Per-sample mean-1 normalization, floor and cap of the default scorer.
    pub normalization: Normalization,
}

impl Default for ImportanceOptions {
    fn default() -> Self {
        ImportanceOptions {
            source: GradientSource::TaskLoss,
            per_block: false,
            power: SaliencyPower::Two,
            normalization: Normalization::default(),
        }
    }
}

/// Configuration of a pipeline run.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// The method.
    pub method: QuantMethod,
    /// Solver settings and the default grid of every layer.
    pub solver: GptqConfig,
    /// GPTAQ's correction strength (0.25 in the published method).
    pub gptaq_strength: f32,
    /// Importance options (used by VLMQ methods).
    pub importance: ImportanceOptions,
    /// Which blocks to quantize.
    pub blocks: BlockSelection,
    /// Per-layer grids, keyed by layer name (`"mlp.down"`) or by
    /// `"{block name}/{layer name}"` (more specific wins); `None` keeps the
    /// layer in full precision.
    pub layer_overrides: BTreeMap<String, Option<QuantScheme>>,
    /// When set, state is saved after each block and a rerun resumes.
    pub state_dir: Option<PathBuf>,
}

impl PipelineConfig {
    /// A run of `method` with the given solver settings and defaults elsewhere.
    pub fn new(method: QuantMethod, solver: GptqConfig) -> Self {
        PipelineConfig {
            method,
            solver,
            gptaq_strength: 0.25,
            importance: ImportanceOptions::default(),
            blocks: BlockSelection::All,
            layer_overrides: BTreeMap::new(),
            state_dir: None,
        }
    }

    /// The grid of a layer, `None` when it stays in full precision.
    pub fn scheme_for(&self, block_name: &str, layer: &str) -> Option<QuantScheme> {
        let key = format!("{block_name}/{layer}");
        if let Some(o) = self.layer_overrides.get(&key) {
            return *o;
        }
        if let Some(o) = self.layer_overrides.get(layer) {
            return *o;
        }
        Some(self.solver.scheme)
    }

    /// Checks the fields not checked by their types.
    pub fn validate(&self) -> Result<()> {
        self.solver.validate()?;
        if !self.gptaq_strength.is_finite() {
            return Err(Error::InvalidConfig {
                field: "gptaq_strength",
                value: self.gptaq_strength.to_string(),
                reason: "must be finite",
            });
        }
        Ok(())
    }
}
