//! Durable file replacement: the one way `vlmq` writes a file that must not
//! be seen half written.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// Writes `bytes` to `path` atomically and durably: the bytes go to a
/// temporary file in the same directory, which is flushed to disk, renamed
/// over `path`, and then the directory itself is flushed, so after a crash
/// `path` holds either its old or its new content, never a mix.
///
/// ```
/// let dir = std::env::temp_dir().join(format!("vlmq-doc-atomic-{}", std::process::id()));
/// std::fs::create_dir_all(&dir).unwrap();
/// let path = dir.join("note.txt");
/// vlmq::fsutil::write_atomic(&path, b"hello")?;
/// assert_eq!(std::fs::read(&path).unwrap(), b"hello");
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # Ok::<(), vlmq::Error>(())
/// ```
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |tmp| {
        let mut f = File::create(tmp).map_err(|e| Error::io(tmp, e))?;
        f.write_all(bytes).map_err(|e| Error::io(tmp, e))
    })
}

/// Like [`write_atomic`], for content that is produced by writing a file
/// (e.g. a serializer that takes a path): `fill` creates and writes the
/// temporary file it is given; `vlmq` then flushes it, renames it over `path`
/// and flushes the directory. On any failure the temporary file is removed
/// and `path` is untouched.
///
/// ```
/// use std::io::Write;
/// let dir = std::env::temp_dir().join(format!("vlmq-doc-atomic-with-{}", std::process::id()));
/// std::fs::create_dir_all(&dir).unwrap();
/// let path = dir.join("note.txt");
/// vlmq::fsutil::write_atomic_with(&path, |tmp| {
///     let mut f = std::fs::File::create(tmp).map_err(|e| vlmq::Error::io(tmp, e))?;
///     f.write_all(b"hello").map_err(|e| vlmq::Error::io(tmp, e))
/// })?;
/// assert_eq!(std::fs::read(&path).unwrap(), b"hello");
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # Ok::<(), vlmq::Error>(())
/// ```
pub fn write_atomic_with(path: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let file_name = path.file_name().ok_or_else(|| {
        Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "the path names no file"),
        )
    })?;
    // Unique per process and call, so concurrent writers never share a temporary file.
    let serial = TEMP_SERIAL.fetch_add(1, Ordering::Relaxed);
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".{}.{serial}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let written = fill(&tmp).and_then(|()| {
        File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io(&tmp, e))
    });
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    sync_parent(path)
}

static TEMP_SERIAL: AtomicU64 = AtomicU64::new(0);

/// Flushes the directory entry of `path` (a no-op where directories cannot
/// be opened, e.g. on Windows).
fn sync_parent(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    #[cfg(unix)]
    {
        let d = File::open(dir).map_err(|e| Error::io(dir, e))?;
        d.sync_all().map_err(|e| Error::io(dir, e))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}
