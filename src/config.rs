//! Checked configuration types.
//!
//! Every value here is validated when it is built, so a solver never sees an
//! out-of-range bit width, a zero group size or a damping outside (0, 1).
//! Properties that depend on a layer's shape (a group size must divide the
//! number of input features) are checked by [`GroupSize::groups_for`] when the
//! layer is known.

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum GroupSize {
    /// One scale and zero point per output row over all input columns.
    #[default]
    PerChannel,
    /// One scale and zero point per output row for every `g` input columns.
    Columns(usize),
}

impl GroupSize {
    /// A group of `g` columns; `g` must be positive.
    pub fn new(g: usize) -> Result<Self> {
        if g == 0 {
            return Err(Error::InvalidGroupSize {
                group_size: 0,
                in_features: 0,
                reason: "group size must be positive",
            });
        }
        Ok(GroupSize::Columns(g))
    }

    /// Builds from the GPTQ convention where `-1` means per channel.
    pub fn from_gptq(g: i64) -> Result<Self> {
        match g {
            -1 => Ok(GroupSize::PerChannel),
            g if g > 0 => GroupSize::new(g as usize),
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
            GroupSize::Columns(g) => g as i64,
        }
    }

    /// Columns per group for a layer with `in_features` inputs.
    pub fn columns_for(self, in_features: usize) -> Result<usize> {
        self.groups_for(in_features)?;
        Ok(match self {
            GroupSize::PerChannel => in_features,
            GroupSize::Columns(g) => g,
        })
    }

    /// Number of groups for a layer with `in_features` inputs, or an error when
    /// the group size does not divide `in_features`.
    pub fn groups_for(self, in_features: usize) -> Result<usize> {
        match self {
            GroupSize::PerChannel => Ok(1),
            GroupSize::Columns(g) if g > 0 && in_features % g == 0 && in_features > 0 => {
                Ok(in_features / g)
            }
            GroupSize::Columns(g) => Err(Error::InvalidGroupSize {
                group_size: g,
                in_features,
                reason: "group size must be positive and divide the number of input features",
            }),
        }
    }
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
}

impl QuantScheme {
    /// Asymmetric, per channel, no clip search.
    pub fn new(bits: Bits) -> Self {
        QuantScheme {
            bits,
            group_size: GroupSize::PerChannel,
            symmetric: false,
            mse: None,
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
    /// Fit group parameters on the original weight before any update
    /// (required for act-order checkpoints whose groups stay contiguous).
    pub static_groups: bool,
    /// Compute the exact objective `tr((W - Q) H (W - Q)^T)` for the report.
    /// Costs one extra `m x n x n` product; the OBS loss is always reported.
    pub compute_objective: bool,
}

impl GptqConfig {
    /// Default solve settings for a scheme: damping 1%, blocks of 128, no
    /// act-order, dynamic groups, exact objective reported.
    pub fn new(scheme: QuantScheme) -> Self {
        GptqConfig {
            scheme,
            damping: Damping::default(),
            block_size: 128,
            act_order: false,
            static_groups: false,
            compute_objective: true,
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

    /// Enables or disables static groups.
    pub fn with_static_groups(mut self, static_groups: bool) -> Self {
        self.static_groups = static_groups;
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
