//! The integer grid: bit width, column grouping, scale precision, clip
//! search, and the scheme that holds them.

use std::num::NonZeroUsize;

use super::invalid;
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
/// Every part is a checked type, so any value of `QuantScheme` is a valid
/// grid; build it with [`QuantScheme::new`] or [`QuantScheme::default`] and
/// the `with_*` methods, read it with the getters.
///
/// ```
/// use vlmq::{Bits, GroupSize, QuantScheme};
/// let scheme = QuantScheme::new(Bits::new(3)?).with_group_size(GroupSize::new(64)?);
/// assert_eq!(scheme.bits().get(), 3);
/// assert_eq!(scheme.group_size().get(), Some(64));
/// # Ok::<(), vlmq::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuantScheme {
    bits: Bits,
    group_size: GroupSize,
    symmetric: bool,
    mse: Option<MseClip>,
    scale_precision: ScalePrecision,
}

impl Default for QuantScheme {
    /// The one set of defaults shared by the library, the `vlmq` command and
    /// recipe files: 4 bits, groups of 128 columns, symmetric, no clip
    /// search, f16 scales.
    ///
    /// ```
    /// let s = vlmq::QuantScheme::default();
    /// assert_eq!((s.bits().get(), s.group_size().to_gptq(), s.symmetric()), (4, 128, true));
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

    /// Sets the bit width.
    pub fn with_bits(mut self, bits: Bits) -> Self {
        self.bits = bits;
        self
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

    /// Turns the MSE clip search off.
    pub fn without_mse(mut self) -> Self {
        self.mse = None;
        self
    }

    /// Sets the scale precision used while solving.
    pub fn with_scale_precision(mut self, precision: ScalePrecision) -> Self {
        self.scale_precision = precision;
        self
    }

    /// The bit width.
    pub fn bits(&self) -> Bits {
        self.bits
    }

    /// The column grouping.
    pub fn group_size(&self) -> GroupSize {
        self.group_size
    }

    /// Symmetric grid (zero point fixed at `(max_code + 1) / 2`) instead of
    /// asymmetric.
    pub fn symmetric(&self) -> bool {
        self.symmetric
    }

    /// The MSE clip search, if enabled.
    pub fn mse(&self) -> Option<MseClip> {
        self.mse
    }

    /// The scale precision while solving (f16 by default).
    pub fn scale_precision(&self) -> ScalePrecision {
        self.scale_precision
    }
}
