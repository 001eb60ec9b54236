//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let p = std::env::temp_dir().join(format!("vlmq-{tag}-{}-{n}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Copies every file of `src` into `dst` (flat directories only).
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).expect("create dir");
    for e in std::fs::read_dir(src).expect("read dir") {
        let e = e.expect("dir entry");
        std::fs::copy(e.path(), dst.join(e.file_name())).expect("copy");
    }
}

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gptq-golden")
}

/// What the Python stack itself decodes from a golden checkpoint
/// (`expected.safetensors` next to `checkpoint_v1/` and `checkpoint_v2/`).
pub struct Expected {
    pub weight: ndarray::Array2<f32>,
    pub bias: ndarray::Array1<f32>,
    pub codes: ndarray::Array2<u8>,
    pub zeros: ndarray::Array2<u8>,
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Reads `dir/expected.safetensors` for the layer `layer`.
pub fn read_expected(dir: &Path, layer: &str) -> Expected {
    use ndarray::{Array1, Array2};
    let bytes = std::fs::read(dir.join("expected.safetensors")).expect("expected.safetensors");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("valid safetensors");
    let t = |suffix: &str| st.tensor(&format!("{layer}{suffix}")).expect("tensor");
    let (w, c, z) = (t(""), t(".codes"), t(".zeros"));
    Expected {
        weight: Array2::from_shape_vec((w.shape()[0], w.shape()[1]), f32s(w.data())).unwrap(),
        bias: Array1::from(f32s(t(".bias").data())),
        codes: Array2::from_shape_vec((c.shape()[0], c.shape()[1]), c.data().to_vec()).unwrap(),
        zeros: Array2::from_shape_vec((z.shape()[0], z.shape()[1]), z.data().to_vec()).unwrap(),
    }
}
