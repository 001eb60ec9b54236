//! One quantized layer as the tensors of a GPTQ checkpoint (`qweight`,
//! `qzeros`, `scales`, `g_idx`, `bias`), and the solve settings recorded in
//! the config's `meta` block.

use half::f16;
use safetensors::Dtype;
use serde_json::{json, Value};

use crate::config::{Bits, GptqConfig, GroupFit, ScalePrecision};
use crate::error::Result;
use crate::quant::QuantizedWeight;
use crate::solver::Method;

use super::bits::{pack_qweight, pack_qzeros, qzeros_v2_to_v1};
use super::config_json::{CheckpointFormat, QuantizeConfig};
use super::tensor::DenseTensor;

/// Adds the solve settings to the config's `meta` block: the keys GPTQModel
/// uses with the same meaning (`damp_percent`, `static_groups`, `mse`,
/// `true_sequential`), then vlmq's own under `meta.vlmq` (vlmq's damping grows
/// by a factor per retry, unlike GPTQModel's additive `damp_auto_increment`).
pub(super) fn record_settings(qc: &mut Value, cfg: &GptqConfig, method: Method) {
    let Some(meta) = qc.get_mut("meta").and_then(Value::as_object_mut) else {
        return;
    };
    let d = &cfg.damping();
    meta.insert("damp_percent".into(), json!(d.initial_percent()));
    meta.insert("static_groups".into(), json!(cfg.static_groups()));
    meta.insert(
        "mse".into(),
        json!(cfg.scheme().mse().map_or(0.0, |m| f64::from(m.norm()))),
    );
    meta.insert("true_sequential".into(), json!(true));
    let (method, strength) = match method {
        Method::Gptq => ("gptq", None),
        Method::Gptaq { strength } => ("gptaq", Some(strength)),
    };
    meta.insert(
        "vlmq".into(),
        json!({
            "method": method,
            "gptaq_strength": strength,
            "block_size": cfg.block_size(),
            "act_order": cfg.act_order(),
            "act_group_aware": cfg.act_group_aware(),
            "damp_growth": d.growth(),
            "damp_max_attempts": d.max_attempts(),
            "group_fit": match cfg.group_fit() {
                GroupFit::BlockStart => "block_start",
                GroupFit::Updated => "updated",
            },
            "scale_precision": match cfg.scheme().scale_precision() {
                ScalePrecision::F16 => "f16",
                ScalePrecision::F32 => "f32",
            },
            "mse": cfg.scheme().mse().map(|m| json!({
                "grid": m.grid(),
                "max_shrink": m.max_shrink(),
                "norm": m.norm(),
            })),
        }),
    );
}

/// Named tensors ready to serialize: name, dtype, shape, little-endian bytes.
pub(super) type Owned = Vec<(String, Dtype, Vec<usize>, Vec<u8>)>;

fn i32_bytes<'a>(it: impl Iterator<Item = &'a i32>) -> Vec<u8> {
    it.flat_map(|v| v.to_le_bytes()).collect()
}

/// Appends the tensors of layer `name` to `owned`, packed as `config` says.
pub(super) fn encode_layer(
    name: &str,
    w: &QuantizedWeight,
    bias: Option<&DenseTensor>,
    config: &QuantizeConfig,
    owned: &mut Owned,
) -> Result<()> {
    let bits: Bits = config.bits;
    let qweight = pack_qweight(w.codes(), bits)?;
    let mut qzeros = pack_qzeros(w.zeros(), bits)?;
    if config.format == CheckpointFormat::V1 {
        // As GPTQModel writes v1: the offset is subtracted word-wise (2, 4 and
        // 8 bits; a zero point of 0 borrows from its neighbour, undone by the
        // word-wise addition of every loader) or field-wise (3 bits).
        qzeros_v2_to_v1(&mut qzeros, bits)?;
    }
    let scales: Vec<u8> = w
        .scales()
        .iter()
        .flat_map(|&s| f16::from_f32(s).to_le_bytes())
        .collect();
    let g_idx: Vec<u8> = w
        .g_idx()
        .iter()
        .flat_map(|&g| (g as i32).to_le_bytes())
        .collect();
    owned.push((
        format!("{name}.qweight"),
        Dtype::I32,
        qweight.shape().to_vec(),
        i32_bytes(qweight.iter()),
    ));
    owned.push((
        format!("{name}.qzeros"),
        Dtype::I32,
        qzeros.shape().to_vec(),
        i32_bytes(qzeros.iter()),
    ));
    owned.push((
        format!("{name}.scales"),
        Dtype::F16,
        w.scales().shape().to_vec(),
        scales,
    ));
    owned.push((
        format!("{name}.g_idx"),
        Dtype::I32,
        vec![w.in_features()],
        g_idx,
    ));
    if let Some(b) = bias {
        owned.push((
            format!("{name}.bias"),
            b.dtype(),
            b.shape().to_vec(),
            b.to_le_bytes(),
        ));
    }
    Ok(())
}
