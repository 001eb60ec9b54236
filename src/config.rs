//! Checked configuration types.
//!
//! Every value here is validated when it is built, so a solver never sees an
//! out-of-range bit width, a zero group size or a damping outside (0, 1).
//! Properties that depend on a layer's shape (a layer must have inputs) are
//! checked by [`GroupSize::groups_for`] when the layer is known.

use std::num::NonZeroUsize;

use crate::error::{Error, Result};

/// A quantization bit width in `2..=8`.
///
/// ```
/// use vlmq::Bits;
/// let b = Bits::new(4)?;
/// assert_eq!(b.get(), 4);
/// assert_eq!(b.max_code(), 15);
/// assert!(Bits::new(9).is_err());
/// # Ok::<(), vlmq::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Bits(u8);

impl Bits {
    /// Checks `bits` and wraps it.
    pub fn new(bits: u32) -> Result<Self> {
        if (2..=8).contains(&bits) {
            Ok(Bits(bits as u8))
        } else {
            Err(Error::InvalidBits { bits })
        }
    }

    /// The bit width.
    pub fn get(self) -> u32 {
        u32::from(self.0)
    }

    /// The largest integer code, `2^bits - 1`.
    pub fn max_code(self) -> u32 {
        (1u32 << self.0) - 1
    }
}

/// How input columns share quantization parameters.
///
/// A group size need not divide the input width: group `k` holds inputs
/// `[k g, min((k + 1) g, n))` (in the order the solver walks them), so the
/// last group of a ragged layer is shorter, and `g_idx[i] = i / g` without
/// act-order, as GPTQModel does (576 inputs at `g = 128`: four groups of 128
/// and one of 64).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GroupSize {
    /// One scale and zero point per output row over all input columns.
    PerChannel,
    /// One scale and zero point per output row for every `g` input columns
    /// (the last group of a layer may be shorter).
    Columns(NonZeroUsize),
}

impl Default for GroupSize {
    /// Groups of 128 columns, the default of the GPTQ tools (and of
    /// [`QuantScheme::default`]).
    fn default() -> Self {
        GroupSize::Columns(NonZeroUsize::new(128).unwrap_or(NonZeroUsize::MIN))
    }
}

impl GroupSize {
    /// A group of `g` columns; `g` must be positive.
    pub fn new(g: usize) -> Result<Self> {
        NonZeroUsize::new(g)
            .map(GroupSize::Columns)
            .ok_or(Error::InvalidGroupSize {
                group_size: 0,
                in_features: 0,
                reason: "group size must be positive",
            })
    }

    /// Builds from the GPTQ convention where `-1` means per channel.
    pub fn from_gptq(g: i64) -> Result<Self> {
        match g {
            -1 => Ok(GroupSize::PerChannel),
            g if g > 0 => {
                GroupSize::new(usize::try_from(g).map_err(|_| Error::InvalidGroupSize {
                    group_size: usize::MAX,
                    in_features: 0,
                    reason: "group size does not fit in memory",
                })?)
            }
            _ => Err(Error::InvalidGroupSize {
                group_size: 0,
                in_features: 0,
                reason: "group size must be positive or -1 (per channel)",
            }),
        }
    }

    /// The GPTQ convention: `-1` for per channel, else the group size.
    pub fn to_gptq(self) -> i64 {
        match self {
            GroupSize::PerChannel => -1,
            GroupSize::Columns(g) => i64::try_from(g.get()).unwrap_or(i64::MAX),
        }
    }

    /// The group size, `None` per channel.
    pub fn get(self) -> Option<usize> {
        match self {
            GroupSize::PerChannel => None,
            GroupSize::Columns(g) => Some(g.get()),
        }
    }

    /// Columns per (full) group for a layer with `in_features` inputs: the
    /// group size, or `in_features` per channel or when the group is wider
    /// than the layer. Fails only for a layer without inputs.
    pub fn columns_for(self, in_features: usize) -> Result<usize> {
        self.groups_for(in_features)?;
        Ok(match self {
            GroupSize::PerChannel => in_features,
            GroupSize::Columns(g) => g.get().min(in_features),
        })
    }

