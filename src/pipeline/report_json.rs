//! The JSON form of a [`LayerReport`] in the resume state (`block_b.json`).

use super::report::{LayerReport, TraceShares};

pub(crate) fn report_to_json(r: &LayerReport) -> serde_json::Value {
    serde_json::json!({
        "block": r.block, "block_name": r.block_name, "layer": r.layer, "bits": r.bits,
        "group_size": r.group_size, "tokens": r.tokens, "objective": r.objective,
        "objective_unweighted": r.objective_unweighted, "damp_percent": r.damp_percent,
        "dead_columns": r.dead_columns,
        "seconds": r.seconds,
        "shares": [r.shares.vision_before, r.shares.vision_after, r.shares.text_before,
                   r.shares.text_after, r.shares.mean_alpha_vision, r.shares.mean_alpha_text],
    })
}

pub(crate) fn report_from_json(v: &serde_json::Value) -> Option<LayerReport> {
    let f = |k: &str| v.get(k).and_then(|x| x.as_f64());
    let shares: Vec<f64> = v
        .get("shares")?
        .as_array()?
        .iter()
        .filter_map(|x| x.as_f64())
        .collect();
    if shares.len() != 6 {
        return None;
    }
    Some(LayerReport {
        block: v.get("block")?.as_u64()? as usize,
        block_name: v.get("block_name")?.as_str()?.to_string(),
        layer: v.get("layer")?.as_str()?.to_string(),
        bits: v.get("bits")?.as_u64()? as u32,
        group_size: v.get("group_size")?.as_i64()?,
        tokens: v.get("tokens")?.as_u64()? as usize,
        objective: f("objective"),
        objective_unweighted: f("objective_unweighted"),
        damp_percent: f("damp_percent")?,
        // Absent from states saved before the field existed, null when unknown.
        dead_columns: v
            .get("dead_columns")
            .and_then(|d| d.as_u64())
            .map(|d| d as usize),
        seconds: f("seconds")?,
        shares: TraceShares {
            vision_before: shares[0],
            vision_after: shares[1],
            text_before: shares[2],
            text_after: shares[3],
            mean_alpha_vision: shares[4],
            mean_alpha_text: shares[5],
        },
    })
}
