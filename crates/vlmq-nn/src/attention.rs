//! Multi-head scaled dot-product attention with causal or bidirectional
//! masking, a key padding mask, optional rotary positions and grouped
//! key/value heads.

use ndarray::{s, Array2, ArrayView2, ArrayViewD, ArrayViewMutD, Axis, Zip};

use super::fastexp::softmax_prefix;
use super::linear::{Linear, LinearCache};
use super::params::{join, reborrow, Grads, Module};
use super::rope::Rope;
use super::Rng;
use vlmq::__private::{matmul, matmul_into};
use vlmq::backend::RowSink;
use vlmq::error::{Error, Result};

/// Shape and masking of an attention layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionConfig {
    /// Model width (input and output features).
    pub d_model: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads; divides `n_heads` (grouped-query attention when smaller).
    pub n_kv_heads: usize,
    /// Features per head.
    pub head_dim: usize,
    /// Causal (token `i` sees tokens `<= i`) or bidirectional.
    pub causal: bool,
    /// Rotary positions on queries and keys (`head_dim` must be even).
    pub rope: Option<Rope>,
    /// Whether the q/k/v/o projections have biases.
    pub bias: bool,
}

impl AttentionConfig {
    /// `n_heads` heads of width `d_model / n_heads`, no grouping, no rope, no bias.
    pub fn new(d_model: usize, n_heads: usize, causal: bool) -> Self {
        AttentionConfig {
            d_model,
            n_heads,
            n_kv_heads: n_heads,
            head_dim: d_model / n_heads.max(1),
            causal,
            rope: None,
            bias: false,
        }
    }

    /// Checks that the sizes are positive and consistent.
    pub fn validate(&self) -> Result<()> {
        let bad = |field, value: usize, reason| {
            Err(Error::InvalidConfig {
                field,
                value: value.to_string(),
                reason,
            })
        };
        if self.d_model == 0 || self.n_heads == 0 || self.n_kv_heads == 0 || self.head_dim == 0 {
            return bad("attention sizes", 0, "all sizes must be positive");
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad("n_kv_heads", self.n_kv_heads, "must divide n_heads");
        }
        if self.rope.is_some() && !self.head_dim.is_multiple_of(2) {
            return bad(
                "head_dim",
                self.head_dim,
                "must be even with rotary positions",
            );
        }
        Ok(())
    }
}

/// Multi-head attention: `o(softmax(q k^T / sqrt(hd) + mask) v)`.
#[derive(Debug, Clone)]
pub struct Attention {
    /// Shape and masking.
    pub config: AttentionConfig,
    /// Query projection `[heads * hd, d]`.
    pub q: Linear,
    /// Key projection `[kv_heads * hd, d]`.
    pub k: Linear,
    /// Value projection `[kv_heads * hd, d]`.
    pub v: Linear,
    /// Output projection `[d, heads * hd]`.
    pub o: Linear,
}

/// Everything [`Attention::backward`] needs.
#[derive(Debug, Clone)]
pub struct AttentionCache {
    q_lin: LinearCache,
    ctx_lin: LinearCache,
    q: Array2<f32>,
    k: Array2<f32>,
    v: Array2<f32>,
    probs: Vec<Array2<f32>>,
}

/// What computing the context leaves for the backward pass.
struct ContextParts {
    q_lin: LinearCache,
    q: Array2<f32>,
    k: Array2<f32>,
    v: Array2<f32>,
    probs: Vec<Array2<f32>>,
}

impl Attention {
    /// A randomly initialized attention layer.
    pub fn init(rng: &mut Rng, config: AttentionConfig) -> Result<Self> {
        config.validate()?;
        let (d, hd) = (config.d_model, config.head_dim);
        Ok(Attention {
            q: Linear::init(rng, d, config.n_heads * hd, config.bias),
            k: Linear::init(rng, d, config.n_kv_heads * hd, config.bias),
            v: Linear::init(rng, d, config.n_kv_heads * hd, config.bias),
            o: Linear::init(rng, config.n_heads * hd, d, config.bias),
            config,
        })
    }

    /// Checks the configuration against the projection shapes (the fields
    /// are public, so they may have been edited after construction).
    pub fn check(&self) -> Result<()> {
        let cfg = &self.config;
        cfg.validate()?;
        let (d, q, kv) = (
            cfg.d_model,
            cfg.n_heads * cfg.head_dim,
            cfg.n_kv_heads * cfg.head_dim,
        );
        for (name, lin, out, inp) in [
            ("q", &self.q, q, d),
            ("k", &self.k, kv, d),
            ("v", &self.v, kv, d),
            ("o", &self.o, d, q),
        ] {
            let actual = [lin.out_features(), lin.in_features()];
            if actual != [out, inp] {
                return Err(Error::shape(
                    format!("attn.{name} weight"),
                    &[out, inp],
                    &actual,
                ));
            }
        }
        Ok(())
    }

