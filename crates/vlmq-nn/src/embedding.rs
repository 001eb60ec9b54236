//! Token embeddings (a lookup table) and patch embeddings (a linear map of
//! flattened image patches plus a learned position table).

use ndarray::{s, Array2, ArrayView2, ArrayViewD, ArrayViewMutD};

use super::linear::{Linear, LinearCache};
use super::params::{join, Grads, Module};
use super::Rng;
use vlmq::error::{Error, Result};

/// A `[vocab, d]` lookup table; parameter `weight`.
#[derive(Debug, Clone)]
pub struct Embedding {
    /// The table, one row per token id.
    pub weight: Array2<f32>,
}

impl Embedding {
    /// A table of standard normal values.
    pub fn init(rng: &mut Rng, vocab: usize, d: usize) -> Self {
        Embedding {
            weight: rng.normal_matrix(vocab, d, 1.0),
        }
    }

    /// Vocabulary size.
    pub fn vocab(&self) -> usize {
        self.weight.nrows()
    }

    /// Embedding width.
    pub fn dim(&self) -> usize {
        self.weight.ncols()
    }

    fn check(&self, ids: &[usize]) -> Result<()> {
        match ids.iter().position(|&i| i >= self.vocab()) {
            Some(p) => Err(Error::InvalidConfig {
                field: "token id",
                value: format!("{} at position {p}", ids[p]),
                reason: "token ids must be below the vocabulary size",
            }),
            None => Ok(()),
        }
    }

    /// The rows of `ids`: `[ids.len(), d]`.
    pub fn forward(&self, ids: &[usize]) -> Result<Array2<f32>> {
        self.check(ids)?;
        let mut out = Array2::<f32>::zeros((ids.len(), self.dim()));
        for (mut row, &id) in out.rows_mut().into_iter().zip(ids) {
            row.assign(&self.weight.row(id));
        }
        Ok(out)
    }

    /// Backward pass: scatters `g` (`[ids.len(), d]`) into `prefix + "weight"`.
    pub fn backward(
        &self,
        ids: &[usize],
        g: ArrayView2<'_, f32>,
        grads: &mut Grads,
        prefix: &str,
    ) -> Result<()> {
        self.check(ids)?;
        if g.dim() != (ids.len(), self.dim()) {
            return Err(Error::shape(
                "embedding output gradient",
                &[ids.len(), self.dim()],
                g.shape(),
            ));
        }
        let mut dw = Array2::<f32>::zeros(self.weight.dim());
        for (row, &id) in g.rows().into_iter().zip(ids) {
            let mut acc = dw.row_mut(id);
            acc += &row;
        }
        grads.accumulate(&join(prefix, "weight"), dw.view());
        Ok(())
    }
}

impl Module for Embedding {
    fn visit_params(&self, prefix: &str, f: &mut dyn FnMut(&str, ArrayViewD<'_, f32>)) {
        f(&join(prefix, "weight"), self.weight.view().into_dyn());
    }

    fn visit_params_mut(&mut self, prefix: &str, f: &mut dyn FnMut(&str, ArrayViewMutD<'_, f32>)) {
        f(&join(prefix, "weight"), self.weight.view_mut().into_dyn());
    }
}

/// Patch embedding: `proj(patches) + pos[..patches]`; parameters `proj.*` and `pos`.
#[derive(Debug, Clone)]
pub struct PatchEmbedding {
    /// Linear map from a flattened patch to the model width (with bias).
    pub proj: Linear,
    /// Learned positions, `[max_patches, d]`.
    pub pos: Array2<f32>,
}

impl PatchEmbedding {
    /// A randomly initialized patch embedding.
    pub fn init(rng: &mut Rng, patch_dim: usize, d: usize, max_patches: usize) -> Self {
        PatchEmbedding {
            proj: Linear::init(rng, patch_dim, d, true),
            pos: rng.normal_matrix(max_patches, d, 0.1),
        }
    }

    /// Embeds `patches: [P, patch_dim]`; returns `[P, d]` and the cache for backward.
    pub fn forward(&self, patches: ArrayView2<'_, f32>) -> Result<(Array2<f32>, LinearCache)> {
        let p = patches.nrows();
        if p > self.pos.nrows() {
            return Err(Error::shape("patch count", &[self.pos.nrows()], &[p]));
        }
        let (mut y, cache) = self.proj.forward(patches)?;
        y += &self.pos.slice(s![..p, ..]);
        Ok((y, cache))
    }

    /// Backward pass: accumulates `prefix + "proj.*"` and `prefix + "pos"`.
    pub fn backward(
        &self,
        cache: &LinearCache,
        g: ArrayView2<'_, f32>,
        grads: &mut Grads,
        prefix: &str,
    ) -> Result<()> {
        self.proj
            .backward(cache, g, Some(grads), &join(prefix, "proj."))?;
        let mut dpos = Array2::<f32>::zeros(self.pos.dim());
        dpos.slice_mut(s![..g.nrows(), ..]).assign(&g);
        grads.accumulate(&join(prefix, "pos"), dpos.view());
        Ok(())
    }
}

impl Module for PatchEmbedding {
    fn visit_params(&self, prefix: &str, f: &mut dyn FnMut(&str, ArrayViewD<'_, f32>)) {
        self.proj.visit_params(&join(prefix, "proj."), f);
        f(&join(prefix, "pos"), self.pos.view().into_dyn());
    }

    fn visit_params_mut(&mut self, prefix: &str, f: &mut dyn FnMut(&str, ArrayViewMutD<'_, f32>)) {
        self.proj.visit_params_mut(&join(prefix, "proj."), f);
        f(&join(prefix, "pos"), self.pos.view_mut().into_dyn());
    }
}
