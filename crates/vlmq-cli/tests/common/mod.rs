//! What the tests of the `vlmq` binary share: the fixture model, scratch
//! directories and calibration text.

// Each test binary uses its own subset.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The tiny two-block Llama of vlmq-candle's fixtures (hidden 64, MLP 176).
pub fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../vlmq-candle/tests/fixtures/hf-tiny/llama")
}

/// A fresh scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vlmq-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Plain English calibration text, long enough for a few 32-token windows.
pub fn write_text(dir: &Path) -> PathBuf {
    let words = [
        "the", "model", "reads", "a", "long", "page", "of", "text", "and", "every", "token",
        "counts", "when", "weights", "are", "rounded", "to", "four", "bits", "while", "errors",
        "stay", "small",
    ];
    let text: Vec<&str> = (0..1500)
        .map(|i| words[(i * 7 + i / 5) % words.len()])
        .collect();
    let p = dir.join("calib.txt");
    std::fs::write(&p, text.join(" ")).unwrap();
    p
}

/// A path as the `&str` a command line takes.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Settings small enough for the 2-block fixture.
pub const SMALL: &[&str] = &["--samples", "4", "--seq-len", "32"];

/// Runs the `vlmq` binary with `args`.
pub fn vlmq(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vlmq"))
        .args(args)
        .output()
        .expect("the vlmq binary runs")
}

/// What a run printed on standard output.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// What a run printed on standard error.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
