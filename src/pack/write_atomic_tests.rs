//! Failure injection into `CheckpointWriter::write` (issue 13 item 15):
//! whatever step fails, the directory is afterwards the complete old
//! checkpoint (or absent when there was none), never a mix.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ndarray::Array2;
use serde_json::json;

use crate::config::Bits;
use crate::error::{Error, Result};
use crate::fsutil::Step;
use crate::quant::QuantizedWeight;

use super::{Checkpoint, CheckpointWriter};

const FILES: [&str; 3] = ["model.safetensors", "quantize_config.json", "config.json"];

fn writer(scale: f32) -> CheckpointWriter {
    let w = QuantizedWeight::new(
        Bits::new(4).unwrap(),
        true,
        Array2::from_shape_fn((8, 16), |(o, i)| ((o * 3 + i) % 16) as u8),
        Array2::from_elem((1, 8), scale),
        Array2::from_elem((1, 8), 8),
        vec![0; 16],
    )
    .unwrap();
    let mut wr = CheckpointWriter::new().with_model_config(json!({"model_type": "toy"}));
    wr.add_layer("layer", w, None).unwrap();
    wr
}

/// Every entry of `parent` (names) and every file of `dir` (bytes).
fn snapshot(parent: &Path, dir: &Path) -> (Vec<String>, BTreeMap<String, Vec<u8>>) {
    let mut names: Vec<String> = std::fs::read_dir(parent)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let files = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect(),
        Err(_) => BTreeMap::new(),
    };
    (names, files)
}

