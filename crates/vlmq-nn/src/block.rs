//! Pre-norm transformer block: `h = x + attn(norm1(x))`, `y = h + mlp(norm2(h))`.

use std::sync::Arc;

use ndarray::{Array2, ArrayView2, ArrayViewD, ArrayViewMutD};

use super::activation::Activation;
use super::attention::{Attention, AttentionCache, AttentionConfig};
use super::linear::{Linear, LinearKernel};
use super::mlp::{Mlp, MlpCache};
use super::norm::{Norm, NormCache, NormKind};
use super::params::{join, reborrow, Grads, Module};
use super::rope::Rope;
use super::Rng;
use vlmq::backend::{LinearInfo, RowSink};
use vlmq::error::{Error, Result};

/// Shape and flavour of a [`TransformerBlock`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockConfig {
    /// Model width.
    pub d_model: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (divides `n_heads`).
    pub n_kv_heads: usize,
    /// MLP hidden width.
    pub hidden: usize,
    /// Gated (SwiGLU with [`Activation::Silu`]) or plain MLP.
    pub gated: bool,
    /// MLP activation.
    pub act: Activation,
    /// Normalization kind.
    pub norm: NormKind,
    /// Causal (decoder) or bidirectional (encoder) attention.
    pub causal: bool,
    /// Rotary positions in attention.
    pub rope: Option<Rope>,
    /// Biases on every linear.
    pub bias: bool,
}

impl BlockConfig {
    /// A LLaMA-style decoder block: RMSNorm, causal attention with rotary
    /// positions (base 10000), SwiGLU MLP, no biases.
    pub fn decoder(d_model: usize, n_heads: usize, hidden: usize) -> Self {
        BlockConfig {
            d_model,
            n_heads,
            n_kv_heads: n_heads,
            hidden,
            gated: true,
            act: Activation::Silu,
            norm: NormKind::Rms,
            causal: true,
            rope: Some(Rope::new(10000.0)),
            bias: false,
        }
    }

    /// A ViT-style encoder block: LayerNorm, bidirectional attention, GELU
    /// MLP, biases, no rotary positions (patch embeddings carry positions).
    pub fn encoder(d_model: usize, n_heads: usize, hidden: usize) -> Self {
        BlockConfig {
            d_model,
            n_heads,
            n_kv_heads: n_heads,
            hidden,
            gated: false,
            act: Activation::Gelu,
            norm: NormKind::Layer,
            causal: false,
            rope: None,
            bias: true,
        }
    }

    /// The attention part of this configuration.
    pub fn attention(&self) -> AttentionConfig {
        AttentionConfig {
            d_model: self.d_model,
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.d_model / self.n_heads.max(1),
            causal: self.causal,
            rope: self.rope,
            bias: self.bias,
        }
    }
}

/// A pre-norm transformer block. Parameters are named `norm1.*`,
/// `attn.{q,k,v,o}.*`, `norm2.*`, `mlp.{gate,up,down}.*` under its prefix.
#[derive(Debug, Clone)]
pub struct TransformerBlock {
    /// Norm before attention.
    pub norm1: Norm,
    /// Self-attention.
    pub attn: Attention,
    /// Norm before the MLP.
    pub norm2: Norm,
    /// Feed-forward part.
    pub mlp: Mlp,
}

/// Activations of one block forward pass, needed by its backward pass.
#[derive(Debug, Clone)]
pub struct BlockCache {
    n1: NormCache,
    attn: AttentionCache,
    n2: NormCache,
    mlp: MlpCache,
    tokens: usize,
}

impl TransformerBlock {
    /// A randomly initialized block.
    pub fn init(rng: &mut Rng, config: BlockConfig) -> Result<Self> {
        if config.d_model == 0
            || config.hidden == 0
            || config.n_heads == 0
            || !config.d_model.is_multiple_of(config.n_heads)
        {
            return Err(Error::InvalidConfig {
                field: "d_model",
                value: config.d_model.to_string(),
                reason: "must be a positive multiple of n_heads, with a positive MLP width",
            });
        }
        let attn = Attention::init(rng, config.attention())?;
        let mlp = Mlp::init(
            rng,
            config.d_model,
            config.hidden,
            config.gated,
            config.act,
            config.bias,
        );
        Ok(TransformerBlock {
            norm1: Norm::new(config.norm, config.d_model),
            attn,
            norm2: Norm::new(config.norm, config.d_model),
            mlp,
        })
    }

