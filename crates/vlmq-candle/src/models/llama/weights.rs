//! The decoder's parameters as candle tensors, addressed by their HF names.

use candle_core::{DType, Device, Tensor};
use ndarray::{Array2, ArrayView2};
use vlmq::pack::FileTensor;
use vlmq::{Error, Result};

use crate::error::CandleResultExt;
use crate::models::llama::config::LlamaConfig;

/// The seven quantizable linears of a decoder layer, by their HF names
/// (relative to `model.layers.N.`), in forward order.
pub const LINEAR_NAMES: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// One linear: weight `[out, in]` and an optional bias `[out]`.
#[derive(Debug, Clone)]
pub struct Linear {
    /// Weight `[out, in]`.
    pub weight: Tensor,
    /// Bias `[out]`.
    pub bias: Option<Tensor>,
}

impl Linear {
    /// The weight `[out, in]` as f32 rows; errors name `block`.
    pub(crate) fn weight_rows(&self, block: usize) -> Result<Array2<f32>> {
        let (o, i) = self.weight.dims2().in_block(block)?;
        let v = self
            .weight
            .to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .in_block(block)?;
        Ok(Array2::from_shape_vec((o, i), v).expect("o x i values"))
    }

    /// Replaces the weight with `weight` (`[out, in]` in f32, converted to
    /// `dtype` on `device`) after checking its shape and that every value is
    /// finite; errors name `layer` and `block`. A freed weight (an empty
    /// `[0, in]` tensor, see `StreamedLayers::drop_linears`) takes any
    /// number of rows of its width.
    pub(crate) fn replace_weight(
        &mut self,
        block: usize,
        layer: &str,
        weight: ArrayView2<'_, f32>,
        dtype: DType,
        device: &Device,
    ) -> Result<()> {
        let mut want = self.weight.dims().to_vec();
        if want.first() == Some(&0) {
            want[0] = weight.nrows();
        }
        if weight.shape() != want.as_slice() {
            return Err(Error::shape(
                format!("new weight of {layer}"),
                &want,
                weight.shape(),
            ));
        }
        if let Some(((r, c), _)) = weight.indexed_iter().find(|(_, v)| !v.is_finite()) {
            return Err(Error::NonFinite {
                what: format!("new weight of {layer}"),
                index: vec![r, c],
            });
        }
        let data: Vec<f32> = weight.iter().copied().collect();
        self.weight = Tensor::from_vec(data, (want[0], want[1]), device)
            .and_then(|t| t.to_dtype(dtype))
            .in_block(block)?;
        Ok(())
    }
}

/// The parameters of one decoder layer.
#[derive(Debug, Clone)]
pub struct LayerWeights {
    /// RMSNorm gain before attention.
    pub input_norm: Tensor,
    /// RMSNorm gain before the MLP.
    pub post_norm: Tensor,
    /// The seven linears in [`LINEAR_NAMES`] order.
    pub linears: [Linear; 7],
}

impl LayerWeights {
    /// The linear named `name` (one of [`LINEAR_NAMES`]).
    pub fn linear(&self, name: &str) -> Option<&Linear> {
        LINEAR_NAMES
            .iter()
            .position(|n| *n == name)
            .map(|i| &self.linears[i])
    }

    /// Mutable access to the linear named `name`.
    pub fn linear_mut(&mut self, name: &str) -> Option<&mut Linear> {
        LINEAR_NAMES
            .iter()
            .position(|n| *n == name)
            .map(move |i| &mut self.linears[i])
    }
}

/// Every parameter of a decoder.
///
/// A model loaded with [`Residency::Disk`](crate::Residency::Disk) holds
/// only the final norm here: its embedding rows, head and decoder layers
/// are read from the checkpoint when they are needed.
#[derive(Debug, Clone)]
pub struct ModelWeights {
    /// Token embedding `[vocab, hidden]`; `None` when it stays on disk.
    pub embed: Option<Tensor>,
    /// Decoder layers.
    pub layers: Vec<LayerWeights>,
    /// Final RMSNorm gain.
    pub norm: Tensor,
    /// Separate LM head `[vocab, hidden]`; `None` when tied to the
    /// embedding or when it stays on disk.
    pub lm_head: Option<Tensor>,
}

/// Expected `[out, in]` (or `[n]`) shape of every parameter of layer `i`.
pub(crate) fn expected_linear(cfg: &LlamaConfig, name: &str) -> [usize; 2] {
    let (d, f, q, kv) = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.q_dim(),
        cfg.kv_dim(),
    );
    match name {
        "self_attn.q_proj" => [q, d],
        "self_attn.k_proj" | "self_attn.v_proj" => [kv, d],
        "self_attn.o_proj" => [d, q],
        "mlp.gate_proj" | "mlp.up_proj" => [f, d],
        _ => [d, f],
    }
}

