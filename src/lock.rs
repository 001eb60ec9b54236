//! One writer per directory: an advisory lock file.
//!
//! A [`DirLock`] holds an operating-system lock ([`File::try_lock`]: `flock`
//! on Unix) on a lock file for as long as it lives; the file records the
//! holder (process id, host and start time) so that a second process gets an
//! [`Error::Locked`] naming it.
//! The system releases the lock when the holder exits or is killed, so a lock
//! file left behind by a dead process is stale by construction: the next
//! process takes it over and [`DirLock::previous_holder`] says whose it was.
//! A holder that finishes removes the lock file while it still holds the
//! lock; a process that locked the removed file sees that the path no longer
//! names it and opens the new one, so two processes never hold two files of
//! the same name.
//!
//! Within one process, locking the same file again shares the lock (the
//! `vlmq` command can hold its output directory for a whole run while the
//! checkpoint writer locks it again for the write).
//!
//! The operating system's lock belongs to the open file, not to the process:
//! opening the lock file a second time in the same process and locking it
//! would refuse the process itself, which is why nested acquisitions share
//! one open file. Files are opened close-on-exec, so a child process never
//! inherits the lock. On platforms without file locks the lock is a no-op.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use crate::error::{Error, Result};
use crate::fsutil::write_limited;

/// The lock file of a state directory, inside it.
pub const STATE_LOCK_FILE: &str = ".vlmq-state.lock";

/// Lock files held by this process, shared by nested acquisitions.
static HELD: Mutex<BTreeMap<PathBuf, Weak<Held>>> = Mutex::new(BTreeMap::new());

/// An open, locked lock file; removed and unlocked when the last
/// [`DirLock`] sharing it is dropped (closing the file releases the lock).
struct Held {
    _file: File,
    path: PathBuf,
}

impl Drop for Held {
    fn drop(&mut self) {
        // Removed while still locked: see the module documentation.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A held lock on a directory; see the [module documentation](self).
pub struct DirLock {
    _held: Arc<Held>,
    path: PathBuf,
    previous: Option<String>,
}

impl std::fmt::Debug for DirLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirLock")
            .field("path", &self.path)
            .field("previous", &self.previous)
            .finish()
    }
}

impl DirLock {
    /// Locks a state directory (creating it): the lock file is
    /// [`STATE_LOCK_FILE`] inside it.
    pub fn state_dir(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        Self::acquire(&dir.join(STATE_LOCK_FILE))
    }

    /// Locks an output directory, which is replaced as a whole when written:
    /// the lock file is its hidden sibling `.NAME.vlmq.lock`.
    pub fn output_dir(dir: &Path) -> Result<Self> {
        // `.` or `..` name the directory they resolve to, as in
        // `fsutil::write_dir_atomic`.
        let resolved;
        let dir = match dir.file_name() {
            Some(_) => dir,
            None => {
                resolved = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
                resolved.as_path()
            }
        };
        let name = dir.file_name().ok_or_else(|| {
            Error::io(
                dir,
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "the path names no directory",
                ),
            )
        })?;
        let parent = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        let mut file = std::ffi::OsString::from(".");
        file.push(name);
        file.push(".vlmq.lock");
        Self::acquire(&parent.join(file))
    }

    /// Locks the lock file `path` (created when missing). Fails with
    /// [`Error::Locked`] naming the holder while another process holds it.
    pub fn acquire(path: &Path) -> Result<Self> {
        let key = held_key(path);
        let mut held = HELD.lock().unwrap_or_else(|p| p.into_inner());
        held.retain(|_, w| w.strong_count() > 0);
        if let Some(h) = held.get(&key).and_then(Weak::upgrade) {
            return Ok(DirLock {
                _held: h,
                path: path.to_path_buf(),
                previous: None,
            });
        }
        let mut file = open_locked(path)?;
        let previous = Some(read_holder(&mut file)).filter(|h| h != UNKNOWN);
        let record = format!(
            "pid={} host={} started={}\n",
            std::process::id(),
            host(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        );
        let recorded = file
            .set_len(0)
            .and_then(|()| file.seek(SeekFrom::Start(0)))
            .and_then(|_| write_limited(&mut file, record.as_bytes()))
            .and_then(|()| file.sync_all());
        if let Err(e) = recorded {
            // Still ours (locked): a lock file without a holder is not left behind.
            let _ = std::fs::remove_file(path);
            return Err(Error::io(path, e));
        }
        let h = Arc::new(Held {
            _file: file,
            path: path.to_path_buf(),
        });
        held.insert(key, Arc::downgrade(&h));
        Ok(DirLock {
            _held: h,
            path: path.to_path_buf(),
            previous,
        })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The holder recorded in a lock file left behind by a process that died
    /// holding it (now taken over), if any.
    pub fn previous_holder(&self) -> Option<&str> {
        self.previous.as_deref()
    }
}

/// The key of a lock file among this process's held locks: the path with
/// its directory resolved, so that two spellings of one file (relative and
/// absolute, through a symbolic link) share one lock instead of the process
/// refusing itself.
fn held_key(path: &Path) -> PathBuf {
    match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) => {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            dir.canonicalize()
                .map_or_else(|_| path.to_path_buf(), |d| d.join(name))
        }
        _ => path.to_path_buf(),
    }
}

/// Opens (creating) and locks the lock file `path`; [`Error::Locked`]
/// while another process holds it. A file its holder removed between our
/// open and our lock is let go and the new one opened.
fn open_locked(path: &Path) -> Result<File> {
    for _ in 0..100 {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        if !try_lock(&file).map_err(|e| Error::io(path, e))? {
            return Err(Error::Locked {
                path: path.to_path_buf(),
                holder: read_holder(&mut file),
            });
        }
        if still_named(&file, path) {
            return Ok(file);
        }
    }
    Err(Error::io(
        path,
        std::io::Error::other("the lock file kept being replaced while it was locked"),
    ))
}

/// Whether `path` still names the open `file` (not removed or replaced).
#[cfg(unix)]
fn still_named(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn still_named(_file: &File, path: &Path) -> bool {
    path.exists()
}

const UNKNOWN: &str = "unknown (the lock file is empty)";

/// The holder recorded in the lock file, one line.
fn read_holder(file: &mut File) -> String {
    let mut text = String::new();
    let _ = file
        .seek(SeekFrom::Start(0))
        .and_then(|_| file.take(512).read_to_string(&mut text));
    let text = text.trim();
    if text.is_empty() {
        UNKNOWN.to_string()
    } else {
        text.to_string()
    }
}

/// This machine's host name, when the system says.
fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty() && !h.contains(char::is_whitespace))
        .unwrap_or_else(|| "unknown".into())
}

/// Takes the lock without waiting: `Ok(false)` when another open file
/// holds it. Where the platform has no file locks, the lock always succeeds.
fn try_lock(file: &File) -> std::io::Result<bool> {
    match file.try_lock() {
        Ok(()) => Ok(true),
        Err(TryLockError::WouldBlock) => Ok(false),
        Err(TryLockError::Error(e)) if e.kind() == std::io::ErrorKind::Unsupported => Ok(true),
        Err(TryLockError::Error(e)) => Err(e),
    }
}