    /// Number of groups for a layer with `in_features` inputs,
    /// `ceil(in_features / g)` (the last group may be shorter). Fails only
    /// for a layer without inputs.
    pub fn groups_for(self, in_features: usize) -> Result<usize> {
        if in_features == 0 {
            return Err(Error::InvalidGroupSize {
                group_size: self.get().unwrap_or(0),
                in_features,
                reason: "a layer needs at least one input feature",
            });
        }
        Ok(match self {
            GroupSize::PerChannel => 1,
            GroupSize::Columns(g) => in_features.div_ceil(g.get()),
        })
    }
}

/// How a group's scale is held while solving.
///
/// GPTQ checkpoints store scales in f16. [`ScalePrecision::F16`] rounds each
/// fitted scale up to the next f16 value before it is used, so the solver
/// optimizes exactly the weights a checkpoint stores. [`ScalePrecision::F32`]
/// solves with the f32 scale as the reference implementation does (which
/// rounds only when packing); its scales must be rounded with
/// [`QuantizedWeight::with_f16_scales`](crate::QuantizedWeight::with_f16_scales)
/// before they can be written, which changes the stored weights slightly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ScalePrecision {
    /// Scales rounded up to f16 while solving (the default).
    #[default]
    F16,
    /// Scales kept in f32 while solving, like the reference.
    F32,
}

/// Settings of the optional MSE clip search: the grid range is shrunk by
/// factors `1 - k / grid` for `k < max_shrink * grid`, and per output row the
/// factor with the lowest `sum |q - w|^norm` wins.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MseClip {
    grid: u32,
    max_shrink: f32,
    norm: f32,
}

impl MseClip {
    /// Checks and builds the search settings.
    pub fn new(grid: u32, max_shrink: f32, norm: f32) -> Result<Self> {
        if grid == 0 {
            return Err(invalid("mse.grid", grid, "must be positive"));
        }
        if !(max_shrink > 0.0 && max_shrink < 1.0) {
            return Err(invalid("mse.max_shrink", max_shrink, "must be in (0, 1)"));
        }
        if !(norm.is_finite() && norm > 0.0) {
            return Err(invalid("mse.norm", norm, "must be finite and > 0"));
        }
        Ok(MseClip {
            grid,
            max_shrink,
            norm,
        })
    }

    /// Number of grid points per unit of shrink.
    pub fn grid(&self) -> u32 {
        self.grid
    }

    /// Largest fraction by which the range may shrink.
    pub fn max_shrink(&self) -> f32 {
        self.max_shrink
    }

    /// Exponent of the error norm.
    pub fn norm(&self) -> f32 {
        self.norm
    }
}

impl Default for MseClip {
    /// The reference GPTQ settings: grid 100, shrink up to 0.8, norm 2.4.
    fn default() -> Self {
        MseClip {
            grid: 100,
            max_shrink: 0.8,
            norm: 2.4,
        }
    }
}

/// The integer grid: bit width, grouping, symmetry and clip search.
///
/// ```
/// use vlmq::{Bits, GroupSize, QuantScheme};
/// let scheme = QuantScheme::new(Bits::new(3)?).with_group_size(GroupSize::new(64)?);
/// assert_eq!(scheme.bits.get(), 3);
/// # Ok::<(), vlmq::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuantScheme {
    /// Bit width.
    pub bits: Bits,
    /// Column grouping.
    pub group_size: GroupSize,
    /// Symmetric grid (zero point fixed at `(max_code + 1) / 2`) instead of asymmetric.
    pub symmetric: bool,
    /// Optional MSE clip search.
    pub mse: Option<MseClip>,
    /// Scale precision while solving (f16 by default).
    pub scale_precision: ScalePrecision,
}

impl Default for QuantScheme {
    /// The one set of defaults shared by the library, the `vlmq` command and
    /// recipe files: 4 bits, groups of 128 columns, symmetric, no clip
    /// search, f16 scales.
    ///
    /// ```
    /// let s = vlmq::QuantScheme::default();
    /// assert_eq!((s.bits.get(), s.group_size.to_gptq(), s.symmetric), (4, 128, true));
    /// ```
    fn default() -> Self {
        QuantScheme::new(Bits(4))
            .with_group_size(GroupSize::default())
            .with_symmetric(true)
    }
}