pub(crate) fn check(name: &str, t: &Tensor, expected: &[usize]) -> Result<()> {
    if t.dims() != expected {
        return Err(Error::shape(
            format!("tensor {name:?} against the config"),
            expected,
            t.dims(),
        ));
    }
    Ok(())
}

/// Where tensors come from when assembling [`ModelWeights`]: a lookup by HF name.
pub(crate) trait TensorSource {
    /// The tensor called `name` (HF naming), converted to `dtype`; `Ok(None)` when absent.
    fn get(&mut self, name: &str, dtype: DType) -> Result<Option<Tensor>>;

    /// The dtype `name` is stored in, when the source keeps it (a
    /// quantized GGUF tensor reports the f32 it decodes to); `None` when
    /// absent or unknown.
    fn stored_dtype(&self, _name: &str) -> Option<DType> {
        None
    }

    /// Where `name`'s stored bytes lie in a file, when a writer can copy
    /// them unchanged (an f32, f16 or bf16 safetensors tensor); `None`
    /// otherwise (absent, or stored in a form that is decoded on reading).
    fn file_tensor(&self, _name: &str) -> Result<Option<FileTensor>> {
        Ok(None)
    }

    /// Rows `ids` (in that order, repeats allowed) of the 2-D tensor
    /// `name`, converted to `dtype`: `[ids.len(), width]`; `Ok(None)` when
    /// absent. The default reads the whole tensor and selects the rows; a
    /// source on disk reads only the rows asked for.
    fn rows(&mut self, name: &str, ids: &[u32], dtype: DType) -> Result<Option<Tensor>> {
        self.get(name, dtype)?
            .map(|t| select_rows(&t, ids))
            .transpose()
    }
}

/// Rows `ids` of `t` (`[ids.len(), ...]`).
pub(crate) fn select_rows(t: &Tensor, ids: &[u32]) -> Result<Tensor> {
    let ids = Tensor::from_slice(ids, ids.len(), t.device()).at_model()?;
    t.index_select(&ids, 0).at_model()
}

pub(crate) fn required(src: &mut dyn TensorSource, name: &str, dtype: DType) -> Result<Tensor> {
    src.get(name, dtype)?.ok_or_else(|| Error::MissingTensor {
        name: name.to_string(),
    })
}

/// The HF name of the token embedding.
pub(crate) const EMBED: &str = "model.embed_tokens.weight";

/// The HF name of an untied LM head.
pub(crate) const HEAD: &str = "lm_head.weight";

/// Every tensor of decoder layer `i` (HF names) with its expected shape.
fn layer_shapes(cfg: &LlamaConfig, i: usize) -> Vec<(String, Vec<usize>)> {
    let p = format!("model.layers.{i}.");
    let mut out: Vec<(String, Vec<usize>)> = ["input_layernorm", "post_attention_layernorm"]
        .iter()
        .map(|n| (format!("{p}{n}.weight"), vec![cfg.hidden_size]))
        .collect();
    for ln in LINEAR_NAMES {
        let shape = expected_linear(cfg, ln);
        out.push((format!("{p}{ln}.weight"), shape.to_vec()));
        let is_qkv = matches!(
            ln,
            "self_attn.q_proj" | "self_attn.k_proj" | "self_attn.v_proj"
        );
        if cfg.qkv_bias && is_qkv {
            out.push((format!("{p}{ln}.bias"), vec![shape[0]]));
        }
    }
    out
}

/// The embedding, and the head when it is not tied, with their shapes.
fn table_shapes(cfg: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    let (d, v) = (cfg.hidden_size, cfg.vocab_size);
    let mut out = vec![(EMBED.to_string(), vec![v, d])];
    if !cfg.tie_embeddings {
        out.push((HEAD.to_string(), vec![v, d]));
    }
    out
}

