//! Issue 25: a full or read-only disk under the state directory and the
//! checkpoint gives a typed I/O error naming the path, leaves the previous
//! state and checkpoint intact and leaves no temporary file behind.
//!
//! A full disk is simulated in the writer (`fsutil::simulate_free_space`)
//! everywhere, and made real on a small tmpfs where the test can mount one
//! in a private user and mount namespace (`unshare -rm`); a read-only
//! filesystem is made real by remounting that tmpfs read-only. Where no
//! namespace can be made, the tmpfs test says so and passes.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::tiny::{samples, TinyModel};
use vlmq::__private::simulate_free_space;
use vlmq::pipeline::{quantize_model, PipelineConfig, PipelineOutput, QuantMethod};
use vlmq::{Bits, Checkpoint, CheckpointWriter, Error, GptqConfig, GroupSize, QuantScheme};

const ROLE: &str = "VLMQ_DISK_TEST_ROLE";

fn temp(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vlmq-disk-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn config(state: Option<&Path>) -> PipelineConfig {
    let scheme =
        QuantScheme::new(Bits::new(4).unwrap()).with_group_size(GroupSize::new(8).unwrap());
    let cfg = PipelineConfig::new(QuantMethod::Gptq, GptqConfig::new(scheme));
    match state {
        Some(dir) => cfg.with_state_dir(dir),
        None => cfg,
    }
}

fn run(state: Option<&Path>) -> vlmq::Result<PipelineOutput> {
    let mut model = TinyModel::new(3, 16, 24, 4);
    quantize_model(&mut model, &samples(1, 2, 16), &config(state), |_| {})
}

/// Every file under `dir` with its bytes, sorted by path.
fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files(&p));
        } else {
            out.push((p.clone(), std::fs::read(&p).unwrap()));
        }
    }
    out.sort();
    out
}

fn total_bytes(dir: &Path) -> u64 {
    files(dir).iter().map(|(_, b)| b.len() as u64).sum()
}

/// The I/O error at the root of `err`, checked to name a path under `dir`.
fn io_under<'a>(err: &'a Error, dir: &Path) -> &'a std::io::Error {
    match err.root() {
        Error::Io { path, source } => {
            assert!(path.starts_with(dir), "{err}");
            assert!(
                !path
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .ends_with(".tmp"),
                "the error names a temporary file: {err}"
            );
            source
        }
        other => panic!("expected an I/O error, got {other}"),
    }
}

