//! Durable file replacement: the one way `vlmq` writes a file that must not
//! be seen half written.

use std::cell::Cell;
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
/// vlmq::write_file_atomic(&path, b"hello")?;
/// assert_eq!(std::fs::read(&path).unwrap(), b"hello");
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # Ok::<(), vlmq::Error>(())
/// ```
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |tmp| {
        let mut f = File::create(tmp).map_err(|e| Error::io(tmp, e))?;
        let (first, rest) = bytes.split_at(bytes.len() / 2);
        write_limited(&mut f, first).map_err(|e| Error::io(tmp, e))?;
        crate::kill_point::reached("file-half");
        write_limited(&mut f, rest).map_err(|e| Error::io(tmp, e))
    })
}

/// Like [`write_atomic`], for content that is produced by writing a file
/// (e.g. a serializer that takes a path): `fill` creates and writes the
/// temporary file it is given; `vlmq` then flushes it, renames it over `path`
/// and flushes the directory. On any failure the temporary file is removed
/// and `path` is untouched; an I/O error names `path`, not the temporary
/// file.
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
        return Err(named_after(e, &tmp, path));
    }
    crate::kill_point::reached("file-written");
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
    sync_dir(dir)
}

/// Replaces the directory `dir` with one holding `files` (plain file names
/// and their bytes), all or nothing: the files are written into a new
/// temporary sibling directory and flushed, together with every other entry
/// of the old `dir` (hard-linked, or copied where links are not possible);
/// then the old directory is renamed aside, the new one renamed into place,
/// the parent flushed and the old one removed. After an error `dir` is the
/// old directory, untouched (or absent if it was), and no temporary
/// directory is left; I/O errors name the file of `dir` being written, not
/// its temporary copy. After success `dir` is the new one.
///
/// One error comes after the swap: when the old directory, renamed aside,
/// cannot be removed (e.g. it holds an immutable file), `dir` is the new
/// directory, complete and flushed, and [`Error::LeftBehind`] names the
/// leftover so that it can be removed by hand.
///
/// A crash (not an error) between the two renames leaves the old directory
/// under a hidden sibling name (`.{name}.{pid}.{n}.old`) and no `dir`; the
/// parent directory then holds either `dir` or that sibling, each complete.
///
/// ```
/// let root = std::env::temp_dir().join(format!("vlmq-doc-dir-{}", std::process::id()));
/// let dir = root.join("ckpt");
/// vlmq::__private::write_dir_atomic(&dir, &[("a.txt", b"one"), ("b.txt", b"two")])?;
/// vlmq::__private::write_dir_atomic(&dir, &[("a.txt", b"three")])?;
/// assert_eq!(std::fs::read(dir.join("a.txt")).unwrap(), b"three");
/// assert_eq!(std::fs::read(dir.join("b.txt")).unwrap(), b"two"); // carried over
/// # std::fs::remove_dir_all(&root).unwrap();
/// # Ok::<(), vlmq::Error>(())
/// ```
pub fn write_dir_atomic(dir: &Path, files: &[(&str, &[u8])]) -> Result<()> {
    write_dir_atomic_hooked(dir, files, &mut |_| Ok(()))
}