/// Checks every decoder layer's tensors, the embedding and an untied head
/// against a file's tensor directory (`shape_of` gives a stored tensor's
/// shape) without reading them: a model whose weights stay on disk trusts
/// its configuration's layer count and sizes only after this.
pub(crate) fn check_directory(
    cfg: &LlamaConfig,
    shape_of: impl Fn(&str) -> Option<Vec<usize>>,
) -> Result<()> {
    let tables = table_shapes(cfg);
    let layers = (0..cfg.num_layers).flat_map(|i| layer_shapes(cfg, i));
    for (name, expected) in tables.into_iter().chain(layers) {
        match shape_of(&name) {
            None => return Err(Error::MissingTensor { name }),
            Some(stored) if stored != expected => {
                return Err(Error::shape(
                    format!("tensor {name:?} against the config"),
                    &expected,
                    &stored,
                ))
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Assembles and shape-checks decoder layer `i` from `src` in `dtype`.
pub(crate) fn assemble_layer(
    cfg: &LlamaConfig,
    i: usize,
    src: &mut dyn TensorSource,
    dtype: DType,
) -> Result<LayerWeights> {
    let d = cfg.hidden_size;
    let p = format!("model.layers.{i}.");
    let mut norm = |n: &str| -> Result<Tensor> {
        let name = format!("{p}{n}.weight");
        let t = required(src, &name, dtype)?;
        check(&name, &t, &[d])?;
        Ok(t)
    };
    let input_norm = norm("input_layernorm")?;
    let post_norm = norm("post_attention_layernorm")?;
    let mut lin = Vec::with_capacity(7);
    for ln in LINEAR_NAMES {
        let shape = expected_linear(cfg, ln);
        let wname = format!("{p}{ln}.weight");
        let weight = required(src, &wname, dtype)?;
        check(&wname, &weight, &shape)?;
        let bname = format!("{p}{ln}.bias");
        let is_qkv = matches!(
            ln,
            "self_attn.q_proj" | "self_attn.k_proj" | "self_attn.v_proj"
        );
        let bias = if cfg.qkv_bias && is_qkv {
            let b = required(src, &bname, dtype)?;
            check(&bname, &b, &shape[..1])?;
            Some(b)
        } else {
            None
        };
        lin.push(Linear { weight, bias });
    }
    let linears: [Linear; 7] = lin.try_into().expect("seven linears");
    Ok(LayerWeights {
        input_norm,
        post_norm,
        linears,
    })
}

impl ModelWeights {
    /// Assembles and shape-checks every parameter from `src`.
    pub(crate) fn assemble(
        cfg: &LlamaConfig,
        src: &mut dyn TensorSource,
        dtype: DType,
    ) -> Result<Self> {
        let (d, v) = (cfg.hidden_size, cfg.vocab_size);
        let mut get = |name: &str, shape: &[usize]| -> Result<Tensor> {
            let t = required(src, name, dtype)?;
            check(name, &t, shape)?;
            Ok(t)
        };
        let embed = get(EMBED, &[v, d])?;
        let lm_head = if cfg.tie_embeddings {
            None
        } else {
            Some(get(HEAD, &[v, d])?)
        };
        let mut w = Self::final_norm_only(cfg, src, dtype)?;
        w.embed = Some(embed);
        w.lm_head = lm_head;
        w.layers = (0..cfg.num_layers)
            .map(|i| assemble_layer(cfg, i, src, dtype))
            .collect::<Result<Vec<_>>>()?;
        Ok(w)
    }

    /// The final norm in `dtype` and nothing else: the resident part of a
    /// model whose embedding, head and layers stay on disk.
    pub(crate) fn final_norm_only(
        cfg: &LlamaConfig,
        src: &mut dyn TensorSource,
        dtype: DType,
    ) -> Result<Self> {
        let name = "model.norm.weight";
        let norm = required(src, name, dtype)?;
        check(name, &norm, &[cfg.hidden_size])?;
        Ok(ModelWeights {
            embed: None,
            layers: Vec::new(),
            norm,
            lm_head: None,
        })
    }

    /// Every parameter held here under its HF name (the tied head is not
    /// repeated; what stays on disk is not listed).
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out: Vec<(String, Tensor)> = self
            .embed
            .iter()
            .map(|e| (EMBED.to_string(), e.clone()))
            .collect();
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}.");
            out.push((format!("{p}input_layernorm.weight"), l.input_norm.clone()));
            out.push((
                format!("{p}post_attention_layernorm.weight"),
                l.post_norm.clone(),
            ));
            for (n, lin) in LINEAR_NAMES.iter().zip(&l.linears) {
                out.push((format!("{p}{n}.weight"), lin.weight.clone()));
                if let Some(b) = &lin.bias {
                    out.push((format!("{p}{n}.bias"), b.clone()));
                }
            }
        }
        out.push(("model.norm.weight".to_string(), self.norm.clone()));
        if let Some(h) = &self.lm_head {
            out.push((HEAD.to_string(), h.clone()));
        }
        out
    }
}
