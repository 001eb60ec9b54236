//! Issue 13 item 11: a resume state that changed after it was saved is an
//! error naming the file, never a silently different result.

mod common;

use std::path::{Path, PathBuf};

use common::tiny::{samples, TinyModel};
use vlmq::pipeline::{quantize_model, PipelineConfig, QuantMethod};
use vlmq::{Bits, Error, GptqConfig, GroupSize, QuantScheme};

fn config(dir: &Path) -> PipelineConfig {
    let scheme =
        QuantScheme::new(Bits::new(4).unwrap()).with_group_size(GroupSize::new(8).unwrap());
    PipelineConfig::new(QuantMethod::Gptq, GptqConfig::new(scheme)).with_state_dir(dir)
}

/// A finished state directory for a 3-block model.
fn saved_state(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vlmq-integrity-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut model = TinyModel::new(3, 16, 24, 3);
    quantize_model(&mut model, &samples(4, 2, 16), &config(&dir), |_| {}).unwrap();
    dir
}

fn resume(dir: &Path) -> vlmq::Result<vlmq::pipeline::PipelineOutput> {
    let mut model = TinyModel::new(3, 16, 24, 3);
    quantize_model(&mut model, &samples(4, 2, 16), &config(dir), |_| {})
}

/// Replaces the first occurrence of `from` in `file` by `to` (same length).
fn patch(file: &Path, from: &[u8], to: &[u8]) {
    let mut bytes = std::fs::read(file).unwrap();
    let at = bytes
        .windows(from.len())
        .position(|w| w == from)
        .unwrap_or_else(|| panic!("{from:?} not in {file:?}"));
    bytes[at..at + to.len()].copy_from_slice(to);
    std::fs::write(file, bytes).unwrap();
}

fn assert_names(err: &Error, file: &str) {
    let text = err.to_string();
    assert!(text.contains(file), "{text}");
}

#[test]
fn an_untouched_state_resumes_every_block() {
    let dir = saved_state("untouched");
    assert_eq!(resume(&dir).unwrap().report.resumed_blocks, 3);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_block_report_file_emptied_to_an_empty_list_is_an_error() {
    let dir = saved_state("empty-list");
    std::fs::write(dir.join("block_1.json"), b"[]").unwrap();
    let err = resume(&dir).unwrap_err();
    assert!(
        matches!(err.root(), Error::CorruptCheckpoint { .. }),
        "{err}"
    );
    assert_names(&err, "block_1.json");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_changed_code_or_bit_width_is_caught_by_the_checksum() {
    let dir = saved_state("codes");
    let file = dir.join("block_2.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    // The last byte is data (a g_idx, code, scale or zero point): change it within range.
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&file, bytes).unwrap();
    let err = resume(&dir).unwrap_err();
    assert!(
        matches!(err.root(), Error::CorruptCheckpoint { .. }),
        "{err}"
    );
    assert_names(&err, "block_2.safetensors");
    std::fs::remove_dir_all(&dir).unwrap();

    let dir = saved_state("bits");
    patch(
        &dir.join("block_0.safetensors"),
        br#""a.bits":"4""#,
        br#""a.bits":"8""#,
    );
    let err = resume(&dir).unwrap_err();
    assert!(
        matches!(err.root(), Error::CorruptCheckpoint { .. }),
        "{err}"
    );
    assert_names(&err, "block_0.safetensors");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_missing_manifest_with_block_files_left_is_an_error_not_a_restart() {
    let dir = saved_state("no-manifest");
    std::fs::remove_file(dir.join("manifest.json")).unwrap();
    let err = resume(&dir).unwrap_err();
    assert!(matches!(err, Error::StateMismatch { .. }), "{err}");
    assert_names(&err, "manifest.json");
    // A manifest without a block's checksum is refused too.
    let dir2 = saved_state("no-checksum");
    patch(
        &dir2.join("manifest.json"),
        b"\"block_1.json\"",
        b"\"block_9.json\"",
    );
    let err = resume(&dir2).unwrap_err();
    assert!(err.to_string().contains("block_1.json"), "{err}");
    for d in [dir, dir2] {
        std::fs::remove_dir_all(&d).unwrap();
    }
}

/// A report edited into another valid report (a layer's timing) parses and
/// would resume silently: only the checksum sees it.
#[test]
fn a_valid_but_edited_block_report_is_caught_by_the_checksum() {
    let dir = saved_state("edited-report");
    let file = dir.join("block_0.json");
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    json[0]["seconds"] = serde_json::json!(12345.0);
    std::fs::write(&file, json.to_string()).unwrap();
    let err = resume(&dir).unwrap_err();
    assert!(
        matches!(err.root(), Error::CorruptCheckpoint { .. }),
        "{err}"
    );
    assert_names(&err, "block_0.json");
    std::fs::remove_dir_all(&dir).unwrap();
}