/// Points of [`write_dir_atomic`] where a failure-injection test may fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step<'a> {
    /// Before a file is created in the new directory.
    Before(&'a str),
    /// Half of a file's bytes are written.
    During(&'a str),
    /// A file is complete and flushed.
    After(&'a str),
    /// The old directory has been renamed aside.
    MovedAside,
    /// The new directory is in place; the parent is not yet flushed.
    Swapped,
    /// The new directory is in place and flushed; the old one is about to
    /// be removed (an error here stands for a failed removal).
    RemovingOld,
}

/// [`write_dir_atomic`] with a hook called at every [`Step`]; an error from
/// the hook is handled like an I/O error at that point.
pub(crate) fn write_dir_atomic_hooked(
    dir: &Path,
    files: &[(&str, &[u8])],
    hook: &mut dyn FnMut(Step<'_>) -> Result<()>,
) -> Result<()> {
    let hook = &mut |step: Step<'_>| {
        crate::kill_point::dir_step(step);
        hook(step)
    };
    let invalid = |p: &Path, what: String| {
        Error::io(
            p,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, what),
        )
    };
    for (k, (name, _)) in files.iter().enumerate() {
        if files[..k].iter().any(|(earlier, _)| earlier == name) {
            return Err(invalid(
                dir,
                format!("{name:?} is given twice (only one content can be kept)"),
            ));
        }
        let plain = !name.is_empty()
            && *name != "."
            && *name != ".."
            && !name.contains(['/', '\\'])
            && Path::new(name).file_name() == Some(std::ffi::OsStr::new(name));
        if !plain {
            return Err(invalid(dir, format!("{name:?} is not a plain file name")));
        }
    }
    let dir = match dir.file_name() {
        Some(_) => dir.to_path_buf(),
        None => dir.canonicalize().map_err(|e| Error::io(dir, e))?,
    };
    let name = dir
        .file_name()
        .ok_or_else(|| invalid(&dir, "the path names no directory".into()))?
        .to_string_lossy()
        .into_owned();
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => Path::new(".").to_path_buf(),
    };
    fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let existed = match fs::symlink_metadata(&dir) {
        Ok(m) if m.is_dir() => true,
        Ok(_) => return Err(invalid(&dir, "exists and is not a directory".into())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(Error::io(&dir, e)),
    };
    let serial = TEMP_SERIAL.fetch_add(1, Ordering::Relaxed);
    let stem = format!(".{name}.{}.{serial}", std::process::id());
    let new = parent.join(format!("{stem}.new"));
    let old = parent.join(format!("{stem}.old"));
    fs::create_dir(&new).map_err(|e| Error::io(&new, e))?;
    let filled = fill_dir(&new, existed.then_some(dir.as_path()), files, hook);
    if let Err(e) = filled {
        let _ = fs::remove_dir_all(&new);
        return Err(named_after(e, &new, &dir));
    }
    if existed {
        if let Err(e) = fs::rename(&dir, &old) {
            let _ = fs::remove_dir_all(&new);
            return Err(Error::io(&dir, e));
        }
        let swapped = hook(Step::MovedAside)
            .and_then(|()| fs::rename(&new, &dir).map_err(|e| Error::io(&dir, e)));
        if let Err(e) = swapped {
            let _ = fs::rename(&old, &dir);
            let _ = fs::remove_dir_all(&new);
            return Err(e);
        }
    } else if let Err(e) = fs::rename(&new, &dir) {
        let _ = fs::remove_dir_all(&new);
        return Err(Error::io(&dir, e));
    }
    if let Err(e) = hook(Step::Swapped).and_then(|()| sync_dir(&parent)) {
        // Undo: the call fails, so `dir` must be the old directory again.
        let _ = fs::rename(&dir, &new);
        if existed {
            let _ = fs::rename(&old, &dir);
        }
        let _ = fs::remove_dir_all(&new);
        return Err(e);
    }
    if existed {
        // The new directory is in place and durable; the old one is litter,
        // but litter the caller must hear about when it cannot be removed.
        let removed = hook(Step::RemovingOld)
            .and_then(|()| fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e)));
        if let Err(e) = removed {
            let reason = match e {
                Error::Io { source, .. } => source.to_string(),
                other => other.to_string(),
            };
            return Err(Error::LeftBehind {
                dir,
                left: old,
                reason,
            });
        }
    }
    Ok(())
}

