//! One safetensors file of a checkpoint written tensor by tensor: the header
//! first, then each tensor's bytes straight from where they are held, so the
//! file is never built in memory (a shard of a sharded checkpoint, written
//! while the model's other blocks wait on disk).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::Path;

use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::Dtype;

use crate::digest::Fnv;
use crate::error::{Error, Result};
use crate::fsutil::{write_atomic_with, write_limited};

use super::checkpoint_write::CheckpointWriter;
use super::config_json::QuantizeConfig;
use super::digests::header_with_digests;
use super::file_tensor::FileTensor;
use super::layer_encode::encode_layer;
use super::tensor::DenseTensor;

/// Elements of a dense tensor converted to bytes at a time.
const CHUNK: usize = 1 << 16;

/// Where one tensor's bytes come from.
enum Bytes<'a> {
    /// Already encoded (a quantized layer's packed tensors).
    Encoded(&'a [u8]),
    /// A dense tensor, encoded piece by piece as it is written.
    Dense(&'a DenseTensor),
    /// A dense tensor left in a file, copied piece by piece.
    File(&'a FileTensor),
}

impl Bytes<'_> {
    fn len(&self) -> usize {
        match self {
            Bytes::Encoded(b) => b.len(),
            Bytes::Dense(t) => t.shape().iter().product::<usize>() * t.dtype().bitsize() / 8,
            Bytes::File(t) => t.len(),
        }
    }

    /// Hands the little-endian bytes to `out` in order, at most
    /// [`CHUNK`] elements at a time for a dense tensor.
    fn each(&self, out: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
        fn pieces<T: Copy, const W: usize>(
            values: impl Iterator<Item = T>,
            to_le: impl Fn(T) -> [u8; W],
            out: &mut dyn FnMut(&[u8]) -> Result<()>,
        ) -> Result<()> {
            let mut buf = Vec::with_capacity(CHUNK * W);
            for v in values {
                buf.extend_from_slice(&to_le(v));
                if buf.len() == CHUNK * W {
                    out(&buf)?;
                    buf.clear();
                }
            }
            if buf.is_empty() {
                Ok(())
            } else {
                out(&buf)
            }
        }
        match self {
            Bytes::Encoded(b) => out(b),
            Bytes::File(t) => t.each(out),
            Bytes::Dense(DenseTensor::F32(a)) => pieces(a.iter().copied(), f32::to_le_bytes, out),
            Bytes::Dense(DenseTensor::F16(a)) => {
                pieces(a.iter().copied(), half::f16::to_le_bytes, out)
            }
            Bytes::Dense(DenseTensor::BF16(a)) => {
                pieces(a.iter().copied(), half::bf16::to_le_bytes, out)
            }
        }
    }

    /// FNV-1a 64 of the bytes, as the reader checks it.
    fn digest(&self) -> Result<String> {
        let mut h = Fnv::new();
        self.each(&mut |b| {
            h.bytes(b);
            Ok(())
        })?;
        Ok(h.hex())
    }
}

impl CheckpointWriter {
    /// Writes the layers and tensors added so far as one safetensors file at
    /// `path` (e.g. a shard `model-00003-of-00032.safetensors` of a sharded
    /// checkpoint) and returns the checkpoint-wide config they imply.
    ///
    /// The file has the same bytes as the `model.safetensors` that
    /// [`write`](Self::write) produces for the same writer, but it is written
    /// as it is produced: the header, then each tensor, a dense tensor in
    /// pieces of 64 Ki values, a [`FileTensor`] copied from its file in
    /// pieces of 1 MiB. Peak memory beyond the writer's own tensors is the
    /// packed form of its quantized layers (about an eighth of their f32
    /// size at 4 bits) and one piece, not the whole file.
    ///
    /// Atomic like [`write_file_atomic`](crate::write_file_atomic): the bytes
    /// go to a temporary file beside `path` that replaces it only when
    /// complete and flushed; after an error `path` is untouched and no
    /// temporary is left. The configs are not written: see
    /// [`write_configs`](Self::write_configs).
    pub fn write_safetensors(&self, path: impl AsRef<Path>) -> Result<QuantizeConfig> {
        let path = path.as_ref();
        let config = self.quantize_config()?;
        let mut encoded: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        for (name, w, bias) in &self.layers {
            encode_layer(name, w, bias.as_ref(), &config, &mut encoded)?;
        }
        let mut entries: Vec<(&str, Dtype, &[usize], Bytes<'_>)> = encoded
            .iter()
            .map(|(n, d, s, b)| (n.as_str(), *d, s.as_slice(), Bytes::Encoded(b)))
            .collect();
        for (name, t) in &self.tensors {
            entries.push((name.as_str(), t.dtype(), t.shape(), Bytes::Dense(t)));
        }
        for (name, t) in &self.file_tensors {
            entries.push((name.as_str(), t.dtype(), t.shape(), Bytes::File(t)));
        }
        // safetensors' own order: by dtype, widest first, then by name.
        entries.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        let header = self.header(&entries, path)?;
        write_atomic_with(path, |tmp| {
            let mut f = File::create(tmp).map_err(|e| Error::io(tmp, e))?;
            let mut put = |b: &[u8]| write_limited(&mut f, b).map_err(|e| Error::io(tmp, e));
            put(&(header.len() as u64).to_le_bytes())?;
            put(&header)?;
            for (_, _, _, bytes) in &entries {
                bytes.each(&mut put)?;
            }
            Ok(())
        })?;
        Ok(config)
    }

    /// The padded header of a file holding `entries` in their order, with
    /// the digests when the writer records them.
    fn header(
        &self,
        entries: &[(&str, Dtype, &[usize], Bytes<'_>)],
        path: &Path,
    ) -> Result<Vec<u8>> {
        let bad = |reason: String| Error::Safetensors {
            path: path.to_path_buf(),
            reason,
        };
        let mut infos = Vec::with_capacity(entries.len());
        let mut offset = 0;
        for (name, dtype, shape, bytes) in entries {
            let n = bytes.len();
            infos.push((
                name.to_string(),
                TensorInfo {
                    dtype: *dtype,
                    shape: shape.to_vec(),
                    data_offsets: (offset, offset + n),
                },
            ));
            offset += n;
        }
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        let metadata = Metadata::new(Some(meta), infos).map_err(|e| bad(e.to_string()))?;
        let mut header = serde_json::to_string(&metadata)
            .map_err(|e| bad(e.to_string()))?
            .into_bytes();
        header.resize(header.len().next_multiple_of(8), b' ');
        if self.omit_digests {
            return Ok(header);
        }
        let mut digests = BTreeMap::new();
        for (name, _, _, bytes) in entries {
            digests.insert(*name, bytes.digest()?);
        }
        header_with_digests(&header, &digests, path)
    }

    /// Writes `quantize_config.json` and `config.json` (with its
    /// `quantization_config` block) into the existing directory `dir`, each
    /// atomically, exactly as [`write`](Self::write) writes them; with
    /// [`write_safetensors`](Self::write_safetensors) for each shard, this
    /// builds a sharded checkpoint. Returns the config written.
    pub fn write_configs(&self, dir: impl AsRef<Path>) -> Result<QuantizeConfig> {
        let dir = dir.as_ref();
        let config = self.quantize_config()?;
        let qc = self.config_json(&config, dir)?;
        let (qc_bytes, config_bytes) = self.config_files(&qc, dir)?;
        crate::write_file_atomic(&dir.join("quantize_config.json"), &qc_bytes)?;
        crate::write_file_atomic(&dir.join("config.json"), &config_bytes)?;
        Ok(config)
    }
}