fn fresh(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!(
        "vlmq-atomic-{tag}-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

/// The steps before the swap is complete (after them comes
/// `Step::RemovingOld`, tested on its own).
fn steps() -> Vec<Step<'static>> {
    let mut v = Vec::new();
    for f in FILES {
        v.extend([Step::Before(f), Step::During(f), Step::After(f)]);
    }
    v.extend([Step::MovedAside, Step::Swapped]);
    v
}

fn fail_at(target: Step<'static>) -> impl FnMut(Step<'_>) -> Result<()> {
    move |s| {
        if s == target {
            Err(Error::io(
                "injected",
                std::io::Error::other(format!("injected failure at {s:?}")),
            ))
        } else {
            Ok(())
        }
    }
}

#[test]
fn a_failure_at_any_step_leaves_the_complete_old_checkpoint() {
    let parent = fresh("over-old");
    let dir = parent.join("ckpt");
    writer(0.5).write(&dir).unwrap();
    std::fs::write(dir.join("tokenizer.json"), b"{}").unwrap();
    let old = snapshot(&parent, &dir);
    let old_layer = Checkpoint::open(&dir).unwrap().layer("layer").unwrap();
    let new = writer(0.25);
    let mut seen = Vec::new();
    new.write_hooked(&dir, &mut |s| {
        seen.push(format!("{s:?}"));
        Ok(())
    })
    .unwrap();
    // Every injection point is reached on a successful write.
    let mut expected: Vec<String> = steps().iter().map(|s| format!("{s:?}")).collect();
    expected.push(format!("{:?}", Step::RemovingOld));
    assert_eq!(seen, expected);
    let (names, files) = snapshot(&parent, &dir);
    assert_eq!(names, ["ckpt"], "no temporary sibling left");
    assert_eq!(files["tokenizer.json"], b"{}", "other files carried over");
    let new_layer = Checkpoint::open(&dir).unwrap().layer("layer").unwrap();
    assert_ne!(new_layer, old_layer);
    let new_snapshot = (names, files);

    for step in steps() {
        // Start from the old checkpoint each time.
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::create_dir(&dir).unwrap();
        for (name, bytes) in &old.1 {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
        let err = new.write_hooked(&dir, &mut fail_at(step)).unwrap_err();
        assert!(err.to_string().contains("injected"), "{step:?}: {err}");
        assert_eq!(
            snapshot(&parent, &dir),
            old,
            "{step:?}: not the old checkpoint"
        );
        let ck = Checkpoint::open(&dir).unwrap();
        assert_eq!(ck.layer("layer").unwrap(), old_layer, "{step:?}");
    }
    // And without a failure the result is the new checkpoint.
    new.write(&dir).unwrap();
    assert_eq!(snapshot(&parent, &dir), new_snapshot);
    std::fs::remove_dir_all(&parent).unwrap();
}

#[test]
fn a_failure_without_an_old_checkpoint_leaves_no_directory() {
    let parent = fresh("no-old");
    let dir = parent.join("ckpt");
    for step in steps().into_iter().filter(|s| *s != Step::MovedAside) {
        let err = writer(0.5)
            .write_hooked(&dir, &mut fail_at(step))
            .unwrap_err();
        assert!(err.to_string().contains("injected"), "{step:?}: {err}");
        let (names, _) = snapshot(&parent, &dir);
        assert!(names.is_empty(), "{step:?}: left {names:?}");
    }
    std::fs::remove_dir_all(&parent).unwrap();
}

/// Issue 25, item 7: an old directory that cannot be removed after the swap
/// (an immutable file in it, here an injected failure) is named in the
/// error instead of being left behind in silence.
#[test]
fn an_old_directory_that_cannot_be_removed_is_named() {
    let parent = fresh("left-behind");
    let dir = parent.join("ckpt");
    writer(0.5).write(&dir).unwrap();
    let err = writer(0.25)
        .write_hooked(&dir, &mut fail_at(Step::RemovingOld))
        .unwrap_err();
    let Error::LeftBehind { dir: d, left, .. } = &err else {
        panic!("expected LeftBehind, got {err}");
    };
    assert_eq!(d, &dir);
    assert!(left.is_dir(), "{err}");
    assert!(err.to_string().contains("injected"), "{err}");
    // The new checkpoint is complete in place; the leftover is the old one.
    let new_layer = Checkpoint::open(&dir).unwrap().layer("layer").unwrap();
    let old_layer = Checkpoint::open(left).unwrap().layer("layer").unwrap();
    assert_ne!(new_layer, old_layer);
    std::fs::remove_dir_all(&parent).unwrap();
}

/// A full disk while the files are written (the simulated free space runs
/// out in each of the files in turn): a typed I/O error naming the file of
/// the checkpoint, the old checkpoint intact and no temporary directory left.
#[test]
fn a_full_disk_leaves_the_old_checkpoint_and_no_temporary() {
    let parent = fresh("disk-full");
    let dir = parent.join("ckpt");
    writer(0.5).write(&dir).unwrap();
    let old = snapshot(&parent, &dir);
    let new = writer(0.25);
    let sizes: Vec<u64> = old.1.values().map(|b| b.len() as u64).collect();
    let total: u64 = sizes.iter().sum();
    let mut named = std::collections::BTreeSet::new();
    let lock = parent.join(".ckpt.vlmq.lock");
    // Free space from nothing to one byte short of the whole checkpoint.
    for free in [0, 1, total / 3, total / 2, total - 1] {
        crate::fsutil::simulate_free_space(Some(free));
        let err = new.write(&dir).unwrap_err();
        crate::fsutil::simulate_free_space(None);
        let Error::Io { path, source } = &err else {
            panic!("free {free}: expected an I/O error, got {err}");
        };
        assert_eq!(source.kind(), std::io::ErrorKind::StorageFull, "{err}");
        // The output's lock file beside the directory is written first, so
        // with (almost) no space left it is the file the error names.
        if *path != lock {
            assert_eq!(path.parent(), Some(dir.as_path()), "free {free}: {err}");
            named.insert(path.file_name().unwrap().to_owned());
        }
        assert_eq!(
            snapshot(&parent, &dir),
            old,
            "free {free}: not the old checkpoint"
        );
    }
    assert!(
        named.len() > 1,
        "the failure fell in one file only: {named:?}"
    );
    new.write(&dir).unwrap();
    assert_ne!(snapshot(&parent, &dir), old);
    std::fs::remove_dir_all(&parent).unwrap();
}

#[test]
fn a_model_config_that_is_not_an_object_fails_before_any_file_is_written() {
    let parent = fresh("bad-config");
    let dir = parent.join("ckpt");
    writer(0.5).write(&dir).unwrap();
    let old = snapshot(&parent, &dir);
    let bad = writer(0.25).with_model_config(json!([1, 2]));
    let mut touched = false;
    let err = bad
        .write_hooked(&dir, &mut |_| {
            touched = true;
            Ok(())
        })
        .unwrap_err();
    assert!(matches!(err, Error::Json { .. }), "{err}");
    assert!(!touched, "validation comes before the first file");
    assert_eq!(snapshot(&parent, &dir), old);
    std::fs::remove_dir_all(&parent).unwrap();
}
