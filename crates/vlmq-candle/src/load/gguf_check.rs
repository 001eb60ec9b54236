//! Checks of a GGUF file's header that candle's reader leaves out, made
//! before and after handing the file to it: candle divides by the
//! `general.alignment` metadata value (zero panics), and multiplies a
//! tensor's dimensions without overflow checks when it reads the tensor.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use candle_core::quantized::gguf_file::Content;
use vlmq::{Error, Result};

/// The metadata key whose value candle divides by.
const ALIGNMENT: &str = "general.alignment";

/// Deepest array nesting walked (candle refuses deeper ones too).
const MAX_DEPTH: usize = 8;

/// A reader of the header's fields that never reads past the file's end.
struct Walk<R> {
    r: R,
    left: u64,
    wide: bool,
}

impl<R: Read + Seek> Walk<R> {
    fn bytes<const N: usize>(&mut self) -> std::io::Result<[u8; N]> {
        let mut b = [0u8; N];
        self.r.read_exact(&mut b)?;
        self.left = self.left.saturating_sub(N as u64);
        Ok(b)
    }

    fn u32(&mut self) -> std::io::Result<u32> {
        self.bytes::<4>().map(u32::from_le_bytes)
    }

    /// A length or count: 32 bits in GGUF v1, 64 bits after.
    fn len(&mut self) -> std::io::Result<u64> {
        if self.wide {
            self.bytes::<8>().map(u64::from_le_bytes)
        } else {
            self.u32().map(u64::from)
        }
    }

    fn skip(&mut self, n: u64) -> std::io::Result<()> {
        if n > self.left {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("a field of {n} bytes runs past the end of the file"),
            ));
        }
        self.r.seek(SeekFrom::Current(n as i64))?;
        self.left -= n;
        Ok(())
    }

    fn string(&mut self) -> std::io::Result<Vec<u8>> {
        let n = self.len()?;
        if n > self.left {
            return Err(eof("a string longer than the rest of the file"));
        }
        let mut v = vec![0u8; n as usize];
        self.r.read_exact(&mut v)?;
        self.left -= n;
        Ok(v)
    }

    /// Skips a value of GGUF type `ty`; returns it when it is an integer.
    fn value(&mut self, ty: u32, depth: usize) -> std::io::Result<Option<i128>> {
        let fixed = |ty| match ty {
            0 | 1 | 7 => Some(1), // u8, i8, bool
            2 | 3 => Some(2),     // u16, i16
            4..=6 => Some(4),     // u32, i32, f32
            10..=12 => Some(8),   // u64, i64, f64
            _ => None,
        };
        match ty {
            0 => Ok(Some(self.bytes::<1>()?[0].into())),
            1 => Ok(Some((self.bytes::<1>()?[0] as i8).into())),
            2 => Ok(Some(u16::from_le_bytes(self.bytes()?).into())),
            3 => Ok(Some(i16::from_le_bytes(self.bytes()?).into())),
            4 => Ok(Some(self.u32()?.into())),
            5 => Ok(Some(i32::from_le_bytes(self.bytes()?).into())),
            10 => Ok(Some(u64::from_le_bytes(self.bytes()?).into())),
            11 => Ok(Some(i64::from_le_bytes(self.bytes()?).into())),
            8 => self.string().map(|_| None),
            9 if depth < MAX_DEPTH => {
                let inner = self.u32()?;
                let n = self.len()?;
                match fixed(inner) {
                    Some(size) => self.skip(n.saturating_mul(size))?,
                    None => {
                        for _ in 0..n {
                            if self.left == 0 {
                                return Err(eof("an array longer than the file"));
                            }
                            self.value(inner, depth + 1)?;
                        }
                    }
                }
                Ok(None)
            }
            _ => match fixed(ty) {
                Some(size) => self.skip(size).map(|()| None),
                None => Err(bad_data(format!("unknown value type {ty}"))),
            },
        }
    }
}

fn eof(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::UnexpectedEof, what.to_string())
}

fn bad_data(what: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what)
}

/// Walks the metadata of the GGUF file at `path` and refuses an alignment
/// of zero (or one that is not a positive integer), before candle reads it.
pub(crate) fn check_metadata(path: &Path) -> Result<()> {
    let corrupt = |field: &str, reason: String| Error::field(path, field, reason);
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    let size = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut w = Walk {
        r: BufReader::new(f),
        left: size,
        wide: true,
    };
    let header = |e: std::io::Error| corrupt("header", e.to_string());
    let magic = w.bytes::<4>().map_err(header)?;
    let version = w.u32().map_err(header)?;
    if &magic != b"GGUF" || !(1..=3).contains(&version) {
        // candle names the exact problem.
        return Ok(());
    }
    w.wide = version > 1;
    let _tensors = w.len().map_err(header)?;
    let kvs = w.len().map_err(header)?;
    for k in 0..kvs {
        let field = format!("metadata entry {k}");
        let meta = |e: std::io::Error| corrupt(&field, e.to_string());
        let key = w.string().map_err(meta)?;
        let ty = w.u32().map_err(meta)?;
        let value = w.value(ty, 0).map_err(meta)?;
        if key == ALIGNMENT.as_bytes() && ty != 8 && ty != 9 {
            match value {
                Some(v) if v > 0 && v <= i128::from(u32::MAX) => {}
                _ => {
                    return Err(corrupt(
                        ALIGNMENT,
                        format!("{value:?} is not a positive alignment"),
                    ))
                }
            }
        }
    }
    Ok(())
}

/// Checks every tensor of `content` against the file's `size`: the element
/// count is positive (candle reads an empty tensor through a misaligned
/// pointer), does not overflow, is whole blocks of its type, and the bytes
/// lie inside the file.
pub(crate) fn check_tensors(content: &Content, path: &Path, size: u64) -> Result<()> {
    for (name, t) in &content.tensor_infos {
        let field = format!("tensor {name:?}");
        let dims = t.shape.dims();
        if dims.contains(&0) {
            return Err(Error::field(
                path,
                &field,
                format!("{:?} {dims:?} has no elements", t.ggml_dtype),
            ));
        }
        let elems = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let block = t.ggml_dtype.block_size();
        let bytes = elems
            .filter(|e| e % block == 0)
            .and_then(|e| (e / block).checked_mul(t.ggml_dtype.type_size()))
            .and_then(|b| u64::try_from(b).ok());
        let end = bytes.and_then(|b| {
            content
                .tensor_data_offset
                .checked_add(t.offset)?
                .checked_add(b)
        });
        if end.is_none_or(|e| e > size) {
            return Err(Error::field(
                path,
                &field,
                format!(
                    "{:?} {dims:?} at offset {} does not fit in the file of {size} bytes",
                    t.ggml_dtype, t.offset
                ),
            ));
        }
    }
    Ok(())
}
