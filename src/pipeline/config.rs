//! What a pipeline run does.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::{GptqConfig, QuantScheme};
use crate::error::{Error, Result};
use crate::importance::{GradientSaliency, TokenImportance};
use crate::quant::gguf::GgufType;
use crate::solver::Method;

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
    pub(crate) fn solver_method(self, gptaq_strength: f32) -> Option<Method> {
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

/// Parses a method name as [`name`](QuantMethod::name) prints it, in any
/// case (`rtn`, `gptq`, `gptaq`, `vlmq`, `vlmq+gptaq`).
///
/// ```
/// use vlmq::QuantMethod;
/// assert_eq!("vlmq+gptaq".parse::<QuantMethod>()?, QuantMethod::VlmqGptaq);
/// assert!("gptq2".parse::<QuantMethod>().is_err());
/// # Ok::<(), vlmq::Error>(())
/// ```
impl std::str::FromStr for QuantMethod {
    type Err = Error;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        [
            QuantMethod::Rtn,
            QuantMethod::Gptq,
            QuantMethod::Gptaq,
            QuantMethod::Vlmq,
            QuantMethod::VlmqGptaq,
        ]
        .into_iter()
        .find(|m| m.name().eq_ignore_ascii_case(s))
        .ok_or_else(|| Error::InvalidConfig {
            field: "method",
            value: s.to_string(),
            reason: "one of rtn, gptq, gptaq, vlmq, vlmq+gptaq",
        })
    }
}

/// Which blocks are quantized (the others only pass the streams through).
///
/// Checked against the model before any work: an index past the last block
/// or a prefix that matches no block name is an error.
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

impl std::fmt::Display for BlockSelection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BlockSelection::All => f.write_str("all"),
            BlockSelection::Indices(v) => {
                let list: Vec<String> = v.iter().map(usize::to_string).collect();
                write!(f, "indices {}", list.join(","))
            }
            BlockSelection::NamePrefix(p) => write!(f, "prefix {p}"),
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

impl GradientSource {
    fn name(self) -> &'static str {
        match self {
            GradientSource::TaskLoss => "task-loss",
            GradientSource::BlockLocal => "block-local",
        }
    }
}

/// How VLMQ methods weight tokens: the scorer and, for gradient-driven
/// scorers, where the gradients come from.
///
/// The default is [`GradientSaliency::default`] (squared gradient norms,
/// mean-1 normalized per sample) on task-loss gradients, per input group.
/// The scorer is the whole rule: its own parameters (power, normalization,
/// seed) are the only ones that apply.
#[derive(Debug, Clone)]
pub struct ImportanceOptions {
    source: GradientSource,
    per_block: bool,
    scorer: Arc<dyn TokenImportance>,
}

impl Default for ImportanceOptions {
    fn default() -> Self {
        ImportanceOptions {
            source: GradientSource::TaskLoss,
            per_block: false,
            scorer: Arc::new(GradientSaliency::default()),
        }
    }
}

impl ImportanceOptions {
    /// Sets the gradient source.
    pub fn with_source(mut self, source: GradientSource) -> Self {
        self.source = source;
        self
    }

    /// Per input group (`false`, default: the gradients at the outputs of
    /// the group's linears) or one factor set per block (`true`: the
    /// gradient at the block output).
    pub fn with_per_block(mut self, per_block: bool) -> Self {
        self.per_block = per_block;
        self
    }

    /// Sets the scorer (any [`TokenImportance`], e.g. a pilot-study or
    /// per-modality scorer).
    pub fn with_scorer(mut self, scorer: impl TokenImportance + 'static) -> Self {
        self.scorer = Arc::new(scorer);
        self
    }

    /// Sets a shared scorer.
    pub fn with_shared_scorer(mut self, scorer: Arc<dyn TokenImportance>) -> Self {
        self.scorer = scorer;
        self
    }

    /// The gradient source.
    pub fn source(&self) -> GradientSource {
        self.source
    }

    /// Whether factors are per block.
    pub fn per_block(&self) -> bool {
        self.per_block
    }

    /// The scorer.
    pub fn scorer(&self) -> &dyn TokenImportance {
        &*self.scorer
    }

    /// A stable text naming every setting, used in the resume fingerprint.
    pub fn description(&self) -> String {
        format!(
            "source={};per_block={};scorer={}",
            self.source.name(),
            self.per_block,
            self.scorer.description()
        )
    }
}