impl QuantScheme {
    /// A bare grid of `bits`: asymmetric, per channel, no clip search (set
    /// the rest with the `with_*` methods; [`QuantScheme::default`] is the
    /// usual 4-bit, group-128, symmetric grid).
    pub fn new(bits: Bits) -> Self {
        QuantScheme {
            bits,
            group_size: GroupSize::PerChannel,
            symmetric: false,
            mse: None,
            scale_precision: ScalePrecision::F16,
        }
    }

    /// Sets the grouping.
    pub fn with_group_size(mut self, group_size: GroupSize) -> Self {
        self.group_size = group_size;
        self
    }

    /// Sets symmetric or asymmetric.
    pub fn with_symmetric(mut self, symmetric: bool) -> Self {
        self.symmetric = symmetric;
        self
    }

    /// Enables the MSE clip search.
    pub fn with_mse(mut self, mse: MseClip) -> Self {
        self.mse = Some(mse);
        self
    }

    /// Sets the scale precision used while solving.
    pub fn with_scale_precision(mut self, precision: ScalePrecision) -> Self {
        self.scale_precision = precision;
        self
    }
}

/// Relative damping of the Hessian and how it grows when a factorization fails.
///
/// The first attempt adds `percent * mean(diag H)` to the diagonal; each retry
/// multiplies `percent` by `growth`, for at most `max_attempts` attempts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Damping {
    percent: f64,
    growth: f64,
    max_attempts: u32,
}

impl Damping {
    /// Checks and builds: `percent` in (0, 1), `growth > 1`, `max_attempts >= 1`.
    pub fn new(percent: f64, growth: f64, max_attempts: u32) -> Result<Self> {
        if !(percent > 0.0 && percent < 1.0) {
            return Err(invalid("damping.percent", percent, "must be in (0, 1)"));
        }
        if !(growth.is_finite() && growth > 1.0) {
            return Err(invalid("damping.growth", growth, "must be finite and > 1"));
        }
        if max_attempts == 0 {
            return Err(invalid(
                "damping.max_attempts",
                max_attempts,
                "must be >= 1",
            ));
        }
        Ok(Damping {
            percent,
            growth,
            max_attempts,
        })
    }

    /// `percent` with the default growth (x10) and attempts (5).
    pub fn percent(percent: f64) -> Result<Self> {
        Damping::new(percent, 10.0, 5)
    }

    /// Relative damping of the first attempt.
    pub fn initial_percent(&self) -> f64 {
        self.percent
    }

    /// Factor applied to the relative damping on each retry.
    pub fn growth(&self) -> f64 {
        self.growth
    }

    /// Maximum number of factorization attempts.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }
}

impl Default for Damping {
    /// 1% of the mean diagonal, x10 per retry, 5 attempts.
    fn default() -> Self {
        Damping {
            percent: 0.01,
            growth: 10.0,
            max_attempts: 5,
        }
    }
}

/// When and on which values a dynamic group's scale and zero point are fitted.
///
/// Both fit a group when the column walk reaches its first column `c`, over
/// the columns `c .. c + g` of the walk; they differ in which values of those
/// columns they see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum GroupFit {
    /// The reference rule (GPTQ's `fasterquant`): the values as they stood
    /// at the start of the current lazy-update block, with every earlier
    /// block's updates applied but not this block's in-block updates. Blocks
    /// are plain runs of `block_size` columns.
    #[default]
    BlockStart,
    /// The values with every update so far applied, in-block ones included.
    /// Blocks are aligned to groups (a multiple of the group size, or every
    /// group start opens a block) so that a group never straddles a block end.
    Updated,
}

