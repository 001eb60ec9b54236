//! Where each patch of an image sits: the patch grid of every image, the
//! 2-D rotary positions of the patches, the attention segments (whole
//! images, or Qwen2.5-VL's windows) and the window permutation.
//!
//! Patches arrive merge-block by merge-block: the `m x m` blocks of an
//! image row-major (`m = spatial_merge_size`), the `m * m` patches of a
//! block row-major, images (and their frames) one after another.

use vlmq::{Error, Result};

/// An image's patch grid: frames (temporal patches), rows and columns of patches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageGrid {
    /// Temporal patches (1 for a still image).
    pub t: usize,
    /// Patch rows.
    pub h: usize,
    /// Patch columns.
    pub w: usize,
}

impl ImageGrid {
    /// Patches of the image.
    pub fn patches(&self) -> usize {
        self.t * self.h * self.w
    }

    /// Language-model tokens of the image after merging `merge x merge` patches.
    pub fn tokens(&self, merge: usize) -> usize {
        self.patches() / (merge * merge)
    }

    /// Checks that the grid is non-empty and divisible by the merge size.
    pub(crate) fn check(&self, merge: usize) -> Result<()> {
        if self.patches() == 0 || !self.h.is_multiple_of(merge) || !self.w.is_multiple_of(merge) {
            return Err(Error::InvalidConfig {
                field: "image_grid_thw",
                value: format!("[{}, {}, {}]", self.t, self.h, self.w),
                reason: "every grid side must be positive and the rows and columns multiples of the spatial merge size",
            });
        }
        Ok(())
    }
}

/// The `(row, col)` of every patch in the patch order of the module docs.
pub fn vision_position_ids(grids: &[ImageGrid], merge: usize) -> Vec<[usize; 2]> {
    let mut out = Vec::new();
    for g in grids {
        for _ in 0..g.t {
            for br in 0..g.h / merge {
                for bc in 0..g.w / merge {
                    for r in 0..merge {
                        for c in 0..merge {
                            out.push([br * merge + r, bc * merge + c]);
                        }
                    }
                }
            }
        }
    }
    out
}

/// Cumulative patch counts at image-frame boundaries (`cu_seqlens`):
/// attention never crosses them.
pub fn image_cu_seqlens(grids: &[ImageGrid]) -> Vec<usize> {
    let mut cu = vec![0];
    for g in grids {
        for _ in 0..g.t {
            let last = *cu.last().expect("starts with 0");
            cu.push(last + g.h * g.w);
        }
    }
    cu
}

/// Qwen2.5-VL's windows: for each slot of the permuted sequence of merge
/// blocks, the original (global) merge-block index, and the window
/// boundaries in patches (`cu_window_seqlens`, empty windows dropped).
///
/// Windows are `n x n` merged tokens with `n = window_size / merge /
/// patch_size`, tiled row-major over each frame's merged grid; the last
/// row / column of windows may be partial.
pub fn window_index(
    grids: &[ImageGrid],
    merge: usize,
    window_size: usize,
    patch_size: usize,
) -> (Vec<usize>, Vec<usize>) {
    let n = (window_size / merge / patch_size).max(1);
    let unit = merge * merge;
    let mut index = Vec::new();
    let mut cu = vec![0];
    let mut base = 0;
    for g in grids {
        let (gh, gw) = (g.h / merge, g.w / merge);
        for t in 0..g.t {
            let frame = base + t * gh * gw;
            for wr in (0..gh).step_by(n) {
                for wc in (0..gw).step_by(n) {
                    let mut count = 0;
                    for r in wr..(wr + n).min(gh) {
                        for c in wc..(wc + n).min(gw) {
                            index.push(frame + r * gw + c);
                            count += 1;
                        }
                    }
                    let last = *cu.last().expect("starts with 0");
                    cu.push(last + count * unit);
                }
            }
        }
        base += g.t * gh * gw;
    }
    (index, cu)
}

/// The inverse permutation of `perm` (`argsort` of a permutation).
pub(crate) fn inverse(perm: &[usize]) -> Vec<usize> {
    let mut inv = vec![0; perm.len()];
    for (slot, &orig) in perm.iter().enumerate() {
        inv[orig] = slot;
    }
    inv
}

/// Patch order from a permutation of merge blocks: the patches of block
/// `perm[0]`, then of `perm[1]`, ...
pub(crate) fn expand_blocks(perm: &[usize], unit: usize) -> Vec<u32> {
    perm.iter()
        .flat_map(|&b| (b * unit..(b + 1) * unit).map(|p| p as u32))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_tile_each_image_row_major_with_partial_edges() {
        // A 4x6 patch grid = 2x3 merged tokens; windows of 2x2 tokens: a full
        // window (tokens 0, 1, 3, 4) and a partial one (2, 5).
        let g = [ImageGrid { t: 1, h: 4, w: 6 }];
        let (idx, cu) = window_index(&g, 2, 56, 14);
        assert_eq!(idx, vec![0, 1, 3, 4, 2, 5]);
        assert_eq!(cu, vec![0, 16, 24]);
        assert_eq!(inverse(&idx), vec![0, 1, 4, 2, 3, 5]);
    }

    #[test]
    fn positions_follow_merge_blocks() {
        let g = [ImageGrid { t: 1, h: 2, w: 4 }];
        let p = vision_position_ids(&g, 2);
        assert_eq!(p[..5], [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2]]);
        assert_eq!(image_cu_seqlens(&[g[0], g[0]]), vec![0, 8, 16]);
    }
}
