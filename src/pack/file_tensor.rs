//! Dense tensors left in a file (a source checkpoint's embedding or head)
//! and copied into a written checkpoint piece by piece, so that a writer
//! holds their bytes only while one piece is in flight.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use safetensors::Dtype;

use crate::error::{Error, Result};

use super::checkpoint_write::CheckpointWriter;

/// Bytes copied at a time.
const PIECE: usize = 1 << 20;

/// A dense tensor whose little-endian values lie in a file from byte
/// `start` on (for example a tensor of a safetensors checkpoint, at its
/// data offset), in row-major order.
#[derive(Debug, Clone, PartialEq)]
pub struct FileTensor {
    path: PathBuf,
    start: u64,
    dtype: Dtype,
    shape: Vec<usize>,
    len: usize,
}

impl FileTensor {
    /// The tensor of dtype `dtype_name` (`"F32"`, `"F16"` or `"BF16"`) and
    /// `shape` stored in `path` from byte `start`; the file must hold all
    /// its bytes (checked now, and again when they are read).
    pub fn new(
        path: impl Into<PathBuf>,
        start: u64,
        dtype_name: &str,
        shape: &[usize],
    ) -> Result<Self> {
        let path = path.into();
        let bad = |reason: String| Error::Safetensors {
            path: path.clone(),
            reason,
        };
        let (dtype, width) = match dtype_name {
            "F32" => (Dtype::F32, 4),
            "F16" => (Dtype::F16, 2),
            "BF16" => (Dtype::BF16, 2),
            other => return Err(bad(format!("dtype {other:?} (expected F32, F16 or BF16)"))),
        };
        let len = shape
            .iter()
            .try_fold(width, |acc: usize, &d| acc.checked_mul(d))
            .ok_or_else(|| bad(format!("shape {shape:?} overflows")))?;
        let size = std::fs::metadata(&path)
            .map_err(|e| Error::io(&path, e))?
            .len();
        if start.checked_add(len as u64).is_none_or(|end| end > size) {
            return Err(bad(format!(
                "{len} bytes from {start} do not fit in a file of {size} bytes"
            )));
        }
        Ok(FileTensor {
            path,
            start,
            dtype,
            shape: shape.to_vec(),
            len,
        })
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The file the bytes are read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// Number of bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Reads the bytes and hands them to `out` in order, at most [`PIECE`]
    /// at a time.
    pub(crate) fn each(&self, out: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
        let io = |e| Error::io(&self.path, e);
        let mut f = File::open(&self.path).map_err(io)?;
        f.seek(SeekFrom::Start(self.start)).map_err(io)?;
        let mut buf = vec![0u8; PIECE.min(self.len)];
        let mut left = self.len;
        while left > 0 {
            let piece = &mut buf[..PIECE.min(left)];
            f.read_exact(piece).map_err(io)?;
            out(piece)?;
            left -= piece.len();
        }
        Ok(())
    }

    /// All the bytes at once (for the whole-file writer).
    pub(crate) fn read_all(&self) -> Result<Vec<u8>> {
        let mut bytes = Vec::with_capacity(self.len);
        self.each(&mut |b| {
            bytes.extend_from_slice(b);
            Ok(())
        })?;
        Ok(bytes)
    }
}

impl CheckpointWriter {
    /// Adds an unquantized tensor that stays in its file until the
    /// checkpoint is written: [`write_safetensors`](Self::write_safetensors)
    /// copies it piece by piece (reading it twice when digests are
    /// recorded), [`write`](Self::write) reads it whole. The bytes are
    /// stored unchanged; the same names are refused as by
    /// [`add_tensor`](Self::add_tensor).
    pub fn add_file_tensor(&mut self, name: &str, tensor: FileTensor) -> Result<()> {
        self.check_dense_name(name)?;
        self.claim(&[name.to_string()])?;
        self.file_tensors.push((name.to_string(), tensor));
        Ok(())
    }
}
