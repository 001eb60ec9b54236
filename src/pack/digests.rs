//! Tensor digests in the safetensors metadata of a checkpoint: written by
//! [`CheckpointWriter`](super::CheckpointWriter), checked by
//! [`Checkpoint`](super::Checkpoint) (docs/FORMAT.md, section 2).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use safetensors::tensor::Metadata;

use crate::digest::digest_hex;
use crate::error::{Error, Result};

/// The safetensors header metadata key under which the writer records the
/// tensor digests: a JSON object `{tensor name: 16 hex digits}` (FNV-1a 64
/// of the tensor's bytes). See docs/FORMAT.md.
pub const TENSOR_DIGESTS_KEY: &str = "vlmq.tensor_digests";

/// Adds the digests to the metadata of a file serialized with the single
/// metadata entry `format = pt`. (safetensors keeps metadata in a `HashMap`,
/// so two entries would come out in a different order from run to run; the
/// splice keeps the file deterministic: `format` first, then the digests.)
pub(crate) fn add_digests(
    bytes: &[u8],
    digests: &BTreeMap<&str, String>,
    path: &Path,
) -> Result<Vec<u8>> {
    let internal = |reason: &str| Error::Safetensors {
        path: path.to_path_buf(),
        reason: format!("adding tensor digests: {reason}"),
    };
    let n = bytes
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_le_bytes)
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| internal("no header length"))?;
    let header = bytes
        .get(8..8 + n)
        .ok_or_else(|| internal("header out of range"))?;
    let new_header = header_with_digests(header, digests, path)?;
    let data = bytes.get(8 + n..).ok_or_else(|| internal("no data"))?;
    let mut out = Vec::with_capacity(8 + new_header.len() + data.len());
    out.extend_from_slice(&(new_header.len() as u64).to_le_bytes());
    out.extend_from_slice(&new_header);
    out.extend_from_slice(data);
    Ok(out)
}

/// The safetensors header `header` (padded JSON whose metadata is the single
/// entry `format = pt`) with the digests spliced in after `format`, padded
/// again to a multiple of 8 bytes: the header [`add_digests`] writes.
pub(crate) fn header_with_digests(
    header: &[u8],
    digests: &BTreeMap<&str, String>,
    path: &Path,
) -> Result<Vec<u8>> {
    const PREFIX: &str = r#"{"__metadata__":{"format":"pt"}"#;
    let internal = |reason: &str| Error::Safetensors {
        path: path.to_path_buf(),
        reason: format!("adding tensor digests: {reason}"),
    };
    let header = std::str::from_utf8(header)
        .map_err(|_| internal("header is not UTF-8"))?
        .trim_end_matches(' ');
    let rest = header
        .strip_prefix(PREFIX)
        .ok_or_else(|| internal("unexpected header layout"))?;
    let object = serde_json::to_string(digests).map_err(|e| internal(&e.to_string()))?;
    let value = serde_json::to_string(&object).map_err(|e| internal(&e.to_string()))?;
    let mut new_header =
        format!(r#"{{"__metadata__":{{"format":"pt","{TENSOR_DIGESTS_KEY}":{value}}}{rest}"#)
            .into_bytes();
    new_header.resize(new_header.len().next_multiple_of(8), b' ');
    Ok(new_header)
}

/// The digests recorded under [`TENSOR_DIGESTS_KEY`] in `meta`, checked to
/// name exactly the file's tensors; `None` for files without them.
pub(crate) fn read_digests(
    meta: &Metadata,
    path: &Path,
) -> Result<Option<BTreeMap<String, String>>> {
    let corrupt = |reason: String| Error::CorruptCheckpoint {
        path: path.to_path_buf(),
        reason,
    };
    let Some(text) = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(TENSOR_DIGESTS_KEY))
    else {
        return Ok(None);
    };
    let digests: BTreeMap<String, String> = serde_json::from_str(text).map_err(|e| {
        corrupt(format!(
            "metadata {TENSOR_DIGESTS_KEY} is not a JSON object of strings: {e}"
        ))
    })?;
    let names: BTreeSet<String> = meta.tensors().into_keys().collect();
    if let Some(extra) = digests.keys().find(|k| !names.contains(*k)) {
        return Err(corrupt(format!(
            "metadata {TENSOR_DIGESTS_KEY} names {extra:?}, which the file lacks"
        )));
    }
    if let Some(missing) = names.iter().find(|k| !digests.contains_key(*k)) {
        return Err(corrupt(format!(
            "tensor {missing:?} has no digest in {TENSOR_DIGESTS_KEY}"
        )));
    }
    Ok(Some(digests))
}

/// Checks one tensor's bytes against its recorded digest.
pub(crate) fn check_digest(
    digests: &BTreeMap<String, String>,
    name: &str,
    data: &[u8],
    path: &Path,
) -> Result<()> {
    let Some(expected) = digests.get(name) else {
        return Ok(());
    };
    let actual = digest_hex(data);
    if &actual != expected {
        return Err(Error::CorruptCheckpoint {
            path: path.to_path_buf(),
            reason: format!(
                "tensor {name:?}: its bytes have digest {actual}, the file records {expected} \
                 (the data changed after it was written)"
            ),
        });
    }
    Ok(())
}