/// Writes `files` into the empty directory `new`, carries over the other
/// entries of `old`, and flushes everything.
fn fill_dir(
    new: &Path,
    old: Option<&Path>,
    files: &[(&str, &[u8])],
    hook: &mut dyn FnMut(Step<'_>) -> Result<()>,
) -> Result<()> {
    if let Some(old) = old {
        let keep = |n: &std::ffi::OsStr| !files.iter().any(|(f, _)| std::ffi::OsStr::new(f) == n);
        carry_over(old, new, &keep)?;
    }
    for (name, bytes) in files {
        hook(Step::Before(name))?;
        let path = new.join(name);
        let mut f = File::create(&path).map_err(|e| Error::io(&path, e))?;
        let half = bytes.len() / 2;
        write_limited(&mut f, &bytes[..half]).map_err(|e| Error::io(&path, e))?;
        hook(Step::During(name))?;
        write_limited(&mut f, &bytes[half..])
            .and_then(|()| f.sync_all())
            .map_err(|e| Error::io(&path, e))?;
        hook(Step::After(name))?;
    }
    sync_dir(new)
}

/// Hard-links (or copies) every entry of `from` that `keep` accepts into
/// `to`, recursing into directories.
fn carry_over(from: &Path, to: &Path, keep: &dyn Fn(&std::ffi::OsStr) -> bool) -> Result<()> {
    for entry in fs::read_dir(from).map_err(|e| Error::io(from, e))? {
        let entry = entry.map_err(|e| Error::io(from, e))?;
        let name = entry.file_name();
        if !keep(&name) {
            continue;
        }
        let src = entry.path();
        let dst = to.join(&name);
        let ty = entry.file_type().map_err(|e| Error::io(&src, e))?;
        if ty.is_dir() {
            fs::create_dir(&dst).map_err(|e| Error::io(&dst, e))?;
            carry_over(&src, &dst, &|_| true)?;
            sync_dir(&dst)?;
        } else if fs::hard_link(&src, &dst).is_err() {
            fs::copy(&src, &dst).map_err(|e| Error::io(&src, e))?;
        }
    }
    Ok(())
}

/// Flushes a directory's entries (a no-op where directories cannot be opened).
fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        let d = File::open(dir).map_err(|e| Error::io(dir, e))?;
        d.sync_all().map_err(|e| Error::io(dir, e))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// An I/O error about a file under the temporary `from` renamed to name the
/// same file under `to`, its destination (the temporary is gone by then).
fn named_after(e: Error, from: &Path, to: &Path) -> Error {
    match e {
        Error::Io { path, source } => match path.strip_prefix(from) {
            Ok(rest) if rest.as_os_str().is_empty() => Error::io(to, source),
            Ok(rest) => Error::io(to.join(rest), source),
            Err(_) => Error::Io { path, source },
        },
        other => other,
    }
}

thread_local! {
    /// Simulated free space left to this thread's writes, in bytes.
    static FREE_SPACE: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Test support, not part of the API: this thread's writes through
/// [`write_atomic`] and [`write_dir_atomic`] (and so the checkpoint, state
/// and export writers built on them) and of lock files fail like writes to a full disk
/// (`StorageFull`) once `bytes` more bytes have been written; `None` lifts
/// the limit.
#[doc(hidden)]
pub fn simulate_free_space(bytes: Option<u64>) {
    FREE_SPACE.with(|c| c.set(bytes));
}

/// Writes all of `bytes` to `f`, or as many as the simulated free space
/// allows and then fails with `StorageFull`.
pub(crate) fn write_limited(f: &mut File, bytes: &[u8]) -> std::io::Result<()> {
    let Some(left) = FREE_SPACE.with(Cell::get) else {
        return f.write_all(bytes);
    };
    let n = usize::try_from(left).map_or(bytes.len(), |l| l.min(bytes.len()));
    f.write_all(&bytes[..n])?;
    FREE_SPACE.with(|c| c.set(Some(left - n as u64)));
    if n < bytes.len() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::StorageFull,
            "no space left on device (simulated)",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn write_atomic_with_puts_what_fill_wrote_at_the_path() {
        let dir = std::env::temp_dir().join(format!("vlmq-atomic-with-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("note.txt");
        write_atomic_with(&path, |tmp| {
            assert_ne!(tmp, path.as_path());
            let mut f = File::create(tmp).map_err(|e| Error::io(tmp, e))?;
            f.write_all(b"hello").map_err(|e| Error::io(tmp, e))
        })
        .unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"hello");
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1, "no temporary left");
        fs::remove_dir_all(&dir).unwrap();
    }
}