    /// Model width.
    pub fn d_model(&self) -> usize {
        self.norm1.dim()
    }

    /// Quantizable linears in true-sequential groups: `[attn.q, attn.k,
    /// attn.v]`, `[attn.o]`, `[mlp.gate, mlp.up]` (or `[mlp.up]`), `[mlp.down]`.
    pub fn linear_groups(&self) -> Vec<Vec<LinearInfo>> {
        let info =
            |name: &str, l: &Linear| LinearInfo::new(name, l.in_features(), l.out_features());
        let a = &self.attn;
        let mut up = Vec::new();
        if let Some(g) = &self.mlp.gate {
            up.push(info("mlp.gate", g));
        }
        up.push(info("mlp.up", &self.mlp.up));
        vec![
            vec![
                info("attn.q", &a.q),
                info("attn.k", &a.k),
                info("attn.v", &a.v),
            ],
            vec![info("attn.o", &a.o)],
            up,
            vec![info("mlp.down", &self.mlp.down)],
        ]
    }

    /// The linear called `name` (`"attn.q"`, ..., `"mlp.down"`).
    pub fn linear(&self, name: &str) -> Option<&Linear> {
        match name.split_once('.')? {
            ("attn", l) => self.attn.linear(l),
            ("mlp", l) => self.mlp.linear(l),
            _ => None,
        }
    }

    /// Mutable access to the linear called `name`.
    pub fn linear_mut(&mut self, name: &str) -> Option<&mut Linear> {
        match name.split_once('.')? {
            ("attn", l) => self.attn.linear_mut(l),
            ("mlp", l) => self.mlp.linear_mut(l),
            _ => None,
        }
    }

    fn unknown(name: &str) -> Error {
        Error::Backend {
            block: 0,
            layer: Some(name.to_string()),
            reason: "no such linear in a transformer block".into(),
        }
    }

    /// Replaces the dense weight of linear `name` (shape-checked; the error
    /// names the layer). An unknown name is an [`Error::Backend`] with block
    /// 0, since a block does not know its index; [`SequenceModel`](super::SequenceModel)
    /// reports the real index.
    pub fn set_linear_weight(&mut self, name: &str, w: ArrayView2<'_, f32>) -> Result<()> {
        let lin = self.linear_mut(name).ok_or_else(|| Self::unknown(name))?;
        lin.set_weight(w).map_err(|e| rename(e, name))
    }

    /// Runs linear `name` through `kernel` (e.g. a packed quantized weight).
    pub fn set_linear_kernel(&mut self, name: &str, kernel: Arc<dyn LinearKernel>) -> Result<()> {
        let lin = self.linear_mut(name).ok_or_else(|| Self::unknown(name))?;
        lin.set_kernel(kernel).map_err(|e| rename(e, name))
    }

    /// Forward pass over `x: [tokens, d]` with an optional key padding mask;
    /// `sink` sees every quantizable linear's input.
    pub fn forward(
        &self,
        x: ArrayView2<'_, f32>,
        valid: Option<&[bool]>,
        mut sink: Option<&mut dyn RowSink>,
    ) -> Result<(Array2<f32>, BlockCache)> {
        let (a_in, n1) = self.norm1.forward(x)?;
        let (a_out, attn) = self.attn.forward(a_in.view(), valid, reborrow(&mut sink))?;
        let h = &a_out + &x;
        let (m_in, n2) = self.norm2.forward(h.view())?;
        let (m_out, mlp) = self.mlp.forward(m_in.view(), sink)?;
        let y = m_out + &h;
        let tokens = x.nrows();
        Ok((
            y,
            BlockCache {
                n1,
                attn,
                n2,
                mlp,
                tokens,
            },
        ))
    }