/// Configuration of a GPTQ-family solve.
///
/// ```
/// use vlmq::{Bits, GptqConfig, GroupSize, QuantScheme};
/// let cfg = GptqConfig::new(QuantScheme::new(Bits::new(4)?).with_group_size(GroupSize::new(128)?))
///     .with_act_order(true);
/// assert_eq!(cfg.block_size, 128);
/// # Ok::<(), vlmq::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GptqConfig {
    /// The integer grid.
    pub scheme: QuantScheme,
    /// Hessian damping.
    pub damping: Damping,
    /// Columns per lazy-update block (128 in the reference); must be positive.
    pub block_size: usize,
    /// Process columns in order of decreasing Hessian diagonal.
    pub act_order: bool,
    /// Group-aware activation ordering (GAR, GPTQModel's `act_group_aware`):
    /// groups stay the contiguous runs of original columns, but the walk
    /// visits the groups in order of their largest Hessian diagonal entry
    /// and, inside a group, the columns in order of decreasing diagonal.
    /// The checkpoint needs no `g_idx` permutation. Excludes `act_order`.
    pub act_group_aware: bool,
    /// Fit group parameters on the original weight before any update
    /// (required for act-order checkpoints whose groups stay contiguous).
    pub static_groups: bool,
    /// Compute the exact objective `tr((W - Q) H (W - Q)^T)` for the report.
    /// Costs one extra `m x n x n` product; the OBS loss is always reported.
    pub compute_objective: bool,
    /// Which values a dynamic group is fitted on (the reference rule by default).
    pub group_fit: GroupFit,
}

impl Default for GptqConfig {
    /// [`GptqConfig::new`] on [`QuantScheme::default`]: 4 bits, groups of
    /// 128, symmetric, damping 0.01 of the mean diagonal.
    fn default() -> Self {
        GptqConfig::new(QuantScheme::default())
    }
}

impl GptqConfig {
    /// Default solve settings for a scheme: damping 1%, blocks of 128, no
    /// act-order, dynamic groups fitted by the reference rule, exact
    /// objective reported.
    pub fn new(scheme: QuantScheme) -> Self {
        GptqConfig {
            scheme,
            damping: Damping::default(),
            block_size: 128,
            act_order: false,
            act_group_aware: false,
            static_groups: false,
            compute_objective: true,
            group_fit: GroupFit::BlockStart,
        }
    }

    /// Sets the damping.
    pub fn with_damping(mut self, damping: Damping) -> Self {
        self.damping = damping;
        self
    }

    /// Sets the block size (checked at solve time to be positive).
    pub fn with_block_size(mut self, block_size: usize) -> Self {
        self.block_size = block_size;
        self
    }

    /// Enables or disables act-order.
    pub fn with_act_order(mut self, act_order: bool) -> Self {
        self.act_order = act_order;
        self
    }

    /// Enables or disables group-aware activation ordering (GAR).
    pub fn with_act_group_aware(mut self, act_group_aware: bool) -> Self {
        self.act_group_aware = act_group_aware;
        self
    }

    /// Enables or disables static groups.
    pub fn with_static_groups(mut self, static_groups: bool) -> Self {
        self.static_groups = static_groups;
        self
    }

    /// Sets the group-fitting rule.
    pub fn with_group_fit(mut self, group_fit: GroupFit) -> Self {
        self.group_fit = group_fit;
        self
    }

    /// Enables or disables the exact objective in the report.
    pub fn with_objective(mut self, compute: bool) -> Self {
        self.compute_objective = compute;
        self
    }

    /// Checks the fields that are not checked by their types.
    pub fn validate(&self) -> Result<()> {
        if self.block_size == 0 {
            return Err(invalid("block_size", 0, "must be positive"));
        }
        if self.act_group_aware && self.act_order {
            return Err(invalid(
                "act_group_aware",
                true,
                "orders columns itself: turn act_order off",
            ));
        }
        if self.act_group_aware && self.static_groups {
            return Err(invalid(
                "act_group_aware",
                true,
                "fits each group when the walk reaches it: turn static_groups off",
            ));
        }
        Ok(())
    }
}

fn invalid(field: &'static str, value: impl std::fmt::Display, reason: &'static str) -> Error {
    Error::InvalidConfig {
        field,
        value: value.to_string(),
        reason,
    }
}