/// What the pipeline does with a layer whose every input column is dead
/// (see [`PipelineConfig::with_dead_layer_fallback`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeadLayerFallback {
    /// Stop with [`Error::DeadLayer`] (the default).
    #[default]
    Refuse,
    /// Quantize the layer with round-to-nearest (its objective is then 0 on
    /// the zero Hessian; the report counts every column as dead).
    Rtn,
}

/// Configuration of a pipeline run: the method, the solver settings and
/// default grid, GPTAQ's strength, the importance options, which blocks,
/// per-layer grids and an optional state directory.
///
/// Values are checked when set; names (override keys, block indices and
/// prefixes) are checked against the model when the run starts, before any
/// work.
///
/// ```
/// use vlmq::importance::ModalityWeights;
/// use vlmq::pipeline::{BlockSelection, ImportanceOptions, PipelineConfig, QuantMethod};
/// use vlmq::{Bits, GptqConfig, QuantScheme};
///
/// let scheme = QuantScheme::new(Bits::new(4)?);
/// let cfg = PipelineConfig::new(QuantMethod::Vlmq, GptqConfig::new(scheme))
///     .with_importance(ImportanceOptions::default().with_scorer(ModalityWeights::new(0.5, 1.0, 1.0)?))
///     .with_blocks(BlockSelection::NamePrefix("lm.".into()))
///     .with_layer_override("lm.0/mlp.down", Some(QuantScheme::new(Bits::new(8)?)))
///     .with_layer_override("attn.o", None); // stays in full precision
/// assert_eq!(cfg.scheme_for("lm.0", "mlp.down").unwrap().bits().get(), 8);
/// assert!(cfg.scheme_for("lm.3", "attn.o").is_none());
/// # Ok::<(), vlmq::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    dead_layer_fallback: DeadLayerFallback,
    method: QuantMethod,
    solver: GptqConfig,
    gptaq_strength: f32,
    importance: ImportanceOptions,
    blocks: BlockSelection,
    layer_overrides: BTreeMap<String, Option<QuantScheme>>,
    state_dir: Option<PathBuf>,
    true_sequential: bool,
    capture_tokens: usize,
    capture_memory: usize,
    importance_memory: usize,
    layer_objectives: bool,
    gguf_type: Option<GgufType>,
}

impl PipelineConfig {
    /// GPTAQ's published correction strength.
    pub const DEFAULT_GPTAQ_STRENGTH: f32 = 0.25;

    /// Default bound on the tokens captured at once (see
    /// [`with_capture_tokens`](Self::with_capture_tokens)).
    pub const DEFAULT_CAPTURE_TOKENS: usize = 8192;

    /// Default bound on the bytes of layer inputs captured at once (see
    /// [`with_capture_memory`](Self::with_capture_memory)): 128 MiB, 8,192
    /// tokens of a 4096-wide input, 3,048 of an 11008-wide one.
    pub const DEFAULT_CAPTURE_MEMORY: usize = 128 << 20;

    /// Default bound on the bytes of hidden states the task-loss importance
    /// pass holds at once (see
    /// [`with_importance_memory`](Self::with_importance_memory)): 1 GiB.
    pub const DEFAULT_IMPORTANCE_MEMORY: usize = 1 << 30;

    /// A run of `method` with the given solver settings and defaults elsewhere.
    pub fn new(method: QuantMethod, solver: GptqConfig) -> Self {
        PipelineConfig {
            method,
            solver,
            gptaq_strength: Self::DEFAULT_GPTAQ_STRENGTH,
            importance: ImportanceOptions::default(),
            blocks: BlockSelection::All,
            layer_overrides: BTreeMap::new(),
            state_dir: None,
            true_sequential: true,
            capture_tokens: Self::DEFAULT_CAPTURE_TOKENS,
            capture_memory: Self::DEFAULT_CAPTURE_MEMORY,
            importance_memory: Self::DEFAULT_IMPORTANCE_MEMORY,
            layer_objectives: false,
            dead_layer_fallback: DeadLayerFallback::Refuse,
            gguf_type: None,
        }
    }

    /// What to do with a layer whose every input column is dead (all its
    /// calibration inputs zero): [`DeadLayerFallback::Refuse`] (the default)
    /// stops the run with [`Error::DeadLayer`]; [`DeadLayerFallback::Rtn`]
    /// quantizes such a layer with round-to-nearest instead. Layers with
    /// some dead columns are quantized as usual (dead columns become 0, as
    /// in GPTQ) and report the count in
    /// [`LayerReport::dead_columns`](super::LayerReport::dead_columns).
    pub fn with_dead_layer_fallback(mut self, fallback: DeadLayerFallback) -> Self {
        self.dead_layer_fallback = fallback;
        self
    }

