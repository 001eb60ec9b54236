//! `vlmq inspect`: what a GPTQ checkpoint holds, every tensor read back.

use vlmq::pack::TENSOR_DIGESTS_KEY;
use vlmq::{Checkpoint, Error, Result};

use crate::args::InspectArgs;

/// Runs `vlmq inspect`.
pub fn run(a: InspectArgs) -> Result<()> {
    let ck = Checkpoint::open(&a.checkpoint)?;
    let c = ck.config();
    println!("checkpoint   {}", a.checkpoint.display());
    println!("format       {}", c.format.as_str());
    println!("bits         {}", c.bits.get());
    match c.group_size.get() {
        Some(g) => println!("group size   {g}"),
        None => println!("group size   per channel"),
    }
    println!("symmetric    {}", c.sym);
    println!("act-order    {}", c.desc_act);
    println!("static groups {}", c.static_groups);
    let layers = ck.names();
    let dense = ck.tensor_names();
    println!("quantized    {} layers", layers.len());
    for l in &layers {
        let w = ck.layer(l)?;
        println!("  {l} [{}, {}]", w.out_features(), w.in_features());
    }
    println!("dense        {} tensors", dense.len());
    for t in &dense {
        let v = ck.tensor(t)?;
        println!("  {t} {:?}", v.shape());
    }
    println!("digests      {}", digest_line(&a.checkpoint)?);
    Ok(())
}

/// Whether the file records tensor digests (every read above verified
/// them) or not.
fn digest_line(dir: &std::path::Path) -> Result<String> {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
    let (_, meta) =
        vlmq::safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| Error::Safetensors {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    let has = meta
        .metadata()
        .as_ref()
        .is_some_and(|m| m.contains_key(TENSOR_DIGESTS_KEY));
    Ok(if has {
        "every tensor matches its stored digest".into()
    } else {
        "none stored (tensors were read but cannot be checked)".into()
    })
}