    /// Backward pass: returns `dL/dx` given `dL/dy`. `sink` sees the gradient
    /// at every quantizable linear's output (`tokens x out_features`).
    /// Parameter gradients go under `prefix` when `grads` is given.
    pub fn backward(
        &self,
        cache: &BlockCache,
        dy: ArrayView2<'_, f32>,
        mut grads: Option<&mut Grads>,
        prefix: &str,
        mut sink: Option<&mut dyn RowSink>,
    ) -> Result<Array2<f32>> {
        let expected = [cache.tokens, self.d_model()];
        if dy.shape() != expected {
            return Err(Error::shape("block output gradient", &expected, dy.shape()));
        }
        let dm = self.mlp.backward(
            &cache.mlp,
            dy,
            grads.as_deref_mut(),
            prefix,
            reborrow(&mut sink),
        )?;
        let mut dh = self.norm2.backward(
            &cache.n2,
            dm.view(),
            grads.as_deref_mut(),
            &join(prefix, "norm2."),
        )?;
        dh += &dy;
        let da = self
            .attn
            .backward(&cache.attn, dh.view(), grads.as_deref_mut(), prefix, sink)?;
        let mut dx = self
            .norm1
            .backward(&cache.n1, da.view(), grads, &join(prefix, "norm1."))?;
        dx += &dh;
        Ok(dx)
    }

    /// The block-local perturbed importance source: with every quantizable
    /// linear's weight `W` replaced by `perturb(name, W)` (e.g. its RTN
    /// quantization), backpropagates `L = 1/2 sum_t ||B~(x)_t - B(x)_t||^2`
    /// through the perturbed block, shows `sink` the gradient at every
    /// linear's output, and returns `L`.
    pub fn perturbed_output_grads(
        &self,
        x: ArrayView2<'_, f32>,
        valid: Option<&[bool]>,
        perturb: &dyn Fn(&str, ArrayView2<'_, f32>) -> Array2<f32>,
        sink: &mut dyn RowSink,
    ) -> Result<f32> {
        let (reference, _) = self.forward(x, valid, None)?;
        let mut perturbed = self.clone();
        for info in self.linear_groups().into_iter().flatten() {
            let w = self
                .linear(&info.name)
                .ok_or_else(|| Self::unknown(&info.name))?
                .dense_weight()?;
            let pw = perturb(&info.name, w.view());
            perturbed.set_linear_weight(&info.name, pw.view())?;
        }
        let (out, cache) = perturbed.forward(x, valid, None)?;
        let diff = out - reference;
        let loss = 0.5 * diff.iter().map(|v| v * v).sum::<f32>();
        perturbed.backward(&cache, diff.view(), None, "", Some(sink))?;
        Ok(loss)
    }
}

/// Names the layer in a shape error.
fn rename(e: Error, layer: &str) -> Error {
    match e {
        Error::ShapeMismatch {
            what,
            expected,
            actual,
        } => Error::ShapeMismatch {
            what: format!("{what} of {layer}"),
            expected,
            actual,
        },
        other => other,
    }
}

impl Module for TransformerBlock {
    fn visit_params(&self, prefix: &str, f: &mut dyn FnMut(&str, ArrayViewD<'_, f32>)) {
        self.norm1.visit_params(&join(prefix, "norm1."), f);
        self.attn.visit_params(prefix, f);
        self.norm2.visit_params(&join(prefix, "norm2."), f);
        self.mlp.visit_params(prefix, f);
    }

    fn visit_params_mut(&mut self, prefix: &str, f: &mut dyn FnMut(&str, ArrayViewMutD<'_, f32>)) {
        self.norm1.visit_params_mut(&join(prefix, "norm1."), f);
        self.attn.visit_params_mut(prefix, f);
        self.norm2.visit_params_mut(&join(prefix, "norm2."), f);
        self.mlp.visit_params_mut(prefix, f);
    }
}
