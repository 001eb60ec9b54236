//! The crate's single error type.
//!
//! Every fallible public function returns [`Result<T>`]. Variants carry the
//! structured facts a caller needs to react (which tensor, which shape, which
//! block and layer), and their `Display` text is a complete sentence.

use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in `vlmq`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A bit width outside the supported range 2..=8.
    #[error("invalid bit width {bits}: supported widths are 2..=8")]
    InvalidBits {
        /// The rejected width.
        bits: u32,
    },
    /// A group size that is zero, or one applied to a layer without inputs or
    /// to a number of groups it does not imply.
    #[error("invalid group size {group_size} for {in_features} input features: {reason}")]
    InvalidGroupSize {
        /// The rejected group size.
        group_size: usize,
        /// Input features of the layer it was applied to (0 when not yet known).
        in_features: usize,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A configuration value outside its documented range.
    #[error("invalid configuration: {field} = {value}: {reason}")]
    InvalidConfig {
        /// The field name.
        field: &'static str,
        /// The rejected value, formatted.
        value: String,
        /// The accepted range or rule.
        reason: &'static str,
    },
    /// Two arrays whose shapes must agree do not.
    #[error("shape mismatch in {what}: expected {expected:?}, got {actual:?}")]
    ShapeMismatch {
        /// What was being checked.
        what: String,
        /// The expected shape.
        expected: Vec<usize>,
        /// The shape that was passed.
        actual: Vec<usize>,
    },
    /// NaN or infinity in an input.
    #[error("non-finite value (NaN or infinity) in {what} at index {index:?}")]
    NonFinite {
        /// Which input.
        what: String,
        /// Position of the first offending value.
        index: Vec<usize>,
    },
    /// An input that must not be empty is empty.
    #[error("empty input: {what}")]
    Empty {
        /// Which input.
        what: String,
    },
    /// The Hessian could not be factorized even after the damping retries.
    #[error(
        "Hessian of size {dim} is not positive definite even with damping {last_damp_percent} \
         (x mean diagonal) after {attempts} attempts"
    )]
    IndefiniteHessian {
        /// Size of the Hessian.
        dim: usize,
        /// The largest relative damping that was tried.
        last_damp_percent: f64,
        /// How many factorizations were attempted.
        attempts: usize,
    },
    /// A negative or non-finite importance factor.
    #[error(
        "invalid importance factor {value} for token {token}: factors must be finite and >= 0"
    )]
    InvalidImportance {
        /// Token index.
        token: usize,
        /// The rejected value.
        value: f32,
    },
    /// A checkpoint file that is truncated, inconsistent or otherwise unreadable.
    #[error("corrupt checkpoint {path:?}: {reason}")]
    CorruptCheckpoint {
        /// File involved (empty when reading from memory).
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A tensor that was expected in a checkpoint is missing.
    #[error("tensor {name:?} is missing")]
    MissingTensor {
        /// Tensor name.
        name: String,
    },
    /// A tensor with the wrong dtype.
    #[error("tensor {name:?} has dtype {actual}, expected {expected}")]
    DtypeMismatch {
        /// Tensor name.
        name: String,
        /// Expected dtype(s).
        expected: String,
        /// Dtype found.
        actual: String,
    },
    /// A quantized weight that cannot be stored in the requested format.
    #[error("cannot encode {what}: {reason}")]
    Unencodable {
        /// What was being encoded.
        what: String,
        /// Why it cannot be.
        reason: String,
    },
    /// A failure inside a model backend, with the block and layer it concerns.
    #[error("backend error in block {block}{}: {reason}", layer.as_ref().map(|l| format!(", layer {l:?}")).unwrap_or_default())]
    Backend {
        /// Block index.
        block: usize,
        /// Layer name, when the failure concerns one layer.
        layer: Option<String>,
        /// What happened.
        reason: String,
    },
    /// Pipeline state on disk that belongs to a different run.
    #[error("cannot resume from {path:?}: {reason}")]
    StateMismatch {
        /// The state directory.
        path: PathBuf,
        /// What differs.
        reason: String,
    },
    /// A directory another process is writing (its lock file names the holder).
    #[error(
        "{path:?} is locked by another vlmq process ({holder}); wait for it to finish, or \
         stop it (a lock whose process died is taken over automatically)"
    )]
    Locked {
        /// The lock file.
        path: PathBuf,
        /// The holder recorded in the lock file (process id, host, start time).
        holder: String,
    },
    /// A directory was replaced, but its previous content, renamed aside,
    /// could not be removed: the new content is complete at `dir`.
    #[error(
        "{dir:?} holds the new content, but its previous content, moved aside to {left:?}, \
         could not be removed ({reason}); remove {left:?} by hand"
    )]
    LeftBehind {
        /// The directory that now holds the new content.
        dir: PathBuf,
        /// The leftover previous content.
        left: PathBuf,
        /// Why it could not be removed.
        reason: String,
    },
    /// Names in the configuration that the model does not have (layer
    /// override keys, block indices, block name prefixes).
    #[error("unknown {what}: {}; the model has {known}", names.join(", "))]
    UnknownNames {
        /// What kind of name (`"layer override keys"`, `"block indices"`, ...).
        what: &'static str,
        /// Every unknown name.
        names: Vec<String>,
        /// What the model has instead (a summary).
        known: String,
    },
    /// The backend lacks a capability the configuration needs.
    #[error("{what} is not supported by this backend: {remedy}")]
    Unsupported {
        /// What was asked for.
        what: String,
        /// How to make it work.
        remedy: String,
    },
    /// A layer whose every input column is dead: all its calibration inputs
    /// are zero (or underflow), so its Hessian is zero and any weight is as
    /// good as any other; quantizing it would give all zeros.
    #[error(
        "every one of the layer's {in_features} input columns is dead (its {tokens} calibration \
         tokens are all zero or underflow), so the calibration data says nothing about it; use \
         calibration samples that reach this layer, keep it in full precision with a layer \
         override, or opt in to round-to-nearest with \
         PipelineConfig::with_dead_layer_fallback(DeadLayerFallback::Rtn)"
    )]
    DeadLayer {
        /// Input columns of the layer (all dead).
        in_features: usize,
        /// Calibration tokens in the layer's statistics.
        tokens: usize,
    },
    /// A run was cancelled by the caller's progress callback.
    #[error("cancelled by the caller")]
    Cancelled,
    /// An error inside one block of a model, with where it happened; the
    /// original error is `source` (see [`Error::root`]).
    #[error(
        "in block {block_name} (index {block}){}{}: {source}",
        layer.as_ref().map(|l| format!(", layer {l}")).unwrap_or_default(),
        sample.map(|s| format!(", calibration sample {s}")).unwrap_or_default()
    )]
    InBlock {
        /// Block index.
        block: usize,
        /// Block name as the backend reports it.
        block_name: String,
        /// The linear layer concerned, when the failure concerns one.
        layer: Option<String>,
        /// The calibration sample concerned, when the failure concerns one.
        sample: Option<usize>,
        /// The original error.
        #[source]
        source: Box<Error>,
    },
    /// An error outside the blocks (embedding or task loss) of one
    /// calibration sample; the original error is `source`.
    #[error("calibration sample {sample} ({stage}): {source}")]
    InSample {
        /// Index of the sample in the calibration set.
        sample: usize,
        /// The step that failed (`"embedding"`, `"task loss"`).
        stage: &'static str,
        /// The original error.
        #[source]
        source: Box<Error>,
    },
    /// An I/O failure.
    #[error("I/O error on {path:?}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A safetensors-level parse or serialization failure.
    #[error("safetensors error in {path:?}: {reason}")]
    Safetensors {
        /// The file involved.
        path: PathBuf,
        /// The underlying message.
        reason: String,
    },
    /// A field of an input file (a recipe, a calibration file, a model's
    /// configuration) that is missing, malformed or out of range. `field`
    /// names where in the file (`bits`, `line 3: text`); the message is one
    /// line.
    #[error("{}: {field}: {reason}", path.display())]
    InvalidField {
        /// The file involved.
        path: PathBuf,
        /// Where in the file: a key, or a line and a key.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// A JSON config that is malformed or has inconsistent fields.
    #[error("invalid JSON config {path:?}: {reason}")]
    Json {
        /// The file involved.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl Error {
    /// The original error under any [`InBlock`](Error::InBlock) /
    /// [`InSample`](Error::InSample) context, so that
    /// `matches!(e.root(), Error::IndefiniteHessian { .. })` works on an
    /// error returned by [`quantize_model`](crate::quantize_model).
    pub fn root(&self) -> &Error {
        match self {
            Error::InBlock { source, .. } | Error::InSample { source, .. } => source.root(),
            other => other,
        }
    }

    /// Owned form of [`root`](Error::root): drops the context.
    pub fn into_root(self) -> Error {
        match self {
            Error::InBlock { source, .. } | Error::InSample { source, .. } => source.into_root(),
            other => other,
        }
    }

    /// Shape-mismatch helper.
    pub fn shape(what: impl Into<String>, expected: &[usize], actual: &[usize]) -> Self {
        Error::ShapeMismatch {
            what: what.into(),
            expected: expected.to_vec(),
            actual: actual.to_vec(),
        }
    }

    /// [`InvalidField`](Error::InvalidField) helper.
    pub fn field(
        path: impl Into<PathBuf>,
        field: impl Into<String>,
        reason: impl std::fmt::Display,
    ) -> Self {
        Error::InvalidField {
            path: path.into(),
            field: field.into(),
            reason: reason.to_string(),
        }
    }

    /// I/O helper that records the path (for the checkpoint and pipeline modules).
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
