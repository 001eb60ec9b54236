//! The column order, lazy-update blocks and group layout of one solve.

use std::ops::Range;

use ndarray::ArrayView2;

use crate::config::{GptqConfig, GroupFit};
use crate::error::Result;

/// Column order of act-order: decreasing Hessian diagonal, ties kept in
/// natural order (a stable sort), so the permutation is deterministic.
/// Returns `perm` with `perm[p]` = original column at position `p`.
pub fn act_order_permutation(hessian: ArrayView2<'_, f32>) -> Vec<usize> {
    let diag = hessian.diag();
    let mut perm: Vec<usize> = (0..diag.len()).collect();
    perm.sort_by(|&a, &b| diag[b].total_cmp(&diag[a]));
    perm
}

/// Column order of group-aware activation ordering (GAR, GPTQModel's
/// `act_group_aware`). The full groups of `group_cols` original columns are
/// visited in order of decreasing largest diagonal entry (ties in natural
/// order), each group's columns in order of decreasing diagonal (ties in
/// natural order); the columns of a ragged last group follow in natural
/// order. Every group stays a contiguous run of walk positions, so groups
/// keep their original columns and `g_idx` stays `column / group_cols`.
/// Returns `perm` with `perm[p]` = original column at position `p`.
pub fn group_aware_permutation(hessian: ArrayView2<'_, f32>, group_cols: usize) -> Vec<usize> {
    let diag = hessian.diag();
    let n = diag.len();
    let full = n.checked_div(group_cols).unwrap_or(0);
    let groups: Vec<Vec<usize>> = (0..full)
        .map(|g| {
            let mut cols: Vec<usize> = (g * group_cols..(g + 1) * group_cols).collect();
            cols.sort_by(|&a, &b| diag[b].total_cmp(&diag[a]));
            cols
        })
        .collect();
    let mut order: Vec<usize> = (0..full).collect();
    order.sort_by(|&a, &b| diag[groups[b][0]].total_cmp(&diag[groups[a][0]]));
    let mut perm: Vec<usize> = order
        .iter()
        .flat_map(|&g| groups[g].iter().copied())
        .collect();
    perm.extend(full * group_cols..n);
    perm
}

/// The walk's column order for `cfg`: act-order, GAR or natural. Dead
/// columns must already carry a positive diagonal entry.
pub(crate) fn column_order(hessian: ArrayView2<'_, f32>, cfg: &GptqConfig) -> Result<Vec<usize>> {
    let n = hessian.nrows();
    Ok(if cfg.act_order() {
        act_order_permutation(hessian)
    } else if cfg.act_group_aware() {
        group_aware_permutation(hessian, cfg.scheme().group_size().columns_for(n)?)
    } else {
        (0..n).collect()
    })
}

/// Everything about the column walk that does not depend on the weights.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    /// `perm[p]` = original column processed at position `p`.
    pub perm: Vec<usize>,
    /// Lazy-update blocks over positions (under [`GroupFit::Updated`], no
    /// dynamic group straddles a block end).
    pub blocks: Vec<Range<usize>>,
    /// Columns per full group (the last group may be shorter).
    pub group_cols: usize,
    /// Columns whose groups are fitted together (a multiple of
    /// `group_cols`: one group for GPTQ's grid, a super-block for the GGUF
    /// K-quants).
    pub fit_cols: usize,
    /// Groups are fitted once on the original weight, by original column.
    pub static_groups: bool,
    /// Groups are named by original column even though they are fitted as
    /// the walk reaches them (static groups, and GAR's whole-group order).
    pub original_groups: bool,
    /// Which values a dynamic group is fitted on.
    pub group_fit: GroupFit,
}

impl Plan {
    pub fn new(
        perm: Vec<usize>,
        block_size: usize,
        group_cols: usize,
        static_groups: bool,
        group_fit: GroupFit,
    ) -> Self {
        Self::with_fit_span(
            perm,
            block_size,
            group_cols,
            group_cols,
            static_groups,
            group_fit,
        )
    }

    /// A plan whose groups are fitted `fit_cols` columns at a time (a
    /// multiple of `group_cols`); under [`GroupFit::Updated`] no fitted span
    /// straddles a block end.
    pub fn with_fit_span(
        perm: Vec<usize>,
        block_size: usize,
        group_cols: usize,
        fit_cols: usize,
        static_groups: bool,
        group_fit: GroupFit,
    ) -> Self {
        let n = perm.len();
        let aligned = !static_groups && group_fit == GroupFit::Updated;
        let blocks = block_ranges(n, block_size, fit_cols, !aligned);
        Plan {
            perm,
            blocks,
            group_cols,
            fit_cols,
            static_groups,
            original_groups: static_groups,
            group_fit,
        }
    }

    /// Names groups by original column (GAR: every group is a contiguous
    /// run of walk positions holding one original group).
    pub fn with_original_groups(mut self, original_groups: bool) -> Self {
        self.original_groups |= original_groups;
        self
    }

    /// Group of the column at position `p`.
    #[inline]
    pub fn group_at(&self, p: usize) -> usize {
        if self.original_groups {
            self.perm[p] / self.group_cols
        } else {
            p / self.group_cols
        }
    }

    /// Whether a dynamic span of groups is fitted when position `p` is
    /// reached.
    #[inline]
    pub fn fits_group_at(&self, p: usize) -> bool {
        !self.static_groups && p.is_multiple_of(self.fit_cols)
    }

    /// Group index of each original column (`g_idx`).
    pub fn g_idx(&self) -> Vec<u32> {
        let mut g = vec![0u32; self.perm.len()];
        for (p, &c) in self.perm.iter().enumerate() {
            g[c] = self.group_at(p) as u32;
        }
        g
    }
}

/// Block boundaries. With `plain`, runs of `block_size` columns (static
/// groups, and the reference's block-start fitting rule). Otherwise a
/// dynamic group is fitted on fully updated columns, which needs it never to
/// straddle a block end, so: with groups no wider than a block, blocks are
/// the largest multiple of the group width not above `block_size`; with
/// wider groups, every group start also starts a block (at a block start,
/// all earlier updates have reached every later column). A ragged last group
/// ends at `n`, which always ends a block.
fn block_ranges(n: usize, block_size: usize, group_cols: usize, plain: bool) -> Vec<Range<usize>> {
    let mut blocks = Vec::new();
    let mut start = 0;
    while start < n {
        let mut end = if plain || group_cols > block_size {
            start + block_size
        } else {
            start + (block_size / group_cols) * group_cols
        };
        if !plain && group_cols > block_size {
            end = end.min((start / group_cols + 1) * group_cols);
        }
        let end = end.min(n);
        blocks.push(start..end);
        start = end;
    }
    blocks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_align_with_narrow_groups() {
        let b = block_ranges(100, 30, 8, false);
        assert_eq!(b[0], 0..24);
        assert!(b.iter().all(|r| r.start % 8 == 0));
        assert_eq!(b.last().unwrap().end, 100);
    }

    #[test]
    fn wide_groups_start_blocks() {
        let b = block_ranges(96, 20, 48, false);
        assert_eq!(b, vec![0..20, 20..40, 40..48, 48..68, 68..88, 88..96]);
    }

    #[test]
    fn static_groups_use_plain_blocks() {
        assert_eq!(block_ranges(10, 4, 2, true), vec![0..4, 4..8, 8..10]);
    }

    #[test]
    fn act_order_is_stable_descending() {
        let h = ndarray::array![[1.0f32, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0]];
        assert_eq!(act_order_permutation(h.view()), vec![1, 0, 2]);
    }
}
