//! What a vision-language checkpoint says about the parts it leaves dense:
//! the dtype they are stored in (the source's) and the `quantization_config`
//! keys with which transformers and GPTQModel leave them alone.
//!
//! - `block_name_to_quantize` (one prefix, or a list when several block
//!   families were quantized) and `modules_in_block_to_quantize` (the
//!   quantized linear groups): transformers' GPTQ integration converts only
//!   those linears of those blocks;
//! - `dynamic`, GPTQModel's per-module overrides: one negative rule (`-:`
//!   and a regex on the module name) per dense part: a whole part (e.g.
//!   `-:^visual\.`) when none of its blocks was quantized, else each of its
//!   dense linears by full name.

use std::collections::BTreeSet;
use std::ops::Range;

use candle_core::DType;
use serde_json::{json, Map, Value};
use vlmq::pipeline::PipelineOutput;
use vlmq::QuantizableModel;

/// The dtype a checkpoint was stored in: `config.json`'s `torch_dtype` or
/// `dtype` (top level, else `text_config`), f32 when absent or unknown.
pub(crate) fn source_dtype(raw: &Value) -> DType {
    let named = ["torch_dtype", "dtype"].iter().find_map(|k| {
        raw.get(*k)
            .or_else(|| raw.get("text_config").and_then(|t| t.get(*k)))
            .and_then(Value::as_str)
    });
    match named {
        Some("bfloat16") => DType::BF16,
        Some("float16") => DType::F16,
        _ => DType::F32,
    }
}

/// A part of a model that is skipped as a whole when none of its blocks
/// was quantized: its module-name prefix (ending in `.`) and its blocks.
pub(crate) struct DensePart<'a> {
    /// E.g. `model.vision_model.`.
    pub prefix: &'a str,
    /// Its block indices.
    pub blocks: Range<usize>,
}

/// The `quantization_config` keys that tell loaders which modules of
/// `model` are packed and which stay dense (see the module doc).
pub(crate) fn quantization_extras<M: QuantizableModel>(
    model: &M,
    quantized: &PipelineOutput,
    parts: &[DensePart<'_>],
) -> Map<String, Value> {
    let mut families = BTreeSet::new();
    let mut groups: Vec<Vec<String>> = Vec::new();
    let mut dense = Vec::new();
    let mut packed_parts = vec![false; parts.len()];
    for b in 0..model.num_blocks() {
        let name = model.block_name(b);
        for group in model.linear_groups(b) {
            let names: Vec<String> = group.iter().map(|l| l.name.clone()).collect();
            let mut any = false;
            for l in &names {
                if quantized.weights.contains_key(&(b, l.clone())) {
                    any = true;
                } else {
                    dense.push(format!("{name}.{l}"));
                }
            }
            if any {
                for (p, part) in parts.iter().enumerate() {
                    packed_parts[p] |= part.blocks.contains(&b);
                }
                families.insert(block_family(&name).to_string());
                if !groups.contains(&names) {
                    groups.push(names);
                }
            }
        }
    }
    let escape = |s: &str| s.replace('.', "\\.");
    let mut dynamic = Map::new();
    for (part, packed) in parts.iter().zip(packed_parts) {
        if !packed {
            dynamic.insert(format!("-:^{}", escape(part.prefix)), json!({}));
            dense.retain(|d| !d.starts_with(part.prefix));
        }
    }
    for d in dense {
        dynamic.insert(format!("-:^{}$", escape(&d)), json!({}));
    }
    let families: Vec<String> = families.into_iter().collect();
    let mut extras = Map::new();
    extras.insert(
        "block_name_to_quantize".into(),
        match families.as_slice() {
            [one] => json!(one),
            many => json!(many),
        },
    );
    extras.insert("modules_in_block_to_quantize".into(), json!(groups));
    extras.insert("dynamic".into(), Value::Object(dynamic));
    extras
}

/// A block's family prefix: `model.layers` for `model.layers.3`, the name
/// itself for a single block such as `visual.merger`.
fn block_family(name: &str) -> &str {
    match name.rsplit_once('.') {
        Some((family, i)) if i.parse::<usize>().is_ok() => family,
        _ => name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_and_block_families() {
        assert_eq!(
            source_dtype(&json!({"torch_dtype": "bfloat16"})),
            DType::BF16
        );
        let nested = json!({"text_config": {"dtype": "float16"}});
        assert_eq!(source_dtype(&nested), DType::F16);
        assert_eq!(source_dtype(&json!({})), DType::F32);
        assert_eq!(
            block_family("model.text_model.layers.11"),
            "model.text_model.layers"
        );
        assert_eq!(block_family("model.connector"), "model.connector");
    }
}