    /// The projection called `name` (`"q"`, `"k"`, `"v"` or `"o"`).
    pub fn linear(&self, name: &str) -> Option<&Linear> {
        match name {
            "q" => Some(&self.q),
            "k" => Some(&self.k),
            "v" => Some(&self.v),
            "o" => Some(&self.o),
            _ => None,
        }
    }

    /// Mutable access to the projection called `name`.
    pub fn linear_mut(&mut self, name: &str) -> Option<&mut Linear> {
        match name {
            "q" => Some(&mut self.q),
            "k" => Some(&mut self.k),
            "v" => Some(&mut self.v),
            "o" => Some(&mut self.o),
            _ => None,
        }
    }

    /// Forward pass over `x: [tokens, d]`. `valid` marks the tokens that may
    /// be attended to (padding keys are masked; a query with no visible key
    /// outputs zero). `sink` sees the inputs of `attn.q/k/v/o`.
    pub fn forward(
        &self,
        x: ArrayView2<'_, f32>,
        valid: Option<&[bool]>,
        mut sink: Option<&mut dyn RowSink>,
    ) -> Result<(Array2<f32>, AttentionCache)> {
        let (ctx, parts) = self.context_parts(x, valid, reborrow(&mut sink))?;
        if let Some(s) = sink {
            s.rows("attn.o", ctx.view());
        }
        let (y, ctx_lin) = self.o.forward(ctx.view())?;
        let ContextParts {
            q_lin,
            q,
            k,
            v,
            probs,
        } = parts;
        Ok((
            y,
            AttentionCache {
                q_lin,
                ctx_lin,
                q,
                k,
                v,
                probs,
            },
        ))
    }

    /// The attention context (the input of `attn.o`, `[tokens, heads x
    /// head_dim]`) over `x`, exactly as [`forward`](Self::forward) computes
    /// it; `sink` sees the inputs of `attn.q/k/v`.
    pub fn context(
        &self,
        x: ArrayView2<'_, f32>,
        valid: Option<&[bool]>,
        sink: Option<&mut dyn RowSink>,
    ) -> Result<Array2<f32>> {
        Ok(self.context_parts(x, valid, sink)?.0)
    }

    /// The context and what the backward pass needs of its computation.
    fn context_parts(
        &self,
        x: ArrayView2<'_, f32>,
        valid: Option<&[bool]>,
        sink: Option<&mut dyn RowSink>,
    ) -> Result<(Array2<f32>, ContextParts)> {
        let cfg = &self.config;
        self.check()?;
        let t = x.nrows();
        if let Some(v) = valid {
            if v.len() != t {
                return Err(Error::shape("attention padding mask", &[t], &[v.len()]));
            }
        }
        if let Some(s) = sink {
            s.rows("attn.q", x);
            s.rows("attn.k", x);
            s.rows("attn.v", x);
        }
        let (mut q, q_lin) = self.q.forward(x)?;
        let mut k = self.k.apply(x)?;
        let v = self.v.apply(x)?;
        if let Some(rope) = cfg.rope {
            rope.rotate(&mut q, cfg.head_dim, false);
            rope.rotate(&mut k, cfg.head_dim, false);
        }
        let hd = cfg.head_dim;
        let group = cfg.n_heads / cfg.n_kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let mut ctx = Array2::<f32>::zeros((t, cfg.n_heads * hd));
        let mut probs = Vec::with_capacity(cfg.n_heads);
        for h in 0..cfg.n_heads {
            let g = h / group;
            let qh = q.slice(s![.., h * hd..(h + 1) * hd]);
            let kh = k.slice(s![.., g * hd..(g + 1) * hd]);
            let vh = v.slice(s![.., g * hd..(g + 1) * hd]);
            let mut p = Array2::<f32>::zeros((t, t));
            matmul_into(p.view_mut(), qh, kh.t(), scale, false);
            for (i, mut row) in p.axis_iter_mut(Axis(0)).enumerate() {
                let row = row.as_slice_mut().expect("row-major scores");
                // Causal rows see the prefix 0..=i; padded keys are masked after.
                let len = if cfg.causal { i + 1 } else { row.len() };
                if let Some(v) = valid {
                    for (s, _) in row[..len].iter_mut().zip(v).filter(|(_, &ok)| !ok) {
                        *s = f32::NEG_INFINITY;
                    }
                    if !v[..len].iter().any(|&ok| ok) {
                        row.fill(0.0);
                        continue;
                    }
                }
                softmax_prefix(row, len);
                if let Some(v) = valid {
                    for (s, _) in row.iter_mut().zip(v).filter(|(_, &ok)| !ok) {
                        *s = 0.0;
                    }
                }
            }
            matmul_into(
                ctx.slice_mut(s![.., h * hd..(h + 1) * hd]),
                p.view(),
                vh,
                1.0,
                false,
            );
            probs.push(p);
        }
        Ok((
            ctx,
            ContextParts {
                q_lin,
                q,
                k,
                v,
                probs,
            },
        ))
    }