    /// What happens to a layer whose every input column is dead.
    pub fn dead_layer_fallback(&self) -> DeadLayerFallback {
        self.dead_layer_fallback
    }

    /// Replaces the solver settings (and default grid).
    pub fn with_solver(mut self, solver: GptqConfig) -> Self {
        self.solver = solver;
        self
    }

    /// Sets GPTAQ's correction strength (used by the GPTAQ methods only);
    /// it must be finite.
    pub fn with_gptaq_strength(mut self, strength: f32) -> Result<Self> {
        if !strength.is_finite() {
            return Err(Error::InvalidConfig {
                field: "gptaq_strength",
                value: strength.to_string(),
                reason: "must be finite",
            });
        }
        self.gptaq_strength = strength;
        Ok(self)
    }

    /// Sets the importance options (used by the VLMQ methods only).
    pub fn with_importance(mut self, importance: ImportanceOptions) -> Self {
        self.importance = importance;
        self
    }

    /// Selects the blocks to quantize.
    pub fn with_blocks(mut self, blocks: BlockSelection) -> Self {
        self.blocks = blocks;
        self
    }

    /// Sets the grid of a layer, keyed by layer name (`"mlp.down"`) or by
    /// `"{block name}/{layer name}"` (more specific wins); `None` keeps the
    /// layer in full precision.
    pub fn with_layer_override(
        mut self,
        key: impl Into<String>,
        scheme: Option<QuantScheme>,
    ) -> Self {
        self.layer_overrides.insert(key.into(), scheme);
        self
    }