#[test]
fn a_full_disk_while_saving_the_state_fails_typed_and_the_run_resumes_exactly() {
    let reference = run(None).unwrap();
    let dir = temp("state-full");
    let whole = dir.join("whole");
    run(Some(&whole)).unwrap();
    let size = total_bytes(&whole);
    for free in [0, size / 3, (2 * size) / 3] {
        let state = dir.join(format!("free-{free}"));
        simulate_free_space(Some(free));
        let err = run(Some(&state)).unwrap_err();
        simulate_free_space(None);
        let source = io_under(&err, &state);
        assert_eq!(source.kind(), std::io::ErrorKind::StorageFull, "{err}");
        // Nothing half-written is left: no temporary file, and no lock file
        // (with 0 bytes free, writing the holder into it is what fails).
        let left = files(&state);
        assert!(
            left.iter().all(|(p, _)| {
                let name = p.file_name().unwrap().to_string_lossy();
                !name.ends_with(".tmp") && name != vlmq::lock::STATE_LOCK_FILE
            }),
            "free {free}: left {:?}",
            left.iter().map(|(p, _)| p).collect::<Vec<_>>()
        );
        // The state on disk is a valid state: the run resumes from it and
        // ends where an uninterrupted run ends.
        let resumed = run(Some(&state)).unwrap();
        assert_eq!(resumed.weights, reference.weights, "free {free}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

fn checkpoint(out: &PipelineOutput, extra: usize) -> CheckpointWriter {
    let mut w = CheckpointWriter::new();
    for ((b, name), qw) in &out.weights {
        w.add_layer(&format!("tiny.{b}.{name}"), qw.clone(), None)
            .unwrap();
    }
    if extra > 0 {
        let t = vlmq::ndarray::ArrayD::from_elem(vec![extra], 0.5f32);
        w.add_tensor("padding", vlmq::pack::DenseTensor::F32(t))
            .unwrap();
    }
    w
}

#[test]
fn a_directory_without_write_permission_fails_typed() {
    use std::os::unix::fs::PermissionsExt;
    let dir = temp("read-only");
    let ck = dir.join("ck");
    let out = run(None).unwrap();
    checkpoint(&out, 0).write(&ck).unwrap();
    let before = files(&dir);
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o555)).unwrap();
    if std::fs::write(dir.join("probe"), b"").is_ok() {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        eprintln!("skipped: permission bits do not bind this user (root); see the tmpfs test");
        return;
    }
    let err = checkpoint(&out, 64).write(&ck).unwrap_err();
    let state_err = run(Some(&dir.join("state"))).unwrap_err();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let source = io_under(&err, &dir);
    assert_eq!(source.kind(), std::io::ErrorKind::PermissionDenied, "{err}");
    let source = io_under(&state_err, &dir);
    assert_eq!(source.kind(), std::io::ErrorKind::PermissionDenied, "{err}");
    assert_eq!(files(&dir), before, "the checkpoint changed");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Child, inside its own namespace with a small tmpfs mounted at the
/// directory it is given: fills it, then remounts it read-only.
#[test]
fn child_on_a_small_tmpfs() {
    let Ok(dir) = std::env::var(ROLE).map(PathBuf::from) else {
        return;
    };
    let out = run(None).unwrap();
    let ck = dir.join("ck");
    checkpoint(&out, 0).write(&ck).unwrap();
    let before = files(&dir);
    let old = Checkpoint::open(&ck).unwrap().layer("tiny.0.a").unwrap();
    // Larger than the filesystem: the disk fills while the new checkpoint is written.
    let err = checkpoint(&out, 1 << 20).write(&ck).unwrap_err();
    let source = io_under(&err, &dir);
    assert_eq!(source.kind(), std::io::ErrorKind::StorageFull, "{err}");
    assert_eq!(files(&dir), before, "a full disk changed the checkpoint");
    // The state of a run that does not fit: fill the disk but for a 12 KiB
    // reserve, then free the reserve; the state's files take a 4 KiB page
    // each at least (more than 3 of them), so the disk fills mid-run.
    let state = dir.join("state");
    let (reserve, filler) = (dir.join("reserve"), dir.join("filler"));
    std::fs::write(&reserve, vec![0u8; 12 << 10]).unwrap();
    let full = std::fs::write(&filler, vec![0u8; 256 << 10]).unwrap_err();
    assert_eq!(full.kind(), std::io::ErrorKind::StorageFull, "{full}");
    std::fs::remove_file(&reserve).unwrap();
    let err = run(Some(&state)).unwrap_err();
    let source = io_under(&err, &state);
    assert_eq!(source.kind(), std::io::ErrorKind::StorageFull, "{err}");
    assert!(
        files(&state)
            .iter()
            .all(|(p, _)| !p.to_string_lossy().ends_with(".tmp")),
        "a temporary file is left in the state"
    );
    std::fs::remove_file(&filler).unwrap();
    let resumed = run(Some(&state)).unwrap();
    assert_eq!(resumed.weights, out.weights);
    // Read-only: nothing can be written, the checkpoint stays as it was.
    let before = files(&dir);
    let remount = Command::new("mount")
        .args(["-o", "remount,ro"])
        .arg(&dir)
        .status()
        .unwrap();
    assert!(remount.success(), "remounting read-only failed");
    let err = checkpoint(&out, 64).write(&ck).unwrap_err();
    let source = io_under(&err, &dir);
    assert_eq!(
        source.kind(),
        std::io::ErrorKind::ReadOnlyFilesystem,
        "{err}"
    );
    let err = run(Some(&dir.join("state-2"))).unwrap_err();
    let source = io_under(&err, &dir);
    assert_eq!(
        source.kind(),
        std::io::ErrorKind::ReadOnlyFilesystem,
        "{err}"
    );
    assert_eq!(files(&dir), before, "a read-only disk changed something");
    let now = Checkpoint::open(&ck).unwrap().layer("tiny.0.a").unwrap();
    assert_eq!(now, old);
    println!("TMPFS CHECKS PASSED");
}

#[test]
fn on_a_small_tmpfs_a_full_disk_and_a_read_only_remount_fail_typed() {
    let dir = temp("tmpfs");
    let script = "mount -t tmpfs -o size=256k tmpfs \"$0\" || exit 77; \
                  exec \"$1\" --exact child_on_a_small_tmpfs --nocapture --test-threads=1";
    let out = Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "sh", "-c", script])
        .arg(&dir)
        .arg(std::env::current_exe().unwrap())
        .env(ROLE, &dir)
        .output();
    let _ = std::fs::remove_dir_all(&dir);
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            eprintln!("skipped: no `unshare` to make a private tmpfs ({e})");
            return;
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // 1: `unshare` could not make the namespace; 77: the mount failed.
    if matches!(out.status.code(), Some(1) | Some(77)) {
        eprintln!(
            "skipped: no private tmpfs could be mounted here ({:?}): {stderr}",
            out.status
        );
        return;
    }
    assert!(
        out.status.success() && stdout.contains("TMPFS CHECKS PASSED"),
        "{stdout}\n{stderr}"
    );
}