    /// Backward pass: returns `dL/dx`. `sink` sees the gradients at the
    /// outputs of `attn.o`, then `attn.q/k/v` (before the rotary embedding,
    /// i.e. at the linears' outputs). Parameter gradients go under
    /// `prefix + "attn.{q,k,v,o}."`.
    pub fn backward(
        &self,
        cache: &AttentionCache,
        g: ArrayView2<'_, f32>,
        mut grads: Option<&mut Grads>,
        prefix: &str,
        mut sink: Option<&mut dyn RowSink>,
    ) -> Result<Array2<f32>> {
        let cfg = &self.config;
        let t = cache.q.nrows();
        if g.dim() != (t, cfg.d_model) {
            return Err(Error::shape(
                "attention output gradient",
                &[t, cfg.d_model],
                g.shape(),
            ));
        }
        if let Some(s) = sink.as_deref_mut() {
            s.rows("attn.o", g);
        }
        let dctx = self.o.backward(
            &cache.ctx_lin,
            g,
            grads.as_deref_mut(),
            &join(prefix, "attn.o."),
        )?;
        let hd = cfg.head_dim;
        let group = cfg.n_heads / cfg.n_kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let mut dq = Array2::<f32>::zeros(cache.q.dim());
        let mut dk = Array2::<f32>::zeros(cache.k.dim());
        let mut dv = Array2::<f32>::zeros(cache.v.dim());
        for (h, p) in cache.probs.iter().enumerate() {
            let gi = h / group;
            let cols = s![.., h * hd..(h + 1) * hd];
            let kv_cols = s![.., gi * hd..(gi + 1) * hd];
            let doh = dctx.slice(cols);
            let mut ds = matmul(doh, cache.v.slice(kv_cols).t());
            matmul_into(dv.slice_mut(kv_cols), p.t(), doh, 1.0, true);
            Zip::from(ds.rows_mut())
                .and(p.rows())
                .for_each(|mut dsr, pr| {
                    let dot: f32 = dsr.iter().zip(pr.iter()).map(|(a, b)| a * b).sum();
                    Zip::from(&mut dsr)
                        .and(&pr)
                        .for_each(|d, &pv| *d = pv * (*d - dot));
                });
            matmul_into(
                dq.slice_mut(cols),
                ds.view(),
                cache.k.slice(kv_cols),
                scale,
                false,
            );
            matmul_into(
                dk.slice_mut(kv_cols),
                ds.t(),
                cache.q.slice(cols),
                scale,
                true,
            );
        }
        if let Some(rope) = cfg.rope {
            rope.rotate(&mut dq, hd, true);
            rope.rotate(&mut dk, hd, true);
        }
        if let Some(s) = sink {
            s.rows("attn.q", dq.view());
            s.rows("attn.k", dk.view());
            s.rows("attn.v", dv.view());
        }
        let lin = &cache.q_lin;
        let mut dx = self.q.backward(
            lin,
            dq.view(),
            grads.as_deref_mut(),
            &join(prefix, "attn.q."),
        )?;
        dx += &self.k.backward(
            lin,
            dk.view(),
            grads.as_deref_mut(),
            &join(prefix, "attn.k."),
        )?;
        dx += &self
            .v
            .backward(lin, dv.view(), grads, &join(prefix, "attn.v."))?;
        Ok(dx)
    }
}

impl Module for Attention {
    fn visit_params(&self, prefix: &str, f: &mut dyn FnMut(&str, ArrayViewD<'_, f32>)) {
        for (n, l) in [
            ("attn.q.", &self.q),
            ("attn.k.", &self.k),
            ("attn.v.", &self.v),
            ("attn.o.", &self.o),
        ] {
            l.visit_params(&join(prefix, n), f);
        }
    }

    fn visit_params_mut(&mut self, prefix: &str, f: &mut dyn FnMut(&str, ArrayViewMutD<'_, f32>)) {
        for (n, l) in [
            ("attn.q.", &mut self.q),
            ("attn.k.", &mut self.k),
            ("attn.v.", &mut self.v),
            ("attn.o.", &mut self.o),
        ] {
            l.visit_params_mut(&join(prefix, n), f);
        }
    }
}