    /// Saves state after each block in `dir`; a rerun with the same model,
    /// calibration set and configuration resumes after the last saved block.
    pub fn with_state_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.state_dir = Some(dir.into());
        self
    }

    /// True-sequential capture (the default): a block's input groups are
    /// captured one after the other, each after the previous groups were
    /// quantized, so later layers see the quantized earlier ones (one block
    /// forward per group, plus one for GPTAQ's full-precision inputs per
    /// group). `false` captures every group in one forward of the
    /// unquantized block, as the Python tools' `true_sequential=False` does:
    /// fewer forwards, slightly different (usually slightly worse) results.
    /// Part of the resume fingerprint.
    pub fn with_true_sequential(mut self, on: bool) -> Self {
        self.true_sequential = on;
        self
    }

    /// Bounds the calibration tokens whose layer inputs are held at once
    /// (default [`DEFAULT_CAPTURE_TOKENS`](Self::DEFAULT_CAPTURE_TOKENS)):
    /// samples run through a block in consecutive chunks of at most this
    /// many tokens (a longer sample alone), and each chunk's rows go
    /// straight into the accumulators. Rows are added one sample at a time
    /// in sample order, so the result is bit-identical for every bound;
    /// only memory and parallelism change. 0 is read as 1 (one sample per
    /// chunk).
    pub fn with_capture_tokens(mut self, tokens: usize) -> Self {
        self.capture_tokens = tokens.max(1);
        self
    }

    /// Bounds the bytes of captured layer inputs held at once (default
    /// [`DEFAULT_CAPTURE_MEMORY`](Self::DEFAULT_CAPTURE_MEMORY)): a capture
    /// pass's chunks hold at most this many bytes of f32 input rows of the
    /// groups it captures (both streams for GPTAQ methods), as well as at
    /// most [`capture_tokens`](Self::capture_tokens) tokens, so a wide
    /// input (a 7B model's 11008-wide down projection) is captured in
    /// shorter chunks than a narrow one. A chunk never holds fewer samples
    /// than the thread pool has threads, so every core has a sample. Like
    /// the token bound, it changes no bit of the result. 0 is read as 1.
    pub fn with_capture_memory(mut self, bytes: usize) -> Self {
        self.capture_memory = bytes.max(1);
        self
    }

    /// Bounds the bytes of f32 hidden states the task-loss importance pass
    /// holds at once (default
    /// [`DEFAULT_IMPORTANCE_MEMORY`](Self::DEFAULT_IMPORTANCE_MEMORY)). The
    /// pass keeps every block's input for the samples it is working on, so
    /// samples go through the model in chunks sized to fit this bound for
    /// the model's depth and hidden width (a longer sample alone), and the
    /// samples of a chunk run in parallel: a bound below a few samples'
    /// worth leaves cores idle. The chunking changes no bit of the result.
    /// 0 is read as 1 (one sample per chunk).
    pub fn with_importance_memory(mut self, bytes: usize) -> Self {
        self.importance_memory = bytes.max(1);
        self
    }

    /// Computes each layer's exact objective `tr((W - Q) H (W - Q)^T)`
    /// (and, for VLMQ methods, on an extra unweighted Hessian) for the
    /// report. Off by default: it costs about as much as the solve.
    pub fn with_layer_objectives(mut self, on: bool) -> Self {
        self.layer_objectives = on;
        self
    }

    /// Solves every quantized layer onto GGUF block type `ty` instead of the
    /// GPTQ grid: each layer gets [`GgufType::for_cols`] of its input width
    /// (llama.cpp's fallbacks), and the run's
    /// [`PipelineOutput::gguf`](super::PipelineOutput::gguf) holds the
    /// solutions. The scheme's bits and groups are then not used (a layer
    /// override of `None` still keeps a layer dense). Checked when the run
    /// starts: act-order needs static groups, GAR and a state directory are
    /// refused.
    pub fn with_gguf_type(mut self, ty: Option<GgufType>) -> Self {
        self.gguf_type = ty;
        self
    }

    /// The GGUF block type layers are solved onto, when set.
    pub fn gguf_type(&self) -> Option<GgufType> {
        self.gguf_type
    }

    /// Whether capture is true-sequential.
    pub fn true_sequential(&self) -> bool {
        self.true_sequential
    }

    /// The bound on tokens captured at once.
    pub fn capture_tokens(&self) -> usize {
        self.capture_tokens
    }

    /// The bound on the bytes of captured layer inputs held at once.
    pub fn capture_memory(&self) -> usize {
        self.capture_memory
    }

    /// The bound on the bytes of hidden states the importance pass holds.
    pub fn importance_memory(&self) -> usize {
        self.importance_memory
    }

    /// Whether layer objectives are computed.
    pub fn layer_objectives(&self) -> bool {
        self.layer_objectives
    }

    /// The method.
    pub fn method(&self) -> QuantMethod {
        self.method
    }

    /// Solver settings and default grid.
    pub fn solver(&self) -> &GptqConfig {
        &self.solver
    }

    /// GPTAQ's correction strength.
    pub fn gptaq_strength(&self) -> f32 {
        self.gptaq_strength
    }

    /// The importance options.
    pub fn importance(&self) -> &ImportanceOptions {
        &self.importance
    }

    /// The block selection.
    pub fn blocks(&self) -> &BlockSelection {
        &self.blocks
    }

    /// The per-layer grids.
    pub fn layer_overrides(&self) -> &BTreeMap<String, Option<QuantScheme>> {
        &self.layer_overrides
    }

    /// The state directory, when set.
    pub fn state_dir(&self) -> Option<&Path> {
        self.state_dir.as_deref()
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
        Some(self.solver.scheme())
    }

    /// The solver method of a layer, `None` for RTN.
    pub(crate) fn solver_method(&self) -> Option<Method> {
        self.method.solver_method(self.gptaq_strength)
    }

    /// A stable text naming every setting that changes the result (the
    /// resume fingerprint hashes it). The importance options count only for
    /// the methods that use them.
    pub(crate) fn description(&self) -> String {
        let importance = if self.method.needs_importance() {
            self.importance.description()
        } else {
            "none".into()
        };
        let overrides: Vec<String> = self
            .layer_overrides
            .iter()
            .map(|(k, v)| format!("{k}={v:?}"))
            .collect();
        let mut text = format!(
            "method={};solver={:?};gptaq_strength={};importance={};blocks={};overrides={}",
            self.method,
            self.solver,
            self.gptaq_strength,
            importance,
            self.blocks,
            overrides.join(",")
        );
        // Only when set, so that states saved before the option existed still match.
        if self.dead_layer_fallback == DeadLayerFallback::Rtn {
            text.push_str(";dead_layer_fallback=rtn");
        }
        if !self.true_sequential {
            text.push_str(";true_sequential=false");
        }
        if let Some(ty) = self.gguf_type {
            text.push_str(&format!(";gguf={ty}"));
        }
        text
    }
}
