//! The solve settings: Hessian damping, the group-fitting rule and the
//! GPTQ-family configuration around a [`QuantScheme`].

use super::{invalid, QuantScheme};
use crate::error::Result;

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
/// Checked as it is built: the setters that could make an inconsistent
/// configuration (a zero block size, group-aware ordering together with
/// act-order or static groups) return an
/// [`Error::InvalidConfig`](crate::Error::InvalidConfig) naming the
/// field, so a solver never re-validates it.
///
/// ```
/// use vlmq::{Bits, GptqConfig, GroupSize, QuantScheme};
/// let cfg = GptqConfig::new(QuantScheme::new(Bits::new(4)?).with_group_size(GroupSize::new(128)?))
///     .with_act_order(true)?;
/// assert_eq!(cfg.block_size(), 128);
/// assert!(cfg.act_order());
/// assert!(cfg.clone().with_act_group_aware(true).is_err());
/// assert!(cfg.with_block_size(0).is_err());
/// # Ok::<(), vlmq::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GptqConfig {
    scheme: QuantScheme,
    damping: Damping,
    block_size: usize,
    act_order: bool,
    act_group_aware: bool,
    static_groups: bool,
    compute_objective: bool,
    group_fit: GroupFit,
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

    /// Sets the integer grid.
    pub fn with_scheme(mut self, scheme: QuantScheme) -> Self {
        self.scheme = scheme;
        self
    }

    /// Sets the damping.
    pub fn with_damping(mut self, damping: Damping) -> Self {
        self.damping = damping;
        self
    }

    /// Sets the columns per lazy-update block; fails for 0.
    pub fn with_block_size(mut self, block_size: usize) -> Result<Self> {
        if block_size == 0 {
            return Err(invalid("block_size", 0, "must be positive"));
        }
        self.block_size = block_size;
        Ok(self)
    }

    /// Enables or disables act-order; fails when enabling it while
    /// group-aware ordering is on.
    pub fn with_act_order(mut self, act_order: bool) -> Result<Self> {
        if act_order && self.act_group_aware {
            return Err(invalid(
                "act_order",
                true,
                "act_group_aware orders the columns itself: turn act_group_aware off",
            ));
        }
        self.act_order = act_order;
        Ok(self)
    }

    /// Enables or disables group-aware activation ordering (GAR); fails
    /// when enabling it while act-order or static groups are on.
    pub fn with_act_group_aware(mut self, act_group_aware: bool) -> Result<Self> {
        if act_group_aware && self.act_order {
            return Err(invalid(
                "act_group_aware",
                true,
                "orders columns itself: turn act_order off",
            ));
        }
        if act_group_aware && self.static_groups {
            return Err(invalid(
                "act_group_aware",
                true,
                "fits each group when the walk reaches it: turn static_groups off",
            ));
        }
        self.act_group_aware = act_group_aware;
        Ok(self)
    }

    /// Enables or disables static groups; fails when enabling them while
    /// group-aware ordering is on.
    pub fn with_static_groups(mut self, static_groups: bool) -> Result<Self> {
        if static_groups && self.act_group_aware {
            return Err(invalid(
                "static_groups",
                true,
                "act_group_aware fits each group when the walk reaches it: turn act_group_aware off",
            ));
        }
        self.static_groups = static_groups;
        Ok(self)
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

    /// The integer grid.
    pub fn scheme(&self) -> QuantScheme {
        self.scheme
    }

    /// The Hessian damping.
    pub fn damping(&self) -> Damping {
        self.damping
    }

    /// Columns per lazy-update block (128 in the reference; positive).
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Whether columns are walked in order of decreasing Hessian diagonal.
    pub fn act_order(&self) -> bool {
        self.act_order
    }

    /// Whether group-aware activation ordering (GAR, GPTQModel's
    /// `act_group_aware`) is on: groups stay the contiguous runs of original
    /// columns, but the walk visits the groups in order of their largest
    /// Hessian diagonal entry and, inside a group, the columns in order of
    /// decreasing diagonal. The checkpoint needs no `g_idx` permutation.
    /// Never on together with act-order or static groups.
    pub fn act_group_aware(&self) -> bool {
        self.act_group_aware
    }

    /// Whether group parameters are fitted on the original weight before any
    /// update (required for act-order checkpoints whose groups stay
    /// contiguous).
    pub fn static_groups(&self) -> bool {
        self.static_groups
    }

    /// Whether the report carries the exact objective `tr((W - Q) H (W - Q)^T)`
    /// (one extra `m x n x n` product; the OBS loss is always reported).
    pub fn compute_objective(&self) -> bool {
        self.compute_objective
    }

    /// Which values a dynamic group is fitted on (the reference rule by
    /// default).
    pub fn group_fit(&self) -> GroupFit {
        self.group_fit
    }
}
